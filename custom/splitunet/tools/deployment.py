"""How FLARE finds the bundle: job folders, the class allow-list and the party settings of a workspace.

The job folders in ``jobs/`` carry no ``custom/`` code: sites run the installed ``splitunet`` package, and
their ``local/resources.json`` allows its classes (FLARE >= 2.8 builds only allow-listed classes for jobs that
bring no custom code). :func:`stage_byoc_job` makes the other variant, a job that carries the package (BYOC),
copied from the single source in ``custom/``.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

import splitunet
from splitunet.atomic_files import write_json_atomic
from splitunet.data.case_keys import read_or_create_secret
from splitunet.data.party_settings import SERVER_PARTY, SETTINGS_FILE_NAME, write_settings
from splitunet.errors import SplitUNetConfigError
from splitunet.horizontal import HOSPITAL_CLASSES
from splitunet.wire.protocol import LABELS_PARTY, MODALITIES, TaskName

__all__ = [
    "job_filters",
    "add_capture_filter",
    "add_weights_capture_filter",
    "add_wire_audit",
    "ALLOWED_CLASSES",
    "EVALUATION_CLASSES",
    "bundle_root",
    "find_job",
    "allow_splitunet_classes",
    "prepare_simulator_workspace",
    "recorded_layout",
    "default_site_modalities",
    "stage_byoc_job",
    "write_party_local",
    "configure_kit",
    "copy_job_with_overrides",
    "read_or_create_secret",
    "with_private_encoder_seeds",
]

# Exact class paths (FLARE matches an allow-list entry as the whole path or a dotted prefix) of what the
# bundle's training and inference jobs build, by the short paths the jobs and privacy policies use.
ALLOWED_CLASSES = (
    "splitunet.flare.SplitLearningController",
    "splitunet.flare.SplitInferenceController",
    "splitunet.flare.SplitSiteExecutor",
    "splitunet.filters.BlockSkipLevels",
    "splitunet.filters.ChannelDropout",
    "splitunet.filters.ClippedGaussianNoise",
    "splitunet.filters.FeatureGuard",
    "splitunet.filters.GradientDetector",
    "splitunet.filters.QuantizeFeatures",
    "splitunet.filters.TopKSparsify",
    "splitunet.filters.WireAudit",
    # The other topologies: the horizontal FedAvg baseline (its hospitals' executor, the model its server's
    # persistor builds, and FLARE's PyTorch persistor, which FLARE's default allow-list lacks) and the U-shape.
    *HOSPITAL_CLASSES,
    "splitunet.u_shape.UShapeController",
    "splitunet.u_shape.UShapeHospitalExecutor",
)
# Recording what crosses the server is for leakage evaluation only: allowed in an evaluation workspace alone.
EVALUATION_CLASSES = ("splitunet.filters.CaptureFeatures", "splitunet.filters.CaptureWeights")
# What earlier versions allowed (every class of the package); removed wherever the allow-list is written now.
_BROAD_PREFIX = "splitunet."


def bundle_root() -> Path:
    """The checkout this package was installed from (editable install), holding ``jobs/``."""
    return Path(splitunet.__file__).resolve().parents[2]


def find_job(name: str = "split_unet") -> Path:
    """Path of a job folder shipped in the bundle's ``jobs/``."""
    path = bundle_root() / "jobs" / name
    if not (path / "meta.json").is_file():
        raise SplitUNetConfigError(f"job {name!r} not found at {path}; pass the job folder explicitly")
    return path


def allow_splitunet_classes(local_dir: str | Path, evaluation: bool = False) -> Path:
    """Allow the bundle's job classes, by exact path, in ``<local_dir>/resources.json``.

    A configured allow-list replaces FLARE's default one, so FLARE's defaults are written out beside ours. A
    provisioned kit ships only ``resources.json.default``, and FLARE reads ``resources.json`` instead of it (no
    merging), so a missing ``resources.json`` starts as a copy of the default: the site keeps its job launcher
    and resource manager. Entries the site added itself are kept; the broad ``splitunet.`` prefix of earlier
    versions is replaced.

    Args:
        local_dir: the party's ``local/`` folder.
        evaluation: also allow ``CaptureFeatures`` (an evaluation workspace, where recording what the server
            receives is the point). Without it a job that configures the capture filter is refused by FLARE
            (``ComponentNotAuthorized ... is not in allow_list``).
    """
    path = Path(local_dir) / "resources.json"
    default = Path(local_dir) / "resources.json.default"
    source = path if path.is_file() else default
    resources = json.loads(source.read_text()) if source.is_file() else {}
    allow_list = list(resources.get("class_allow_list", DEFAULT_CLASS_ALLOW_LIST))
    allow_list = [entry for entry in allow_list if entry != _BROAD_PREFIX and entry not in EVALUATION_CLASSES]
    wanted = ALLOWED_CLASSES + (EVALUATION_CLASSES if evaluation else ())
    allow_list += [entry for entry in wanted if entry not in allow_list]
    resources["class_allow_list"] = allow_list
    return write_json_atomic(resources, path)


