"""Tune results -> table rows, without a cluster."""

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler
from torch import nn

from cifarcam.search.best_trials import best_per_model
from cifarcam.search.resumable_asha import ResumableASHA
from cifarcam.search_tables import TrialRow
from cifarcam.training.checkpoint import save_checkpoint
from cifarcam.training.models import ModelSpec

_ROW = TrialRow(
    trial_id="",
    model="resnet_tiny",
    optimizer="adamw",
    scheduler="cosine",
    lr=0.1,
    weight_decay=0.0,
    batch_size=64,
    hyperparameters="{}",
    status="completed",
    error=None,
    epochs_run=2,
    epochs_planned=2,
    stopped_by_asha=False,
    metric="val_loss",
    best_metric=None,
    best_val_top1=None,
    best_epoch=2,
    best_checkpoint=None,
    time_s=1.0,
)


def _trial(trial_id: str, val_loss: float, val_top1: float) -> TrialRow:
    return dataclasses.replace(_ROW, trial_id=trial_id, best_checkpoint=f"/ckpt/{trial_id}", best_metric=val_loss, best_val_top1=val_top1)


def test_the_best_trial_follows_the_configured_metric_and_mode():
    """metric: val_loss, mode: min must pick the lowest loss, not the lowest accuracy."""
    low_loss, high_loss = _trial("a", val_loss=0.4, val_top1=0.6), _trial("b", val_loss=0.9, val_top1=0.5)
    assert best_per_model([high_loss, low_loss], "min") == [low_loss]
    assert best_per_model([low_loss, high_loss], "max") == [high_loss]


# ---------------------------------------------------------------------------------------------
# ASHA judges a resumed trial at the rung of its epoch


def _asha_decisions(reports: list[tuple[str, int, float]]) -> list[str]:
    """Feed (trial, epoch, val_top1) reports, each tagged with the training_iteration Tune would
    give it, to the search's ASHA scheduler; return its decisions."""
    from types import SimpleNamespace

    from cifarcam.config import ExperimentConfig, SearchConfig, TrainConfig
    from cifarcam.search.tuner import early_stopper

    cfg = ExperimentConfig(train=TrainConfig(epochs=4), search=SearchConfig(grace_period=1, reduction_factor=2))
    asha = early_stopper(cfg)
    asha.set_search_properties("val_top1", "max")
    trials, iterations, decisions = {}, {}, []
    for name, epoch, top1 in reports:
        if name not in trials:
            trials[name] = SimpleNamespace(trial_id=name, has_reported_at_least_once=False)
            asha.on_trial_add(None, trials[name])
        iterations[name] = iterations.get(name, 0) + 1  # Tune's count: restarts at 1 for a new driver
        result = {"epoch": epoch, "training_iteration": iterations[name], "val_top1": top1}
        decisions.append(asha.on_trial_result(None, trials[name], result))
    return decisions


def test_a_resumed_trial_is_judged_at_the_rung_of_its_epoch():
    """Two trials reach the epoch-1 and epoch-2 rungs. The third reports 0.4 at epoch 2, which is
    below the epoch-2 rung and above the epoch-1 rung: uninterrupted, it stops there. Resumed after a
    crash (its first report since the restart is epoch 3, Tune's iteration 1, and the rungs lost
    its earlier entries), it must stop too, not be compared with the epoch-1 rung and go on."""
    rungs = [("a", 1, 0.2), ("b", 1, 0.2), ("a", 2, 0.6), ("b", 2, 0.6)]
    uninterrupted = _asha_decisions(rungs + [("c", 1, 0.3), ("c", 2, 0.4)])
    resumed = _asha_decisions(rungs + [("c", 3, 0.4)])
    assert uninterrupted[-1] == "STOP" and uninterrupted[-2] == "CONTINUE"
    assert resumed[-1] == "STOP"


