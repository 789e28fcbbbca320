"""What the label holder keeps to itself: case IDs and label paths behind the keys of its run folder.

FLARE archives the server's run folder (its log, ``results.json``, previews, checkpoints) into the job store, which
admins download. So everything the server writes there names a case by its full key (the 32 hex characters of
:func:`~splitunet.data.case_keys.case_key`) and never a label path; what a person at the label holder needs to act
(the case ID, the label file) goes to :data:`DETAILS_FILE` in the server's own ``local/`` folder, which FLARE
neither archives nor sends.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from splitunet.atomic_files import write_text_atomic
from splitunet.data.case_keys import PrivateNames
from splitunet.errors import SplitUNetDataError

__all__ = ["DETAILS_FILE", "PrivateDetails"]

# In the server's local/ folder, beside its settings and the case-key secret.
DETAILS_FILE = "splitunet_private_details.log"


class PrivateDetails:
    """The label holder's names (case IDs, label folder) and the file where it writes them.

    Args:
        path: the details file (appended to; created readable by its owner only).
        job_id: the job whose lines these are.

    Attributes:
        names: what no line of the run folder may carry; fill it in as the run learns it.
    """

    def __init__(self, path: str | os.PathLike, job_id: str):
        self.path = Path(path)
        self.job_id = job_id
        self.names = PrivateNames()

    @property
    def where(self) -> str:
        """How the public messages point to the details."""
        return f"details in the server's local/{self.path.name}"

    def write(self, line: str) -> None:
        """Append one line (time, job, text) to the details file."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        text = "".join(f"{stamp} job {self.job_id}: {part}\n" for part in line.splitlines() or [""])
        if not self.path.is_file():
            write_text_atomic("", self.path, mode=0o600)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(text)

    def public_error(self, error: BaseException) -> BaseException:
        """``error`` as the run folder may show it; writes the full error to the details file when it differs.

        A data error names the party and the case by key, without its file; any other error keeps its class
        when it can and its message, scrubbed. An error without private names is returned unchanged.
        """
        text = str(error)
        scrubbed = self.names.scrub(text)
        if isinstance(error, SplitUNetDataError) and (error.case or error.file or scrubbed != text):
            key = error.case_key or self.names.key(error.case)
            public: BaseException = SplitUNetDataError(
                f"{self.names.scrub(error.message)} ({self.where})", party=error.party, case_key=key
            )
        elif scrubbed == text:
            return error
        else:
            try:
                public = type(error)(f"{scrubbed} ({self.where})")
            except Exception:  # noqa: BLE001 - an exception class with another constructor
                public = RuntimeError(f"{type(error).__name__}: {scrubbed} ({self.where})")
        self.write(f"{type(error).__name__}: {text}")
        return public
