"""CAM partitions on disk: names, completion markers, the run's lock, per-job staging, publishing.

Layout: ``cams/model=<m>/layer=<l>/method=<k>/part-<i>.parquet`` plus ``_COMPLETE.json``. Values
are URI-encoded exactly as pyarrow's hive writer encodes them (``method=gradcam%2B%2B``), which
DuckDB, pandas and pyarrow decode back to ``gradcam++``.

A partition is complete only when its marker is there and every file the marker lists is there
with the size and SHA-256 it had when written: a folder without one (a crash mid-copy, an older
version's output) or with a file cut short or changed since is recomputed. A marker is written only
for a partition that holds every row (images x targets), and only after its files reached the
disk (fsync), so a host crash cannot leave a marker over a truncated file. The marker also names the
checkpoint (path and SHA-256 of its weights) the maps came from, so maps of one checkpoint never
pass for another's.

Two jobs may explain one run at once (other methods, other layers) and a killed job's rerun may
start while nothing else runs: each job writes only under its own staging folder, held by a lock
that dies with its process, and plan and publish run under the run's lock (cifarcam.run_lock).
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from cifarcam.errors import ConfigError, DataError
from cifarcam.provenance import sha256_of
from cifarcam.results import durable_rename, fsync_path, write_text_atomic
from cifarcam.run_layout import RunLayout
from cifarcam.run_lock import LOCK_MODE, run_lock

CAM_JOB = "the CAM stage"  # how the run's lock names its holder
MARKER = "_COMPLETE.json"
CLAIM = "_SOURCE.json"  # in model=<m>/: the checkpoint whose maps that folder holds
MAX_ROWS_PER_FILE = 250_000  # about 300 MB of heatmaps: one file per partition up to 125,000 images x 2 targets
# Rows per Parquet row group, about 5 MB. Written part by part, a partition would get one row group
# for each file Ray Data's write tasks left (4 for 10,000 images here; more with more tasks).
ROW_GROUP_ROWS = 4096


def encode(value: str) -> str:
    """A hive partition value as pyarrow writes it (everything but letters, digits and ``-._~``
    is %-escaped)."""
    return urllib.parse.quote(value, safe="")


def model_dir(cams_dir: Path, model: str) -> Path:
    return cams_dir / f"model={encode(model)}"


def partition_dir(cams_dir: Path, model: str, layer: str, method: str) -> Path:
    return model_dir(cams_dir, model) / f"layer={encode(layer)}" / f"method={encode(method)}"


@dataclass(frozen=True)
class Source:
    """What a partition's maps were computed from."""

    checkpoint: str
    weights_sha256: str

    @classmethod
    def of(cls, checkpoint: str | Path) -> Source:
        from cifarcam.training import weights_sha256

        return cls(str(Path(checkpoint).resolve()), weights_sha256(checkpoint))


def _file_record(path: Path) -> dict:
    """What a marker records of each file: enough to tell it was cut short or changed."""
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_of(path)}


def _intact(folder: Path, record: dict | str) -> bool:
    if isinstance(record, str):  # a marker from before sizes and checksums: the file's presence
        return (folder / record).is_file()
    path = folder / record["name"]
    return path.is_file() and path.stat().st_size == record["bytes"] and sha256_of(path) == record["sha256"]


def read_marker(folder: Path) -> dict | None:
    """The partition's marker when the partition is complete (every listed file there, with its
    recorded size and checksum), else None."""
    marker = _marker_text(folder)
    files = (marker or {}).get("files") or []
    return marker if files and all(_intact(folder, record) for record in files) else None


def _marker_text(folder: Path) -> dict | None:
    """The partition's marker as written, its files unchecked; None where there is none."""
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _refuse_other_source(folder: Path, recorded: dict, source: Source, model_dir: Path) -> None:
    if recorded.get("weights_sha256") != source.weights_sha256:
        raise ConfigError(
            f"{folder}: computed from checkpoint {recorded.get('checkpoint')} (weights sha256 {str(recorded.get('weights_sha256'))[:12]}), "
            f"not {source.checkpoint} (sha256 {source.weights_sha256[:12]}); remove {model_dir} to explain the new checkpoint, or use another --run"
        )


