"""The bodies of the `memintent run` and `generate` commands."""
