"""The ``splitunet`` command (also ``python -m splitunet``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from splitunet.errors import SplitUNetConfigError, SplitUNetDataError
from splitunet.tools.termination import exit_on_sigterm
from splitunet.wire.protocol import MODALITIES

__all__ = ["main", "build_parser", "ATTACKS"]

# `splitunet leakage --attack` choices, spelled out so that parsing needs no torch import (a test keeps them equal
# to splitunet.evaluation.leakage.ATTACK_CHOICES).
ATTACKS = (
    "white_box",
    "unsplit",
    "learned_inverse",
    "substitute_encoder",
    "label_inference",
    "encoder_tracking",
    "malicious_server",
)


def _phantom(args) -> int:
    from splitunet.data.phantom import generate_phantom

    out = generate_phantom(args.out, args.cases, shape=tuple(args.shape), seed=args.seed, progress=not args.quiet)
    print(f"wrote {args.cases} phantom cases in MSD Task01 layout to {out}")
    return 0


def _partition(args) -> int:
    from splitunet.data.partition import partition

    summary = partition(args.src, args.out, args.layout, progress=not args.quiet)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _prepare(args) -> int:
    from splitunet.tools.deployment import default_site_modalities, prepare_simulator_workspace, read_or_create_secret

    secret = args.case_key_secret or read_or_create_secret(Path(args.workspace) / "case_key_secret.txt")
    workspace = prepare_simulator_workspace(
        args.workspace,
        args.data,
        default_site_modalities(args.num_sites),
        secret,
        layout=args.layout,
        checkpoint_root=args.checkpoint_dir,
        evaluation=args.evaluation,
    )
    print(f"simulator workspace ready: {workspace}/local (site settings and class allow-list)")
    if args.evaluation:
        print("evaluation workspace: jobs may record what the server receives (CaptureFeatures)")
    print(f"run: nvflare simulator jobs/split_unet -w {args.workspace} -n {args.num_sites} -t {args.num_sites}")
    return 0


def _configure_kit(args) -> int:
    from splitunet.tools.deployment import configure_kit

    if bool(args.labels) == bool(args.modality and args.data):
        raise SplitUNetConfigError("give either --modality and --data (a site) or --labels (the server)")
    if args.labels:
        from splitunet.tools.deployment import recorded_layout

        labels = args.labels.resolve()
        entry = {"labels_dir": str(labels), "layout": args.layout or recorded_layout(labels.parent)}
    else:
        entry = {"modality": args.modality, "data_dir": str(args.data.resolve())}
    if args.checkpoint_dir:
        entry["checkpoint_dir"] = str(args.checkpoint_dir.resolve())
    if args.inference_dir:
        if args.labels:
            raise SplitUNetConfigError("--inference-dir is a site's setting (the folder of new cases it encodes)")
        entry["inference_dir"] = str(args.inference_dir.resolve())
    secret = args.case_key_secret_file.read_text().strip()
    privacy = json.loads(args.privacy.read_text()) if args.privacy else None
    for path in configure_kit(args.kit, entry, secret, privacy, party=args.party):
        print(f"wrote {path}")
    return 0


def _stage_byoc(args) -> int:
    from splitunet.tools.deployment import find_job, stage_byoc_job

    out = stage_byoc_job(args.job or find_job("split_unet"), args.out)
    print(f"BYOC job (carries custom/splitunet) written to {out}")
    return 0


def _job_folder(job: str | None) -> Path | None:
    """A job given as a folder, or by name under the bundle's ``jobs/`` (``split_unet_noise``)."""
    if job is None or Path(job).is_dir():
        return Path(job) if job else None
    from splitunet.tools.deployment import find_job

    return find_job(job)


def _jobs(args) -> int:
    from splitunet.tools.jobs import check_jobs, write_jobs

    if args.check:
        problems = check_jobs(args.out)
        for line in problems:
            print(line)
        if problems:
            print(
                f"splitunet jobs: {len(problems)} file(s) differ from the description; "
                "`splitunet jobs` rewrites them (and removes nothing)",
                file=sys.stderr,
            )
            return 1
        print("every job folder is as generated")
        return 0
    written = write_jobs(args.out)
    for path in written:
        print(f"wrote {path}")
    print(f"{len(written)} file(s) written; the others were already as generated")
    return 0


def _defenses(args) -> int:
    from splitunet.evaluation.defense_table import DEFENSE_JOBS, run_defense_table
    from splitunet.tools.demo import DemoSettings

    server_args = {"num_iterations": args.iterations} if args.iterations else {}
    settings = DemoSettings(cases=args.cases, shape=tuple(args.shape), seed=args.seed, server_args=server_args)
    run_defense_table(args.out, args.jobs or DEFENSE_JOBS, settings)
    print((Path(args.out) / "defenses.md").read_text())
    return 0