def is_complete(folder: Path, source: Source) -> bool:
    """Complete and computed from ``source``'s weights; complete from other weights is an error."""
    marker = read_marker(folder)
    if marker is None:
        return False
    _refuse_other_source(folder, marker.get("source") or {}, source, folder.parent.parent)
    return True


def claim_model(folder: Path, source: Source) -> None:
    """Tie a ``model=<m>/`` folder to one checkpoint before computing (the run's lock must be
    held): every partition already there, and any job planning later, must agree on the weights."""
    claim = folder / CLAIM
    if claim.is_file():
        _refuse_other_source(folder, json.loads(claim.read_text()), source, folder)
    for partition in sorted(folder.glob("layer=*/method=*")):  # the markers' word: no file hashed here
        marker = _marker_text(partition)
        if marker is not None:  # without one, the partition is recomputed anyway
            _refuse_other_source(partition, marker.get("source") or {}, source, folder)
    write_text_atomic(claim, json.dumps(asdict(source), indent=2))


def check_settings(cams_dir: Path, settings: dict) -> None:
    """Existing partitions are reused only when they were computed the same way: each marker records
    the settings and the test set its partition was computed with, and every published partition
    of the run must match ``settings`` (the report reads them all as one table). Checked when a job
    plans and again when it publishes (another job may have published meanwhile). Nothing is
    written here: a job that dies before publishing leaves the run free for any settings."""
    for partition in sorted(cams_dir.glob("model=*/layer=*/method=*")):
        marker = _marker_text(partition)
        if marker is None:  # no marker: recomputed anyway
            continue
        saved = _as_now(marker.get("settings") or {})
        # A marker from before test-set fingerprints cannot say which test set it had: its other settings decide.
        wanted = settings if "test_set" in saved else {k: v for k, v in settings.items() if k != "test_set"}
        if saved != wanted:
            raise ConfigError(
                f"{partition}: computed with {_differences(saved, wanted)}; use the same settings, or remove {cams_dir} to recompute every partition with these"
            )


def _as_now(saved: dict) -> dict:
    """A marker's settings in today's terms: one written before faithfulness had a spacing used
    uniform steps (the same thresholds and AUCs as today's uniform ones at 16 steps of 1,024
    pixels), so `--faithfulness-steps 16 --faithfulness-spacing uniform` reuses it."""
    faithfulness = saved.get("faithfulness")
    if isinstance(faithfulness, dict) and "spacing" not in faithfulness:
        return {**saved, "faithfulness": {**faithfulness, "spacing": "uniform"}}
    return saved


def _differences(saved: dict, wanted: dict, prefix: str = "") -> str:
    """The settings that differ, by name (``faithfulness.steps``: the differing keys of a nested
    dict, not the whole dict)."""
    keys = [k for k in dict.fromkeys([*saved, *wanted]) if saved.get(k) != wanted.get(k)]

    def shown(value: object) -> str:  # a fingerprint's first digits are enough to tell two apart
        return repr(value[:12] + "...") if isinstance(value, str) and len(value) > 40 else repr(value)

    return ", ".join(
        _differences(saved[k], wanted[k], f"{prefix}{k}.")
        if isinstance(saved.get(k), dict) and isinstance(wanted.get(k), dict)
        else f"{prefix}{k} {shown(saved.get(k))} (now asked for {shown(wanted.get(k))})"
        for k in keys
    )


