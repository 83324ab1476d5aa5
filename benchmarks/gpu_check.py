"""The GPU check: the GPU tests, then the figures a GPU must show, in one run (`make gpu-check`).

    python benchmarks/gpu_check.py [--out results/gpu-check] [--cpu] [--data ../shared/data/cifar10-jpeg]

On a CUDA GPU (sized to finish within 8 minutes on one H100/H200):
  1. `pytest -m gpu` (training with bf16 + channels_last + compile, evaluate/predict, the CAM fast
     path against pytorch-grad-cam, Ray Train on NCCL, the pipeline end to end);
  2. training: images/s and MFU of resnet50 (CIFAR stem, bf16, channels_last) at batch 256 and
     512, with and without torch.compile; FLOPs counted by torch.utils.flop_counter;
  3. the ratio to a torchvision DataLoader + PIL-transform loop at the same precision;
  4. the CAM fast path on the 10,000 test images against the per-image pytorch-grad-cam loop,
     batched pytorch-grad-cam and the forward + activation-only backward limit; the CAM actor's
     work with faithfulness on and off;
  5. the Ray Data stage against the same work in a plain loop;
  6. one paper-config epoch (resnet50, ImageNet stem, 32 px, batch 64, 45,000 images), its peak
     memory, and the combined images/s of 1, 2, 4 and 8 such trials sharing the GPU.
Without CUDA (or with --cpu) it runs the same code in a small CPU mode in under 2 minutes, which
CI runs so that the script cannot rot; its figures say nothing about a GPU.

Writes gpu_check.json and gpu_check.md (the table for the README) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cam_throughput import cam_rates, stage_vs_loop, timed  # noqa: E402
from train_throughput import PEAK_BF16_TFLOPS, baseline_images_per_s, flops_per_image, ours_images_per_s  # noqa: E402

from cifarcam.config import DataConfig, TrainConfig  # noqa: E402
from cifarcam.data import load_splits  # noqa: E402
from cifarcam.loader import DeviceLoader, to_model_input  # noqa: E402
from cifarcam.models import ModelSpec, build_model  # noqa: E402
from cifarcam.optim import build_optimizer, build_scheduler  # noqa: E402
from cifarcam.train import train_epoch  # noqa: E402

GPU_TESTS_TIMEOUT_S = 300
PACKING_TIMEOUT_S = 120
GOALS = {
    "mfu": ("MFU of the bf16 resnet50 training step at batch >= 256", 0.35),
    "train_vs_pil": ("training / DataLoader + PIL baseline (same precision)", 5.0),
    "cam_vs_per_image": ("CAM fast path / per-image pytorch-grad-cam loop", 20.0),
    "cam_vs_batched": ("CAM fast path / batched pytorch-grad-cam", 3.0),
    "stage_over_loop": ("Ray Data stage time / plain loop time (at most)", 1.3),
}


@dataclass(frozen=True)
class Sizes:
    """What each measurement runs on: the GPU sizes, or the small CPU mode."""

    train_model: str
    train_batches: tuple[int, ...]
    compile_options: tuple[bool, ...]
    train_steps: int
    baseline_workers: int
    cam_model: str
    cam_images: int
    cam_per_image: int
    cam_batch: int
    stage_images: int
    paper_model: str
    paper_images: int
    packing: tuple[int, ...]
    packing_steps: int


GPU_SIZES = Sizes("resnet50", (256, 512), (False, True), 60, 12, "resnet50", 10_000, 256, 256, 10_000, "resnet50", 45_000, (1, 2, 4, 8), 150)
CPU_SIZES = Sizes("resnet_tiny", (64,), (False,), 8, 2, "resnet_tiny", 256, 16, 128, 512, "resnet_tiny", 2_000, (), 0)


def run_gpu_tests(data: str) -> dict:
    env = {**os.environ, "CIFARCAM_DATA": str(Path(data).resolve().parent)}  # the tests' data: the same folder
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=GPU_TESTS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"GPU tests: timed out after {GPU_TESTS_TIMEOUT_S} s")
        return {"returncode": 124, "summary": f"timed out after {GPU_TESTS_TIMEOUT_S} s"}
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    print(f"GPU tests: {summary}")
    if proc.returncode:
        print(proc.stdout[-6000:])
    return {"returncode": proc.returncode, "summary": summary}


def training(sizes: Sizes, device: torch.device, images: np.ndarray, labels: np.ndarray, peak_tflops: float | None) -> list[dict]:
    """fit()'s images/s and MFU for each batch size and compile setting."""
    spec = ModelSpec(sizes.train_model, 10, "cifar", 32)
    model = build_model(spec).to(device).to(memory_format=torch.channels_last)
    flops = flops_per_image(model, device, bf16=True)
    rows = []
    for batch in sizes.train_batches:
        for compiled in sizes.compile_options:
            torch.manual_seed(0)
            model = build_model(spec).to(device).to(memory_format=torch.channels_last)
            cfg = TrainConfig(model=sizes.train_model, epochs=1, batch_size=batch, lr=1e-3, scheduler="none", bf16=True, compile=compiled)
            rate = ours_images_per_s(model, cfg, images, labels, device, sizes.train_steps)
            achieved = rate * flops / 1e12
            precision = "bf16" if device.type == "cuda" else "fp32"  # fit() autocasts on CUDA only
            rows.append(
                {
                    "model": sizes.train_model,
                    "precision": precision,
                    "batch": batch,
                    "compile": compiled,
                    "images_per_s": rate,
                    "tflops": achieved,
                    "mfu": achieved / peak_tflops if peak_tflops else None,
                }
            )
            print(
                f"train {sizes.train_model} batch {batch} compile={compiled}: {rate:.0f} images/s, {achieved:.1f} TFLOP/s"
                + (f", MFU {100 * achieved / peak_tflops:.1f}%" if peak_tflops else "")
            )
            torch._dynamo.reset()
    return rows