def _leakage(args) -> int:
    from splitunet.evaluation.leakage import AttackBudget, run_leakage

    budget = AttackBudget.quick() if args.quick else AttackBudget()
    if args.malicious_iterations is not None:
        budget = replace(budget, malicious_iterations=args.malicious_iterations)
    run_leakage(
        args.workspace,
        args.out,
        attacks=args.attack,
        sites=args.sites,
        iteration=args.iteration,
        budget=budget,
        data_dir=args.data,
        aux_dir=args.aux,
        assume_known_init=args.assume_known_init,
    )
    print((Path(args.out) / "report.md").read_text())
    return 0


def _leakage_u_shape(args) -> int:
    from splitunet.evaluation.leakage.u_shape_leakage import UShapeLeakageSettings, run_u_shape_leakage

    run_u_shape_leakage(args.out, UShapeLeakageSettings.quick() if args.quick else UShapeLeakageSettings())
    print((Path(args.out) / "report.md").read_text())
    return 0


def _leakage_splitfed(args) -> int:
    from splitunet.evaluation.leakage.splitfed_leakage import SplitFedLeakageSettings, run_splitfed_leakage

    settings = SplitFedLeakageSettings.quick(args.seed) if args.quick else SplitFedLeakageSettings(seed=args.seed)
    run_splitfed_leakage(args.out, settings)
    print((Path(args.out) / "report.md").read_text())
    return 0


def _utility(args) -> int:
    from splitunet.evaluation.utility import UTILITY_ITERATIONS, UTILITY_SETTINGS, run_utility

    settings = UTILITY_SETTINGS[:2] if args.quick else UTILITY_SETTINGS
    if args.only:
        labels = {setting.label for setting in UTILITY_SETTINGS}
        unknown = sorted(set(args.only) - labels)
        if unknown:
            raise SystemExit(f"--only: no setting labelled {unknown}; the settings are {sorted(labels)}")
        # The reference first, always: the differences are to it.
        settings = (settings[0],) + tuple(s for s in settings[1:] if s.label in args.only)
    iterations = args.iterations or (4 if args.quick else UTILITY_ITERATIONS)
    seeds = tuple(range(args.seeds))
    capture = tuple(args.capture or ())
    run_utility(args.out, settings, seeds, iterations, quick=args.quick, capture_iterations=capture, reuse=args.reuse)
    print((Path(args.out) / "utility.md").read_text())
    return 0


def _sweep(args) -> int:
    from splitunet.evaluation.sweep import run_sweep

    run_sweep(args.out, "quick" if args.quick else args.preset, utility=args.utility, reuse=args.reuse)
    print((Path(args.out) / "sweep.md").read_text())
    if (Path(args.out) / "tradeoff.png").is_file():
        print(f"plot: {Path(args.out).resolve() / 'tradeoff.png'}")
    return 0


def _compare(args) -> int:
    from splitunet.evaluation.compare import CompareSettings, run_compare

    chosen = {"seeds": tuple(args.only_seeds) if args.only_seeds else tuple(range(args.seeds))}
    if args.topologies:
        chosen["topologies"] = tuple(args.topologies)
    if args.steps:
        chosen["steps"] = args.steps
    if args.rounds:
        chosen["rounds"] = args.rounds
    if args.curve_every:
        chosen["curve_every"] = args.curve_every
    if args.timeout_min:
        chosen["timeout_s"] = 60.0 * args.timeout_min
    settings = CompareSettings.quick(**chosen) if args.quick else CompareSettings(**chosen)
    run_compare(args.out, settings, reuse=args.reuse)
    print((Path(args.out) / "compare.md").read_text())
    return 0


def _compare_budgets(args) -> int:
    import json

    from splitunet.evaluation.budget_change import budget_at, budget_changes, budget_markdown

    reports = []
    for path in (args.shorter, args.longer):
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as error:
            raise SplitUNetConfigError(f"cannot read the comparison report {path}: {error}") from error
    if args.shorter_at is not None:
        reports[0] = budget_at(reports[0], args.shorter_at)
    changes = budget_changes(*reports, tolerance=args.tolerance / 100)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "budget_change.json").write_text(json.dumps(changes, indent=2) + "\n")
    text = budget_markdown(changes)
    (args.out / "budget_change.md").write_text(text)
    print(text)
    return 0


