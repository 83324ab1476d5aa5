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
from cifarcam.errors import ConfigError, DataError
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
    assert [f["name"] for f in marker["files"]] == ["part-0.parquet"] and marker["rows"] == 3
    assert marker["files"][0]["bytes"] == (folder / "part-0.parquet").stat().st_size and marker["source"]["weights_sha256"] == source.weights_sha256
    assert marker["settings"] == {"targets": ["pred"]}
    (folder / "part-0.parquet").unlink()  # half-deleted
    assert read_marker(folder) is None and not is_complete(folder, source)
    assert not is_complete(tmp_path / "cams" / "model=nothing", source)


@pytest.mark.parametrize("damage", ["truncated", "same size, one byte changed", "emptied"])
def test_a_file_cut_short_or_changed_since_its_marker_makes_the_partition_incomplete(tmp_path, source, damage):
    """What a host crash or a disk can leave behind a marker: the rerun recomputes it, instead of
    failing later in DuckDB."""
    raw = tmp_path / "raw.parquet"
    pq.write_table(_rows(NAMES[:1], per_partition=50), raw)
    (folder,) = regroup([raw], tmp_path / "cams", KEYS, source, {})
    part = folder / "part-0.parquet"
    data = part.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "same size, one byte changed": data[:100] + bytes([data[100] ^ 1]) + data[101:], "emptied": b""}
    part.write_bytes(damaged[damage])
    assert read_marker(folder) is None and not is_complete(folder, source)


def test_a_partition_missing_rows_gets_no_marker(tmp_path, source):
    """A partition is published only whole: every image x target (an actor that lost a block, a
    write that stopped short)."""
    raw = tmp_path / "raw.parquet"
    pq.write_table(_rows(NAMES[:2], per_partition=3), raw)
    with pytest.raises(DataError, match=r"^CAM rows: expected 4 per partition \(images x targets\), got .*: 3, .*: 3; nothing of them is published$"):
        regroup([raw], tmp_path / "cams", KEYS, source, {}, expected_rows=4)
    assert not list((tmp_path / "cams").rglob(partitions.MARKER))
    assert len(regroup([raw], tmp_path / "ok", KEYS, source, {}, expected_rows=3)) == 2


def test_files_reach_the_disk_before_their_names(tmp_path, source, monkeypatch):
    """Every file is fsynced before the rename that publishes it, and each folder after (the
    order a host crash needs). Recorded through os.fsync: a crash cannot be staged here."""
    import os

    synced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (synced.append(f"rename {a} -> {b}"), real_replace(a, b)))
    raw = tmp_path / "raw.parquet"
    pq.write_table(_rows(NAMES[:1]), raw)
    (folder,) = regroup([raw], tmp_path / "parts", KEYS, source, {})
    target = tmp_path / "cams" / folder.relative_to(tmp_path / "parts")
    partitions.publish(folder, target, source, tmp_path / "trash")
    part, marker_rename = synced.index(str(folder / "part-0.parquet")), next(i for i, s in enumerate(synced) if s.endswith(f"-> {folder / partitions.MARKER}"))
    folder_rename = synced.index(f"rename {folder} -> {target}")
    assert part < synced.index(str(folder)) < marker_rename < folder_rename < synced.index(str(target.parent))
    assert synced[marker_rename - 1].endswith(".partial")  # the marker's own data first


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


def test_files_and_row_groups_per_partition_are_bounded_whatever_the_number_of_blocks(tmp_path, source, monkeypatch):
    monkeypatch.setattr(partitions, "MAX_ROWS_PER_FILE", 10)
    monkeypatch.setattr(partitions, "ROW_GROUP_ROWS", 4)
    raws = []
    for block in range(7):  # 7 blocks of 3 rows per partition, as Ray Data would write them
        raws.append(tmp_path / f"block{block}.parquet")
        pq.write_table(_rows(NAMES[:2]), raws[-1])
    folders = regroup(raws, tmp_path / "cams", KEYS, source, {})
    for folder in folders:
        marker = read_marker(folder)
        assert marker["rows"] == 21 and len(marker["files"]) == 3  # 9 + 9 + 3 rows
        assert sorted(p.name for p in folder.glob("*.parquet")) == [f["name"] for f in marker["files"]]
        # whole row groups of 4 rows, not one per block of 3: 4 + 4 + 1, twice, then 3
        sizes = [
            [pq.ParquetFile(folder / f["name"]).metadata.row_group(i).num_rows for i in range(pq.ParquetFile(folder / f["name"]).num_row_groups)]
            for f in marker["files"]
        ]
        assert sizes == [[4, 4, 1], [4, 4, 1], [3]]


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


def test_a_job_does_not_publish_beside_partitions_another_job_published_with_other_settings(tmp_path, source):
    """Two jobs plan on an empty run with different settings (nothing pins the run until a
    partition is published); the second to publish must refuse rather than mix the two."""
    first = {"targets": ["pred", "label"], "test_set": "a" * 64}
    raw = tmp_path / "first"
    raw.mkdir()
    pq.write_table(_rows(NAMES[:1]), raw / "rows.parquet")
    with Staging(tmp_path) as job:
        written, _ = job.regroup_and_publish(raw, KEYS, {NAMES[0]}, source, first, expected_rows=3)
    assert written == [partition_dir(tmp_path / "cams", *NAMES[0])]
    raw = tmp_path / "second"
    raw.mkdir()
    pq.write_table(_rows(NAMES[1:2]), raw / "rows.parquet")
    with Staging(tmp_path) as job, pytest.raises(ConfigError, match=r"method=gradcam: computed with targets \['pred', 'label'\] \(now asked for \['pred'\]\)"):
        job.regroup_and_publish(raw, KEYS, {NAMES[1]}, source, {**first, "targets": ["pred"]}, expected_rows=3)
    assert not partition_dir(tmp_path / "cams", *NAMES[1]).exists()
