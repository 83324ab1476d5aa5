"""The only Ray Tune / Ray Train glue: one Tune trial = one TorchTrainer (DDP over N workers).

Data reaches the workers through the object store: the driver ``ray.put``s the uint8 arrays once,
and each worker ``ray.get``s them (zero-copy on a node, no shared filesystem needed for data).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import ray.tune
import torch
from rich.console import Console

from cifarcam.checkpoint import META_FILE, load_train_state, load_weights, read_meta, save_checkpoint
from cifarcam.config import ConfigError, ExperimentConfig, SearchConfig, TrainConfig, trial_config
from cifarcam.data import Splits
from cifarcam.errors import NoUsableTrial
from cifarcam.loader import DeviceLoader
from cifarcam.models import ModelSpec, build_model
from cifarcam.planning import TrialResources, count_trials, plan_resources
from cifarcam.train import EpochMetrics, fit

# ---------------------------------------------------------------------------------------------
# The search space

_SAMPLERS = {
    "uniform": lambda a: ray.tune.uniform(*a),
    "loguniform": lambda a: ray.tune.loguniform(*a),
    "randint": lambda a: ray.tune.randint(*a),
    "choice": lambda a: ray.tune.choice(a),
}


def param_space(search: SearchConfig) -> dict[str, Any]:
    space: dict[str, Any] = {key: ray.tune.grid_search(values) for key, values in search.grid.items()}
    for key, spec in search.sample.items():
        (kind, args), = spec.items()
        space[key] = _SAMPLERS[kind](args)
    return space


# ---------------------------------------------------------------------------------------------
# One worker of one trial


def _distinct_nodes(world: int) -> int:
    """How many Ray nodes this trial's workers span (recorded so a run shows its placement)."""
    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return 1
    ids: list[Any] = [None] * world
    torch.distributed.all_gather_object(ids, node)
    return len(set(ids))


