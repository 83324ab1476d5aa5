"""Two CAM jobs on one run folder at once, then a rerun: real processes, each with its own local
Ray, as two users (or a user and a SLURM requeue) would start them."""

from __future__ import annotations

import shutil
import time

import duckdb

from helpers import BackgroundJob, run_job

CAMS = "read_parquet('{run}/cams/**/*.parquet', hive_partitioning = true)"


def test_two_jobs_on_one_run_lose_nothing_and_a_rerun_recomputes_nothing(demo_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("cams", "sanity", "report", ".staging"))
    checkpoint = duckdb.sql(f"select checkpoint from '{run}/accuracy.parquet' where model = 'resnet_tiny'").fetchall()[0][0]
    # the smallest real work per job: one model, one target, no faithfulness curves, a small sanity sample
    common = [
        "jobs.cam",
        "--run",
        str(run),
        "--checkpoint",
        checkpoint,
        "--num-cpus",
        "2",
        "--targets",
        "pred",
        "--faithfulness-steps",
        "0",
        "--sanity-images",
        "16",
    ]
    with BackgroundJob(tmp_path / "a.log", *common, "--methods", "gradcam++") as first:
        time.sleep(5)  # the second starts while the first computes: it must not touch the first's files
        assert first.proc.poll() is None, first.output()[-3000:]  # still computing: the jobs overlap
        with BackgroundJob(tmp_path / "b.log", *common, "--methods", "xgradcam") as second:
            assert second.finish() == 0, second.output()[-3000:]
        assert first.finish() == 0, first.output()[-3000:]

    images = duckdb.sql(f"select count(*) from '{run}/predictions.parquet' where model = 'resnet_tiny'").fetchall()[0][0]
    counts = duckdb.sql(f"select model, layer, method, count(*), count(distinct image_index) from {CAMS.format(run=run)} group by all").fetchall()
    models = {m for m, *_ in counts}
    assert models == {"resnet_tiny"} and {k for _, _, k, *_ in counts} == {"gradcam++", "xgradcam"}
    assert len(counts) == 3 * 2  # layers x methods
    assert all(n == distinct == images for *_, n, distinct in counts), counts
    assert not (run / ".staging").exists()
    # each job showed its own progress in its log
    assert "cams resnet_tiny (gradcam++): " in first.output()
    assert f"cams resnet_tiny (xgradcam): {images}/{images} images (100%)" in second.output()
    # the sanity check of both jobs' methods survived: one file per method
    sanity = duckdb.sql(f"select model, method, count(*) from read_parquet('{run}/sanity/*/*.parquet') group by all order by all").fetchall()
    assert [(m, k) for m, k, _ in sanity] == [("resnet_tiny", "gradcam++"), ("resnet_tiny", "xgradcam")]

    rerun = run_job(*common, "--methods", "gradcam++,xgradcam", timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"cams: 0 partitions written, {len(counts)} already complete" in rerun.stdout
    assert "Started a local Ray" not in rerun.stdout + rerun.stderr  # nothing to compute: no cluster