def against_pil_baseline(sizes: Sizes, device: torch.device, images: np.ndarray, labels: np.ndarray) -> dict:
    batch = sizes.train_batches[0]
    cfg = TrainConfig(model=sizes.train_model, epochs=1, batch_size=batch, lr=1e-3, scheduler="none", bf16=True)
    spec = ModelSpec(sizes.train_model, 10, "cifar", 32)
    torch.manual_seed(0)
    base = baseline_images_per_s(build_model(spec).to(device), cfg, images, labels, device, sizes.train_steps, sizes.baseline_workers)
    torch.manual_seed(0)
    ours = ours_images_per_s(build_model(spec).to(device).to(memory_format=torch.channels_last), cfg, images, labels, device, sizes.train_steps)
    print(f"train vs DataLoader + PIL ({sizes.baseline_workers} workers), batch {batch}: {ours:.0f} / {base:.0f} images/s = {ours / base:.2f}x")
    return {"batch": batch, "baseline_images_per_s": base, "ours_images_per_s": ours, "ratio": ours / base, "baseline_workers": sizes.baseline_workers}


def cam(sizes: Sizes, device: torch.device, test) -> dict:
    """The fast path against pytorch-grad-cam and the limit; the actor with faithfulness on/off."""
    from cifarcam.cam_actor import CamActor, images_table
    from cifarcam.cam_settings import CamSettings, resolve_layers
    from cifarcam.checkpoint import save_checkpoint

    spec = ModelSpec(sizes.cam_model, 10)
    torch.manual_seed(0)
    model = build_model(spec).to(device).eval()
    pixels = torch.from_numpy(test.images[: sizes.cam_images]).to(device)
    batches = [to_model_input(pixels[i : i + sizes.cam_batch]) for i in range(0, len(pixels), sizes.cam_batch)]
    rates = cam_rates(model, "layer3", batches, sizes.cam_per_image, device)
    subset = test.subset(np.arange(min(sizes.cam_images, len(test))))
    actor_rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(save_checkpoint(Path(tmp), model, spec, {}))
        layers = resolve_layers(spec, ("layer3",), spec.family)
        for steps in (0, 16):  # off, and the default (16 steps on the default 128-image sample)
            settings = CamSettings(methods=("gradcam",), layers=("layer3",), targets=("pred",), batch_size=sizes.cam_batch, faithfulness_steps=steps)
            table = images_table(subset, faithfulness=settings.faithfulness)
            actor = CamActor(ckpt, "check", settings, layers)
            actor(table.slice(0, sizes.cam_batch))  # warm-up
            seconds = timed(lambda actor=actor, table=table: [actor(table.slice(i, sizes.cam_batch)) for i in range(0, len(subset), sizes.cam_batch)], device)
            actor_rates[f"actor_faithfulness_{steps}_steps"] = len(subset) / seconds
    figures = {f"{k}_images_per_s": v for k, v in {**rates, **actor_rates}.items()}
    figures |= {
        "images": len(subset),
        "vs_per_image": rates["ours"] / rates["a_per_image"],
        "vs_batched": rates["ours"] / rates["b_batched"],
        "limit_over_ours": rates["d_forward_activation_backward"] / rates["ours"],
    }
    for k, v in figures.items():
        print(f"cam {k}: {v:.2f}" if isinstance(v, float) else f"cam {k}: {v}")
    return figures


