"""The search in MLflow, when a job is given ``--mlflow URI``: one MLflow run per Tune trial.

Each run holds the trial's hyperparameters (the whole train section as the trial ran it), its
per-epoch metrics with the epoch as the step, and, for each model family's best trial, the test
accuracy of its best checkpoint (``test_top1``, ``test_top5``; tag ``cifarcam.best_of_family``).

Ray's ``MLflowLoggerCallback`` is not used: it steps metrics by Tune's ``training_iteration``,
which restarts at 1 when a trial resumes from its checkpoint (epochs 3, 4 would be logged as
steps 1, 2), and a resumed search starts a second MLflow run for each trial. Here the epoch is
the step, and a trial's run is found again by its tag ``cifarcam.trial_id``, so a rerun with
``--resume`` or a SLURM requeue continues the same runs.

mlflow is an optional extra (``pip install 'cifarcam[mlflow]'``): imported only when asked for.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Any, Callable

from ray.tune import Callback

from cifarcam.config import TrainConfig, trial_config
from cifarcam.errors import ConfigError
from cifarcam.search.tensorboard_log import SCALARS
from cifarcam.search_tables import AccuracyRow

TRIAL_TAG = "cifarcam.trial_id"


def _client(tracking_uri: str) -> Any:
    # MLflow and Alembic announce every table they create at INFO on stderr: keep warnings only.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(f"--mlflow {tracking_uri}: mlflow is not installed; pip install 'cifarcam[mlflow]'") from None
    return MlflowClient(tracking_uri=tracking_uri)


def open_experiment(tracking_uri: str, experiment: str) -> tuple[Any, str]:
    """A client and the experiment's id, created if new. Jobs call it before Ray starts, so that
    an unreachable tracking store fails before any cluster time is spent, not after an epoch."""
    try:
        client = _client(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        return client, found.experiment_id if found else client.create_experiment(experiment)
    except ConfigError:
        raise
    except Exception as err:  # mlflow raises its own, requests' and SQLAlchemy's errors here
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"--mlflow {tracking_uri}: cannot reach the tracking store ({first[:300]})") from None


def find_run(client: Any, experiment_id: str, trial_id: str) -> str | None:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=1)
    return runs[0].info.run_id if runs else None


class MLflowTrials(Callback):
    """A Tune callback on the driver: each trial's parameters and epochs into its MLflow run."""

    def __init__(self, tracking_uri: str, experiment: str, base: TrainConfig) -> None:
        self.tracking_uri, self.experiment, self.base = tracking_uri, experiment, base
        self.client: Any = None
        self.experiment_id = ""
        self.runs: dict[str, str] = {}  # trial id -> MLflow run id
        self.failed = False

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment: the client and the cache stay behind.
        return {**self.__dict__, "client": None, "runs": {}}

    def setup(self, **info: Any) -> None:
        self.client, self.experiment_id = open_experiment(self.tracking_uri, self.experiment)

    def _run(self, trial: Any) -> str:
        if trial.trial_id not in self.runs:
            run_id = find_run(self.client, self.experiment_id, trial.trial_id)
            if run_id is None:
                run = self.client.create_run(self.experiment_id, run_name=f"trial_{trial.trial_id}", tags={TRIAL_TAG: trial.trial_id})
                run_id = run.info.run_id
                params = dataclasses.asdict(trial_config(self.base, trial.config))
                self.client.log_batch(run_id, params=[_param(k, v) for k, v in sorted(params.items())])
            self.runs[trial.trial_id] = run_id
        return self.runs[trial.trial_id]

    def _log(self, write: Callable[[], None]) -> None:
        """Tune does not catch a callback's exception: one MLflow hiccup (a server restart, a
        network error) would end the whole search. It is reported once and MLflow left alone."""
        if self.failed:
            return
        try:
            write()
        except Exception as err:
            self.failed = True
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            logging.getLogger("cifarcam").error("MLflow logging stopped for this search: %s", first[:300])
            print(f"warning: --mlflow {self.tracking_uri}: logging stopped ({first[:300]}); the search goes on", file=sys.stderr)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._log(lambda: self.client.update_run(self._run(trial), status="RUNNING"))  # again RUNNING when resumed

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "epoch" in result:
            values = {name: result.get(name) for name in SCALARS}
            self._log(lambda: self.client.log_batch(self._run(trial), metrics=_metrics(values, step=int(result["epoch"]))))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._log(lambda: self.client.set_terminated(self._run(trial), status="FINISHED"))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._log(lambda: self.client.set_terminated(self._run(trial), status="FAILED"))


def log_test_accuracy(tracking_uri: str, experiment: str, accuracy_rows: list[AccuracyRow]) -> None:
    """Each family's best trial: its best checkpoint's test accuracy, on that trial's run."""
    client, experiment_id = open_experiment(tracking_uri, experiment)
    for row in accuracy_rows:
        run_id = find_run(client, experiment_id, row.trial_id)
        if run_id is None:  # a trial from before --mlflow was given: nothing to attach it to
            continue
        values = {"test_top1": row.test_top1, "test_top5": row.test_top5, "test_superclass_top1": row.test_superclass_top1}
        client.log_batch(run_id, metrics=_metrics(values, step=row.epochs))
        client.set_tag(run_id, "cifarcam.best_of_family", row.model)


def _param(key: str, value: Any) -> Any:
    from mlflow.entities import Param

    return Param(key, str(value))


def _metrics(values: dict[str, Any], step: int) -> list:
    """MLflow metrics of the values that exist (a dataset without superclasses has none)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(name, float(value), now, step) for name, value in values.items() if value is not None]