# ---------------------------------------------------------------------------------------------
# After a restart, ASHA's rungs are refilled from the checkpoints: a resumed trial's first result
# comes at epoch k+1 (or at max_t), and Ray forgets the rungs (ray-project/ray#30838). End to end
# (a SLURM requeue mid-search): test_slurm.


def _asha(max_t: int = 4) -> ResumableASHA:
    return ResumableASHA(time_attr="epoch", metric="val_top1", mode="max", max_t=max_t, grace_period=1, reduction_factor=2)


def _tune_trial(trial_id: str, last_result: dict | None = None) -> SimpleNamespace:
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
    good, weak = _tune_trial("good"), _tune_trial("weak")
    asha.on_trial_add(None, good)
    asha.on_trial_add(None, weak)
    checkpoint = _checkpoint(tmp_path / "trial_good", 0.40, 0.78)
    assert asha.on_trial_result(None, good, {"epoch": 2, "val_top1": 0.78, "checkpoint_path": checkpoint}) == TrialScheduler.STOP  # done
    assert asha.on_trial_result(None, weak, {"epoch": 1, "val_top1": 0.10}) == TrialScheduler.STOP


def test_a_restored_trials_checkpoint_refills_the_rungs(tmp_path):
    """A trial that finished before the crash is only restored, never run again."""
    asha = _asha()
    checkpoint = _checkpoint(tmp_path / "trial_good", 0.40, 0.55)
    asha.on_trial_add(None, _tune_trial("good", {"epoch": 2, "val_top1": 0.55, "checkpoint_path": checkpoint}))
    weak = _tune_trial("weak")
    asha.on_trial_add(None, weak)
    assert asha.on_trial_result(None, weak, {"epoch": 1, "val_top1": 0.45}) == TrialScheduler.CONTINUE  # above 0.40
    assert asha.on_trial_result(None, weak, {"epoch": 2, "val_top1": 0.30}) == TrialScheduler.STOP  # below 0.55


def test_a_milestone_a_restart_skipped_is_judged_when_the_trial_reports_again(tmp_path):
    """Tune saw epoch 1 before the crash, Train checkpointed epoch 2 too: the restored trial's
    first result is epoch 3. Its epoch 2 (below the rung) must stop it, as it would have."""
    asha = _asha()
    good = _tune_trial("good")
    asha.on_trial_add(None, good)
    for epoch, value in ((1, 0.5), (2, 0.9)):
        asha.on_trial_result(None, good, {"epoch": epoch, "val_top1": value})
    checkpoint = _checkpoint(tmp_path / "trial_weak", 0.6, 0.3)
    weak = _tune_trial("weak", {"epoch": 1, "val_top1": 0.6, "checkpoint_path": checkpoint})
    asha.on_trial_add(None, weak)  # restored: epoch 1 is recorded, epoch 2 is not (Tune never saw it)
    assert asha.on_trial_result(None, weak, {"epoch": 3, "val_top1": 0.95, "checkpoint_path": checkpoint}) == TrialScheduler.STOP


def test_without_a_checkpoint_a_trial_meets_empty_rungs():
    """Plain ASHA after a restart: the first result at each rung always continues."""
    asha = _asha()
    asha.on_trial_add(None, _tune_trial("good", {"epoch": 2, "val_top1": 0.55}))
    weak = _tune_trial("weak")
    asha.on_trial_add(None, weak)
    assert asha.on_trial_result(None, weak, {"epoch": 1, "val_top1": 0.01}) == TrialScheduler.CONTINUE


def test_an_unbroken_trial_is_recorded_once_per_rung(tmp_path):
    """Every epoch's result carries the history of the ones before; nothing is counted twice, and
    a trial added again (Tune does after each error) keeps its entries."""
    asha = _asha()
    trial = _tune_trial("t")
    asha.on_trial_add(None, trial)
    train_dir = tmp_path / "trial_t"
    for epoch, value in enumerate([0.2, 0.3, 0.4], 1):
        asha.on_trial_result(None, trial, {"epoch": epoch, "val_top1": value, "checkpoint_path": _checkpoint(train_dir, *[0.2, 0.3, 0.4][:epoch])})
    asha.on_trial_add(None, _tune_trial("t", {"epoch": 3, "val_top1": 0.4, "checkpoint_path": str(train_dir / "checkpoint_3")}))
    assert {m: dict(recorded) for m, recorded in asha._trial_info["t"]._rungs} == {4: {}, 2: {"t": 0.3}, 1: {"t": 0.2}}