def _detector(args) -> int:
    from splitunet.evaluation.detector_false_alarms import measure_false_alarms
    from splitunet.tools.demo import ensure_partitioned_phantom

    out = Path(args.out)
    if args.replay:
        from splitunet.evaluation.detector_false_alarms import replay_false_alarms

        replay_false_alarms(args.replay, out, seeds=args.replay_seeds)
    elif args.quick:
        parties = ensure_partitioned_phantom(out / "data", 4, (40, 40, 40), seed=0)
        measure_false_alarms(parties, out, seeds=(0,), iterations=3, crop_size=(32, 32, 32), crops=4)
    else:
        # The demo's phantom cases (24 of 64^3, seed 0), the data the main job trains on.
        parties = ensure_partitioned_phantom(out / "data", 24, (64, 64, 64), seed=0)
        measure_false_alarms(parties, out, seeds=tuple(range(args.seeds)), iterations=args.iterations)
    print((out / "detector.md").read_text())
    return 0


def _poc(args) -> int:
    from splitunet.tools.demo import ensure_partitioned_phantom
    from splitunet.tools.deployment import (
        copy_job_with_overrides,
        default_site_modalities,
        find_job,
        read_or_create_secret,
    )
    from splitunet.tools.poc.run_job import run_job_in_poc

    workspace = args.workspace.resolve()
    if args.data:
        parties, secret_file = args.data, args.data / "case_key_secret.txt"
    else:
        parties = ensure_partitioned_phantom(workspace / "data", args.cases, tuple(args.shape), args.seed)
        secret_file = workspace / "data" / "case_key_secret.txt"
    secret = args.case_key_secret or read_or_create_secret(secret_file)
    sites = default_site_modalities(args.num_sites)
    policies = {}
    for item in args.privacy or []:
        site, _, path = item.partition("=")
        if site not in sites or not path:
            raise SplitUNetConfigError(f"--privacy takes SITE=FILE with SITE among {list(sites)}, got {item!r}")
        policies[site] = json.loads(Path(path).read_text())
    source = _job_folder(args.job) or find_job("split_unet")
    server_args = {"num_iterations": args.iterations} if args.iterations else {}
    job = copy_job_with_overrides(source, workspace / "job" / source.name, server_args)
    summary = run_job_in_poc(workspace, job, sites, parties, secret, policies, job_timeout_s=args.timeout)
    print(json.dumps({k: summary[k] for k in ("flare_status", "status", "error", "dice", "iterations")}, indent=2))
    print(f"results: {workspace / 'results.json'}; every POC process stopped: {summary['all_processes_stopped']}")
    return 0 if summary["status"] == "completed" else 1


def _demo(args) -> int:
    from splitunet.tools.demo import DemoSettings, run_demo

    server_args = {}
    if args.iterations:
        server_args["num_iterations"] = args.iterations
    settings = DemoSettings(
        cases=args.cases,
        shape=tuple(args.shape),
        seed=args.seed,
        server_args=server_args,
        capture_iterations=args.capture or (),
        timeout_s=args.timeout,
    )
    summary = run_demo(args.workspace, settings, job_dir=_job_folder(args.job))
    dice = summary["dice"]
    print(
        f"\nDice on held-out phantom cases after {summary['iterations']} iterations: "
        f"TC {dice['TC']:.3f}  WT {dice['WT']:.3f}  ET {dice['ET']:.3f}"
    )
    print(f"results: {Path(args.workspace).resolve() / 'results.json'}")
    if summary.get("preview_png"):
        print(f"figure:  {summary['preview_png']}")
    if summary.get("tensorboard"):
        print(f"tensorboard --logdir {summary['tensorboard']}")
    print(f"elapsed: {summary['elapsed_s']:.0f}s")
    return 0


def _predict(args) -> int:
    from splitunet.tools.predict import run_predict

    summary = run_predict(
        args.data,
        args.checkpoints,
        args.out,
        experiment=args.experiment,
        tag=args.checkpoint,
        without=args.without or (),
        layout=args.layout,
        timeout_s=args.timeout,
    )
    absent = summary["absent_modalities"]
    print(
        f"\n{len(summary['predictions'])} segmentations ({summary['layout']} labels"
        f"{', without ' + ', '.join(absent) if absent else ''}) in {Path(args.out).resolve()}"
    )
    print(f"elapsed: {summary['elapsed_s']:.0f}s")
    return 0


