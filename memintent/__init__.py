"""memintent: GPU memory as a bounded working set. Trace a PyTorch model into the Memory Intent IR, plan which
blocks stay resident and which stream from pinned host memory under an HBM budget, and run the plan."""

__version__ = "0.1.0"
