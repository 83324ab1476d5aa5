"""One Tune trial: a TorchTrainer over N DDP workers, with the trial's hyperparameters."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import ray.tune

from cifarcam.config import SearchConfig, TrainConfig, trial_config
from cifarcam.search.placement_watch import TRAIN_START_TIMEOUT_ENV, train_start_timeout, worker_bundle
from cifarcam.search.planning import TrialResources
from cifarcam.search.train_worker import WorkerInputs, train_worker


@dataclass(frozen=True)
class SearchInputs:
    """What every trial driver gets from the search's driver (through ``tune.with_parameters``)."""

    base: TrainConfig  # the config's train section; each trial overrides its searched keys
    resources: TrialResources
    search: SearchConfig
    data: list[Any]  # object refs: train images, train labels, val images, val labels
    num_classes: int
    class_names: list[str]
    dataset: str
    storage_path: str  # <run>/train: one Train run folder per trial
    start_timeout_s: float = 600.0  # scaling.start_timeout_s: the driver's PlacementWatch decides at this age


def trial_folder_name(trial: Any) -> str:
    """``trial_<id>``: the Tune trial's folder, and its Train run's (where its checkpoints are)."""
    return f"trial_{trial.trial_id}"


def run_trial(config: dict[str, Any], inputs: SearchInputs) -> None:
    """Tune's trainable: launches one distributed Ray Train run with the trial's hyperparameters."""
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(inputs.base, config)
    res, search = inputs.resources, inputs.search
    resources = worker_bundle(res.cpus_per_worker, res.gpus_per_worker)
    # Train's controller reads this from the trial's environment when the trainer starts. Above the
    # watch's limit: Train's retry (remove the waiting group, ask again) never runs before it.
    os.environ[TRAIN_START_TIMEOUT_ENV] = f"{train_start_timeout(inputs.start_timeout_s):g}"
    worker_inputs = WorkerInputs(cfg, inputs.num_classes, inputs.class_names, inputs.dataset, inputs.data)
    trainer = ray.train.torch.TorchTrainer(
        train_worker,
        train_loop_config={"inputs": worker_inputs},
        scaling_config=ray.train.ScalingConfig(num_workers=res.workers, use_gpu=res.use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            # A stable name per trial: a restarted trial finds its Train run and resumes it.
            name=f"trial_{ray.tune.get_context().get_trial_id()}",  # == trial_folder_name(trial)
            storage_path=inputs.storage_path,
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