def default_site_modalities(num_sites: int = len(MODALITIES)) -> dict[str, str]:
    """``site-1 -> flair, site-2 -> t1, ...``: the simulator's site names bound to modalities."""
    if not 1 <= num_sites <= len(MODALITIES):
        raise SplitUNetConfigError(f"num_sites must be 1..{len(MODALITIES)}, got {num_sites}")
    return {f"site-{i + 1}": MODALITIES[i] for i in range(num_sites)}


def recorded_layout(partition_dir: str | Path, default: str = "msd") -> str:
    """The label layout ``splitunet partition`` recorded in ``labels/party.json``, or ``default`` for a labels
    folder made some other way (a label holder's own folder): a label value outside it is still refused, by name,
    when the server reads the labels."""
    from splitunet.data.partition import PARTY_FILE, read_partition_layout

    if not (Path(partition_dir) / LABELS_PARTY / PARTY_FILE).is_file():
        return default
    return read_partition_layout(partition_dir)


def with_private_encoder_seeds(parties: Mapping[str, Mapping], keep_from: str | Path | None = None) -> dict:
    """Give every site entry its own random ``encoder_seed``, which stays in that site's ``local/``.

    Without one a site initialises its encoder from the job's seed, which the server knows: it could rebuild the
    encoder and invert the first activations white-box. A seed already in ``entry`` or in the settings file
    ``keep_from`` (when it exists) is kept, so configuring a party again does not change its encoder.
    """
    existing = {}
    if keep_from is not None and Path(keep_from).is_file():
        existing = json.loads(Path(keep_from).read_text()).get("parties", {})
    seeded = {}
    for party, entry in parties.items():
        entry = dict(entry)
        if "modality" in entry and entry.get("encoder_seed") is None:
            kept = existing.get(party, {}).get("encoder_seed")
            entry["encoder_seed"] = kept if kept is not None else secrets.randbits(63)
        seeded[party] = entry
    return seeded


def prepare_simulator_workspace(
    workspace: str | Path,
    partition_dir: str | Path,
    site_modalities: Mapping[str, str],
    case_key_secret: str,
    layout: str | None = None,
    checkpoint_root: str | Path | None = None,
    evaluation: bool = False,
    encoder_seeds: Mapping[str, int] | None = None,
) -> Path:
    """Write ``<workspace>/local`` for ``nvflare simulator -w <workspace>``.

    The simulator copies ``<workspace>/local`` into every party, so one settings file names every party's data
    folder, and one ``resources.json`` allows the installed package's classes. ``layout`` (the labels' numbering)
    defaults to the one ``splitunet partition`` recorded. With ``checkpoint_root`` each party keeps its
    checkpoints in ``<checkpoint_root>/<party>/``, outside the workspace that the simulator wipes at every start,
    so that a later run can resume from them. Every site gets a private ``encoder_seed``
    (:func:`with_private_encoder_seeds`); ``encoder_seeds`` gives sites the seeds they already keep (a consortium
    whose runs must start from the same encoders). ``evaluation`` allows the capture filter (see
    :func:`allow_splitunet_classes`).
    """
    layout = layout or recorded_layout(partition_dir)
    workspace, partition_dir = Path(workspace).resolve(), Path(partition_dir).resolve()
    local_dir = workspace / "local"
    local_dir.mkdir(parents=True, exist_ok=True)
    parties = {site: {"modality": m, "data_dir": str(partition_dir / m)} for site, m in site_modalities.items()}
    for site, seed in (encoder_seeds or {}).items():
        parties[site]["encoder_seed"] = int(seed)
    parties[SERVER_PARTY] = {"labels_dir": str(partition_dir / LABELS_PARTY), "layout": layout}
    if checkpoint_root is not None:
        for party, entry in parties.items():
            entry["checkpoint_dir"] = str(Path(checkpoint_root).resolve() / party)
    settings_file = local_dir / SETTINGS_FILE_NAME
    write_settings(settings_file, with_private_encoder_seeds(parties, keep_from=settings_file), case_key_secret)
    allow_splitunet_classes(local_dir, evaluation)
    return workspace


def _app_config_files(job_dir: Path) -> list[Path]:
    return sorted(job_dir.glob("*/config/config_fed_*.json"))


