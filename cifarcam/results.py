"""The run's Parquet files: atomic writers, the CAM and sanity schemas, the run-folder layout
(the search's tables are row dataclasses in ``cifarcam.search_tables``).

Every table is written to a temporary name and renamed into place, so a crash never leaves a
half-written file under a name a reader would open.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from cifarcam.errors import UserError
from cifarcam.run_layout import RunLayout


def write_table(rows: Iterable[Any] | dict[str, Any], schema: pa.Schema, path: Path, metadata: dict | None = None) -> Path:
    """Write rows (dataclasses or dicts, or a dict of columns) with ``schema``, atomically."""
    if isinstance(rows, dict):
        table = pa.Table.from_pydict(rows, schema=schema)
    else:
        table = pa.Table.from_pylist([dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r for r in rows], schema=schema)
    if metadata:
        table = table.replace_schema_metadata({k: json.dumps(v) for k, v in metadata.items()})
    with _written_whole_or_not_at_all(path) as partial:
        pq.write_table(table, partial)
    return path


@contextlib.contextmanager
def _written_whole_or_not_at_all(path: Path) -> Iterator[Path]:
    """A private name to write to, renamed to ``path`` once whole. If writing fails (a full disk, a
    quota, a read-only folder), nothing is left behind and the error is one line."""
    partial = _partial(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield partial
        durable_rename(partial, path)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write it ({err.strerror or err})") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _partial(path: Path) -> Path:
    """A private name beside ``path``: unique across hosts too (pids repeat across NFS clients)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk (where the filesystem can sync a
    folder: some FUSE mounts answer EINVAL, and have nothing to flush)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:
        if path.is_dir():  # a folder this user may write but not list: nothing this process can flush
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def durable_rename(source: Path, target: Path) -> None:
    """``source`` renamed to ``target`` so that a host crash leaves the old name or the whole new
    file or folder, never a name over a truncated or empty one: the data reaches the disk before
    the rename (ext4 and XFS may otherwise persist the rename first), the rename before this returns.
    A folder's files must have been synced by the caller."""
    fsync_path(source)
    os.replace(source, target)
    fsync_path(target.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Readers (on any node of a shared filesystem) see the old file or the whole new one, never
    an empty or half-written one, after a host crash too."""
    with _written_whole_or_not_at_all(path) as partial:
        partial.write_text(text)


def check_writable(out_dir: Path) -> None:
    """Fail before any cluster time when ``out_dir`` cannot be created or written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out_dir}: cannot create the results folder ({err.strerror})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(f"--out {out_dir}: the results folder is not writable")


def write_provenance(out_dir: Path, config_yaml: str) -> None:
    """The resolved config, package versions and git revision beside the run's outputs."""
    from cifarcam.provenance import git_revision, package_versions

    layout = RunLayout(out_dir)
    write_text_atomic(layout.config, config_yaml)
    write_text_atomic(layout.versions, json.dumps({**package_versions(), "git": git_revision()}, indent=2) + "\n")


HEATMAP_SIZE = 32  # heatmaps are stored at CIFAR's resolution, whatever the model's input size

