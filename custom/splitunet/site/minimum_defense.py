"""A site's minimum defense: the filters every job must run on what the site releases, checked before it trains.

FLARE 2.9 lets a job's ``meta.json`` pick any scope that a site's ``local/privacy.json`` defines, so the scope
alone cannot promise a floor. The site states its floor once, in the same file, under
:data:`MINIMUM_DEFENSE_KEY` (FLARE ignores the key)::

    "splitunet_minimum_defense": {
        "ClippedGaussianNoise": {"noise_multiplier": 0.5},
        "BlockSkipLevels": {"levels": [0]}
    }

One more entry, :data:`MODEL_SETTINGS_KEY` (``"SplitModelConfig"``), sets the model settings the job must use, with
the same rules: ``{"SplitModelConfig": {"train_encoders": false}}`` refuses any job that would send the site
gradients (the protected preset's frozen encoders; a server that lies about it is refused again when the first
gradient arrives, by :meth:`~splitunet.site.trainer.SiteTrainer.backward`).

The entry :data:`NOPEEK_KEY` (``"NoPeek"``) binds the site trainer's NoPeek penalty (the executor's ``nopeek``,
:mod:`splitunet.site.nopeek`): ``{"NoPeek": {"weight": 0.01}}`` refuses a job that trains this site's encoder with a
smaller weight or without the penalty. A job that freezes the encoders meets it: the penalty bounds what training
adds to the features, and such a job trains nothing.

Each other entry names a filter class that must be in the chain a released payload goes through (the scope's filters
and then the job's), with the settings it must at least have: a number must be at least as strong as the stated
one (at least it; at most it for the settings in :data:`SMALLER_IS_STRONGER`, such as a clip norm, a top-k fraction
or ``bits`` of a quantizer), a list of levels must be covered (a filter acting on every level covers any list),
anything else must be equal. The site
executor checks this at setup and refuses the job with the shortfall (:func:`shortfalls`), before any data leaves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from numbers import Real

from splitunet.errors import SplitUNetConfigError

__all__ = [
    "MINIMUM_DEFENSE_KEY",
    "MODEL_SETTINGS_KEY",
    "NOPEEK_KEY",
    "SMALLER_IS_STRONGER",
    "parse_minimum_defense",
    "shortfalls",
    "model_shortfalls",
    "nopeek_shortfalls",
    "describe_chain",
]

MINIMUM_DEFENSE_KEY = "splitunet_minimum_defense"
# The entry of the minimum that binds the job's model settings rather than a filter.
MODEL_SETTINGS_KEY = "SplitModelConfig"
# The entry that binds the site trainer's NoPeek penalty rather than a filter.
NOPEEK_KEY = "NoPeek"
# Filter settings whose smaller values protect more: clip norms, the fraction top-k keeps, a quantizer's bits,
# the delta of (epsilon, delta).
SMALLER_IS_STRONGER = frozenset({"clip_norm", "clip_rms", "fraction", "bits", "delta"})


def parse_minimum_defense(content: object, source: str) -> dict[str, dict]:
    """Validate a minimum-defense entry: ``{filter class name: {setting: least value}}``.

    Raises:
        SplitUNetConfigError: not a mapping of class names to mappings of settings.
    """
    if not isinstance(content, Mapping) or not all(
        isinstance(name, str) and isinstance(settings, Mapping) for name, settings in content.items()
    ):
        raise SplitUNetConfigError(
            f"{source}: {MINIMUM_DEFENSE_KEY} must map filter class names to their least settings, e.g. "
            '{"ClippedGaussianNoise": {"noise_multiplier": 0.5}}; got ' + repr(content)
        )
    return {name: dict(settings) for name, settings in content.items()}


def _meets(name: str, actual: object, least: object) -> bool:
    if isinstance(least, bool) or isinstance(actual, bool):
        return actual == least
    if isinstance(least, Real):
        if not isinstance(actual, Real):
            return False
        return actual <= least if name in SMALLER_IS_STRONGER else actual >= least
    if isinstance(least, (list, tuple)):
        # Level lists: None on a filter means every level.
        return actual is None or (isinstance(actual, Iterable) and set(least) <= set(actual))
    return actual == least


def _bound(name: str, least: object = 0) -> str:
    if isinstance(least, (list, tuple)):
        return "covering"
    if isinstance(least, bool) or not isinstance(least, Real):
        return "="
    return "<=" if name in SMALLER_IS_STRONGER else ">="


def _unmet(filter_: object, settings: Mapping[str, object]) -> list[str]:
    return [
        f"{name} {getattr(filter_, name, None)!r} (needs {_bound(name, least)} {least!r})"
        for name, least in settings.items()
        if not _meets(name, getattr(filter_, name, None), least)
    ]


def shortfalls(minimum: Mapping[str, Mapping[str, object]], chain: Iterable[object]) -> list[str]:
    """What ``chain`` (filter objects, in order) lacks against ``minimum``; empty when it meets it.

    A required class is met by any filter of that class name in the chain whose settings all meet the least ones.
    """
    chain = list(chain)
    missing = []
    for class_name, settings in minimum.items():
        if class_name in (MODEL_SETTINGS_KEY, NOPEEK_KEY):
            continue  # not a filter: model_shortfalls and nopeek_shortfalls check them
        candidates = [f for f in chain if type(f).__name__ == class_name]
        if any(not _unmet(f, settings) for f in candidates):
            continue
        wanted = class_name + (
            f"({', '.join(f'{k} {_bound(k, v)} {v!r}' for k, v in settings.items())})" if settings else ""
        )
        if candidates:
            found = "; ".join(", ".join(_unmet(f, settings)) for f in candidates)
            missing.append(f"{wanted}: the chain's {class_name} has {found}")
        else:
            missing.append(f"{wanted}: not in the chain")
    return missing


def model_shortfalls(minimum: Mapping[str, Mapping[str, object]], model_config: object) -> list[str]:
    """What the job's model settings (a :class:`~splitunet.wire.model_config.SplitModelConfig`) lack against the
    minimum's :data:`MODEL_SETTINGS_KEY` entry; empty when it meets it or states none."""
    settings = minimum.get(MODEL_SETTINGS_KEY) or {}
    return [f"{MODEL_SETTINGS_KEY} {unmet}" for unmet in _unmet(model_config, settings)]


def nopeek_shortfalls(
    minimum: Mapping[str, Mapping[str, object]], nopeek: object | None, model_config: object
) -> list[str]:
    """What the job's NoPeek settings (:class:`~splitunet.site.nopeek.NoPeekSettings` or ``None``) lack against the
    minimum's :data:`NOPEEK_KEY` entry; empty when they meet it, the minimum states none, or the job's model settings
    freeze the encoders (``train_encoders`` false: nothing is trained, so there is nothing to penalise)."""
    if NOPEEK_KEY not in minimum or getattr(model_config, "train_encoders", True) is False:
        return []
    settings = minimum[NOPEEK_KEY] or {}
    if nopeek is None:
        wanted = ", ".join(f"{k} {_bound(k, v)} {v!r}" for k, v in settings.items())
        return [f"{NOPEEK_KEY}({wanted}): the job trains the encoder without it"]
    return [f"{NOPEEK_KEY} {unmet}" for unmet in _unmet(nopeek, settings)]


def describe_chain(chain: Iterable[object]) -> str:
    """``"ClippedGaussianNoise, QuantizeFeatures, FeatureGuard"`` (or ``"no filter"``)."""
    names = [type(f).__name__ for f in chain]
    return ", ".join(names) if names else "no filter"
