"""The CAM stage's cost at full size (issue 20, item 4): faithfulness on against off, and memory
as the test set grows.

The real stage (`cifarcam.cam.stage.plan` + `explain`, Ray Data actors sized as `jobs.cam` sizes
them) on the first 1,000 and on all 10,000 real CIFAR-10 test images, for each family given, at
every default CAM layer with the default settings (Grad-CAM, both targets, faithfulness on its
seeded 128-image sample, default steps) and again with faithfulness off (``faithfulness_steps``
0). Weights are random (speed does not depend on them). The sanity check is not part of the
stage and is not timed here.

Figures, all measured in this one run:
  - seconds and images/s of each (family, images, faithfulness) stage; Ray's start-up excluded,
    and a one-batch stage run first so that Ray's worker processes and imports are warm;
  - faithfulness on / off at 10,000 images (the issue's goal: at most 1.5x);
  - each actor process's peak RSS (VmHWM) and peak own memory (RssAnon), read from /proc while
    the stage runs, 10,000 against 1,000 images (the goal: within 20 %);
  - the row groups per written Parquet file.

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
    """The peak memory of every CAM actor process while it lives: Ray Data ends its actors when
    the stage ends, so their /proc entries are read every ``every`` seconds meanwhile. Two
    figures: VmHWM, the kernel's peak RSS, which also counts the shared object-store pages the
    actor has read its blocks from; and the peak of RssAnon, the process's own memory (sampled)."""

    def __init__(self, every: float = 0.2) -> None:
        self.peak_kib: dict[int, int] = {}
        self.peak_anon_kib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(every,), daemon=True)

    def _poll(self, every: float) -> None:
        while not self._stop.wait(every):
            for status in Path("/proc").glob("[0-9]*/status"):
                try:
                    if b"CamActor" not in (status.parent / "cmdline").read_bytes():
                        continue
                    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
                except OSError:  # the process ended under the glob
                    continue
                pid = int(status.parent.name)
                for peaks, name in ((self.peak_kib, "VmHWM"), (self.peak_anon_kib, "RssAnon")):
                    if name in fields:
                        peaks[pid] = max(peaks.get(pid, 0), int(fields[name].split()[0]))

    def __enter__(self) -> "ActorMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stage(folder: Path, checkpoint: Path, family: str, test: ImageSet, settings: CamSettings, layout) -> dict:
    """One CAM stage of one model on ``test``: its seconds, the actors' peak RSS, the files' row groups."""
    from cifarcam.cam.stage import ModelToExplain, explain, plan

    plans = plan(folder, [ModelToExplain(family, str(checkpoint))], settings, test)
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
        "actor_peak_anon_mib": max(memory.peak_anon_kib.values(), default=0) / 1024,
        "actor_processes": len(memory.peak_kib),
        "files": len(files),
        "row_groups_per_file": max(pq.ParquetFile(f).metadata.num_row_groups for f in files),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet_tiny", help="comma-separated families")
    p.add_argument("--sizes", default="1000,10000", help="comma-separated test-set sizes (the first N test images)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"))
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
            one_batch = full.subset(np.arange(on.batch_size))
            stage(Path(tmp) / family / "warm", checkpoint, family, one_batch, on, layout)  # Ray's workers and imports
            # Each stage starts its actor (a process, imports, the checkpoint) and regroups: a
            # fixed cost, which pulls an on/off ratio towards 1. A one-batch stage measures it.
            fixed = stage(Path(tmp) / family / "fixed", checkpoint, family, one_batch, off, layout)["seconds"]
            results: dict = {"fixed_s": fixed}
            for n in sizes:
                for name, settings in (("off", off), ("on", on)):
                    fig = stage(Path(tmp) / family / f"{n}-{name}", checkpoint, family, full.subset(np.arange(n)), settings, layout)
                    results[f"{n}_{name}"] = fig
                    print(
                        f"  {family:18s} {n:6d} images, faithfulness {name:3s}: {fig['seconds']:7.1f} s, {fig['images_per_s']:6.1f} images/s, "
                        f"actor peak RSS {fig['actor_peak_rss_mib']:6.0f} MiB, own {fig['actor_peak_anon_mib']:6.0f} MiB ({fig['actor_processes']} process(es)), "
                        f"{fig['files']} file(s) of at most {fig['row_groups_per_file']} row group(s)"
                    )
            small, large = sizes[0], sizes[-1]
            results["faithfulness_on_over_off"] = {n: results[f"{n}_on"]["seconds"] / results[f"{n}_off"]["seconds"] for n in sizes}
            results["faithfulness_on_over_off_without_fixed"] = {
                n: (results[f"{n}_on"]["seconds"] - fixed) / max(results[f"{n}_off"]["seconds"] - fixed, 1e-9) for n in sizes
            }
            for figure in ("rss", "anon"):
                peaks = [results[f"{n}_on"][f"actor_peak_{figure}_mib"] for n in (large, small)]
                results[f"peak_{figure}_large_over_small"] = peaks[0] / max(peaks[1], 1e-9)
            ratio, net = results["faithfulness_on_over_off"][large], results["faithfulness_on_over_off_without_fixed"][large]
            print(f"  {family}: faithfulness on / off at {large} images: {ratio:.2f}x, {net:.2f}x without the stage's fixed {fixed:.1f} s (goal <= 1.5x)")
            print(
                f"  {family}: actor peak RSS at {large} / {small} images: {results['peak_rss_large_over_small']:.2f}, "
                f"its own memory {results['peak_anon_large_over_small']:.2f} (goal within 1.2)"
            )
            figures[family] = results
    ray.shutdown()
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
