"""The thin FLARE layer: an executor adapting :class:`SiteTrainer`, a training controller adapting
:class:`ServerTrainer`, and an inference controller that segments new cases with the saved models.

Job configs name these short paths (``splitunet.flare.SplitSiteExecutor``) so that a site's class allow-list
entry ``"splitunet."`` covers them.
"""

from splitunet.flare.controller import SplitLearningController
from splitunet.flare.executor import SplitSiteExecutor
from splitunet.flare.inference_controller import SplitInferenceController

__all__ = ["SplitLearningController", "SplitInferenceController", "SplitSiteExecutor"]
