"""Training throughput: cifarcam's fit() with its device-side loader against the usual loop.

Baseline: a torchvision-style CIFAR Dataset (PIL image per item; RandomCrop(32, padding=4),
RandomHorizontalFlip, ToTensor, Normalize) behind a DataLoader, and a plain training loop that
reads the loss every step, on the same model (as built: NCHW), the same images, the same number
of steps and the same precision (bf16 autocast on CUDA where the config asks for it, as fit()
does; fp32 on CPU). A second baseline adds only channels_last to that loop, to show how much
of the gain is memory format and how much is the loader. All run in this process, interleaved,
so the printed ratios compare like with like on a noisy machine. The last line is a JSON object
of the figures.

    python benchmarks/train_throughput.py [--model resnet_tiny] [--device cpu|cuda] [--steps 40]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cifarcam.config import DataConfig, TrainConfig  # noqa: E402
from cifarcam.data.splits import CIFAR_MEAN, CIFAR_STD, load_splits  # noqa: E402
from cifarcam.training.loader import DeviceLoader  # noqa: E402
from cifarcam.training.models import ModelSpec, build_model  # noqa: E402
from cifarcam.training.optim import build_optimizer  # noqa: E402
from cifarcam.training.train import autocast, fit  # noqa: E402

# Dense bf16 peak of common accelerators, TFLOP/s (vendor figures), for model FLOPs utilisation.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


class PILCifar(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: uint8 array -> PIL -> transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def baseline_images_per_s(model, cfg, images, labels, device, steps, workers) -> float:
    loader = DataLoader(
        PILCifar(images, labels),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    optimizer = build_optimizer(model, cfg)
    model.train()
    seen, started = 0, None
    for step, (x, y) in enumerate(loader):
        if step == 2:  # the first batches include worker start-up: not steady state
            if device.type == "cuda":
                torch.cuda.synchronize()
            started, seen = time.perf_counter(), 0
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, cfg.bf16):  # the same precision as fit()
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _ = loss.item()  # the usual running-loss bookkeeping
        seen += len(y)
        if step == steps + 1:
            break
    return seen / (time.perf_counter() - started)


def ours_images_per_s(model, cfg, images, labels, device, steps) -> float:
    """fit()'s throughput in its second epoch: the first pays for compilation and cuDNN autotuning."""
    n = steps * cfg.batch_size
    train = DeviceLoader(images[:n], labels[:n], cfg.batch_size, device=device)
    val = DeviceLoader(images[:256], labels[:256], 256, device=device, train=False)
    history = fit(model, dataclasses.replace(cfg, epochs=2), train, val)
    return history[-1].images_per_s


def flops_per_image(model, device, bf16: bool) -> float:
    """Forward + backward FLOPs of one training image (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(8, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
        model(x).sum().backward()
    return counter.get_total_flops() / 8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet_tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="timed optimizer steps per measurement")
    p.add_argument("--repeats", type=int, default=3, help="interleaved measurements of each loop")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for the baseline")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"), help="CIFAR-10 Parquet folder")
    p.add_argument("--mfu-model", default="resnet50", help="model whose FLOPs utilisation is reported on a GPU")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True

    splits = load_splits(DataConfig(source="parquet", path=args.data, limit_train=max(10_000, (args.steps + 3) * args.batch_size)))
    images, labels = splits.train.images, splits.train.labels
    cfg = TrainConfig(model=args.model, epochs=1, batch_size=args.batch_size, lr=1e-3, scheduler="none", channels_last=True)
    spec = ModelSpec(args.model, 10, "cifar", 32)

    def fresh_model(channels_last: bool):
        torch.manual_seed(0)
        model = build_model(spec).to(device)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    ours, base, base_cl = [], [], []
    for _ in range(args.repeats):
        base.append(baseline_images_per_s(fresh_model(False), cfg, images, labels, device, args.steps, args.workers))
        base_cl.append(baseline_images_per_s(fresh_model(True), cfg, images, labels, device, args.steps, args.workers))
        ours.append(ours_images_per_s(fresh_model(True), cfg, images, labels, device, args.steps))
    ratio = statistics.median(o / b for o, b in zip(ours, base))
    loader_ratio = statistics.median(o / b for o, b in zip(ours, base_cl))
    target = 5.0 if device.type == "cuda" else 1.5
    precision = "bf16 autocast" if cfg.bf16 and device.type == "cuda" else "fp32"
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), model {args.model}, batch {args.batch_size}, {args.steps} steps x {args.repeats}, {precision} on both sides"
    )
    print(f"baseline: PIL Dataset + DataLoader ({args.workers} workers) + plain loop:  " + ", ".join(f"{b:.0f}" for b in base) + " images/s")
    print("baseline + channels_last model:                                " + ", ".join(f"{b:.0f}" for b in base_cl) + " images/s")
    print("cifarcam fit() (device-side loader, channels_last, no per-step sync): " + ", ".join(f"{o:.0f}" for o in ours) + " images/s")
    print(f"speed-up over the baseline (median of paired ratios): {ratio:.2f}x (target >= {target}x)")
    print(f"  of which the loader and loop, at equal memory format: {loader_ratio:.2f}x")
    figures = {
        "device": str(device),
        "model": args.model,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "precision": precision,
        "baseline_images_per_s": base,
        "baseline_channels_last_images_per_s": base_cl,
        "ours_images_per_s": ours,
        "speedup": ratio,
        "speedup_at_equal_memory_format": loader_ratio,
        "target": target,
    }
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        mfu_cfg = TrainConfig(model=args.mfu_model, epochs=1, batch_size=256, lr=1e-3, scheduler="none", bf16=True)
        model = build_model(ModelSpec(args.mfu_model, 10, "cifar", 32)).to(device).to(memory_format=torch.channels_last)
        flops = flops_per_image(model, device, bf16=True)
        rate = ours_images_per_s(model, mfu_cfg, images, labels, device, args.steps)
        achieved = rate * flops / 1e12
        figures |= {
            "mfu_model": args.mfu_model,
            "mfu_images_per_s": rate,
            "flops_per_image": flops,
            "achieved_tflops": achieved,
            "peak_tflops": peak,
            "mfu": achieved / peak if peak else None,
        }
        print(
            f"{args.mfu_model} (CIFAR stem, bf16): {rate:.0f} images/s, {achieved:.1f} TFLOP/s"
            + (f" = {100 * achieved / peak:.1f}% of {peak:.0f} peak" if peak else "")
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
