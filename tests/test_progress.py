"""The search's progress in a log file (not a terminal): a line per epoch and per trial end, and a
failed trial as one warning in the project's words, naming its traceback."""

import io
from types import SimpleNamespace

from rich.console import Console

from cifarcam.search.progress import SearchProgress


def _trial(trial_id: str, error_file: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"model": "resnet_tiny"}, error_file=error_file)


def test_a_log_file_gets_a_line_per_epoch_and_a_failed_trial_in_one_warning(tmp_path):
    out = io.StringIO()
    progress = SearchProgress(2, "val_top1", "max", Console(file=out, width=200))  # a StringIO is no terminal
    good, bad = _trial("a_00000"), _trial("a_00001", str(tmp_path / "error.txt"))
    (tmp_path / "error.txt").write_text("Traceback (most recent call last):\n  File ...\ntorch.OutOfMemoryError: CUDA out of memory.\n")
    progress.setup()
    for trial in (good, bad):
        progress.on_trial_start(0, [], trial)
    progress.on_trial_result(0, [], good, {"epoch": 1, "val_top1": 0.25})
    progress.on_trial_result(0, [], good, {"epoch": 2, "val_top1": 0.5})
    progress.on_trial_complete(0, [], good)
    progress.on_trial_error(0, [], bad)
    lines = out.getvalue().splitlines()
    assert lines == [
        "search: trial a_00000 (resnet_tiny) epoch 1: val_top1 0.2500 | 0/2 trials done, 2 running | best val_top1=0.2500 (a_00000 (resnet_tiny))",
        "search: trial a_00000 (resnet_tiny) epoch 2: val_top1 0.5000 | 0/2 trials done, 2 running | best val_top1=0.5000 (a_00000 (resnet_tiny))",
        "search: trial a_00000 (resnet_tiny) ended | 1/2 trials done",
        f"warning: trial a_00001 (resnet_tiny) failed: torch.OutOfMemoryError: CUDA out of memory.; traceback in {tmp_path / 'error.txt'}",
    ]
