"""Opacus is the ``dp`` extra: a party finds out when the job is built, or when its trainer first needs it, with a
message that names the extra. Importing this module loads neither torch nor Opacus."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from splitunet.errors import SplitUNetConfigError

__all__ = ["opacus_installed", "dp_module"]


def opacus_installed() -> bool:
    """Whether Opacus can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec("opacus") is not None
    except ImportError:  # a finder that refuses the name
        return False


def dp_module(name: str, party: str) -> ModuleType:
    """``splitunet.dp.<name>``, loaded now.

    Raises:
        SplitUNetConfigError: Opacus (or another import the module needs) is missing at ``party``; the message names
            the extra to install.
    """
    try:
        return importlib.import_module(f"splitunet.dp.{name}")
    except ImportError as error:
        raise SplitUNetConfigError(
            f"{party}: this job trains with DP-SGD, which needs Opacus ({error}): pip install 'splitunet[dp]' here"
        ) from error
