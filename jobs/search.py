"""Hyperparameter search: Ray Tune over models x optimizers x schedulers, each trial a DDP run.

python -m jobs.search --config configs/demo.yaml [--out DIR] [--resume] [--address ADDR]
python -m jobs.search --config configs/paper.yaml --dry-run [--images-per-s N] [--address ADDR]
"""

from __future__ import annotations

import argparse
import os

from cifarcam.errors import ConfigError
from jobs.common import add_ray_options, connect_ray, console, default_out, run, run_folder


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.search", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    p.add_argument("--out", type=run_folder, default=None, help="run folder (default: results/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the search stored in --out (which must hold it): finished trials are kept")
    p.add_argument(
        "--resume-if-started",
        action="store_true",
        help="continue the search in --out if one was started there, else start it (what a requeued SLURM attempt passes)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the trials, resources per trial, concurrency and expected epochs; start nothing")
    p.add_argument(
        "--images-per-s", type=float, default=None, help="with --dry-run: one trial's training images/s (see make gpu-check), for an estimate of device-hours"
    )
    p.add_argument(
        "--mlflow",
        metavar="URI",
        default=None,
        help="also log every trial to this MLflow tracking URI, e.g. sqlite:///mlflow.db or http://host:5000 (needs the mlflow extra)",
    )
    add_ray_options(p)
    return p


def resumes(args: argparse.Namespace) -> bool:
    return args.resume or args.resume_if_started


def cluster_resources(args: argparse.Namespace) -> dict[str, float]:
    """The given cluster's resources, or this machine's, which a local Ray would get."""
    if args.address:
        import ray

        connect_ray(args)
        return dict(ray.cluster_resources())
    import torch

    # The CPUs this process may use (cgroups and affinity included), as a local Ray would count them.
    gpus = torch.cuda.device_count() if args.num_gpus is None else args.num_gpus
    return {"CPU": float(args.num_cpus or len(os.sched_getaffinity(0))), "GPU": float(gpus)}


def dry_run(args: argparse.Namespace) -> None:
    from cifarcam.search import plan_search
    from cifarcam.training import load_experiment

    if args.images_per_s is not None and args.images_per_s <= 0:
        raise ConfigError(f"--images-per-s: must be > 0, got {args.images_per_s:g}")
    cfg = load_experiment(args.config)
    plan = plan_search(cfg, cluster_resources(args), args.images_per_s)
    for line in plan.lines():
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    if plan.misfit:  # the plan is shown, and the exit status says it cannot run here
        raise ConfigError(plan.misfit)


def prepare(args: argparse.Namespace):
    """Everything that can fail without a cluster: config, output folder, data."""
    from cifarcam.config import check_batch_fits
    from cifarcam.data import load_splits
    from cifarcam.results import check_writable
    from cifarcam.search import check_resumable
    from cifarcam.training import load_experiment

    cfg = load_experiment(args.config)
    out = (args.out or default_out(cfg.name)).resolve()
    check_resumable(cfg, out, resumes(args), must_exist=args.resume)
    check_writable(out)
    if args.mlflow:
        from cifarcam.search import open_experiment

        open_experiment(args.mlflow, cfg.name)
    with console.status(f"loading {cfg.data.source} data"):
        splits = load_splits(cfg.data)
    check_batch_fits(cfg, len(splits.train))
    console.print(f"data: {cfg.data.source}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, {splits.train.num_classes} classes")
    return cfg, out, splits


def search(args: argparse.Namespace):
    from cifarcam.run_lock import run_lock
    from cifarcam.search import print_search_summary, run_search

    cfg, out, splits = prepare(args)
    if not args.address:  # a local Ray's size is known before it starts: a trial too large fails here
        from cifarcam.search import plan_resources

        plan_resources(cfg, cluster_resources(args))
    # One search per run folder at a time, and no CAM job meanwhile: a second one fails here, in
    # one line naming the first (two array tasks with one name, a --resume while one runs).
    with run_lock(out, "jobs.search", wait=False):
        connect_ray(args, out)
        summary = run_search(cfg, splits, out, resume=resumes(args), console=console, mlflow_uri=args.mlflow)
    print_search_summary(summary, console)
    return summary


def main() -> int:
    args = parser().parse_args()
    if args.dry_run:
        dry_run(args)
    else:
        search(args)
    return 0


if __name__ == "__main__":
    run(main)
