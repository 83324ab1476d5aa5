"""Running the jobs as a user does: real subprocesses, real local Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_job(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    full_env.pop("RAY_ADDRESS", None)  # a local Ray per job unless the test names a cluster
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


SMALL_SEARCH = """
name: {name}
data:
  source: synthetic
  synthetic: {{num_classes: 10, train_size: 2000, test_size: 300}}
train:
  model: resnet_tiny
  epochs: 2
  batch_size: 64
  lr: 0.004
  warmup_epochs: 0.2
search:
  grid:
    lr: [0.004, 0.000001]   # the second cannot learn in one epoch: ASHA must stop it
  early_stopping: asha
  grace_period: 1
  reduction_factor: 2
  keep_checkpoints: 1
scaling:
  workers_per_trial: 2
  cpus_per_worker: 1
"""


def write_config(folder: Path, name: str = "small", text: str = SMALL_SEARCH) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text.format(name=name))
    return path


def start_job(*args: str, env: dict | None = None) -> subprocess.Popen:
    """A job in the background, in its own session, so that a test can kill it and everything it
    started (its local Ray included) as one process group."""
    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    full_env.pop("RAY_ADDRESS", None)
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", *args], cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every process below ``pid``, read from /proc (Ray renames its
    workers' command lines, e.g. ``ray::RayTrainWorker``)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            todo.append(child)
    return found
