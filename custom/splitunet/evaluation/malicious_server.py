"""A malicious server against a site-side detector, simulated in one process: FSHA with and without
:class:`~splitunet.filters.GradientDetector`, and the detector's false alarms on honest training.

:func:`run_malicious_server` is what ``splitunet leakage`` reports: the FSHA reconstruction curve (SSIM against
the prior over training iterations) when the site applies every gradient, the same run with the detector on the
site's task data (the site stops at the first refusal, so the curve freezes there), the detection (iterations
flagged, first flag), and the false alarms of the same detector on honest runs (several seeds and crop
sequences, the real decoder and DiceCE loss) over the same number of iterations. Each call goes through the
filter's FLARE path (a gradient DXO and ``process``), as on a site.

Honest runs mirror ``ServerTrainer.train_step`` and ``SiteTrainer.backward``: every site's encoder and the decoder
start from the job's seeds, the received features become leaves, DiceCE on the server's labels, one Adam step per
party with the job's settings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from splitunet.evaluation.attacks.base import check_positive_int
from splitunet.evaluation.attacks.feature_space_hijacking import GradientGate, SimulatedSite, run_fsha
from splitunet.networks.optimizer import make_optimizer
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import MODALITIES, DataKind

__all__ = [
    "detector_bounds",
    "detector_gate",
    "random_crops",
    "run_honest",
    "run_malicious_server",
    "statistics_envelope",
]


def random_crops(
    folders: Sequence, case_ids: Sequence[str], count: int, size: Sequence[int], seed: int, labels=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``count`` crops at seeded random origins, cycling through ``case_ids``, cut alike from every folder.

    Args:
        folders: ``ModalityFolder``s (one channel each, in this order).
        case_ids: cases to cut from.
        count: number of crops.
        size: crop size ``(D, H, W)``.
        seed: origin seed.
        labels: a ``LabelFolder`` to cut the same crops' TC/WT/ET regions from (``None``: no targets).

    Returns:
        ``(images (count, len(folders), D, H, W), regions (count, 3, D, H, W) or None)``, float32.
    """
    from splitunet.data.sampling import extract_crop

    rng = np.random.default_rng(seed)
    images, regions = [], []
    for index in range(check_positive_int("count", count)):
        case = case_ids[index % len(case_ids)]
        volumes = [folder.read(case)[0] for folder in folders]
        origin = [int(rng.integers(0, s - c + 1)) for s, c in zip(volumes[0].shape, size)]
        images.append(np.stack([extract_crop(v, origin, size) for v in volumes]))
        if labels is not None:
            regions.append(extract_crop(labels.read(case)[0], origin, size))
    as_tensor = lambda arrays: torch.from_numpy(np.stack(arrays).astype(np.float32))  # noqa: E731
    return as_tensor(images), (as_tensor(regions) if labels is not None else None)


def detector_gate(detector, record: list | None = None, enforce: bool = True) -> GradientGate:
    """A :data:`GradientGate` that sends each gradient set through ``detector.process`` as a site's task data.

    Args:
        detector: a :class:`~splitunet.filters.GradientDetector` (any ``FeatureFilter`` on gradients works).
        record: if given, one ``{"iteration", "flagged", "reason", "statistics"}`` per call is appended
            (``statistics``: the detector's level ratios and DC shares of that gradient set, whatever the verdict).
        enforce: ``False``: record the detector's verdicts but let every gradient through (to count how many
            iterations of an attack it would flag, not only the first).
    """
    from nvflare.apis.fl_context import FLContext

    from splitunet.filters.base import FilterRejection
    from splitunet.filters.gradient_detector import gradient_statistics
    from splitunet.wire.protocol import SITE_ERROR_HEADER, level_key
    from splitunet.wire.transport import features_to_dxo

    def gate(iteration: int, grads: Mapping[int, torch.Tensor]) -> str | None:
        shareable = features_to_dxo(dict(grads), DataKind.GRADIENTS, {"iteration": iteration}).to_shareable()
        reason = detector.process(shareable, FLContext()).get_header(SITE_ERROR_HEADER)
        if record is not None:
            try:
                statistics = gradient_statistics({level_key(level): grad for level, grad in grads.items()})
                statistics = {name: statistics[name] for name in ("level_ratio", "dc_fraction")}
            except FilterRejection:  # malformed gradients: the verdict says why
                statistics = None
            record.append(
                {"iteration": iteration, "flagged": reason is not None, "reason": reason, "statistics": statistics}
            )
        return reason if enforce else None

    return gate


