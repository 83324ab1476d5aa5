"""ASHA's rungs across a restart: a resumed trial's first result comes at epoch k+1 (or at max_t),
and Ray forgets the rungs (ray-project/ray#30838); the scheduler fills the milestones the trial
passed from its checkpoint's history. End to end (a SLURM requeue mid-search): test_slurm."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from ray.tune.schedulers import TrialScheduler
from torch import nn

from cifarcam.checkpoint import save_checkpoint
from cifarcam.models import ModelSpec
from cifarcam.resumable_asha import ResumableASHA


def _asha(max_t: int = 4) -> ResumableASHA:
    return ResumableASHA(time_attr="epoch", metric="val_top1", mode="max", max_t=max_t, grace_period=1, reduction_factor=2)


def _trial(trial_id: str, last_result: dict | None = None) -> SimpleNamespace:
    """What the scheduler reads of a Tune trial: its id, and the last result Tune restored."""
    return SimpleNamespace(trial_id=trial_id, has_reported_at_least_once=last_result is not None, last_result=last_result or {})


def _checkpoint(train_dir: Path, *val_top1: float) -> str:
    """The trial's newest checkpoint after len(val_top1) epochs, as its rank 0 writes it."""
    history = [{"epoch": e, "val_top1": v} for e, v in enumerate(val_top1, 1)]
    folder = train_dir / f"checkpoint_{len(val_top1)}"
    save_checkpoint(folder, nn.Linear(1, 1), ModelSpec("resnet_tiny", 10), {"history": history}, epoch=len(val_top1))
    return str(folder)


def test_a_resumed_trials_result_at_max_t_still_fills_the_rungs_it_passed(tmp_path):
    """What CI met: the good trial's only result after the requeue was its last epoch (max_t = 2),
    which ASHA never records; the trial that cannot learn then met an empty rung and ran on."""
    asha = _asha(max_t=2)
    good, weak = _trial("good"), _trial("weak")
    asha.on_trial_add(None, good)
    asha.on_trial_add(None, weak)
    checkpoint = _checkpoint(tmp_path / "trial_good", 0.40, 0.78)
    assert asha.on_trial_result(None, good, {"epoch": 2, "val_top1": 0.78, "checkpoint_path": checkpoint}) == TrialScheduler.STOP  # done
    assert asha.on_trial_result(None, weak, {"epoch": 1, "val_top1": 0.10}) == TrialScheduler.STOP


def test_a_restored_trials_checkpoint_refills_the_rungs(tmp_path):
    """A trial that finished before the crash is only restored, never run again."""
    asha = _asha()
    checkpoint = _checkpoint(tmp_path / "trial_good", 0.40, 0.55)
    asha.on_trial_add(None, _trial("good", {"epoch": 2, "val_top1": 0.55, "checkpoint_path": checkpoint}))
    weak = _trial("weak")
    asha.on_trial_add(None, weak)
    assert asha.on_trial_result(None, weak, {"epoch": 1, "val_top1": 0.45}) == TrialScheduler.CONTINUE  # above 0.40
    assert asha.on_trial_result(None, weak, {"epoch": 2, "val_top1": 0.30}) == TrialScheduler.STOP  # below 0.55


def test_without_a_checkpoint_a_trial_meets_empty_rungs():
    """Plain ASHA after a restart: the first result at each rung always continues."""
    asha = _asha()
    asha.on_trial_add(None, _trial("good", {"epoch": 2, "val_top1": 0.55}))
    weak = _trial("weak")
    asha.on_trial_add(None, weak)
    assert asha.on_trial_result(None, weak, {"epoch": 1, "val_top1": 0.01}) == TrialScheduler.CONTINUE


def test_an_unbroken_trial_is_recorded_once_per_rung(tmp_path):
    """Every epoch's result carries the history of the ones before; nothing is counted twice, and
    a trial added again (Tune does after each error) keeps its entries."""
    asha = _asha()
    trial = _trial("t")
    asha.on_trial_add(None, trial)
    train_dir = tmp_path / "trial_t"
    for epoch, value in enumerate([0.2, 0.3, 0.4], 1):
        asha.on_trial_result(None, trial, {"epoch": epoch, "val_top1": value, "checkpoint_path": _checkpoint(train_dir, *[0.2, 0.3, 0.4][:epoch])})
    asha.on_trial_add(None, _trial("t", {"epoch": 3, "val_top1": 0.4, "checkpoint_path": str(train_dir / "checkpoint_3")}))
    assert {m: dict(recorded) for m, recorded in asha._trial_info["t"]._rungs} == {4: {}, 2: {"t": 0.3}, 1: {"t": 0.2}}
