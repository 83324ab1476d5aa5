"""Shared fixtures: the real data in ../shared/data (or $CIFARCAM_DATA), never skipped; and the
groups that let pytest-xdist run the suite on two workers (`make test` does)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from cifarcam.ray_env import JOB_ENV, set_defaults

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("CIFARCAM_DATA", ROOT.parent / "shared" / "data"))

set_defaults(JOB_ENV)  # every process the tests start, `ray start` and `ray job submit` included


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


# The demo at test size: configs/demo.yaml's search and scaling (its 2 models, ASHA, 2 DDP workers
# per trial) on fewer images and epochs, and with one optimizer of its two: every trial costs about
# 35 s here before its first step (README, "make test"), and no test reads the second optimizer.
# Its models barely learn the hard shapes, so the tests that read it check what the pipeline writes
# and says, not what a trained model shows; those read the demo itself (full_demo_run) and run in
# `make full-check`.
DEMO_AT_TEST_SIZE = {"data.synthetic.train_size": 1500, "data.synthetic.test_size": 200, "train.epochs": 2, "search.grid.optimizer": ["adamw"]}


def _pipeline(out: Path, config: Path, cam_options: list[str]) -> Path:
    from helpers import run_job

    proc = run_job("jobs.pipeline", "--config", str(config), "--out", str(out), "--num-cpus", "2", *cam_options, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (out.parent / "terminal.txt").write_text(proc.stdout + proc.stderr)  # what the user saw
    return out


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, shared_data):
    """The README's demo at test size (DEMO_AT_TEST_SIZE), with `make demo`'s CAM options but a
    test-size faithfulness sample (helpers.DEMO_CAM_AT_TEST_SIZE), on a real local Ray."""
    from cifarcam.config import dump_config, load_config
    from helpers import demo_run_cam_options

    folder = tmp_path_factory.mktemp("demo")
    config = folder / "demo.yaml"
    config.write_text(dump_config(load_config(ROOT / "configs" / "demo.yaml", DEMO_AT_TEST_SIZE)))
    return _pipeline(folder / "run", config, demo_run_cam_options())


@pytest.fixture(scope="session")
def full_demo_run(tmp_path_factory, shared_data):
    """The README's demo as `make demo` runs it (about 9 minutes here): for the `full` tests."""
    from helpers import demo_cam_options

    return _pipeline(tmp_path_factory.mktemp("full-demo") / "run", ROOT / "configs" / "demo.yaml", demo_cam_options())


def _skip_full_unless_asked(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`full` tests (a trained demo model, the whole device rehearsal) run where asked for (-m full: `make full-check`), else
    they are reported as skipped, with where they run. Asked for = the -m expression names `full`
    other than as `not full` (so `-m "not (full and gpu)"` counts as asking: say `not full`)."""
    if re.search(r"(?<!not )\bfull\b", config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="left out of CI for time: runs in make full-check (pytest -m full)")
    for item in items:
        if item.get_closest_marker("full"):
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the marks into groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``--dist loadgroup``) a module- or session-scoped fixture runs once per
    worker that needs it. So every reader of the demo run is one group, and every other test is
    grouped by its module (its module fixtures: the faulty search, the Ray head, SLURM): each
    expensive fixture runs once. Two Ray clusters on one host are then the rule: each cluster's
    processes carry their own RAY_ADDRESS (jobs/common.py), or Ray Train's PlacementGroupCleaner
    could not tell which to ask. Not the default (Makefile's TEST_WORKERS): on 2 cores it is no
    faster (README)."""

    _skip_full_unless_asked(config, items)
    if not getattr(config.option, "loadgroup", False):  # a serial run keeps pytest's order
        return

    def group(item: pytest.Item) -> str:
        fixtures = getattr(item, "fixturenames", ())
        return "demo" if "demo_run" in fixtures else "full-demo" if "full_demo_run" in fixtures else item.path.name

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    # Longest groups first (measured: the demo and its readers, the rehearsal, SLURM, the faults,
    # the Ray head's search), so that no long one starts last while the other worker idles; with
    # --no-loadscope-reorder xdist hands groups out in this order.
    items.sort(key=lambda item: LONGEST_FIRST.index(group(item)) if group(item) in LONGEST_FIRST else len(LONGEST_FIRST))


LONGEST_FIRST = ["full-demo", "demo", "test_device_kit.py", "test_slurm.py", "test_search_job.py"]
