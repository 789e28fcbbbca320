"""Offline measurements behind the figures in the docstrings of the stronger black-box attacks (not tests: each
takes minutes on a CPU). Run one with::

    python3 -m splitunet.evaluation.attacks.attack_measurements unsplit --outer 2
    python3 -m splitunet.evaluation.attacks.attack_measurements substitute --seeds 1 2
    python3 -m splitunet.evaluation.attacks.attack_measurements tracking --iterations 40

Each prints JSON lines. The set-up is the attack tests' (``tests/evaluation/attacks/conftest.py``): 6 phantom
cases of 48^3, the attacked 32^3 FLAIR crop of BRATS_001 at (8, 8, 8), 20 auxiliary crops of the other cases,
the mean-image prior of the other cases at the attacked origin, and a site encoder from seed 0.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from splitunet.evaluation.attacks.encoder_access import build_encoder
from splitunet.evaluation.attacks.encoder_tracking import decoder_gradient_fn, simulate_site_training, track_encoder
from splitunet.evaluation.attacks.learned_inverse import LearnedInverse
from splitunet.evaluation.attacks.substitute_encoder import SubstituteEncoderAttack
from splitunet.evaluation.attacks.unsplit import UnSplit
from splitunet.evaluation.metrics import image_leakage, mean_image_prior

__all__ = ["phantom_setup", "measure_unsplit", "measure_substitute", "measure_tracking", "threshold_regions"]

FEATURES = (8, 16, 32, 64, 128)
CROP = (32, 32, 32)
ORIGIN = (8, 8, 8)
TARGET_CASE = "BRATS_001"


def _crop(volume: np.ndarray, origin) -> torch.Tensor:
    from splitunet.data.sampling import extract_crop

    return torch.from_numpy(extract_crop(volume, origin, CROP).astype(np.float32))[None, None]


def phantom_setup(root: Path | None = None) -> dict:
    """The attack tests' data: ``target (1,1,32^3)``, ``aux (20,...)``, ``prior``, ``site_crops (8,...)`` (the
    attacked crop and 7 seeded random crops of the site's case: what the server receives over iterations),
    ``site_encoder`` (seed 0)."""
    from splitunet.data.partition import partition_msd
    from splitunet.data.party_data import ModalityFolder
    from splitunet.data.phantom import generate_phantom

    root = Path(tempfile.mkdtemp()) if root is None else Path(root)
    generate_phantom(root / "msd", 6, shape=(48, 48, 48), seed=3, progress=False)
    partition_msd(root / "msd", root / "parties", progress=False)
    flair = ModalityFolder(root / "parties" / "flair", "flair", party="site-1")
    volume = flair.read(TARGET_CASE)[0]
    others = [case for case in flair.case_ids if case != TARGET_CASE]
    rng = np.random.default_rng(7)
    aux = []
    for case in others:
        other = flair.read(case)[0]
        for _ in range(4):
            aux.append(_crop(other, [int(rng.integers(0, s - c + 1)) for s, c in zip(other.shape, CROP)]))
    rng = np.random.default_rng(11)
    site = [_crop(volume, ORIGIN)]
    site += [_crop(volume, [int(rng.integers(0, s - c + 1)) for s, c in zip(volume.shape, CROP)]) for _ in range(7)]
    return {
        "target": site[0],
        "aux": torch.cat(aux),
        "prior": mean_image_prior(torch.cat([_crop(flair.read(case)[0], ORIGIN) for case in others])),
        "site_crops": torch.cat(site),
        "site_encoder": build_encoder(FEATURES, seed=0).eval(),
    }


def _leak(reconstruction: torch.Tensor, setup: dict) -> dict:
    mean = image_leakage(reconstruction, setup["target"], setup["prior"])["mean"]
    return {key: round(mean[key], 4) for key in ("ssim", "ssim_prior", "ssim_brain", "ssim_reported")}


def measure_unsplit(setup: dict, outer: int = 2, short_outer: int = 60) -> list[dict]:
    """Time the authors' schedule for ``outer`` outer iterations (extrapolated to 1000) and score it, next to the
    project's short budget (``short_outer`` outer iterations of 1+1 steps, reference start, ``tv_weight=0.3``)."""
    with torch.no_grad():
        observed = {0: setup["site_encoder"].conv_0(setup["target"])}
    rows = []
    for label, attack in (
        ("short", UnSplit(FEATURES, outer_iterations=short_outer, init="reference", tv_weight=0.3)),
        ("authors_truncated", UnSplit.authors_budget(FEATURES, outer_iterations=outer, init="reference")),
    ):
        reconstruction, stats = attack.reconstruct(observed, reference=setup["prior"])
        per_outer = stats["seconds"] / attack.outer_iterations
        rows.append(
            {
                "budget": label,
                "outer_iterations": attack.outer_iterations,
                "passes": attack.passes,
                "seconds": round(stats["seconds"], 1),
                "seconds_per_pass": round(stats["seconds"] / attack.passes, 4),
                "seconds_at_1000_outer": round(per_outer * 1000, 0) if label != "short" else None,
                "feature_loss_last": round(stats["feature_loss_last"], 4),
                **_leak(reconstruction, setup),
            }
        )
    return rows


