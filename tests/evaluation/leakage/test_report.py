import json

import pytest

from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.leakage import AttackBudget, best_inversion, run_leakage


@pytest.fixture(scope="module")
def report(workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("leakage_report")
    return run_leakage(workspace, out, budget=AttackBudget.quick()), out


def test_report_files_and_structure(report):
    result, out = report
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(result))
    site = result["sites"]["site-1"]
    assert site["modality"] == "flair"
    assert site["levels_received"] == ["x0", "x1", "x2", "x3", "x4"]
    assert site["defenses_on_the_way"] == []  # FeatureGuard checks, it does not defend
    assert site["best_inversion"] == best_inversion(site["inversion"])
    assert site["label_inference"]["level"] == "x0"
    for attack in ("white_box", "unsplit", "learned_inverse"):
        assert (out / site["figures"][attack]).is_file()
    markdown = (out / "report.md").read_text()
    assert "| white_box | x0 |" in markdown and "Label inference from the gradients of x0" in markdown
    # No defense in the trail: the adaptive white-box still runs (from the prior) and is shown next to the plain one.
    assert {row["attack"] for row in site["inversion"]} >= {"white_box", "white_box_adaptive"}
    assert site["defense_model"] == [] and "(none modelled)" in markdown
    assert "| SSIM plain | SSIM adaptive |" in markdown
    assert "Adaptive label attack" in markdown and "dice_adaptive_oracle" in site["label_inference"]


def test_auxiliary_cases_are_not_the_sites_cases(report, workspace):
    _, out = report
    aux_msd = json.loads((out / "auxiliary" / "msd" / "dataset.json").read_text())
    run_msd = json.loads((workspace / "data" / "phantom_msd" / "dataset.json").read_text())
    assert aux_msd["phantom"]["seed"] != run_msd["phantom"]["seed"]
    assert aux_msd["phantom"]["shape"] == run_msd["phantom"]["shape"]


def test_only_label_inference(workspace, tmp_path):
    result = run_leakage(workspace, tmp_path, attacks=["label_inference"], budget=AttackBudget.quick())
    site = result["sites"]["site-1"]
    assert site["inversion"] == [] and site["best_inversion"] is None
    assert site["label_inference"]["dice"] >= 0
    # Every site with gradient captures is scored against its own image; sites without captures say so.
    by_site = result["label_inference_by_site"]
    assert by_site["site-1"] == site["label_inference"] and set(by_site) == set(result["modalities"])
    labels = site["label_inference"]
    for key in ("dice_smoothed", "auc", "dice_own_image", "dice_own_image_best_threshold", "auc_own_image"):
        assert 0.0 <= labels[key] <= 1.0, key
    text = (tmp_path / "report.md").read_text()
    assert "## Label inference at every site" in text and "| site-1 (flair) |" in text


def test_later_iteration_skips_white_box_and_says_why(workspace, tmp_path):
    with pytest.raises(SplitUNetConfigError, match="no splitunet_activations capture of site-1 at iteration 2"):
        run_leakage(workspace, tmp_path, iteration=2, budget=AttackBudget.quick())


def test_unknown_attack_and_missing_secret(workspace, tmp_path):
    with pytest.raises(SplitUNetConfigError, match="unknown attacks"):
        run_leakage(workspace, tmp_path, attacks=["guess"])
    with pytest.raises(SplitUNetConfigError, match="case_key_secret.txt not found"):
        run_leakage(workspace, tmp_path, data_dir=tmp_path)


def test_the_substitute_tracking_and_malicious_server_sections(report):
    result, out = report
    site = result["sites"]["site-1"]
    assert any(row["attack"] == "substitute_encoder" and row["level"] == "x0" for row in site["inversion"])
    # Only iteration 1 was captured: tracking says what it needs instead of inventing a curve.
    assert "consecutive iterations" in result["encoder_tracking"]["skipped"]
    malicious = result["malicious_server"]
    assert malicious["site"] == "site-1" and malicious["curve"][-1]["iteration"] == 2
    markdown = (out / "report.md").read_text()
    assert "## Malicious server (feature-space hijacking, simulated)" in markdown
    assert "| iteration | SSIM without detector | SSIM with detector | prior |" in markdown
    # The hijacker's statistics beside the honest runs' and the bounds: the room each test had.
    assert malicious["bounds"]["max_dc_fraction"]["x0"] == 0.02
    assert "| level | hijacker ratio min / median / max | honest ratio min | ratio bound |" in markdown
    assert "| x0 | " in markdown and ">= -1.2 |" in markdown


def _without_timing(value):
    if isinstance(value, dict):
        return {key: _without_timing(item) for key, item in value.items() if key != "seconds"}
    if isinstance(value, list):
        return [_without_timing(item) for item in value]
    return value


def test_a_report_stopped_after_a_site_resumes_at_the_next_with_the_same_figures(workspace, tmp_path, monkeypatch):
    import shutil

    import splitunet.evaluation.leakage.report as report_module

    # Two captured sites: site-1's captures filed for site-2 as well (its own crops score them, as for any site).
    original, workspace = workspace, shutil.copytree(workspace, tmp_path / "run", symlinks=True)
    for record in workspace.rglob("results.json"):  # they name their files by absolute path
        record.write_text(record.read_text().replace(str(original), str(workspace)))
    for captures in workspace.glob("simulator/server/*/captures/*/site-1"):
        shutil.copytree(captures, captures.with_name("site-2"))
    aux = report_module.auxiliary_phantom(workspace / "data", tmp_path / "auxiliary")
    kwargs = {"attacks": ["white_box", "label_inference"], "sites": ["site-1", "site-2"], "aux_dir": aux}
    kwargs["budget"] = AttackBudget.quick()
    whole = run_leakage(workspace, tmp_path / "whole", **kwargs)
    assert not (tmp_path / "whole" / "finished_sites").exists()  # the report holds every site once written

    attack_site, attacked = report_module._attack_site, []

    def stopped_at_site_2(run, site, *args, **kwargs):
        if site == "site-2":
            raise KeyboardInterrupt  # the machine went away mid-report
        attacked.append(site)
        return attack_site(run, site, *args, **kwargs)

    monkeypatch.setattr(report_module, "_attack_site", stopped_at_site_2)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_leakage(workspace, out, **kwargs)
    assert not (out / "report.json").exists()
    # What was kept serves only a call with the same run, iteration, attacks and budget.
    identity = json.loads((out / "finished_sites" / "site-1.json").read_text())["identity"]
    assert report_module._finished_site(out, "site-1", identity) is not None
    assert report_module._finished_site(out, "site-1", {**identity, "attacks": ["label_inference"]}) is None
    assert report_module._finished_site(out, "site-1", {**identity, "iteration": 2}) is None

    def counted(run, site, *args, **kwargs):
        attacked.append(site)
        return attack_site(run, site, *args, **kwargs)

    monkeypatch.setattr(report_module, "_attack_site", counted)
    resumed = run_leakage(workspace, out, **kwargs)
    assert attacked == ["site-1", "site-2"]  # site-1 once, before the stop; site-2 only in the fresh call
    # Site-2 attacked in a fresh call, without site-1 before it: the same figures, so no attack draws from the other's.
    assert _without_timing(json.loads(json.dumps(resumed["sites"]))) == _without_timing(
        json.loads(json.dumps(whole["sites"]))
    )
