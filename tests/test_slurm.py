"""`python -m cluster.slurm` against a real SLURM (Debian's slurmctld, two slurmd nodes, munge,
slurmdbd on MariaDB), started here and stopped by PID; and `python -m cluster.ray_on_env`, the
same Ray bootstrap started with plain RANK / WORLD_SIZE / MASTER_ADDR in those nodes' namespaces.

Each node's slurmd runs in its own network namespace with its own address (10.77.0.1 and
10.77.0.2, veth pairs on a bridge), its own host name, and an /etc/hosts that maps that name to
127.0.1.1, as Debian and Ubuntu install it. So the Ray head/worker rendezvous, the GCS, object
transfers between nodes and the Gloo rendezvous of a trial's two DDP workers all cross addresses,
as on real hosts. What this proves: the launcher's sbatch/srun path, that rendezvous, the driver's
exit status, and requeue + resume. It does not prove NCCL (no GPUs) or a real network's latency.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from helpers import ROOT, SMALL_SEARCH, BackgroundJob, in_process, run_job, write_config

STATE = Path("/tmp/cifarcam-slurm")
SLURM_ENV = {**os.environ, "SLURM_STATE_DIR": str(STATE), "SLURM_NODES": "2", "SLURM_NETNS": "1"}
LAUNCH = [sys.executable, "-m", "cluster.slurm", "--nodes", "2", "--cpus-per-task", "1", "--time", "15", "--object-store-memory", str(300 << 20)]
PIPELINE = ["--layers", "layer2", "--targets", "pred", "--faithfulness-steps", "2", "--faithfulness-images", "16", "--sanity-images", "8"]


@pytest.fixture(scope="module")
def slurm() -> None:
    """Two SLURM nodes of one CPU each, in two network namespaces (root and apt needed; CI requires them)."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        if os.environ.get("CIFARCAM_REQUIRE_SLURM"):
            pytest.fail("a local SLURM needs root and apt-get", pytrace=False)
        pytest.skip("a local SLURM needs root and apt-get")
    up = subprocess.run(["bash", str(ROOT / "cluster/slurm-up.sh")], env=SLURM_ENV, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stderr[-3000:]
    yield
    subprocess.run(["bash", str(ROOT / "cluster/slurm-down.sh")], env=SLURM_ENV, capture_output=True, timeout=300)


LAUNCHED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _nothing_left_running():
    """A failed test leaves no launcher and no SLURM job behind to block the next one."""
    yield
    for proc in LAUNCHED:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    LAUNCHED.clear()
    if shutil.which("squeue") and (STATE / "run" / "slurmctld.pid").exists():
        queued = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True).stdout.split()
        if queued:
            subprocess.run(["scancel", *queued])
            deadline = time.monotonic() + 60
            while subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip() and time.monotonic() < deadline:
                time.sleep(1)


def _popen(cmd: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    LAUNCHED.append(proc)
    return proc


# SMALL_SEARCH (tests/helpers.py), explained on 100 test images instead of 300: what runs on
# SLURM is the rendezvous, the requeue and the resume, not the CAM stage's volume.
SLURM_SEARCH = SMALL_SEARCH.replace("test_size: 300", "test_size: 100")
TEST_IMAGES = 100


def _launch(tmp_path: Path, config: Path | None = None) -> subprocess.Popen:
    config = config or write_config(tmp_path, text=SLURM_SEARCH)
    return _popen([*LAUNCH, "--logs", str(tmp_path / "logs"), "--", "--config", str(config), "--out", str(tmp_path / "run"), *PIPELINE])


def _job_id(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    match = re.match(r"submitted job (\d+) ", line)
    assert match, line + proc.stderr.read()
    return match.group(1)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return out, err


def _any(folder: Path, pattern: str) -> bool:
    try:
        return bool(list(folder.glob(pattern)))
    except OSError:  # Ray Train creates and deletes folders under the glob
        return False


def _sacct_state(job_id: str) -> str:
    return subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "State"], capture_output=True, text=True).stdout.strip()


def test_each_node_finds_its_own_address_although_its_name_resolves_to_loopback(slurm):
    """What the Ray nodes bind to and announce: SLURM's NodeAddr, not gethostbyname(hostname)."""
    probe = (
        "import socket; from cluster.ray_bootstrap import node_ip, collective_interfaces as c; from cluster.ray_on_slurm import slurm_node_addr; "
        "ip = node_ip(node_addr=slurm_node_addr(), nodes=2); print(socket.gethostname(), socket.gethostbyname(socket.gethostname()), ip, c(ip).get('GLOO_SOCKET_IFNAME'))"
    )
    proc = subprocess.run(["srun", "-N2", "-n2", "--time", "2", sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split("\n")[:2]) == ["vnode1 127.0.1.1 10.77.0.1 eth0", "vnode2 127.0.1.1 10.77.0.2 eth0"]


def _copy_run(demo_run: Path, tmp_path: Path, *leave_out: str) -> Path:
    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("report", ".staging", "logs", *leave_out))
    return run


