"""Every trial's per-epoch metrics as TensorBoard event files in the run folder:

    tensorboard --logdir results/<run>/tensorboard

Written on the driver by a Tune callback, one folder per trial (``trial_<id>``, as in ``train/``),
with the epoch as the step, so a trial resumed after a crash continues its curves where they
stopped. Tune's own hint points into Ray's temporary session folder, which a reboot deletes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune import Callback

SCALARS = ("train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_s", "epoch_time_s")


class TensorBoardEpochs(Callback):
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.writers: dict[str, Any] = {}

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment (to resume it): open writers stay behind.
        return {**self.__dict__, "writers": {}}

    def _writer(self, trial: Any) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        if trial.trial_id not in self.writers:
            self.writers[trial.trial_id] = SummaryWriter(str(self.log_dir / f"trial_{trial.trial_id}"))
        return self.writers[trial.trial_id]

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "epoch" not in result:
            return
        writer = self._writer(trial)
        for name in SCALARS:
            if result.get(name) is not None:
                writer.add_scalar(name, float(result[name]), int(result["epoch"]))
        writer.flush()

    def _close(self, trial: Any) -> None:
        writer = self.writers.pop(trial.trial_id, None)
        if writer is not None:
            writer.close()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
