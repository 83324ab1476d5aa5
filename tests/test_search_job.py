"""End to end: `python -m jobs.search` on a real Ray head (`ray start`, dashboard and job server on
127.0.0.1) through `ray job submit`, 3 trials x 2 DDP workers (gloo), and every fault a search
meets, in one scenario (each trial costs about 20 s here before its first step):

1. the search first meets a cluster that cannot place its trial (issue 19's hang) and ends in one
   line;
2. its --resume runs: the first trial's loss explodes; a DDP worker of the second is killed
   mid-epoch 2; the search's driver is killed once epoch 2 is recorded everywhere;
3. a second --resume goes on, and the resumed trial's own driver is killed before it trains
   epoch 3; the search then ends, the third trial stopped by ASHA.

The tests below read that run. An interrupted CAM job: tests/test_slurm.py."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pytest

from helpers import ROOT, BackgroundJob, assert_quiet, descendants, in_process, run_job, write_config


@pytest.fixture(scope="module")
def ray_head():
    # Token auth on: the head and every client read ~/.ray/auth_token.
    # A short folder: Ray's unix sockets live under it, and AF_UNIX paths stop at 107 bytes
    # (pytest's tmp paths plus Ray's session name can pass that, depending on the PID).
    state = Path(tempfile.mkdtemp(prefix="cfray-", dir="/tmp"))
    env = {**os.environ, "RAY_STATE_DIR": str(state), "RAY_VENV": str(ROOT / ".venv"), "RAY_NUM_CPUS": "2", "RAY_AUTH_MODE": "token"}
    # Above the ports a local Ray's dashboard tries (8265 and the next 50): other tests' local Rays
    # may run at the same time (pytest-xdist).
    env["RAY_DASHBOARD_PORT"] = "8399"
    env.pop("RAY_ADDRESS", None)
    try:
        up = subprocess.run(["bash", "cluster/ray-head-up.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert up.returncode == 0, up.stderr
        yield up.stdout.strip(), env, int((state / "head.pid").read_text()), state
    finally:  # by PID, also when start-up failed half-way
        subprocess.run(["bash", "cluster/ray-head-down.sh"], cwd=ROOT, env=env, timeout=60)
        shutil.rmtree(state, ignore_errors=True)


# What the hang of issue 19 left on the cluster: a reservation that nothing uses and nothing frees.
HOLD = """
import sys, ray
from ray.util.placement_group import placement_group, get_placement_group, remove_placement_group
ray.init(address=sys.argv[1], namespace="cifarcam-tests")  # named groups live in a namespace
if sys.argv[2] == "hold":
    assert placement_group([{"CPU": 1}], lifetime="detached", name="leftover").wait(60)
else:
    remove_placement_group(get_placement_group("leftover"))
"""

# Three trials in grid order (2 CPUs: one at a time). SGD, so that lr 1e5 makes the loss infinite
# (Adam's steps do not grow with the gradient). The second trial meets every kill.
FAULTY_SEARCH = """
name: {name}
data:
  source: synthetic
  # the easy variant: these tests check plumbing and need a model that learns in seconds
  synthetic: {{num_classes: 10, train_size: 2000, test_size: 300, colours: per_class}}
train:
  model: resnet_tiny
  optimizer: sgd
  epochs: 3
  batch_size: 64
  lr: 0.05
  warmup_epochs: 0
search:
  grid:
    lr: [100000.0, 0.05, 0.000001]  # diverges; learns; cannot learn in one epoch: ASHA must stop it
  early_stopping: asha
  grace_period: 1
  reduction_factor: 2
  keep_checkpoints: 1
  worker_restarts: 2
  trial_restarts: 1
scaling:
  workers_per_trial: 2
  cpus_per_worker: 1
  start_timeout_s: 30
