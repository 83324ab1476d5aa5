"""ASHA whose rungs survive a resumed search.

Ray keeps ASHA's rungs (each trial's metric at each milestone epoch) only in memory, and pickles
the scheduler as it was before the first trial (ray-project/ray#30838). After a crash or a SLURM
requeue, a resumed trial goes on from its checkpoint: its first result is epoch k+1, so the
milestones it passed before are never recorded, and a result at ``max_t`` is never recorded at all.
The trials after it then met empty rungs and ran to the end (seen in CI: a trial that cannot
learn, run after a requeue). Tune's own per-trial log is no help: its copy in the run folder is
synced with the experiment state and loses the last epochs before a crash.

The epochs come from the history each checkpoint's ``meta.json`` carries (written with every
epoch). When a search restores a trial, the epochs Tune had seen (up to its last result) are
recorded: they were judged before the restart. When a result arrives, the epochs before it that no
rung holds yet are judged now, as they would have been, and a STOP among them stops the trial.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from cifarcam.search.tune_rows import epochs_from_checkpoints


class ResumableASHA(ASHAScheduler):
    """``ASHAScheduler`` that fills a trial's missed milestones from its checkpoints' history."""

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        seen = trial.last_result if trial.has_reported_at_least_once else {}
        if self._time_attr in seen:  # restored, or restarted in this search: Tune judged these
            self._earlier_epochs(trial, seen, through=seen[self._time_attr])

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        stop = False
        if self._time_attr in result:  # what a restart skipped: judged now
            stop = TrialScheduler.STOP in self._earlier_epochs(trial, result, through=result[self._time_attr] - 1)
        action = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.STOP if stop else action

    def _earlier_epochs(self, trial: Trial, result: dict, through: float) -> list[str]:
        """Record the trial's epochs up to ``through`` at the milestones it has no entry for yet;
        the bracket's decision for each."""
        bracket = self._trial_info[trial.trial_id]
        if all(m > through or trial.trial_id in recorded for m, recorded in bracket._rungs):
            return []  # the usual case: nothing missed
        checkpoint = result.get("checkpoint_path")
        if not checkpoint or "://" in str(checkpoint):
            return []
        return [
            bracket.on_result(trial, epoch[self._time_attr], self._metric_op * epoch[self._metric])
            for epoch in epochs_from_checkpoints(Path(checkpoint).parent)
            if epoch.get(self._time_attr, through + 1) <= through and epoch.get(self._metric) is not None
        ]
