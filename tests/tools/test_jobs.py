"""tools.jobs: the shipped job folders are generated from one description; each variant is what it is named for."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from splitunet.errors import SplitUNetConfigError
from splitunet.evaluation.defense_table import DEFENSE_JOBS
from splitunet.filters import FeatureGuard
from splitunet.site.nopeek import NOPEEK_WEIGHT
from splitunet.tools.cli import main
from splitunet.tools.deployment import bundle_root
from splitunet.tools.jobs import (
    JOBS,
    Filter,
    Variant,
    check_jobs,
    defense_jobs,
    generate_jobs,
    resolve_jobs,
    write_jobs,
)

JOBS_DIR = bundle_root() / "jobs"
GENERATED = generate_jobs()
MAIN, FP32, INFER = "split_unet", "split_unet_fp32", "split_unet_infer"

# What each defense job is named for: (side, class name, arguments it must have).
PROMISED = {
    "split_unet_fp32": [],
    "split_unet_fp16": [("client", "QuantizeFeatures", {"precision": "float16"}), ("server", "QuantizeFeatures", {})],
    "split_unet_int4": [("client", "QuantizeFeatures", {"precision": "int4"})],
    "split_unet_topk": [("client", "TopKSparsify", {})],
    "split_unet_dropout": [("client", "ChannelDropout", {})],
    "split_unet_noise": [("client", "ClippedGaussianNoise", {})],
    "split_unet_no_x0": [("client", "BlockSkipLevels", {"levels": [0]})],
    "split_unet_grad_noise": [("server", "ClippedGaussianNoise", {})],
    # A training-time defense of the site trainer: no filter, the executor's nopeek (EXECUTOR_ARGS).
    "split_unet_nopeek": [],
    "split_unet_protected": [
        ("client", "BlockSkipLevels", {"levels": [0]}),
        ("client", "QuantizeFeatures", {"precision": "int8"}),
    ],
}
DEFENSE_VARIANTS = sorted(PROMISED)
# Workflow settings a defense job must change because of its filters.
FORCED_WORKFLOW_ARGS = {
    "split_unet_no_x0": {"skip_levels": [1, 2, 3]},
    "split_unet_protected": {"skip_levels": [1, 2, 3], "train_encoders": False},
}
# Site executor settings a defense job adds to the float32 reference's.
EXECUTOR_ARGS = {"split_unet_nopeek": {"nopeek": {"weight": NOPEEK_WEIGHT, "positions": 256, "levels": None}}}
# Jobs that differ from the main job in workflow settings only, not in filters.
SETTING_VARIANTS = {
    "split_unet_missing_modality": {"fusion": "mean", "modality_dropout": 0.25, "on_site_failure": "continue"},
}
# Two sites per modality (SplitFed): the main job with its cohort and averaging settings, waiting for eight sites.
SPLITFED = "split_unet_splitfed"
SPLITFED_ARGS = {
    "cohort_draw": "proportional",
    "encoder_averaging_every": 10,
    "drift_correction": None,
    "fedprox_mu": 0.0,
}
# Pipelined steps: the main job whose sites encode the next step during the server's step.
PIPELINED = "split_unet_pipelined"
# The other topologies: horizontal FedAvg (FLARE's own workflow, no feature filters) and the three-part U-shape, each
# with and without DP-SGD.
TOPOLOGY_JOBS = ("fedavg_unet", "fedavg_unet_dp", "fedavg_unet_dwcs", "u_shape_unet", "u_shape_unet_dp")
# DP-SGD at the split parties: each is its base with the parties' dp settings and step budget.
SPLIT_DP_JOBS = {"split_unet_dp": MAIN, "u_shape_unet_dp": "u_shape_unet"}
# The split-learning training jobs.
TRAINING_JOBS = sorted(name for name in resolve_jobs() if name not in (INFER, *TOPOLOGY_JOBS))


def _meta(job: str) -> dict:
    return json.loads(json.dumps(GENERATED[f"{job}/meta.json"]))


def _config(job: str, side: str) -> dict:
    # A copy, so that a test may change it.
    return json.loads(json.dumps(GENERATED[f"{job}/app/config/config_fed_{side}.json"]))


def _without_filters(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("task_data_filters", "task_result_filters")}


def _filters(config: dict):
    for chain_name in ("task_data_filters", "task_result_filters"):
        for chain in config.get(chain_name, []):
            for entry in chain["filters"]:
                yield chain_name, chain["tasks"], entry


def _quantizers(job: str, side: str) -> list[dict]:
    return [entry for _, _, entry in _filters(_config(job, side)) if entry["path"].endswith(".QuantizeFeatures")]


def _files(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}


# --- the generator ---


def test_checked_in_jobs_are_exactly_the_generated_ones(tmp_path):
    # The drift test: edit the description in splitunet/tools/jobs.py, then run `splitunet jobs`.
    written = write_jobs(tmp_path)
    assert len(written) == len(GENERATED) == 3 * len(JOBS)
    checked_in = {name: data for name, data in _files(JOBS_DIR).items() if "/" in name}
    assert sorted(checked_in) == sorted(_files(tmp_path))
    for name, data in _files(tmp_path).items():
        assert checked_in[name] == data, f"jobs/{name} differs from the description; run `splitunet jobs`"
    assert check_jobs() == []


def test_every_job_folder_deploys_one_app_to_everyone():
    for name in resolve_jobs():
        assert _meta(name)["name"] == name
        assert _meta(name)["deploy_map"] == {"app": ["@ALL"]}


def test_a_variant_is_one_entry(tmp_path):
    entry = Variant("split_unet_topk20", base=FP32, site_filters=(Filter("TopKSparsify", {"fraction": 0.2}),))
    write_jobs(tmp_path / "before")
    write_jobs(tmp_path / "after", (*JOBS, entry))
    before = {path.name for path in (tmp_path / "before").iterdir()}
    after = {path.name for path in (tmp_path / "after").iterdir()}
    assert after - before == {"split_unet_topk20"} and before <= after
    assert {k: v for k, v in _files(tmp_path / "after").items() if k.split("/")[0] in before} == _files(
        tmp_path / "before"
    )
    assert defense_jobs((*JOBS, entry)) == defense_jobs()  # a defense row only when marked
    assert defense_jobs((*JOBS, Variant("x", base=FP32, defense=True)))[-1] == "x"


def test_the_description_loads_without_nvflare_or_torch():
    code = (
        "import sys, splitunet.tools.jobs as jobs; jobs.generate_jobs(); "
        "print(sorted({'nvflare', 'torch'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "entries, message",
    [
        ((*JOBS, Variant("y", base="nowhere")), "names base 'nowhere'"),
        ((*JOBS, Variant(MAIN, base=FP32)), "described twice"),
        ((Variant("a", base="b"), Variant("b", base="a")), "cycle: a -> b -> a"),
        (
            (*JOBS, Variant("dp_pipelined", base="split_unet_dp", workflow_args={"pipeline_delay": 1})),
            "'dp_pipelined': DP-SGD at the sites trains lock-step only",
        ),
        (
            (*JOBS, Variant("dp_nopeek", base="split_unet_dp", executor_args={"nopeek": {"weight": 0.01}})),
            "'dp_nopeek': NoPeek and DP-SGD cannot be combined",
        ),
    ],
)
def test_a_malformed_description_is_refused(entries, message):
    with pytest.raises(SplitUNetConfigError, match=message):
        resolve_jobs(entries)


def test_cli_check_lists_every_file_that_differs(tmp_path, capsys):
    out = str(tmp_path)
    assert main(["jobs", "--check", "--out", out]) == 1  # nothing written yet
    assert main(["jobs", "--out", out]) == 0
    assert main(["jobs", "--check", "--out", out]) == 0
    server = tmp_path / MAIN / "app/config/config_fed_server.json"
    server.write_text(server.read_text().replace('"num_iterations": 200', '"num_iterations": 201'))
    (tmp_path / FP32 / "meta.json").unlink()
    (tmp_path / INFER / "app/config/stray.json").write_text("{}")
    (tmp_path / "hand_made" / "app").mkdir(parents=True)
    (tmp_path / "hand_made" / "meta.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a job")
    capsys.readouterr()
    assert main(["jobs", "--check", "--out", out]) == 1
    assert sorted(capsys.readouterr().out.splitlines()) == [
        f"differs: {MAIN}/app/config/config_fed_server.json",
        f"missing: {FP32}/meta.json",
        "not generated: hand_made/meta.json",
        f"not generated: {INFER}/app/config/stray.json",
    ]
    # Writing restores what is generated and removes nothing.
    assert main(["jobs", "--out", out]) == 0
    assert check_jobs(tmp_path) == [
        "not generated: hand_made/meta.json",
        f"not generated: {INFER}/app/config/stray.json",
    ]


# --- what each job is ---


def test_every_job_is_a_defense_row_a_setting_variant_or_the_inference_job():
    assert set(resolve_jobs()) == {
        *DEFENSE_JOBS,
        *SETTING_VARIANTS,
        SPLITFED,
        PIPELINED,
        INFER,
        *TOPOLOGY_JOBS,
        *SPLIT_DP_JOBS,
    }
    assert set(DEFENSE_JOBS) == {MAIN, *DEFENSE_VARIANTS}
    assert DEFENSE_JOBS[0] == FP32  # the baseline row


def test_the_main_job_sends_int8_both_ways():
    # Activations leave each site, gradients leave the server, as int8 codes on every level.
    for side, chain_name in (("client", "task_result_filters"), ("server", "task_data_filters")):
        chain = _config(MAIN, side)[chain_name][0]["filters"]
        assert [entry["path"].rsplit(".", 1)[1] for entry in chain] == ["QuantizeFeatures", "FeatureGuard"]
        assert chain[0]["args"] == {"precision": "int8"}


@pytest.mark.parametrize(
    "variant", [v for v in DEFENSE_VARIANTS if v not in ("split_unet_fp16", "split_unet_int4", "split_unet_protected")]
)
def test_a_defense_job_sends_float32(variant):
    # Each row of the defense table measures one defense alone, against the float32 reference (the protected
    # preset is the one combination: int8 on what it sends).
    for side in ("client", "server"):
        assert not _quantizers(variant, side)


@pytest.mark.parametrize("variant", DEFENSE_VARIANTS)
def test_a_defense_job_is_the_float32_reference_plus_its_filters(variant):
    # The float32 reference itself differs from the main job only in its filters.
    reference = MAIN if variant == FP32 else FP32
    assert _meta(variant) == {**_meta(reference), "name": variant}
    reference_client = _without_filters(_config(reference, "client"))
    reference_client["executors"][0]["executor"]["args"].update(EXECUTOR_ARGS.get(variant, {}))
    assert _without_filters(_config(variant, "client")) == reference_client
    server, reference_server = (
        _without_filters(_config(variant, "server")),
        _without_filters(_config(reference, "server")),
    )
    for workflow in reference_server["workflows"]:
        workflow["args"].update(FORCED_WORKFLOW_ARGS.get(variant, {}))
    assert server == reference_server


@pytest.mark.parametrize("variant", DEFENSE_VARIANTS)
def test_a_defense_job_holds_the_filters_it_is_named_for(variant):
    for side, class_name, args in PROMISED[variant]:
        entries = [entry for _, _, entry in _filters(_config(variant, side))]
        matching = [e for e in entries if e["path"].endswith("." + class_name)]
        assert matching, f"{variant} has no {class_name} at the {side}"
        assert all(matching[0]["args"].get(k) == v for k, v in args.items())


@pytest.mark.parametrize("job", TRAINING_JOBS)
def test_every_filter_builds_and_the_guard_checks_last(job):
    for side in ("client", "server"):
        for _, tasks, entry in _filters(_config(job, side)):
            module, class_name = entry["path"].rsplit(".", 1)
            built = getattr(importlib.import_module(module), class_name)(**entry.get("args", {}))
            assert {"split_step", "split_encode"} <= set(tasks)
        for chain_name in ("task_data_filters", "task_result_filters"):
            chain = _config(job, side)[chain_name]
            assert chain and chain[0]["filters"][-1]["path"] == "splitunet.filters.FeatureGuard", (job, side)
    assert isinstance(built, FeatureGuard)


def test_the_u_shape_filters_its_feature_tasks_with_the_main_jobs_wire_and_fedavg_has_no_feature_filters():
    for side in ("client", "server"):
        entries = list(_filters(_config("u_shape_unet", side)))
        assert entries, side
        for _, tasks, entry in entries:
            module, class_name = entry["path"].rsplit(".", 1)
            getattr(importlib.import_module(module), class_name)(**entry.get("args", {}))
            assert {"u_forward", "u_tail"} <= set(tasks)
        assert [e["path"].rsplit(".", 1)[1] for _, _, e in entries][-1] == "FeatureGuard"
        # What crosses carries activations and gradients, never weights: nothing for the feature filters.
        assert not list(_filters(_config("fedavg_unet", side)))


def test_a_level_blocking_job_filters_the_setup_task_and_skips_the_level():
    chain = _config("split_unet_no_x0", "client")["task_result_filters"][0]
    assert "split_setup" in chain["tasks"]
    [blocked] = [entry["args"]["levels"] for entry in chain["filters"] if entry["path"].endswith(".BlockSkipLevels")]
    # The decoder must not expect a level the sites withhold (it would stop at setup).
    skip_levels = _config("split_unet_no_x0", "server")["workflows"][0]["args"]["skip_levels"]
    assert not set(blocked) & set(skip_levels)


def test_every_concat_training_job_waits_for_every_modality_and_mean_fusion_states_its_minimum():
    from splitunet.wire.protocol import MODALITIES

    for job in sorted(path.parent.name for path in JOBS_DIR.glob("*/meta.json")):
        if job == "split_unet_infer" or job in TOPOLOGY_JOBS:
            # Inference checks the modalities present against the trained decoder at setup; in the other
            # topologies every hospital holds every modality.
            continue
        fusion = _config(job, "server")["workflows"][0]["args"]["fusion"]
        expected = len(MODALITIES) if fusion == "concat" else 2
        # SplitFed waits for both sites of every modality.
        assert _meta(job)["min_clients"] == expected * (2 if job == SPLITFED else 1), job


@pytest.mark.parametrize("variant", sorted(SETTING_VARIANTS))
def test_a_setting_variant_differs_from_the_main_job_only_in_its_settings(variant):
    assert _meta(variant) == {**_meta(MAIN), "name": variant, "min_clients": 2}  # mean fusion starts with two
    assert _config(variant, "client") == _config(MAIN, "client")
    server, main_server = _config(variant, "server"), _config(MAIN, "server")
    main_server["workflows"][0]["args"].update(SETTING_VARIANTS[variant])
    assert server == main_server
    workflow = server["workflows"][0]
    module, class_name = workflow["path"].rsplit(".", 1)
    getattr(importlib.import_module(module), class_name)(**workflow["args"])


def test_the_pipelined_job_is_the_main_job_with_a_delay_of_one_step():
    assert _meta(PIPELINED) == {**_meta(MAIN), "name": PIPELINED}
    assert _config(PIPELINED, "client") == _config(MAIN, "client")
    server, main_server = _config(PIPELINED, "server"), _config(MAIN, "server")
    assert main_server["workflows"][0]["args"].get("pipeline_delay", 0) == 0
    main_server["workflows"][0]["args"]["pipeline_delay"] = 1
    assert server == main_server


def test_the_splitfed_job_is_the_main_job_with_its_cohort_and_averaging_settings():
    assert _meta(SPLITFED) == {**_meta(MAIN), "name": SPLITFED, "min_clients": 8}
    assert _config(SPLITFED, "client") == _config(MAIN, "client")
    server, main_server = _config(SPLITFED, "server"), _config(MAIN, "server")
    main_server["workflows"][0]["args"].update(SPLITFED_ARGS)
    assert server == main_server
    # Every training job's sites take the averaging task, and its gradients and weights pass the filter chains.
    client = _config(MAIN, "client")
    assert "split_average" in client["executors"][0]["tasks"]
    for chain_name in ("task_data_filters", "task_result_filters"):
        assert "split_average" in client[chain_name][0]["tasks"]
        assert "split_average" in _config(MAIN, "server")[chain_name][0]["tasks"]


@pytest.mark.parametrize("job, base", sorted(SPLIT_DP_JOBS.items()))
def test_a_split_dp_job_is_its_base_with_the_parties_dp_settings_for_every_step(job, base):
    from splitunet.dp import DPSettings

    assert _meta(job) == {**_meta(base), "name": job}
    server, base_server = _config(job, "server"), _config(base, "server")
    client, base_client = _config(job, "client"), _config(base, "client")
    # Each party's epsilon reaches the server's TensorBoard: a converter at the party, a receiver at the server.
    (converter,) = client.pop("components")
    assert converter["path"].endswith("ConvertToFedEvent") and not base_client.pop("components")
    receivers = [c for c in server["components"] if c["path"].endswith("TBAnalyticsReceiver")]
    assert len(receivers) == 1
    assert [c for c in server["components"] if c not in receivers] == [
        c for c in base_server["components"] if not c["path"].endswith("TBAnalyticsReceiver")
    ]
    assert {**server, "components": None} == {**base_server, "components": None}
    args = client["executors"][0]["executor"].pop("args")
    assert args == {
        **base_client["executors"][0]["executor"].pop("args"),
        "dp": args["dp"],
        "dp_steps": args["dp_steps"],
    }
    assert client == base_client
    # No sampling to amplify by (the server chooses the batches), and a budget for every step the workflow takes.
    assert DPSettings(**args["dp"]).poisson_sampling is False
    workflow = _config(job, "server")["workflows"][0]["args"]
    steps = workflow.get("num_iterations") or workflow["num_rounds"] * workflow["iterations_per_round"]
    assert args["dp_steps"] == steps


def test_the_fedavg_dwcs_job_is_fedavg_with_the_drift_corrected_workflow():
    from splitunet.horizontal import DriftCorrectedFedAvg

    job = "fedavg_unet_dwcs"
    assert _meta(job) == {**_meta("fedavg_unet"), "name": job}
    assert _config(job, "client") == _config("fedavg_unet", "client")
    server, base = _config(job, "server"), _config("fedavg_unet", "server")
    workflow = server["workflows"][0]
    assert workflow["path"] == "splitunet.horizontal.DriftCorrectedFedAvg"
    assert workflow["args"] == {**base["workflows"][0]["args"], "drift_correction": {}}
    base["workflows"][0] = workflow
    assert server == base
    assert DriftCorrectedFedAvg(**workflow["args"]).correction is not None