def paper_epoch(sizes: Sizes, device: torch.device, images: np.ndarray, labels: np.ndarray) -> dict:
    """One epoch of the paper's setting: the ImageNet stem at 32 px, batch 64, 45,000 images."""
    cfg = TrainConfig(model=sizes.paper_model, stem="imagenet", epochs=1, batch_size=64, lr=1e-3, scheduler="none", bf16=True)
    n = min(sizes.paper_images, len(labels))
    torch.manual_seed(0)
    model = build_model(ModelSpec(sizes.paper_model, 100, "imagenet", 32)).to(device).to(memory_format=torch.channels_last)
    loader = DeviceLoader(images[:n], labels[:n], 64, device=device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(loader))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm = DeviceLoader(images[:640], labels[:640], 64, device=device)
    train_epoch(model, model, warm, optimizer, scheduler, cfg)  # cuDNN autotuning, allocator
    seconds = timed(lambda: train_epoch(model, model, loader, optimizer, scheduler, cfg), device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    figures = {
        "model": sizes.paper_model,
        "images": n,
        "epoch_s": seconds,
        "images_per_s": len(loader) * 64 / seconds,
        "peak_memory_gib": peak / 2**30 if peak else None,
    }
    if peak:
        total = torch.cuda.get_device_properties(device).total_memory
        figures["trials_that_fit_in_memory"] = int(0.9 * total // peak)
    print(
        f"paper epoch ({sizes.paper_model}, ImageNet stem, 32 px, batch 64, {n} images): {seconds:.1f} s" + (f", peak {peak / 2**30:.2f} GiB" if peak else "")
    )
    return figures


def _packed_trial(rank: int, sizes: Sizes, images: np.ndarray, labels: np.ndarray, barrier, results) -> None:
    """One of k trials sharing the GPU: warm up, wait for the others, then time the same steps."""
    device = torch.device("cuda")
    cfg = TrainConfig(model=sizes.paper_model, stem="imagenet", epochs=1, batch_size=64, lr=1e-3, scheduler="none", bf16=True)
    torch.manual_seed(rank)
    model = build_model(ModelSpec(sizes.paper_model, 100, "imagenet", 32)).to(device).to(memory_format=torch.channels_last)
    loader = DeviceLoader(images, labels, 64, device=device, seed=rank)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 2 * len(loader))
    train_epoch(model, model, loader, optimizer, scheduler, cfg)
    torch.cuda.synchronize()
    barrier.wait(timeout=PACKING_TIMEOUT_S)
    seconds = timed(lambda: train_epoch(model, model, loader, optimizer, scheduler, cfg), device)
    results.put(len(loader) * 64 / seconds)


def packing(sizes: Sizes, images: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Combined images/s of k paper-config trials on one GPU, as fractional GPUs would pack them.

    Each child gets only the images it trains on (spawn pickles its arguments), runs as a daemon
    and is stopped here whatever happens, so that a child that dies cannot hang the check."""
    import queue

    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    n = sizes.packing_steps * 64
    rows = []
    for k in sizes.packing:
        barrier, results = context.Barrier(k), context.Queue()
        procs = [context.Process(target=_packed_trial, args=(r, sizes, images[:n], labels[:n], barrier, results), daemon=True) for r in range(k)]
        try:
            for proc in procs:
                proc.start()
            rates = [results.get(timeout=PACKING_TIMEOUT_S) for _ in procs]
        except queue.Empty:
            codes = [proc.exitcode for proc in procs]
            print(f"packing: {k} trials did not finish within {PACKING_TIMEOUT_S} s (exit codes {codes}); stopping here")
            rows.append({"trials": k, "combined_images_per_s": None, "per_trial_images_per_s": None, "failed": f"exit codes {codes}"})
            break
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
                proc.join()
        rows.append({"trials": k, "combined_images_per_s": sum(rates), "per_trial_images_per_s": sum(rates) / k})
        print(f"packing: {k} trial(s) on one GPU: {sum(rates):.0f} images/s combined, {sum(rates) / k:.0f} each")
    base = rows[0]["combined_images_per_s"] if rows else None
    for row in rows:
        row["speedup_over_one"] = row["combined_images_per_s"] / base if base and row["combined_images_per_s"] else None
    return rows


def markdown(figures: dict) -> str:
    env = figures["environment"]
    lines = [f"GPU check on {env['device_name']} ({env['mode']} mode), torch {env['torch']}, {env['date']}.", ""]
    if figures.get("gpu_tests"):
        lines += [f"GPU tests: {figures['gpu_tests']['summary']}", ""]
    lines += ["| training | batch | compile | images/s | TFLOP/s | MFU |", "|---|---|---|---|---|---|"]
    for r in figures["training"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(
            f"| {r['model']} (CIFAR stem, {r['precision']}, channels_last) | {r['batch']} | {r['compile']} | {r['images_per_s']:.0f} | {r['tflops']:.1f} | {mfu} |"
        )
    b = figures["baseline"]
    c = figures["cam"]
    s = figures["stage"]
    p = figures["paper_epoch"]
    lines += [
        "",
        "| measurement | figure |",
        "|---|---|",
        f"| training vs DataLoader + PIL ({b['baseline_workers']} workers, same precision), batch {b['batch']} | {b['ours_images_per_s']:.0f} / {b['baseline_images_per_s']:.0f} images/s = {b['ratio']:.2f}x |",
        f"| CAM fast path, {c['images']} test images | {c['ours_images_per_s']:.0f} images/s |",
        f"| vs per-image pytorch-grad-cam / batched / activation-only limit | {c['vs_per_image']:.1f}x / {c['vs_batched']:.2f}x / limit at {c['limit_over_ours']:.2f}x ours |",
        f"| CAM actor, faithfulness off / on (16 steps, 128-image sample) | {c['actor_faithfulness_0_steps_images_per_s']:.0f} / {c['actor_faithfulness_16_steps_images_per_s']:.0f} images/s |",
        f"| Ray Data stage / plain loop, {s['stage_images']} images | {s['stage_s']:.1f} s / {s['plain_loop_s']:.1f} s = {s['stage_over_loop']:.2f} |",
        f"| paper-config epoch ({p['model']}, ImageNet stem, 32 px, batch 64, {p['images']} images) | {p['epoch_s']:.1f} s, {p['images_per_s']:.0f} images/s"
        + (f", peak {p['peak_memory_gib']:.2f} GiB, {p['trials_that_fit_in_memory']} fit in memory" if p.get("peak_memory_gib") else "")
        + " |",
    ]
    for r in figures["packing"]:
        shown = (
            f"{r['combined_images_per_s']:.0f} images/s combined ({r['speedup_over_one']:.2f}x one)"
            if r["combined_images_per_s"]
            else f"failed ({r['failed']})"
        )
        lines.append(f"| {r['trials']} paper trial(s) sharing the GPU | {shown} |")
    lines += ["", "| goal | target | measured | met |", "|---|---|---|---|"]
    for key, (text, target) in GOALS.items():
        value = figures["goals"].get(key)
        if value is None or env["mode"] == "cpu":
            met = "n/a"
        else:
            met = "yes" if (value <= target if key == "stage_over_loop" else value >= target) else "no"
        shown = "n/a" if value is None else (f"{100 * value:.1f}%" if key == "mfu" else f"{value:.2f}")
        lines.append(f"| {text} | {100 * target:.0f}% |" if key == "mfu" else f"| {text} | {target:g} |")
        lines[-1] += f" {shown} | {met} |"
    if env["mode"] == "cpu":
        lines += ["", "CPU mode: small sizes on the CPU, to keep the script working; the goals are for a GPU and are not judged here."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "gpu-check", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--cpu", action="store_true", help="the small CPU mode even where CUDA exists")
    p.add_argument("--skip-tests", action="store_true", help="measure only (the GPU tests already passed)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"), help="CIFAR-10 Parquet folder")
    args = p.parse_args()
    if args.cpu:  # hide the GPUs from this process and the local Ray it starts (CAM actors included)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    sizes = GPU_SIZES if gpu else CPU_SIZES
    torch.backends.cudnn.benchmark = True
    started = time.perf_counter()

    name = torch.cuda.get_device_name() if gpu else platform.processor() or "CPU"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None) if gpu else None
    figures: dict = {
        "environment": {
            "mode": "gpu" if gpu else "cpu",
            "device_name": name,
            "peak_bf16_tflops": peak,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
        },
        "sizes": dataclasses.asdict(sizes),
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section: a check cut short still leaves what it measured
        figures["seconds"] = time.perf_counter() - started
        (args.out / "gpu_check.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")

    figures["gpu_tests"] = run_gpu_tests(args.data) if gpu and not args.skip_tests else None
    save()
    splits = load_splits(DataConfig(source="parquet", path=args.data, val_fraction=0.02))  # 49,000 training images
    images, labels = splits.train.images, splits.train.labels
    figures["training"] = training(sizes, device, images, labels, peak)
    save()
    figures["baseline"] = against_pil_baseline(sizes, device, images, labels)
    save()
    figures["cam"] = cam(sizes, device, splits.test)
    save()
    spec = ModelSpec(sizes.cam_model, 10)
    torch.manual_seed(0)
    figures["stage"] = stage_vs_loop(splits.test, spec, build_model(spec).to(device).eval(), "layer3", sizes.cam_batch, sizes.stage_images)
    save()
    figures["paper_epoch"] = paper_epoch(sizes, device, images, labels)
    save()
    figures["packing"] = packing(sizes, images, labels) if gpu else []
    best_mfu = max((r["mfu"] for r in figures["training"] if r["mfu"] is not None and r["batch"] >= 256), default=None)
    figures["goals"] = {
        "mfu": best_mfu,
        "train_vs_pil": figures["baseline"]["ratio"],
        "cam_vs_per_image": figures["cam"]["vs_per_image"],
        "cam_vs_batched": figures["cam"]["vs_batched"],
        "stage_over_loop": figures["stage"]["stage_over_loop"],
    }
    save()
    (args.out / "gpu_check.md").write_text(markdown(figures))
    print(markdown(figures))
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'} in {figures['seconds']:.0f} s")
    if figures["gpu_tests"] and figures["gpu_tests"]["returncode"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
