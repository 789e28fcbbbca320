"""Shared inputs of the POC harness tests: four sites with the default modalities and a site privacy policy."""

from __future__ import annotations

import pytest

from splitunet.tools.deployment import default_site_modalities


@pytest.fixture
def sites() -> dict[str, str]:
    """site-1..site-4 -> flair, t1, t1gd, t2."""
    return default_site_modalities(4)


@pytest.fixture
def site_privacy() -> dict:
    """A site's ``privacy.json`` with one scope and no filters."""
    return {"scopes": [{"name": "public", "task_result_filters": []}], "default_scope": "public"}
