"""Planning a search before it runs: resources, packing, ASHA's expected epochs, `--dry-run`."""

import pytest
from ray.tune.schedulers.async_hyperband import _Bracket

from cifarcam.config import load_config
from cifarcam.planning import asha_rungs, expected_epochs_per_trial, plan_resources, plan_search
from helpers import ROOT, run_job

PAPER = ROOT / "configs" / "paper.yaml"


@pytest.mark.parametrize("max_t, grace, factor", [(40, 5, 3), (3, 1, 2), (40, 1, 4), (10, 10, 2), (100, 2, 3)])
def test_rungs_are_where_rays_asha_puts_them(max_t, grace, factor):
    bracket = _Bracket(min_t=grace, max_t=max_t, reduction_factor=factor, s=0)
    assert asha_rungs(max_t, grace, factor) == sorted(m for m, _ in bracket._rungs if m < max_t)


def test_paper_search_expects_a_quarter_of_its_epochs_after_asha():
    cfg = load_config(PAPER)
    # rungs at 5 and 15 of 40 epochs, a third going on at each: 5 + 10/3 + 25/9
    assert expected_epochs_per_trial(cfg) == pytest.approx(5 + 10 / 3 + 25 / 9)


def test_paper_config_packs_four_trials_per_gpu():
    resources = plan_resources(load_config(PAPER), {"CPU": 16, "GPU": 2})
    assert (resources.use_gpu, resources.workers, resources.gpus_per_worker, resources.max_concurrent_trials) == (True, 1, 0.25, 8)


def test_device_hours_follow_the_measured_throughput():
    plan = plan_search(load_config(PAPER), {"CPU": 16, "GPU": 1}, images_per_s=10_000)
    assert plan.train_images == 45_000 and len(plan.trials) == 42
    assert plan.trial_hours == pytest.approx(42 * (5 + 10 / 3 + 25 / 9) * 45_000 / 10_000 / 3600)


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path):
    proc = run_job(
        "jobs.search", "--config", str(PAPER), "--dry-run", "--images-per-s", "10000", "--num-cpus", "16", "--out", str(tmp_path / "run"), timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "42 trials:" and "model=resnet34, optimizer=adamw, scheduler=cosine, lr ~ loguniform(0.0003, 0.03)" in lines[1]
    assert "per trial: 1 worker(s) x (2 CPU); 8 trial(s) at once" in lines
    assert "epochs: 11.1 per trial expected after early stopping, 467 in all" in lines
    assert any(line.startswith("at 10000 images/s per trial on 45000 training images: 0.58 trial-hours") for line in lines)
    assert not (tmp_path / "run").exists() and "Ray" not in proc.stderr


def test_dry_run_of_a_trial_too_large_shows_the_plan_then_fails(tmp_path):
    proc = run_job("jobs.search", "--config", str(PAPER), "--dry-run", "--num-cpus", "1", timeout=120)
    assert proc.returncode == 2
    assert "42 trials:" in proc.stdout and "per trial: does not fit this cluster" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "error: scaling: one trial needs 2 CPUs (1 workers) but the cluster has 1 CPUs and 0 GPUs"
