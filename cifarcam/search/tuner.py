"""The Tuner: the search space, the early stopper, and a new or restored ``ray.tune.Tuner``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
import ray.tune

from cifarcam.config import ExperimentConfig, SearchConfig
from cifarcam.data import Splits
from cifarcam.errors import UserError
from cifarcam.run_layout import RunLayout
from cifarcam.search.planning import TrialResources
from cifarcam.search.trial_driver import SearchInputs, run_trial, trial_folder_name

_SAMPLERS = {
    "uniform": lambda a: ray.tune.uniform(*a),
    "loguniform": lambda a: ray.tune.loguniform(*a),
    "randint": lambda a: ray.tune.randint(*a),
    "choice": lambda a: ray.tune.choice(a),
}


def param_space(search: SearchConfig) -> dict[str, Any]:
    """The config's ``grid`` and ``sample`` sections in Tune's terms."""
    space: dict[str, Any] = {key: ray.tune.grid_search(values) for key, values in search.grid.items()}
    for key, spec in search.sample.items():
        ((kind, args),) = spec.items()
        space[key] = _SAMPLERS[kind](args)
    return space


def early_stopper(cfg: ExperimentConfig) -> Any:
    if cfg.search.early_stopping == "none":
        return None
    from cifarcam.search.resumable_asha import ResumableASHA

    # Rungs count epochs, not Tune's training_iteration: a trial resumed after a crash or a requeue
    # restarts that count at 1 while it trains epoch k+1, so it would be judged against the wrong rung.
    return ResumableASHA(
        time_attr="epoch",
        max_t=cfg.train.epochs,
        grace_period=cfg.search.grace_period,
        reduction_factor=cfg.search.reduction_factor,
    )


def check_private(experiment: Path) -> None:
    """Refuse to resume from state someone else could have written: Tune unpickles the files at
    the top of its experiment folder (tuner.pkl, the experiment and searcher states), so whoever
    can write one runs code as the next user who resumes. Each, and the folder, must be this
    user's and writable by no one else (``others_can_write``)."""
    from cifarcam.safe_pickle import others_can_write

    for path in [experiment, *sorted(p for p in experiment.iterdir() if p.is_file())]:
        problem = others_can_write(path)
        if problem:
            raise UserError(
                f"--resume: {path} is {problem}, and resuming unpickles the search's state; check who changed it, then chmod go-w {experiment} {experiment}/*"
            )


def make_tuner(cfg: ExperimentConfig, splits: Splits, out_dir: Path, resume: bool, res: TrialResources, callbacks: list | None = None) -> ray.tune.Tuner:
    """A new Tuner, or the one stored under ``out_dir`` when resuming; its trials ask for ``res``
    (the search's one plan, which its placement watch expects too)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    inputs = SearchInputs(
        base=cfg.train,
        resources=res,
        search=cfg.search,
        # The driver puts each array once; every worker of every trial reads the same objects.
        data=[ray.put(splits.train.images), ray.put(splits.train.labels), ray.put(splits.val.images), ray.put(splits.val.labels)],
        num_classes=splits.train.num_classes,
        class_names=list(splits.class_names),
        dataset=cfg.data.source,
        storage_path=str(RunLayout(out_dir).train),
        start_timeout_s=cfg.scaling.start_timeout_s,
    )
    # The trial driver only waits on its TorchTrainer, so it holds no CPU (the workers hold the
    # real resources); Tune needs a non-empty bundle, hence a token 64 MiB of memory.
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, inputs=inputs), {"memory": 64 << 20})
    experiment = RunLayout(out_dir).tune / cfg.name
    if resume and ray.tune.Tuner.can_restore(str(experiment)):
        check_private(experiment)
        tuner = ray.tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True)
        # Tune restores the callbacks pickled by the first run (their consoles and clients dropped)
        # and ignores new ones; this job's own (its terminal, its --mlflow) replace them. Ray has no
        # public setter for this (2.60): its TunerInternal hands out the run config it will use.
        tuner._local_tuner.get_run_config().callbacks = callbacks
        return tuner
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
            storage_path=str(RunLayout(out_dir).tune),
            callbacks=callbacks,
            verbose=0,
            # A dead trial driver (not a worker: Train restarts those) restarts the trial, whose
            # TorchTrainer finds its Train run by name and goes on from its latest checkpoint.
            failure_config=ray.tune.FailureConfig(max_failures=cfg.search.trial_restarts),
        ),
    )