def run_honest(
    images: torch.Tensor,
    targets: torch.Tensor,
    iterations: int = 20,
    batch_size: int = 1,
    config: SplitModelConfig | None = None,
    seed: int = 0,
    gate: GradientGate | None = None,
    site: int = 0,
    gates: Mapping[int, GradientGate] | None = None,
) -> dict:
    """Honest split training in one process; ``gate`` sees the gradients one site receives at every iteration.

    A refusal is counted (a false alarm) and that site skips the update, as a refusing site would; training goes
    on so that every iteration is tested.

    Args:
        images: crops ``(N, S, D, H, W)``, one channel per site in ``MODALITIES`` order.
        targets: their TC/WT/ET regions ``(N, 3, D, H, W)``.
        iterations: training iterations.
        batch_size: crops per iteration, drawn with replacement.
        config: the job's model settings (default ``SplitModelConfig(seed=seed)``).
        seed: seed of the job (initialisations) and of the batch order.
        gate: check of ``site``'s gradients.
        site: which site's gradients ``gate`` sees.
        gates: site index -> its own check (each site runs its own detector); replaces ``gate`` and ``site``.

    Returns:
        ``{"losses": [...], "refused": [iterations], "seconds"}``.
    """
    from splitunet.server.trainer import initial_decoder, make_loss

    start = time.perf_counter()
    config = config or SplitModelConfig(seed=seed)
    gates = dict(gates) if gates is not None else ({site: gate} if gate is not None else {})
    num_sites = images.shape[1]
    sites = [SimulatedSite(config, MODALITIES[index]) for index in range(num_sites)]
    with torch.random.fork_rng(devices=[]):
        decoder = initial_decoder(config, num_sites)
    optimizer = make_optimizer(decoder.parameters(), config.learning_rate, config.weight_decay)
    loss_fn = make_loss("dice_ce")
    generator = torch.Generator().manual_seed(seed)
    losses, refused = [], []
    for iteration in range(1, check_positive_int("iterations", iterations) + 1):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        leaves = [
            {level: t.requires_grad_(True) for level, t in party.forward(images[index, c : c + 1]).items()}
            for c, party in enumerate(sites)
        ]
        loss = loss_fn(decoder(leaves), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        for c, (party, leaf_map) in enumerate(zip(sites, leaves)):
            grads = {level: leaf.grad.detach() for level, leaf in leaf_map.items()}
            if c in gates and gates[c](iteration, grads) is not None:
                refused.append(iteration)
                party.discard()
                continue
            party.backward(grads)
    return {"losses": losses, "refused": refused, "seconds": time.perf_counter() - start}


def _flag_summary(record: Sequence[Mapping]) -> dict:
    flagged = [entry["iteration"] for entry in record if entry["flagged"]]
    first = next((entry for entry in record if entry["flagged"]), None)
    return {
        "tested": len(record),
        "flagged": len(flagged),
        "rate": len(flagged) / len(record) if record else math.nan,
        "first_flag": None if first is None else first["iteration"],
        "first_reason": None if first is None else first["reason"],
    }


def statistics_envelope(records: Sequence[Mapping]) -> dict:
    """Where the detector's statistics lay over recorded gradient sets (those :func:`detector_gate` recorded).

    Returns:
        ``{"level_ratio": {key: {"min", "p01", "median", "max"}}, "dc_fraction": {key: {"min", "median", "p99", "max"}},
        "sets": n}``; percentiles over the finite values (a ratio is infinite where a level or x4 was all zeros:
        counted under ``"infinite"``).
    """
    values: dict[str, dict[str, list[float]]] = {"level_ratio": {}, "dc_fraction": {}}
    infinite: dict[str, int] = {}
    sets = 0
    for entry in records:
        statistics = entry.get("statistics")
        if not statistics:
            continue
        sets += 1
        for name, by_level in values.items():
            for key, value in statistics[name].items():
                if math.isfinite(value):
                    by_level.setdefault(key, []).append(float(value))
                else:
                    infinite[key] = infinite.get(key, 0) + 1

    def quantile(ordered: list[float], q: float) -> float:
        return float(torch.quantile(torch.tensor(ordered, dtype=torch.float64), q))

    envelope = {"sets": sets, "infinite": infinite, "level_ratio": {}, "dc_fraction": {}}
    for key, ratios in sorted(values["level_ratio"].items()):
        envelope["level_ratio"][key] = {
            "min": min(ratios),
            "p01": quantile(ratios, 0.01),
            "median": quantile(ratios, 0.5),
            "max": max(ratios),
        }
    for key, shares in sorted(values["dc_fraction"].items()):
        envelope["dc_fraction"][key] = {
            "min": min(shares),  # an attack's lowest share: how close it came to honest ones
            "median": quantile(shares, 0.5),
            "p99": quantile(shares, 0.99),
            "max": max(shares),
        }
    return envelope


def detector_bounds(detector) -> dict:
    """The bounds a :class:`~splitunet.filters.GradientDetector` applies, as JSON (open ends as ``None``)."""

    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    return {
        "level_ratio": {key: [finite(low), finite(high)] for key, (low, high) in detector.level_ratio_bounds.items()},
        "max_dc_fraction": dict(detector.max_dc_fraction),
    }


def run_malicious_server(
    private: torch.Tensor,
    auxiliary: torch.Tensor,
    target: torch.Tensor,
    prior: torch.Tensor,
    honest_images: torch.Tensor,
    honest_targets: torch.Tensor,
    iterations: int = 30,
    eval_every: int = 5,
    honest_seeds: Sequence[int] = (0, 1, 2),
    honest_iterations: int | None = None,
    batch_size: int = 1,
    config: SplitModelConfig | None = None,
    levels: Sequence[int] | None = None,
    attack_options: Mapping | None = None,
    detector_options: Mapping | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """FSHA against a site without and with :class:`~splitunet.filters.GradientDetector`, and its false alarms.

    Three measurements, each with a fresh detector built from ``detector_options``:

    1. FSHA, every gradient applied; the detector only records which iterations it would refuse (detection rate,
       first flag). Gives the unprotected SSIM curve.
    2. FSHA with the detector enforcing: the run stops at the first refusal, so the curve freezes there.
    3. Honest training (four sites' encoders, the real decoder, DiceCE) for each seed in ``honest_seeds``: the
       detector on the attacked site's gradients; every flag is a false alarm.

    Args:
        private: the attacked site's crops ``(N, 1, D, H, W)``.
        auxiliary: the attacker's crops of the modality ``(M, 1, D, H, W)``.
        target: the crop(s) whose reconstruction is measured ``(B, 1, D, H, W)``.
        prior: the uninformed prior for ``target``.
        honest_images: crops with one channel per site ``(K, S, D, H, W)`` (channel 0: the attacked site).
        honest_targets: their TC/WT/ET regions ``(K, 3, D, H, W)``.
        iterations: FSHA iterations.
        eval_every: SSIM measured every this many iterations.
        honest_seeds: one honest run per seed (initialisations and crop order).
        honest_iterations: iterations per honest run (default ``iterations``).
        batch_size: crops per iteration.
        config: the job's model settings (default ``SplitModelConfig()``; honest runs reseed it per run).
        levels: levels FSHA hijacks (default every sent level).
        attack_options: further :class:`~splitunet.evaluation.attacks.FeatureSpaceHijacking` arguments.
        detector_options: :class:`~splitunet.filters.GradientDetector` arguments (default: its defaults).
        seed: seed of the attack runs.
        progress: called with a short line after each run.

    Returns:
        ``{"curve": [{"iteration", "ssim_no_detector", "ssim_with_detector", "ssim_prior"}], "fsha": run_fsha's
        result without the detector, "fsha_with_detector": with it, "detection": {"tested", "flagged", "rate",
        "first_flag", "first_reason", "statistics": the hijacker's envelope}, "bounds": the detector's,
        "false_alarms": {"runs": [per seed: the same keys + "seed"], "tested", "flagged", "rate"}, "settings",
        "seconds"}``.
    """
    from dataclasses import replace

    from splitunet.filters.gradient_detector import GradientDetector

    start = time.perf_counter()
    config = config or SplitModelConfig()
    # Each measurement is one simulated site's fresh run: its drift baseline starts empty and is kept in memory.
    options = {"baseline_file": None, **(detector_options or {})}
    say = progress or (lambda line: None)
    common = dict(
        iterations=iterations,
        eval_every=eval_every,
        batch_size=batch_size,
        config=config,
        levels=levels,
        attack_options=attack_options,
        seed=seed,
    )
    watched: list = []
    free = run_fsha(
        private, auxiliary, target, prior, gate=detector_gate(GradientDetector(**options), watched, False), **common
    )
    detection = {**_flag_summary(watched), "statistics": statistics_envelope(watched)}
    say(
        f"FSHA without detector: SSIM {free['curve'][-1]['ssim']:.3f}; detector would flag "
        f"{detection['flagged']}/{detection['tested']} iterations, first at {detection['first_flag']}"
    )
    guarded = run_fsha(private, auxiliary, target, prior, gate=detector_gate(GradientDetector(**options)), **common)
    say(f"FSHA with detector: stopped at iteration {guarded['refused_at']}, SSIM {guarded['curve'][-1]['ssim']:.3f}")
    curve = []
    for row in free["curve"]:
        frozen = [r for r in guarded["curve"] if r["iteration"] <= row["iteration"]]
        curve.append(
            {
                "iteration": row["iteration"],
                "ssim_no_detector": row["ssim"],
                "ssim_with_detector": frozen[-1]["ssim"],
                "ssim_prior": row["ssim_prior"],
            }
        )
    runs = []
    for honest_seed in honest_seeds:
        record: list = []
        honest = run_honest(
            honest_images,
            honest_targets,
            iterations=honest_iterations or iterations,
            batch_size=batch_size,
            config=replace(config, seed=int(honest_seed)),
            seed=int(honest_seed),
            gate=detector_gate(GradientDetector(**options), record),
        )
        runs.append(
            {
                "seed": int(honest_seed),
                **_flag_summary(record),
                "statistics": statistics_envelope(record),
                "final_loss": honest["losses"][-1],
            }
        )
        say(f"honest seed {honest_seed}: {runs[-1]['flagged']}/{runs[-1]['tested']} iterations flagged")
    tested = sum(run["tested"] for run in runs)
    flagged = sum(run["flagged"] for run in runs)
    return {
        "curve": curve,
        "fsha": free,
        "fsha_with_detector": guarded,
        "detection": detection,
        "bounds": detector_bounds(GradientDetector(**options)),
        "false_alarms": {
            "runs": runs,
            "tested": tested,
            "flagged": flagged,
            "rate": flagged / tested if tested else math.nan,
        },
        "settings": {
            **free["settings"],
            "honest_seeds": [int(s) for s in honest_seeds],
            "honest_iterations": honest_iterations or iterations,
            "detector_options": options,
            "levels": free["levels"],
        },
        "seconds": time.perf_counter() - start,
    }