def _bench_command(args) -> list[str]:
    """The command line that reproduces a bench run, from its parsed arguments (for the report)."""
    command = ["splitunet", "bench", "--out", str(args.out), "--device", args.device]
    flags = {
        "--quick": args.quick,
        "--amp": args.amp,
        "--no-flare": args.no_flare,
        "--no-poc": args.no_poc,
        "--pipelined": args.pipelined,
        "--transport": args.transport,
    }
    command += [flag for flag, given in flags.items() if given]
    options = (
        ("--preset", args.preset),
        ("--link-rate", args.link_rate),
        ("--link-crop", args.link_crop),
        ("--iterations", args.iterations),
        ("--seeds", args.seeds),
        ("--cases", args.cases),
        ("--seed", args.seed),
    )
    for option, value in options:
        if value:
            command += [option, str(value)]
    return command


def _bench_transport(args) -> int:
    """``bench --transport``: FLARE's transport alone at the (preset's) reference step payload, per setting."""
    from splitunet.evaluation.bench import BenchSettings
    from splitunet.evaluation.bench.transport import run_transport

    settings = BenchSettings.create(args.out, quick=args.quick, preset=args.preset, device="cpu", progress=False)
    rounds = args.iterations or (1 if args.quick else 3)
    repeats = args.seeds or (1 if args.quick else 2)
    command = " ".join(_bench_command(args))
    report = run_transport(
        args.out, settings.reference, rounds=rounds, repeats=repeats, timeout_s=args.timeout, command=command
    )
    print((Path(args.out) / "transport.md").read_text())
    failed = [variant["name"] for variant in report["variants"] if variant.get("error")]
    if failed:
        print(f"splitunet bench --transport: {failed} failed; see transport.json", file=sys.stderr)
        return 1
    return 0


