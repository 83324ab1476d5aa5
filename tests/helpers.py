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
