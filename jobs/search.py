"""Hyperparameter search: Ray Tune over models x optimizers x schedulers, each trial a DDP run.

    python -m jobs.search --config configs/demo.yaml [--out DIR] [--resume] [--address ADDR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.common import add_ray_options, connect_ray, console, default_out, run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.search", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: results/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the search stored in --out: finished trials are kept")
    add_ray_options(p)
    return p


def prepare(args: argparse.Namespace):
    """Everything that can fail without a cluster: config, output folder, data."""
    from cifarcam.config import check_batch_fits, load_config
    from cifarcam.data import load_splits
    from cifarcam.results import check_writable
    from cifarcam.search import check_resumable

    cfg = load_config(args.config)
    out = (args.out or default_out(cfg.name)).resolve()
    check_resumable(cfg, out, args.resume)
    check_writable(out)
    with console.status(f"loading {cfg.data.source} data"):
        splits = load_splits(cfg.data)
    check_batch_fits(cfg, len(splits.train))
    console.print(f"data: {cfg.data.source}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, {splits.train.num_classes} classes")
    return cfg, out, splits


def search(args: argparse.Namespace):
    from cifarcam.report_console import print_search_summary
    from cifarcam.search import run_search

    cfg, out, splits = prepare(args)
    connect_ray(args.address, args.num_cpus)
    summary = run_search(cfg, splits, out, resume=args.resume)
    print_search_summary(summary, console)
    return summary


def main() -> int:
    search(parser().parse_args())
    return 0


if __name__ == "__main__":
    run(main)
