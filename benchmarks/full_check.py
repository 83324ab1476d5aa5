"""`make full-check`: the pipeline at the size users run it, outside CI (≤45 minutes on 2 cores).

What a user of configs/paper.yaml runs, on real CIFAR-10 (../shared/data/cifar10-jpeg: CIFAR-100
cannot be downloaded here, and CIFAR-10 has the same images' shape) with a training budget that
fits 2 cores:

  search  all 7 paper families with their ImageNet stems at 32 px (paper.yaml's models), one
          optimizer and scheduler, 1 epoch on a stratified training subsample; the test-set
          evaluation of each family's best on all 10,000 test images
  cam     the CAM stage with its default settings (Grad-CAM, both targets, every default CAM
          layer, faithfulness on its 128-image sample, the sanity check) on all 10,000 test
          images, for the families of the smallest and the largest CAM cost (forward + backward
          FLOPs of one 32-px image, counted by torch's FlopCounterMode)
  report  report.md and report.html

Then checks that exit non-zero when they fail: every (model, layer, method) partition complete
(its marker) with exactly 10,000 x targets rows; no duplicate (model, layer, method, target,
image_index); no null except where results/README.md documents one; faithfulness on exactly the
seeded sample; the report's map counts equal a DuckDB count of the Parquet. Each stage's seconds,
images/s and peak RSS (the job's whole process tree, Ray's workers included) are printed and
written to <out>/full-check.json.

    python benchmarks/full_check.py [--out results/full-check] [--data ../shared/data/cifar10-jpeg]
                                    [--train-images 4500] [--families resnet34,swin]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cifarcam.cam.settings import CamSettings  # noqa: E402
from cifarcam.config import dump_config, load_config  # noqa: E402
from cifarcam.ray_env import JOB_ENV  # noqa: E402
from cifarcam.run_layout import RunLayout  # noqa: E402

TEST_IMAGES = 10_000  # CIFAR's test split; --test-images tries the script on fewer
CAMS = "read_parquet('{run}/cams/**/*.parquet', hive_partitioning = true)"


def full_config(data: Path, train_images: int, test_images: int) -> str:
    """paper.yaml's models and stems on CIFAR-10, one optimizer and scheduler, one epoch."""
    cfg = load_config(
        ROOT / "configs" / "paper.yaml",
        {
            "name": "full-check",
            "data.source": "parquet",
            "data.path": str(data),
            # limit_train subsamples the 50,000 before the 90/10 split: train_images / 0.9 of them
            "data.limit_train": round(train_images / 0.9),
            "data.limit_test": test_images if test_images < TEST_IMAGES else None,
            "train.epochs": 1,
            "train.warmup_epochs": 0,
            "search.grid": {"model": load_config(ROOT / "configs" / "paper.yaml").search.grid["model"], "optimizer": ["adamw"], "scheduler": ["cosine"]},
            "search.sample": {},
            "search.early_stopping": "none",
            "search.keep_checkpoints": 1,
        },
    )
    return dump_config(cfg)


