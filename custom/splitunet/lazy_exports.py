"""Package ``__init__`` files that name their classes without importing them.

FLARE job configs and site privacy policies use short class paths (``splitunet.filters.FeatureGuard``,
``splitunet.flare.SplitSiteExecutor``) and FLARE loads them with ``getattr(importlib.import_module(package), name)``.
An ``__init__`` that imported every child to offer those names would load the server's workflows into a site that
only asked for a filter. :func:`lazy_exports` gives a package a module-level ``__getattr__`` (PEP 562) that imports
the one child a name lives in, on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """Build the ``__getattr__`` and ``__dir__`` of ``package``.

    Args:
        package: the package's ``__name__``.
        exports: public name -> the child module (relative to ``package``) that defines it.

    Returns:
        ``(__getattr__, __dir__)`` to assign at module level of the package's ``__init__``.
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        child = exports.get(name)
        if child is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{child}"), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
