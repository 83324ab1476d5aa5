"""Shared fixtures: the real data in ../shared/data (or $CIFARCAM_DATA), never skipped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("CIFARCAM_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "cifar10-jpeg").is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA}; set CIFARCAM_DATA", pytrace=False)
    return SHARED_DATA


@pytest.fixture(scope="session")
def cifar100_test20(shared_data: Path) -> Path:
    return shared_data / "cifar-100-python-test20"


@pytest.fixture(scope="session")
def cifar10_parquet(shared_data: Path) -> Path:
    return shared_data / "cifar10-jpeg"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, shared_data):
    """The README's demo: `jobs.pipeline --config configs/demo.yaml` on a real local Ray."""
    from helpers import demo_cam_options, run_job

    out = tmp_path_factory.mktemp("demo") / "run"
    proc = run_job("jobs.pipeline", "--config", "configs/demo.yaml", "--out", str(out), "--num-cpus", "2", *demo_cam_options(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (out.parent / "terminal.txt").write_text(proc.stdout + proc.stderr)  # what the user saw
    return out
