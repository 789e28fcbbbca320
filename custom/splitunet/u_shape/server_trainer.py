"""The server's part of a U-shaped step, in plain torch: the shared middle between the hospitals' heads and tails.

The server receives ``x0`` (the head's full-resolution features), returns ``u2`` (half-resolution decoder features),
receives ``dL/du2`` and returns ``dL/dx0``. It never holds an image, a label, a prediction or a loss. No FLARE here,
so the same trainer runs in one process for tests and attacks.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from splitunet.compute.devices import timed_call
from splitunet.networks.optimizer import make_optimizer
from splitunet.u_shape.config import UShapeConfig
from splitunet.u_shape.networks import seeded_part

__all__ = ["MiddleTrainer"]


class MiddleTrainer:
    """One middle shared by every hospital, batched: the hospitals' ``x0`` of a step go through it together.

    Instance norm normalises each sample on its own, so batching the hospitals changes no hospital's ``u2``; the
    middle then steps once per iteration on the sum of the hospitals' losses (each hospital's gradient of its own
    loss, unscaled). Each hospital gets back exactly the gradient of its own loss with respect to its ``x0``.

    Args:
        device: where the middle runs.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.config: UShapeConfig | None = None
        self.middle: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps_applied = 0
        self._pending: tuple[list[str], list[int], torch.Tensor, torch.Tensor] | None = None

    def build(self, config: UShapeConfig) -> None:
        """Create the middle (seeded by ``config.seed``) and its optimiser."""
        self.config = config
        self.middle = seeded_part("middle", config.features, config.seed).to(self.device)
        self.optimizer = make_optimizer(self.middle.parameters(), config.learning_rate, config.weight_decay)
        self._pending = None
        self.steps_applied = 0

    def _require_built(self) -> None:
        if self.middle is None:
            raise RuntimeError("the middle is not built; build() must come first")

    def _batch(self, x0_by_party: Mapping[str, torch.Tensor]) -> tuple[list[str], list[int], torch.Tensor]:
        if not x0_by_party:
            raise ValueError("no hospital sent x0")
        channels = self.config.features[0]
        spatial = {tuple(x0.shape[2:]) for x0 in x0_by_party.values()}
        for party, x0 in x0_by_party.items():
            if x0.dim() != 5 or x0.shape[1] != channels:
                raise ValueError(f"{party} sent x0 of shape {tuple(x0.shape)}; expected (B, {channels}, D, H, W)")
        if len(spatial) != 1:
            raise ValueError(f"the hospitals' x0 differ in spatial size {sorted(spatial)}; the job fixes one crop size")
        parties = sorted(x0_by_party)
        sizes = [int(x0_by_party[p].shape[0]) for p in parties]
        batch = torch.cat([x0_by_party[p].to(self.device, torch.float32) for p in parties])
        return parties, sizes, batch

    def forward(self, x0_by_party: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The middle on every hospital's ``x0``; keeps the graph for :meth:`backward`.

        Returns:
            ``u2`` per hospital (detached, on the CPU).
        """
        self._require_built()
        if self._pending is not None:
            raise RuntimeError("forward called while the previous step waits for its gradients")
        parties, sizes, batch = self._batch(x0_by_party)
        leaf = batch.requires_grad_(True)  # its .grad is what the hospitals need back
        self.middle.train()
        u2 = self.middle(leaf)
        self._pending = (parties, sizes, leaf, u2)
        return dict(zip(parties, (t.detach().cpu() for t in torch.split(u2, sizes))))

    def backward(self, du2_by_party: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Back-propagate the hospitals' ``dL/du2``, step the middle, return ``dL/dx0`` per hospital (CPU)."""
        self._require_built()
        if self._pending is None:
            raise RuntimeError("received dL/du2 but no forward pass is pending")
        parties, sizes, leaf, u2 = self._pending
        if sorted(du2_by_party) != parties:
            raise ValueError(f"gradients from {sorted(du2_by_party)}, but u2 went to {parties}")
        grad = torch.cat([du2_by_party[p].to(self.device, torch.float32) for p in parties])
        if grad.shape != u2.shape:
            raise ValueError(f"dL/du2 of shape {tuple(grad.shape)} for u2 of shape {tuple(u2.shape)}")
        self.optimizer.zero_grad(set_to_none=True)
        u2.backward(grad)
        self.optimizer.step()
        self._pending = None
        self.steps_applied += 1
        return dict(zip(parties, (t.detach().cpu() for t in torch.split(leaf.grad, sizes))))

    @torch.no_grad()
    def infer(self, x0_by_party: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The middle without a graph (validation): ``u2`` per hospital on the CPU."""
        self._require_built()
        parties, sizes, batch = self._batch(x0_by_party)
        self.middle.eval()
        return dict(zip(parties, (t.cpu() for t in torch.split(self.middle(batch), sizes))))

    def state_dict(self) -> dict:
        """Middle and optimiser state (stays at the server)."""
        self._require_built()
        return {
            "config": self.config.to_dict(),
            "middle": self.middle.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "steps_applied": self.steps_applied,
        }

    def timed(self, fn, *args):
        """Run ``fn(*args)``; returns ``(result, seconds)`` (synchronising CUDA, so the time is real)."""
        return timed_call(self.device, fn, *args)
