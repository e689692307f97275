"""What people see: explain tables, predicted timelines, Perfetto traces, the HTML report."""
