"""server.private_details: errors leave the server's run folder by case key; the full text stays in local/."""

from __future__ import annotations

import stat

from splitunet.data.case_keys import case_key
from splitunet.errors import SplitUNetConfigError, SplitUNetDataError
from splitunet.server.private_details import DETAILS_FILE, PrivateDetails

SECRET = "label-holder-secret"


def _details(tmp_path) -> PrivateDetails:
    details = PrivateDetails(tmp_path / "local" / DETAILS_FILE, "job-1")
    details.names.use_secret(SECRET)
    details.names.add_dir("labels_dir", tmp_path / "labels")
    details.names.add_cases(["BRATS_001", "BRATS_002"])
    return details


def test_a_data_error_names_party_and_case_key_and_its_full_text_stays_private(tmp_path):
    details = _details(tmp_path)
    label = tmp_path / "labels" / "BRATS_002.nii.gz"
    error = SplitUNetDataError("label value 7 outside the layout", party="server", case="BRATS_002", file=label)
    public = details.public_error(error)
    key = case_key("BRATS_002", SECRET)
    assert isinstance(public, SplitUNetDataError) and (public.party, public.case, public.file) == ("server", None, None)
    assert str(public) == (
        f"[party=server, case key={key}] label value 7 outside the layout "
        f"(details in the server's local/{DETAILS_FILE})"
    )
    written = details.path.read_text()
    assert "job job-1: SplitUNetDataError: [party=server, case=BRATS_002" in written and str(label) in written
    assert stat.S_IMODE(details.path.stat().st_mode) == 0o600


def test_other_errors_keep_class_and_message_scrubbed_or_pass_unchanged(tmp_path):
    details = _details(tmp_path)
    plain = SplitUNetConfigError("only 1 cases are present at every party; need at least 2")
    assert details.public_error(plain) is plain and not details.path.exists()
    named = KeyError(f"BRATS_001 missing from {tmp_path / 'labels'}")
    public = details.public_error(named)
    assert type(public) is KeyError and "BRATS_001" not in str(public) and str(tmp_path) not in str(public)
    assert f"<case key {case_key('BRATS_001', SECRET)}> missing from <labels_dir>" in str(public)
    assert "BRATS_001" in details.path.read_text()


def test_a_data_error_of_a_case_not_listed_yet_is_keyed_with_the_secret(tmp_path):
    details = _details(tmp_path)
    error = SplitUNetDataError("two files for the same case: BRATS_009.nii.gz and BRATS_009.nii", case="BRATS_009")
    public = details.public_error(error)
    assert "BRATS_009" not in str(public) and case_key("BRATS_009", SECRET) in str(public)
