"""SplitSiteExecutor: a malformed client configuration fails when FLARE builds the executor, naming the argument;
what a site tells the server about a failure names no case ID and no data path."""

from __future__ import annotations

import pytest

from splitunet.data.case_keys import PrivateNames, case_key
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError
from splitunet.flare.executor import SplitSiteExecutor, site_error_message


def test_defaults_build():
    executor = SplitSiteExecutor()
    assert executor.device_name == "auto" and executor.num_threads == 0 and executor.amp is False


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_threads": -1}, "num_threads must be an int >= 0"),
        ({"num_threads": 1.5}, "num_threads must be an int >= 0"),
        ({"amp": 1}, "amp must be true or false"),
        ({"amp": "false"}, "amp must be true or false"),
    ],
)
def test_malformed_arguments_are_named(kwargs, message):
    with pytest.raises(SplitUNetConfigError, match=message):
        SplitSiteExecutor(**kwargs)


def _private(tmp_path) -> PrivateNames:
    names = PrivateNames()
    names.use_secret("site-secret")
    names.add_dir("data_dir", tmp_path / "flair")
    names.add_cases(["BRATS_001"])
    return names


def test_a_data_error_sends_party_class_and_case_key_only(tmp_path):
    error = SplitUNetDataError(
        "cannot read NIfTI file", party="site-1", case="BRATS_001", file=tmp_path / "flair" / "BRATS_001.nii.gz"
    )
    key = case_key("BRATS_001", "site-secret")
    assert site_error_message(error, "site-1", _private(tmp_path)) == (
        f"site-1: SplitUNetDataError (case key {key}); details in site-1's log"
    )
    folder = SplitUNetDataError("data folder not found (or not a folder)", party="site-1", file=tmp_path / "flair")
    assert site_error_message(folder, "site-1", PrivateNames()) == "site-1: SplitUNetDataError; details in site-1's log"


def test_other_errors_keep_their_message_without_data_paths_or_case_ids(tmp_path):
    refused = SplitUNetConfigError("site site-1 refuses this job: its privacy policy's minimum defense is not met")
    assert site_error_message(refused, "site-1", _private(tmp_path)) == f"site-1: {refused}"
    missing = FileNotFoundError(2, "No such file or directory", str(tmp_path / "flair" / "BRATS_001.nii.gz"))
    message = site_error_message(missing, "site-1", _private(tmp_path))
    assert message.startswith("site-1: FileNotFoundError: [Errno 2] No such file or directory: '<data_dir>'")
    assert message.endswith("(details in site-1's log)")
    named = ValueError("BRATS_001 has no crop")
    assert "BRATS_001" not in site_error_message(named, "site-1", _private(tmp_path))
