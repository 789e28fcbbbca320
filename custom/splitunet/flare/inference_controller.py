"""FLARE server workflow that segments new cases with a trained Split-U-Net (``jobs/split_unet_infer``)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal

from splitunet.compute.devices import select_device
from splitunet.data.case_keys import match_case_keys
from splitunet.data.labels import get_layout, regions_to_labels
from splitunet.data.nifti_io import header_from_geometry, save_nifti_atomic
from splitunet.data.party_settings import load_server_settings
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError
from splitunet.flare.controller import EXPERIMENT_NAME
from splitunet.flare.site_tasks import SiteTaskController, SplitRunError
from splitunet.flare.workspace_paths import checkpoint_folder, site_config_dir
from splitunet.networks import ServerDecoder
from splitunet.resume import CHECKPOINT_TAGS, decoder_checkpoint, read_checkpoint
from splitunet.server.site_roster import SiteRoster
from splitunet.server.sliding_window import split_sliding_window
from splitunet.server.trainer import to_decoder_inputs
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import REGIONS, MetaKey, TaskName
from splitunet.wire.transport import control_dxo

__all__ = ["SplitInferenceController", "decoder_inputs"]


def decoder_inputs(trained: Sequence[str], present: Mapping[str, str], fusion: str) -> list[str | None]:
    """Which site feeds each decoder input: the decoder was trained with one input per modality, in order.

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