def job_filters(config: dict):
    """Every filter entry of an app config, whatever chain it is in."""
    for chain_name in ("task_data_filters", "task_result_filters"):
        for chain in config.get(chain_name, []):
            yield from chain.get("filters", [])


def copy_job_with_overrides(
    job_dir: str | Path,
    out_dir: str | Path,
    server_args: Mapping | None = None,
    client_args: Mapping | None = None,
    filter_args: Mapping[str, Mapping] | None = None,
) -> Path:
    """Copy a job folder, overriding arguments of its workflow (server), executor (clients) and filters.

    Used by the demo, sweeps and tests to size a run; the job's structure stays the shipped one.

    Args:
        job_dir: the job folder to copy.
        out_dir: where the copy goes (replaced if present).
        server_args: workflow arguments to set.
        client_args: executor arguments to set.
        filter_args: class name -> arguments to set on every filter of that class, e.g.
            ``{"ClippedGaussianNoise": {"noise_multiplier": 0.01}}``.
    """
    job_dir, out_dir = Path(job_dir), Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(job_dir, out_dir)
    unused = set(filter_args or {})
    for config_path in _app_config_files(out_dir):
        config = json.loads(config_path.read_text())
        for workflow in config.get("workflows", []):
            workflow.setdefault("args", {}).update(server_args or {})
        for executor in config.get("executors", []):
            executor["executor"].setdefault("args", {}).update(client_args or {})
        for entry in job_filters(config):
            class_name = entry.get("path", entry.get("name", "")).rsplit(".", 1)[-1]
            if class_name in (filter_args or {}):
                entry.setdefault("args", {}).update(filter_args[class_name])
                unused.discard(class_name)
        write_json_atomic(config, config_path)
    if unused:
        raise SplitUNetConfigError(f"job {job_dir} has no filter of class {sorted(unused)} to override")
    return out_dir


def add_capture_filter(
    job_dir: str | Path,
    iterations: Sequence[int],
    data_kinds: Sequence[str] | None = None,
    max_captures: int | None = None,
) -> Path:
    """Make the server of a job folder record what it receives and sends at these training iterations.

    Appends ``splitunet.filters.CaptureFeatures`` last to the server's ``split_step`` chains: its result chain
    (activations as received, after every site filter) and its data chain (gradients as sent, after the server's
    defenses). FLARE allows one chain per task and direction, so an existing ``split_step`` chain is extended.
    The gradients of iteration t travel with the task of t + 1: capture ``[1, 2]`` to get both of iteration 1.

    Args:
        job_dir: the job folder (changed in place).
        iterations: training iterations to capture.
        data_kinds: the filter's ``data_kinds`` (default: its own, activations and gradients).
        max_captures: the filter's ``max_captures`` (default: its own).

    Returns:
        the server config file changed.
    """
    args: dict = {"iterations": [int(i) for i in iterations]}
    if data_kinds is not None:
        args["data_kinds"] = list(data_kinds)
    if max_captures is not None:
        args["max_captures"] = int(max_captures)
    return _append_server_filter(job_dir, TaskName.STEP, {"path": "splitunet.filters.CaptureFeatures", "args": args})


def add_weights_capture_filter(job_dir: str | Path, iterations: Sequence[int] | None = None) -> Path:
    """Make the server of a job folder record the encoder weights of its averagings (SplitFed).

    Appends ``splitunet.filters.CaptureWeights`` last to the server's ``split_average`` chains: its result chain
    (each site's encoder copy as received) and its data chain (the average as sent).

    Args:
        job_dir: the job folder (changed in place).
        iterations: averaging iterations to capture (``None``: every averaging).

    Returns:
        the server config file changed.
    """
    args = {} if iterations is None else {"iterations": [int(i) for i in iterations]}
    return _append_server_filter(job_dir, TaskName.AVERAGE, {"path": "splitunet.filters.CaptureWeights", "args": args})


def _append_server_filter(job_dir: str | Path, task: str, entry: Mapping) -> Path:
    """Append ``entry`` last to the server's result and data chains of ``task`` (FLARE allows one chain per task and
    direction, so an existing chain of ``task`` is extended)."""
    paths = [p for p in _app_config_files(Path(job_dir)) if p.name == "config_fed_server.json"]
    if not paths:
        raise SplitUNetConfigError(f"job {job_dir} has no server config to add a capture filter to")
    for path in paths:
        config = json.loads(path.read_text())
        for chain_name in ("task_result_filters", "task_data_filters"):
            chains = config.setdefault(chain_name, [])
            chain = next((c for c in chains if task in c.get("tasks", [])), None)
            if chain is None:
                chains.append({"tasks": [task], "filters": [json.loads(json.dumps(entry))]})
            else:
                chain["filters"].append(json.loads(json.dumps(entry)))
        write_json_atomic(config, path)
    return paths[0]


