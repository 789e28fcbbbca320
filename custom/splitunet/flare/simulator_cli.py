"""``nvflare simulator`` with its site-naming race closed (:mod:`~splitunet.flare.simulator_launch_guard`).

Takes exactly the arguments of ``nvflare simulator``: ``splitunet simulator jobs/split_unet -w ws -n 4 -t 4`` or
``python -m splitunet.flare.simulator_cli jobs/split_unet -w ws -n 4 -t 4``. The guard patches the simulator's
parent process before FLARE starts it; the simulator forks its run process, which inherits the patch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from splitunet.flare.simulator_launch_guard import guard_simulator_client_launch

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Guard the simulator's launches, then run FLARE's own ``nvflare simulator`` with ``argv``; exits with its code."""
    guard_simulator_client_launch()
    from nvflare.cli import main as nvflare_main

    sys.argv = ["nvflare", "simulator", *(sys.argv[1:] if argv is None else argv)]
    nvflare_main()


if __name__ == "__main__":
    main()
