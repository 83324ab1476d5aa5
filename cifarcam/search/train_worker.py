"""One worker of one trial: the function Ray Train runs on every DDP rank.

Data reaches the workers through the object store: the driver ``ray.put``s the uint8 arrays once,
and each worker ``ray.get``s them (zero-copy on a node, no shared filesystem needed for data).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from cifarcam.config import TrainConfig
from cifarcam.training import DeviceLoader, EpochMetrics, ModelSpec, build_model, fit, load_train_state, load_weights, read_meta, save_checkpoint


@dataclass(frozen=True)
class WorkerInputs:
    """What the trial driver hands every worker (Ray Train's ``train_loop_config["inputs"]``)."""

    train: TrainConfig  # the trial's hyperparameters
    num_classes: int
    class_names: list[str]
    dataset: str
    data: list[Any]  # object refs: train images, train labels, val images, val labels


def _distinct_nodes(world: int) -> int:
    """How many Ray nodes this trial's workers span (recorded so a run shows its placement)."""
    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return 1
    ids: list[Any] = [None] * world
    torch.distributed.all_gather_object(ids, node)
    return len(set(ids))


def train_worker(config: dict[str, Any]) -> None:
    """Runs on every DDP worker: fetch data from the object store, build, fit, report."""
    inputs: WorkerInputs = config["inputs"]
    cfg = inputs.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec = ModelSpec(cfg.model, inputs.num_classes, cfg.stem, cfg.input_size)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)

    train_x, train_y, val_x, val_y = ray.get(inputs.data)
    model = build_model(spec, cfg.pretrained)
    resume, history = None, []
    restored = ray.train.get_checkpoint()
    if restored is not None:  # a worker restarted after a failure: continue from the last epoch
        with restored.as_directory() as folder:
            load_weights(model, folder, spec)
            resume = load_train_state(folder)
            history = read_meta(folder).get("history", [])
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # moves to the device, wraps in DDP when world > 1

    loader_args = dict(device=device, rank=rank, world_size=world, seed=cfg.seed, input_size=cfg.input_size)
    train_loader = DeviceLoader(train_x, train_y, cfg.batch_size, train=True, **loader_args)
    val_loader = DeviceLoader(val_x, val_y, max(cfg.batch_size, 256), train=False, **loader_args)
    nodes = _distinct_nodes(world)
    meta = {"train": dataclasses.asdict(cfg), "class_names": inputs.class_names, "dataset": inputs.dataset}

    def report(metrics: EpochMetrics, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
        values = {**metrics.to_dict(), "model": spec.family, "workers": world, "nodes": nodes}
        history.append(values)
        if rank != 0:  # every rank reports (Train needs it); only rank 0 writes a checkpoint
            ray.train.report(values, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            # Every epoch so far rides along: Tune restarts a resumed trial's log, the checkpoint keeps it.
            save_checkpoint(Path(tmp), model, spec, meta | {"history": history}, optimizer, scheduler, epoch=metrics.epoch)
            ray.train.report(values, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    fit(model, cfg, train_loader, val_loader, on_epoch_end=report, resume=resume)
