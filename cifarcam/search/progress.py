"""Progress of a search on the driver: trials running and finished, the best so far, and each
failed trial in one line of the project's words (Tune's traceback goes to the run's logs).

On a terminal it is one live bar. In a log file (``ray job logs``, SLURM's output) a bar is only
drawn when it ends, so there each epoch and each trial's end is a line instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class SearchProgress(Callback):
    """A Tune callback that reports the search on ``console``."""

    def __init__(self, total_trials: int, metric: str, mode: str, console: Console) -> None:
        self.metric, self.mode = metric, mode
        self.best: tuple[float, str] | None = None
        self.running: set[str] = set()
        self.finished = 0
        self.total = total_trials
        self.console = console
        self.progress: Progress | None = None
        self.task = None

    def __getstate__(self) -> dict:
        # Tune pickles its run config (callbacks included) to resume later: drop the live display.
        return {**self.__dict__, "progress": None, "task": None, "console": None}

    # -- what is shown ------------------------------------------------------------------------

    def _status(self) -> str:
        best = f"best {self.metric}={self.best[0]:.4f} ({self.best[1]})" if self.best else "best: none yet"
        return f"{len(self.running)} running | {best}"

    def _say(self, line: str) -> None:
        """A line in a log file; on a terminal the bar says it."""
        if not self.console.is_terminal:
            self.console.print(f"search: {line}", highlight=False, markup=False)

    def _refresh(self) -> None:
        if not self.console.is_terminal:
            return
        if self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]search"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task("trials", total=self.total, status="starting")
            self.progress.start()
        self.progress.update(self.task, completed=self.finished, status=self._status())

    # -- Tune's callbacks ---------------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        self._refresh()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.add(trial.trial_id)
        self._refresh()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        if value is not None and (self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])):
            self.best = (float(value), trial_name(trial))
        shown = f"{self.metric} {value:.4f}" if isinstance(value, (int, float)) else f"no {self.metric}"
        self._say(f"trial {trial_name(trial)} epoch {result.get('epoch', '?')}: {shown} | {self.finished}/{self.total} trials done, {self._status()}")
        self._refresh()

    def _end(self, trial: Any) -> None:
        self.running.discard(trial.trial_id)
        self.finished += 1
        self._refresh()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial)
        self._say(f"trial {trial_name(trial)} ended | {self.finished}/{self.total} trials done")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial)
        # Shown on a terminal too: a failed trial is a warning the user must see.
        self.console.print(f"warning: trial {trial_name(trial)} failed: {_last_error_line(trial)}", highlight=False, markup=False)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.progress is not None:
            self.progress.stop()


# Runs started before the rename pickled their callback under this name; they still resume.
RichProgress = SearchProgress


def trial_name(trial: Any, default_model: str = "") -> str:
    """``<trial id> (<model>)``: the model the trial's config picked, else ``default_model``."""
    return f"{trial.trial_id} ({trial.config.get('model', default_model)})".replace(" ()", "")


def _last_error_line(trial: Any) -> str:
    """The exception's own line from the trial's error file (Tune writes the traceback there)."""
    path = getattr(trial, "error_file", None)
    text = Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    where = f"; traceback in {path}" if path else ""
    return (lines[-1] if lines else "no error message") + where
