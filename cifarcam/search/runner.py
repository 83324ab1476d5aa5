"""The search stage: Tune over the config's search space, one TorchTrainer (DDP over N workers)
per trial, then each family's best trial on the test set, written as the run's Parquet tables.

The Ray pieces live in the blocks Ray's Train + Tune guide uses: ``train_worker`` (the function on
every DDP rank), ``trial_driver`` (one trial: a TorchTrainer), ``tuner`` (the Tuner, its space and
early stopper); ``tune_rows`` turns Tune's results into rows and ``best_trials`` evaluates.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import ray
from rich.console import Console

from cifarcam import results
from cifarcam.config import ExperimentConfig, dump_config
from cifarcam.data import Splits
from cifarcam.errors import NoUsableTrial
from cifarcam.ray_logs import mark_work_started
from cifarcam.run_layout import RunLayout
from cifarcam.search.best_trials import evaluate_best
from cifarcam.search.placement_watch import PlacementWatch, SearchStalled, worker_bundle
from cifarcam.search.planning import check_resumable, count_trials, plan_resources
from cifarcam.search.progress import SearchProgress
from cifarcam.search.tensorboard_log import TensorBoardEpochs
from cifarcam.search.tune_rows import trial_rows
from cifarcam.search.tuner import make_tuner
from cifarcam.search_tables import ACCURACY, EPOCHS, PREDICTIONS, TRIALS, AccuracyRow, TrialRow


def no_usable_trial_error(trials: list[TrialRow], out_dir: Path) -> NoUsableTrial:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    tally = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "none ran"
    first = next((f"; first failure: trial {t.trial_id} ({t.model}): {t.error}" for t in trials if t.error), "")
    plural = "s" if len(trials) != 1 else ""
    return NoUsableTrial(f"search: no trial produced a usable checkpoint ({len(trials)} trial{plural}: {tally}){first}; see {out_dir / 'trials.parquet'}")


@dataclass(frozen=True)
class SearchSummary:
    out_dir: Path
    trials: list[TrialRow]
    accuracy: list[AccuracyRow]


def _stored(rows: list, field: str, layout: RunLayout) -> list:
    """Rows as the tables store them: checkpoint paths relative to the run folder (a moved or
    copied run finds its own; ``RunLayout.located`` reads them back)."""
    return [dataclasses.replace(row, **{field: layout.stored(getattr(row, field))}) for row in rows]


def run_search(
    cfg: ExperimentConfig, splits: Splits, out_dir: Path, resume: bool = False, console: Console | None = None, mlflow_uri: str | None = None
) -> SearchSummary:
    """Tune over ``cfg.search``, then evaluate each family's best trial on the test set and write
    trials / epochs / accuracy / predictions Parquet under ``out_dir``. Ray must be initialised.
    With a ``console``, the search's progress is shown there; with ``mlflow_uri``, every trial and
    the test accuracy of each family's best are logged to MLflow as well."""
    config_yaml = dump_config(cfg)
    layout = RunLayout(out_dir)
    check_resumable(cfg, out_dir, resume)
    res = plan_resources(cfg, ray.cluster_resources())
    if res.note and console is not None:  # the one-GPU rule changed the trial's workers: say so before it runs
        console.print(f"warning: {res.note}", style="yellow", highlight=False, markup=False)
    results.write_provenance(out_dir, config_yaml)
    # What the trials ask for (the one-GPU rule may have changed the workers): the report's device-hours
    results.write_text_atomic(layout.resources, json.dumps(dataclasses.asdict(res), indent=2) + "\n")
    job = ray.get_runtime_context().get_job_id()
    watch = PlacementWatch(worker_bundle(res.cpus_per_worker, res.gpus_per_worker), res.workers, cfg.scaling.start_timeout_s, cfg.train.model, job)
    callbacks = [TensorBoardEpochs(layout.tensorboard), watch]
    if mlflow_uri:
        from cifarcam.search.mlflow_log import MLflowTrials

        callbacks.append(MLflowTrials(mlflow_uri, cfg.name, cfg.train))
    if console is not None:  # last: Tune calls callbacks in order, so a printed epoch is recorded everywhere
        callbacks.append(SearchProgress(count_trials(cfg.search), cfg.search.metric, cfg.search.mode, console))
    tuner = make_tuner(cfg, splits, out_dir, resume, res, callbacks)
    mark_work_started()
    try:
        grid = tuner.fit()
    except Exception:
        if watch.verdict:  # the watch ended the run from a thread Tune's signal handler does not serve
            raise SearchStalled(watch.verdict) from None
        raise
    if watch.verdict:  # Tune saved the experiment: --resume runs the waiting trial and those after it
        raise SearchStalled(watch.verdict)
    trials, epochs = trial_rows(grid, cfg, layout.train)
    results.write_table(_stored(trials, "best_checkpoint", layout), TRIALS, layout.trials)
    results.write_table(_stored(epochs, "checkpoint_path", layout), EPOCHS, layout.epochs)
    accuracy, predictions = evaluate_best(trials, epochs, cfg, splits, res)
    meta = {"class_names": list(splits.class_names), "coarse_names": list(splits.test.coarse_names or [])}
    # Written even when empty: the report of a failed search shows what each trial ran into.
    # accuracy.parquet is the commit, written last: a kill in between leaves new predictions
    # beside old accuracy, whose checkpoints' weights_sha256 the new rows do not match.
    results.write_table(predictions, PREDICTIONS, layout.predictions, metadata=meta)
    results.write_table(_stored(accuracy, "checkpoint", layout), ACCURACY, layout.accuracy, metadata=meta)
    if mlflow_uri:
        from cifarcam.search.mlflow_log import log_test_accuracy

        log_test_accuracy(mlflow_uri, cfg.name, accuracy)
    if not accuracy:
        raise no_usable_trial_error(trials, out_dir)
    return SearchSummary(out_dir, trials, accuracy)
