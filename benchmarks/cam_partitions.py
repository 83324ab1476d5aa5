"""Files per CAM partition and query time: cifarcam's regrouped partitions against Ray Data's own
partitioned writer, on the same rows (the full CIFAR-10 test set by default), in one run.

The CAM rows are computed once (random resnet_tiny weights: layout does not depend on them),
then written both ways; the same DuckDB queries run over each layout, interleaved, 3 times.

    python benchmarks/cam_partitions.py [--images 10000] [--blocks 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cifarcam import results  # noqa: E402
from cifarcam.cam.actor import CamActor, images_table  # noqa: E402
from cifarcam.cam.partitions import Source, regroup  # noqa: E402
from cifarcam.cam.settings import CamSettings, resolve_layers  # noqa: E402
from cifarcam.config import DataConfig  # noqa: E402
from cifarcam.data.splits import load_splits  # noqa: E402
from cifarcam.training.checkpoint import save_checkpoint  # noqa: E402
from cifarcam.training.models import ModelSpec, build_model  # noqa: E402

QUERIES = {
    "entropy by layer": "select layer, target, avg(entropy), count(*) from {cams} group by all",
    "one image's maps": "select layer, method, heatmap from {cams} where image_index = 1234",
    "mistakes, layer3": "select image_index, peak_y, peak_x from {cams} where layer = 'layer3' and not correct",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--blocks", type=int, default=40, help="blocks Ray Data would write (one file each per partition)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"))
    args = p.parse_args()
    import ray

    test = load_splits(DataConfig(source="parquet", path=args.data)).test
    test = test.subset(np.arange(min(args.images, len(test))))
    spec = ModelSpec("resnet_tiny", 10)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = save_checkpoint(tmp / "ckpt", build_model(spec), spec, {})
        settings = CamSettings(methods=("gradcam", "gradcam++"), faithfulness_steps=0, batch_size=250)
        actor = CamActor(str(ckpt), "bench", settings, resolve_layers(spec, None, "m"))
        table = images_table(test)
        rows_per_block = -(-len(test) // args.blocks)
        blocks = [actor(table.slice(i, rows_per_block)) for i in range(0, len(test), rows_per_block)]
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        dataset = ray.data.from_arrow(blocks)
        start = time.perf_counter()
        dataset.write_parquet(str(tmp / "ray_layout"), partition_cols=list(results.CAM_PARTITIONS))
        ray_write_s = time.perf_counter() - start
        dataset.write_parquet(str(tmp / "raw"))
        ray.shutdown()
        start = time.perf_counter()
        regroup(sorted((tmp / "raw").glob("*.parquet")), tmp / "ours", results.CAM_PARTITIONS, Source.of(ckpt), settings.comparable())
        regroup_s = time.perf_counter() - start

        layouts = {"ray partitioned writer": tmp / "ray_layout", "cifarcam regrouped": tmp / "ours"}
        partitions = len(list((tmp / "ours").glob("model=*/layer=*/method=*")))
        print(f"{len(test)} images x {partitions} partitions (layers x methods) x 2 targets, {args.blocks} blocks")
        print(f"regrouping after Ray's unpartitioned write: {regroup_s:.1f} s (Ray's partitioned write itself: {ray_write_s:.1f} s)")
        times = {name: {q: [] for q in QUERIES} for name in layouts}
        for _ in range(3):
            for name, root in layouts.items():
                con = duckdb.connect()
                cams = f"read_parquet('{root}/**/*.parquet', hive_partitioning = true)"
                for q, sql in QUERIES.items():
                    start = time.perf_counter()
                    con.execute(sql.format(cams=cams)).fetchall()
                    times[name][q].append(time.perf_counter() - start)
        for name, root in layouts.items():
            files = list(root.rglob("*.parquet"))
            print(f"{name}: {len(files)} files ({len(files) / partitions:.1f} per partition), {sum(f.stat().st_size for f in files) / 2**20:.0f} MiB")
            for q in QUERIES:
                print(f"  {q:18s} median {1000 * statistics.median(times[name][q]):7.1f} ms")
        for q in QUERIES:
            ratio = statistics.median(times["ray partitioned writer"][q]) / statistics.median(times["cifarcam regrouped"][q])
            print(f"query '{q}': ray layout / ours = {ratio:.2f}x")


if __name__ == "__main__":
    main()
