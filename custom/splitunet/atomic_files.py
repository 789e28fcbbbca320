"""Atomic file writes: a crash or a kill mid-write never replaces a good file with a broken one.

Every file the bundle writes that something else reads later (checkpoints, ``results.json``, partitions, site
settings, NIfTI outputs) goes through here. The data goes to a hidden temporary file in the destination's folder
(same file system, so :func:`os.replace` is an atomic rename on POSIX), is flushed and fsync-ed, and only then takes
the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_path", "atomic_write_bytes", "write_json_atomic", "write_text_atomic"]


def _final_mode(path: Path, mode: int | None) -> int:
    if mode is not None:
        return mode
    if path.exists():
        return path.stat().st_mode & 0o777  # a replaced file keeps its permissions
    umask = os.umask(0)  # read the umask: the only portable way is to set it and put it back
    os.umask(umask)
    return 0o666 & ~umask  # what a plain open() would have given a new file


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp", mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that needs a file name; publish it on success.

    Args:
        path: the final file.
        suffix: the temporary file's suffix; give the real one (e.g. ``".nii.gz"``) to writers that pick the format
            from it, such as nibabel.
        mode: permissions of the published file (e.g. ``0o600`` for a secret); default: those of the file it
            replaces, or what a plain write would give a new file. The temporary file itself is private (0600)
            until it is published.

    Yields:
        the temporary path to write. When the block ends without an error it is renamed over ``path``; on any
        error (or interruption) it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    final_mode = _final_mode(path, mode)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, final_mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, writer: Callable[[IO[bytes]], Any], mode: int | None = None) -> Path:
    """Call ``writer(file_object)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    ``mode``: as for :func:`atomic_path`.
    """
    with atomic_path(path, mode=mode) as tmp:
        with open(tmp, "wb") as handle:
            writer(handle)
            handle.flush()
            # Never publish a name whose data is still in flight.
            os.fsync(handle.fileno())
    return Path(path)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Atomically write ``obj`` as indented JSON with a final newline."""
    data = (json.dumps(obj, indent=2) + "\n").encode("utf-8")
    return atomic_write_bytes(path, lambda handle: handle.write(data))


def write_text_atomic(text: str, path: str | os.PathLike, mode: int | None = None) -> Path:
    """Atomically write ``text`` as UTF-8 (``mode``: as for :func:`atomic_path`)."""
    data = text.encode("utf-8")
    return atomic_write_bytes(path, lambda handle: handle.write(data), mode=mode)
