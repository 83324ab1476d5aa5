"""Bad input ends in one line naming the input, exit status 2, before any Ray start."""

import pytest

from helpers import run_job, write_config


def _one_line_error(proc):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: x\ntrain: {lr: 0}\n", "error: train.lr: must be > 0, got 0.0"),
        ("name: x\nsearch: {grid: {optimzer: [sgd]}}\n", "error: search.grid.optimzer: unknown key; did you mean 'optimizer'?"),
        ("name: x\ndata: {source: cifar100, download: false, cache_dir: /nonexistent-cache}\n", "error: cifar100: not in /nonexistent-cache and data.download is false;"),
        ("name: x\ndata: {source: parquet, path: /nonexistent-data}\n", "error: data.path /nonexistent-data: not a folder; expected train.parquet and test.parquet in it"),
        ("name: x\ntrain: {batch_size: 100000}\n", "error: train.batch_size: 100000 is larger than the training split (4500 images)"),
    ],
)
def test_bad_config_or_data(tmp_path, text, expected):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert _one_line_error(run_job("jobs.search", "--config", str(cfg), "--out", str(tmp_path / "out"), timeout=120)).startswith(expected)


def test_missing_config_file(tmp_path):
    line = _one_line_error(run_job("jobs.search", "--config", str(tmp_path / "nope.yaml"), timeout=120))
    assert line == f"error: {tmp_path / 'nope.yaml'}: config file not found"


def test_unwritable_results_folder(tmp_path):
    line = _one_line_error(run_job("jobs.search", "--config", str(write_config(tmp_path)), "--out", "/proc/cifarcam-run", timeout=120))
    assert line.startswith("error: --out /proc/cifarcam-run: cannot create the results folder")


def test_help_explains_every_option():
    proc = run_job("jobs.pipeline", "--help", timeout=60)
    assert proc.returncode == 0
    for option in ("--config", "--out", "--resume", "--address", "--num-cpus"):
        assert option in proc.stdout
