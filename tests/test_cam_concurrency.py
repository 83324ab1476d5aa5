"""CAM jobs on one run folder as users start them: two at once, one of them killed mid-way, then
reruns. Real processes, each job with its own local Ray, as two users (or a user and a SLURM
requeue) would start them. One scenario for all of it: each job costs a Ray start and an actor's
imports here."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import duckdb

from cifarcam.training.models import FAMILIES
from helpers import BackgroundJob, run_job

CAMS = "read_parquet('{run}/cams/**/*.parquet', hive_partitioning = true)"
KILLED_METHODS = ("gradcam", "layercam")


def _layers(model_folder: Path) -> int:
    return len(FAMILIES[model_folder.name.removeprefix("model=")].cam_layers)


def _published(model_folder: Path) -> list[Path]:
    """The killed job's partitions of this model that are published with their marker."""
    return [p.parent for m in KILLED_METHODS for p in model_folder.glob(f"layer=*/method={m}/_COMPLETE.json")]


def test_two_jobs_on_one_run_one_killed_lose_nothing_and_reruns_finish_without_recomputing(demo_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("cams", "sanity", "report", ".staging"))
    stored = duckdb.sql(f"select checkpoint from '{run}/accuracy.parquet' where model = 'resnet_tiny'").fetchall()[0][0]
    checkpoint = str(run / stored)  # the copy's own: checkpoints are stored relative to the run folder
    # the smallest real work per job: one target, no faithfulness curves, a small sanity sample
    common = ["jobs.cam", "--run", str(run), "--num-cpus", "2", "--targets", "pred", "--faithfulness-steps", "0", "--sanity-images", "16"]
    killed_job = [*common, "--methods", ",".join(KILLED_METHODS)]  # every model of the run

    # A model's folder exists from plan time (it holds the checkpoint's claim); a model is done
    # once every one of its partitions (each CAM layer x the job's methods) is published.
    def first_model() -> list[Path]:
        return [m for m in (run / "cams").glob("model=*") if len(_published(m)) == len(KILLED_METHODS) * _layers(m)]

    with BackgroundJob(tmp_path / "a.log", *killed_job) as first:
        time.sleep(5)  # the second starts while the first computes: it must not touch the first's files
        assert first.proc.poll() is None, first.output()[-3000:]  # still computing: the jobs overlap
        with BackgroundJob(tmp_path / "b.log", *common, "--checkpoint", checkpoint, "--methods", "xgradcam") as second:
            first.wait_for(first_model, "the first job's first model")
            first.kill()  # mid-way: its second model is being computed and written
            assert second.finish() == 0, second.output()[-3000:]  # the other job is not disturbed
    (done,) = first_model()
    images = duckdb.sql(f"select count(*) from '{run}/predictions.parquet' where model = 'resnet_tiny'").fetchall()[0][0]
    assert f"cams resnet_tiny (xgradcam): {images}/{images} images (100%)" in second.output()

    # One published partition of the finished model goes missing too: the rerun computes that one
    # (layer, method) of it again, and leaves the model's others alone.
    missing, *complete = sorted(_published(done))
    shutil.rmtree(missing)
    kept = {p: p.stat().st_mtime_ns for part in complete for p in part.rglob("*.parquet")}
    assert kept

    rerun = run_job(*killed_job)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-4000:]
    written, skipped = (int(n) for n in re.search(r"cams: (\d+) partitions written, (\d+) already complete", rerun.stdout).groups())
    assert skipped == len(complete) > 0
    others = [m for m in (run / "cams").glob("model=*") if m != done]
    assert written == 1 + sum(len(KILLED_METHODS) * _layers(m) for m in others)  # the missing one, the other model
    assert {p: p.stat().st_mtime_ns for part in complete for p in part.rglob("*.parquet")} == kept  # finished parts untouched
    assert list(missing.glob("_COMPLETE.json"))  # the missing one computed again
    assert not (run / ".staging").exists()

    # every model's maps, each (layer, method) complete once: nothing lost, nothing twice
    counts = duckdb.sql(f"select model, layer, method, count(*), count(distinct image_index) from {CAMS.format(run=run)} group by all").fetchall()
    assert all(n == distinct == images for *_, n, distinct in counts), counts
    expected = {(m, k) for m in ("resnet_tiny", "mobilenetv3_small") for k in KILLED_METHODS} | {("resnet_tiny", "xgradcam")}
    assert {(m, k) for m, _, k, *_ in counts} == expected
    assert len(counts) == sum(_layers(run / "cams" / f"model={m}") for m, _ in expected)
    # the sanity check of every finished job's methods survived: one file per model and method
    sanity = duckdb.sql(f"select model, method, count(*) from read_parquet('{run}/sanity/*/*.parquet') group by all order by all").fetchall()
    assert {(m, k) for m, k, _ in sanity} == expected and len(sanity) == len(expected)

    noop = run_job(*common, "--checkpoint", checkpoint, "--methods", "gradcam,layercam,xgradcam", timeout=300)
    assert noop.returncode == 0, noop.stderr[-3000:]
    assert f"cams: 0 partitions written, {3 * _layers(run / 'cams' / 'model=resnet_tiny')} already complete" in noop.stdout
    assert "Started a local Ray" not in noop.stdout + noop.stderr  # nothing to compute: no cluster

    # the copied run explained its own checkpoints (its tables store them relative to the run folder), not the original's
    claims = [json.loads(p.read_text())["checkpoint"] for p in (run / "cams").glob("model=*/_SOURCE.json")]
    assert len(claims) == 2 and all(Path(c).is_relative_to(run.resolve() / "train") for c in claims), claims