def _markers(run: Path, model: str, method: str) -> dict[str, int]:
    """Each complete partition's marker of ``model`` and ``method``, and when it was written."""
    return {p.parent.parent.name: p.stat().st_mtime_ns for p in (run / "cams" / f"model={model}").glob(f"layer=*/method={method}/_COMPLETE.json")}


def _published(run: Path, model: str, methods: tuple[str, ...]) -> dict[tuple[str, str], int]:
    """{(layer folder, method): when its marker was written} for ``model``'s complete partitions."""
    return {(layer, method): mtime for method in methods for layer, mtime in _markers(run, model, method).items()}


def test_two_cam_jobs_on_one_run_one_requeued_mid_stage_lose_nothing_and_recompute_nothing(slurm, demo_run, tmp_path):
    """CAM jobs on one run folder as users start them: `cluster.slurm cam` explains every model of a
    finished demo run (its search's checkpoints; its maps left out) with two methods on two nodes
    (the Ray head on one, a worker at its own address on the other). Once its first model is
    published, a second job on this host (its own local Ray) starts on the second model's
    checkpoint with another method, one published partition goes missing (as an `rm` would), and
    `scontrol requeue` lands, before the second model is done. The second attempt computes the
    missing partition and the second model, and leaves every other published partition alone
    (markers and Parquet files); the local job is not disturbed. Then every partition is complete
    once, with one row per image; each job's sanity check is stored; a rerun with nothing left
    starts no Ray; the copied run explained its own checkpoints. The smallest work that shows it:
    one target, no faithfulness curves, a small sanity sample. Needs SLURM (CI requires it)."""
    layers = {m.name.removeprefix("model="): sorted(_markers(demo_run, m.name.removeprefix("model="), "gradcam")) for m in (demo_run / "cams").glob("model=*")}
    run = _copy_run(demo_run, tmp_path, "cams", "sanity")
    models = [m for (m,) in duckdb.sql(f"select model from '{run}/accuracy.parquet' order by model").fetchall()]  # the stage's order
    assert len(models) == 2 and sorted(layers) == models and all(layers.values())
    stored = duckdb.sql(f"select checkpoint from '{run}/accuracy.parquet' where model = '{models[1]}'").fetchall()[0][0]
    checkpoint = str(run / stored)  # the copy's own: checkpoints are stored relative to the run folder
    common = ["--targets", "pred", "--faithfulness-steps", "0", "--sanity-images", "16"]
    methods = ("gradcam", "layercam")
    proc = _popen([*LAUNCH, "--logs", str(tmp_path / "logs"), "cam", "--run", str(run), "--methods", ",".join(methods), *common])
    job = _job_id(proc)
    deadline = time.monotonic() + 300
    while len(_published(run, models[0], methods)) < len(methods) * len(layers[models[0]]):
        assert time.monotonic() < deadline and proc.poll() is None, "the first model's partitions were not published"
        time.sleep(0.2)
    assert not _published(run, models[1], methods), "the second model was published before the requeue could land"
    local_job = ["jobs.cam", "--run", str(run), *common, "--num-cpus", "2", "--checkpoint", checkpoint, "--methods", "xgradcam"]
    with BackgroundJob(tmp_path / "local.log", *local_job) as local:
        missing, *kept = sorted(_published(run, models[0], methods))
        shutil.rmtree(run / "cams" / f"model={models[0]}" / missing[0] / f"method={missing[1]}")
        first = _published(run, models[0], methods)
        files = {
            p: p.stat().st_mtime_ns for layer, method in kept for p in (run / "cams" / f"model={models[0]}" / layer / f"method={method}").glob("*.parquet")
        }
        assert files
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
        out, err = _finish(proc, timeout=400)
        assert proc.returncode == 0, out[-2000:] + err[-3000:]
        assert local.finish(timeout=120) == 0, local.output()[-3000:]  # the other job is not disturbed
    images = duckdb.sql(f"select count(*) from '{run}/predictions.parquet' where model = '{models[1]}'").fetchall()[0][0]
    assert f"cams {models[1]} (xgradcam): {images}/{images} images (100%)" in local.output()

    logs = tmp_path / "logs" / job
    driver = (logs / f"{job}_0_log.out").read_text()
    assert json.loads((logs / "driver-status.json").read_text()) == {"returncode": 0, "resumed": True}
    assert (logs / "attempt-1").is_dir() and "2 Ray node(s) up at 10.77.0.1:" in driver
    # each attempt's driver: the job's options, its path last (the launcher's order), then its cluster; no --resume
    # (a CAM job's rerun needs no flag: it skips complete partitions)
    ran = f"running jobs.cam --methods {','.join(methods)} {' '.join(common)} --run {run} --address 10.77.0.1:"
    assert driver.count(ran) == 2 and "--resume" not in driver
    assert "10.77.0.2" in (logs / "attempt-0" / "ray-worker-1.log").read_text()  # the second node's Ray at its own address
    # before any work, a task on each node read the driver's token in the run folder and could not take its lock
    assert "run folder: one folder, with shared locks, on all 2 nodes" in driver
    # the second attempt: the missing partition and the second model's, and nothing else
    assert f"cams: {1 + len(methods) * len(layers[models[1]])} partitions written, {len(kept)} already complete" in driver
    after = _published(run, models[0], methods)
    assert {k: after[k] for k in kept} == first and missing in after
    assert {p: p.stat().st_mtime_ns for p in files} == files  # the finished parts untouched
    assert len(_published(run, models[1], methods)) == len(methods) * len(layers[models[1]])
    assert not (run / ".staging").exists()  # no staging left: the requeued attempt's swept, each finished job's removed

    # every model's maps, each (layer, method) complete once: nothing lost, nothing twice
    counts = duckdb.sql(f"select model, layer, method, count(*), count(distinct image_index) from '{run}/cams/**/*.parquet' group by all").fetchall()
    assert all(n == distinct == images for *_, n, distinct in counts), counts
    expected = {(m, k) for m in models for k in methods} | {(models[1], "xgradcam")}
    assert {(m, k) for m, _, k, *_ in counts} == expected
    assert len(counts) == sum(len(layers[m]) for m, _ in expected)
    # the sanity check of each job's methods: one file per model and method
    sanity = duckdb.sql(f"select distinct model, method from read_parquet('{run}/sanity/*/*.parquet')").fetchall()
    assert set(sanity) == expected and len(list((run / "sanity").glob("*/*.parquet"))) == len(expected)

    every_method = (*methods, "xgradcam")
    job_logs = set((run / "logs").iterdir())  # each job that starts Ray keeps Ray's logs in a folder of its own there
    noop = run_job("jobs.cam", "--run", str(run), *common, "--checkpoint", checkpoint, "--methods", ",".join(every_method), timeout=300)
    assert noop.returncode == 0, noop.stderr[-3000:]
    assert f"cams: 0 partitions written, {len(every_method) * len(layers[models[1]])} already complete" in noop.stdout
    assert set((run / "logs").iterdir()) == job_logs and "Ray's logs:" not in noop.stdout + noop.stderr  # nothing to compute: no Ray
    # the copied run explained its own checkpoints (its tables store them relative to the run folder), not the original's
    claims = [json.loads(p.read_text())["checkpoint"] for p in (run / "cams").glob("model=*/_SOURCE.json")]
    assert len(claims) == 2 and all(Path(c).is_relative_to(run.resolve() / "train") for c in claims), claims