class SplitInferenceController(SiteTaskController):
    """Segments new cases: sites encode them with their saved encoders, the server decodes and writes NIfTI files.

    The server reads its decoder checkpoint from ``<checkpoint_dir>/<experiment>/decoder_<tag>.pt`` (its
    settings' ``checkpoint_dir``), each site its own encoder the same way, and the sites encode the cases of their
    ``inference_dir`` (default ``data_dir``). The server runs MONAI sliding-window inference over each case, the
    sites encoding each window, and writes ``predictions/<case key>.nii.gz`` in its run folder: label values in
    the convention of its settings' ``layout``, on the case's grid (the sites send each case's NIfTI header
    without voxels or free text). Only the sites know which case ID a key stands for. A modality may be absent
    when the model was trained with mean fusion.

    Args:
        experiment: the training run's checkpoint folder name.
        checkpoint: ``"best"`` or ``"last"``.
        roi_size: sliding-window size (default: the training crop size).
        sw_batch_size: windows per round trip.
        sw_overlap: window overlap.
        sites: site names to use; default every connected client.
        task_timeout, setup_timeout, task_check_period, num_threads, task_long_poll_s: as
            :class:`~splitunet.flare.site_tasks.SiteTaskController`.
        device: ``"auto"`` or a torch device for the decoder.
    """

    def __init__(
        self,
        experiment: str = "split_unet",
        checkpoint: str = "best",
        roi_size: Sequence[int] | None = None,
        sw_batch_size: int = 4,
        sw_overlap: float = 0.25,
        sites: Sequence[str] | None = None,
        task_timeout: int = 600,
        setup_timeout: int = 600,
        task_check_period: float = 0.005,
        device: str = "auto",
        num_threads: int = 0,
        task_long_poll_s: float = 0.0,
    ):
        super().__init__(task_timeout, setup_timeout, "stop", task_check_period, num_threads, task_long_poll_s)
        if not isinstance(experiment, str) or not EXPERIMENT_NAME.match(experiment):
            raise SplitUNetConfigError(f"experiment must be a folder name, got {experiment!r}")
        if checkpoint not in CHECKPOINT_TAGS:
            raise SplitUNetConfigError(f"checkpoint must be one of {CHECKPOINT_TAGS}, got {checkpoint!r}")
        if roi_size is not None and (len(roi_size) != 3 or min(roi_size) < 32):
            raise SplitUNetConfigError(f"roi_size must be three ints >= 32, got {roi_size}")
        if not isinstance(sw_batch_size, int) or sw_batch_size < 1:
            raise SplitUNetConfigError(f"sw_batch_size must be an int >= 1, got {sw_batch_size!r}")
        if not 0 <= sw_overlap < 1:
            raise SplitUNetConfigError(f"sw_overlap must be in [0, 1), got {sw_overlap}")
        self.experiment = experiment
        self.checkpoint = checkpoint
        self.roi_size = tuple(int(r) for r in roi_size) if roi_size else None
        self.sw_batch_size = sw_batch_size
        self.sw_overlap = float(sw_overlap)
        self.requested_sites = list(sites) if sites else None
        self.device_name = device
        self.decoder: ServerDecoder | None = None
        self.inputs: list[str | None] = []

    def _run(self, abort_signal: Signal, fl_ctx: FLContext, out_dir: Path):
        party = fl_ctx.get_identity_name()
        settings = load_server_settings(party, site_config_dir(fl_ctx))
        layout = get_layout(settings.layout)
        path = decoder_checkpoint(checkpoint_folder(fl_ctx, settings.checkpoint_dir, self.experiment), self.checkpoint)
        state = read_checkpoint(path, party, "run inference")
        self.model_config = SplitModelConfig.from_dict(state["config"])
        self._load_decoder(state)
        roi = self.roi_size or tuple(state["crop_size"])
        self.sites = self.requested_sites or sorted(client.name for client in self._engine.get_clients())
        if not self.sites:
            raise SplitRunError("no sites are connected")
        self.results.update(
            model={"checkpoint": str(path), "iteration": int(state["iteration"]), **self.model_config.to_dict()},
            layout=layout.name,
            roi_size=list(roi),
        )
        shapes, headers = self._setup(state, abort_signal, fl_ctx)
        trained = [state["site_modality"][site] for site in state["sites"]]
        self.results["absent_modalities"] = [m for m, site in zip(trained, self.inputs) if site is None]
        self.log_info(
            fl_ctx,
            f"segmenting {len(shapes)} cases with {path} (iteration {state['iteration']}); decoder inputs "
            f"{list(zip(trained, self.inputs))}",
        )
        device = next(self.decoder.parameters()).device
        predictions = {}
        for number, key in enumerate(sorted(shapes), start=1):
            if abort_signal.triggered:
                return
            start = time.perf_counter()
            probabilities = split_sliding_window(
                key,
                shapes[key],
                self._encode_fn(fl_ctx, abort_signal),
                lambda features: self._decode(features, device),
                roi,
                self.sw_batch_size,
                self.sw_overlap,
            )
            segmentation = regions_to_labels(probabilities.numpy(), layout).astype(np.uint8)
            header = header_from_geometry(headers[key])
            target = out_dir / "predictions" / f"{key}.nii.gz"
            save_nifti_atomic(segmentation, header.get_best_affine(), target, header=header)
            predictions[key] = {
                "file": str(target),
                "voxels": {region: int(np.count_nonzero(probabilities[i] > 0.5)) for i, region in enumerate(REGIONS)},
            }
            self.results["predictions"] = predictions
            self.log_info(
                fl_ctx, f"case {number}/{len(shapes)} (key {key[:8]}) segmented in {time.perf_counter() - start:.1f}s"
            )

    def _decoder_order(self) -> Sequence[str | None]:
        return self.inputs

    def _load_decoder(self, state: dict) -> None:
        config = self.model_config
        decoder = ServerDecoder(
            num_sites=int(state["num_sites"]),
            features=config.features,
            skip_levels=config.skip_levels,
            fusion=config.fusion,
            out_channels=len(REGIONS),
        )
        decoder.load_state_dict(state["decoder"])
        self.decoder = decoder.to(select_device(self.device_name)).eval()

    @torch.no_grad()
    def _decode(self, features, device: torch.device) -> torch.Tensor:
        return self.decoder(to_decoder_inputs(features, device))

    def _setup(self, state: dict, abort_signal: Signal, fl_ctx: FLContext):
        """Sites load their encoders and report modality, keyed cases and grids; the server matches them."""
        meta = {
            MetaKey.CONFIG: self.model_config.to_dict(),
            MetaKey.EXPERIMENT: self.experiment,
            MetaKey.INFERENCE: {"tag": self.checkpoint},
        }
        replies = self._round_trip(
            TaskName.SETUP,
            {site: control_dxo(dict(meta)).to_shareable() for site in self.sites},
            0,
            fl_ctx,
            abort_signal,
        )
        for site in self.sites:
            self.site_modality[site] = replies[site].get_meta_prop(MetaKey.MODALITY)
        trained = [state["site_modality"][site] for site in state["sites"]]
        self.inputs = decoder_inputs(trained, self.site_modality, self.model_config.fusion)
        # Decoder order from here on: ``self.sites`` holds the sites feeding inputs, in input order.
        self.sites = [site for site in self.inputs if site is not None]
        self.roster = SiteRoster(self.sites, self.site_modality)
        cases = {site: replies[site].get_meta_prop(MetaKey.CASES) for site in self.sites}
        match = match_case_keys({site: cases[site].keys() for site in self.sites})
        for site, missing in match.missing.items():
            for key in missing:
                self.log_warning(
                    fl_ctx, f"case key {key[:8]} is missing at {site} ({self.site_modality[site]}); skipped"
                )
        self.results["left_out_cases"] = {site: len(keys) for site, keys in match.missing.items() if keys}
        if not match.common:
            raise SplitUNetDataError("no case is present at every site taking part", party=self.sites[0])
        reference = self.sites[0]
        for key in match.common:
            for site in self.sites[1:]:
                if cases[site][key]["affine_digest"] != cases[reference][key]["affine_digest"]:
                    raise SplitUNetDataError(
                        f"case key {key[:8]}: the {self.site_modality[site]} volume at {site} (shape "
                        f"{cases[site][key]['shape']}) is not voxel-aligned with the {self.site_modality[reference]} "
                        f"volume at {reference} (shape {cases[reference][key]['shape']})",
                        party=site,
                    )
        headers = replies[reference].get_meta_prop(MetaKey.HEADERS)
        shapes = {key: tuple(cases[reference][key]["shape"]) for key in match.common}
        return shapes, {key: headers[key] for key in match.common}

    def _encode_fn(self, fl_ctx: FLContext, abort_signal: Signal):
        def encode(plan: dict):
            sites = self.roster.active
            replies = self._round_trip(
                TaskName.ENCODE, self._control_data({MetaKey.PLAN: plan}), 0, fl_ctx, abort_signal
            )
            return self._features(replies, sites)

        return encode
