"""ASHA whose rungs survive a resumed search.

Ray keeps ASHA's rungs (each trial's metric at each milestone epoch) only in memory, and pickles
the scheduler as it was before the first trial (ray-project/ray#30838). After a crash or a SLURM
requeue, a resumed trial goes on from its checkpoint: its first result is epoch k+1, so the
milestones it passed before are never recorded, and a result at ``max_t`` is never recorded at all.
The trials after it then met empty rungs and ran to the end (seen in CI: a trial that cannot
learn, run after a requeue). Tune's own per-trial log is no help: its copy in the run folder is
synced with the experiment state and loses the last epochs before a crash.

This scheduler records, before judging a result, the epochs its trial's newest checkpoint carries
(``history`` in its ``meta.json``, written with every epoch) at the milestones the trial passed
unrecorded; and it does the same for every trial a resumed search restores, finished ones included.
A resumed search so stops the trials an unbroken one would have stopped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler

from cifarcam.search.tune_rows import epochs_from_checkpoints


class ResumableASHA(ASHAScheduler):
    """``ASHAScheduler`` that fills a trial's missed milestones from its checkpoints' history."""

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if trial.has_reported_at_least_once:  # restored by a resumed search
            self._record_earlier_epochs(trial, trial.last_result, before=math.inf)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        if self._time_attr in result:
            self._record_earlier_epochs(trial, result, before=result[self._time_attr])
        return super().on_trial_result(tune_controller, trial, result)

    def _record_earlier_epochs(self, trial: Trial, result: dict, before: float) -> None:
        bracket = self._trial_info[trial.trial_id]
        missed = [m for m, recorded in bracket._rungs if m < before and trial.trial_id not in recorded]
        checkpoint = result.get("checkpoint_path")
        if not missed or not checkpoint or "://" in str(checkpoint):
            return
        for epoch in epochs_from_checkpoints(Path(checkpoint).parent):
            if epoch.get(self._time_attr, math.inf) < before and epoch.get(self._metric) is not None:
                # Recording only: the decision at that epoch was taken before the restart.
                bracket.on_result(trial, epoch[self._time_attr], self._metric_op * epoch[self._metric])
