"""Dataset sources: the official CIFAR pickles (directory or .tar.gz, downloaded when allowed)
and Parquet tables of encoded images."""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cifarcam.data.image_set import ImageSet
from cifarcam.errors import ConfigError, DataError
from cifarcam.safe_pickle import safe_load


@dataclass(frozen=True)
class CifarRelease:
    url: str
    md5: str
    folder: str  # top-level folder inside the archive
    train_file: str
    test_file: str
    meta_file: str
    label_key: str
    names_key: str


CIFAR_SIDE = 32  # the official CIFAR files' image side: each row holds 3 x 32 x 32 bytes, R, G, B planes
CIFAR_RELEASES = {
    "cifar10": CifarRelease(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_file="data_batch_{1..5}",
        test_file="test_batch",
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
    ),
    "cifar100": CifarRelease(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_file="train",
        test_file="test",
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
    ),
}


def _member_names(release: CifarRelease, split: str) -> list[str]:
    if split == "test":
        return [release.test_file]
    if release.train_file.endswith("{1..5}"):
        stem = release.train_file[: -len("{1..5}")]
        return [f"{stem}{i}" for i in range(1, 6)]
    return [release.train_file]


def md5sum(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def download_archive(release: CifarRelease, cache_dir: Path) -> Path:
    """Fetch the archive once into ``cache_dir`` (file-locked: parallel workers download once)
    and verify its checksum."""
    from filelock import FileLock

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. a read-only home on a compute node: the user's to fix
        raise DataError(f"data.cache_dir {cache_dir}: cannot create it ({err.strerror or err}); set data.cache_dir or data.path") from None
    target = cache_dir / Path(release.url).name
    with FileLock(str(target) + ".lock"):
        if not target.exists():
            partial = target.with_suffix(".part")
            try:
                with urllib.request.urlopen(release.url, timeout=60) as resp, open(partial, "wb") as out:
                    while block := resp.read(1 << 20):
                        out.write(block)
            except OSError as err:
                partial.unlink(missing_ok=True)
                raise DataError(
                    f"cannot download {release.url} ({err}); offline, put {target.name} "
                    f"(or the extracted {release.folder}/ folder) in {cache_dir} or set data.path"
                ) from None
            partial.rename(target)
        verify_md5(target, release.md5)
    return target


def verify_md5(path: Path, expected: str) -> None:
    actual = md5sum(path)
    if actual != expected:
        raise DataError(f"{path}: checksum mismatch (md5 {actual}, expected {expected}); delete it and retry")


def _reader_for(path: Path, release: CifarRelease) -> Callable[[str], bytes]:
    """A function that returns the bytes of one archive member, from a folder or a .tar.gz."""
    if path.is_dir():
        folder = path / release.folder if (path / release.folder).is_dir() else path

        def read_file(name: str) -> bytes:
            member = folder / name
            if not member.is_file():
                raise DataError(f"{folder}: missing CIFAR file {name!r}")
            return member.read_bytes()

        return read_file
    try:
        archive = tarfile.open(path, "r:gz")
        members = {m.name.split("/")[-1]: m for m in archive.getmembers() if m.isfile()}
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"{path}: truncated or corrupt archive ({err}); expected {Path(release.url).name}") from None

    def read_member(name: str) -> bytes:
        if name not in members:
            raise DataError(f"{path}: archive has no CIFAR file {name!r}")
        try:
            return archive.extractfile(members[name]).read()  # type: ignore[union-attr]
        except (tarfile.TarError, EOFError, OSError) as err:
            raise DataError(f"{path}: truncated or corrupt archive member {name} ({err})") from None

    return read_member


