"""The GPU check's sections: each runs in its own process, started by benchmarks/gpu_check.py.

    python benchmarks/gpu_sections.py SECTION --data CIFAR10_PARQUET_DIR --fragment OUT.json

Writes {"figures": ..., "failed_checks": [...]} to --fragment. On a CUDA GPU it runs the GPU
sizes; on the CPU (CUDA_VISIBLE_DEVICES="" or no GPU) the small CPU sizes, whose figures say
nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cam_throughput import cam_rates, stage_vs_loop, timed  # noqa: E402
from train_throughput import PEAK_BF16_TFLOPS, baseline_images_per_s, flops_per_image, ours_images_per_s  # noqa: E402

from cifarcam.config import DataConfig, TrainConfig  # noqa: E402
from cifarcam.data.splits import ImageSet, load_splits  # noqa: E402
from cifarcam.training.loader import DeviceLoader, to_model_input  # noqa: E402
from cifarcam.training.models import ModelSpec, build_model  # noqa: E402
from cifarcam.training.optim import build_optimizer, build_scheduler  # noqa: E402
from cifarcam.training.train import train_epoch  # noqa: E402

PACKING_TIMEOUT_S = 60


@dataclass(frozen=True)
class Sizes:
    """What each measurement runs on: the GPU sizes (each part within 6 minutes on one H200), or
    the small CPU sizes of the rehearsal."""

    train_model: str
    train_runs: tuple[tuple[int, bool], ...]  # (batch, torch.compile)
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


GPU_SIZES = Sizes("resnet50", ((256, False), (512, False), (512, True)), 40, 12, "resnet50", 10_000, 256, 256, 10_000, "resnet50", 45_000, (1, 4, 8), 40)
# The rehearsal proves the check and its kit, not speeds: the smallest sizes that run every path (CI runs it).
CPU_SIZES = Sizes("resnet_tiny", ((64, False),), 4, 2, "resnet_tiny", 64, 8, 32, 256, "resnet_tiny", 1_000, (), 0)


def repeated(images: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows, the given ones over again: the kit holds 5,000 images per split, and images/s
    does not depend on which images are fed."""
    rows = np.resize(np.arange(len(labels)), n)
    return images[rows], labels[rows]


