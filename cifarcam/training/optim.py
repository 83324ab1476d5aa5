"""Optimizers (timm's factory) and per-step learning-rate schedules with warmup (torch's).

Built from a TrainConfig, so this imports config and config never imports this."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, MultiStepLR, OneCycleLR, SequentialLR

from cifarcam.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from cifarcam.config import TrainConfig


def check_optimizer_name(name: str, where: str = "optimizer") -> None:
    """Any optimizer timm's factory knows: 'adamw', 'sgd' (SGD with Nesterov momentum), 'momentum' …"""
    from timm.optim import list_optimizers

    known = list_optimizers()
    if name not in known:
        hint = did_you_mean(name, known) or "expected a timm optimizer name such as adamw or sgd"
        raise ConfigError(f"{where}: unknown optimizer {name!r}; {hint}")


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # timm leaves biases and norm weights out of weight decay (filter_bias_and_bn), as the
    # paper-era recipes do; its 'sgd' is SGD with momentum and Nesterov.
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LRScheduler:
    """A scheduler stepped once per optimizer step, with ``warmup_epochs`` of linear warmup."""
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.scheduler == "onecycle":  # one-cycle has its own warmup: its rising phase
        return OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total, pct_start=max(warmup / total, 0.01))
    after = total - warmup
    if cfg.scheduler == "cosine":
        main: LRScheduler = CosineAnnealingLR(optimizer, T_max=max(after, 1))
    elif cfg.scheduler == "multistep":
        main = MultiStepLR(optimizer, milestones=[int(f * total) - warmup for f in cfg.milestones], gamma=0.1)
    elif cfg.scheduler == "none":
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        raise ConfigError(f"scheduler: unknown scheduler {cfg.scheduler!r}")
    if warmup == 0:
        return main
    ramp = LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])
