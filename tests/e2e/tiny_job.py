"""The tiny training configuration the end-to-end tests share (seconds per run on two CPU cores)."""

from __future__ import annotations

TINY_SERVER_ARGS = {
    "num_iterations": 16,
    "batch_size": 2,
    "crop_size": [32, 32, 32],
    "features": [4, 8, 8, 16, 16, 4],
    "val_every": 8,
    "num_val_cases": 2,
    "learning_rate": 0.005,
    "log_every": 4,
}

# The phantom of the shared tiny demo run (tests/e2e/conftest.py): cases, volume shape, phantom seed.
TINY_DEMO_PHANTOM = {"cases": 6, "shape": (40, 40, 40), "seed": 3}


def tiny_server_args(**overrides) -> dict:
    """:data:`TINY_SERVER_ARGS` with some settings changed, e.g. ``tiny_server_args(num_iterations=4)``."""
    return {**TINY_SERVER_ARGS, **overrides}