def train_worker(config: dict[str, Any]) -> None:
    """Runs on every DDP worker: fetch data from the object store, build, fit, report."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = TrainConfig(**config["train"])
    spec = ModelSpec(config["model_family"], config["num_classes"], cfg.stem, cfg.input_size)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)

    train_x, train_y, val_x, val_y = ray.get(config["data"])
    model = build_model(spec, cfg.pretrained)
    resume, history = None, []
    restored = ray.train.get_checkpoint()
    if restored is not None:  # a worker restarted after a failure: continue from the last epoch
        with restored.as_directory() as folder:
            load_weights(model, folder, spec)
            resume = load_train_state(folder)
            history = read_meta(folder).get("history", [])
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # moves to the device, wraps in DDP when world > 1

    loader_args = dict(device=device, rank=rank, world_size=world, seed=cfg.seed, input_size=cfg.input_size)
    train_loader = DeviceLoader(train_x, train_y, cfg.batch_size, train=True, **loader_args)
    val_loader = DeviceLoader(val_x, val_y, max(cfg.batch_size, 256), train=False, **loader_args)
    nodes = _distinct_nodes(world)
    meta = {"train": dataclasses.asdict(cfg), "class_names": config["class_names"], "dataset": config["dataset"]}

    def report(metrics: EpochMetrics, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
        values = {**metrics.to_dict(), "model": spec.family, "workers": world, "nodes": nodes}
        history.append(values)
        if rank != 0:  # every rank reports (Train needs it); only rank 0 writes a checkpoint
            ray.train.report(values, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            # Every epoch so far rides along: Tune restarts a resumed trial's log, the checkpoint keeps it.
            save_checkpoint(Path(tmp), model, spec, meta | {"history": history}, optimizer, scheduler, epoch=metrics.epoch)
            ray.train.report(values, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    fit(model, cfg, train_loader, val_loader, on_epoch_end=report, resume=resume)


# ---------------------------------------------------------------------------------------------
# One Tune trial: a TorchTrainer over N workers


def run_trial(config: dict[str, Any], base: dict[str, Any], shared: dict[str, Any]) -> None:
    """Tune's trainable: launches one distributed Ray Train run with the trial's hyperparameters."""
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(TrainConfig(**base["train"]), config)
    res: TrialResources = shared["resources"]
    search: SearchConfig = shared["search"]
    resources = {"CPU": res.cpus_per_worker} | ({"GPU": res.gpus_per_worker} if res.use_gpu else {})
    trainer = ray.train.torch.TorchTrainer(
        train_worker,
        train_loop_config={
            "train": dataclasses.asdict(cfg),
            "model_family": cfg.model,
            "num_classes": shared["num_classes"],
            "class_names": shared["class_names"],
            "dataset": shared["dataset"],
            "data": shared["data"],
        },
        scaling_config=ray.train.ScalingConfig(num_workers=res.workers, use_gpu=res.use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            # A stable name per trial: a restarted trial finds its Train run and resumes it.
            name=f"trial_{ray.tune.get_context().get_trial_id()}",  # == trial_folder_name(trial)
            storage_path=shared["storage_path"],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=search.keep_checkpoints,
                checkpoint_score_attribute=search.metric,
                checkpoint_score_order=search.mode,
            ),
            failure_config=ray.train.FailureConfig(max_failures=search.worker_restarts),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def early_stopper(cfg: ExperimentConfig) -> Any:
    if cfg.search.early_stopping == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # Rungs count epochs, not Tune's training_iteration: a trial resumed after a crash or a requeue
    # restarts that count at 1 while it trains epoch k+1 (and Ray does not persist the rungs,
    # ray-project/ray#30838), so it would be judged against the wrong rung.
    return ASHAScheduler(
        time_attr="epoch",
        max_t=cfg.train.epochs,
        grace_period=cfg.search.grace_period,
        reduction_factor=cfg.search.reduction_factor,
    )


def trial_folder_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def make_tuner(cfg: ExperimentConfig, splits: Splits, out_dir: Path, resume: bool, callbacks: list | None = None) -> ray.tune.Tuner:
    """A new Tuner, or the one stored under ``out_dir`` when resuming."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    res = plan_resources(cfg, ray.cluster_resources())
    # The driver puts each array once; every worker of every trial reads the same objects.
    data = [ray.put(splits.train.images), ray.put(splits.train.labels), ray.put(splits.val.images), ray.put(splits.val.labels)]
    shared = {
        "resources": res,
        "search": cfg.search,
        "data": data,
        "num_classes": splits.train.num_classes,
        "class_names": list(splits.class_names),
        "dataset": cfg.data.source,
        "storage_path": str(out_dir / "train"),
    }
    # The trial driver only waits on its TorchTrainer, so it holds no CPU (the workers hold the
    # real resources); Tune needs a non-empty bundle, hence a token 64 MiB of memory.
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, base={"train": dataclasses.asdict(cfg.train)}, shared=shared), {"memory": 64 << 20}
    )
    experiment = out_dir / "tune" / cfg.name
    if resume and ray.tune.Tuner.can_restore(str(experiment)):
        return ray.tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True)
    return ray.tune.Tuner(
        trainable,
        param_space=param_space(cfg.search),
        tune_config=ray.tune.TuneConfig(
            metric=cfg.search.metric,
            mode=cfg.search.mode,
            scheduler=early_stopper(cfg),
            num_samples=cfg.search.num_samples,
            # Seeded sampling: the same config draws the same learning rates on every run.
            search_alg=BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=res.max_concurrent_trials),
            # Named like the trial's Train run folder (train/trial_<id>), where its checkpoints are.
            trial_dirname_creator=trial_folder_name,
        ),
        run_config=ray.tune.RunConfig(
            name=cfg.name,
            storage_path=str(out_dir / "tune"),
            callbacks=callbacks,
            verbose=0,
            # A dead trial driver (not a worker: Train restarts those) restarts the trial, whose
            # TorchTrainer finds its Train run by name and goes on from its latest checkpoint.
            failure_config=ray.tune.FailureConfig(max_failures=cfg.search.trial_restarts),
        ),
    )


