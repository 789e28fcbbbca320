"""Which site feeds each decoder input: one input per modality, in the order of ``MODALITIES``, whatever the names.

Several sites may hold one modality, each for other patients (docs/topologies.md, "Several sites per modality"):
they then feed the same input, each for the cases it holds (:func:`modality_groups`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from splitunet.errors import SplitUNetConfigError
from splitunet.wire.protocol import MODALITIES, level_key

__all__ = ["training_order", "modality_groups", "check_sent_levels", "decoder_inputs"]


def training_order(site_modality: Mapping[str, str]) -> list[str]:
    """The sites of a training run in decoder order (the order of ``MODALITIES``).

    Raises:
        SplitUNetConfigError: two sites hold one modality.
    """
    by_modality: dict[str, str] = {}
    for site, modality in site_modality.items():
        if modality in by_modality:
            raise SplitUNetConfigError(f"sites {by_modality[modality]} and {site} both hold modality {modality}")
        by_modality[modality] = site
    return sorted(site_modality, key=lambda site: MODALITIES.index(site_modality[site]))


def modality_groups(site_modality: Mapping[str, str]) -> dict[str, list[str]]:
    """The sites of each modality of a training run: modalities in decoder order, sites by name.

    One site per modality gives the order of :func:`training_order`, one site per group.

    Raises:
        SplitUNetConfigError: a site names a modality outside ``MODALITIES``.
    """
    unknown = sorted({modality for modality in site_modality.values() if modality not in MODALITIES})
    if unknown:
        raise SplitUNetConfigError(f"modalities {unknown} are not among {list(MODALITIES)}")
    return {
        modality: sorted(site for site, held in site_modality.items() if held == modality)
        for modality in MODALITIES
        if modality in site_modality.values()
    }


def check_sent_levels(site: str, modality: str, blocked: Iterable[int], skip_levels: Sequence[int]) -> None:
    """Refuse a site whose privacy policy blocks skip levels the decoder expects.

    Args:
        site: the site's name.
        modality: its modality.
        blocked: the skip levels its filters never send (its setup reply).
        skip_levels: the skip levels of the job's model.

    Raises:
        SplitUNetConfigError: a level of ``skip_levels`` is blocked; the message says which to configure instead.
    """
    clash = set(blocked or ()) & set(skip_levels)
    if clash:
        raise SplitUNetConfigError(
            f"site {site} ({modality}) never sends skip level(s) {[level_key(v) for v in sorted(clash)]} "
            f"(BlockSkipLevels in its privacy policy or the job), but the decoder expects skip_levels "
            f"{list(skip_levels)}; configure the job with skip_levels {sorted(set(skip_levels) - clash)}"
        )


def decoder_inputs(trained: Sequence[str], present: Mapping[str, str], fusion: str) -> list[str | None]:
    """Which site feeds each decoder input at inference: the decoder was trained with one input per modality.

    Args:
        trained: the modality of each decoder input, as trained.
        present: site name -> modality of the sites taking part now.
        fusion: the decoder's fusion; only ``"mean"`` can run with a modality absent.

    Returns:
        per decoder input, the site that feeds it (``None``: absent).

    Raises:
        SplitUNetConfigError: a site holds a modality the model was not trained on, two sites hold one modality,
            or a modality is absent from a concatenating decoder.
    """
    by_modality: dict[str, str] = {}
    for site, modality in sorted(present.items()):
        if modality not in trained:
            raise SplitUNetConfigError(
                f"site {site} holds {modality}, but the model was trained on {list(trained)} only"
            )
        if modality in by_modality:
            raise SplitUNetConfigError(f"sites {by_modality[modality]} and {site} both hold modality {modality}")
        by_modality[modality] = site
    missing = [modality for modality in trained if modality not in by_modality]
    if not by_modality:
        raise SplitUNetConfigError("no site takes part")
    if missing and fusion != "mean":
        raise SplitUNetConfigError(
            f"modalities {missing} are absent, but the model fuses by concatenation and needs every one of "
            f"{list(trained)}; train with fusion 'mean' (and modality_dropout) to predict without a modality"
        )
    return [by_modality.get(modality) for modality in trained]
