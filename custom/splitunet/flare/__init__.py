"""The thin FLARE layer: an executor adapting :class:`SiteTrainer`, a training controller adapting
:class:`ServerTrainer`, and an inference controller that segments new cases with the saved models.

Job configs name these short paths (``splitunet.flare.SplitSiteExecutor``). The classes load on first use, so a
site that builds its executor never imports the server's workflows (see :mod:`splitunet.lazy_exports`).
"""

from splitunet.flare.ast_race_guard import serialise_literal_eval
from splitunet.lazy_exports import lazy_exports

# Every FLARE process that loads our components decodes numpy arrays in several threads (see ast_race_guard).
serialise_literal_eval()

_EXPORTS = {
    "SplitLearningController": "controller",
    "SplitInferenceController": "inference_controller",
    "SplitSiteExecutor": "executor",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
