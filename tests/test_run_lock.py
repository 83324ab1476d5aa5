"""The run folder's lock, between real processes: a second search fails at once naming the first;
a CAM job waits, and says for whom."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from cifarcam import run_lock as lock_module
from cifarcam.run_lock import run_lock
from helpers import ROOT, in_process, write_config

HOLD = """
import sys, time
from pathlib import Path
from cifarcam.run_lock import run_lock
with run_lock(Path(sys.argv[1]), sys.argv[2]):
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def _holder(run: Path, job: str, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run), job, str(seconds)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_search_on_a_run_in_use_fails_in_one_line_before_ray(tmp_path, capsys):
    run = tmp_path / "run"
    holder = _holder(run, "jobs.search", 60)
    try:
        proc = in_process(capsys, "jobs.search", "--config", str(write_config(tmp_path)), "--out", str(run), "--num-cpus", "2")
    finally:
        holder.kill()
        holder.wait()
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {run}: in use by jobs.search (pid {holder.pid} on ") and lines[0].endswith(
        "; wait for it to end, or use another folder"
    )
    assert not (run / "tune").exists()


def test_a_waiting_job_says_for_whom_then_goes_on(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(lock_module, "PATIENCE_S", 0.5)
    holder = _holder(run, "the CAM stage", 3)
    started = time.monotonic()
    with run_lock(run, "jobs.search"):
        waited = time.monotonic() - started
        assert '"job": "jobs.search"' in (run / ".lock.holder").read_text()  # now this one holds it
    holder.wait()
    assert waited > 1.5  # the holder let go after 3 s
    assert capsys.readouterr().err.startswith(f"waiting for {run}, in use by the CAM stage (pid {holder.pid} on ")
    assert not (run / ".lock.holder").exists()


def test_the_lock_dies_with_its_holder(tmp_path):
    """A killed search (or a requeued SLURM job) leaves no lock behind: the next one goes on."""
    run = tmp_path / "run"
    holder = _holder(run, "jobs.search", 60)
    holder.kill()
    holder.wait()
    with run_lock(run, "jobs.search", wait=False):
        pass
