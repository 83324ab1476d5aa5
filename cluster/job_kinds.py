"""The jobs a launcher runs on an allocation (``cluster.slurm``, ``cluster.ray_on_env``): each one's
module and parser, what is checked before anything is queued, and what a restarted attempt adds.

Each job's own parser reads its options, so a new option of a job needs no change here. The
checks are the job's own where it has them (config, CAM settings, layer names, run folder, output
folder): a mistake costs no allocation. Paths are made absolute: the nodes need not share a cwd.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from cifarcam.errors import ConfigError, UserError

OWN_CLUSTER = ("--address", "--num-cpus", "--num-gpus")  # what the allocation's own Ray cluster sets
DRIVER_CWD = Path(__file__).resolve().parent.parent  # the project's folder: each node runs the job's driver there


@dataclass(frozen=True)
class JobKind:
    name: str
    uses_ray: bool  # the report reads Parquet on one node; the others run on the allocation's Ray cluster
    path_options: tuple[str, ...]  # made absolute before submitting
    restart_flag: str | None = None  # what a restarted attempt adds, unless --resume was given

    @property
    def module(self) -> str:
        return f"jobs.{self.name}"

    def parser(self, prog: str) -> argparse.ArgumentParser:
        p = importlib.import_module(self.module).parser()
        # No abbreviations: `--check ck` or `--addr` would slip past set_aside's path and cluster options.
        p.prog, p.allow_abbrev = prog, False
        return p

    def driver_args(self, args: list[str], address: str | None, restarted: bool) -> list[str]:
        """The driver's command line: the job's options, the cluster's address (jobs that use Ray),
        and on a restarted attempt the flag that continues what an earlier attempt began. A CAM job
        needs none (its rerun skips the complete partitions) and a report simply runs again."""
        again = [self.restart_flag] if restarted and self.restart_flag and not {"--resume", self.restart_flag} & set(args) else []
        return [*args, *(["--address", address] if address else []), *again]


# A requeued search or pipeline may have ended before the search began, where --resume alone would
# refuse the folder: --resume-if-started continues one that began and starts one that did not.
JOBS: dict[str, JobKind] = {
    kind.name: kind
    for kind in (
        JobKind("pipeline", True, ("--config", "--out"), "--resume-if-started"),
        JobKind("search", True, ("--config", "--out"), "--resume-if-started"),
        JobKind("cam", True, ("--run", "--checkpoint")),
        JobKind("report", False, ("--run",)),
    )
}


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def set_aside(kind: JobKind, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The path options (to be made absolute) and the cluster's own options (to be refused),
    and the rest of ``argv`` as given."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for option in kind.path_options:
        p.add_argument(option, action="append" if option == "--checkpoint" else "store")
    for option in OWN_CLUSTER:
        p.add_argument(option)
    return p.parse_known_args(argv)


def checked_runs(kind: JobKind, argv: list[str], prog: str, launcher: str, array: list[Path] | None = None, look_for_data: bool = False) -> list[list[str]]:
    """One argument list per job to submit (one per ``array`` config, else one), each checked as
    the job checks it before any cluster time, with absolute paths. argparse's own mistakes (and
    --help) exit here with the job's usage. A search's data is looked for only when asked
    (``look_for_data``, on a node: it may be staged on the nodes alone), and never for a --dry-run."""
    aside, rest = set_aside(kind, argv)
    for option in OWN_CLUSTER:
        if getattr(aside, _dest(option), None) is not None:
            raise ConfigError(f"{option}: set by {launcher} (the job's own Ray cluster); remove it")
    if array and kind.name not in ("pipeline", "search"):
        raise ConfigError(f"--array: one search per config, for the pipeline or the search; {kind.name} takes one --run")
    if array and aside.config:
        raise ConfigError("--array: each config is one array task; do not pass --config as well")
    args = kind.parser(prog).parse_args([*argv, "--config", str(array[0])] if array else argv)
    if kind.name in ("pipeline", "search"):
        return _search_runs(kind, args, rest, array, look_for_data and not getattr(args, "dry_run", False))
    if kind.name == "cam":
        return [_cam_run(args, rest)]
    return [_report_run(args, rest)]


def check_on_node(kind: JobKind, argv: list[str]) -> None:
    """On the node that would run the driver, before its Ray cluster starts: the launcher's
    checks again, where the paths may differ from the launcher's host, and for a search that its
    data is there (not for a --dry-run, which reads none). A mistake found here costs no Ray
    cluster on any node. (A CAM job's inputs, the run folder and its checkpoints, were checked by
    the launcher, and every node sees them.) Relative paths are taken as the driver takes them,
    from the project's folder, where it runs."""
    if kind.name in ("pipeline", "search"):
        with contextlib.chdir(DRIVER_CWD):
            checked_runs(kind, argv, f"python -m {kind.module}", "the launcher", look_for_data=True)


def _search_runs(kind: JobKind, args: argparse.Namespace, rest: list[str], array: list[Path] | None, look_for_data: bool) -> list[list[str]]:
    from cifarcam.data import check_data_present
    from cifarcam.results import check_writable
    from cifarcam.search import check_resumable
    from cifarcam.training import load_experiment  # torch: after --help, which exits in parse_args

    settings = None
    if kind.name == "pipeline":
        from cifarcam.cam import check_layers
        from jobs import cam

        settings = cam.settings_from(args)
    runs = []
    for config in array or [Path(args.config)]:
        cfg = load_experiment(config)
        if settings is not None:
            check_layers(cfg, settings)
        out = (args.out / cfg.name if array and args.out else args.out) or Path("results") / cfg.name
        check_resumable(cfg, out.resolve(), args.resume or args.resume_if_started, must_exist=args.resume)  # a mistyped --out costs no allocation
        check_writable(out)
        if look_for_data:
            check_data_present(cfg.data)
        runs.append([*rest, "--config", str(Path(config).resolve()), "--out", str(out.resolve())])
    return runs


def _writable_run(run: Path) -> Path:
    """An existing run folder, which the job writes into (its cams, its report)."""
    from cifarcam.run_layout import RunLayout

    run = run.resolve()
    if not RunLayout(run).config.is_file():
        raise UserError(f"--run {run}: not a run folder (no config.yaml)")
    if not os.access(run, os.W_OK | os.X_OK):
        raise UserError(f"--run {run}: not writable, and the job writes its results there; copy the run folder somewhere writable")
    return run


def _cam_run(args: argparse.Namespace, rest: list[str]) -> list[str]:
    from cifarcam.cam import check_cam_job
    from jobs import cam

    run = _writable_run(args.run)
    checkpoints = [Path(c).resolve() for c in args.checkpoint or []]
    check_cam_job(run, cam.settings_from(args), checkpoints or None)
    return [*rest, "--run", str(run), *(text for c in checkpoints for text in ("--checkpoint", str(c)))]


def _report_run(args: argparse.Namespace, rest: list[str]) -> list[str]:
    return [*rest, "--run", str(_writable_run(args.run))]
