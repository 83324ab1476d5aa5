"""`ray job submit` against a real local Ray head (dashboard and job server on 127.0.0.1)."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import duckdb
import pytest

from helpers import ROOT, SMALL_SEARCH, assert_quiet, write_config


@pytest.fixture(scope="module")
def ray_head():
    # Token auth on: the head and every client read ~/.ray/auth_token.
    # A short folder: Ray's unix sockets live under it, and AF_UNIX paths stop at 107 bytes
    # (pytest's tmp paths plus Ray's session name can pass that, depending on the PID).
    state = Path(tempfile.mkdtemp(prefix="cfray-", dir="/tmp"))
    env = {**os.environ, "RAY_STATE_DIR": str(state), "RAY_VENV": str(ROOT / ".venv"), "RAY_NUM_CPUS": "2", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    try:
        up = subprocess.run(["bash", "cluster/ray-head-up.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert up.returncode == 0, up.stderr
        yield up.stdout.strip(), env
    finally:  # by PID, also when start-up failed half-way
        subprocess.run(["bash", "cluster/ray-head-down.sh"], cwd=ROOT, env=env, timeout=60)
        shutil.rmtree(state, ignore_errors=True)


def test_the_search_job_runs_through_ray_job_submit(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "run"
    config = write_config(tmp_path, "submitted", SMALL_SEARCH)
    proc = subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            ".",
            "--runtime-env",
            "cluster/runtime_env.yaml",
            "--",
            "python",
            "-m",
            "jobs.search",
            "--config",
            str(config),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "succeeded" in proc.stdout.lower()
    assert_quiet(proc.stdout, out)  # `ray job submit` streams the job's log: the project's lines
    assert "search: trial " in proc.stdout
    ((n, completed),) = duckdb.sql(f"select count(*), count(*) filter (where status = 'completed') from '{out}/trials.parquet'").fetchall()
    assert n == 2 and completed == 1
    assert duckdb.sql(f"select count(*) from '{out}/predictions.parquet'").fetchall() == [(300,)]
