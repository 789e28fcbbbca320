"""The ``splitunet`` command (also ``python -m splitunet``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from splitunet.errors import SplitUNetConfigError, SplitUNetDataError

__all__ = ["main", "build_parser"]


def _phantom(args) -> int:
    from splitunet.data.phantom import generate_phantom

    out = generate_phantom(args.out, args.cases, shape=tuple(args.shape), seed=args.seed, progress=not args.quiet)
    print(f"wrote {args.cases} phantom cases in MSD Task01 layout to {out}")
    return 0


def _partition(args) -> int:
    from splitunet.data.partition import partition_msd

    summary = partition_msd(args.src, args.out, progress=not args.quiet)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _prepare(args) -> int:
    from splitunet.deployment import default_site_modalities, prepare_simulator_workspace, read_or_create_secret

    secret = args.case_key_secret or read_or_create_secret(Path(args.workspace) / "case_key_secret.txt")
    workspace = prepare_simulator_workspace(
        args.workspace, args.data, default_site_modalities(args.num_sites), secret, layout=args.layout
    )
    print(f"simulator workspace ready: {workspace}/local (site settings and class allow-list)")
    print(f"run: nvflare simulator jobs/split_unet -w {args.workspace} -n {args.num_sites} -t {args.num_sites}")
    return 0


def _stage_byoc(args) -> int:
    from splitunet.deployment import find_job, stage_byoc_job

    out = stage_byoc_job(args.job or find_job("split_unet"), args.out)
    print(f"BYOC job (carries custom/splitunet) written to {out}")
    return 0


def _job_folder(job: str | None) -> Path | None:
    """A job given as a folder, or by name under the bundle's ``jobs/`` (``split_unet_noise``)."""
    if job is None or Path(job).is_dir():
        return Path(job) if job else None
    from splitunet.deployment import find_job

    return find_job(job)


def _defenses(args) -> int:
    from splitunet.defense_table import DEFENSE_JOBS, run_defense_table
    from splitunet.demo import DemoSettings

    server_args = {"num_iterations": args.iterations} if args.iterations else {}
    settings = DemoSettings(cases=args.cases, shape=tuple(args.shape), seed=args.seed, server_args=server_args)
    run_defense_table(args.out, args.jobs or DEFENSE_JOBS, settings)
    print((Path(args.out) / "defenses.md").read_text())
    return 0


def _poc(args) -> int:
    from splitunet.demo import ensure_partitioned_phantom
    from splitunet.deployment import copy_job_with_overrides, default_site_modalities, find_job, read_or_create_secret
    from splitunet.poc.run_job import run_job_in_poc

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
    from splitunet.demo import DemoSettings, run_demo

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

    partition = commands.add_parser("partition", help="split an MSD dataset into one folder per party")
    partition.add_argument("--src", required=True, type=Path)
    partition.add_argument("--out", required=True, type=Path)
    partition.add_argument("--quiet", action="store_true")
    partition.set_defaults(run=_partition)

    prepare = commands.add_parser("prepare", help="write a simulator workspace's local/ (site settings, allow-list)")
    prepare.add_argument("--data", required=True, type=Path, help="output of `splitunet partition`")
    prepare.add_argument("--workspace", required=True, type=Path)
    prepare.add_argument("--num-sites", type=int, default=4)
    prepare.add_argument("--layout", default="msd")
    prepare.add_argument("--case-key-secret", default=None, help="default: random, kept in WORKSPACE")
    prepare.set_defaults(run=_prepare)

    stage = commands.add_parser("stage-byoc", help="copy a job with the splitunet package in its custom/ folder")
    stage.add_argument("--out", required=True, type=Path)
    stage.add_argument("--job", type=Path, default=None, help="default: jobs/split_unet")
    stage.set_defaults(run=_stage_byoc)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (SplitUNetDataError, SplitUNetConfigError) as error:
        print(f"splitunet {args.command}: error: {error}", file=sys.stderr)
        return 2