def test_the_report_runs_on_one_cpu_node_without_ray(slurm, demo_run, tmp_path):
    """`cluster.slurm report` on a CPU allocation: the driver runs on the node, no Ray starts."""
    run = _copy_run(demo_run, tmp_path)
    cmd = [sys.executable, "-m", "cluster.slurm", "--cpus-per-task", "1", "--time", "15", "--logs", str(tmp_path / "logs"), "report", "--run", str(run)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = re.match(r"submitted job (\d+) \(1 node\(s\)\): jobs\.report --run (\S+);", proc.stdout)
    assert job and job.group(2) == str(run), proc.stdout
    logs = tmp_path / "logs" / job.group(1)
    assert f"one node, no Ray; running jobs.report --run {run}" in (logs / f"{job.group(1)}_0_log.out").read_text()
    assert not (logs / "attempt-0" / "ray-head.log").exists()
    assert (run / "report" / "report.md").is_file() and (run / "report" / "report.html").is_file()


def _on_node(node: int, ranks: dict[str, str], argv: list[str]) -> subprocess.Popen:
    """`python -m cluster.ray_on_env` in a SLURM node's network namespace, with its host name and
    /etc/hosts (127.0.1.1 for its own name), as slurm-up.sh starts that node's slurmd; no SLURM."""
    name = f"vnode{node}"
    command = shlex.join(["env", *(f"{k}={v}" for k, v in ranks.items()), sys.executable, "-m", "cluster.ray_on_env", *argv])
    inner = f"mount --bind /etc/netns/cfc-{name}/hosts /etc/hosts && hostname {name} && exec {command}"
    return _popen(["nsenter", f"--net=/run/netns/cfc-{name}", "unshare", "--uts", "--mount", "sh", "-c", inner])


def test_a_plain_launcher_s_ranks_start_one_ray_cluster_on_two_nodes_and_run_a_job(slurm, tmp_path):
    """The second adapter of the Ray bootstrap: one process per node with RANK / WORLD_SIZE /
    MASTER_ADDR (as torchrun or ssh would start them), in the two nodes' namespaces. MASTER_ADDR is
    the head's name, which resolves to 127.0.1.1 on the head itself: its Ray must listen at the
    address the other node reaches instead. The driver, on the head, sizes the search by both
    nodes' CPUs; a trial of 3 workers cannot fit 2, so it says so in one line and rank 0 exits with
    the search's status for a user error, rank 1 with 0, and no Ray process outlives them."""
    import psutil

    config = write_config(tmp_path, text=SLURM_SEARCH.replace("workers_per_trial: 2", "workers_per_trial: 3"))
    meeting = tmp_path / "meeting"
    argv = ["--meeting", str(meeting), "--cpus-per-node", "1", "--object-store-memory", str(300 << 20)]
    argv += ["search", "--config", str(config), "--out", str(tmp_path / "run")]
    head = _on_node(1, {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "vnode1"}, argv)
    worker = _on_node(2, {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "vnode1"}, argv)
    out, err = _finish(head, timeout=300)
    worker_out, worker_err = _finish(worker, timeout=120)
    assert head.returncode == 2, out[-2000:] + err[-3000:]
    assert worker.returncode == 0, worker_out + worker_err
    assert "2 Ray node(s) up at 10.77.0.1:" in out and "run folder: one folder, with shared locks, on all 2 nodes" in out
    assert "error: scaling: one trial needs 3 CPUs (3 workers) but the cluster has 2 CPUs and 0 GPUs" in err
    assert "10.77.0.2" in (meeting / "attempt-0" / "ray-worker-1.log").read_text()
    assert json.loads((meeting / "driver-status.json").read_text()) == {"returncode": 2, "resumed": False}
    assert (meeting / "attempt-0" / "ray-token").stat().st_mode & 0o077 == 0 and meeting.stat().st_mode & 0o077 == 0
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if any(f"cfr-{pid}-0-" in a for a in p.info["cmdline"] or [] for pid in (head.pid, worker.pid))]
    assert left == []
    # a second launch into the same folder: rank 0 refuses it before Ray starts (its workers find the attempt ended)
    again = _on_node(1, {"RANK": "0", "WORLD_SIZE": "1"}, argv)
    _, again_err = _finish(again, timeout=120)
    assert again.returncode == 2 and again_err.strip().endswith("attempt 0 already ran there; give each launch its own folder (e.g. with its job id)")


