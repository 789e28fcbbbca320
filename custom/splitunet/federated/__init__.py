"""Federated averaging of model parts trained at several hospitals (SplitFed), and corrections for client drift.

Plain torch, no FLARE: the controllers and executors call these functions. Each name loads on first use (see
:mod:`splitunet.lazy_exports`), so a site that only needs :func:`proximal_term` loads nothing else.
"""

from splitunet.lazy_exports import lazy_exports

_EXPORTS = {
    "weighted_average": "averaging",
    "DriftCorrection": "drift_correction",
    "proximal_term": "drift_correction",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
