"""The seeded stratified train/val split, and the dataset dispatcher over the readers.

Imports go one way: this module imports the readers (``sources``, ``synthetic``); they build
``ImageSet`` (re-exported here) from ``image_set`` and never import this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cifarcam.data import sources, synthetic
from cifarcam.data.image_set import ImageSet
from cifarcam.errors import ConfigError, DataError

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "ImageSet", "Splits", "load_splits", "stratified_split"]

if TYPE_CHECKING:
    from cifarcam.config import DataConfig

# Per-channel statistics used for normalisation (CIFAR-100 train set); close enough for CIFAR-10
# and the synthetic set, and fixed so that a checkpoint's meta.json can name them.
CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val): each class contributes ``val_fraction`` of its rows to val."""
    rng = np.random.default_rng(seed)
    train_rows, val_rows = [], []
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(round(len(rows) * val_fraction))
        val_rows.append(rows[:n_val])
        train_rows.append(rows[n_val:])
    return np.sort(np.concatenate(train_rows)), np.sort(np.concatenate(val_rows))


def _limit(images: ImageSet, n: int | None, seed: int) -> ImageSet:
    """A stratified subsample of ``n`` rows (for demos and tests), or everything."""
    if n is None or n >= len(images):
        return images
    _, keep = stratified_split(images.labels, n / len(images), seed)
    return images.subset(keep)


def _check_side(images: ImageSet, cfg: DataConfig) -> None:
    """Maps are stored, scored and drawn at CIFAR's 32x32 (``results.HEATMAP_SIZE``): other sizes
    are refused here, before a search trains on them for a CAM stage that could not store them."""
    from cifarcam.results import HEATMAP_SIZE as side

    h, w = images.images.shape[1:3]
    if (h, w) != (side, side):
        where = {"synthetic": "data.synthetic.image_size", "parquet": f"data.path {cfg.path}"}.get(cfg.source, f"data.source {cfg.source}")
        raise DataError(
            f"{where}: images are {w}x{h}; cifarcam explains {side}x{side} images (CIFAR's size, at which its maps are stored): resize them to {side}x{side}"
        )


def check_data_present(cfg: DataConfig) -> None:
    """That the configured data is where the config says, without decoding it: what
    ``load_splits`` would refuse first, in a moment (a node runs this before its Ray cluster
    starts). A cached archive's checksum is verified, as the job verifies it; a release that
    ``data.download`` may still fetch counts as present."""
    if cfg.source == "parquet":
        sources.parquet_folder(cfg.path)
    elif cfg.source in ("cifar10", "cifar100") and (cfg.path is not None or not cfg.download):
        sources.locate_cifar(cfg.source, cfg.path, cfg.cache_dir, download=False)


def load_splits(cfg: DataConfig) -> Splits:
    """Read the configured source and return the seeded 90/10 train/val split and the test set."""
    if cfg.source == "synthetic":
        train_full, test = synthetic.make_synthetic(cfg.synthetic, seed=cfg.seed)
    elif cfg.source in ("cifar10", "cifar100"):
        train_full, test = sources.read_cifar(cfg.source, cfg.path, cfg.cache_dir, download=cfg.download)
    elif cfg.source == "parquet":
        train_full, test = sources.read_parquet_dir(cfg.path)
    else:  # config validation makes this unreachable; kept for direct callers
        raise ConfigError(f"data.source: unknown source {cfg.source!r}")
    for images in (train_full, test):
        _check_side(images, cfg)
    train_full = _limit(train_full, cfg.limit_train, cfg.seed)
    test = _limit(test, cfg.limit_test, cfg.seed)
    train_rows, val_rows = stratified_split(train_full.labels, cfg.val_fraction, cfg.seed)
    return Splits(train=train_full.subset(train_rows), val=train_full.subset(val_rows), test=test)
