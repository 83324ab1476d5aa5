"""Kill tests on a real local Ray: a Train worker dies, a trial's driver dies, the search driver
dies, a trial's loss goes NaN. Nothing already computed is lost, and a rerun finishes the work.
A killed CAM job: tests/test_cam_concurrency.py."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import duckdb
import pytest

from helpers import BackgroundJob, descendants, write_config

# Two trials in grid order (2 CPUs: one at a time): one whose loss explodes, then a good one that
# meets every other fault. Two, not one per fault: each trial costs about 35 s here before its
# first step (README, "make test").
FAULTS = """
name: {name}
data:
  source: synthetic
  synthetic: {{num_classes: 10, train_size: 2000, test_size: 200, colours: per_class}}  # plumbing: learns in seconds
train:
  model: resnet_tiny
  optimizer: sgd
  epochs: 3
  batch_size: 64
  lr: 0.05
  warmup_epochs: 0
search:
  grid:
    lr: [100000.0, 0.05]
  early_stopping: none
  keep_checkpoints: 1
  worker_restarts: 2
  trial_restarts: 1
scaling:
  workers_per_trial: 2
  cpus_per_worker: 1
"""


def _trials(run: Path) -> list[tuple]:
    return duckdb.sql(f"select lr, status, epochs_run from '{run}/trials.parquet' order by trial_id").fetchall()


def _epochs(run: Path) -> list[tuple]:
    return duckdb.sql(f"select trial_id, list(epoch order by epoch) from '{run}/epochs.parquet' group by trial_id order by trial_id").fetchall()


def _checkpoints(run: Path, trial: str = "*") -> list[Path]:
    return sorted((run / "train").glob(f"trial_*{trial}/checkpoint_*"))


def _committed(job: BackgroundJob, trial: str, epoch: int) -> bool:
    """The search printed ``trial``'s ``epoch``: Tune has its result, so Train has registered the
    epoch's checkpoint (a checkpoint folder on disk alone may not be registered yet)."""
    return re.search(rf"search: trial \S+_{trial} (\(\S+\) )?epoch {epoch}:", job.output()) is not None


def _history(run: Path, trial: str, epoch: int) -> dict:
    """``epoch``'s entry in the history that ``trial``'s checkpoints carry (each holds every epoch so far)."""
    for folder in _checkpoints(run, trial):
        try:
            history = json.loads((folder / "meta.json").read_text())["history"]
        except OSError:  # the previous checkpoint, deleted under the glob (keep_checkpoints)
            continue
        found = [entry for entry in history if entry["epoch"] == epoch]
        if found:
            return found[0]
    raise AssertionError(f"no checkpoint of trial {trial} holds epoch {epoch}")


