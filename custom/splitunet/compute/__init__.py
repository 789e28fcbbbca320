"""Where tensors run, for every party: device and thread choice, pinned host staging, mixed precision."""
