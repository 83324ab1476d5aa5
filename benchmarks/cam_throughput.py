"""CAM throughput: cifarcam's multi-layer fast path against pytorch-grad-cam, and the Ray Data
stage against the same work in a plain loop.

Same model (random weights: speed does not depend on them), same layer, same real CIFAR-10 test
images, all in one process so the ratios compare like with like. Baselines:
  (a) pytorch-grad-cam's README loop: one image per call;
  (b) pytorch-grad-cam batched, in a plain loop;
  (c) the limit: one forward plus one full backward pass of the model on the same batches.
Then the Ray Data stage (Ray start-up excluded) against the CamActor's work called in a plain loop
with the same CPU threads, both writing Parquet. The last line is a JSON object of the figures.

    python benchmarks/cam_throughput.py [--model resnet_tiny] [--layer layer3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cifarcam.cam import MultiLayerCam  # noqa: E402
from cifarcam.config import DataConfig  # noqa: E402
from cifarcam.data import load_splits  # noqa: E402
from cifarcam.loader import to_model_input  # noqa: E402
from cifarcam.models import ModelSpec, build_model, cam_layers  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


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
    from pytorch_grad_cam import GradCAM

    test = load_splits(DataConfig(source="parquet", path=args.data)).test
    spec = ModelSpec(args.model, 10)
    torch.manual_seed(0)
    model = build_model(spec).to(device).eval()
    images = torch.from_numpy(test.images[: args.images]).to(device)
    batches = [to_model_input(images[i : i + args.batch_size]) for i in range(0, len(images), args.batch_size)]
    n = sum(len(b) for b in batches)
    layer = model.get_submodule(args.layer)
    figures: dict = {"device": str(device), "model": args.model, "layer": args.layer, "batch_size": args.batch_size}

    def per_image():
        with GradCAM(model=model, target_layers=[layer]) as cam:
            for i in range(args.per_image):
                cam(input_tensor=batches[0][i % len(batches[0])][None], targets=None)

    def batched():
        with GradCAM(model=model, target_layers=[layer]) as cam:
            for b in batches:
                cam(input_tensor=b, targets=None)

    def ours():
        with MultiLayerCam(model, [args.layer]) as cams:
            for b in batches:
                cams(b, {"pred": None}, ["gradcam"], 32)

    def limit():
        for p_ in model.parameters():
            p_.requires_grad_(True)
        for b in batches:
            logits = model(b)
            model.zero_grad(set_to_none=True)
            logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()

    ours()  # warm-up (allocator, cudnn autotuning)
    rates = {
        "a_per_image": args.per_image / timed(per_image, device),
        "b_batched": n / timed(batched, device),
        "c_forward_backward": n / timed(limit, device),
        "ours": n / timed(ours, device),
    }
    figures |= {f"{k}_images_per_s": v for k, v in rates.items()}
    figures |= {
        "speedup_vs_a": rates["ours"] / rates["a_per_image"],
        "speedup_vs_b": rates["ours"] / rates["b_batched"],
        "limit_over_ours": rates["c_forward_backward"] / rates["ours"],
    }
    print(f"device {device}, model {args.model}, layer {args.layer}, batch {args.batch_size}, {n} images")
    for k, v in rates.items():
        print(f"  {k:22s} {v:9.0f} images/s")
    print(f"ours vs (a) per-image loop: {figures['speedup_vs_a']:.1f}x (target >= {20 if device.type == 'cuda' else 5}x)")
    print(f"ours vs (b) batched pytorch-grad-cam: {figures['speedup_vs_b']:.2f}x (target >= 1.5x)")
    print(f"(c) forward+backward limit / ours: {figures['limit_over_ours']:.2f} (ours within 1.5x of the limit when <= 1.5)")
    if args.stage_images:
        figures |= stage_vs_loop(args, test, spec, model)
    print(json.dumps(figures))


def stage_vs_loop(args, test, spec, model) -> dict:
    """The Ray Data stage on ``--stage-images`` images against the same CamActor work in-process."""
    import pyarrow.parquet as pq
    import ray

    from cifarcam.cam_stage import CamActor, CamSettings, ModelPlan, ModelToExplain, explain, images_table
    from cifarcam.checkpoint import save_checkpoint

    subset = test.subset(np.arange(min(args.stage_images, len(test))))
    settings = CamSettings(methods=("gradcam",), layers=(args.layer,), targets=("pred",), batch_size=args.batch_size, faithfulness_steps=0)
    layers = [l for l in cam_layers(model, spec) if l.name == args.layer]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(Path(tmp) / "ckpt", model.cpu(), spec, {})
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        cpus = int(ray.cluster_resources()["CPU"])
        gpus = ray.cluster_resources().get("GPU", 0)
        actors = int(gpus) if gpus else max(1, cpus - 1)
        threads = None if gpus else actors  # the loop gets the CPUs the actor pool holds
        plan = [ModelPlan(ModelToExplain(spec.family, str(ckpt)), spec, layers, [(layers[0], "gradcam")])]
        start = time.perf_counter()
        explain(Path(tmp) / "run", plan, subset, settings, actors, 1.0 if gpus else 0.0)
        stage_s = time.perf_counter() - start
        ray.shutdown()

        if threads:
            torch.set_num_threads(threads)
        actor = CamActor(str(ckpt), "bench", settings, layers)
        table = images_table(subset)
        start = time.perf_counter()
        out = [actor(table.slice(i, args.batch_size)) for i in range(0, len(subset), args.batch_size)]
        import pyarrow as pa

        pq.write_table(pa.concat_tables(out), Path(tmp) / "loop.parquet")
        loop_s = time.perf_counter() - start
    print(f"Ray Data stage on {len(subset)} images: {stage_s:.1f} s ({actors} actor(s)); plain loop ({threads or 'all'} thread(s)): {loop_s:.1f} s; ratio {stage_s / loop_s:.2f} (target <= 1.5)")
    return {"stage_images": len(subset), "stage_s": stage_s, "plain_loop_s": loop_s, "stage_over_loop": stage_s / loop_s, "actors": actors}


if __name__ == "__main__":
    main()