# ---------------------------------------------------------------------------------------------
# A trial that reported nothing to Tune is read from its checkpoints


def test_a_trial_without_reports_falls_back_to_its_checkpoints(tmp_path):
    """Its driver died after the last epoch; the restarted driver found nothing left to run and
    reported nothing. The trial is still completed, with its epochs and best checkpoint."""
    from types import SimpleNamespace

    from cifarcam.config import ExperimentConfig, SearchConfig, TrainConfig
    from cifarcam.search.tune_rows import trial_rows
    from cifarcam.training.checkpoint import save_checkpoint
    from cifarcam.training.models import ModelSpec, build_model

    spec = ModelSpec("resnet_tiny", 10)
    model = build_model(spec)
    history = []
    trial_dir = tmp_path / "train" / "trial_abcde_00000"
    for epoch, top1 in ((1, 0.5), (2, 0.7), (3, 0.6)):
        history.append(
            {
                "epoch": epoch,
                "train_loss": 1.0,
                "val_loss": 1.0,
                "val_top1": top1,
                "val_top5": 0.9,
                "images_per_s": 100.0,
                "lr": 0.1,
                "epoch_time_s": 2.0,
                "diverged": False,
                "workers": 1,
                "nodes": 1,
            }
        )
        if epoch != 1:  # Train kept the best two
            save_checkpoint(trial_dir / f"checkpoint_{epoch:06d}", model, spec, {"history": list(history)}, epoch=epoch)
    cfg = ExperimentConfig(train=TrainConfig(model="resnet_tiny", epochs=3), search=SearchConfig(early_stopping="none"))
    silent = SimpleNamespace(metrics={}, metrics_dataframe=None, config={}, error=None, path=str(tmp_path / "tune" / "x" / "trial_abcde_00000"))

    (trial,), epochs = trial_rows([silent], cfg, tmp_path / "train")
    assert (trial.trial_id, trial.status, trial.epochs_run, trial.best_epoch) == ("abcde_00000", "completed", 3, 2)
    assert trial.best_checkpoint == str(trial_dir / "checkpoint_000002")
    assert [(e.epoch, e.checkpoint_path) for e in epochs] == [(1, None), (2, str(trial_dir / "checkpoint_000002")), (3, str(trial_dir / "checkpoint_000003"))]


# ---------------------------------------------------------------------------------------------
# --resume unpickles the search's state: only from files no one else could have written


def test_resume_refuses_state_that_others_can_write(tmp_path):
    from cifarcam.errors import UserError
    from cifarcam.search.tuner import check_private

    experiment = tmp_path / "tune" / "demo"
    (experiment / "trial_1").mkdir(parents=True)
    for name in ("tuner.pkl", "experiment_state-2026.json", "trial_1/result.json"):
        (experiment / name).write_bytes(b"")
        (experiment / name).chmod(0o644)
    experiment.chmod(0o755)
    check_private(experiment)  # this user's, writable by no one else
    (experiment / "trial_1" / "result.json").chmod(0o666)  # not unpickled on resume: not judged
    check_private(experiment)
    (experiment / "tuner.pkl").chmod(0o646)
    with pytest.raises(UserError, match=r"^--resume: .*/tuner\.pkl is writable by others \(mode -rw-r--rw-\), and resuming unpickles"):
        check_private(experiment)
    (experiment / "tuner.pkl").chmod(0o644)
    experiment.chmod(0o777)
    with pytest.raises(UserError, match=r"is writable by others \(mode drwxrwxrwx\)"):
        check_private(experiment)
