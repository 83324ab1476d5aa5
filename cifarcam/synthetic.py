"""A deterministic, offline image set with known object positions.

Each image holds one object (a shape whose kind is the class, in the class's hue) at a random
position on a random smooth texture. The object's pixel mask is kept so that CAM localisation
can be scored: CIFAR itself has no masks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cifarcam.data import ImageSet

if TYPE_CHECKING:
    from cifarcam.config import SyntheticConfig

SHAPES = ("square", "disk", "triangle", "cross", "ring", "hbar", "vbar", "diamond", "frame", "xshape")


def _shape_mask(kind: str, size: int) -> np.ndarray:
    """A (size, size) bool mask of one shape."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2
    dy, dx = yy - c, xx - c
    r = np.hypot(dy, dx)
    half = size / 2
    third = max(1, size // 3)
    masks = {
        "square": np.ones((size, size), bool),
        "disk": r <= half,
        "triangle": (yy >= size - 1 - 2 * (half - np.abs(dx))) & (yy <= size - 1),
        "cross": (np.abs(dy) < third / 2 + 0.5) | (np.abs(dx) < third / 2 + 0.5),
        "ring": (r <= half) & (r >= half - third / 1.5),
        "hbar": np.abs(dy) < third / 1.5,
        "vbar": np.abs(dx) < third / 1.5,
        "diamond": (np.abs(dy) + np.abs(dx)) <= half,
        "frame": (np.maximum(np.abs(dy), np.abs(dx)) >= half - third / 1.5),
        "xshape": (np.abs(dy - dx) < third / 1.5) | (np.abs(dy + dx) < third / 1.5),
    }
    return masks[kind]


def _textures(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Smooth random colour textures: low-resolution noise upsampled, plus fine grain."""
    coarse = rng.uniform(40, 215, size=(n, 4, 4, 3)).astype(np.float32)
    reps = size // 4
    smooth = coarse.repeat(reps, axis=1).repeat(reps, axis=2)
    grain = rng.normal(0, 12, size=(n, size, size, 3)).astype(np.float32)
    return smooth + grain


def _class_hues(num_classes: int) -> np.ndarray:
    """A distinct saturated RGB colour per class (evenly spaced hues)."""
    hues = np.arange(num_classes) / num_classes
    k = (np.array([5, 3, 1])[None, :] + hues[:, None] * 6) % 6
    rgb = 1 - np.clip(np.minimum(k, 4 - k), 0, 1)
    return (rgb * 200 + 30).astype(np.float32)


def _render(rng: np.random.Generator, labels: np.ndarray, size: int, object_size: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(labels)
    images = _textures(rng, n, size)
    masks = np.zeros((n, size, size), bool)
    shapes = [_shape_mask(SHAPES[c % len(SHAPES)], object_size) for c in range(int(labels.max()) + 1)]
    colours = _class_hues(len(shapes))
    tops = rng.integers(0, size - object_size + 1, size=n)
    lefts = rng.integers(0, size - object_size + 1, size=n)
    jitter = rng.normal(0, 15, size=(n, 3)).astype(np.float32)
    for i, (cls, top, left) in enumerate(zip(labels, tops, lefts)):
        window = (slice(top, top + object_size), slice(left, left + object_size))
        masks[i][window] = shapes[cls]
        images[i][masks[i]] = colours[cls] + jitter[i]
    return np.clip(images, 0, 255).astype(np.uint8), masks


def make_synthetic(cfg: SyntheticConfig, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, test) image sets, identical for identical ``cfg`` and ``seed``."""
    if cfg.num_classes > len(SHAPES):
        raise ValueError(f"data.synthetic.num_classes: at most {len(SHAPES)} shapes exist, got {cfg.num_classes}")
    rng = np.random.default_rng(seed)
    names = tuple(SHAPES[: cfg.num_classes])
    sets = []
    for n in (cfg.train_size, cfg.test_size):
        labels = np.arange(n, dtype=np.int64) % cfg.num_classes
        rng.shuffle(labels)
        images, masks = _render(rng, labels, cfg.image_size, cfg.object_size)
        sets.append(ImageSet(images, labels, names, masks=masks).validate("synthetic"))
    return sets[0], sets[1]