# ---------------------------------------------------------------------------------------------
# From Tune's results to table rows


def _best(items: list[dict], key: str, mode: str) -> dict | None:
    """The item with the best ``key`` under ``mode`` ('max' or 'min'), or None when empty. Ties go
    to the later epoch, as Ray Train breaks them when it decides which checkpoints to keep."""
    if not items:
        return None
    sign = 1 if mode == "max" else -1
    return max(items, key=lambda item: (sign * item[key], item.get("epoch", 0)))


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def _surviving(path: str | None) -> str | None:
    """A local checkpoint path if Train kept it (it keeps only the best k); remote URIs as given."""
    if path is None or "://" in path:
        return path
    return path if (Path(path) / META_FILE).is_file() else None


def _with_earlier_epochs(rows: list[dict]) -> list[dict]:
    """A trial resumed after a crash logs to Tune afresh from the epoch it restarted at; the epochs
    before it come back from the history its newest surviving checkpoint carries."""
    if not rows or min(r["epoch"] for r in rows) <= 1:
        return rows
    seen = {r["epoch"] for r in rows}
    for row in sorted(rows, key=lambda r: -r["epoch"]):
        path = _surviving(row.get("checkpoint_path"))
        if path and "://" not in path:
            earlier = [h | {"checkpoint_path": None} for h in read_meta(path).get("history", []) if h["epoch"] not in seen]
            return sorted(earlier + rows, key=lambda r: r["epoch"])
    return rows


def _rows_from_checkpoints(trial_dir: Path) -> list[dict]:
    """Every epoch a trial's newest checkpoint records. For a trial that reported nothing to Tune:
    its driver died after the last epoch, and the restarted driver found no epoch left to run."""
    metas = {f: read_meta(f) for f in trial_dir.glob("checkpoint_*") if (f / META_FILE).is_file()}
    folders = {meta["epoch"]: f for f, meta in metas.items() if meta.get("epoch")}
    if not folders:
        return []
    history = read_meta(folders[max(folders)]).get("history", [])
    return [h | {"checkpoint_path": str(folders[h["epoch"]]) if h["epoch"] in folders else None} for h in history]


def _failure(result: Any, rows: list[dict]) -> str | None:
    """Why a trial failed: its exception's last line, or the epoch its loss stopped being finite."""
    if result.error is not None:
        return str(result.error).strip().splitlines()[-1][:500]
    if rows and rows[-1].get("diverged"):
        return f"diverged: training loss {rows[-1].get('train_loss')} at epoch {int(rows[-1]['epoch'])}"
    return None


