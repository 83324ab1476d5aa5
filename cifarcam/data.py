"""Image sets in memory, the seeded stratified train/val split, and the dataset dispatcher."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cifarcam.config import DataConfig

# Per-channel statistics used for normalisation (CIFAR-100 train set); close enough for CIFAR-10
# and the synthetic set, and fixed so that a checkpoint's meta.json can name them.
CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class ImageSet:
    """uint8 images (N, H, W, 3) with integer labels, plus what the source knows about them."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    coarse_labels: np.ndarray | None = None
    coarse_names: tuple[str, ...] | None = None
    masks: np.ndarray | None = None  # (N, H, W) bool object masks: synthetic data, Parquet with mask or box
    index: np.ndarray = field(default=None)  # type: ignore[assignment]  # position in the source split

    def __post_init__(self) -> None:
        if self.index is None:
            object.__setattr__(self, "index", np.arange(len(self.labels), dtype=np.int64))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, rows: np.ndarray) -> ImageSet:
        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[rows]

        return replace(
            self,
            images=self.images[rows],
            labels=self.labels[rows],
            coarse_labels=take(self.coarse_labels),
            masks=take(self.masks),
            index=self.index[rows],
        )

    def validate(self, source: str) -> ImageSet:
        """Check shapes and dtypes; raise one clear ValueError naming ``source`` otherwise."""
        im, lab = self.images, self.labels
        if im.dtype != np.uint8 or im.ndim != 4 or im.shape[-1] != 3:
            raise ValueError(
                f"{source}: images must be uint8 of shape (N, H, W, 3), got {im.dtype} {tuple(im.shape)}"
            )
        if len(im) == 0:
            raise ValueError(f"{source}: the dataset is empty (0 images)")
        if lab.shape != (len(im),):
            raise ValueError(f"{source}: {len(im)} images but labels of shape {tuple(lab.shape)}")
        if lab.min() < 0 or lab.max() >= self.num_classes:
            raise ValueError(
                f"{source}: labels must lie in [0, {self.num_classes}), got [{lab.min()}, {lab.max()}]"
            )
        return self


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


def load_splits(cfg: DataConfig) -> Splits:
    """Read the configured source and return the seeded 90/10 train/val split and the test set."""
    from cifarcam import sources, synthetic

    if cfg.source == "synthetic":
        train_full, test = synthetic.make_synthetic(cfg.synthetic, seed=cfg.seed)
    elif cfg.source in ("cifar10", "cifar100"):
        train_full, test = sources.read_cifar(cfg.source, cfg.path, cfg.cache_dir, download=cfg.download)
    elif cfg.source == "parquet":
        train_full, test = sources.read_parquet_dir(cfg.path)
    else:  # config validation makes this unreachable; kept for direct callers
        raise ValueError(f"data.source: unknown source {cfg.source!r}")
    train_full = _limit(train_full, cfg.limit_train, cfg.seed)
    test = _limit(test, cfg.limit_test, cfg.seed)
    train_rows, val_rows = stratified_split(train_full.labels, cfg.val_fraction, cfg.seed)
    return Splits(train=train_full.subset(train_rows), val=train_full.subset(val_rows), test=test)