"""
GOOD = "00001"  # the trial that meets the faults


def _submit_command(address: str, *args: str) -> list[str]:
    ray = str(ROOT / ".venv" / "bin" / "ray")
    return [ray, "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--", "python", "-m", *args]


def _leftover(env: dict, action: str) -> None:
    proc = subprocess.run([sys.executable, "-c", HOLD, "127.0.0.1:6380", action], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _driver_log(state: Path, job: BackgroundJob) -> str:
    """What the submitted job's driver printed so far, read from its log on the head: `ray job
    submit` streams it on, seconds later under load, and a fault meant for one epoch would land
    in the next."""
    submitted = re.search(r"Job '(raysubmit_\w+)' submitted successfully", job.output())
    log = state / "ray" / "session_latest" / "logs" / f"job-driver-{submitted.group(1)}.log" if submitted else None
    return log.read_text(errors="replace") if log is not None and log.exists() else ""


def _committed(log: str, trial: str, epoch: int) -> bool:
    """The search printed ``trial``'s ``epoch``: Tune has its result (every callback, MLflow's
    included, ran before the progress line), so Train has registered the epoch's checkpoint."""
    return re.search(rf"search: trial \S+_{trial} (\(\S+\) )?epoch {epoch}:", log) is not None


def _registered(run: Path, trial: str, epoch: int) -> dict | None:
    """``epoch``'s entry in the history of ``trial``'s latest checkpoint that Train registered
    (each holds every epoch so far). Not any checkpoint folder on disk: a worker killed after
    writing one but before its report reached Train's controller leaves one that never counted."""
    for folder in (run / "train").glob(f"trial_*{trial}"):
        try:  # Train rewrites its snapshot in place, and deletes the checkpoint before the latest
            snapshot = json.loads((folder / "checkpoint_manager_snapshot.json").read_text())
            latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
            history = json.loads((folder / latest / "meta.json").read_text())["history"] if latest else []
        except (OSError, ValueError):
            return None
        return next((entry for entry in history if entry["epoch"] == epoch), None)
    return None


def _processes(head_pid: int, *kinds: str) -> set[int]:
    """The head's processes whose command line holds any of ``kinds`` (Ray names its actors'
    processes ``ray::RayTrainWorker``, ``ray::ImplicitFunc`` (Tune's trial driver), ...)."""
    return {pid for pid, cmd in descendants(head_pid).items() if any(kind in cmd for kind in kinds)}


def _search_driver(head_pid: int) -> int:
    """The job's entrypoint, the search's driver (not the shell that Ray's job supervisor may wrap it in)."""
    (pid,) = [pid for pid, cmd in descendants(head_pid).items() if "jobs.search" in cmd and cmd.split()[0].endswith(("python", "python3"))]
    return pid


@pytest.fixture(scope="module")
def search_run(ray_head, tmp_path_factory):
    """Half the head's CPUs are held by a placement group that nothing uses, so a trial of 2
    workers cannot be placed: Ray Train alone retries forever, silently (issue 19). The search must
    end within scaling.start_timeout_s (3 s) with one line. Once the CPUs are free, --resume (with
    a timeout of 30 s, the one setting a resume may change; with
    --mlflow: a real local tracking store, read back below) meets the faults of the module's
    docstring, and a second --resume runs it to the end."""
    address, env, head, state = ray_head
    folder = tmp_path_factory.mktemp("search")
    out = folder / "run"
    # The stall is judged at 3 s (the watch reads every 0.75 s); the resumes, on a cluster that Ray Train's worker restarts keep
    # busy, wait up to 30 s (the one setting a resume may change)
    stalling = folder / "stalling"
    stalling.mkdir()
    job = [
        "jobs.search",
        "--config",
        str(write_config(stalling, "small", FAULTY_SEARCH.replace("start_timeout_s: 30", "start_timeout_s: 3"))),
        "--out",
        str(out),
    ]
    resume = ["jobs.search", "--config", str(write_config(folder, "small", FAULTY_SEARCH)), "--out", str(out), "--resume"]
    resume += ["--mlflow", f"sqlite:///{folder}/mlflow.db"]
    _leftover(env, "hold")
    try:
        stalled = subprocess.run(_submit_command(address, *job), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        _leftover(env, "release")

    with BackgroundJob(folder / "resumed.log", command=_submit_command(address, *resume), env=env) as first:
        first.wait_for(lambda: _committed(_driver_log(state, first), GOOD, 1), "the second trial's first epoch")
        trained = {1: first.wait_for(lambda: _registered(out, GOOD, 1), "epoch 1's checkpoint")}
        workers, drivers = _processes(head, "RayTrainWorker"), _processes(head, "ImplicitFunc")
        assert len(workers) == 2 and len(drivers) == 1, descendants(head)
        time.sleep(0.5)  # into epoch 2 (an epoch takes about 4 s here)
        assert _registered(out, GOOD, 2) is None  # the kill lands in epoch 2, not after it
        victim = max(workers)
        os.kill(victim, signal.SIGKILL)
        # Train replaces the whole worker group: new worker processes appear...
        first.wait_for(lambda: _processes(head, "RayTrainWorker") - workers, "a replacement worker group")
        # ...under the same trial driver: Train restarted its workers, Tune did not restart the trial
        replaced_mid_trial = _processes(head, "ImplicitFunc") == drivers
        first.wait_for(lambda: _committed(_driver_log(state, first), GOOD, 2), "the replacement workers' epoch 2")
        trained[2] = first.wait_for(lambda: _registered(out, GOOD, 2), "epoch 2's checkpoint")
        # The search's driver dies, as in a crash, and with it the trial it ran (Ray would end
        # the dead driver's actors on its own schedule, meanwhile training on into epoch 3)
        os.kill(_search_driver(head), signal.SIGKILL)
        for pid in _processes(head, "ImplicitFunc", "TrainController", "RayTrainWorker"):
            os.kill(pid, signal.SIGKILL)
        first.finish()
    assert _registered(out, GOOD, 3) is None  # the resumed trial still has epoch 3 to train
    killed_at = time.time()
    finished = {p: p.stat().st_mtime for p in (out / "train").glob("trial_*00000/checkpoint_*")}
    trial_dirs = {p.name for p in (out / "train").glob("trial_*")}
    # The dead trial's placement group goes with its job; its processes must be gone first
    deadline = time.monotonic() + 120
    while _processes(head, "RayTrainWorker", "ImplicitFunc") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes(head, "RayTrainWorker", "ImplicitFunc"), descendants(head)

    with BackgroundJob(folder / "resumed-again.log", command=_submit_command(address, *resume), env=env) as second:
        # The resumed trial's driver (Tune's trainable, which owns the Train controller) dies:
        # Tune restarts the trial (search.trial_restarts), which goes on from its checkpoint.
        second.wait_for(lambda: _processes(head, "ImplicitFunc"), "the resumed trial's driver")
        os.kill(_processes(head, "ImplicitFunc").pop(), signal.SIGKILL)
        assert second.finish() == 0, second.output()[-5000:]
    faults = {
        "victim": victim,
        "replaced_mid_trial": replaced_mid_trial,
        "trained": trained,
        "killed_at": killed_at,
        "finished": finished,
        "trial_dirs": trial_dirs,
    }
    return out, stalled, first.output() + second.output(), second.output(), faults


def test_a_search_that_cannot_place_a_trial_ends_in_one_line(search_run):
    out, stalled, *_ = search_run
    assert stalled.returncode != 0, stalled.stdout[-4000:]
    # `ray job submit` streams the job's log, then repeats its tail when the job failed
    errors = sorted({line for line in stalled.stdout.splitlines() if line.startswith("error: ")})
    assert len(errors) == 1, stalled.stdout[-4000:]
    assert re.fullmatch(
        r"error: search: trial \w+ \(resnet_tiny\) could not place its 2 workers \(1 CPU each\) within scaling.start_timeout_s = 3 s; "
        r"the cluster has 2 CPU, 1 CPU free, 1 CPU reserved by 1 placement group; the search stopped .* then run again with --resume "
        r"\(with a longer scaling.start_timeout_s if placement is merely slow here\)",
        errors[0],
    ), errors[0]


def test_the_resumed_search_runs_through_ray_job_submit_with_a_quiet_terminal(search_run):
    out, stalled, resumed, last, _ = search_run
    assert "succeeded" in last.lower()
    assert_quiet(stalled.stdout + resumed, out)  # `ray job submit` streams the job's log: the project's lines
    assert "search: trial " in last
    ((n, completed),) = duckdb.sql(f"select count(*), count(*) filter (where status = 'completed') from '{out}/trials.parquet'").fetchall()
    assert n == 3 and completed == 1
    assert duckdb.sql(f"select count(*) from '{out}/predictions.parquet'").fetchall() == [(300,)]


def test_killed_worker_restarts_from_its_checkpoint_and_finishes(search_run):
    out, *_, faults = search_run
    assert not Path(f"/proc/{faults['victim']}").exists()
    assert faults["replaced_mid_trial"]
    # the second trial lost a worker, then its search driver, then its own driver: it completed
    epochs = duckdb.sql(f"select trial_id, list(epoch order by epoch) from '{out}/epochs.parquet' group by trial_id order by trial_id").fetchall()
    assert [e for _, e in epochs] == [[1], [1, 2, 3], [1]]
    # every epoch exactly once: the replacement workers went on from epoch 1's checkpoint, the
    # resumed and restarted trial from epoch 2's; an epoch trained again would have other timings
    stored = duckdb.sql(f"select epoch, epoch_time_s from '{out}/epochs.parquet' where trial_id like '%_{GOOD}' and epoch <= 2 order by epoch").fetchall()
    assert stored == [(epoch, faults["trained"][epoch]["epoch_time_s"]) for epoch in (1, 2)]


def test_nan_trial_fails_with_its_reason_and_the_search_goes_on(search_run):
    out, _, resumed, *_ = search_run
    ((lr, status, epochs_run, error, best),) = duckdb.sql(
        f"select lr, status, epochs_run, error, best_checkpoint from '{out}/trials.parquet' where lr > 1000"
    ).fetchall()
    assert (lr, status, epochs_run) == (100000.0, "diverged", 1)
    assert error.startswith("diverged: training loss ") and error.endswith(" at epoch 1") and ("nan" in error or "inf" in error)
    assert best is None
    assert "diverged" in resumed  # the search's summary table reports it
    # the next trials ran, and the test-set evaluation skipped the diverged one
    assert duckdb.sql(f"select count(*) from '{out}/accuracy.parquet'").fetchall() == [(1,)]


def test_killed_driver_resumes_without_rerunning_finished_trials(search_run):
    out, *_, faults = search_run
    assert len(faults["trial_dirs"]) == 2 and faults["finished"]
    # the finished (diverged) trial was not rerun: its checkpoint is the one from before the kill
    assert {p: p.stat().st_mtime for p in (out / "train").glob("trial_*00000/checkpoint_*")} == faults["finished"]
    assert all(mtime < faults["killed_at"] for mtime in faults["finished"].values())
    # the same experiment went on (same trial ids), the interrupted trial from its checkpoint
    trial_dirs = {p.name for p in (out / "train").glob("trial_*")}
    assert faults["trial_dirs"] < trial_dirs and len({name.rsplit("_", 1)[0] for name in trial_dirs}) == 1
    assert {f"trial_{t}" for (t,) in duckdb.sql(f"select distinct trial_id from '{out}/epochs.parquet'").fetchall()} == trial_dirs


def test_search_writes_every_table_and_the_provenance(search_run):
    out, *_ = search_run
    for name in ("trials", "epochs", "accuracy", "predictions"):
        assert (out / f"{name}.parquet").is_file(), name
    assert "name: small" in (out / "config.yaml").read_text()
    versions = json.loads((out / "versions.json").read_text())
    assert versions["ray"].startswith("2.") and versions["torch"] and versions["git"]


def test_tensorboard_holds_every_trials_epochs_in_the_run_folder(search_run):
    """`tensorboard --logdir <run>/tensorboard` shows what epochs.parquet holds, read back here
    with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, *_ = search_run
    rows = duckdb.sql(f"select trial_id, epoch, val_top1, train_loss from '{out}/epochs.parquet' order by trial_id, epoch").fetchall()
    assert rows and {p.name for p in (out / "tensorboard").iterdir()} == {f"trial_{t}" for t, *_ in rows}
    for trial in {t for t, *_ in rows}:
        events = EventAccumulator(str(out / "tensorboard" / f"trial_{trial}"))
        events.Reload()
        assert {"val_top1", "train_loss", "lr"} <= set(events.Tags()["scalars"])
        logged = [(e.step, e.value) for e in events.Scalars("val_top1")]
        expected = [(epoch, top1) for t, epoch, top1, _ in rows if t == trial]
        assert [s for s, _ in logged] == [e for e, _ in expected]
        assert all(abs(a - b) < 1e-6 for (_, a), (_, b) in zip(logged, expected))


def test_mlflow_holds_every_trials_parameters_epochs_and_the_best_test_accuracy(search_run):
    """Read back with MLflow's own client from the sqlite store the job was given."""
    from mlflow.tracking import MlflowClient

    out, *_ = search_run
    client = MlflowClient(tracking_uri=f"sqlite:///{out.parent}/mlflow.db")
    experiment = client.get_experiment_by_name("small")
    runs = {r.data.tags["cifarcam.trial_id"]: r for r in client.search_runs([experiment.experiment_id])}
    trials = duckdb.sql(f"select trial_id, lr, status from '{out}/trials.parquet'").fetchall()
    assert set(runs) == {t for t, _, _ in trials}
    for trial_id, lr, _ in trials:
        run = runs[trial_id]
        assert float(run.data.params["lr"]) == lr and run.data.params["model"] == "resnet_tiny" and run.info.status == "FINISHED"
        epochs = duckdb.sql(f"select epoch, val_top1 from '{out}/epochs.parquet' where trial_id = ? order by epoch", params=[trial_id]).fetchall()
        logged = [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, "val_top1"), key=lambda m: m.step)]
        assert [s for s, _ in logged] == [e for e, _ in epochs] and all(abs(a - b) < 1e-6 for (_, a), (_, b) in zip(logged, epochs))
    ((best, top1),) = duckdb.sql(f"select trial_id, test_top1 from '{out}/accuracy.parquet'").fetchall()
    assert abs(runs[best].data.metrics["test_top1"] - top1) < 1e-6 and runs[best].data.tags["cifarcam.best_of_family"] == "resnet_tiny"
    assert not any("test_top1" in r.data.metrics for t, r in runs.items() if t != best)


def test_asha_stops_the_hopeless_trial_and_keeps_the_good_one(search_run):
    out, *_ = search_run
    rows = duckdb.sql(f"select lr, status, stopped_by_asha, epochs_run, best_val_top1 from '{out}/trials.parquet' order by lr desc").fetchall()
    assert len(rows) == 3
    (good_lr, good_status, good_stopped, good_epochs, good_acc), (bad_lr, bad_status, bad_stopped, bad_epochs, bad_acc) = rows[1:]
    assert (good_lr, good_status, good_stopped, good_epochs) == (0.05, "completed", False, 3)
    assert (bad_lr, bad_status, bad_stopped, bad_epochs) == (0.000001, "stopped_early", True, 1)
    assert good_acc > 0.5 > bad_acc


def test_epochs_agree_with_trials_and_ran_on_two_ddp_workers(search_run):
    out, *_ = search_run
    mismatches = duckdb.sql(
        f"""
        select t.trial_id, t.epochs_run, count(e.epoch) as n, max(e.val_top1) as best, t.best_val_top1
        from '{out}/trials.parquet' t left join '{out}/epochs.parquet' e using (trial_id)
        group by all having n != t.epochs_run or abs(best - t.best_val_top1) > 1e-12
        """
    ).fetchall()
    assert mismatches == []
    assert duckdb.sql(f"select distinct workers from '{out}/epochs.parquet'").fetchall() == [(2,)]
    ranked = duckdb.sql(f"select count(*) from '{out}/trials.parquet' where metric != 'val_top1' or best_metric != best_val_top1").fetchall()
    assert ranked == [(0,)]


def test_accuracy_and_predictions_agree(search_run):
    out, *_ = search_run
    ((model, test_top1, params, ckpt),) = duckdb.sql(f"select model, test_top1, params, checkpoint from '{out}/accuracy.parquet'").fetchall()
    assert model == "resnet_tiny" and params > 100_000 and test_top1 > 0.5
    assert ckpt.startswith("train/trial_")  # relative to the run folder: a moved or copied run finds its own
    ckpt = Path(out) / ckpt
    ((n, acc, distinct),) = duckdb.sql(f"select count(*), avg(correct::int), count(distinct image_index) from '{out}/predictions.parquet'").fetchall()
    assert n == distinct == 300 and acc == pytest.approx(test_top1)
    assert duckdb.sql(f"select count(*) from '{out}/predictions.parquet' where (pred = label) != correct or top5[1] != pred").fetchall() == [(0,)]
    assert {p.name for p in Path(ckpt).iterdir()} >= {"model.pt", "meta.json", "train_state.pt"}


def test_checkpoint_rebuilds_from_its_meta_alone(search_run):
    from cifarcam.training.checkpoint import load_model

    out, *_ = search_run
    ckpt = duckdb.sql(f"select checkpoint from '{out}/accuracy.parquet'").fetchall()[0][0]
    model, meta = load_model(Path(out) / ckpt)
    assert meta["model"] == {"family": "resnet_tiny", "num_classes": 10, "stem": "cifar", "input_size": 32}
    assert meta["class_names"][:2] == ["square", "disk"]


def test_rerun_without_resume_refuses_and_leaves_the_run_untouched(search_run, tmp_path, capsys):
    out, *_ = search_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    proc = in_process(capsys, "jobs.search", "--config", str(write_config(tmp_path)), "--out", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --out {out}: already holds search 'small'; pass --resume to continue it, or choose another --out"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


HOPELESS_SEARCH = """
name: {name}
data: {{source: synthetic, synthetic: {{num_classes: 4, train_size: 400, test_size: 40, colours: per_class}}}}
train: {{model: resnet_tiny, optimizer: sgd, lr: 1e12, weight_decay: 0.0, epochs: 2, batch_size: 64}}
search: {{early_stopping: none}}
scaling: {{workers_per_trial: 1}}
"""


def test_a_search_without_a_usable_trial_fails_in_one_line_and_still_reports(tmp_path, capsys):
    """Every trial diverges: the pipeline stops after the search with a non-zero status and one
    line naming why, and the report of the run shows each trial's failure instead of crashing."""
    out = tmp_path / "run"
    # --verbose: Ray's own lines stay on the terminal (the quiet default is tested on the demo)
    proc = run_job("jobs.pipeline", "--config", str(write_config(tmp_path, "hopeless", HOPELESS_SEARCH)), "--out", str(out), "--num-cpus", "2", "--verbose")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    # With --verbose, Ray's log monitor streams the workers' lines on its own schedule: one can come
    # after the job's error line (seen in CI: "(run_trial pid=1524) SystemExit: 1"). One error line.
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: search: no trial produced a usable checkpoint (1 trial: 1 diverged); first failure: trial ")
    assert line.endswith(f"(resnet_tiny): diverged: training loss nan at epoch 1; see {out / 'trials.parquet'}")
    assert duckdb.sql(f"select status, best_checkpoint from '{out}/trials.parquet'").fetchall() == [("diverged", None)]
    assert duckdb.sql(f"select count(*) from '{out}/accuracy.parquet'").fetchall() == [(0,)]
    assert not (out / "cams").exists()  # nothing was explained
    assert "Reporting training result" in proc.stdout + proc.stderr and "Ray's logs:" not in proc.stdout and not (out / "logs").exists()

    report = in_process(capsys, "jobs.report", "--run", str(out))  # no Ray: no interpreter of its own
    assert report.returncode == 0, report.stderr[-3000:]
    text = (out / "report" / "report.md").read_text()
    assert "## The search produced no usable trial" in text and "diverged: training loss nan at epoch 1" in text


# Ray's own clients inside a cluster, asked with no address, as Ray Train's PlacementGroupCleaner
# asks the state API whether a trial's controller still lives.
ASK_FROM_INSIDE = """
import argparse, json, ray
from jobs.common import connect_ray
connect_ray(argparse.Namespace(address=None, num_cpus=1, num_gpus=None, verbose=True))

@ray.remote(num_cpus=0)
def nodes_seen_from_inside():
    from ray.util.state import list_nodes
    return [node.node_id for node in list_nodes()]

print(json.dumps({"own": ray.get_runtime_context().get_node_id(), "seen": ray.get(nodes_seen_from_inside.remote())}))
"""


def test_a_local_job_beside_another_cluster_asks_its_own(ray_head):
    """Two Ray clusters on one host, the module's head and a job's local Ray: inside the job's,
    a client with no address reaches the job's cluster. Without RAY_ADDRESS in its processes it
    reaches the head that `ray start` registered last (or fails on "multiple active Ray
    instances"), and a trial stopped mid-shutdown keeps its CPUs (README, "make test")."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", ASK_FROM_INSIDE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["seen"] == [seen["own"]]