def _processes(job: BackgroundJob, kind: str) -> set[int]:
    return {pid for pid, cmd in descendants(job.proc.pid).items() if kind in cmd}


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    """One search through every fault, in order: the first trial's loss explodes; a DDP worker of
    the second trial is killed mid-epoch 2; the search driver (with its local Ray) is killed once the
    replacement workers' epoch 2 is registered; the search is resumed, and the resumed trial's own
    driver is killed before it trains epoch 3."""
    folder = tmp_path_factory.mktemp("faults")
    run = folder / "run"
    config = write_config(folder, "faults", FAULTS)
    search = ["jobs.search", "--config", str(config), "--out", str(run), "--num-cpus", "2"]
    with BackgroundJob(folder / "job.log", *search) as job:
        job.wait_for(lambda: _committed(job, "00001", 1), "the second trial's first epoch")
        trained = {1: _history(run, "00001", 1)}
        workers, drivers = _processes(job, "RayTrainWorker"), _processes(job, "ImplicitFunc")
        assert len(workers) == 2 and len(drivers) == 1, descendants(job.proc.pid)
        time.sleep(0.5)  # into epoch 2 (an epoch takes about 7 s here)
        victim = max(workers)
        os.kill(victim, signal.SIGKILL)
        # Train replaces the whole worker group: new worker processes appear...
        job.wait_for(lambda: _processes(job, "RayTrainWorker") - workers, "a replacement worker group")
        # ...under the same trial driver: Train restarted its workers, Tune did not restart the trial
        replaced_mid_trial = _processes(job, "ImplicitFunc") == drivers
        job.wait_for(lambda: _committed(job, "00001", 2), "the replacement workers' epoch 2")
        trained[2] = _history(run, "00001", 2)
        job.kill()  # the search driver and the local Ray it started, as a crash would
    killed_at = time.time()
    finished = {p: p.stat().st_mtime for p in _checkpoints(run, "00000")}
    trial_dirs = {p.name for p in (run / "train").glob("trial_*")}
    first_log = job.output()

    with BackgroundJob(folder / "resumed.log", *search, "--resume") as resumed:
        # The resumed trial's driver (Tune's trainable, which owns the Train controller) dies:
        # Tune restarts the trial (search.trial_restarts), which goes on from its checkpoint.
        resumed.wait_for(lambda: _processes(resumed, "ImplicitFunc"), "the resumed trial's driver")
        os.kill(_processes(resumed, "ImplicitFunc").pop(), signal.SIGKILL)
        assert resumed.finish() == 0, resumed.output()[-5000:]
        return run, victim, replaced_mid_trial, trained, first_log + resumed.output(), killed_at, finished, trial_dirs


def test_killed_worker_restarts_from_its_checkpoint_and_finishes(faulty_run):
    run, victim, replaced_mid_trial, trained, *_ = faulty_run
    assert not Path(f"/proc/{victim}").exists()
    assert replaced_mid_trial
    diverged, good = _trials(run)
    # the second trial lost a worker, then its search driver, then its own driver: it completed
    assert good == (0.05, "completed", 3)
    assert [epochs for _, epochs in _epochs(run)] == [[1], [1, 2, 3]]
    # every epoch exactly once: the replacement workers went on from epoch 1's checkpoint, the
    # resumed and restarted trial from epoch 2's; an epoch trained again would have other timings
    stored = duckdb.sql(f"select epoch, epoch_time_s from '{run}/epochs.parquet' where trial_id like '%_00001' and epoch <= 2 order by epoch").fetchall()
    assert stored == [(epoch, trained[epoch]["epoch_time_s"]) for epoch in (1, 2)]
    assert duckdb.sql(f"select min(best_val_top1) from '{run}/trials.parquet' where status = 'completed'").fetchall()[0][0] > 0.3


def test_nan_trial_fails_with_its_reason_and_the_search_goes_on(faulty_run):
    run, _, _, _, log, *_ = faulty_run
    ((lr, status, epochs_run, error, best),) = duckdb.sql(
        f"select lr, status, epochs_run, error, best_checkpoint from '{run}/trials.parquet' where lr > 1000"
    ).fetchall()
    assert (lr, status, epochs_run) == (100000.0, "diverged", 1)
    assert error.startswith("diverged: training loss ") and error.endswith(" at epoch 1") and ("nan" in error or "inf" in error)
    assert best is None
    assert "diverged" in log  # the search's summary table reports it
    # the next trial ran, and the test-set evaluation skipped the diverged one
    assert duckdb.sql(f"select count(*) from '{run}/accuracy.parquet'").fetchall() == [(1,)]


def test_killed_driver_resumes_without_rerunning_finished_trials(faulty_run):
    run, *_, killed_at, finished, trial_dirs = faulty_run
    assert len(trial_dirs) == 2 and finished
    # the finished (diverged) trial was not rerun: its checkpoint is the one from before the kill
    assert {p: p.stat().st_mtime for p in _checkpoints(run, "00000")} == finished
    assert all(mtime < killed_at for mtime in finished.values())
    # the same experiment went on (same trial ids), the interrupted trial from its checkpoint
    assert {p.name for p in (run / "train").glob("trial_*")} == trial_dirs
    assert {f"trial_{t}" for t, _ in _epochs(run)} == trial_dirs
