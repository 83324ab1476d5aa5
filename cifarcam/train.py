"""Plain PyTorch training and evaluation (no Ray here: ``search.py`` is the only Ray glue).

Rank awareness is limited to summing metrics across processes when torch.distributed is up;
the caller wraps the model in DDP and hands each rank its shard through the loaders.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cifarcam.config import TrainConfig
from cifarcam.loader import DeviceLoader
from cifarcam.optim import build_optimizer, build_scheduler


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # 1-based: epochs completed
    train_loss: float
    val_loss: float
    val_top1: float
    val_top5: float
    images_per_s: float  # training throughput over all ranks
    lr: float
    epoch_time_s: float
    diverged: bool  # the training loss became NaN or infinite: training stops here

    def to_dict(self) -> dict:
        return asdict(self)


def _sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
    return values


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision elsewhere (CPU bf16 is slower than fp32 here)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DeviceLoader, bf16: bool = True) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy over every image of the loader's split (all ranks)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=loader.device)  # loss, top1, top5, n
    for images, labels in loader:
        with autocast(loader.device, bf16):
            logits = model(images)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        totals += torch.stack(
            [F.cross_entropy(logits, labels, reduction="sum"), hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(labels))]
        ).to(totals)
    loss, top1, top5_hits, n = _sum_across_ranks(totals).tolist()
    return {"loss": loss / n, "top1": top1 / n, "top5": top5_hits / n}


@torch.no_grad()
def predict(model: nn.Module, loader: DeviceLoader, bf16: bool = True, k: int = 5) -> dict[str, np.ndarray]:
    """Per image, in loader order: the top-k classes and their softmax probabilities."""
    model.eval()
    classes, probs = [], []
    for images, _ in loader:
        with autocast(loader.device, bf16):
            logits = model(images)
        p, c = logits.float().softmax(1).topk(min(k, logits.shape[1]), dim=1)
        classes.append(c.cpu())
        probs.append(p.cpu())
    return {"topk_classes": torch.cat(classes).numpy(), "topk_probs": torch.cat(probs).numpy()}


EpochCallback = Callable[[EpochMetrics, nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler], None]


def fit(
    model: nn.Module,
    cfg: TrainConfig,
    train_loader: DeviceLoader,
    val_loader: DeviceLoader,
    on_epoch_end: EpochCallback | None = None,
    resume: dict | None = None,
) -> list[EpochMetrics]:
    """Train ``model`` (already on the device, possibly DDP-wrapped) for ``cfg.epochs``.

    ``resume`` (``{"epoch", "optimizer", "scheduler"}`` from a checkpoint) continues a run.
    Stops early, with ``diverged=True`` in the last metrics, when the loss is not finite.
    """
    device = train_loader.device
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=len(train_loader))
    start_epoch = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start_epoch = int(resume["epoch"])
    step_model = torch.compile(model) if cfg.compile else model
    history: list[EpochMetrics] = []
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=device)
        started = time.perf_counter()
        for images, labels in train_loader:
            with autocast(device, cfg.bf16):
                loss = F.cross_entropy(step_model(images), labels, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip_norm:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()  # no .item() per step: the device never waits for the host
        # One sync per epoch: a NaN on any rank makes the sum NaN on every rank, so all stop together.
        totals = _sum_across_ranks(torch.stack([loss_sum.float(), torch.tensor(float(len(train_loader)), device=device)]))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time = time.perf_counter() - started
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        train_loss = (totals[0] / totals[1]).item()
        diverged = not math.isfinite(train_loss)
        val = {"loss": math.nan, "top1": 0.0, "top5": 0.0} if diverged else evaluate(model, val_loader, cfg.bf16)
        metrics = EpochMetrics(
            epoch=epoch + 1,
            train_loss=train_loss,
            val_loss=val["loss"],
            val_top1=val["top1"],
            val_top5=val["top5"],
            images_per_s=train_loader.num_images * world / train_time,
            lr=optimizer.param_groups[0]["lr"],
            epoch_time_s=time.perf_counter() - started,
            diverged=diverged,
        )
        history.append(metrics)
        if on_epoch_end is not None:
            on_epoch_end(metrics, model, optimizer, scheduler)
        if diverged:
            break
    return history