def measure_substitute(
    setup: dict, seeds=(1, 2), steps: int = 150, matchings=("none", "mmd", "discriminator")
) -> list[dict]:
    """SSIM of the substitute-encoder attack per matching and seed, and of the white-box learned inverse."""
    with torch.no_grad():
        received = {0: setup["site_encoder"].conv_0(setup["site_crops"])}
    observed = {0: received[0][:1]}
    white = LearnedInverse(setup["site_encoder"], levels=[0], steps=steps, batch_size=4, seed=0)
    white.fit(setup["aux"])
    rows = [{"attack": "learned_inverse_white_box", "steps": steps, **_leak(white.reconstruct(observed)[0], setup)}]
    for seed in seeds:
        wrong = LearnedInverse(build_encoder(FEATURES, seed=20_000 + seed), levels=[0], steps=steps, batch_size=4)
        wrong.fit(setup["aux"])
        rows.append(
            {"attack": "learned_inverse_wrong_seed", "seed": seed, **_leak(wrong.reconstruct(observed)[0], setup)}
        )
        for matching in matchings:
            attack = SubstituteEncoderAttack(FEATURES, matching=matching, steps=steps, seed=seed)
            fit = attack.fit(setup["aux"], received)
            rows.append(
                {
                    "attack": f"substitute_{matching}",
                    "seed": seed,
                    "mmd_before": round(fit["mmd_before"], 4),
                    "mmd_after": round(fit["mmd_after"], 4),
                    "seconds": round(fit["seconds"], 1),
                    **_leak(attack.reconstruct(observed)[0], setup),
                }
            )
    return rows


def threshold_regions(crops: torch.Tensor, quantiles=(0.9, 0.95, 0.98)) -> torch.Tensor:
    """Stand-in TC/WT/ET targets for the simulation: the brightest voxels of each crop at three quantiles
    (FLAIR lesions are hyperintense); the replay does not depend on what the targets mean."""
    levels = torch.quantile(crops.flatten(1), torch.tensor(quantiles), dim=1)  # (3, B)
    return torch.cat([(crops > q.view(-1, 1, 1, 1, 1)).float() for q in levels], dim=1)


def measure_tracking(setup: dict, iterations: int = 40, inversion_iterations: int = 30, lr: float = 2e-3) -> list[dict]:
    """Per-iteration rows of :func:`track_encoder` on a simulated site (batch 1, its case's and the others' crops
    in turn, a fixed random decoder with DiceCE on :func:`threshold_regions` targets)."""
    crops = torch.cat([setup["site_crops"], setup["aux"]])
    sequence = [crops[i % len(crops)][None] for i in range(iterations)]
    targets = [threshold_regions(c) for c in sequence]
    run = simulate_site_training(FEATURES, sequence, decoder_gradient_fn(FEATURES, targets, seed=1), learning_rate=lr)
    return track_encoder(
        FEATURES,
        run.states[0],
        run.observed,
        run.gradients,
        learning_rate=lr,
        inversion={"iterations": inversion_iterations},
        truth_states=run.states,
        truth_crops=run.crops,
        prior=crops.mean(0, keepdim=True),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("unsplit", "substitute", "tracking"))
    parser.add_argument("--outer", type=int, default=2, help="unsplit: outer iterations of the authors' schedule")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="substitute: attacker seeds")
    parser.add_argument("--steps", type=int, default=150, help="substitute: training steps")
    parser.add_argument("--iterations", type=int, default=40, help="tracking: site iterations")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    setup = phantom_setup()
    if args.what == "unsplit":
        rows = measure_unsplit(setup, outer=args.outer)
    elif args.what == "substitute":
        rows = measure_substitute(setup, seeds=args.seeds, steps=args.steps)
    else:
        rows = measure_tracking(setup, iterations=args.iterations)
    for row in rows:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    print(json.dumps({"total_seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
