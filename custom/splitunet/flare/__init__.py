"""The thin FLARE layer: an executor adapting :class:`SiteTrainer` and a controller adapting :class:`ServerTrainer`.

Job configs name these short paths (``splitunet.flare.SplitSiteExecutor``) so that a site's class allow-list
entry ``"splitunet."`` covers them.
"""

from splitunet.flare.controller import SplitLearningController
from splitunet.flare.executor import SplitSiteExecutor

__all__ = ["SplitLearningController", "SplitSiteExecutor"]
