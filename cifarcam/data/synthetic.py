"""A deterministic, offline image set with known object positions, hard enough not to flatter a map.

Each image holds one object on a random smooth texture with grain. The class is the object's
shape alone: its colour, size (``min_object_size``..``max_object_size`` px), position and the
background are all random, so neither a colour nor a fixed place gives the class away. The
object's pixel mask is kept so that CAM localisation can be scored: CIFAR itself has no masks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cifarcam.data.image_set import ImageSet
from cifarcam.errors import ConfigError

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
    """Smooth random colour backgrounds: 4x4 random colours interpolated bilinearly, plus grain."""
    import torch
    import torch.nn.functional as F

    coarse = torch.from_numpy(rng.uniform(40, 215, size=(n, 3, 4, 4)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True).permute(0, 2, 3, 1).numpy()
    grain = rng.normal(0, 12, size=(n, size, size, 3)).astype(np.float32)
    return smooth + grain


def _object_colours(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour per object, flipped to its complement where it is too close to the
    background under it (an invisible object would only add label noise)."""
    colours = rng.uniform(0, 255, size=background.shape).astype(np.float32)
    close = np.linalg.norm(colours - background, axis=1) < 80
    colours[close] = 255 - colours[close]
    return colours


def _class_colours(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """One saturated colour per class (evenly spaced hues): the easy, plumbing-only variant."""
    hues = np.arange(num_classes) / num_classes
    k = (np.array([5, 3, 1])[None, :] + hues[:, None] * 6) % 6
    rgb = 1 - np.clip(np.minimum(k, 4 - k), 0, 1)
    return (rgb * 200 + 30).astype(np.float32)[labels]


def _render(rng: np.random.Generator, labels: np.ndarray, cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    n, size = len(labels), cfg.image_size
    images = _textures(rng, n, size)
    masks = np.zeros((n, size, size), bool)
    sides = rng.integers(cfg.min_object_size, cfg.max_object_size + 1, size=n)
    tops = rng.integers(0, size - sides + 1)
    lefts = rng.integers(0, size - sides + 1)
    for i, (cls, side, top, left) in enumerate(zip(labels, sides, tops, lefts, strict=True)):
        masks[i, top : top + side, left : left + side] = _shape_mask(SHAPES[cls % len(SHAPES)], int(side))
    background = np.stack([images[i][masks[i]].mean(0) for i in range(n)])
    colours = _object_colours(rng, background) if cfg.colours == "random" else _class_colours(labels, cfg.num_classes)
    for i in range(n):
        images[i][masks[i]] = colours[i]
    return np.clip(images, 0, 255).astype(np.uint8), masks


def make_synthetic(cfg: SyntheticConfig, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, test) image sets, identical for identical ``cfg`` and ``seed``."""
    if cfg.num_classes > len(SHAPES):
        raise ConfigError(f"data.synthetic.num_classes: at most {len(SHAPES)} shapes exist, got {cfg.num_classes}")
    if not 3 <= cfg.min_object_size <= cfg.max_object_size <= cfg.image_size:
        raise ConfigError(
            "data.synthetic: expected 3 <= min_object_size <= max_object_size <= image_size, "
            f"got {cfg.min_object_size}, {cfg.max_object_size}, {cfg.image_size}"
        )
    rng = np.random.default_rng(seed)
    names = tuple(SHAPES[: cfg.num_classes])
    sets = []
    for n in (cfg.train_size, cfg.test_size):
        labels = np.arange(n, dtype=np.int64) % cfg.num_classes
        rng.shuffle(labels)
        images, masks = _render(rng, labels, cfg)
        sets.append(ImageSet(images, labels, names, masks=masks).validate("synthetic"))
    return sets[0], sets[1]
