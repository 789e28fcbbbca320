"""Seconds per training step of the FedAvg U-Net with and without DP-SGD, on random inputs.

``python3 -m splitunet.dp.step_time [--features ...] [--crop 32] [--batch 2] [--steps 5] [--threads 1]`` prints one
JSON object. Both arms take Adam steps on batches of the same fixed size (DP-SGD here without Poisson sampling, so
that both see ``batch`` items per step), after one warm-up step each; DP-SGD adds per-sample gradients (hooks, and
``torch.func`` for the transposed convolutions), clipping and noise. The timing is all it measures: the noise level
does not change it. Wall seconds depend on what else the machine runs; the process's CPU seconds (``*_cpu_s``) much
less so, and with one thread they are the compute a step takes.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, TensorDataset

from splitunet.dp.dp_model import prepare_for_dp
from splitunet.dp.dp_settings import DPSettings
from splitunet.dp.epsilon_budget import plan_budget
from splitunet.dp.private_training import PrivateTraining
from splitunet.horizontal.model import FedAvgUNet
from splitunet.server.trainer import make_loss

__all__ = ["measure_step_seconds", "main"]


def _data(batch: int, crop: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2 * batch, 4, crop, crop, crop, generator=generator)
    return TensorDataset(images, (torch.rand(2 * batch, 3, crop, crop, crop, generator=generator) > 0.7).float())


def measure_step_seconds(
    features: Sequence[int] = (4, 8, 8, 16, 16, 4), crop: int = 32, batch: int = 2, steps: int = 5
) -> dict:
    """Mean seconds per step without and with DP-SGD (on the CPU, at torch's current thread count).

    Returns:
        ``{"plain_s", "dp_s", "ratio", "plain_cpu_s", "dp_cpu_s", "cpu_ratio", "features", "crop", "batch", "steps",
        "threads"}`` (wall and process CPU seconds per step).
    """
    data, loss_fn = _data(batch, crop), make_loss("dice_ce")
    images, regions = data.tensors[0][:batch], data.tensors[1][:batch]
    model = FedAvgUNet(features, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def plain_step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), regions).backward()
        optimizer.step()

    private_model, _ = prepare_for_dp(FedAvgUNet(features, seed=0))
    budget = plan_budget(DPSettings(noise_multiplier=1.0, poisson_sampling=False), len(data), batch, steps + 1)
    private = PrivateTraining(
        private_model,
        torch.optim.Adam(private_model.parameters(), lr=1e-3),
        DataLoader(data, batch_size=batch, shuffle=True),
        budget,
    )
    seconds = {}
    for name, step in (("plain", plain_step), ("dp", lambda: private.step(loss_fn))):
        step()  # warm-up: allocations, torch.func's first trace
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        seconds[f"{name}_s"] = (time.perf_counter() - wall) / steps
        seconds[f"{name}_cpu_s"] = (time.process_time() - cpu) / steps
    return {
        **seconds,
        "ratio": seconds["dp_s"] / seconds["plain_s"],
        "cpu_ratio": seconds["dp_cpu_s"] / seconds["plain_cpu_s"],
        "features": list(features),
        "crop": crop,
        "batch": batch,
        "steps": steps,
        "threads": torch.get_num_threads(),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: print :func:`measure_step_seconds` as JSON."""
    parser = argparse.ArgumentParser(prog="python3 -m splitunet.dp.step_time", description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, nargs="+", default=[4, 8, 8, 16, 16, 4])
    parser.add_argument("--crop", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure_step_seconds(args.features, args.crop, args.batch, args.steps)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":  # pragma: no cover
    main()
