"""Planning a search before it runs: resources, packing, ASHA's expected epochs, `--dry-run`."""

import pytest
from ray.tune.schedulers.async_hyperband import _Bracket

from cifarcam.config import load_config
from cifarcam.errors import ConfigError
from cifarcam.search.planning import asha_rungs, expected_epochs_per_trial, plan_resources, plan_search
from helpers import ROOT, in_process

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


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path, capsys):
    # in this process: in_process also checks that Ray was never started
    proc = in_process(capsys, "jobs.search", "--config", str(PAPER), "--dry-run", "--images-per-s", "10000", "--num-cpus", "16", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "42 trials:" and "model=resnet34, optimizer=adamw, scheduler=cosine, lr ~ loguniform(0.0003, 0.03)" in lines[1]
    assert "per trial: 1 worker(s) x (2 CPU); 8 trial(s) at once" in lines
    assert "epochs: 11.1 per trial expected after early stopping, 467 in all" in lines
    assert any(line.startswith("at 10000 images/s per trial on 45000 training images: 0.58 trial-hours") for line in lines)
    assert not (tmp_path / "run").exists() and "Ray" not in proc.stderr


def test_dry_run_of_a_trial_too_large_shows_the_plan_then_fails(tmp_path, capsys):
    proc = in_process(capsys, "jobs.search", "--config", str(PAPER), "--dry-run", "--num-cpus", "1")
    assert proc.returncode == 2
    assert "42 trials:" in proc.stdout and "per trial: does not fit this cluster" in proc.stdout
    assert proc.stderr.strip().splitlines() == ["error: scaling: one trial needs 2 CPUs (1 workers) but the cluster has 1 CPUs and 0 GPUs"]


NEWCOMER_CONFIGS = ["demo.yaml", "hard_shapes.yaml", "paper.yaml"]  # every config the README tells a newcomer to run


@pytest.mark.parametrize("name", NEWCOMER_CONFIGS)
@pytest.mark.parametrize("gpus", [0, 1, 2, 8])
def test_every_newcomer_config_fits_a_workstation_with_any_number_of_gpus(name, gpus):
    cfg = load_config(ROOT / "configs" / name)
    res = plan_resources(cfg, {"CPU": 16, "GPU": gpus})
    assert res.use_gpu == (gpus > 0) and res.max_concurrent_trials >= 1
    assert res.workers * res.cpus_per_worker <= 16 and res.workers * res.gpus_per_worker <= max(gpus, 0)
    # never two NCCL ranks of one trial on one GPU: several workers each hold whole GPUs
    assert res.workers == 1 or float(res.gpus_per_worker).is_integer()
    # the configured workers run wherever the GPUs (or the CPU-only cluster) hold them
    expected = cfg.scaling.workers_per_trial if gpus == 0 else min(cfg.scaling.workers_per_trial, gpus)
    assert res.workers == expected
    assert (res.note is not None) == (res.workers != cfg.scaling.workers_per_trial)


def test_one_gpu_runs_the_demo_as_one_worker_and_says_so():
    res = plan_resources(load_config(ROOT / "configs" / "demo.yaml"), {"CPU": 16, "GPU": 1})
    assert (res.use_gpu, res.workers, res.gpus_per_worker, res.max_concurrent_trials) == (True, 1, 1.0, 1)
    assert res.note == (
        "scaling: the cluster has 1 GPU, fewer than a trial's 2 workers x 1 GPU, so each trial runs 1 DDP worker instead "
        "(each keeps its batch_size, so the global batch is 1/2 of the configured one); set scaling.use_gpu: true to require 2"
    )


def test_use_gpu_true_insists_on_the_configured_workers():
    cfg = load_config(ROOT / "configs" / "demo.yaml", {"scaling.use_gpu": True})
    with pytest.raises(ConfigError, match=r"^scaling: one trial needs 2 CPUs and 2 GPUs \(2 workers\) but the cluster has 16 CPUs and 1 GPUs$"):
        plan_resources(cfg, {"CPU": 16, "GPU": 1})
    assert plan_resources(cfg, {"CPU": 16, "GPU": 8}).max_concurrent_trials == 4


def test_a_worker_needing_more_gpus_than_the_cluster_has_still_fails_fast():
    cfg = load_config(ROOT / "configs" / "demo.yaml", {"scaling.gpus_per_worker": 2})
    with pytest.raises(ConfigError, match=r"needs 2 CPUs and 4 GPUs \(2 workers\) but the cluster has 16 CPUs and 1 GPUs"):
        plan_resources(cfg, {"CPU": 16, "GPU": 1})


def test_dry_run_on_one_gpu_plans_the_demo_as_one_worker_and_says_so(capsys):
    """The planning tests above cover 0, 2 and 8 GPUs; this is the same plan through the job."""
    proc = in_process(capsys, "jobs.search", "--config", str(ROOT / "configs" / "demo.yaml"), "--dry-run", "--num-cpus", "16", "--num-gpus", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "cluster: 16 CPUs, 1 GPUs" in lines and "per trial: 1 worker(s) x (1 CPU + 1 GPU); 1 trial(s) at once" in lines
    assert any(line.startswith("scaling: the cluster has 1 GPU, fewer than a trial's 2 workers") for line in lines)