def cam_cost(family: str, num_classes: int = 10) -> float:
    """Forward + backward FLOPs of one 32-px image at the family's paper setting (ImageNet stem)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cifarcam.training.models import ModelSpec, build_model

    model = build_model(ModelSpec(family, num_classes, "imagenet", 32)).eval()
    x = torch.zeros(1, 3, 32, 32, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return float(counter.get_total_flops())


class PeakRss:
    """The largest summed resident memory of a process and all its descendants, sampled each 0.5 s."""

    def __init__(self, pid: int) -> None:
        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for proc in tree:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_stage(name: str, args: list[str], log: Path, images: int, timeout: float) -> dict:
    """One job as a user runs it, in its own session, its output in ``log``; killed at ``timeout``."""
    env = {**JOB_ENV, **os.environ}
    env.pop("RAY_ADDRESS", None)
    began = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        rss = PeakRss(proc.pid)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            code = proc.wait()
        peak = rss.stop()
    seconds = time.monotonic() - began
    figures = {
        "seconds": round(seconds, 1),
        "images": images,
        "images_per_s": round(images / seconds, 1),
        "peak_rss_gib": round(peak / 2**30, 2),
        "exit_status": code,
    }
    print(f"{name}: {figures}", flush=True)
    if code != 0:
        print(log.read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"full-check: {name} failed with exit status {code}; its output: {log}")
    return figures


def checks(run: Path, models: list[str], settings: CamSettings, test_images: int) -> list[str]:
    """What must hold of the written Parquet; each failure as one line."""
    from cifarcam.cam.faithfulness import sample_rows
    from cifarcam.training.models import FAMILIES

    failed = []
    cams = CAMS.format(run=run)
    targets = len(settings.targets)
    parts = duckdb.sql(f"select model, layer, method, count(*), count(distinct (target, image_index)) from {cams} group by all").fetchall()
    expected = {(m, layer, k) for m in models for layer in FAMILIES[m].cam_layers for k in settings.methods}
    if {(m, layer, k) for m, layer, k, *_ in parts} != expected:
        failed.append(f"partitions: {sorted((m, la, k) for m, la, k, *_ in parts)} instead of {sorted(expected)}")
    for model, layer, method, rows, distinct in parts:
        if rows != test_images * targets or distinct != rows:
            failed.append(f"{model}/{layer}/{method}: {rows} rows, {distinct} distinct (target, image); expected {test_images * targets} of each")
        if not (run / "cams" / f"model={model}" / f"layer={layer}" / f"method={method}" / "_COMPLETE.json").is_file():
            failed.append(f"{model}/{layer}/{method}: no completion marker")
    never_null = "run, layer_h, layer_w, low_res_layer, target, target_class, image_index, label, pred, target_prob, correct, heatmap, degenerate"
    rules = {
        "a column that is never null is null": " or ".join(f"{c} is null" for c in never_null.split(", ")),
        "map statistics null on an informative map, or set on a constant one": "(peak_y is null or peak_x is null or entropy is null or top10_mass is null) != degenerate",
        "localisation set without an object mask": "peak_in_object is not null or pointing_hit is not null or pointing_hit_cell is not null or object_cell_share is not null or mass_on_object is not null or object_area is not null",
        "faithfulness outside the sample, or missing inside it": (
            "(deletion_auc_random is not null) != (faithfulness_sample and target = 'pred') "
            "or (deletion_auc is not null) != (faithfulness_sample and target = 'pred')"
        ),
    }
    for rule, where in rules.items():
        ((n,),) = duckdb.sql(f"select count(*) from {cams} where {where}").fetchall()
        if n:
            failed.append(f"{rule}: {n} rows")
    sample = sorted(int(i) for i in sample_rows(test_images, settings.faithfulness_images, seed=0))
    per_partition = duckdb.sql(
        f"select model, layer, method, list(distinct image_index order by image_index) from {cams} where faithfulness_sample and target = 'pred' group by all"
    ).fetchall()
    for model, layer, method, images in per_partition:
        if images != sample:
            failed.append(f"{model}/{layer}/{method}: faithfulness on {len(images)} images, not the seeded sample of {len(sample)}")
    if len(per_partition) != len(parts):
        failed.append(f"faithfulness in {len(per_partition)} of {len(parts)} partitions")
    # The report's table counts the predicted class's maps (one per image, layer and method).
    ((total,),) = duckdb.sql(f"select count(*) from {cams} where target = 'pred'").fetchall()
    reported = report_map_count(run / "report" / "report.md")
    if reported != total:
        failed.append(f"report.md counts {reported} maps; the Parquet holds {total} of the predicted class")
    if not (run / "report" / "report.html").is_file():
        failed.append("no report.html")
    return failed


def report_map_count(report: Path) -> int | None:
    """The sum of the `maps` column of report.md's "Heatmaps by layer feature size" table."""
    text = report.read_text()
    section = text.split("Heatmaps by layer feature size", 1)[-1].splitlines()
    first = next((i for i, line in enumerate(section) if line.startswith("|")), len(section))
    lines = list(itertools.takewhile(lambda line: line.startswith("|"), section[first:]))  # that table only: others follow
    if len(lines) < 3:
        return None
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    column = header.index("maps")
    return sum(int(re.sub(r"[^\d]", "", line.strip("|").split("|")[column])) for line in lines[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "full-check", help="folder for the run and full-check.json (replaced)")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-jpeg", help="CIFAR-10 Parquet folder")
    p.add_argument("--train-images", type=int, default=4_500, help="the training subsample for the 1-epoch search (default: 4,500)")
    p.add_argument("--test-images", type=int, default=TEST_IMAGES, help="test images (default: all 10,000; fewer only to try the script)")
    p.add_argument("--families", default=None, help="comma-separated families for the CAM stage (default: the cheapest and the dearest)")
    args = p.parse_args()
    if not (args.data / "test.parquet").is_file():
        raise SystemExit(f"full-check: --data {args.data}: expected CIFAR-10 Parquet (train.parquet, test.parquet, classes.json)")
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    run, config = args.out / "run", args.out / "full-check.yaml"
    config.write_text(full_config(args.data.resolve(), args.train_images, args.test_images))
    began = time.monotonic()

    costs = {family: cam_cost(family) for family in load_config(config).search.grid["model"]}
    families = args.families.split(",") if args.families else [min(costs, key=costs.get), max(costs, key=costs.get)]
    print("CAM cost (forward + backward GFLOPs of one 32-px image): " + ", ".join(f"{f} {c / 1e9:.2f}" for f, c in sorted(costs.items(), key=lambda kv: kv[1])))
    print(f"CAM stage on: {', '.join(families)}", flush=True)

    stages = {}
    stages["search"] = run_stage("search", ["jobs.search", "--config", str(config), "--out", str(run)], args.out / "search.log", args.train_images * 7, 1800)
    checkpoints = {model: str(RunLayout(run).located(path)) for model, path in duckdb.sql(f"select model, checkpoint from '{run}/accuracy.parquet'").fetchall()}
    missing = [f for f in families if f not in checkpoints]
    if missing:
        raise SystemExit(f"full-check: the search produced no usable checkpoint for {', '.join(missing)}")
    cam_args = ["jobs.cam", "--run", str(run)] + [arg for f in families for arg in ("--checkpoint", checkpoints[f])]
    stages["cam"] = run_stage("cam", cam_args, args.out / "cam.log", args.test_images * len(families), 1800)
    stages["report"] = run_stage("report", ["jobs.report", "--run", str(run)], args.out / "report.log", args.test_images, 600)

    failed = checks(run, families, CamSettings(), args.test_images)
    result = {
        "test_images": args.test_images,
        "train_images": args.train_images,
        "families": families,
        "cam_gflops": {f: round(c / 1e9, 3) for f, c in costs.items()},
        "stages": stages,
        "failed_checks": failed,
    }
    result["total_seconds"] = round(time.monotonic() - began, 1)
    (args.out / "full-check.json").write_text(json.dumps(result, indent=2) + "\n")
    for line in failed:
        print(f"FAILED: {line}")
    minutes = result["total_seconds"] / 60
    goal = "within" if minutes <= 45 else "over"  # a goal, reported: the checks alone decide the exit status
    verdict = "passed" if not failed else f"{len(failed)} check(s) failed"
    print(f"full-check: {verdict} in {minutes:.1f} min ({goal} the 45-minute goal); {args.out / 'full-check.json'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