class Context:
    def __init__(self, data: str, fragment: Path) -> None:
        self.gpu = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.gpu else "cpu")
        self.sizes = GPU_SIZES if self.gpu else CPU_SIZES
        self.data = data
        self.fragment = fragment
        # cuDNN's autotuning stays at PyTorch's default (off) in every section: the search's
        # trials and the CAM actors run so, and what is measured is what they do.

    def partial(self, figures: dict) -> None:
        """What the section has so far, for the check to keep if the section is then killed."""
        self.fragment.write_text(json.dumps({"figures": figures, "failed_checks": [], "partial": True}, default=str))

    def splits(self):
        return load_splits(DataConfig(source="parquet", path=self.data, val_fraction=0.02))

    def peak_tflops(self) -> float | None:
        name = torch.cuda.get_device_name() if self.gpu else ""
        return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def environment(ctx: Context) -> dict:
    name = torch.cuda.get_device_name() if ctx.gpu else platform.processor() or "CPU"
    figures = {
        "mode": "gpu" if ctx.gpu else "cpu",
        "device_name": name,
        "peak_bf16_tflops": ctx.peak_tflops(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "sizes": asdict(ctx.sizes),
    }
    print(f"environment: {name}, torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}")
    return figures


def training(ctx: Context) -> dict:
    """fit()'s images/s and MFU for each batch size and compile setting."""
    sizes, device, peak = ctx.sizes, ctx.device, ctx.peak_tflops()
    train = ctx.splits().train
    images, labels = repeated(train.images, train.labels, max(b for b, _ in sizes.train_runs) * sizes.train_steps)
    spec = ModelSpec(sizes.train_model, 10, "cifar", 32)
    flops = flops_per_image(build_model(spec).to(device).to(memory_format=torch.channels_last), device, bf16=True)
    rows = []
    for batch, compiled in sizes.train_runs:
        torch.manual_seed(0)
        model = build_model(spec).to(device).to(memory_format=torch.channels_last)
        cfg = TrainConfig(model=sizes.train_model, epochs=1, batch_size=batch, lr=1e-3, scheduler="none", bf16=True, compile=compiled)
        try:
            rate = ours_images_per_s(model, cfg, images, labels, device, sizes.train_steps)
        except Exception as err:  # torch.compile on a new machine: keep the eager rows, say why
            print(f"train {sizes.train_model} batch {batch} compile={compiled}: failed: {type(err).__name__}: {err}")
            rows.append({"model": sizes.train_model, "batch": batch, "compile": compiled, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            ctx.partial({"runs": rows})
            continue
        finally:
            torch._dynamo.reset()
        achieved = rate * flops / 1e12
        precision = "bf16" if ctx.gpu else "fp32"  # fit() autocasts on CUDA only
        rows.append(
            {
                "model": sizes.train_model,
                "precision": precision,
                "batch": batch,
                "compile": compiled,
                "images_per_s": rate,
                "tflops": achieved,
                "mfu": achieved / peak if peak else None,
            }
        )
        print(
            f"train {sizes.train_model} batch {batch} compile={compiled}: {rate:.0f} images/s, {achieved:.1f} TFLOP/s"
            + (f", MFU {100 * achieved / peak:.1f}%" if peak else "")
        )
        ctx.partial({"runs": rows})
    return {"runs": rows}


def baseline(ctx: Context) -> dict:
    """fit() against a torchvision DataLoader + PIL-transform loop at the same precision."""
    sizes, device = ctx.sizes, ctx.device
    batch = sizes.train_runs[0][0]
    train = ctx.splits().train
    images, labels = repeated(train.images, train.labels, batch * (sizes.train_steps + 2))
    cfg = TrainConfig(model=sizes.train_model, epochs=1, batch_size=batch, lr=1e-3, scheduler="none", bf16=True)
    spec = ModelSpec(sizes.train_model, 10, "cifar", 32)
    torch.manual_seed(0)
    base = baseline_images_per_s(build_model(spec).to(device), cfg, images, labels, device, sizes.train_steps, sizes.baseline_workers)
    torch.manual_seed(0)
    ours = ours_images_per_s(build_model(spec).to(device).to(memory_format=torch.channels_last), cfg, images, labels, device, sizes.train_steps)
    print(f"train vs DataLoader + PIL ({sizes.baseline_workers} workers), batch {batch}: {ours:.0f} / {base:.0f} images/s = {ours / base:.2f}x")
    return {"batch": batch, "baseline_images_per_s": base, "ours_images_per_s": ours, "ratio": ours / base, "baseline_workers": sizes.baseline_workers}


def _test_images(ctx: Context, n: int) -> ImageSet:
    test = ctx.splits().test
    images, labels = repeated(test.images, test.labels, n)
    return ImageSet(images, labels, test.class_names)


def cam(ctx: Context) -> dict:
    """The fast path against pytorch-grad-cam and the limit; the actor with faithfulness on/off."""
    from cifarcam.cam.actor import CamActor, images_table
    from cifarcam.cam.settings import CamSettings, resolve_layers
    from cifarcam.training.checkpoint import save_checkpoint

    sizes, device = ctx.sizes, ctx.device
    test = _test_images(ctx, sizes.cam_images)
    spec = ModelSpec(sizes.cam_model, 10)
    torch.manual_seed(0)
    model = build_model(spec).to(device).eval()
    pixels = torch.from_numpy(test.images).to(device)
    batches = [to_model_input(pixels[i : i + sizes.cam_batch]) for i in range(0, len(pixels), sizes.cam_batch)]
    rates = cam_rates(model, "layer3", batches, sizes.cam_per_image, device)
    actor_rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(save_checkpoint(Path(tmp), model, spec, {}))
        layers = resolve_layers(spec, ("layer3",), spec.family)
        for steps in (0, CamSettings.faithfulness_steps):  # off, and the default steps on the default 128-image sample
            settings = CamSettings(methods=("gradcam",), layers=("layer3",), targets=("pred",), batch_size=sizes.cam_batch, faithfulness_steps=steps)
            table = images_table(test, faithfulness=settings.faithfulness)
            actor = CamActor(ckpt, "check", settings, layers)
            actor(table.slice(0, sizes.cam_batch))  # warm-up
            seconds = timed(lambda actor=actor, table=table: [actor(table.slice(i, sizes.cam_batch)) for i in range(0, len(test), sizes.cam_batch)], device)
            actor_rates[f"actor_faithfulness_{steps}_steps"] = len(test) / seconds
    figures = {f"{k}_images_per_s": v for k, v in {**rates, **actor_rates}.items()}
    figures |= {
        "images": len(test),
        "vs_per_image": rates["ours"] / rates["a_per_image"],
        "vs_batched": rates["ours"] / rates["b_batched"],
        "limit_over_ours": rates["d_forward_activation_backward"] / rates["ours"],
    }
    for k, v in figures.items():
        print(f"cam {k}: {v:.2f}" if isinstance(v, float) else f"cam {k}: {v}")
    return figures


def stage(ctx: Context) -> dict:
    sizes = ctx.sizes
    spec = ModelSpec(sizes.cam_model, 10)
    torch.manual_seed(0)
    model = build_model(spec).to(ctx.device).eval()
    return stage_vs_loop(_test_images(ctx, sizes.stage_images), spec, model, "layer3", sizes.cam_batch, sizes.stage_images)


def paper_epoch(ctx: Context) -> dict:
    """One epoch of the paper's setting (ImageNet stem at 32 px, batch 64, 45,000 images) and the
    whole GPU memory it holds: this process is the only one on the GPU (the check's parent never
    touches CUDA), so total minus free is its CUDA context, the allocator's reserve and cuDNN's
    workspaces, which is what a packed trial costs."""
    sizes, device = ctx.sizes, ctx.device
    train = ctx.splits().train
    images, labels = repeated(train.images, train.labels, sizes.paper_images)
    cfg = TrainConfig(model=sizes.paper_model, stem="imagenet", epochs=1, batch_size=64, lr=1e-3, scheduler="none", bf16=True)
    torch.manual_seed(0)
    model = build_model(ModelSpec(sizes.paper_model, 100, "imagenet", 32)).to(device).to(memory_format=torch.channels_last)
    loader = DeviceLoader(images, labels, 64, device=device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(loader))
    warm = DeviceLoader(images[:640], labels[:640], 64, device=device)
    train_epoch(model, model, warm, optimizer, scheduler, cfg)  # cuDNN autotuning, allocator
    seconds = timed(lambda: train_epoch(model, model, loader, optimizer, scheduler, cfg), device)
    figures = {"model": sizes.paper_model, "images": len(labels), "epoch_s": seconds, "images_per_s": len(loader) * 64 / seconds}
    if ctx.gpu:
        free, total = torch.cuda.mem_get_info(device)
        footprint = total - free
        figures |= {
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "reserved_gib": torch.cuda.memory_reserved(device) / 2**30,
            "process_footprint_gib": footprint / 2**30,
            "trials_that_fit_in_memory": int(0.9 * total // footprint),
        }
    print(
        f"paper epoch ({sizes.paper_model}, ImageNet stem, 32 px, batch 64, {len(labels)} images): {seconds:.1f} s"
        + (f", {figures['process_footprint_gib']:.2f} GiB held on the GPU" if ctx.gpu else "")
    )
    return figures


def _packed_trial(rank: int, sizes: Sizes, images: np.ndarray, labels: np.ndarray, barrier, results) -> None:
    """One of k trials sharing the GPU: warm up, wait for the others, then time the same steps.
    Reports (start, end, images) on the machine's clock, so that the combined rate is taken over
    the window from the first start to the last end: a trial that ends early frees the GPU."""
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
    start = time.time()
    train_epoch(model, model, loader, optimizer, scheduler, cfg)
    torch.cuda.synchronize()
    results.put((start, time.time(), len(loader) * 64))


def packing(ctx: Context) -> dict:
    """Combined images/s of k paper-config trials on one GPU, as fractional GPUs would pack them.
    The children are this section's: the check kills its whole session if it overruns."""
    import queue

    import torch.multiprocessing as mp

    sizes = ctx.sizes
    if not ctx.gpu:
        return {"rows": [], "skipped": "GPU only"}
    context = mp.get_context("spawn")
    train = ctx.splits().train
    images, labels = repeated(train.images, train.labels, sizes.packing_steps * 64)
    rows = []
    for k in sizes.packing:
        barrier, results = context.Barrier(k), context.Queue()
        procs = [context.Process(target=_packed_trial, args=(r, sizes, images, labels, barrier, results), daemon=True) for r in range(k)]
        try:
            for proc in procs:
                proc.start()
            spans = [results.get(timeout=PACKING_TIMEOUT_S) for _ in procs]
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
        combined = sum(n for _, _, n in spans) / (max(end for _, end, _ in spans) - min(start for start, _, _ in spans))
        one = rows[0]["combined_images_per_s"] if rows else combined
        rows.append({"trials": k, "combined_images_per_s": combined, "per_trial_images_per_s": combined / k, "speedup_over_one": combined / one})
        print(f"packing: {k} trial(s) on one GPU: {combined:.0f} images/s combined, {combined / k:.0f} each")
        ctx.partial({"rows": rows})
    return {"rows": rows}


SECTIONS = {f.__name__: f for f in (environment, training, baseline, cam, stage, paper_epoch, packing)}


def failed_checks(name: str, figures: dict) -> list[str]:
    """Correctness, not speed: what makes the check exit non-zero."""
    if name == "stage" and figures["rows_written"] != figures["rows_expected"]:
        return [f"stage: {figures['rows_written']} rows written, expected {figures['rows_expected']}"]
    if name == "packing" and any(row.get("failed") for row in figures["rows"]):
        return ["packing: a packed trial did not finish"]
    return []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=sorted(SECTIONS))
    p.add_argument("--data", required=True, help="CIFAR-10 Parquet folder")
    p.add_argument("--fragment", type=Path, required=True, help="where to write this section's JSON")
    args = p.parse_args()
    figures = SECTIONS[args.section](Context(args.data, args.fragment))
    args.fragment.write_text(json.dumps({"figures": figures, "failed_checks": failed_checks(args.section, figures)}, default=str))


if __name__ == "__main__":
    main()
