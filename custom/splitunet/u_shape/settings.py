"""The arguments of the U-shaped workflow, checked once, when FLARE builds the workflow from the job config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from splitunet.errors import SplitUNetConfigError
from splitunet.server.run_settings import EXPERIMENT_NAME, TaskSettings
from splitunet.u_shape.averaging import make_correction
from splitunet.u_shape.config import UShapeConfig

__all__ = ["UShapeSettings"]


def _int(name: str, value, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SplitUNetConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


@dataclass
class UShapeSettings(TaskSettings):
    """Every argument of :class:`~splitunet.u_shape.controller.UShapeController`, checked.

    Args:
        num_rounds: federated rounds; each ends with the averaging of heads and tails.
        iterations_per_round: training iterations per round (every hospital, one shared middle step each).
        batch_size, crop_size, features, loss, learning_rate, weight_decay, seed, num_val_cases, sw_batch_size,
            sw_overlap: the model and sampling settings every hospital gets
            (:class:`~splitunet.u_shape.config.UShapeConfig`).
        val_every: validate every this many rounds (and after the last), with the round's average.
        drift_correction: ``None`` for plain FedAvg of heads and tails, or the arguments of
            :class:`~splitunet.federated.drift_correction.DriftCorrection` (``{}``: its defaults) to correct each
            averaged part towards its previous round (DWCS).
        sites: hospital names to use; default every connected client.
        experiment: names the hospitals' checkpoint folders (where their settings give a ``checkpoint_dir``).
        device: ``"auto"`` or a torch device for the middle.
        log_every: iterations between log lines.
        task_timeout, task_check_period, num_threads, task_long_poll_s: as
            :class:`~splitunet.server.run_settings.TaskSettings`; ``task_timeout`` bounds every task, the setup
            task included (``setup_timeout`` is the split job's).
        on_site_failure: always ``"stop"``: every hospital feeds the one middle step of an iteration.

    Attributes:
        model: the :class:`~splitunet.u_shape.config.UShapeConfig` sent to the hospitals.

    Raises:
        SplitUNetConfigError: an argument is malformed (the message names it).
    """

    num_rounds: int = 10
    iterations_per_round: int = 20
    batch_size: int = 2
    crop_size: Sequence[int] = (48, 48, 48)
    features: Sequence[int] = (8, 16, 32, 64, 128, 8)
    loss: str = "dice_ce"
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    seed: int = 0
    num_val_cases: int = 1
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    val_every: int = 5
    drift_correction: Mapping | None = None
    sites: Sequence[str] | None = None
    experiment: str = "u_shape_unet"
    device: str = "auto"
    log_every: int = 10
    model: UShapeConfig = field(init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if self.on_site_failure != "stop":
            raise SplitUNetConfigError("on_site_failure must be 'stop': every hospital feeds each middle step")
        for name in ("num_rounds", "iterations_per_round", "val_every", "log_every"):
            _int(name, getattr(self, name), 1)
        self.model = UShapeConfig(
            features=tuple(self.features),
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            seed=self.seed,
            batch_size=self.batch_size,
            crop_size=tuple(self.crop_size),
            loss=self.loss,
            num_val_cases=self.num_val_cases,
            sw_batch_size=self.sw_batch_size,
            sw_overlap=self.sw_overlap,
        )
        if self.drift_correction is not None:
            if not isinstance(self.drift_correction, Mapping):
                raise SplitUNetConfigError(
                    f"drift_correction must be null or DriftCorrection's arguments, got {self.drift_correction!r}"
                )
            try:
                make_correction(self.drift_correction)  # refuse bad arguments before any hospital is contacted
            except (TypeError, ValueError) as error:
                raise SplitUNetConfigError(f"drift_correction: {error}") from None
            self.drift_correction = dict(self.drift_correction)
        if not isinstance(self.experiment, str) or not EXPERIMENT_NAME.match(self.experiment):
            raise SplitUNetConfigError(f"experiment must be a folder name, got {self.experiment!r}")
        if self.sites is not None and (
            isinstance(self.sites, str) or not all(isinstance(site, str) and site for site in self.sites)
        ):
            raise SplitUNetConfigError(f"sites must be a list of site names, got {self.sites!r}")
        self.sites = list(self.sites) if self.sites else None
