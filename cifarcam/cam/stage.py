"""The CAM stage on Ray Data: every test image x model x layer x method x target, to Parquet.

Each model is one Ray Data pipeline: the test set as a dataset, ``map_batches`` with a CAM actor
(``cifarcam.cam.actor``: model and hooks built once per actor, one GPU or a fraction of one per
actor where there are GPUs), written by Ray Data into this job's staging folder, then regrouped
into one folder per ``cams/model=…/layer=…/method=…/`` with a completion marker and renamed into
place (``cifarcam.cam.partitions``): a reader never sees half a partition, and a rerun skips the
complete ones. ``plan`` checks everything and finds what is missing before any cluster time;
``explain`` runs it.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from rich.console import Console

from cifarcam import results
from cifarcam.cam.actor import CamActor, images_table
from cifarcam.cam.partitions import CAM_JOB, Source, Staging, check_settings, claim_model, is_complete, model_dir, partition_dir
from cifarcam.cam.settings import CamSettings, resolve_layers
from cifarcam.data import ImageSet
from cifarcam.errors import ConfigError
from cifarcam.run_layout import RunLayout
from cifarcam.run_lock import run_lock
from cifarcam.training import CamLayer, ModelSpec


@dataclass(frozen=True)
class ModelToExplain:
    name: str  # the model family
    checkpoint: str


@dataclass(frozen=True)
class ModelPlan:
    model: ModelToExplain
    spec: ModelSpec
    layers: list[CamLayer]
    missing: list[tuple[CamLayer, str]]  # (layer, method) partitions not yet published
    source: Source  # the checkpoint's weights, recorded in each partition's marker
    recorded: dict  # the settings and the test set, recorded in each marker and compared by every later job


def recorded_settings(settings: CamSettings, test: ImageSet) -> dict:
    """What must match for existing partitions to be reused: the settings, and the test set their
    ``image_index`` refers to."""
    return {**settings.comparable(), "test_set": test.fingerprint()}


def plan(run_dir: Path, models: list[ModelToExplain], settings: CamSettings, test: ImageSet) -> list[ModelPlan]:
    """Check every layer name and the stored settings and test set, and find what is left to
    compute: all before any cluster time is spent. Partitions of another checkpoint are refused."""
    from cifarcam.training import read_meta

    cams_dir = RunLayout(run_dir).cams
    families = [read_meta(m.checkpoint)["model"]["family"] for m in models]
    twice = sorted({f for f in families if families.count(f) > 1})
    if twice:
        raise ConfigError(f"--checkpoint: two checkpoints of {', '.join(twice)}; one run's cams/ holds one checkpoint per model family")
    # Layer names first: a typo is named before any stored setting is compared.
    specs = [ModelSpec(**read_meta(model.checkpoint)["model"]) for model in models]
    layers_of = [resolve_layers(spec, settings.layers, f"model {model.name}") for spec, model in zip(specs, models, strict=False)]
    plans, recorded = [], recorded_settings(settings, test)
    with run_lock(run_dir, CAM_JOB):
        check_settings(cams_dir, recorded)
        for model, spec, layers in zip(models, specs, layers_of, strict=False):
            source = Source.of(model.checkpoint)
            claim_model(model_dir(cams_dir, spec.family), source)
            missing = [(layer, m) for layer in layers for m in settings.methods if not is_complete(partition_dir(cams_dir, spec.family, layer.name, m), source)]
            plans.append(ModelPlan(model, spec, layers, missing, source, recorded))
    return plans


def sample_first_blocks(table: pa.Table, rows: int, actors: int) -> list[pa.Table]:
    """The stage's input blocks: several per actor, so that every actor gets work (no shuffle
    needed), of about ``rows`` rows each. The faithfulness sample is split over the first
    ``actors`` blocks, at their head: so it fills whole batches on every actor, and its curves run
    in a few large forward passes. Spread over the test set in its order, 128 sampled images of
    10,000 were one or two per 128-image batch, and each batch ran its 9 maps' curves in passes of
    20 to 40 inputs, whose fixed cost was most of faithfulness (README, "The CAM stage at full
    size"). Every row keeps its own columns (``image_index`` and all); the others keep their order."""
    in_sample = table["faithfulness"].to_numpy(zero_copy_only=False).astype(bool)
    sample, rest = np.flatnonzero(in_sample), np.flatnonzero(~in_sample)
    blocks = [list(group) for group in np.array_split(sample, actors)] if len(sample) else []
    taken = 0
    for block in blocks:  # topped up with the other rows, in order
        top_up = max(0, rows - len(block))
        block.extend(rest[taken : taken + top_up])
        taken += top_up
    blocks += [list(rest[i : i + rows]) for i in range(taken, len(rest), rows)]
    return [table.take(np.asarray(block, dtype=np.int64)) for block in blocks if block]


def explain(
    run_dir: Path,
    plans: list[ModelPlan],
    test: ImageSet,
    settings: CamSettings,
    actors: int,
    gpus_per_actor: float,
    console: Console | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Run the CAM stage for the planned models; Ray must be up where anything is missing.

    Ray Data writes each model's rows into this job's staging folder; they are then regrouped into
    one folder per (layer, method), each with its files and its marker, and published one by one.
    With a ``console``, each model's progress (images explained, rate, time left) is shown there."""
    summary: dict[str, Any] = {"skipped": 0, "written": []}
    with Staging(run_dir) as staging:
        staging.sweep()  # what killed jobs left; never visible under cams/
        for p in plans:
            summary["skipped"] += len(p.layers) * len(settings.methods) - len(p.missing)
            if not p.missing:
                continue
            raw = staging.folder / f"raw-{uuid.uuid4().hex[:8]}"
            _write_maps(raw, run_dir, p, test, settings, actors, gpus_per_actor, threads, console)
            wanted = {(p.spec.family, layer.name, method) for layer, method in p.missing}
            expected_rows = len(test) * len(settings.targets)  # one row per image and target
            written, skipped = staging.regroup_and_publish(raw, results.CAM_PARTITIONS, wanted, p.source, p.recorded, expected_rows)
            summary["written"] += written
            summary["skipped"] += skipped
    return summary


def _write_maps(
    raw: Path, run_dir: Path, p: ModelPlan, test: ImageSet, settings: CamSettings, actors: int, gpus_per_actor: float, threads: int, console: Console | None
) -> None:
    """One model's missing (layer, method) maps, as Ray Data's unpartitioned Parquet files in
    ``raw``. Every layer and method that misses any partition is computed for every image."""
    import ray

    from cifarcam.cam.progress import ImageCounter, run_with_progress
    from cifarcam.ray_logs import mark_work_started, native_stderr_in_log

    mark_work_started()

    table = images_table(test, stored_predictions(run_dir, p.model, test.index, p.source.weights_sha256), settings.faithfulness)
    rows = max(settings.batch_size, -(-len(test) // (4 * actors)))
    dataset = ray.data.from_arrow(sample_first_blocks(table, rows, actors))
    needed_layers = [layer for layer in p.layers if any(layer == ml for ml, _ in p.missing)]
    needed_methods = tuple(m for m in settings.methods if any(m == mm for _, mm in p.missing))
    counter = ImageCounter.remote() if console is not None else None
    explained = dataset.map_batches(
        CamActor,
        fn_constructor_kwargs={
            "checkpoint": p.model.checkpoint,
            "run": run_dir.name,
            "settings": CamSettings(**{**asdict(settings), "methods": needed_methods}),
            "layers": needed_layers,
            "progress": counter,
            "device": "cuda" if gpus_per_actor else "cpu",  # what the actor was given (cam_actor says why)
            "threads": threads,
        },
        batch_size=settings.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus_per_actor or None,
        num_cpus=None if gpus_per_actor else 1,
    )
    with native_stderr_in_log():
        if counter is None:
            explained.write_parquet(str(raw))
        else:
            label = f"cams {p.spec.family} ({', '.join(needed_methods)})"
            run_with_progress(lambda: explained.write_parquet(str(raw)), counter, len(test), label, console)
            ray.kill(counter)


def stored_predictions(run_dir: Path, model: ModelToExplain, image_index: np.ndarray, weights_sha256: str) -> np.ndarray | None:
    """The run's predicted class per image (in ``image_index`` order) for ``model``, when the run
    evaluated this very checkpoint (``weights_sha256``, its model.pt's): accuracy.parquet, the
    search's commit, names it, and predictions.parquet's rows are that checkpoint's. None otherwise
    (and for runs whose predictions predate the column): the actors then predict themselves."""
    import duckdb
    import pyarrow.parquet as pq

    accuracy, predictions = RunLayout(run_dir).accuracy, RunLayout(run_dir).predictions
    if not (accuracy.is_file() and predictions.is_file()) or "weights_sha256" not in pq.read_schema(predictions).names:
        return None
    rows = duckdb.execute("select checkpoint from read_parquet(?) where model = ?", [str(accuracy), model.name]).fetchall()
    if not rows or RunLayout(run_dir).located(rows[0][0]).resolve() != Path(model.checkpoint).resolve():
        return None
    query = "select image_index, pred from read_parquet(?) where model = ? and weights_sha256 = ?"
    frame = duckdb.execute(query, [str(predictions), model.name, weights_sha256]).df()
    by_index = dict(zip(frame.image_index, frame.pred, strict=False))
    if not all(int(i) in by_index for i in image_index):
        return None
    return np.array([by_index[int(i)] for i in image_index], dtype=np.int64)
