"""The CAM stage's cost at full size (issue 20, item 4): faithfulness on against off, and memory
as the test set grows.

The real stage (`cifarcam.cam.stage.plan` + `explain`, Ray Data actors sized as `jobs.cam` sizes
them) on the first 1,000 and on all 10,000 real CIFAR-10 test images, for each family given, at
every default CAM layer with the default settings (Grad-CAM, both targets, faithfulness on its
seeded 128-image sample with 16 steps) and again with faithfulness off (``faithfulness_steps``
0). Weights are random (speed does not depend on them). The sanity check is not part of the
stage and is not timed here.

Figures, all measured in this one run:
  - seconds and images/s of each (family, images, faithfulness) stage; Ray's start-up excluded,
    and a one-batch stage run first so that Ray's worker processes and imports are warm;
  - faithfulness on / off at 10,000 images (the issue's goal: at most 1.5x);
  - each actor process's peak RSS (VmHWM, read from /proc while the stage runs), 10,000 against
    1,000 images (the goal: within 20 %);
  - the row groups per written Parquet file;
  - in-process, the actor's faithfulness with every map's curves scored together (as the stage
    does) against one map per forward pass (as before), on batches sampled as at full size.

    python benchmarks/cam_cost.py [--models resnet_tiny,regnet] [--out cam_cost.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cifarcam.cam.settings import CamSettings  # noqa: E402
from cifarcam.config import DataConfig  # noqa: E402
from cifarcam.data.splits import ImageSet, load_splits  # noqa: E402
from cifarcam.training.models import ModelSpec, build_model  # noqa: E402


class ActorMemory:
    """The peak RSS of every CAM actor process while it lives: Ray Data ends its actors when the
    stage ends, so their /proc entries are read every ``every`` seconds meanwhile."""

    def __init__(self, every: float = 0.2) -> None:
        self.peak_kib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(every,), daemon=True)

    def _poll(self, every: float) -> None:
        while not self._stop.wait(every):
            for status in Path("/proc").glob("[0-9]*/status"):
                try:
                    if b"CamActor" not in (status.parent / "cmdline").read_bytes():
                        continue
                    hwm = [line for line in status.read_text().splitlines() if line.startswith("VmHWM:")]
                except OSError:  # the process ended under the glob
                    continue
                if hwm:
                    pid = int(status.parent.name)
                    self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), int(hwm[0].split()[1]))

    def __enter__(self) -> "ActorMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stage(folder: Path, checkpoint: Path, family: str, test: ImageSet, settings: CamSettings, layout) -> dict:
    """One CAM stage of one model on ``test``: its seconds, the actors' peak RSS, the files' row groups."""
    from cifarcam.cam.stage import ModelToExplain, explain, plan

    plans = plan(folder, [ModelToExplain(family, str(checkpoint))], settings)
    with ActorMemory() as memory:
        start = time.perf_counter()
        explain(folder, plans, test, settings, layout.actors, layout.gpus_per_actor, threads=layout.threads)
        seconds = time.perf_counter() - start
    files = sorted((folder / "cams").rglob("*.parquet"))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    expected = len(test) * len(settings.targets) * len(plans[0].layers) * len(settings.methods)
    if rows != expected:
        raise SystemExit(f"cam_cost: {family} on {len(test)} images wrote {rows} rows, expected {expected}")
    return {
        "seconds": seconds,
        "images_per_s": len(test) / seconds,
        "actor_peak_rss_mib": max(memory.peak_kib.values(), default=0) / 1024,
        "actor_processes": len(memory.peak_kib),
        "files": len(files),
        "row_groups_per_file": max(pq.ParquetFile(f).metadata.num_row_groups for f in files),
    }


def grouping_effect(full: ImageSet, spec: ModelSpec, checkpoint: Path, images: int, threads: int) -> dict:
    """The actor in-process on the first ``images`` test images, marked with the full test set's
    faithfulness sample (so each 128-image batch holds what it holds at full size): faithfulness
    off, on with the maps' curves scored together (the stage's way), and on with one map per call
    (the way before, FORWARD_CHUNK patched to 1). Each run once, in this order."""
    import pyarrow as pa

    from cifarcam.cam import actor as actor_module
    from cifarcam.cam.actor import CamActor, images_table
    from cifarcam.cam.settings import resolve_layers

    on, off = CamSettings(), CamSettings(faithfulness_steps=0)
    layers = resolve_layers(spec, None, spec.family)
    marked = images_table(full, faithfulness=on.faithfulness).slice(0, images)
    torch.set_num_threads(threads)
    seconds = {}
    for name, settings, chunk in (("off", off, None), ("together", on, None), ("one_map_per_call", on, 1)):
        actor = CamActor(str(checkpoint), "bench", settings, layers, device="cpu", threads=threads)
        default = actor_module.FORWARD_CHUNK
        actor_module.FORWARD_CHUNK = chunk or default
        try:
            start = time.perf_counter()
            pa.concat_tables([actor(marked.slice(i, on.batch_size)) for i in range(0, images, on.batch_size)])
            seconds[name] = time.perf_counter() - start
        finally:
            actor_module.FORWARD_CHUNK = default
    sampled = int(np.asarray(marked.column("faithfulness")).sum())
    print(
        f"  {spec.family}: actor in-process on {images} images ({sampled} sampled), {threads} thread(s): off {seconds['off']:.1f} s, "
        f"on {seconds['together']:.1f} s (maps together), {seconds['one_map_per_call']:.1f} s (one map per call); "
        f"faithfulness's own cost {seconds['together'] - seconds['off']:.1f} s against {seconds['one_map_per_call'] - seconds['off']:.1f} s"
    )
    return {"images": images, "sampled": sampled, "threads": threads} | {f"{k}_s": v for k, v in seconds.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet_tiny", help="comma-separated families")
    p.add_argument("--sizes", default="1000,10000", help="comma-separated test-set sizes (the first N test images)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"))
    p.add_argument("--grouping-images", type=int, default=2048, help="images for the in-process grouping comparison (0: skip it)")
    p.add_argument("--out", default=None, help="also write the figures here as JSON")
    args = p.parse_args()

    import ray

    from cifarcam.cam.runner import actor_layout, cpu_share
    from cifarcam.training.checkpoint import save_checkpoint

    full = load_splits(DataConfig(source="parquet", path=args.data)).test
    sizes = [int(s) for s in args.sizes.split(",")]
    on, off = CamSettings(), CamSettings(faithfulness_steps=0)  # the defaults, and the same without faithfulness
    figures: dict = {"defaults": {"faithfulness_images": on.faithfulness_images, "faithfulness_steps": on.faithfulness_steps, "batch_size": on.batch_size}}
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    layout = actor_layout(ray.cluster_resources(), on, *cpu_share())  # as jobs.cam sizes it
    figures["actors"] = str(layout)
    print(f"cam_cost: {layout}, {torch.get_num_threads()} torch threads here; sizes {sizes}")
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.models.split(","):
            torch.manual_seed(0)
            spec = ModelSpec(family, full.num_classes)
            checkpoint = save_checkpoint(Path(tmp) / family / "ckpt", build_model(spec).eval(), spec, {})
            stage(Path(tmp) / family / "warm", checkpoint, family, full.subset(np.arange(on.batch_size)), on, layout)  # Ray's workers and imports
            results = {}
            for n in sizes:
                for name, settings in (("off", off), ("on", on)):
                    fig = stage(Path(tmp) / family / f"{n}-{name}", checkpoint, family, full.subset(np.arange(n)), settings, layout)
                    results[f"{n}_{name}"] = fig
                    print(
                        f"  {family:18s} {n:6d} images, faithfulness {name:3s}: {fig['seconds']:7.1f} s, {fig['images_per_s']:6.1f} images/s, "
                        f"actor peak RSS {fig['actor_peak_rss_mib']:6.0f} MiB ({fig['actor_processes']} process(es)), "
                        f"{fig['files']} file(s) of at most {fig['row_groups_per_file']} row group(s)"
                    )
            small, large = sizes[0], sizes[-1]
            results["faithfulness_on_over_off"] = {n: results[f"{n}_on"]["seconds"] / results[f"{n}_off"]["seconds"] for n in sizes}
            results["peak_rss_large_over_small"] = results[f"{large}_on"]["actor_peak_rss_mib"] / results[f"{small}_on"]["actor_peak_rss_mib"]
            ratio = results["faithfulness_on_over_off"][large]
            print(f"  {family}: faithfulness on / off at {large} images: {ratio:.2f}x (goal <= 1.5x)")
            print(f"  {family}: actor peak RSS at {large} / {small} images: {results['peak_rss_large_over_small']:.2f} (goal within 1.2)")
            figures[family] = results
    ray.shutdown()
    if args.grouping_images:
        with tempfile.TemporaryDirectory() as tmp:
            for family in args.models.split(","):
                torch.manual_seed(0)
                spec = ModelSpec(family, full.num_classes)
                checkpoint = save_checkpoint(Path(tmp) / family, build_model(spec).eval(), spec, {})
                figures[family]["grouping"] = grouping_effect(full, spec, checkpoint, args.grouping_images, layout.actors * layout.threads)
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
