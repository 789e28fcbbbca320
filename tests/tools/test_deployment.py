"""deployment: allow-list, simulator workspace, staged BYOC job, job copies with overrides."""

from __future__ import annotations

import json
import shutil

import pytest
from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

from splitunet.data.party_settings import load_server_settings, load_site_settings
from splitunet.errors import SplitUNetConfigError
from splitunet.tools.deployment import (
    ALLOWED_CLASSES,
    EVALUATION_CLASSES,
    add_wire_audit,
    allow_splitunet_classes,
    configure_kit,
    copy_job_with_overrides,
    default_site_modalities,
    find_job,
    prepare_simulator_workspace,
    stage_byoc_job,
)


def test_allow_list_keeps_flare_defaults_and_existing_entries(tmp_path):
    (tmp_path / "resources.json").write_text(json.dumps({"format_version": 2, "class_allow_list": ["mylab."]}))
    allow_splitunet_classes(tmp_path)
    allow_splitunet_classes(tmp_path)  # idempotent
    resources = json.loads((tmp_path / "resources.json").read_text())
    assert resources["format_version"] == 2
    assert resources["class_allow_list"] == ["mylab.", *ALLOWED_CLASSES]
    allow_splitunet_classes(tmp_path / "fresh")
    fresh = json.loads((tmp_path / "fresh" / "resources.json").read_text())["class_allow_list"]
    assert set(DEFAULT_CLASS_ALLOW_LIST) < set(fresh) and set(ALLOWED_CLASSES) < set(fresh)


def test_allow_list_names_exact_classes_and_capture_only_in_an_evaluation_workspace(tmp_path):
    # A workspace written by an earlier version allowed the whole package by prefix.
    (tmp_path / "resources.json").write_text(json.dumps({"class_allow_list": ["nvflare.", "splitunet."]}))
    allowed = json.loads(allow_splitunet_classes(tmp_path).read_text())["class_allow_list"]
    assert "splitunet." not in allowed and not any(entry.endswith(".") and "splitunet" in entry for entry in allowed)
    assert "splitunet.filters.CaptureFeatures" not in allowed
    evaluation = json.loads(allow_splitunet_classes(tmp_path, evaluation=True).read_text())["class_allow_list"]
    assert set(EVALUATION_CLASSES) < set(evaluation)
    again = json.loads(allow_splitunet_classes(tmp_path).read_text())["class_allow_list"]
    assert not set(EVALUATION_CLASSES) & set(again)  # preparing again without --evaluation takes it back


def test_every_class_the_jobs_and_the_example_policy_name_is_allowed_and_resolves():
    from nvflare.fuel.utils.class_utils import load_class

    from splitunet.tools.deployment import bundle_root

    named = set()
    configs = list((bundle_root() / "jobs").glob("*/app/config/*.json"))
    for config_file in configs + [bundle_root() / "poc/privacy.json"]:
        named |= set(_component_paths(json.loads(config_file.read_text())))
    ours = {path for path in named if path.startswith("splitunet")}
    assert ours <= set(ALLOWED_CLASSES), ours - set(ALLOWED_CLASSES)
    assert named - ours <= set(DEFAULT_CLASS_ALLOW_LIST) | set(ALLOWED_CLASSES), named - ours
    for path in ALLOWED_CLASSES + EVALUATION_CLASSES:
        load_class(path)


def _component_paths(node):
    if isinstance(node, dict):
        if isinstance(node.get("path"), str):
            yield node["path"]
        for value in node.values():
            yield from _component_paths(value)
    elif isinstance(node, list):
        for value in node:
            yield from _component_paths(value)


def test_simulator_workspace_settings_resolve_per_party(tmp_path, monkeypatch):
    monkeypatch.delenv("SPLITUNET_SITE_CONFIG", raising=False)
    workspace = prepare_simulator_workspace(
        tmp_path / "ws", tmp_path / "parties", default_site_modalities(4), "k", layout="msd"
    )
    local = workspace / "local"
    assert load_site_settings("site-3", local).data_dir == (tmp_path / "parties" / "t1gd").resolve()
    assert load_server_settings("simulator_server", local).labels_dir == (tmp_path / "parties" / "labels").resolve()


def test_simulator_workspace_takes_the_layout_the_partition_recorded(tiny_parties, tmp_path, monkeypatch):
    monkeypatch.delenv("SPLITUNET_SITE_CONFIG", raising=False)
    parties = tmp_path / "parties"
    shutil.copytree(tiny_parties, parties)
    party_file = parties / "labels" / "party.json"
    party_file.write_text(json.dumps({**json.loads(party_file.read_text()), "layout": "brats2023"}))
    workspace = prepare_simulator_workspace(tmp_path / "ws", parties, default_site_modalities(4), "k")
    assert load_server_settings("simulator_server", workspace / "local").layout == "brats2023"


def test_job_copy_overrides_workflow_and_executor_args(tmp_path):
    out = copy_job_with_overrides(find_job(), tmp_path / "job", {"num_iterations": 3}, {"num_threads": 1})
    server = json.loads((out / "app/config/config_fed_server.json").read_text())
    client = json.loads((out / "app/config/config_fed_client.json").read_text())
    assert server["workflows"][0]["args"]["num_iterations"] == 3
    assert server["workflows"][0]["args"]["crop_size"]  # the rest is the shipped job's
    assert client["executors"][0]["executor"]["args"] == {"device": "auto", "amp": False, "num_threads": 1}


def test_byoc_job_carries_the_package(tmp_path):
    out = stage_byoc_job(find_job(), tmp_path / "byoc")
    package = out / "app" / "custom" / "splitunet"
    assert (package / "flare" / "executor.py").is_file() and (package / "networks" / "site_encoder.py").is_file()
    assert not list(package.glob("**/__pycache__"))