def stage_byoc_job(job_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy a job and put the ``splitunet`` package into each app's ``custom/`` (bring-your-own-code).

    FLARE then skips the class allow-list for that job, but only users with the BYOC right may submit it.
    """
    out_dir = copy_job_with_overrides(job_dir, out_dir)
    package_dir = Path(splitunet.__file__).resolve().parent
    for app_dir in sorted({path.parents[1] for path in _app_config_files(out_dir)}):
        shutil.copytree(package_dir, app_dir / "custom" / "splitunet", ignore=shutil.ignore_patterns("__pycache__"))
    return out_dir


def write_party_local(
    local_dir: Path,
    party: str,
    entry: Mapping,
    case_key_secret: str,
    privacy: Mapping | None = None,
    evaluation: bool = False,
) -> list[Path]:
    """Write what a party's administrator keeps in its ``local/`` folder: settings, allow-list, privacy policy.

    The settings file holds only this party's entry, as a real institution's would; a site's entry gets a private
    ``encoder_seed`` (:func:`with_private_encoder_seeds`). ``evaluation``: see :func:`allow_splitunet_classes`.

    Returns:
        the files written.
    """
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    settings_file = local_dir / SETTINGS_FILE_NAME
    parties = with_private_encoder_seeds({party: entry}, keep_from=settings_file)
    written = [write_settings(settings_file, parties, case_key_secret)]
    written.append(allow_splitunet_classes(local_dir, evaluation))
    if privacy is not None:
        written.append(write_json_atomic(dict(privacy), local_dir / "privacy.json"))
    return written


def configure_kit(
    kit_dir: str | Path,
    entry: Mapping,
    case_key_secret: str,
    privacy: Mapping | None = None,
    party: str | None = None,
) -> list[Path]:
    """Write a provisioned party's ``local/`` (see :func:`write_party_local`) next to its ``startup/`` folder.

    Args:
        kit_dir: the party's startup kit as ``nvflare provision`` made it (holds ``startup/``).
        entry: a site's ``{"modality", "data_dir"}`` or the server's ``{"labels_dir", "layout"}``.
        case_key_secret: the secret the data holders agreed on.
        privacy: the site's privacy policy (``local/privacy.json``), if any.
        party: the party's name in the project (default: the kit folder's name, as provisioning names it; the
            server's entry is filed under ``server`` whatever its host name).

    Raises:
        SplitUNetConfigError: ``kit_dir`` is not a startup kit.
    """
    kit_dir = Path(kit_dir)
    if not (kit_dir / "startup").is_dir():
        raise SplitUNetConfigError(f"{kit_dir} is not a FLARE startup kit (it has no startup/ folder)")
    is_server = "labels_dir" in entry
    name = SERVER_PARTY if is_server else (party or kit_dir.resolve().name)
    return write_party_local(kit_dir / "local", name, entry, case_key_secret, privacy)


# Where an audit filter goes in each chain: last where data leaves a party (after every defense), first where it
# arrives (before anything alters it).
_AUDIT_PLACES = {
    "config_fed_client.json": {"task_result_filters": "last", "task_data_filters": "first"},
    "config_fed_server.json": {"task_data_filters": "last", "task_result_filters": "first"},
}


def add_wire_audit(job_dir: str | Path, folder: str = "audit") -> list[Path]:
    """Make every party of a job folder record a digest of every task payload it sends and receives.

    Adds ``splitunet.filters.WireAudit`` to all four chains of every task (see :data:`_AUDIT_PLACES`); an
    existing chain is extended, tasks without one get a new chain (FLARE allows one chain per task and direction).

    Returns:
        the config files changed.
    """
    entry = {"path": "splitunet.filters.WireAudit", "args": {"folder": folder}}
    tasks = [TaskName.SETUP, TaskName.STEP, TaskName.ENCODE, TaskName.SAVE]
    changed = []
    for path in _app_config_files(Path(job_dir)):
        places = _AUDIT_PLACES.get(path.name)
        if places is None:
            continue
        config = json.loads(path.read_text())
        for chain_name, place in places.items():
            chains = config.setdefault(chain_name, [])
            covered = set()
            for chain in chains:
                covered.update(chain.get("tasks", []))
                filters = chain.setdefault("filters", [])
                filters.insert(0 if place == "first" else len(filters), dict(entry))
            uncovered = [task for task in tasks if task not in covered]
            if uncovered:
                chains.append({"tasks": uncovered, "filters": [dict(entry)]})
        write_json_atomic(config, path)
        changed.append(path)
    if not changed:
        raise SplitUNetConfigError(f"job {job_dir} has no app config to add a wire audit to")
    return changed
