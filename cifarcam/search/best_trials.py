"""Each model family's best trial, evaluated on the test set: the accuracy and predictions tables."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import ray

from cifarcam.config import ExperimentConfig, trial_config
from cifarcam.data import Splits
from cifarcam.search.planning import TrialResources
from cifarcam.search.tune_rows import best
from cifarcam.search_tables import PREDICTIONS, AccuracyRow, EpochRow, TrialRow


def best_per_model(trials: list[TrialRow], mode: str) -> list[TrialRow]:
    """Each family's best trial, ranked on the search's metric (``best_metric``) in its ``mode``."""
    usable = [t for t in trials if t.best_checkpoint and t.status != "diverged"]
    models = sorted({t.model for t in usable})
    return [best([t for t in usable if t.model == m], "best_metric", mode) for m in models]


def _evaluate(folder: str, test: Any, device: str) -> Any:
    from cifarcam.training import evaluate_checkpoint

    return evaluate_checkpoint(folder, test, device=device)


def evaluate_best(
    trials: list[TrialRow], epochs: list[EpochRow], cfg: ExperimentConfig, splits: Splits, res: TrialResources
) -> tuple[list[AccuracyRow], dict[str, list]]:
    """Evaluate each model family's best checkpoint on the test set, as Ray tasks sized like a
    training worker (so a GPU cluster evaluates on GPUs). Returns accuracy rows and prediction columns."""
    from cifarcam.training import FAMILIES, weights_sha256

    task = ray.remote(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker)(_evaluate)
    test_ref = ray.put(splits.test)
    chosen = best_per_model(trials, cfg.search.mode)
    # The device the task was given: Ray 2.60 leaves the GPUs visible to a task that asked for none.
    device = "cuda" if res.gpus_per_worker else "cpu"
    evaluations = ray.get([task.remote(t.best_checkpoint, test_ref, device) for t in chosen])
    accuracy, predictions = [], {name: [] for name in PREDICTIONS.names}
    for trial, ev in zip(chosen, evaluations):
        tcfg = trial_config(cfg.train, json.loads(trial.hyperparameters))
        weights = weights_sha256(trial.best_checkpoint)
        curve = [e.images_per_s for e in epochs if e.trial_id == trial.trial_id and e.images_per_s is not None]
        accuracy.append(
            AccuracyRow(
                model=trial.model,
                variant=FAMILIES[trial.model].timm_name,
                stem=tcfg.stem,
                input_size=tcfg.input_size,
                params=ev.params,
                trial_id=trial.trial_id,
                optimizer=tcfg.optimizer,
                scheduler=tcfg.scheduler,
                lr=tcfg.lr,
                weight_decay=tcfg.weight_decay,
                epochs=trial.epochs_run,
                val_top1=trial.best_val_top1,
                test_top1=ev.top1,
                test_top5=ev.top5,
                test_superclass_top1=ev.superclass_top1,
                train_time_s=trial.time_s,
                images_per_s=float(np.mean(curve)) if curve else None,
                checkpoint=trial.best_checkpoint,
                weights_sha256=weights,
            )
        )
        predictions["model"] += [trial.model] * len(ev.predictions["pred"])
        predictions["weights_sha256"] += [weights] * len(ev.predictions["pred"])
        for key, column in ev.predictions.items():
            predictions[key] += column
    return accuracy, predictions
