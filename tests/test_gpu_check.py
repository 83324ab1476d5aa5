"""The GPU check's CPU mode, so that `make gpu-check` cannot rot where CI has no GPU."""

import json
import subprocess
import sys

from helpers import ROOT


def test_gpu_check_cpu_mode_writes_its_table(tmp_path, cifar10_parquet):
    out = tmp_path / "check"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--cpu", "--out", str(out), "--data", str(cifar10_parquet)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads((out / "gpu_check.json").read_text())
    assert figures["environment"]["mode"] == "cpu" and figures["gpu_tests"] is None
    assert all(row["images_per_s"] > 0 and row["tflops"] > 0 for row in figures["training"])
    for key in (
        "a_per_image",
        "b_batched",
        "c_forward_full_backward",
        "d_forward_activation_backward",
        "ours",
        "actor_faithfulness_0_steps",
        "actor_faithfulness_16_steps",
    ):
        assert figures["cam"][f"{key}_images_per_s"] > 0, key
    assert figures["baseline"]["ratio"] > 0 and figures["stage"]["stage_over_loop"] > 0 and figures["paper_epoch"]["epoch_s"] > 0
    assert set(figures["goals"]) == {"mfu", "train_vs_pil", "cam_vs_per_image", "cam_vs_batched", "stage_over_loop"}
    table = (out / "gpu_check.md").read_text()
    assert "| goal | target | measured | met |" in table and "CPU mode" in table