# One row per test image x model x layer x method x target. The folder layout
# cams/model=<m>/layer=<l>/method=<k>/*.parquet carries model, layer and method (hive partitions).
# results/README.md explains every column. CAMS_VERSION (below the schema) changes whenever a
# column does, so that partitions written by an older version are refused instead of mixed in.
# CAMS_MEANING: bump it when a column keeps its name and type but changes what it measures.
CAMS_MEANING = 3
# The orderings each map's faithfulness is compared with (cifarcam.cam.faithfulness computes them).
# coarse_random: noise drawn on the explained layer's own grid and upsampled as its maps are, the
# control that separates "coarse" from "meaningful" (pixel noise cannot); per layer, the others per image.
BASELINES = ("random", "centre", "edge", "coarse_random")
# Where the faithfulness curves' steps fall: k / steps, or (k / steps)^2 of the pixels (cam.faithfulness.step_pixels).
SPACINGS = ("uniform", "quadratic")
CAM_FAITHFULNESS = tuple(f"{curve}_auc{suffix}" for suffix in ("", *(f"_{b}" for b in BASELINES)) for curve in ("deletion", "insertion"))
_FAITHFULNESS_COLUMNS = [(name, pa.float64()) for name in CAM_FAITHFULNESS]
CAMS = pa.schema(
    [
        ("run", pa.string()),
        ("layer_h", pa.int64()),  # the layer's feature-map size at the model's input size
        ("layer_w", pa.int64()),
        ("low_res_layer", pa.bool_()),  # 2x2 or smaller: the map can only say which quadrant
        ("target", pa.string()),  # 'pred' or 'label'
        ("target_class", pa.int64()),
        ("image_index", pa.int64()),
        ("label", pa.int64()),
        ("pred", pa.int64()),
        ("target_prob", pa.float64()),  # softmax probability of target_class
        ("correct", pa.bool_()),
        ("heatmap", pa.list_(pa.uint8(), HEATMAP_SIZE * HEATMAP_SIZE)),  # row-major, 0-255
        ("degenerate", pa.bool_()),  # a constant map (every 1x1 layer): the statistics below are null
        # the peak on the layer's grid, as its cell's centre in pixels (cell (0, 0) of 4x4: 3.5, 3.5)
        ("peak_y", pa.float64()),
        ("peak_x", pa.float64()),
        ("entropy", pa.float64()),  # of the layer's grid, over log(cells): 0 = one cell, 1 = uniform
        ("top10_mass", pa.float64()),  # share of the map's mass in its top 10% of pixels
        # where the image has an object mask (synthetic data, Parquet sources with masks or boxes)
        ("peak_in_object", pa.bool_()),  # the object covers the pixel(s) nearest the peak
        ("pointing_hit", pa.bool_()),  # the peak lies within 2 px of the object (the pointing game)
        ("pointing_hit_cell", pa.bool_()),  # the object touches the peak's cell of the layer's grid
        ("mass_on_object", pa.float64()),  # share of the map's mass on the object
        ("object_area", pa.float64()),  # share of the image the object covers (= chance for mass_on_object)
        ("object_cell_share", pa.float64()),  # share of the grid's cells the object touches (= chance for pointing_hit_cell)
        # faithfulness, on a seeded sample of images, predicted class only (null elsewhere):
        # deletion (lower = better) and insertion (higher = better), for the map and each of BASELINES
        ("faithfulness_sample", pa.bool_()),
        *_FAITHFULNESS_COLUMNS,
    ]
)
# The CAM columns a batch leaves null by leaving them out: localisation where the images have no
# object mask, faithfulness outside its sample and target. Every other column must be filled.
CAM_LOCALISATION = ("peak_in_object", "pointing_hit", "pointing_hit_cell", "mass_on_object", "object_area", "object_cell_share")
CAM_OPTIONAL = frozenset(CAM_LOCALISATION + CAM_FAITHFULNESS)
CAMS_VERSION = f"{CAMS_MEANING}-" + hashlib.sha256(";".join(f"{f.name}:{f.type}" for f in CAMS).encode()).hexdigest()[:12]
# The cascading-randomisation sanity check (cifarcam.cam.sanity): once every layer above the
# explained one is random, a rank correlation this high means that the map barely depends on what
# the model learned there (Adebayo et al. flag visually similar maps).
FAIL_SPEARMAN = 0.5
# One row per model x CAM layer x method x cascade step, in <run>/sanity/model=<family>.parquet.
SANITY = pa.schema(
    [
        ("model", pa.string()),
        ("layer", pa.string()),
        ("method", pa.string()),
        ("step", pa.int64()),  # 0: the head randomised; then one more CAM layer per step, top down
        ("randomised_to", pa.string()),  # "head" or the CAM layer randomised at this step
        ("images", pa.int64()),  # images whose trained map is not constant
        ("draws", pa.int64()),  # independent randomisations; each image's rho is its mean over them
        ("became_constant", pa.float64()),  # share of them whose randomised map is constant (counted as rho = 0)
        ("spearman", pa.float64()),  # mean rank correlation with the trained model's map (1 = unchanged)
        ("spearman_se", pa.float64()),
        # Adebayo et al.'s comparison: the maps on the layer's own grid before the ReLU (null: a 1-cell grid has no rank)
        ("spearman_layer", pa.float64()),  # signed maps
        ("spearman_layer_se", pa.float64()),
        ("spearman_layer_abs", pa.float64()),  # their absolute values
        ("spearman_layer_abs_se", pa.float64()),
        ("ssim_layer", pa.float64()),  # SSIM of the absolute maps scaled to [0, 1], one window over the grid
        ("ssim_layer_se", pa.float64()),
        ("above_random", pa.bool_()),  # every layer above this one is random at this step
        ("check", pa.bool_()),  # the first such step: the row the report judges
    ]
)
CAM_PARTITIONS = ("model", "layer", "method")
