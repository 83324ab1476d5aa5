"""The GPU check as the device tool's offline GPU machine will run it, rehearsed on the CPU.

`benchmarks/device_rehearsal.py` builds a kit for this Python with the script that builds the
device's, makes a fresh environment with only the device's preinstalled packages, installs the kit
with pip --no-index behind closed proxies, and runs both parts of the check with --cpu. It takes
about 10 minutes on 2 cores, so it is marked `full`: `make full-check` runs it, CI does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

from device_kit import LIMIT_MIB, folder_bytes  # noqa: E402
from gpu_check import PARTS, live_processes, run_child  # noqa: E402


@pytest.mark.parametrize("timeout", [30, 1])
def test_a_section_leaves_nothing_running(tmp_path, timeout):
    """What a section starts (here a grandchild that outlives it, as a local Ray's processes can)
    is killed when the section ends or overruns."""
    pid_file = tmp_path / "pid"
    script = f"import subprocess, time; p = subprocess.Popen(['sleep', '300']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(3 if {timeout} == 1 else 0)"
    status, _ = run_child([sys.executable, "-c", script], timeout, dict(os.environ))
    assert status == ("timed out" if timeout == 1 else "ok")
    grandchild = int(pid_file.read_text())
    assert grandchild not in live_processes()  # run_child waits until what it killed is gone


@pytest.mark.slow
@pytest.mark.full
@pytest.mark.timeout(2400)
def test_rehearsal_installs_the_kit_offline_and_both_parts_pass(tmp_path):
    work = tmp_path / "rehearsal"
    proc = subprocess.run([sys.executable, "benchmarks/device_rehearsal.py", "--work", str(work)], cwd=ROOT, capture_output=True, text=True, timeout=2300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert folder_bytes(work / "kit") <= LIMIT_MIB * 2**20
    tests = json.loads((work / "out" / "tests.json").read_text())
    measure = json.loads((work / "out" / "measure.json").read_text())
    for part in (tests, measure):
        assert part["mode"] == "cpu"
        assert {name: s["status"] for name, s in part["sections"].items()} == {name: "ok" for name in part["sections"]}
    outcomes = tests["sections"]["gpu_tests"]["figures"]["outcomes"]
    # every test ran on the CPU but the one that needs two GPUs: none was skipped for want of CUDA
    skipped = [name for name, outcome in outcomes.items() if outcome == "skipped"]
    assert skipped == ["test_gpu::test_sync_batchnorm_validation_with_uneven_shards_on_two_gpus"], outcomes
    assert len(outcomes) == 9 and all(outcome in ("passed", "skipped") for outcome in outcomes.values())
    assert outcomes["test_gpu::test_every_job_and_its_libraries_import_here"] == "passed"  # Tune, Train, the report: from the kit
    assert outcomes["test_gpu::test_gpu_pipeline_parquet_is_complete_and_consistent"] == "passed"  # jobs.pipeline from the kit
    assert tuple(measure["sections"]) == PARTS["measure"]
    stage = measure["sections"]["stage"]["figures"]
    assert stage["rows_written"] == stage["rows_expected"] > 0
    assert all(r["images_per_s"] > 0 for r in measure["sections"]["training"]["figures"]["runs"])
    assert (work / "out" / "measure.md").read_text().count("| goal |") == 1
