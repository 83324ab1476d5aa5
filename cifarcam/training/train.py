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
from cifarcam.training.checkpoint import unwrap
from cifarcam.training.loader import DeviceLoader
from cifarcam.training.optim import build_optimizer, build_scheduler


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
    # one rank (a single-GPU trial) has nothing to sum: no collective, whatever the backend
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision elsewhere (CPU bf16 is slower than fp32 here)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) before evaluating.

    DDP broadcasts them at the start of each training forward, so after the last step every rank
    holds its own update; rank 0's are the ones its checkpoint stores. One broadcast per buffer,
    the same sequence on every rank, whatever its share of the validation split."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


@torch.no_grad()
def evaluation_totals(model: nn.Module, loader: DeviceLoader, bf16: bool = True) -> torch.Tensor:
    """(loss sum, top-1 hits, top-5 hits, images) over this rank's shard, on the device.

    No host synchronisation and no collective: ranks may hold different batch counts."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=loader.device)
    for images, labels in loader:
        with autocast(loader.device, bf16):
            logits = model(images)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        totals[0] += F.cross_entropy(logits, labels, reduction="sum")
        totals[1] += hits[:, 0].sum()
        totals[2] += hits.any(1).sum()
        totals[3] += len(labels)  # a scalar operand: no host-to-device copy
    return totals


def evaluate(model: nn.Module, loader: DeviceLoader, bf16: bool = True) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy over every image of the loader's split (all ranks).

    Runs the unwrapped module: a DDP wrapper would add collectives to forward passes whose count
    differs between ranks with uneven shards. One all-reduce and one host read at the end."""
    totals = evaluation_totals(unwrap(model), loader, bf16)
    loss, top1, top5_hits, n = _sum_across_ranks(totals).tolist()
    return {"loss": loss / n, "top1": top1 / n, "top5": top5_hits / n}


@torch.no_grad()
def predictions_on_device(model: nn.Module, loader: DeviceLoader, bf16: bool = True, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k classes, their softmax probabilities) per image in loader order, left on the device."""
    model.eval()
    classes, probs = [], []
    for images, _ in loader:
        with autocast(loader.device, bf16):
            logits = model(images)
        p, c = logits.float().softmax(1).topk(min(k, logits.shape[1]), dim=1)
        classes.append(c)
        probs.append(p)
    return torch.cat(classes), torch.cat(probs)


def predict(model: nn.Module, loader: DeviceLoader, bf16: bool = True, k: int = 5) -> dict[str, np.ndarray]:
    """Per image, in loader order: the top-k classes and their softmax probabilities."""
    classes, probs = predictions_on_device(unwrap(model), loader, bf16, k)
    return {"topk_classes": classes.cpu().numpy(), "topk_probs": probs.cpu().numpy()}


def train_epoch(
    step_model: nn.Module,
    model: nn.Module,
    loader: DeviceLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
) -> torch.Tensor:
    """One pass over this rank's shard; returns the summed loss, on the device.

    ``step_model`` runs the steps (``model``, possibly compiled); ``model`` owns the parameters.
    No host synchronisation inside: the loss is never read per step."""
    model.train()
    loss_sum = torch.zeros((), device=loader.device)
    for images, labels in loader:
        with autocast(loader.device, cfg.bf16):
            loss = F.cross_entropy(step_model(images), labels, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip_norm:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach()
    return loss_sum


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
    # On the unwrapped module: timm reads its no_weight_decay() (Swin's position-bias tables),
    # which a DDP wrapper hides, and the groups must not depend on the worker count.
    optimizer = build_optimizer(unwrap(model), cfg)
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
        started = time.perf_counter()
        loss_sum = train_epoch(step_model, model, train_loader, optimizer, scheduler, cfg)
        # One sync per epoch: a NaN on any rank makes the sum NaN on every rank, so all stop together.
        steps = torch.full((), float(len(train_loader)), device=device)
        totals = _sum_across_ranks(torch.stack([loss_sum.float(), steps]))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time = time.perf_counter() - started
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        train_loss = (totals[0] / totals[1]).item()
        diverged = not math.isfinite(train_loss)
        if diverged:
            val = {"loss": math.nan, "top1": 0.0, "top5": 0.0}
        else:
            broadcast_buffers(unwrap(model))
            val = evaluate(model, val_loader, cfg.bf16)
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
