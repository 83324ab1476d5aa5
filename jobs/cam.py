"""Grad-CAM for every test image, every model, several layers, methods and targets (Ray Data).

    python -m jobs.cam --run results/demo [--checkpoint PATH ...] [--methods gradcam,gradcam++]
                       [--layers layer3,layer4] [--targets pred,label] [--address ADDR]

Writes DIR/cams/model=<m>/layer=<l>/method=<k>/part-*.parquet with a _COMPLETE.json marker; a
rerun skips complete partitions, and two jobs may explain one run at once (other methods, layers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from cifarcam.errors import ConfigError, UserError
from cifarcam.ray_logs import mark_work_started
from jobs.common import add_ray_options, connect_ray, console, run, run_folder, warn

if TYPE_CHECKING:  # the heavy imports stay inside the functions: --help must be quick
    from cifarcam.cam_settings import CamSettings
    from cifarcam.cam_stage import ModelPlan, ModelToExplain
    from cifarcam.config import ExperimentConfig
    from cifarcam.data import ImageSet


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_cam_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", type=_csv, default=("gradcam",), help="comma-separated pytorch-grad-cam methods (default: gradcam)")
    p.add_argument("--layers", type=_csv, default=None, help="comma-separated layer names (default: every CAM layer of each model)")
    p.add_argument("--targets", type=_csv, default=("pred", "label"), help="explain the predicted class, the true label, or both (default)")
    p.add_argument("--cam-batch-size", type=int, default=128, help="images per CAM batch (default: 128)")
    p.add_argument("--faithfulness-steps", type=int, default=16, help="deletion / insertion steps per heatmap; 0 turns faithfulness off (default: 16)")
    p.add_argument("--faithfulness-images", type=int, default=128, help="the seeded sample of test images faithfulness is measured on (default: 128)")
    p.add_argument("--sanity-images", type=int, default=64, help="test images for the weight-randomisation sanity check; 0 turns it off (default: 64)")
    p.add_argument("--actors", type=int, default=None, help="CAM actors (default: one per GPU, else one per CPU but one)")
    p.add_argument("--gpus-per-actor", type=float, default=1.0, help="GPU share of each actor where there are GPUs (default: 1)")


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


def settings_from(args: argparse.Namespace) -> "CamSettings":
    from cifarcam.cam_settings import CamSettings

    return CamSettings(
        methods=args.methods,
        layers=args.layers,
        targets=args.targets,
        batch_size=args.cam_batch_size,
        faithfulness_steps=args.faithfulness_steps,
        faithfulness_images=args.faithfulness_images,
        sanity_images=args.sanity_images,
    )


def check_layers(cfg: "ExperimentConfig", settings: "CamSettings") -> None:
    """Every --layers name exists in every model the search may train: checked before the search."""
    from cifarcam.cam_settings import resolve_layers
    from cifarcam.config import searched_models
    from cifarcam.models import ModelSpec

    if settings.layers is not None:
        for family in searched_models(cfg):  # layer names do not depend on the class count
            resolve_layers(ModelSpec(family, 10, cfg.train.stem, cfg.train.input_size), settings.layers, f"model {family}")


def models_to_explain(run_dir: Path, checkpoints: list[Path] | None, num_classes: int) -> "list[ModelToExplain]":
    """The checkpoints to explain, each checked against the run's dataset before any cluster time."""
    import duckdb

    from cifarcam.cam_stage import ModelToExplain
    from cifarcam.checkpoint import check_weights, read_meta

    if checkpoints:
        chosen = [(read_meta(c)["model"]["family"], str(c)) for c in checkpoints]
    else:
        table = run_dir / "accuracy.parquet"
        if not table.is_file():
            raise UserError(f"--run {run_dir}: no accuracy.parquet; run jobs.search first or pass --checkpoint")
        chosen = duckdb.sql(f"select model, checkpoint from read_parquet('{table}') order by model").fetchall()
        if not chosen:
            raise UserError(f"--run {run_dir}: accuracy.parquet lists no model (the search produced no usable trial); nothing to explain")
    models = []
    for name, folder in chosen:
        meta = read_meta(folder)
        if meta["model"]["num_classes"] != num_classes:
            raise ConfigError(f"--checkpoint {folder}: a {meta['model']['num_classes']}-class model, but the run's dataset has {num_classes} classes")
        check_weights(folder)
        models.append(ModelToExplain(name, folder))
    return models


