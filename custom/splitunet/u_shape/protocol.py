"""What the hospitals and the server of the U-shaped job agree on: task names, tensor keys, meta keys.

Tensors travel in the split job's feature DXOs (:mod:`splitunet.wire.transport`), so its activation filters
(quantization, the guard, noise) act on them unchanged. A feature DXO names each tensor by the resolution level it
lies at (``x<l>``: ``1/2^l`` of the crop), which the U-shaped tensors fit: ``x0`` lies at level 0 and ``u2`` at
level 1 (half resolution, ``features[1]`` channels: the shape of the encoder's ``x1``). Head and tail weights travel
as FLARE ``WEIGHTS`` DXOs (:mod:`splitunet.u_shape.weights_transport`). Per task, server to hospital / hospital to
server:

- ``u_setup``: control with ``config`` and ``experiment`` / control with ``u_num_cases`` (the averaging weight).
- ``u_forward``: gradients ``x0`` (dL/dx0 of the last step), or ``WEIGHTS`` (the federation's head and tail at a
  round's start), or control / activations ``x0`` of the next crops.
- ``u_tail``: activations ``x1`` (``u2``) / gradients ``x1`` (dL/du2) with ``u_loss``.
- ``u_collect``: gradients ``x0`` (dL/dx0 of the round's last step) / ``WEIGHTS`` (head and tail) with
  ``u_num_cases``.
- ``u_validate``: ``WEIGHTS`` (to start; ``u_final`` on the run's last) or activations ``x1`` (``u2`` of the last
  windows) / activations ``x0`` of the next windows, or control with ``u_dice`` once the held-out cases are done.

The server never receives a level-0 tensor with the image's (4), a modality's (1) or the output's (3) channels
unless ``features[0]`` is one of them; the job's widths avoid that.
"""

from __future__ import annotations

from splitunet.wire.protocol import level_key

__all__ = ["UTaskName", "UMetaKey", "HOSPITAL_PARTS", "X0_LEVEL", "U2_LEVEL", "X0_KEY", "U2_KEY"]

# The parts each hospital trains and the federation averages (the middle is one model at the server).
HOSPITAL_PARTS = ("head", "tail")

# Resolution levels (and DXO keys) of the two tensors that cross.
X0_LEVEL = 0
U2_LEVEL = 1
X0_KEY = level_key(X0_LEVEL)
U2_KEY = level_key(U2_LEVEL)


class UTaskName:
    """FLARE task names of the U-shaped job (the server sends them; the hospitals' executor takes them)."""

    SETUP = "u_setup"  # build head and tail; report the number of training cases
    FORWARD = "u_forward"  # finish the last step (or take the average), then run the head on the next crops
    TAIL = "u_tail"  # run the tail and the loss on u2; return dL/du2
    COLLECT = "u_collect"  # finish the round's last step; send head and tail for averaging
    VALIDATE = "u_validate"  # sliding-window validation, one window batch per round trip

    ALL = (SETUP, FORWARD, TAIL, COLLECT, VALIDATE)


class UMetaKey:
    """DXO meta keys of the U-shaped job (besides :class:`splitunet.wire.protocol.MetaKey`'s ``iteration``,
    ``config``, ``experiment``, ``site_compute_s``, ``saved_path`` and the filter trail)."""

    ROUND = "u_round"
    NUM_CASES = "u_num_cases"  # a hospital's training cases: its weight in the average
    LOSS = "u_loss"  # the hospital's loss of the step (a scalar; the server never sees logits or labels)
    DICE = "u_dice"  # {"TC", "WT", "ET", "mean"} over the hospital's held-out cases
    HD95 = "u_hd95"  # the same for HD95 in voxels (splitunet.region_scores)
    FINAL = "u_final"  # the weights are the run's last: the hospital saves them