def test_a_request_sbatch_refuses_ends_in_its_reason_on_one_line(slurm, tmp_path):
    """A partition SLURM does not have: sbatch refuses at once, and the launcher says why in one
    line (before: submitit's FailedJobError traceback after sbatch's own lines). --detach: were it
    queued after all, the test would fail at once instead of waiting for it."""
    cmd = [
        *LAUNCH,
        "--partition",
        "nosuch",
        "--detach",
        "--logs",
        str(tmp_path / "logs"),
        "--config",
        str(write_config(tmp_path)),
        "--out",
        str(tmp_path / "run"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith("error: sbatch refused the job: ") and "invalid partition" in lines[0].lower(), lines[0]
    assert "submitted" not in proc.stdout and not list((tmp_path / "logs" / "tokens").glob("*"))


@pytest.mark.full
def test_pipeline_on_two_nodes_requeued_mid_search_resumes_and_completes(slurm, tmp_path):
    """One job does both (each costs minutes here): the pipeline on 2 SLURM nodes with DDP across
    them, and `scontrol requeue` while its first trial trains. About 6 minutes on 2 cores: it runs
    in make full-check; CI runs the rendezvous above."""
    proc = _launch(tmp_path)
    job = _job_id(proc)
    train = tmp_path / "run" / "train"
    deadline = time.monotonic() + 300
    while not _any(train, "trial_*/checkpoint_*"):  # the first trial finished an epoch
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint before the requeue"
        time.sleep(0.5)
    trials_before = {p.name for p in train.glob("trial_*")}
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    out, err = _finish(proc)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert f"job {job}: driver exit status 0" in out
    logs = tmp_path / "logs" / job  # the %j folder
    assert json.loads((logs / "driver-status.json").read_text()) == {"returncode": 0, "resumed": True}
    assert re.search(r"running jobs\.pipeline .* --resume-if-started", (logs / f"{job}_0_log.out").read_text())  # the requeued attempt's flag
    assert (logs / "attempt-1").is_dir() and "Ray node(s) up" in (logs / f"{job}_0_log.out").read_text()
    run = tmp_path / "run"
    # the same Tune experiment went on: the trial that was running kept its id (a fresh search draws new ids)
    trial_ids = {row[0] for row in duckdb.sql(f"select trial_id from '{run}/trials.parquet'").fetchall()}
    assert {name.removeprefix("trial_") for name in trials_before} <= trial_ids and len(trial_ids) == 2
    assert len(list(train.glob("trial_*"))) == 2
    # no epoch lost or counted twice across the two attempts; ASHA kept the good trial
    # only: its rungs, which Ray forgets, refilled from the checkpoints (cifarcam.search.resumable_asha)
    rows = duckdb.sql(f"select trial_id, list(epoch order by epoch) from '{run}/epochs.parquet' group by trial_id order by trial_id").fetchall()
    assert sorted(epochs for _, epochs in rows) == [[1], [1, 2]]
    assert duckdb.sql(f"select lr, status from '{run}/trials.parquet' order by lr").fetchall() == [(1e-6, "stopped_early"), (0.004, "completed")]
    # both DDP workers of every epoch ran on different Ray nodes, at different addresses
    assert duckdb.sql(f"select distinct workers, nodes from '{run}/epochs.parquet'").fetchall() == [(2, 2)]
    head_log = (logs / "attempt-1" / "ray-head.log").read_text()
    assert "10.77.0.1" in head_log and "Ray node(s) up at 10.77.0.1:" in (logs / f"{job}_0_log.out").read_text()
    ((n, distinct),) = duckdb.sql(f"select count(*), count(distinct image_index) from '{run}/cams/**/*.parquet'").fetchall()
    assert n == distinct == TEST_IMAGES
    assert (run / "report" / "report.md").is_file()
    driver_log = (logs / f"{job}_0_log.out").read_text()
    assert "search: trial " in driver_log and "TrainingReport" not in driver_log and list((run / "logs").glob("pipeline-*/ray-workers.log"))
    deadline = time.monotonic() + 60
    while _sacct_state(job) != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(1)
    assert _sacct_state(job) == "COMPLETED"


def test_array_runs_one_sweep_per_config_and_a_config_refused_on_its_node_fails_its_task(slurm, tmp_path):
    """Two configs whose data is missing: each array task checks its own config on its node and
    fails on it before any Ray starts there; the launcher's status is the job's (2, a user
    error), and SLURM records FAILED."""
    configs = []
    for name in ("sweep_a", "sweep_b"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"name: {name}\ndata: {{source: parquet, path: /nonexistent-{name}}}\n")
        configs.append(str(path))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.slurm",
            "--nodes",
            "1",
            "--cpus-per-task",
            "1",
            "--time",
            "15",
            "--logs",
            str(tmp_path / "logs"),
            "--array",
            *configs,
            "--",
            "--out",
            str(tmp_path / "runs"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    jobs = re.findall(r"submitted job (\d+_\d) .*--config (\S+) --out (\S+);", proc.stdout)
    assert [(Path(c).stem, Path(o)) for _, c, o in jobs] == [("sweep_a", tmp_path / "runs" / "sweep_a"), ("sweep_b", tmp_path / "runs" / "sweep_b")]
    for (job, _, _), name in zip(jobs, ("sweep_a", "sweep_b")):
        err = (tmp_path / "logs" / job / f"{job}_0_log.err").read_text()
        assert f"error: data.path /nonexistent-{name}: not a folder" in err
        assert "no Ray started" in (tmp_path / "logs" / job / f"{job}_0_log.out").read_text()
        assert (tmp_path / "logs" / job / "attempt-0").is_dir() and not (tmp_path / "logs" / job / "attempt-0" / "ray-head.log").exists()
        assert f"job {job}: driver exit status 2" in proc.stdout  # jobs.pipeline's status for a user error
        deadline = time.monotonic() + 60
        while _sacct_state(job) != "FAILED" and time.monotonic() < deadline:
            time.sleep(1)
        assert _sacct_state(job) == "FAILED"


def _launcher(capsys, tmp_path: Path, *args: str):
    """cluster.slurm with these arguments, run in the test's process (as in_process runs a job):
    these cases end in its checks, before sbatch, so no SLURM is needed."""
    return in_process(capsys, "cluster.slurm", "--logs", str(tmp_path / "logs"), *args)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config", "{typo}"], "error: search.grid.optimzer: unknown key; did you mean 'optimizer'?"),
        (["--", "--config", "{typo}"], "error: search.grid.optimzer: unknown key; did you mean 'optimizer'?"),  # the older form
        (["--config", "{good}", "--address", "10.0.0.1:6379"], "error: --address: set by cluster.slurm"),
        (["--config", "{good}", "--num-cpus=4"], "error: --num-cpus: set by cluster.slurm"),
        (["--config", "{good}", "--num-gpus", "1"], "error: --num-gpus: set by cluster.slurm"),
        (["--array", "{good}", "--config", "{good}"], "error: --array: each config is one array task"),
        (["--config", "{good}", "--out", "/proc/run"], "error: --out /proc/run: cannot create the results folder"),
        (["--config", "{good}", "--methods", "gradkam"], "error: --methods: unknown CAM method 'gradkam'"),
        (["--config", "{good}", "--out", "{typo}-run", "--resume"], "error: --resume: --out {typo}-run holds no search 'small' to continue"),
        (["--nodes", "0", "--config", "{good}"], "python -m cluster.slurm: error: argument --nodes: expected a positive integer, got 0"),
        (
            ["--job-name", "x\n#SBATCH --wrap=id", "--config", "{good}"],
            "python -m cluster.slurm: error: argument --job-name: must be one line (it becomes an #SBATCH line), got 'x\\n#SBATCH --wrap=id'",
        ),
        (["--sbatch-arg", "mail-type=END\rx", "--config", "{good}"], "python -m cluster.slurm: error: argument --sbatch-arg: must be one line"),
        # JOB as a subcommand: each job's own checks, before sbatch
        (["search", "--config", "{typo}"], "error: search.grid.optimzer: unknown key; did you mean 'optimizer'?"),
        (["--job-name", "cam", "pipeline", "--config", "{typo}"], "error: search.grid.optimzer: unknown key"),  # a launcher value named like a job
        (["pipeline", "--config", "{good}", "--layers", "nosuch"], "error: --layers: model resnet_tiny has no layer 'nosuch'"),
        (["cam", "--run", "/nonexistent-run"], "error: --run /nonexistent-run: not a run folder (no config.yaml)"),
        (["cam", "--run", "/nonexistent-run", "--num-gpus", "1"], "error: --num-gpus: set by cluster.slurm"),
        (["report", "--run", "/nonexistent-run"], "error: --run /nonexistent-run: not a run folder (no config.yaml)"),
        (["--nodes", "2", "report", "--run", "/nonexistent-run"], "error: --nodes 2: report uses no Ray and runs on one node; ask for --nodes 1"),
        (["--array", "{good}", "{good}", "cam", "--run", "/x"], "error: --array: one search per config, for the pipeline or the search; cam takes one --run"),
    ],
)
def test_launcher_mistakes_fail_before_sbatch(args, expected, tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: x\nsearch: {grid: {optimzer: [sgd]}}\n")
    args, expected = [a.format(typo=typo, good=write_config(tmp_path)) for a in args], expected.format(typo=typo)
    proc = _launcher(capsys, tmp_path, *args)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(expected), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "submitted" not in proc.stdout
    assert not (tmp_path / "logs").exists()


def test_a_missing_pipeline_option_is_argparse_s_error_with_the_usage(tmp_path, capsys):
    proc = _launcher(capsys, tmp_path, "--nodes", "2")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: python -m cluster.slurm"), proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "python -m cluster.slurm: error: the following arguments are required: --config"
    # after JOB, that job's options only: the allocation's come before it
    proc = _launcher(capsys, tmp_path, "cam", "--run", str(tmp_path), "--nodes", "2")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: python -m cluster.slurm [allocation options] cam"), proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "python -m cluster.slurm [allocation options] cam: error: unrecognized arguments: --nodes 2"
    # no abbreviations: `--addr` would slip past the refusal of the cluster's own options
    proc = _launcher(capsys, tmp_path, "cam", "--run", str(tmp_path), "--addr", "10.0.0.1:6379")
    assert proc.stderr.strip().splitlines()[-1] == "python -m cluster.slurm [allocation options] cam: error: unrecognized arguments: --addr 10.0.0.1:6379"
    assert not (tmp_path / "logs").exists()


def test_the_launcher_passes_each_job_s_options_on_as_given(tmp_path, monkeypatch):
    """No list of a job's options here: whatever the job's parser accepts reaches its driver,
    paths made absolute; the older form (no JOB) is the pipeline."""
    from cluster.slurm import job_runs

    a, b = write_config(tmp_path, "a"), write_config(tmp_path, "b")
    (tmp_path / "run" / "tune" / "a").mkdir(parents=True)  # --resume: a search to continue
    older = ["--nodes", "2", "--config", str(a), "--methods", "gradcam", "--out", str(tmp_path / "run"), "--resume", "--detach"]
    newer = ["--nodes", "2", "--detach", "pipeline", "--config", str(a), "--methods", "gradcam", "--out", str(tmp_path / "run"), "--resume"]
    for argv in (older, newer):
        own, kind, runs = job_runs(argv)
        assert (own.nodes, own.detach, kind.name) == (2, True, "pipeline")
        assert runs == [["--methods", "gradcam", "--resume", "--config", str(a), "--out", str(tmp_path / "run")]]
    for argv in (
        ["--array", str(a), str(b), "--out", str(tmp_path / "runs"), "--layers=layer2"],
        ["--array", str(a), str(b), "pipeline", "--out", str(tmp_path / "runs"), "--layers=layer2"],
    ):
        own, kind, runs = job_runs(argv)
        assert runs == [["--layers=layer2", "--config", str(c), "--out", str(tmp_path / "runs" / n)] for c, n in ((a, "a"), (b, "b"))]
    monkeypatch.chdir(tmp_path)
    own, kind, runs = job_runs(["--job-name", "search", "--array", "a.yaml", "search", "--out", "runs"])  # relative paths, a job-named value
    assert (own.job_name, kind.name, runs) == ("search", "search", [["--config", str(a), "--out", str(tmp_path / "runs" / "a")]])


def test_a_logs_folder_others_could_write_is_refused(tmp_path):
    """Each node unpickles its job from --logs: a new one is made private, and one that others
    may write (where they could plant a pickle) is refused before anything is submitted."""
    from cifarcam.errors import UserError
    from cluster.slurm import private_logs

    fresh = private_logs(tmp_path / "new" / "logs")
    assert fresh.is_dir() and fresh.stat().st_mode & 0o077 == 0
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UserError, match=r"^--logs .*/shared: writable by others \(mode drwxrwxrwx\), and each node unpickles its job from there"):
        private_logs(shared)
    shared.chmod(0o755)
    assert private_logs(shared) == shared


def test_a_cam_job_s_layers_and_checkpoints_are_checked_before_sbatch(demo_run, tmp_path, capsys):
    """The CAM job's own checks, on the login node: each --layers name in each model it would
    explain, and each --checkpoint; no data loaded, no cluster, nothing queued."""
    proc = _launcher(capsys, tmp_path, "cam", "--run", str(demo_run), "--layers", "nosuch")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --layers: model mobilenetv3_small has no layer 'nosuch'"), proc.stderr
    assert not (tmp_path / "logs").exists()
    proc = _launcher(capsys, tmp_path, "cam", "--run", str(demo_run), "--checkpoint", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path}: not a cifarcam checkpoint (no meta.json)", proc.stderr


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}, (1, 2)),  # torchrun, one process per node
        ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}, (3, 4)),  # Open MPI
        ({"PMI_RANK": "0", "PMI_SIZE": "2"}, (0, 2)),  # MPICH, Intel MPI
        ({"RANK": "0", "WORLD_SIZE": "2", "PMI_RANK": "1", "PMI_SIZE": "2"}, (0, 2)),  # torchrun's first
        ({}, "no rank and node count in the environment: set one of RANK/WORLD_SIZE, OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE, PMI_RANK/PMI_SIZE"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2, WORLD_SIZE=2: expected 0 <= RANK < WORLD_SIZE"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x', WORLD_SIZE='2': expected integers"),
        ({"RANK": "0", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, "LOCAL_WORLD_SIZE=4: one process per node (torchrun --nproc-per-node 1)"),
    ],
)
def test_the_plain_adapter_reads_ranks_as_torchrun_and_mpi_set_them(environ, expected):
    from cifarcam.errors import ConfigError
    from cluster.ray_on_env import node_role, rank_and_size

    if isinstance(expected, str):
        with pytest.raises(ConfigError) as raised:
            rank_and_size(environ)
        assert str(raised.value).startswith(expected)
        return
    assert rank_and_size(environ) == expected
    role = node_role(Path("/shared/meet"), 4, None, {**environ, "MASTER_ADDR": "head", "TORCHELASTIC_RESTART_COUNT": "2"})
    assert (role.attempt, role.meeting, role.cpus, role.gpus) == (2, Path("/shared/meet/attempt-2"), 4, None)
    assert role.node_addr == ("head" if expected[0] == 0 else None)  # MASTER_ADDR is rank 0's own address only


