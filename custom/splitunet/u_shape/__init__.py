"""The U-shaped three-part split (Yang et al., RoS-FL): hospitals keep head, tail, labels and loss; the server
runs one shared middle; heads and tails are averaged across hospitals every round.

``networks`` (the three parts), ``hospital_trainer`` and ``server_trainer`` (plain torch) and ``in_process`` (one
process, for tests and attacks) never import FLARE; ``executor`` and ``controller`` adapt them to FLARE tasks.
Job configs name the short paths ``splitunet.u_shape.UShapeController`` and
``splitunet.u_shape.UShapeHospitalExecutor``; each class loads on first use (:mod:`splitunet.lazy_exports`).
"""

from splitunet.lazy_exports import lazy_exports

_EXPORTS = {
    "UShapeController": "controller",
    "UShapeHospitalExecutor": "executor",
    "HospitalTrainer": "hospital_trainer",
    "MiddleTrainer": "server_trainer",
    "UShapeConfig": "config",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
