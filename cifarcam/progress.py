"""Live progress of a search on the driver's terminal: trials running and finished, best so far."""

from __future__ import annotations

from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RichProgress(Callback):
    """A Tune callback that drives one rich progress bar (trials finished of total)."""

    def __init__(self, total_trials: int, metric: str, mode: str, console: Console | None = None) -> None:
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

    def _start(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]search"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=self.console or Console(stderr=True),
            transient=False,
        )
        self.task = self.progress.add_task("trials", total=self.total, status="starting")
        self.progress.start()

    def _refresh(self) -> None:
        if self.progress is None:
            self._start()
        best = f"best {self.metric}={self.best[0]:.4f} ({self.best[1]})" if self.best else "best: none yet"
        self.progress.update(self.task, completed=self.finished, status=f"{len(self.running)} running | {best}")

    def setup(self, **info: Any) -> None:
        self._start()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.add(trial.trial_id)
        self._refresh()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        if value is not None and (
            self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])
        ):
            self.best = (float(value), f"{trial.config.get('model', '')} {trial.trial_id}".strip())
        self._refresh()

    def _end(self, trial: Any) -> None:
        self.running.discard(trial.trial_id)
        self.finished += 1
        self._refresh()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
