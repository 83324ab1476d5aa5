"""DDP on gloo with 2 real processes: what must not depend on the worker count or hang on it."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cifarcam.config import TrainConfig
from cifarcam.training.loader import DeviceLoader
from cifarcam.training.models import ModelSpec, build_model
from cifarcam.training.train import evaluate, fit

WORLD = 2
VAL_SIZES = [1025, 1]


def _images(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 10


def _fit_with_uneven_validation(rank: int, folder: str, val_sizes: list[int]) -> list[dict]:
    """One epoch on 2 ranks, then validation on shards of uneven size: 1,025 images with batch 256
    give rank 0 2 batches and rank 1 3, 1 image gives rank 0 no batch at all. Through the DDP wrapper, the first
    forward after a training step broadcasts BatchNorm buffers: a collective that a rank without
    batches never joins. Rank 0 saves its weights, which the test evaluates alone."""
    out = []
    train_images, train_labels = _images(64)
    for n in val_sizes:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(build_model(ModelSpec("resnet_tiny", 10)))
        images, labels = _images(n)
        cfg = TrainConfig(model="resnet_tiny", epochs=1, batch_size=16, lr=0.01, scheduler="none")
        train = DeviceLoader(train_images, train_labels, 16, rank=rank, world_size=WORLD)
        val = DeviceLoader(images, labels, 256, train=False, rank=rank, world_size=WORLD)
        (metrics,) = fit(model, cfg, train, val)
        out.append({"loss": metrics.val_loss, "top1": metrics.val_top1, "top5": metrics.val_top5})
        if rank == 0:
            torch.save(model.module.state_dict(), Path(folder, f"weights{n}.pt"))
    return out


def _swin_spec() -> ModelSpec:
    return ModelSpec("swin", 10, stem="imagenet", input_size=32)


def _optimizer_groups(model: nn.Module, world: int, rank: int) -> list[dict]:
    """fit()'s optimizer parameter groups, by parameter name, for Swin (it has no_weight_decay())."""
    torch.manual_seed(0)
    images, labels = _images(8)
    cfg = TrainConfig(model="swin", stem="imagenet", epochs=1, batch_size=2, weight_decay=0.05)
    train = DeviceLoader(images, labels, 2, rank=rank, world_size=world)
    val = DeviceLoader(images[:2], labels[:2], 2, train=False, rank=rank, world_size=world)
    groups: list[dict] = []

    def record(_metrics, wrapped, optimizer, _scheduler):
        names = {id(p): name for name, p in getattr(wrapped, "module", wrapped).named_parameters()}
        groups.extend({"weight_decay": g["weight_decay"], "params": sorted(names[id(p)] for p in g["params"])} for g in optimizer.param_groups)

    fit(model, cfg, train, val, on_epoch_end=record)
    return groups


def _worker(rank: int, folder: str, case: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30))
    try:
        if case == "evaluate":
            result = _fit_with_uneven_validation(rank, folder, VAL_SIZES)
        else:
            torch.manual_seed(0)
            result = _optimizer_groups(nn.parallel.DistributedDataParallel(build_model(_swin_spec())), WORLD, rank)
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _run_on_two_ranks(tmp_path: Path, case: str) -> list:
    mp.start_processes(_worker, args=(str(tmp_path), case), nprocs=WORLD, start_method="spawn", join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_validation_with_uneven_shards_matches_rank_0s_model_in_one_process(tmp_path):
    """No hang when ranks hold different batch counts (or none), and the figures are those of the
    model rank 0 checkpoints (its BatchNorm statistics included), over every validation image.
    SyncBatchNorm itself cannot be DDP-wrapped on CPU modules; tests/test_gpu.py covers it."""
    per_rank = _run_on_two_ranks(tmp_path, "evaluate")
    assert per_rank[0] == per_rank[1]  # every rank gets the all-reduced figures
    for n, figures in zip(VAL_SIZES, per_rank[0]):
        model = build_model(ModelSpec("resnet_tiny", 10))
        model.load_state_dict(torch.load(tmp_path / f"weights{n}.pt", weights_only=True))
        images, labels = _images(n)
        alone = evaluate(model, DeviceLoader(images, labels, 256, train=False), bf16=False)
        assert figures == pytest.approx(alone, rel=1e-6), n


def test_optimizer_groups_do_not_depend_on_the_worker_count(tmp_path):
    """timm keeps Swin's position-bias tables out of weight decay through the model's
    no_weight_decay(); the groups must be the same with 1 worker and with a DDP wrapper."""
    one_worker = _optimizer_groups(build_model(_swin_spec()), world=1, rank=0)
    bias_tables = [name for g in one_worker if g["weight_decay"] == 0 for name in g["params"] if "relative_position_bias_table" in name]
    assert bias_tables, "Swin's relative position bias tables should be left out of weight decay"
    two_workers = _run_on_two_ranks(tmp_path, "optimizer")
    assert two_workers[0] == one_worker
    assert two_workers[1] == one_worker
