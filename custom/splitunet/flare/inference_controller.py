"""FLARE server workflow that segments new cases with a trained Split-U-Net (``jobs/split_unet_infer``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal

from splitunet.compute.devices import select_device
from splitunet.data.labels import get_layout, regions_to_labels
from splitunet.data.nifti_io import header_from_geometry, save_nifti_atomic
from splitunet.data.party_settings import load_server_settings
from splitunet.flare.site_tasks import SiteTaskController, SplitRunError
from splitunet.flare.workspace_paths import checkpoint_folder, site_config_dir
from splitunet.networks import ServerDecoder
from splitunet.resume import decoder_checkpoint, read_checkpoint
from splitunet.server import cases
from splitunet.server.checkpointing import load_decoder
from splitunet.server.decoder_inputs import decoder_inputs
from splitunet.server.run_record import InferenceRecord
from splitunet.server.run_settings import InferenceSettings
from splitunet.server.site_roster import SiteRoster
from splitunet.server.sliding_window import split_sliding_window
from splitunet.server.trainer import to_decoder_inputs
from splitunet.wire.model_config import SplitModelConfig
from splitunet.wire.protocol import REGIONS, MetaKey, TaskName
from splitunet.wire.transport import control_dxo

__all__ = ["SplitInferenceController", "decoder_inputs"]


class SplitInferenceController(SiteTaskController):
    """Segments new cases: sites encode them with their saved encoders, the server decodes and writes NIfTI files.

    The server reads its decoder checkpoint from ``<checkpoint_dir>/<experiment>/decoder_<tag>.pt`` (its
    settings' ``checkpoint_dir``), each site its own encoder the same way, and the sites encode the cases of their
    ``inference_dir`` (default ``data_dir``). The server runs MONAI sliding-window inference over each case, the
    sites encoding each window, and writes ``predictions/<case key>.nii.gz`` in its run folder: label values in
    the convention of its settings' ``layout``, on the case's grid (the sites send each case's NIfTI header
    without voxels or free text; only the first site in decoder order is asked for them). Only the data holders know
    which case ID a key stands for. A modality may be absent when the model was trained with mean fusion.

    Its arguments are the fields of :class:`~splitunet.server.run_settings.InferenceSettings`, which documents and
    checks them.
    """

    record_class = InferenceRecord

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
        # The arguments are the settings' fields, by name; taken before any other local exists.
        self._use_settings(InferenceSettings(**{name: value for name, value in locals().items() if name != "self"}))
        self.decoder: ServerDecoder | None = None
        self.inputs: list[str | None] = []

    def _run(self, abort_signal: Signal, fl_ctx: FLContext, out_dir: Path):
        s, record = self.settings, self.record
        party = fl_ctx.get_identity_name()
        party_settings = load_server_settings(party, site_config_dir(fl_ctx))
        layout = get_layout(party_settings.layout)
        folder = checkpoint_folder(fl_ctx, party_settings.checkpoint_dir, s.experiment)
        path = decoder_checkpoint(folder, s.checkpoint)
        state = read_checkpoint(path, party, "run inference")
        self.model_config = SplitModelConfig.from_dict(state["config"])
        self.decoder = load_decoder(state, select_device(s.device))
        roi = s.roi_size or tuple(state["crop_size"])
        self.sites = self._sites_to_use(fl_ctx)
        record.model = {"checkpoint": str(path), "iteration": int(state["iteration"]), **self.model_config.to_dict()}
        record.layout, record.roi_size = layout.name, list(roi)
        shapes, headers = self._setup(state, abort_signal, fl_ctx)
        trained = [state["site_modality"][site] for site in state["sites"]]
        record.absent_modalities = [m for m, site in zip(trained, self.inputs) if site is None]
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
                self._encode_fn(0, fl_ctx, abort_signal),
                # split_sliding_window runs without autograd.
                lambda features: self.decoder(to_decoder_inputs(features, device)),
                roi,
                s.sw_batch_size,
                s.sw_overlap,
            )
            segmentation = regions_to_labels(probabilities.numpy(), layout).astype(np.uint8)
            header = header_from_geometry(headers[key])
            target = out_dir / "predictions" / f"{key}.nii.gz"
            save_nifti_atomic(segmentation, header.get_best_affine(), target, header=header)
            predictions[key] = {
                "file": str(target),
                "voxels": {region: int(np.count_nonzero(probabilities[i] > 0.5)) for i, region in enumerate(REGIONS)},
            }
            record.predictions = predictions
            self.log_info(
                fl_ctx, f"case {number}/{len(shapes)} (key {key}) segmented in {time.perf_counter() - start:.1f}s"
            )

    def _decoder_order(self) -> Sequence[str | None]:
        return self.inputs

    def _setup(self, state: dict, abort_signal: Signal, fl_ctx: FLContext):
        """Sites load their encoders and report modality and keyed cases; the server matches them, then asks the
        first site in decoder order, and only that one, for the cases' grids (NIfTI headers)."""

        def setup_data(sites: Sequence[str], headers: bool) -> dict:
            inference = {"tag": self.settings.checkpoint, "headers": headers}
            meta = {
                MetaKey.CONFIG: self.model_config.to_dict(),
                MetaKey.EXPERIMENT: self.settings.experiment,
                MetaKey.INFERENCE: inference,
            }
            return {site: control_dxo(dict(meta)).to_shareable() for site in sites}

        replies = self._round_trip(TaskName.SETUP, setup_data(self.sites, False), 0, fl_ctx, abort_signal)
        for site in self.sites:
            self.site_modality[site] = replies[site].get_meta_prop(MetaKey.MODALITY)
        trained = [state["site_modality"][site] for site in state["sites"]]
        self.inputs = decoder_inputs(trained, self.site_modality, self.model_config.fusion)
        # Decoder order from here on: ``self.sites`` holds the sites feeding inputs, in input order.
        self.sites = [site for site in self.inputs if site is not None]
        self.roster = SiteRoster(self.sites, self.site_modality)
        site_cases = {site: replies[site].get_meta_prop(MetaKey.CASES) for site in self.sites}
        matched = cases.match_cases(site_cases)
        for note in cases.inference_notes(matched, self.site_modality):
            self.log_warning(fl_ctx, note)
        self.record.left_out_cases = matched.left_out
        shapes = cases.check_inference_cases(matched, site_cases, self.site_modality)
        # Which site is first in decoder order is known only now, from the modalities the sites reported; the
        # grids are the same at every site (checked above), so one site's headers serve every case.
        first = self.sites[0]
        again = self._round_trip(TaskName.SETUP, setup_data([first], True), 0, fl_ctx, abort_signal)
        headers = again[first].get_meta_prop(MetaKey.HEADERS) or {}
        missing = [key for key in matched.common if key not in headers]
        if missing:
            raise SplitRunError(f"site {first} sent no header for {len(missing)} of its cases (case key {missing[0]})")
        return shapes, {key: headers[key] for key in matched.common}
