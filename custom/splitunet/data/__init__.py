"""Data handling: NIfTI input/output, case keys, partitioning, per-party folders and crop sampling."""