def test_allow_list_starts_from_a_provisioned_kits_default_resources(tmp_path):
    default = {"format_version": 2, "components": [{"id": "resource_manager", "path": "x.Manager"}]}
    (tmp_path / "resources.json.default").write_text(json.dumps(default))
    resources = json.loads(allow_splitunet_classes(tmp_path).read_text())
    assert resources["components"] == default["components"]
    assert set(ALLOWED_CLASSES) < set(resources["class_allow_list"])


def test_capture_filter_goes_last_in_the_servers_step_chains(tmp_path):
    from splitunet.tools.deployment import add_capture_filter

    job = copy_job_with_overrides(find_job(), tmp_path / "job")
    add_capture_filter(job, [1, 2])
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    for chain_name in ("task_result_filters", "task_data_filters"):
        step_chains = [c for c in server[chain_name] if "split_step" in c["tasks"]]
        assert len(step_chains) == 1  # FLARE refuses two chains for one task and direction
        last = step_chains[0]["filters"][-1]
        assert last == {"path": "splitunet.filters.CaptureFeatures", "args": {"iterations": [1, 2]}}
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    assert "CaptureFeatures" not in json.dumps(client)


def test_configure_kit_writes_only_the_partys_own_entry(tmp_path, monkeypatch):
    monkeypatch.delenv("SPLITUNET_SITE_CONFIG", raising=False)
    site_kit, server_kit = tmp_path / "site-3", tmp_path / "fl-server.example.org"
    for kit in (site_kit, server_kit):
        (kit / "startup").mkdir(parents=True)
    policy = {"format_version": "1.0", "scopes": {"public": {}}, "default_scope": "public"}
    configure_kit(site_kit, {"modality": "t1gd", "data_dir": str(tmp_path / "t1gd")}, "s", policy)
    configure_kit(server_kit, {"labels_dir": str(tmp_path / "labels"), "layout": "brats2021"}, "s")
    site_settings = json.loads((site_kit / "local" / "splitunet_site.json").read_text())
    assert list(site_settings["parties"]) == ["site-3"]  # named after the kit folder, as provisioning names it
    assert load_site_settings("site-3", site_kit / "local").modality == "t1gd"
    assert json.loads((site_kit / "local" / "privacy.json").read_text()) == policy
    assert set(ALLOWED_CLASSES) < set(
        json.loads((site_kit / "local" / "resources.json").read_text())["class_allow_list"]
    )
    server = load_server_settings("fl-server.example.org", server_kit / "local")
    assert server.layout == "brats2021" and server.labels_dir == (tmp_path / "labels").resolve()
    assert not (server_kit / "local" / "privacy.json").exists()


def test_every_site_gets_its_own_private_encoder_seed_and_keeps_it(tmp_path, monkeypatch):
    monkeypatch.delenv("SPLITUNET_SITE_CONFIG", raising=False)
    workspace = prepare_simulator_workspace(tmp_path / "ws", tmp_path / "p", default_site_modalities(4), "k", "msd")
    seeds = {site: load_site_settings(site, workspace / "local").encoder_seed for site in default_site_modalities(4)}
    assert all(isinstance(seed, int) for seed in seeds.values()) and len(set(seeds.values())) == 4
    server_entry = json.loads((workspace / "local" / "splitunet_site.json").read_text())["parties"]["server"]
    assert "encoder_seed" not in server_entry  # the label holder has no encoder
    again = prepare_simulator_workspace(tmp_path / "ws", tmp_path / "p", default_site_modalities(4), "k", "msd")
    assert {site: load_site_settings(site, again / "local").encoder_seed for site in seeds} == seeds

    kit = tmp_path / "site-2"
    (kit / "startup").mkdir(parents=True)
    configure_kit(kit, {"modality": "t1", "data_dir": str(tmp_path / "t1")}, "s")
    first = load_site_settings("site-2", kit / "local").encoder_seed
    configure_kit(kit, {"modality": "t1", "data_dir": str(tmp_path / "t1")}, "s")
    assert first is not None and load_site_settings("site-2", kit / "local").encoder_seed == first
    configure_kit(kit, {"modality": "t1", "data_dir": str(tmp_path / "t1"), "encoder_seed": 7}, "s")
    assert load_site_settings("site-2", kit / "local").encoder_seed == 7  # a seed the site chose itself wins


def test_configure_kit_refuses_a_folder_that_is_not_a_kit(tmp_path):
    with pytest.raises(SplitUNetConfigError, match="not a FLARE startup kit"):
        configure_kit(tmp_path, {"modality": "flair", "data_dir": "x"}, "s")


def test_wire_audit_goes_last_out_and_first_in_for_every_task(tmp_path):
    job = copy_job_with_overrides(find_job("split_unet_noise"), tmp_path / "split_unet_noise")
    add_wire_audit(job)
    audit = "splitunet.filters.WireAudit"
    for config_name, outgoing, incoming in (
        ("config_fed_client.json", "task_result_filters", "task_data_filters"),
        ("config_fed_server.json", "task_data_filters", "task_result_filters"),
    ):
        config = json.loads((job / "app" / "config" / config_name).read_text())
        covered = set()
        for chain in config[outgoing]:
            assert chain["filters"][-1]["path"] == audit
            covered.update(chain["tasks"])
        for chain in config[incoming]:
            assert chain["filters"][0]["path"] == audit
        assert covered == {"split_setup", "split_step", "split_encode", "split_save", "split_average"}
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    noise = [f["path"] for chain in client["task_result_filters"] for f in chain["filters"]]
    assert noise.index("splitunet.filters.ClippedGaussianNoise") < noise.index(audit)  # audited after the defense
