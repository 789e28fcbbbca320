"""site.policy_file: one entry of a site's privacy.json; absent file and absent key are alike, null is a value."""

from __future__ import annotations

import json

import pytest

from splitunet.errors import SplitUNetConfigError
from splitunet.site.policy_file import ABSENT, policy_entry


def test_an_entry_is_read_and_what_is_not_there_is_absent(tmp_path):
    path = tmp_path / "privacy.json"
    assert policy_entry(path, "splitunet_x") is ABSENT
    path.write_text(json.dumps({"scopes": [], "splitunet_x": {"a": 1}, "splitunet_null": None}))
    assert policy_entry(path, "splitunet_x") == {"a": 1}
    assert policy_entry(path, "splitunet_null") is None
    assert policy_entry(path, "splitunet_y") is ABSENT
    path.write_text(json.dumps(["not", "a", "mapping"]))
    assert policy_entry(path, "splitunet_x") is ABSENT


def test_a_file_that_is_not_json_is_named_without_its_path(tmp_path):
    path = tmp_path / "privacy.json"
    path.write_text("{not json")
    with pytest.raises(SplitUNetConfigError, match="^local/privacy.json cannot be read") as error:
        policy_entry(path, "splitunet_x")
    assert str(tmp_path) not in str(error.value)