def trial_rows(results: ray.tune.ResultGrid, cfg: ExperimentConfig, train_dir: Path) -> tuple[list[dict], list[dict]]:
    """(trials rows, epochs rows) for ``results.TRIALS`` / ``results.EPOCHS``; ``train_dir`` holds
    each trial's Train run (``trial_<id>``), read when Tune holds no epoch of a trial."""
    trials, epochs = [], []
    searched = set(cfg.search.grid) | set(cfg.search.sample)
    for result in results:
        picks = {k: v for k, v in (result.config or {}).items() if k in searched}
        tcfg = trial_config(cfg.train, picks)
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix("trial_")
        frame = result.metrics_dataframe
        rows = _with_earlier_epochs([] if frame is None or frame.empty else frame.to_dict("records"))
        rows = rows or _rows_from_checkpoints(train_dir / f"trial_{trial_id}")
        for row in rows:
            epochs.append(
                {key: row.get(key) for key in ("epoch", "train_loss", "val_loss", "val_top1", "val_top5", "images_per_s", "lr", "epoch_time_s", "diverged", "workers", "nodes")}
                | {"trial_id": trial_id, "model": tcfg.model, "checkpoint_path": _surviving(row.get("checkpoint_path"))}
            )
        diverged = bool(rows and rows[-1].get("diverged"))
        done = int(rows[-1]["epoch"]) if rows else 0
        status = "error" if result.error else "diverged" if diverged else "completed" if done >= tcfg.epochs else "stopped_early"
        # A NaN metric on an epoch that was not flagged diverged would scramble the ranking.
        scored = [r for r in rows if _finite(r.get(cfg.search.metric)) and not r.get("diverged")]
        best = _best(scored, cfg.search.metric, cfg.search.mode)
        # Train keeps the best-k checkpoints by the same metric, so the best epoch's survives.
        best_ckpt = _best([r for r in scored if r.get("checkpoint_path")], cfg.search.metric, cfg.search.mode)
        trials.append(
            {
                "trial_id": trial_id,
                "model": tcfg.model,
                "optimizer": tcfg.optimizer,
                "scheduler": tcfg.scheduler,
                "lr": tcfg.lr,
                "weight_decay": tcfg.weight_decay,
                "batch_size": tcfg.batch_size,
                "hyperparameters": json.dumps(picks, sort_keys=True, default=str),
                "status": status,
                "error": _failure(result, rows),
                "epochs_run": done,
                "epochs_planned": tcfg.epochs,
                "stopped_by_asha": status == "stopped_early" and cfg.search.early_stopping == "asha",
                "metric": cfg.search.metric,
                "best_metric": float(best[cfg.search.metric]) if best else None,
                "best_val_top1": best["val_top1"] if best else None,
                "best_epoch": int(best["epoch"]) if best else None,
                "best_checkpoint": best_ckpt["checkpoint_path"] if best_ckpt else None,
                "time_s": float(sum(r.get("epoch_time_s") or 0 for r in rows)),
            }
        )
    return trials, epochs


# ---------------------------------------------------------------------------------------------
# Test-set evaluation of each family's best trial


def best_per_model(trials: list[dict], mode: str) -> list[dict]:
    """Each family's best trial, ranked on the search's metric (``best_metric``) in its ``mode``."""
    usable = [t for t in trials if t["best_checkpoint"] and t["status"] != "diverged"]
    models = sorted({t["model"] for t in usable})
    return [_best([t for t in usable if t["model"] == m], "best_metric", mode) for m in models]


def evaluate_best(trials: list[dict], epochs: list[dict], cfg: ExperimentConfig, splits: Splits, res: TrialResources) -> tuple[list[dict], dict[str, list]]:
    """Evaluate each model family's best checkpoint on the test set, as Ray tasks sized like a
    training worker (so a GPU cluster evaluates on GPUs). Returns accuracy rows and prediction columns."""
    from cifarcam.evaluate import evaluate_checkpoint
    from cifarcam.models import FAMILIES

    def _evaluate(folder: str, test: Any) -> Any:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return evaluate_checkpoint(folder, test, device=device)

    task = ray.remote(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker)(_evaluate)
    test_ref = ray.put(splits.test)
    chosen = best_per_model(trials, cfg.search.mode)
    evaluations = ray.get([task.remote(t["best_checkpoint"], test_ref) for t in chosen])
    accuracy, predictions = [], {name: [] for name in ("model", "image_index", "label", "coarse_label", "pred", "top5", "prob", "correct")}
    for trial, ev in zip(chosen, evaluations):
        tcfg = trial_config(cfg.train, json.loads(trial["hyperparameters"]))
        curve = [e for e in epochs if e["trial_id"] == trial["trial_id"]]
        accuracy.append(
            {
                "model": trial["model"],
                "variant": FAMILIES[trial["model"]].timm_name,
                "stem": tcfg.stem,
                "input_size": tcfg.input_size,
                "params": ev.params,
                "trial_id": trial["trial_id"],
                "optimizer": tcfg.optimizer,
                "scheduler": tcfg.scheduler,
                "lr": tcfg.lr,
                "weight_decay": tcfg.weight_decay,
                "epochs": trial["epochs_run"],
                "val_top1": trial["best_val_top1"],
                "test_top1": ev.top1,
                "test_top5": ev.top5,
                "test_superclass_top1": ev.superclass_top1,
                "train_time_s": trial["time_s"],
                "images_per_s": float(np.mean([e["images_per_s"] for e in curve])) if curve else None,
                "checkpoint": trial["best_checkpoint"],
            }
        )
        predictions["model"] += [trial["model"]] * len(ev.predictions["pred"])
        for key, column in ev.predictions.items():
            predictions[key] += column
    return accuracy, predictions


