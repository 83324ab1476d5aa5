"""The in-memory image set every reader returns.

Its own module so that imports go one way: ``data`` (the split and the dispatcher) imports the
readers (``sources``, ``synthetic``), and they and ``data`` import this, which imports no reader.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np

from cifarcam.errors import DataError


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

    def fingerprint(self) -> str:
        """SHA-256 of the pixels, labels, positions and masks: what a CAM partition's ``image_index``
        refers to. A regenerated or edited test set gets another one, so stored maps are not read
        against other images (about 0.1 s for CIFAR's 10,000 test images)."""
        digest = hashlib.sha256()
        for array in (self.images, self.labels, self.index, self.masks):
            if array is not None:
                digest.update(f"{array.dtype}{array.shape}".encode())
                digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

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
        """Check shapes and dtypes; raise one clear DataError naming ``source`` otherwise."""
        im, lab = self.images, self.labels
        if im.dtype != np.uint8 or im.ndim != 4 or im.shape[-1] != 3:
            raise DataError(f"{source}: images must be uint8 of shape (N, H, W, 3), got {im.dtype} {tuple(im.shape)}")
        if len(im) == 0:
            raise DataError(f"{source}: the dataset is empty (0 images)")
        if lab.shape != (len(im),):
            raise DataError(f"{source}: {len(im)} images but labels of shape {tuple(lab.shape)}")
        if lab.min() < 0 or lab.max() >= self.num_classes:
            raise DataError(f"{source}: labels must lie in [0, {self.num_classes}), got [{lab.min()}, {lab.max()}]")
        return self