def cam(args: argparse.Namespace, settings: "CamSettings | None" = None) -> dict:
    import ray

    from cifarcam.cam_stage import explain, plan
    from cifarcam.config import load_config
    from cifarcam.data import load_splits

    settings = settings or settings_from(args)
    run_dir = args.run.resolve()
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--run {run_dir}: not a run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    with console.status("loading the test set"):
        test = load_splits(cfg.data).test
    plans = plan(run_dir, models_to_explain(run_dir, args.checkpoint, test.num_classes), settings)
    for layer, spec in ((layer, p.spec) for p in plans for layer in p.layers if layer.degenerate):
        warn(layer.degenerate_warning(spec))
    if not any(p.missing for p in plans):  # nothing to compute: no cluster needed
        summary = explain(run_dir, plans, test, settings, actors=1, gpus_per_actor=0.0)
    else:
        if not ray.is_initialized():
            connect_ray(args, run_dir)
        gpus = ray.cluster_resources().get("GPU", 0)
        gpus_per_actor = args.gpus_per_actor if gpus else 0.0
        # On CPUs, one core stays free for Ray Data's write tasks: actors holding every CPU would
        # leave the writer waiting forever.
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = args.actors or max(1, int(gpus / gpus_per_actor) if gpus else cpus - 1)
        if not gpus and actors >= cpus:
            raise ConfigError(f"--actors {actors}: at most {cpus - 1} CPU actors fit this {cpus}-CPU cluster (one CPU is left for writing)")
        summary = explain(run_dir, plans, test, settings, actors, gpus_per_actor, console=console)
    console.print(f"cams: {len(summary['written'])} partitions written, {summary['skipped']} already complete, in {run_dir / 'cams'}")

    def connect() -> None:
        if not ray.is_initialized():
            connect_ray(args, run_dir)

    checked = sanity_checks(run_dir, plans, test, settings, connect)
    if checked:
        console.print(f"sanity check (cascading weight randomisation): {len(checked)} file(s) written under {run_dir / 'sanity'}")
    console.print(json.dumps({"models": [p.model.name for p in plans], "methods": list(settings.methods), "targets": list(settings.targets)}))
    return summary


def sanity_checks(run_dir: Path, plans: "list[ModelPlan]", test: "ImageSet", settings: "CamSettings", connect: Callable[[], None]) -> list[Path]:
    """The randomisation sanity check per model, on a small seeded sample; skipped where the
    file for these weights and settings exists. Each model's check is a Ray task with a GPU where
    the cluster has GPUs (``connect`` joins or starts Ray when there is work), all at once."""
    import ray

    from cifarcam.cam import fast_methods
    from cifarcam.faithfulness import sample_rows
    from cifarcam.sanity import CASCADE_VERSION, check_checkpoint, is_current, sanity_file, write_sanity

    if not settings.sanity_images:
        return []
    images = test.images[np.sort(sample_rows(len(test), settings.sanity_images, seed=0))]
    fast = fast_methods(settings.methods)
    work = []  # (plan, layers, the settings it is computed with, methods still missing)
    for p in plans:
        layers = [layer.name for layer in p.layers]
        wanted = {"images": len(images), "seed": 0, "layers": layers, "cascade": CASCADE_VERSION}
        methods = [m for m in fast if not is_current(sanity_file(run_dir, p.spec.family, m), p.source.weights_sha256, wanted)]
        if methods:
            work.append((p, layers, wanted, methods))
    if not work:
        return []
    connect()
    mark_work_started()
    gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
    task = ray.remote(num_gpus=gpus, num_cpus=0 if gpus else 1)(check_checkpoint)
    results = ray.get([task.remote(p.model.checkpoint, layers, methods, images, 0) for p, layers, _, methods in work])
    written = []
    for (p, _, wanted, methods), rows in zip(work, results, strict=False):
        for method in methods:
            path = sanity_file(run_dir, p.spec.family, method)
            write_sanity(path, [r for r in rows if r["method"] == method], p.source.weights_sha256, wanted)
            written.append(path)
    return written


def main() -> int:
    cam(parser().parse_args())
    return 0


if __name__ == "__main__":
    run(main)