# ---------------------------------------------------------------------------------------------
# The whole search stage


def no_usable_trial_error(trials: list[dict], out_dir: Path) -> NoUsableTrial:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    tally = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "none ran"
    first = next((f"; first failure: trial {t['trial_id']} ({t['model']}): {t['error']}" for t in trials if t["error"]), "")
    plural = "s" if len(trials) != 1 else ""
    return NoUsableTrial(f"search: no trial produced a usable checkpoint ({len(trials)} trial{plural}: {tally}){first}; see {out_dir / 'trials.parquet'}")


@dataclass(frozen=True)
class SearchSummary:
    out_dir: Path
    trials: list[dict]
    accuracy: list[dict]


def check_resumable(cfg: ExperimentConfig, out_dir: Path, resume: bool) -> None:
    """A run folder holding this search is continued only on --resume, and only with its own config."""
    from cifarcam.config import dump_config

    saved = out_dir / "config.yaml"
    if (out_dir / "tune" / cfg.name).exists():
        if not resume:
            raise FileExistsError(f"--out {out_dir}: already holds search {cfg.name!r}; pass --resume to continue it, or choose another --out")
        if saved.is_file() and saved.read_text() != dump_config(cfg):
            raise ConfigError(f"--resume {out_dir}: the config differs from the run's config.yaml; resume with the same config")


def run_search(
    cfg: ExperimentConfig, splits: Splits, out_dir: Path, resume: bool = False, console: Console | None = None, mlflow_uri: str | None = None
) -> SearchSummary:
    """Tune over ``cfg.search``, then evaluate each family's best trial on the test set and write
    trials / epochs / accuracy / predictions Parquet under ``out_dir``. Ray must be initialised.
    With a ``console``, the search's progress is shown there; with ``mlflow_uri``, every trial and
    the test accuracy of each family's best are logged to MLflow as well."""
    from cifarcam import results
    from cifarcam.config import dump_config
    from cifarcam.progress import SearchProgress
    from cifarcam.tensorboard_log import TensorBoardEpochs

    config_yaml = dump_config(cfg)
    check_resumable(cfg, out_dir, resume)
    res = plan_resources(cfg, ray.cluster_resources())
    results.write_provenance(out_dir, config_yaml)
    callbacks = [TensorBoardEpochs(out_dir / "tensorboard")]
    if console is not None:
        callbacks.append(SearchProgress(count_trials(cfg.search), cfg.search.metric, cfg.search.mode, console))
    if mlflow_uri:
        from cifarcam.mlflow_log import MLflowTrials

        callbacks.append(MLflowTrials(mlflow_uri, cfg.name, cfg.train))
    grid = make_tuner(cfg, splits, out_dir, resume, callbacks).fit()
    trials, epochs = trial_rows(grid, cfg, out_dir / "train")
    results.write_table(trials, results.TRIALS, out_dir / "trials.parquet")
    results.write_table(epochs, results.EPOCHS, out_dir / "epochs.parquet")
    accuracy, predictions = evaluate_best(trials, epochs, cfg, splits, res)
    meta = {"class_names": list(splits.class_names), "coarse_names": list(splits.test.coarse_names or [])}
    # Written even when empty: the report of a failed search shows what each trial ran into.
    results.write_table(accuracy, results.ACCURACY, out_dir / "accuracy.parquet", metadata=meta)
    results.write_table(predictions, results.PREDICTIONS, out_dir / "predictions.parquet", metadata=meta)
    if mlflow_uri:
        from cifarcam.mlflow_log import log_test_accuracy

        log_test_accuracy(mlflow_uri, cfg.name, accuracy)
    if not accuracy:
        raise no_usable_trial_error(trials, out_dir)
    return SearchSummary(out_dir, trials, accuracy)
