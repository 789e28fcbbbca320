"""Close a race in the FLARE 2.9 simulator that starts a site's worker under another site's name.

The simulator runs each site in a worker process launched by one thread of the parent
(``SimulatorClientRunner.do_one_task``, nvflare 2.9). Once its worker answers, the thread writes the site's name
into a dictionary that all threads share (``self.build_ctx["client_name"] = ...``) and then sends that dictionary to
the worker, which takes its identity from it. The threads poll their workers on the same one-second tick, so two
workers that finish starting up within the same second are answered together, and one thread can overwrite the name
before the other's send: site-4's worker then runs, with site-4's workspace and settings, as "site-1". The
Split-U-Net server refuses such a run ("sites site-1 and site-4 both hold modality flair"), but the run is lost.

:func:`guard_simulator_client_launch` makes the window from "worker answered" to "identity sent" one thread at a
time: the parent's ``_create_connection`` takes a process-wide lock once its worker has answered, and the first
``send`` on that connection (the identity) gives it back. Polling for the worker stays concurrent. A thread that
never sends (its launch failed in between) cannot block the others for more than :data:`LAUNCH_LOCK_TIMEOUT_S`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading

__all__ = ["guard_simulator_client_launch", "launch_window_matches", "LAUNCH_LOCK_TIMEOUT_S"]

# Longest wait for another thread's launch window; the window itself is a deepcopy and one pickle, milliseconds.
LAUNCH_LOCK_TIMEOUT_S = 60.0
_MARK = "_splitunet_launch_guarded"
# The statements of nvflare 2.9's ``do_one_task`` that the guard relies on, in the order they must appear.
_WINDOW = ("self._create_connection(", 'self.build_ctx["client_name"]', "conn.send(data)")

_LAUNCH_LOCK = threading.Lock()
_log = logging.getLogger(__name__)


class _IdentityConnection:
    """A worker connection that releases the launch lock once its first message (the identity) is sent."""

    def __init__(self, connection, lock: threading.Lock, held: bool):
        self._connection = connection
        self._lock = lock
        self._held = held

    def send(self, message) -> None:
        try:
            self._connection.send(message)
        finally:
            if self._held:
                self._held = False
                self._lock.release()

    def __getattr__(self, name):
        return getattr(self._connection, name)


def launch_window_matches(runner_class) -> bool:
    """Whether ``runner_class.do_one_task`` connects, names the site in ``build_ctx`` and sends, in that order."""
    try:
        source = inspect.getsource(runner_class.do_one_task)
    except (AttributeError, OSError, TypeError):
        return False
    positions = [source.find(statement) for statement in _WINDOW]
    return -1 not in positions and positions == sorted(positions)


def guard_simulator_client_launch(runner_class=None, lock: threading.Lock | None = None) -> bool:
    """Serialise the simulator's "name the site, send the name" window (once; later calls do nothing).

    Args:
        runner_class: the class to patch (default: nvflare 2.9's ``SimulatorClientRunner``).
        lock: the lock to use (default: one for the process); tests pass their own.

    Returns:
        whether the guard is in place; ``False`` (with a warning, nothing patched) where the class does not have
        the launch sequence it was written for.
    """
    if runner_class is None:
        from nvflare.private.fed.app.simulator.simulator_runner import SimulatorClientRunner as runner_class
    if getattr(runner_class._create_connection, _MARK, False):
        return True
    if not launch_window_matches(runner_class):
        _log.warning(
            "%s.do_one_task is not the nvflare 2.9 launch sequence; the simulator's site-naming race is not guarded",
            runner_class.__name__,
        )
        return False
    lock = lock or _LAUNCH_LOCK
    original = runner_class._create_connection

    @functools.wraps(original)
    def create_connection(self, *args, **kwargs):
        connection = original(self, *args, **kwargs)
        held = lock.acquire(timeout=LAUNCH_LOCK_TIMEOUT_S)
        if not held:
            _log.warning("another simulator site's launch held its lock for %.0f s; going on", LAUNCH_LOCK_TIMEOUT_S)
        return _IdentityConnection(connection, lock, held)

    setattr(create_connection, _MARK, True)
    runner_class._create_connection = create_connection
    return True