class Staging:
    """This job's own folder under ``run/.staging``, locked for as long as the job lives.

    A folder whose lock nobody holds, or that has no lock file at all (a live job creates its lock
    before its folder), belongs to a job that died: ``sweep`` removes it. A live job's folder is
    never touched. Folders come and go under the run's lock, so that one job's removal of the
    empty ``.staging`` cannot race another's start."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.root = run_dir / ".staging"
        self.folder = self.root / f"cams-{uuid.uuid4().hex}"
        self._lock = FileLock(self.folder.with_suffix(".lock"), mode=LOCK_MODE)
        with run_lock(run_dir, CAM_JOB):
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
            self.folder.mkdir()

    def sweep(self) -> list[Path]:
        """Remove what dead jobs left; returns the folders removed."""
        removed = []
        with run_lock(self.run_dir, CAM_JOB):
            for folder in sorted(p for p in self.root.glob("cams-*") if p.is_dir() and p != self.folder):
                lock_path = folder.with_suffix(".lock")
                if lock_path.exists():
                    lock = FileLock(lock_path, mode=LOCK_MODE)
                    try:
                        lock.acquire(timeout=0)
                    except (Timeout, OSError):
                        continue  # a live job's (or one this user may not judge)
                    lock.release()
                    lock_path.unlink(missing_ok=True)
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        return removed

    def regroup_and_publish(
        self, raw: Path, keys: tuple[str, ...], wanted: set[tuple[str, ...]], source: Source, settings: dict, expected_rows: int
    ) -> tuple[list[Path], int]:
        """Regroup the Parquet files in ``raw`` (unpartitioned rows, e.g. Ray Data's write) into
        partitions by ``keys`` and publish those whose key values are ``wanted`` under
        ``run/cams``; the others were computed alongside (the published copy stands). Each must
        hold ``expected_rows``. Returns (partitions published, partitions another job published
        meanwhile). ``raw`` is removed."""
        parts = self.folder / "parts"
        staged = regroup(sorted(raw.glob("*.parquet")), parts, keys, source, settings, expected_rows)
        shutil.rmtree(raw)
        wanted_folders = {parts.joinpath(*(f"{k}={encode(v)}" for k, v in zip(keys, key, strict=False))) for key in wanted}
        written, skipped = [], 0
        with run_lock(self.run_dir, CAM_JOB):
            check_settings(RunLayout(self.run_dir).cams, settings)
            for folder in sorted(f for f in staged if f in wanted_folders):
                target = RunLayout(self.run_dir).cams / folder.relative_to(parts)
                if publish(folder, target, source, self.folder / "trash"):
                    written.append(target)
                else:
                    skipped += 1
        shutil.rmtree(parts, ignore_errors=True)
        return written, skipped

    def close(self) -> None:
        with run_lock(self.run_dir, CAM_JOB):
            shutil.rmtree(self.folder, ignore_errors=True)
            self._lock.release()
            Path(self._lock.lock_file).unlink(missing_ok=True)
            try:
                self.root.rmdir()  # only when no other job stages here
            except OSError:
                pass

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _PartitionFiles:
    """The files of one partition being written: at most MAX_ROWS_PER_FILE rows each, in row
    groups of ROW_GROUP_ROWS (the parts are held until one is full)."""

    folder: Path
    metadata: dict[str, str]  # each file's schema metadata: how its rows were computed
    files: list[str] = field(default_factory=list)
    writer: pq.ParquetWriter | None = None
    rows_in_file: int = 0
    rows: int = 0
    pending: list[pa.Table] = field(default_factory=list)
    pending_rows: int = 0

    def write(self, part: pa.Table) -> None:
        part = part.replace_schema_metadata(self.metadata)
        if self.writer is None or self.rows_in_file + part.num_rows > MAX_ROWS_PER_FILE:
            self.close()
            self.folder.mkdir(parents=True, exist_ok=True)
            self.files.append(f"part-{len(self.files)}.parquet")
            self.writer, self.rows_in_file = pq.ParquetWriter(self.folder / self.files[-1], part.schema), 0
        self.pending.append(part)
        self.pending_rows += part.num_rows
        self.rows_in_file += part.num_rows
        self.rows += part.num_rows
        if self.pending_rows >= ROW_GROUP_ROWS:
            self._flush(everything=False)

    def _flush(self, everything: bool) -> None:
        """Write the held rows in whole row groups; ``everything``: the last, partial one too."""
        if not self.pending:
            return
        table = pa.concat_tables(self.pending)
        cut = table.num_rows if everything else table.num_rows - table.num_rows % ROW_GROUP_ROWS
        self.writer.write_table(table.slice(0, cut), row_group_size=ROW_GROUP_ROWS)
        rest = table.slice(cut)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self.writer is not None:
            self._flush(everything=True)
            self.writer.close()
            self.writer = None
            fsync_path(self.folder / self.files[-1])


def regroup(raw_files: list[Path], out_root: Path, keys: tuple[str, ...], source: Source, settings: dict, expected_rows: int | None = None) -> list[Path]:
    """Rewrite rows from ``raw_files`` (any mix of partitions) as one folder per value of ``keys``
    under ``out_root``, with at most MAX_ROWS_PER_FILE rows a file and a marker in each folder.

    One pass over the input, one writer open per partition: a partition of the full test set is
    one file, whatever the number of blocks Ray Data wrote. Each file's schema metadata carries
    ``settings`` and ``source`` (JSON), so a file copied elsewhere still says how it was made.
    With ``expected_rows``, a partition holding any other number of rows fails the regroup, and
    no marker is written."""
    partitions: dict[tuple[str, ...], _PartitionFiles] = {}
    try:
        for raw in raw_files:
            table = pq.read_table(raw)
            for key, part in _split(table, keys):
                if key not in partitions:
                    folder = out_root.joinpath(*(f"{k}={encode(v)}" for k, v in zip(keys, key, strict=False)))
                    partitions[key] = _PartitionFiles(folder, {"cifarcam_settings": json.dumps(settings), "cifarcam_source": json.dumps(asdict(source))})
                partitions[key].write(part.drop_columns(list(keys)))
    finally:
        for partition in partitions.values():
            partition.close()
    short = [p for p in partitions.values() if expected_rows is not None and p.rows != expected_rows]
    if short:
        counts = ", ".join(f"{p.folder.relative_to(out_root)}: {p.rows}" for p in short)
        raise DataError(f"CAM rows: expected {expected_rows} per partition (images x targets), got {counts}; nothing of them is published")
    for partition in partitions.values():
        files = [_file_record(partition.folder / name) for name in partition.files]
        fsync_path(partition.folder)
        marker = {"files": files, "rows": partition.rows, "source": asdict(source), "settings": settings}
        write_text_atomic(partition.folder / MARKER, json.dumps(marker, indent=2))
    return [partition.folder for partition in partitions.values()]


def _split(table: pa.Table, keys: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], pa.Table]]:
    import pyarrow.compute as pc

    groups = table.group_by(list(keys)).aggregate([]).to_pylist()
    for group in groups:
        mask = None
        for k in keys:
            match = pc.equal(table[k], group[k])
            mask = match if mask is None else pc.and_(mask, match)
        yield tuple(group[k] for k in keys), table.filter(mask)


def publish(staged: Path, target: Path, source: Source, trash: Path) -> bool:
    """Move one staged partition into place; the run's lock must be held. False when another job
    published it meanwhile (the staged copy is dropped). An incomplete folder in the way (no
    marker) is moved aside first, then the rename: readers see the old folder or the new one."""
    if is_complete(target, source):
        shutil.rmtree(staged, ignore_errors=True)
        return False
    if target.exists():
        trash.mkdir(parents=True, exist_ok=True)
        target.rename(trash / uuid.uuid4().hex)
    target.parent.mkdir(parents=True, exist_ok=True)
    durable_rename(staged, target)
    return True