def locate_cifar(source: str, path: str | None, cache_dir: str, download: bool) -> Path:
    """The official release's folder or archive: ``path``, else the cache (downloaded there when
    ``download`` allows)."""
    release = CIFAR_RELEASES[source]
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError(f"data.path {p}: not found; expected the {release.folder}/ folder or {Path(release.url).name}")
        return p
    cache = Path(cache_dir).expanduser()
    for candidate in (cache / release.folder, cache / Path(release.url).name):
        if candidate.exists():
            if candidate.is_file():  # an earlier download: may be cut short or damaged since
                verify_md5(candidate, release.md5)
            return candidate
    if not download:
        raise DataError(
            f"{source}: not in {cache} and data.download is false; put {Path(release.url).name} "
            f"or the extracted {release.folder}/ folder there, or set data.path"
        )
    return download_archive(release, cache)


def _decode_batch(raw: dict, name: str, release: CifarRelease) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    try:
        data = np.asarray(raw["data"])
        labels = np.asarray(raw[release.label_key], dtype=np.int64)
    except (KeyError, TypeError) as err:
        raise DataError(f"{name}: not a CIFAR batch (missing {err})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * CIFAR_SIDE * CIFAR_SIDE:
        raise DataError(f"{name}: data must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    images = data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)  # R, G, B planes -> NHWC
    coarse = np.asarray(raw["coarse_labels"], dtype=np.int64) if "coarse_labels" in raw else None
    return np.ascontiguousarray(images), labels, coarse


def read_cifar_split(source: str, path: Path, split: str) -> ImageSet:
    """One split ('train' or 'test') of an official CIFAR release at ``path`` (folder or .tar.gz)."""
    release = CIFAR_RELEASES[source]
    read = _reader_for(path, release)
    meta = safe_load(read(release.meta_file), f"{path}:{release.meta_file}")
    class_names = tuple(meta[release.names_key])
    coarse_names = tuple(meta["coarse_label_names"]) if "coarse_label_names" in meta else None
    parts = [_decode_batch(safe_load(read(name), f"{path}:{name}"), f"{path}:{name}", release) for name in _member_names(release, split)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    coarse = np.concatenate([p[2] for p in parts]) if parts[0][2] is not None else None
    return ImageSet(images, labels, class_names, coarse, coarse_names).validate(f"{path} ({split})")


def read_cifar(source: str, path: str | None, cache_dir: str, download: bool) -> tuple[ImageSet, ImageSet]:
    located = locate_cifar(source, path, cache_dir, download)
    return read_cifar_split(source, located, "train"), read_cifar_split(source, located, "test")


PARQUET_COLUMNS = {"image": "binary (an encoded PNG/JPEG per row)", "label": "integer class index"}
# Optional: "mask" (binary, an encoded PNG, nonzero = object) or "box" ([x0, y0, x1, y1] in pixels, whole or
# fractional), for localisation.


def read_parquet_split(file: Path, class_names: tuple[str, ...] | None = None) -> ImageSet:
    """A Parquet table of encoded images (column ``image``) and integer labels (``label``)."""
    import pyarrow.parquet as pq
    from PIL import Image

    if not file.is_file():
        raise DataError(f"{file}: not found; expected a Parquet file with columns {list(PARQUET_COLUMNS)}")
    try:
        table = pq.read_table(file)
    except Exception as err:  # pyarrow raises several unrelated types for bad files
        raise DataError(f"{file}: not a readable Parquet file ({err})") from None
    missing = [c for c in PARQUET_COLUMNS if c not in table.column_names]
    if missing:
        expected = ", ".join(f"{k}: {v}" for k, v in PARQUET_COLUMNS.items())
        raise DataError(f"{file}: missing column(s) {missing}; expected {expected}, found {table.column_names}")
    if class_names is None:
        meta = table.schema.metadata or {}
        if b"class_names" in meta:
            class_names = tuple(json.loads(meta[b"class_names"]))
    labels = _labels(table, file)
    if len(labels) == 0:
        raise DataError(f"{file}: the dataset is empty (0 images)")
    if class_names is None:
        class_names = tuple(str(i) for i in range(int(labels.max()) + 1))
    images = []
    for i, blob in enumerate(table.column("image").to_pylist()):
        try:
            images.append(np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")))
        except Exception as err:
            raise DataError(f"{file}: row {i} is not a decodable image ({err})") from None
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(f"{file}: images must all have one shape, found {sorted(shapes)[:3]}")
    stacked = np.stack(images)  # not empty: an empty file was refused above
    return ImageSet(stacked, labels, class_names, masks=_object_masks(table, file, stacked.shape[1:3])).validate(str(file))


def _labels(table: Any, file: Path) -> np.ndarray:
    """Integer class indices; names (strings) or fractions would otherwise be cast or truncated."""
    import pyarrow as pa

    column = table.column("label")
    if not pa.types.is_integer(column.type):
        raise DataError(f"{file}: column label is {column.type}; expected integer class indices 0..C-1 (class names go in classes.json, in index order)")
    if column.null_count:
        raise DataError(f"{file}: column label has {column.null_count} null(s); expected a class index in every row")
    return column.to_numpy().astype(np.int64)


def _outward(box: list[float]) -> list[int]:
    """A box in fractional pixels as the whole pixels it touches (x1 and y1 exclusive)."""
    return [math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3])]


def _object_masks(table: Any, file: Path, size: tuple[int, int]) -> np.ndarray | None:
    """Optional object masks, for localisation scores: a ``mask`` column (an encoded PNG per row,
    nonzero = object, the image's size) or a ``box`` column ([x0, y0, x1, y1] in pixels, x1 and
    y1 exclusive). None when the table has neither."""
    from PIL import Image

    h, w = size
    if "mask" in table.column_names:
        masks = []
        for i, blob in enumerate(table.column("mask").to_pylist()):
            try:
                mask = np.asarray(Image.open(io.BytesIO(blob)).convert("L")) > 0
            except Exception as err:
                raise DataError(f"{file}: row {i}: column mask is not a decodable PNG ({err})") from None
            if mask.shape != (h, w):
                raise DataError(f"{file}: row {i}: mask is {mask.shape[1]}x{mask.shape[0]}, expected the image's {w}x{h}")
            masks.append(mask)
        return np.stack(masks)
    if "box" in table.column_names:
        masks = np.zeros((table.num_rows, h, w), bool)
        for i, box in enumerate(table.column("box").to_pylist()):
            if box is None or len(box) != 4 or any(v is None for v in box) or not (0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h):
                raise DataError(f"{file}: row {i}: box {box} is not [x0, y0, x1, y1] with 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}")
            x0, y0, x1, y1 = _outward(box)  # fractional coordinates (a resized dataset's) cover the pixels they touch
            masks[i, y0:y1, x0:x1] = True
        return masks
    return None


def parquet_folder(path: str | None) -> Path:
    """The folder of a ``parquet`` source, which holds ``train.parquet`` and ``test.parquet``."""
    if path is None:
        raise ConfigError("data.path: required for source 'parquet' (a folder with train.parquet and test.parquet)")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.path {folder}: not a folder; expected train.parquet and test.parquet in it")
    for name in ("train.parquet", "test.parquet"):
        if not (folder / name).is_file():
            raise DataError(f"data.path {folder}: no {name} in it; expected train.parquet and test.parquet")
    return folder


def read_parquet_dir(path: str | None) -> tuple[ImageSet, ImageSet]:
    """``train.parquet`` and ``test.parquet`` (plus an optional ``classes.json``) in ``path``."""
    folder = parquet_folder(path)
    names = _class_names(folder / "classes.json") if (folder / "classes.json").is_file() else None
    return read_parquet_split(folder / "train.parquet", names), read_parquet_split(folder / "test.parquet", names)


def _class_names(file: Path) -> tuple[str, ...]:
    try:
        names = json.loads(file.read_text())
    except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError alike
        raise DataError(f"{file}: not JSON ({err}); expected a list of class names") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{file}: expected a list of class names, got {type(names).__name__}")
    return tuple(names)