def test_a_restarted_attempt_continues_a_search_and_simply_reruns_the_other_jobs():
    from cluster.job_kinds import JOBS

    assert JOBS["pipeline"].driver_args(["--out", "/r"], "10.0.0.1:6379", True) == ["--out", "/r", "--address", "10.0.0.1:6379", "--resume-if-started"]
    assert JOBS["search"].driver_args(["--out", "/r", "--resume"], "a:1", True) == ["--out", "/r", "--resume", "--address", "a:1"]  # the user's own
    assert JOBS["pipeline"].driver_args(["--out", "/r"], "a:1", False) == ["--out", "/r", "--address", "a:1"]
    assert JOBS["cam"].driver_args(["--run", "/r"], "a:1", True) == ["--run", "/r", "--address", "a:1"]  # complete partitions are skipped
    assert JOBS["report"].driver_args(["--run", "/r"], None, True) == ["--run", "/r"]  # no Ray, written again


def test_the_plain_adapter_leaves_ray_none_of_the_launcher_s_variables():
    """torchrun's rank, world size and agent store, inherited by Ray's workers, would make each DDP
    rank of a trial join a store nobody serves (TORCHELASTIC_USE_AGENT_STORE): they are removed."""
    from cluster.ray_on_env import without_launcher_variables

    environ = {
        **{name: "1" for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")},
        **{"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "1", "OMPI_COMM_WORLD_RANK": "0", "PMI_SIZE": "2"},
        **{"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0,1", "NCCL_SOCKET_IFNAME": "ib0", "RANKING": "kept"},
    }
    without_launcher_variables(environ)
    assert environ == {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0,1", "NCCL_SOCKET_IFNAME": "ib0", "RANKING": "kept"}


def test_a_restarted_plain_launch_continues_the_search_it_began(tmp_path):
    """torchrun's restart (attempt 1) of a search that began: rank 0's checks see the flag the
    driver will get, instead of refusing the folder as a second search; a first attempt refuses it."""
    from cifarcam.errors import UserError
    from cluster.ray_bootstrap import DONE_FILE
    from cluster.ray_on_env import node_role, start_head

    config, out = write_config(tmp_path), tmp_path / "run"
    (out / "tune" / "small").mkdir(parents=True)  # a search began there
    argv = ["--config", str(config), "--out", str(out)]
    for attempt in (0, 1):
        (tmp_path / "meet" / f"attempt-{attempt}").mkdir(parents=True)
    first = node_role(tmp_path / "meet", None, None, {"RANK": "0", "WORLD_SIZE": "1"})
    with pytest.raises(UserError, match="already holds search 'small'; pass --resume"):
        start_head(first, "search", argv)
    assert (first.meeting / DONE_FILE).exists()  # the other ranks stop waiting
    again = node_role(tmp_path / "meet", None, None, {"RANK": "0", "WORLD_SIZE": "1", "TORCHELASTIC_RESTART_COUNT": "1"})
    job, token = start_head(again, "search", argv)
    assert job.args == ["--resume-if-started", *argv] and token.stat().st_mode & 0o077 == 0


def test_a_job_queued_by_the_pipeline_only_launcher_still_runs_when_requeued():
    """A SLURM job pickled by the version before JOB (its fields: pipeline_args, token_path, ...),
    requeued after an upgrade, unpickles as the pipeline it was."""
    import pickle

    from cluster.ray_bootstrap import JobToRun, RayNodeOptions
    from cluster.ray_on_slurm import RayOnSlurm

    old = RayOnSlurm(JobToRun("cam", []), RayNodeOptions(Path("/x")))
    old.__dict__ = {
        "pipeline_args": ["--config", "/c.yaml"],
        "token_path": "/logs/tokens/t",
        "object_store_bytes": None,
        "join_timeout_s": 60.0,
        "interface": "ib0",
        "resume": True,
    }
    new = pickle.loads(pickle.dumps(old))
    assert new.job == JobToRun("pipeline", ["--config", "/c.yaml"]) and new.resume
    assert new.options == RayNodeOptions(Path("/logs/tokens/t"), None, "ib0", 60.0)
