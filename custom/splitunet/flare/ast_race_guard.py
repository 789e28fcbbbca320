"""Serialise ``ast.literal_eval`` in FLARE processes: a workaround for a CPython race that fails jobs.

FLARE decodes every numpy array it receives with ``np.load`` (its numpy decomposer), and numpy parses each array's
header with ``ast.literal_eval``; a server receives from many sites at once, in several download threads. On
CPython 3.11.7 two threads building ASTs at the same time can fail with ``SystemError: AST constructor recursion
depth mismatch``: the ast module's recursion counter is shared by the threads. It happened twice in the SplitFed job
with twelve sites, each time when the sites uploaded their encoders for averaging, and each time FLARE's server
ended the job ("failed to decode streamed submit_update"). A lock around ``literal_eval`` removes the concurrency
that triggers it; array headers are a few dozen characters, so the lock costs nothing measurable.
"""

from __future__ import annotations

import ast
import functools
import threading

__all__ = ["serialise_literal_eval"]

_LOCK = threading.Lock()
_MARK = "_splitunet_serialised"


def serialise_literal_eval() -> None:
    """Replace ``ast.literal_eval`` by a version that holds a process-wide lock (once; later calls do nothing)."""
    if getattr(ast.literal_eval, _MARK, False):
        return
    original = ast.literal_eval

    @functools.wraps(original)
    def literal_eval(node_or_string):
        with _LOCK:
            return original(node_or_string)

    setattr(literal_eval, _MARK, True)
    ast.literal_eval = literal_eval
