"""The CAM stage of one run folder, as ``jobs.cam`` and ``jobs.pipeline`` run it: which checkpoints
to explain, how many actors the cluster holds, the maps (``cam_stage``), then the randomisation
sanity check. Everything that can fail is checked before any cluster time; Ray is started (or
joined) through ``connect`` only when something is left to compute.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from cifarcam.cam.settings import CamSettings, resolve_layers
from cifarcam.errors import ConfigError, UserError
from cifarcam.ray_logs import mark_work_started
from cifarcam.run_layout import RunLayout

if TYPE_CHECKING:
    from rich.console import Console

    from cifarcam.cam.stage import ModelPlan, ModelToExplain
    from cifarcam.config import ExperimentConfig
    from cifarcam.data import ImageSet


def check_layers(cfg: ExperimentConfig, settings: CamSettings) -> None:
    """Every --layers name exists in every model the search may train: checked before the search."""
    from cifarcam.config import searched_models
    from cifarcam.training import ModelSpec

    if settings.layers is not None:
        for family in searched_models(cfg):  # layer names do not depend on the class count
            resolve_layers(ModelSpec(family, 10, cfg.train.stem, cfg.train.input_size), settings.layers, f"model {family}")


def chosen_checkpoints(run_dir: Path, checkpoints: list[Path] | None) -> list[tuple[str, str]]:
    """(family, checkpoint folder) of each model to explain: the ones given, else each family's
    best in accuracy.parquet."""
    import duckdb

    from cifarcam.training import read_meta

    if checkpoints:
        return [(read_meta(c)["model"]["family"], str(c)) for c in checkpoints]
    table = RunLayout(run_dir).accuracy
    if not table.is_file():
        raise UserError(f"--run {run_dir}: no accuracy.parquet; run jobs.search first or pass --checkpoint")
    stored = duckdb.execute("select model, checkpoint from read_parquet(?) order by model", [str(table)]).fetchall()
    if not stored:
        raise UserError(f"--run {run_dir}: accuracy.parquet lists no model (the search produced no usable trial); nothing to explain")
    return [(name, str(RunLayout(run_dir).located(path))) for name, path in stored]


def check_cam_job(run_dir: Path, settings: CamSettings, checkpoints: list[Path] | None) -> None:
    """What a CAM job can check without its data or a cluster (a launcher runs it before queueing):
    a run folder, the checkpoints it would explain and their weights, and each --layers name in
    each of their models."""
    from cifarcam.training import ModelSpec, check_weights, read_meta

    if not RunLayout(run_dir).config.is_file():
        raise UserError(f"--run {run_dir}: not a run folder (no config.yaml)")
    for family, folder in chosen_checkpoints(run_dir, checkpoints):
        check_weights(folder)
        if settings.layers is not None:
            resolve_layers(ModelSpec(**read_meta(folder)["model"]), settings.layers, f"model {family}")


def models_to_explain(run_dir: Path, checkpoints: list[Path] | None, num_classes: int) -> list[ModelToExplain]:
    """The checkpoints to explain (default: each family's best in accuracy.parquet), each checked
    against the run's dataset before any cluster time."""
    from cifarcam.cam.stage import ModelToExplain
    from cifarcam.training import check_weights, read_meta

    models = []
    for name, folder in chosen_checkpoints(run_dir, checkpoints):
        meta = read_meta(folder)
        if meta["model"]["num_classes"] != num_classes:
            raise ConfigError(f"--checkpoint {folder}: a {meta['model']['num_classes']}-class model, but the run's dataset has {num_classes} classes")
        check_weights(folder)
        models.append(ModelToExplain(name, folder))
    return models


@dataclass(frozen=True)
class ActorLayout:
    actors: int
    gpus_per_actor: float  # 0.0: CPU actors (one CPU each)
    threads: int = 1  # torch's threads in each CPU actor

    def __str__(self) -> str:
        if self.gpus_per_actor:
            return f"{self.actors} actor(s) of {self.gpus_per_actor:g} GPU"
        return f"{self.actors} CPU actor(s) of 1 CPU, {self.threads} thread(s) each"


def actor_layout(cluster: dict[str, float], settings: CamSettings, cpu_nodes: int = 1, free_cpus: int | None = None) -> ActorLayout:
    """The CAM actors this cluster holds: one per GPU share where there are GPUs (unless
    ``gpus_per_actor`` is 0), else one per CPU but one. On CPUs one core stays free for Ray Data's
    write tasks: actors holding every CPU would leave the writer waiting forever.

    A CPU actor reserves one CPU. On a one-node cluster it computes with the node's free CPUs
    (``free_cpus``, default all) shared among the actors: the writer is idle most of the time, and
    on 2 cores one single-threaded actor left a core unused (measured: 43 of a model's 57 s in the
    actor, on one core). From 3 CPUs on, the default gives each actor 1 thread. On several nodes
    (``cpu_nodes``) Ray Data places actors unevenly (best effort), so each keeps 1 thread."""
    gpus, cpus = cluster.get("GPU", 0.0), int(cluster.get("CPU", 1))
    if gpus and settings.gpus_per_actor:
        fit = int(gpus / settings.gpus_per_actor + 1e-9)
        if fit < 1 or (settings.actors or 0) > fit:  # Ray Data's pool would wait forever for the rest
            raise ConfigError(f"--actors {settings.actors or 1}: at most {fit} actors of {settings.gpus_per_actor:g} GPU fit this cluster's {gpus:g} GPUs")
        return ActorLayout(settings.actors or max(1, fit), settings.gpus_per_actor)
    actors = settings.actors or max(1, cpus - 1)
    if actors >= cpus:
        raise ConfigError(f"--actors {actors}: at most {cpus - 1} CPU actors fit this {cpus}-CPU cluster (one CPU is left for writing)")
    threads = max(1, (cpus if free_cpus is None else free_cpus) // actors) if cpu_nodes == 1 else 1
    return ActorLayout(actors, 0.0, threads)


def cpu_share() -> tuple[int, int]:
    """(live nodes with CPUs, CPUs free now) of the connected Ray: what actor_layout shares."""
    import ray

    nodes = sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU"))
    return nodes, int(ray.available_resources().get("CPU", 0))


def explain_run(
    run_dir: Path,
    settings: CamSettings,
    checkpoints: list[Path] | None,
    connect: Callable[[], None],
    warn: Callable[[str], None],
    console: Console | None = None,
) -> dict[str, Any]:
    """Maps for every missing (model, layer, method) partition of ``run_dir``, then the sanity
    check; ``connect`` starts or joins Ray, and is called only when there is work."""
    import ray

    from cifarcam.cam.stage import explain, plan
    from cifarcam.config import load_config
    from cifarcam.data import load_splits

    if not RunLayout(run_dir).config.is_file():
        raise UserError(f"--run {run_dir}: not a run folder (no config.yaml)")
    cfg = load_config(RunLayout(run_dir).config)
    with console.status("loading the test set") if console is not None else nullcontext():
        test = load_splits(cfg.data).test
    plans = plan(run_dir, models_to_explain(run_dir, checkpoints, test.num_classes), settings, test)
    for layer, spec in ((layer, p.spec) for p in plans for layer in p.layers if layer.degenerate):
        warn(layer.degenerate_warning(spec))
    if not any(p.missing for p in plans):  # nothing to compute: no cluster needed
        summary = explain(run_dir, plans, test, settings, actors=1, gpus_per_actor=0.0)
    else:
        connect()
        layout = actor_layout(ray.cluster_resources(), settings, *cpu_share())
        if console is not None:
            console.print(f"cams: {layout}")
        summary = explain(run_dir, plans, test, settings, layout.actors, layout.gpus_per_actor, console=console, threads=layout.threads)
    summary["sanity"] = sanity_checks(run_dir, plans, test, settings, connect, warn)
    summary["models"] = [p.model.name for p in plans]
    return summary


def sanity_work(run_dir: Path, plans: list[ModelPlan], settings: CamSettings, images: int) -> list[tuple[ModelPlan, list[str], dict, list[str]]]:
    """What the sanity check has left to compute: (plan, layers, the settings recorded with the
    file, methods whose file is missing or stale). A cascade's steps depend on the whole set of
    layers (each step randomises down to the next CAM layer), so a model's files hold one cascade
    over every layer any job asked for: a job with other ``--layers`` recomputes it on the union
    rather than overwrite the layers before it, and a job with fewer finds it current."""
    from cifarcam.cam.methods import fast_methods
    from cifarcam.cam.sanity import CASCADE_VERSION, is_current, recorded_layers, sanity_file

    work = []
    for p in plans:
        files = {m: sanity_file(run_dir, p.spec.family, m) for m in fast_methods(settings.methods)}
        layers = sorted({layer.name for layer in p.layers}.union(*(recorded_layers(f, p.source.weights_sha256) for f in files.values())))
        wanted = {
            "images": images,
            "seed": settings.sanity_seed,
            "draws": settings.sanity_draws,
            "layers": layers,
            "cascade": CASCADE_VERSION,
            "test_set": p.recorded.get("test_set"),  # the sample is drawn from the test set
        }
        methods = [m for m, f in files.items() if not is_current(f, p.source.weights_sha256, wanted)]
        if methods:
            work.append((p, layers, wanted, methods))
    return work


def sanity_checks(
    run_dir: Path, plans: list[ModelPlan], test: ImageSet, settings: CamSettings, connect: Callable[[], None], warn: Callable[[str], None]
) -> list[Path]:
    """The randomisation sanity check per model, on a small seeded sample; skipped where the
    file for these weights and settings exists. Each model's check is a Ray task with a GPU where
    the cluster has GPUs (``connect`` joins or starts Ray when there is work), all at once."""
    import ray

    from cifarcam.cam.faithfulness import sample_rows
    from cifarcam.cam.partitions import CAM_JOB
    from cifarcam.cam.sanity import check_checkpoint, recorded_layers, sanity_file, write_sanity
    from cifarcam.run_lock import run_lock

    if not settings.sanity_images:
        return []
    images = test.images[np.sort(sample_rows(len(test), settings.sanity_images, seed=0))]
    work = sanity_work(run_dir, plans, settings, len(images))
    if not work:
        return []
    connect()
    mark_work_started()
    gpus = 1 if ray.cluster_resources().get("GPU", 0) and settings.gpus_per_actor else 0
    task = ray.remote(num_gpus=gpus, num_cpus=0 if gpus else 1)(check_checkpoint)
    device = "cuda" if gpus else "cpu"  # what the task was given: a task without a GPU may still see them
    results = ray.get(
        [task.remote(p.model.checkpoint, layers, methods, images, settings.sanity_seed, device, settings.sanity_draws) for p, layers, _, methods in work]
    )
    written = []
    with run_lock(run_dir, CAM_JOB):  # a job with other --layers may have written its cascade meanwhile
        for (p, layers, wanted, methods), rows in zip(work, results, strict=True):
            for method in methods:
                path = sanity_file(run_dir, p.spec.family, method)
                theirs = recorded_layers(path, p.source.weights_sha256)
                if not set(theirs) <= set(layers):  # overwriting would drop their layers: theirs stands
                    warn(
                        f"sanity check of {p.spec.family} {method}: another job stored a cascade over {', '.join(theirs)} meanwhile; rerun jobs.cam to check all layers in one"
                    )
                    continue
                write_sanity(path, [r for r in rows if r["method"] == method], p.source.weights_sha256, wanted)
                written.append(path)
    return written
