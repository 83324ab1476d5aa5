"""CAM throughput: cifarcam's multi-layer fast path against pytorch-grad-cam, and the Ray Data
stage against the same work in a plain loop.

Same model (random weights: speed does not depend on them), same layer, same real CIFAR-10 test
images, all in one process so the ratios compare like with like. Baselines:
  (a) pytorch-grad-cam's README loop: one image per call;
  (b) pytorch-grad-cam batched, in a plain loop;
  (c) one forward plus one full backward pass of the model (weights included) on the same batches;
  (d) the limit of the fast path: one forward plus the backward to the hooked activation alone.
Then the Ray Data stage (Ray start-up excluded) against the CamActor's work called in a plain loop
with the same CPU threads, both writing Parquet; the stage also on one batch, for its fixed cost
(actor start-up), which it reports with and without. The last line is a JSON object of the figures.

    python benchmarks/cam_throughput.py [--model resnet_tiny] [--layer layer3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cifarcam.cam.methods import MultiLayerCam  # noqa: E402
from cifarcam.config import DataConfig  # noqa: E402
from cifarcam.data.splits import ImageSet, load_splits  # noqa: E402
from cifarcam.results import HEATMAP_SIZE  # noqa: E402
from cifarcam.training.loader import to_model_input  # noqa: E402
from cifarcam.training.models import ModelSpec, build_model, cam_layers  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def cam_rates(model: nn.Module, layer: str, batches: list[torch.Tensor], per_image: int, device: torch.device) -> dict[str, float]:
    """Images/s of the fast path and of baselines (a)-(d) on the same batches."""
    from pytorch_grad_cam import GradCAM

    module = model.get_submodule(layer)
    n = sum(len(b) for b in batches)

    def per_image_loop(batches: list[torch.Tensor], count: int) -> None:
        with GradCAM(model=model, target_layers=[module]) as cam:
            for i in range(count):
                cam(input_tensor=batches[0][i % len(batches[0])][None], targets=None)

    def batched(batches: list[torch.Tensor], _count: int) -> None:
        with GradCAM(model=model, target_layers=[module]) as cam:
            for b in batches:
                cam(input_tensor=b, targets=None)

    def ours(batches: list[torch.Tensor], _count: int) -> None:
        with MultiLayerCam(model, [layer]) as cams:
            for b in batches:
                cams(b, {"pred": None}, ["gradcam"], HEATMAP_SIZE)

    def full_backward(batches: list[torch.Tensor], _count: int) -> None:
        for p in model.parameters():
            p.requires_grad_(True)
        for b in batches:
            logits = model(b)
            model.zero_grad(set_to_none=True)
            logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()

    def activation_backward(batches: list[torch.Tensor], _count: int) -> None:
        kept: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _m, _i, out: kept.append(out))
        flags = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            for b in batches:
                kept.clear()
                logits = model(b.detach().requires_grad_(True))
                torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), kept)
        finally:
            handle.remove()
            for p, flag in flags:
                p.requires_grad_(flag)

    contenders = {
        "a_per_image": (per_image_loop, per_image),
        "b_batched": (batched, n),
        "c_forward_full_backward": (full_backward, n),
        "d_forward_activation_backward": (activation_backward, n),
        "ours": (ours, n),
    }
    # Every contender is warmed the same way before any is timed, on each input shape it will see
    # (the full and the last partial batch; one image for the per-image loop): cuDNN's autotuning
    # and the allocator's first growth never fall inside a timed window.
    for fn, _ in contenders.values():
        fn([batches[0], batches[-1]], 2)
    return {name: count / timed(lambda fn=fn, count=count: fn(batches, count), device) for name, (fn, count) in contenders.items()}


def stage_vs_loop(test: ImageSet, spec: ModelSpec, model: nn.Module, layer: str, batch_size: int, images: int, faithfulness_steps: int = 0) -> dict:
    """The Ray Data stage on ``images`` test images against the same CamActor work in-process."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from cifarcam.cam.actor import CamActor, images_table
    from cifarcam.cam.runner import actor_layout, cpu_share
    from cifarcam.cam.settings import CamSettings
    from cifarcam.cam.stage import ModelToExplain, explain, plan
    from cifarcam.training.checkpoint import save_checkpoint

    subset = test.subset(np.arange(min(images, len(test))))
    settings = CamSettings(methods=("gradcam",), layers=(layer,), targets=("pred",), batch_size=batch_size, faithfulness_steps=faithfulness_steps)
    layers = [cl for cl in cam_layers(model, spec) if cl.name == layer]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(Path(tmp) / "ckpt", model, spec, {})
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        layout = actor_layout(ray.cluster_resources(), settings, *cpu_share())  # as the jobs size it
        actors = layout.actors
        threads = None if layout.gpus_per_actor else actors * layout.threads  # the loop gets the CPUs the actor pool computes with

        def stage(run: Path, images: ImageSet) -> float:
            plans = plan(run, [ModelToExplain(spec.family, str(ckpt))], settings, images)
            start = time.perf_counter()
            explain(run, plans, images, settings, actors, layout.gpus_per_actor, threads=layout.threads)
            return time.perf_counter() - start

        # The same stage on one batch gives its fixed cost (actor start-up: a process, CUDA, the
        # checkpoint; Ray Data's planning; publishing), paid once per stage whatever its size. Run
        # once before the measured stage (Ray's first use: worker processes, imports) and once
        # after it, when Ray is as warm as the measured stage found it: that one is the figure.
        one_batch = subset.subset(np.arange(min(batch_size, len(subset))))
        cold_s = stage(Path(tmp) / "cold", one_batch)
        stage_s = stage(Path(tmp) / "run", subset)
        fixed_s = stage(Path(tmp) / "one-batch", one_batch)
        ray.shutdown()
        rows = pq.ParquetDataset(Path(tmp) / "run" / "cams").read(columns=["image_index"]).num_rows

        previous_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        actor = CamActor(str(ckpt), "bench", settings, layers)
        table = images_table(subset, faithfulness=settings.faithfulness)  # the sample explain() marks
        start = time.perf_counter()
        out = [actor(table.slice(i, batch_size)) for i in range(0, len(subset), batch_size)]
        pq.write_table(pa.concat_tables(out), Path(tmp) / "loop.parquet")
        loop_s = time.perf_counter() - start
        torch.set_num_threads(previous_threads)
    print(
        f"Ray Data stage on {len(subset)} images: {stage_s:.1f} s ({actors} actor(s); {fixed_s:.1f} s on one batch); "
        f"plain loop ({threads or 'all'} thread(s)): {loop_s:.1f} s; ratio {stage_s / loop_s:.2f}, "
        f"{max(stage_s - fixed_s, 0) / loop_s:.2f} without the fixed cost; {rows} rows written"
    )
    return {
        "stage_images": len(subset),
        "stage_s": stage_s,
        "stage_fixed_s": fixed_s,
        "stage_cold_one_batch_s": cold_s,
        "plain_loop_s": loop_s,
        "stage_over_loop": stage_s / loop_s,
        "stage_over_loop_without_fixed": max(stage_s - fixed_s, 0) / loop_s,
        "actors": actors,
        "rows_written": rows,
        "rows_expected": len(subset) * len(layers),  # one method, one target
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet_tiny")
    p.add_argument("--layer", default="layer3")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, default=2048, help="images for the batched measurements")
    p.add_argument("--per-image", type=int, default=128, help="images for baseline (a)")
    p.add_argument("--stage-images", type=int, default=10_000, help="images for the Ray Data comparison (0: skip it)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"))
    args = p.parse_args()
    device = torch.device(args.device)

    test = load_splits(DataConfig(source="parquet", path=args.data)).test
    spec = ModelSpec(args.model, 10)
    torch.manual_seed(0)
    model = build_model(spec).to(device).eval()
    images = torch.from_numpy(test.images[: args.images]).to(device)
    batches = [to_model_input(images[i : i + args.batch_size]) for i in range(0, len(images), args.batch_size)]
    rates = cam_rates(model, args.layer, batches, args.per_image, device)
    figures: dict = {"device": str(device), "model": args.model, "layer": args.layer, "batch_size": args.batch_size}
    figures |= {f"{k}_images_per_s": v for k, v in rates.items()}
    figures |= {
        "speedup_vs_a": rates["ours"] / rates["a_per_image"],
        "speedup_vs_b": rates["ours"] / rates["b_batched"],
        "limit_over_ours": rates["d_forward_activation_backward"] / rates["ours"],
    }
    print(f"device {device}, model {args.model}, layer {args.layer}, batch {args.batch_size}, {sum(len(b) for b in batches)} images")
    for k, v in rates.items():
        print(f"  {k:30s} {v:9.0f} images/s")
    print(f"ours vs (a) per-image loop: {figures['speedup_vs_a']:.1f}x (target >= {20 if device.type == 'cuda' else 5}x)")
    print(f"ours vs (b) batched pytorch-grad-cam: {figures['speedup_vs_b']:.2f}x (target >= {3 if device.type == 'cuda' else 1.5}x)")
    print(f"(d) forward + activation-only backward / ours: {figures['limit_over_ours']:.2f} (1.0 = at the limit)")
    if args.stage_images:
        figures |= stage_vs_loop(test, spec, model, args.layer, args.batch_size, args.stage_images)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