def _bench(args) -> int:
    from splitunet.evaluation.bench import BenchSettings, failed_paths, run_bench

    if args.transport:
        return _bench_transport(args)
    settings = BenchSettings.create(
        args.out,
        quick=args.quick,
        preset=args.preset,
        link_rates=[rate for rate in (args.link_rate or "").split(",") if rate],
        link_crop=args.link_crop or None,
        device=args.device,
        amp=args.amp,
        flare=not args.no_flare,
        poc=not args.no_poc,
        pipelined=args.pipelined,
        iterations=args.iterations or None,
        seeds=args.seeds or None,
        cases=args.cases or None,
        seed=args.seed,
        flare_timeout_s=args.timeout,
        progress=not args.quiet,
        command=_bench_command(args),
    )
    report = run_bench(settings)
    for target in report["targets"]:
        measured = "not measured" if target["measured"] is None else f"{target['measured']:.3f}"
        met = {True: "met", False: "MISSED", None: "-"}[target["met"]]
        print(f"{target['name']}: {measured} (goal {target['goal']}) {met}")
    print(f"report: {settings.out_dir.resolve() / 'bench.md'} and bench.json ({report['elapsed_s']:.0f}s)")
    failed = failed_paths(report)
    if failed:
        print(f"splitunet bench: FLARE path(s) {failed} failed; see bench.json", file=sys.stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitunet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    phantom = commands.add_parser("phantom", help="write a brain-tumour MRI phantom in MSD Task01 layout")
    phantom.add_argument("--out", required=True, type=Path)
    phantom.add_argument("--cases", required=True, type=int)
    phantom.add_argument("--shape", nargs=3, type=int, default=[64, 64, 64], metavar=("D", "H", "W"))
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--quiet", action="store_true", help="no progress bar")
    phantom.set_defaults(run=_phantom)

    from splitunet.data.layouts import SOURCE_LAYOUTS

    partition = commands.add_parser(
        "partition", help="split an MSD or BraTS dataset into one folder per modality and one for the labels"
    )
    partition.add_argument("--src", required=True, type=Path, help="centralized dataset copy")
    partition.add_argument(
        "--layout",
        choices=SOURCE_LAYOUTS,
        default="msd",
        help="msd: Task01_BrainTumour; brats2021: <id>/<id>_{flair,t1,t1ce,t2,seg}; "
        "brats2023: GLI <id>/<id>-{t2f,t1n,t1c,t2w,seg} (default: msd). Labels keep this layout's numbering.",
    )
    partition.add_argument("--out", required=True, type=Path)
    partition.add_argument("--quiet", action="store_true")
    partition.set_defaults(run=_partition)

    prepare = commands.add_parser("prepare", help="write a simulator workspace's local/ (site settings, allow-list)")
    prepare.add_argument("--data", required=True, type=Path, help="output of `splitunet partition`")
    prepare.add_argument("--workspace", required=True, type=Path)
    prepare.add_argument("--num-sites", type=int, default=4)
    prepare.add_argument("--layout", default=None, help="label layout (default: the one `partition` recorded)")
    prepare.add_argument("--case-key-secret", default=None, help="default: random, kept in WORKSPACE")
    prepare.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="keep each party's checkpoints in DIR/<party>/ (outside the workspace the simulator wipes) to resume",
    )
    prepare.add_argument(
        "--evaluation",
        action="store_true",
        help="an evaluation workspace: allow the CaptureFeatures filter (records what the server receives)",
    )
    prepare.set_defaults(run=_prepare)

    stage = commands.add_parser("stage-byoc", help="copy a job with the splitunet package in its custom/ folder")
    stage.add_argument("--out", required=True, type=Path)
    stage.add_argument("--job", type=Path, default=None, help="default: jobs/split_unet")
    stage.set_defaults(run=_stage_byoc)

    configure = commands.add_parser(
        "configure-kit",
        help="write a provisioned party's local/: its data setting, the splitunet class allow-list, its privacy policy",
    )
    configure.add_argument("--kit", required=True, type=Path, help="the party's startup kit (holds startup/)")
    configure.add_argument("--modality", choices=MODALITIES, help="a site: the modality it holds")
    configure.add_argument("--data", type=Path, help="a site: its folder of <case>.nii.gz volumes")
    configure.add_argument("--labels", type=Path, help="the server: its folder of label volumes")
    configure.add_argument("--layout", default=None, help="the server: label layout (default: as partitioned)")
    configure.add_argument("--case-key-secret-file", required=True, type=Path, help="the data holders' secret")
    configure.add_argument("--privacy", type=Path, default=None, help="a site: privacy policy to install")
    configure.add_argument("--party", default=None, help="the party's name (default: the kit folder's name)")
    configure.add_argument(
        "--checkpoint-dir", type=Path, default=None, help="where the party keeps checkpoints across jobs (to resume)"
    )
    configure.add_argument(
        "--inference-dir", type=Path, default=None, help="a site: folder of new cases the inference job encodes"
    )
    configure.set_defaults(run=_configure_kit)

    predict = commands.add_parser(
        "predict", help="segment new cases with a trained model (jobs/split_unet_infer in the FLARE simulator)"
    )
    predict.add_argument("--data", required=True, type=Path, help="new cases, partitioned (flair/, t1/, t1gd/, t2/)")
    predict.add_argument(
        "--checkpoints",
        required=True,
        type=Path,
        help="the training run's checkpoint root (<party>/<experiment>/ per party), e.g. splitunet_demo/checkpoints",
    )
    predict.add_argument("--out", required=True, type=Path)
    predict.add_argument("--experiment", default="split_unet")
    predict.add_argument("--checkpoint", choices=("best", "last"), default="best")
    predict.add_argument(
        "--without", nargs="+", choices=MODALITIES, help="modalities absent (needs a model trained with mean fusion)"
    )
    predict.add_argument("--layout", default=None, help="label convention of the output (default: as partitioned)")
    predict.add_argument("--timeout", type=float, default=3600.0, help="seconds before the simulator is stopped")
    predict.set_defaults(run=_predict)

    commands.add_parser(
        "simulator",
        help="nvflare simulator with the same arguments, its site-naming race closed (splitunet.flare.simulator_cli)",
        add_help=False,
    )
    demo = commands.add_parser("demo", help="train the main job on phantom data in the FLARE simulator")
    demo.add_argument("--workspace", type=Path, default=Path("splitunet_demo"))
    demo.add_argument("--cases", type=int, default=24)
    demo.add_argument("--shape", nargs=3, type=int, default=[64, 64, 64], metavar=("D", "H", "W"))
    demo.add_argument("--iterations", type=int, default=0, help="default: the job's num_iterations")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--timeout", type=float, default=1800.0, help="seconds before the simulator is stopped")
    demo.add_argument("--job", default=None, help="job folder or name under jobs/ (default: split_unet)")
    demo.add_argument(
        "--capture",
        nargs="*",
        type=int,
        metavar="ITERATION",
        help="record what the server receives and sends at these iterations (for leakage evaluation; sensitive)",
    )
    demo.set_defaults(run=_demo)

    poc = commands.add_parser(
        "poc", help="run a job in FLARE POC mode: a real server and site processes on 127.0.0.1, then stop them"
    )
    poc.add_argument("--workspace", type=Path, default=Path("splitunet_poc"))
    poc.add_argument("--data", type=Path, default=None, help="output of `splitunet partition` (default: a phantom)")
    poc.add_argument("--job", default=None, help="job folder or name under jobs/ (default: split_unet)")
    poc.add_argument("--num-sites", type=int, default=4)
    poc.add_argument("--iterations", type=int, default=0, help="default: the job's num_iterations")
    poc.add_argument("--privacy", nargs="*", metavar="SITE=FILE", help="install FILE as SITE's local/privacy.json")
    poc.add_argument("--case-key-secret", default=None, help="default: random, kept beside the data")
    poc.add_argument("--cases", type=int, default=24, help="phantom cases when --data is not given")
    poc.add_argument("--shape", nargs=3, type=int, default=[64, 64, 64], metavar=("D", "H", "W"))
    poc.add_argument("--seed", type=int, default=0)
    poc.add_argument("--timeout", type=float, default=3600.0, help="seconds the job may run")
    poc.set_defaults(run=_poc)

    jobs = commands.add_parser(
        "jobs", help="write the shipped job folders from their one description (splitunet.tools.jobs), or check them"
    )
    jobs.add_argument("--out", type=Path, default=None, help="folder of job folders (default: the bundle's jobs/)")
    jobs.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 listing every file that differs from the description",
    )
    jobs.set_defaults(run=_jobs)

    defenses = commands.add_parser(
        "defenses", help="run the demo once per defense job on the same phantom cases; tabulate Dice and bytes"
    )
    defenses.add_argument("--out", required=True, type=Path)
    defenses.add_argument("--jobs", nargs="+", default=None, help="job names or folders (default: every shipped one)")
    defenses.add_argument("--cases", type=int, default=24)
    defenses.add_argument("--shape", nargs=3, type=int, default=[64, 64, 64], metavar=("D", "H", "W"))
    defenses.add_argument("--iterations", type=int, default=0, help="default: each job's num_iterations")
    defenses.add_argument("--seed", type=int, default=0)
    defenses.set_defaults(run=_defenses)

    leakage = commands.add_parser(
        "leakage", help="attack what a `demo --capture` run recorded; write report.json, report.md and figures"
    )
    leakage.add_argument("--workspace", required=True, type=Path, help="a `splitunet demo --capture 1 2` workspace")
    leakage.add_argument("--out", required=True, type=Path)
    leakage.add_argument("--attack", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    leakage.add_argument("--sites", nargs="+", default=None, help="sites to attack (default: the first)")
    leakage.add_argument("--iteration", type=int, default=1, help="captured training iteration to attack")
    leakage.add_argument("--data", type=Path, default=None, help="the run's data folder (default: WORKSPACE/data)")
    leakage.add_argument(
        "--aux", type=Path, default=None, help="attacker's auxiliary parties folder (default: phantom)"
    )
    leakage.add_argument("--quick", action="store_true", help="a few attack steps only (checks the pipeline)")
    leakage.add_argument(
        "--malicious-iterations",
        type=int,
        default=None,
        help="iterations of the simulated malicious server and of each honest run (default 40; 0: none)",
    )
    leakage.add_argument(
        "--assume-known-init",
        action="store_true",
        help="worst case for the white-box attack: the attacker knows each site's private initial encoder seed",
    )
    leakage.set_defaults(run=_leakage)
    leakage_u_shape = commands.add_parser(
        "leakage-u-shape",
        help="train the U-shape in process, invert its x0 and infer labels from its dL/du2 at the server; write "
        "report.json and report.md",
    )
    leakage_u_shape.add_argument("--out", required=True, type=Path, help="folder for the data and the report")
    leakage_u_shape.add_argument("--quick", action="store_true", help="tiny sizes and budgets (checks the pipeline)")
    leakage_u_shape.set_defaults(run=_leakage_u_shape)
    leakage_splitfed = commands.add_parser(
        "leakage-splitfed",
        help="run the SplitFed job in the simulator with capture on, invert its activations through the encoder "
        "averages its server computed; write report.json and report.md",
    )
    leakage_splitfed.add_argument("--out", required=True, type=Path, help="folder for the run and the report")
    leakage_splitfed.add_argument("--quick", action="store_true", help="tiny sizes and budgets (checks the pipeline)")
    leakage_splitfed.add_argument("--seed", type=int, default=0, help="the job's seed and the phantom's (default 0)")
    leakage_splitfed.set_defaults(run=_leakage_splitfed)

    utility = commands.add_parser(
        "utility",
        help="Dice cost of the float32, main and protected jobs: paired seeds, 300 iterations, 95 %% intervals",
    )
    utility.add_argument("--out", required=True, type=Path, help="study folder (finished runs in it are reused)")
    utility.add_argument("--iterations", type=int, default=0, help="training iterations per run (default: 300)")
    utility.add_argument("--seeds", type=int, default=3, help="paired seeds 0..N-1 (default: 3)")
    utility.add_argument("--capture", type=int, nargs="*", help="iterations whose features each run captures")
    utility.add_argument("--quick", action="store_true", help="2 tiny settings, 4 iterations (checks the pipeline)")
    utility.add_argument(
        "--reuse", type=Path, help="an earlier utility.json whose runs (same budget and optimiser) are taken over"
    )
    utility.add_argument("--only", nargs="+", metavar="LABEL", help="these settings only, with the reference")
    utility.set_defaults(run=_utility)

    sweep = commands.add_parser(
        "sweep", help="train under each defense, attack every site at the first, middle and last iteration, tabulate"
    )
    sweep.add_argument("--out", required=True, type=Path)
    sweep.add_argument(
        "--preset",
        choices=("quick", "standard", "full"),
        default="standard",
        help="standard: every defense once, 80 iterations; full: two strengths each and the protected preset, 300",
    )
    sweep.add_argument("--utility", type=Path, help="a `splitunet utility` report (utility.json) for the Dice column")
    sweep.add_argument("--quick", action="store_true", help="the same as --preset quick (checks the pipeline)")
    sweep.add_argument(
        "--reuse", type=Path, help="an earlier sweep.json (same preset and budget) whose rows are taken over, not rerun"
    )
    sweep.set_defaults(run=_sweep)
    compare = commands.add_parser(
        "compare",
        help="train every topology (vertical split, FedAvg, FedProx, U-shape, U-shape with DWCS) on the same phantom "
        "patients and budget; one table with paired-seed intervals",
    )
    compare.add_argument("--out", required=True, type=Path)
    which_seeds = compare.add_mutually_exclusive_group()
    which_seeds.add_argument("--seeds", type=int, default=3, help="paired seeds 0..N-1 (default: 3)")
    which_seeds.add_argument(
        "--only-seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="train only these seeds instead of 0..N-1 (a study split across machines; merge with --reuse)",
    )
    compare.add_argument("--steps", type=int, default=0, help="AdamW steps of every model (default: 400)")
    compare.add_argument(
        "--rounds", type=int, default=0, help="averaging rounds of the topologies that average (default: 10)"
    )
    compare.add_argument(
        "--curve-every",
        type=int,
        default=0,
        help="also score every run every this many steps (a multiple of steps/rounds): learning curves, and whether "
        "each row stopped moving between half the budget and the end (default: only at the end)",
    )
    compare.add_argument(
        "--timeout-min",
        type=float,
        default=0,
        help="each simulator run's limit in minutes (default: 60; a longer budget on a slow machine needs more)",
    )
    compare.add_argument("--topologies", nargs="+", help="rows to run, the first the reference (default: all)")
    compare.add_argument("--quick", action="store_true", help="tiny sizes, 4 steps (checks the pipeline)")
    compare.add_argument(
        "--reuse",
        type=Path,
        nargs="+",
        help="earlier compare.json files whose runs (same settings) are taken over, not rerun; the first file that "
        "holds a run gives it",
    )
    compare.set_defaults(run=_compare)
    budgets = commands.add_parser(
        "compare-budgets",
        help="has the comparison stopped moving? each row of a longer-budget compare.json against the same row, seed "
        "and patients of a shorter one, with paired-seed intervals",
    )
    budgets.add_argument("--shorter", required=True, type=Path, help="compare.json of the shorter budget")
    budgets.add_argument("--longer", required=True, type=Path, help="compare.json of the longer budget")
    budgets.add_argument(
        "--shorter-at",
        type=int,
        help="read the shorter report at this step of its runs' learning curves (a study run with --curve-every; "
        "--shorter and --longer may then be the same file)",
    )
    budgets.add_argument("--out", required=True, type=Path, help="folder for budget_change.json and .md")
    budgets.add_argument(
        "--tolerance", type=float, default=2.0, help="Dice points within which a whole interval counts as settled"
    )
    budgets.set_defaults(run=_compare_budgets)
    detector = commands.add_parser(
        "detector", help="false alarms of the site-side gradient detector over whole honest training runs"
    )
    detector.add_argument("--out", required=True, type=Path)
    detector.add_argument("--iterations", type=int, default=300, help="training iterations per run (default: 300)")
    detector.add_argument("--seeds", type=int, default=3, help="honest runs with seeds 0..N-1 (default: 3)")
    detector.add_argument("--quick", action="store_true", help="one tiny run of 3 iterations (checks the pipeline)")
    detector.add_argument(
        "--replay",
        type=Path,
        metavar="CALLS_JSON",
        help="judge the gradients an earlier run recorded (its detector_calls.json) with the shipped bounds, "
        "without training: the false alarms of new bounds on held-out seeds",
    )
    detector.add_argument("--replay-seeds", type=int, nargs="+", help="with --replay: only these recorded seeds")
    detector.set_defaults(run=_detector)
    bench = commands.add_parser(
        "bench", help="step time, bytes on the wire and Dice: centralized vs split in process, simulator, POC"
    )
    bench.add_argument("--out", required=True, type=Path, help="folder for bench.json, bench.md and the runs")
    bench.add_argument("--quick", action="store_true", help="tiny sizes and budgets, no POC (checks the pipeline)")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="in-process arms' device")
    bench.add_argument("--amp", action="store_true", help="every arm trains under bfloat16 autocast (jobs' amp)")
    bench.add_argument("--no-flare", action="store_true", help="skip the FLARE simulator and POC paths")
    bench.add_argument("--no-poc", action="store_true", help="skip the POC path")
    bench.add_argument(
        "--pipelined",
        action="store_true",
        help="also run the main job with pipeline_delay 1: in the simulator, and over each --link-rate's links",
    )
    bench.add_argument("--iterations", type=int, default=0, help="training iterations per accuracy arm")
    bench.add_argument(
        "--seeds",
        type=int,
        default=0,
        help="runs of the two split arms that differ only in their wire and of the same-architecture centralized arm "
        "(default: the preset's, 3; quick 1)",
    )
    bench.add_argument("--cases", type=int, default=0, help="phantom cases (default: the preset's)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--timeout", type=float, default=1800.0, help="seconds each FLARE run may take")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    # -- bench at real scale and over rate-limited links (docs/benchmark.md, "128^3 and real links") --
    bench.add_argument(
        "--preset", choices=("128",), help="128: 128^3 crops of 144^3 phantoms, step times only (2 warm + 3 timed)"
    )
    bench.add_argument(
        "--link-rate",
        help="comma-separated rates, e.g. 1gbit,100mbit: one more POC run per rate, every party in a network "
        "namespace and each site's link shaped to the rate both ways (root; skipped with the reason otherwise)",
    )
    bench.add_argument("--link-crop", type=int, default=0, help="crop of the link runs (default: the reference crop)")
    bench.add_argument(
        "--transport",
        action="store_true",
        help="only FLARE's transport: echo the reference step's int8 payload in the simulator under each tensor "
        "setting (chunk size, inline, packed), --iterations timed rounds per run (3), every setting in turn --seeds "
        "times (2); writes transport.json and transport.md",
    )
    bench.set_defaults(run=_bench)

    # `splitunet gradient-inversion`: a curious FedAvg server inverts one hospital's weight update, without and with
    # DP-SGD (one self-contained block; torch loads only when the command runs).
    def _gradient_inversion(args) -> int:
        from splitunet.evaluation.attacks import gradient_inversion_study as study

        study.run_gradient_inversion(args.out, study.study_from_args(args), command=study.command_line(args))
        print((Path(args.out) / "report.md").read_text())
        return 0

    inversion = commands.add_parser(
        "gradient-inversion",
        help="invert one FedAvg hospital's weight update (inverting gradients), with and without DP-SGD",
    )
    inversion.add_argument("--out", required=True, type=Path, help="folder for report.json, report.md and the figure")
    inversion.add_argument("--quick", action="store_true", help="tiny sizes, one seed and epsilon (checks pipeline)")
    inversion.add_argument(
        "--preset", choices=("default", "tiny"), help="named study: default (32^3 crop) or tiny (16x16x32, wide)"
    )
    inversion.add_argument("--seeds", type=int, nargs="+", help="one attacked crop and model per seed (default 0 1 2)")
    inversion.add_argument("--epsilons", type=float, nargs="+", help="one DP-SGD step at each (default 1 3 10)")
    inversion.add_argument("--delta", type=float, help="delta of every epsilon (default 1e-5)")
    inversion.add_argument("--iterations", type=int, help="attack steps per restart")
    inversion.add_argument("--restarts", type=int, help="attack restarts, the best by gradient distance kept")
    inversion.add_argument("--labels", choices=("joint", "known"), help="labels optimised jointly, or known (oracle)")
    inversion.set_defaults(run=_gradient_inversion)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["simulator"]:  # every argument is FLARE's, so argparse must not read them
        from splitunet.flare.simulator_cli import main as simulator_main

        simulator_main(argv[1:])  # exits with the simulator's code
        return 0
    if as_program:  # a `kill` must still stop the simulators and parties it started; a caller's signals stay its own
        exit_on_sigterm()
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (SplitUNetDataError, SplitUNetConfigError) as error:
        print(f"splitunet {args.command}: error: {error}", file=sys.stderr)
        return 2
