"""CAM partitions on disk: names every reader decodes, markers, checkpoint provenance, staging."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from cifarcam.cam import partitions
from cifarcam.cam.methods import METHODS
from cifarcam.cam.partitions import Source, Staging, claim_model, is_complete, model_dir, partition_dir, read_marker, regroup
from cifarcam.errors import ConfigError
from cifarcam.training.checkpoint import save_checkpoint
from cifarcam.training.models import ModelSpec, build_model

KEYS = ("model", "layer", "method")
NAMES = [("resnet_tiny", "layer3", method) for method in METHODS] + [
    ("mobilenetv3_small", "blocks.2", "gradcam++"),
    ("my+model", "stages.1.blocks.0", "grad cam"),
    ("swin", "layers.2", "50%=x/y"),
]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Source:
    spec = ModelSpec("resnet_tiny", 10)
    torch.manual_seed(0)
    return Source.of(save_checkpoint(tmp_path_factory.mktemp("ckpt"), build_model(spec), spec, {}))


def _rows(names: list[tuple[str, str, str]], per_partition: int = 3) -> pa.Table:
    rows = [{"model": m, "layer": layer, "method": k, "image_index": i} for m, layer, k in names for i in range(per_partition)]
    return pa.Table.from_pylist(rows)


def test_every_method_and_odd_name_reads_back_from_duckdb_pandas_and_pyarrow(tmp_path, source):
    raw = tmp_path / "raw.parquet"
    pq.write_table(_rows(NAMES), raw)
    folders = regroup([raw], tmp_path / "cams", KEYS, source, {})
    assert sorted(folders) == sorted(partition_dir(tmp_path / "cams", *name) for name in NAMES)
    assert all(is_complete(partition_dir(tmp_path / "cams", *name), source) for name in NAMES)
    assert not any("+" in p.name or " " in p.name for p in (tmp_path / "cams").rglob("*=*"))  # written as pyarrow writes hive values
    query = f"select model, layer, method, count(*) from read_parquet('{tmp_path}/cams/**/*.parquet', hive_partitioning = true) group by all"
    assert sorted(duckdb.sql(query).fetchall()) == sorted((*name, 3) for name in NAMES)
    table = ds.dataset(tmp_path / "cams", format="parquet", partitioning="hive").to_table()
    assert {(r["model"], r["layer"], r["method"]) for r in table.to_pylist()} == set(NAMES)


def test_a_partition_is_complete_only_with_its_marker_and_every_file(tmp_path, source):
    raw = tmp_path / "raw.parquet"
    pq.write_table(_rows(NAMES[:1]), raw)
    (folder,) = regroup([raw], tmp_path / "cams", KEYS, source, {"targets": ["pred"]})
    marker = read_marker(folder)
    assert marker["files"] == ["part-0.parquet"] and marker["rows"] == 3 and marker["source"]["weights_sha256"] == source.weights_sha256
    assert marker["settings"] == {"targets": ["pred"]}
    (folder / "part-0.parquet").unlink()  # half-deleted
    assert read_marker(folder) is None and not is_complete(folder, source)
    assert not is_complete(tmp_path / "cams" / "model=nothing", source)


def test_maps_of_another_checkpoint_are_refused(tmp_path, source):
    raw = tmp_path / "raw.parquet"
    pq.write_table(_rows(NAMES[:1]), raw)
    (folder,) = regroup([raw], tmp_path / "cams", KEYS, source, {})
    spec = ModelSpec("resnet_tiny", 10)
    torch.manual_seed(1)
    other = Source.of(save_checkpoint(tmp_path / "other", build_model(spec), spec, {}))
    with pytest.raises(
        ConfigError, match=rf"computed from checkpoint {source.checkpoint} \(weights sha256 {source.weights_sha256[:12]}\), not {other.checkpoint}"
    ):
        is_complete(folder, other)


def test_a_model_folder_holds_one_checkpoints_maps(tmp_path, source):
    """The claim is written at plan time: a later job with other weights is refused even for
    layers or methods nobody has computed yet, and even before the first job publishes."""
    folder = model_dir(tmp_path / "cams", "resnet_tiny")
    claim_model(folder, source)
    claim_model(folder, source)  # the same weights again: fine
    spec = ModelSpec("resnet_tiny", 10)
    torch.manual_seed(2)
    other = Source.of(save_checkpoint(tmp_path / "other", build_model(spec), spec, {}))
    with pytest.raises(ConfigError, match=rf"^{folder}: computed from checkpoint {source.checkpoint} .*; remove {folder} to explain the new checkpoint"):
        claim_model(folder, other)


def test_files_per_partition_are_bounded_whatever_the_number_of_blocks(tmp_path, source, monkeypatch):
    monkeypatch.setattr(partitions, "MAX_ROWS_PER_FILE", 10)
    raws = []
    for block in range(7):  # 7 blocks of 3 rows per partition, as Ray Data would write them
        raws.append(tmp_path / f"block{block}.parquet")
        pq.write_table(_rows(NAMES[:2]), raws[-1])
    folders = regroup(raws, tmp_path / "cams", KEYS, source, {})
    for folder in folders:
        marker = read_marker(folder)
        assert marker["rows"] == 21 and len(marker["files"]) == 3  # 9 + 9 + 3 rows
        assert sorted(p.name for p in folder.glob("*.parquet")) == marker["files"]


def _hold_staging(run_dir: str, ready, done) -> None:
    with Staging(Path(run_dir)) as staging:
        (staging.folder / "in-flight.parquet").write_bytes(b"x")
        ready.set()
        done.wait(60)


def test_staging_of_a_live_job_survives_and_a_dead_jobs_is_swept(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, done = context.Event(), context.Event()
    live = context.Process(target=_hold_staging, args=(str(tmp_path), ready, done))
    live.start()
    try:
        assert ready.wait(60)
        dead = Staging(tmp_path)  # a job killed mid-way: its lock goes with its process
        (dead.folder / "half.parquet").write_bytes(b"x")
        dead._lock.release()
        unlocked = tmp_path / ".staging" / "cams-resnet_tiny-0a1b2c3d"  # an older version's, no lock file
        unlocked.mkdir()
        with Staging(tmp_path) as job:
            removed = job.sweep()
            assert sorted(removed) == sorted([dead.folder, unlocked]) and not dead.folder.exists() and not unlocked.exists()
            survivors = [p for p in (tmp_path / ".staging").iterdir() if p.is_dir() and p != job.folder]
            assert len(survivors) == 1 and (survivors[0] / "in-flight.parquet").is_file()
    finally:
        done.set()
        live.join(60)
    assert not (tmp_path / ".staging").exists()  # the last job out removes the folder
