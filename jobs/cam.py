"""Grad-CAM for every test image, every model, several layers, methods and targets (Ray Data).

    python -m jobs.cam --run results/demo [--checkpoint PATH ...] [--methods gradcam,gradcam++]
                       [--layers layer3,layer4] [--targets pred,label] [--address ADDR]

Writes DIR/cams/model=<m>/layer=<l>/method=<k>/part-*.parquet with a _COMPLETE.json marker; a
rerun skips complete partitions, and two jobs may explain one run at once (other methods, layers).
The work is ``cifarcam.cam.runner``'s; this module parses the options (``CamSettings``'s fields) and calls it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from cifarcam.cam import CLI, CamSettings
from jobs.common import add_ray_options, connect_ray, console, run, run_folder, warn


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


# The argparse type of each annotation (its text: cam_settings postpones annotations).
_TYPES = {"tuple[str, ...]": _csv, "tuple[str, ...] | None": _csv, "int": int, "int | None": int, "float": float, "str": str}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")  # --cam-batch-size: cam_batch_size, not the generic batch_size


def add_cam_options(p: argparse.ArgumentParser) -> None:
    """One option per ``CamSettings`` field, with the field's default."""
    for field in dataclasses.fields(CamSettings):
        flag, text = CLI[field.name]
        shown = ",".join(field.default) if isinstance(field.default, tuple) else field.default
        if shown is not None:
            text = f"{text} (default: {shown})"
        p.add_argument(flag, dest=_dest(flag), type=_TYPES[field.type], default=field.default, help=text)


def settings_from(args: argparse.Namespace) -> CamSettings:
    """The CAM options as checked settings: a mistake is named before any cluster time."""
    return CamSettings(**{field.name: getattr(args, _dest(CLI[field.name][0])) for field in dataclasses.fields(CamSettings)})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.cam", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=run_folder, required=True, help="run folder written by jobs.search (its config.yaml names the data)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        default=None,
        help="checkpoint folder to explain (repeatable; default: each model's best in accuracy.parquet)",
    )
    add_cam_options(p)
    add_ray_options(p)
    return p


def cam(args: argparse.Namespace, settings: CamSettings | None = None) -> dict:
    import ray

    from cifarcam.cam import explain_run

    run_dir = args.run.resolve()

    def connect() -> None:
        if not ray.is_initialized():
            connect_ray(args, run_dir)

    settings = settings or settings_from(args)
    summary = explain_run(run_dir, settings, args.checkpoint, connect, warn, console)
    console.print(f"cams: {len(summary['written'])} partitions written, {summary['skipped']} already complete, in {run_dir / 'cams'}")
    if summary["sanity"]:
        console.print(f"sanity check (cascading weight randomisation): {len(summary['sanity'])} file(s) written under {run_dir / 'sanity'}")
    console.print(json.dumps({"models": summary["models"], "methods": list(settings.methods), "targets": list(settings.targets)}))
    return summary


def main() -> int:
    cam(parser().parse_args())
    return 0


if __name__ == "__main__":
    run(main)
