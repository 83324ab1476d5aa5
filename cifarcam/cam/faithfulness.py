"""Faithfulness: does removing what a map calls important hurt the model more than removing what
a trivial map calls important?

Deletion and insertion (Petsiuk et al., RISE, 2018): pixels are removed (deletion) or revealed
(insertion) most-salient first, in ``steps`` steps (``step_pixels``: quadratic by default, dense
where the curves move fastest), and the softmax probability of the target class is averaged over
the curve (trapezoid rule over the fractions of pixels, on [0, 1]). Deletion: lower is better;
insertion: higher is better. Uniform steps where the pixels do not divide by ``steps`` weigh each
step by the pixels it really removes (85 or 86 of 1,024 at 12 steps), not by exactly 1/12.

Removed pixels take the value of a Gaussian-blurred copy of the image, not the dataset mean: a
mean-filled square is far out of distribution, and on real CIFAR-10 it rated Grad-CAM below a
random map. ROAD's noisy linear imputation (pytorch-grad-cam ``metrics.road``) stays closer to the
data still, but it solves a sparse system per image and step on the host (7 ms each, measured on
this CPU): 128 images x 16 steps x 2 curves x 9 maps was 4.3 minutes per model, against one
batched forward per curve step for the blur, on the device.

A trivial map can score well on these curves (blurry maps are rewarded, arXiv 2304.13836, and an
upsampled 4x4 map is blurry), so every image is also scored with baselines that know nothing of
the model (results.BASELINES): a random map, a fixed Gaussian on the image centre, the image's
edge map (Sobel magnitude), and per layer noise drawn on the layer's own grid and upsampled as its
maps are. A method earns trust only by beating each of them (cifarcam.report.verdicts).

Every step of every map of a batch runs in batched forward passes of FORWARD_CHUNK images. The
curves' ends are the same for every map of an image (deletion starts at the image and ends at its
fill, insertion the reverse): they run once per image (``curve_ends``), the steps in between once
per map, 2 x (steps - 1) forwards.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from cifarcam.results import BASELINES, SPACINGS

Tensor = torch.Tensor

FORWARD_CHUNK = 512  # 32-px images per forward pass while scoring curves; fewer at larger inputs (_chunk)


@dataclass(frozen=True)
class FaithfulnessSettings:
    """How faithfulness is measured; stored in each CAM Parquet file's metadata."""

    steps: int  # fractions of pixels removed / revealed; 0 turns faithfulness off (default: CamSettings')
    images: int  # a seeded sample of the test set (the predicted class only)
    spacing: str = "quadratic"  # where the steps fall on [0, 1] (step_pixels)
    seed: int = 0
    blur_sigma: float = 2.0  # in 32-px image pixels (scaled with input_size): removed pixels take the blurred image's values
    centre_sigma: float = 0.25  # of the image side, for the centre-prior baseline

    @property
    def enabled(self) -> bool:
        return self.steps > 0 and self.images > 0

    def metadata(self) -> dict:
        return asdict(self) | {
            "fill": "gaussian_blur",
            "baselines": list(BASELINES),
            "target": "pred",
            "curve": "softmax probability, trapezoid AUC",
            "random_map_and_ties": "uniform noise seeded by (seed, image_index)",
            "coarse_random": "uniform noise on the layer's grid seeded by (seed + 2, image_index), upsampled as the maps are",
        }


def sample_rows(n: int, images: int, seed: int) -> np.ndarray:
    """The first ``images`` rows of a seeded permutation of ``n``: the faithfulness sample, and the
    sanity check's smaller sample, which is its start (both see the same images first)."""
    return np.random.default_rng(seed).permutation(n)[:images]


def sample(n: int, settings: FaithfulnessSettings) -> np.ndarray:
    """(n,) bool: the seeded sample of an image set's rows that faithfulness is measured on, the
    same whichever job, block or actor asks."""
    chosen = np.zeros(n, bool)
    chosen[sample_rows(n, settings.images, settings.seed)] = True
    return chosen


def blurred(x: Tensor, sigma: float) -> Tensor:
    kernel = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur(x, [kernel, kernel], [sigma, sigma])


def seeded_noise(image_index: np.ndarray, seed: int, size: int | tuple[int, int]) -> Tensor:
    """(N, h, w) uniform noise (``size``: h = w, or (h, w)), a function of each image's index and
    the seed alone: the same whichever actor, block order or device draws it (a CPU generator per
    image). A batch may hold none of the sampled images: then (0, h, w)."""
    h, w = (size, size) if isinstance(size, int) else size
    if len(image_index) == 0:
        return torch.empty(0, h, w)
    return torch.stack([torch.rand(h, w, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i))) for i in image_index])


def _ranks(maps: Tensor, tie_break: Tensor | None) -> Tensor:
    """(N, H*W) rank of each pixel, 0 = most salient. Equal values (the zeros a ReLU leaves, a
    symmetric prior) are ordered by ``tie_break`` noise, not by raster position: removing them
    top-left first would bias every map with flat regions."""
    if tie_break is not None:
        maps = maps + 1e-6 * tie_break
    order = maps.flatten(1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=maps.device).expand_as(order))
    return rank


def step_pixels(steps: int, spacing: str, pixels: int, device: torch.device | str = "cpu") -> Tensor:
    """How many of ``pixels`` are removed (deletion) or revealed (insertion) at each of the
    ``steps`` + 1 points of a curve, from 0 to all. ``uniform``: k / steps of them. ``quadratic``:
    (k / steps)^2, dense where both curves move fastest, in their first, most salient pixels, and
    sparse over their flat tails: at 12 steps the first step is 7 of 1,024 CIFAR pixels, the last
    164. Measured against 64 uniform steps (README, "Faithfulness: where the steps fall"), every
    margin of 12 quadratic steps comes closer than those of 16 uniform ones, with 11 forward passes
    per curve instead of 15."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing {spacing!r}: expected one of {SPACINGS}")
    power = SPACINGS.index(spacing) + 1
    return torch.arange(steps + 1, device=device) ** power * pixels // steps**power  # built on the device: no host-to-device copy


def _auc(curve: Tensor, fractions: Tensor) -> Tensor:
    """The trapezoid rule over the curve's points at ``fractions`` (0 to 1) of the pixels."""
    return ((curve[:, 1:] + curve[:, :-1]) / 2 * fractions.diff()).sum(1)


def _chunk(pixels: int) -> int:
    """Inputs per forward pass: FORWARD_CHUNK at 32 px, as many pixels in all at larger inputs
    (at 224 px, 32 images: 19 MB of input, not 308), never fewer than 32."""
    return max(32, FORWARD_CHUNK * 32 * 32 // pixels)


def _class_probs(model: nn.Module, image: Tensor, classes: Tensor, build: Callable[[Tensor], Tensor], pixels: int) -> Tensor:
    """The softmax probability of its image's class for each input row (``image``: the row's
    image), the inputs built chunk by chunk (``build`` of the chunk's row numbers), so that
    memory stays at one chunk whatever the sample size or input resolution (``pixels`` per input)."""
    probs = []
    for rows in torch.arange(len(image), device=image.device).split(_chunk(pixels)):
        probs.append(model(build(rows)).float().softmax(1).gather(1, classes[image[rows], None])[:, 0])
    return torch.cat(probs) if probs else torch.empty(0, device=image.device)


@torch.no_grad()
def curve_ends(model: nn.Module, x: Tensor, classes: Tensor, fill: Tensor) -> Tensor:
    """(N, 2): the class's probability on each image and on its fill. They are the two ends of
    both curves of every map of these images (deletion runs from the image to the fill, insertion
    back), so they are computed once per image, not twice per map."""
    n = len(x)
    image = torch.arange(n, device=x.device).repeat(2)
    both = _class_probs(
        model, image, classes, lambda rows: torch.where((rows < n)[:, None, None, None], x[image[rows]], fill[image[rows]]), x.shape[-2] * x.shape[-1]
    )
    return both.view(2, n).T


@torch.no_grad()
def deletion_insertion(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    classes: Tensor,
    steps: int,
    fill: Tensor,
    tie_break: Tensor | None = None,
    ends: Tensor | None = None,
    spacing: str = "uniform",
) -> tuple[Tensor, Tensor]:
    """(deletion AUC, insertion AUC), each (N,), for maps (N, h, w) of inputs ``x`` (N, C, H, W).

    ``fill``: what removed pixels become (N, C, H, W), e.g. ``blurred(x, sigma)``. Deletion
    starts at ``x`` and ends at ``fill``; insertion starts at ``fill`` and ends at ``x``.
    ``tie_break``: (N, h, w) noise that orders equal map values (see ``_ranks``). ``ends``: these
    images' ``curve_ends``, shared by every map of them (computed here when not given): only the
    steps in between, 2 x (steps - 1) inputs per image, run here. ``spacing``: where the steps
    fall (``step_pixels``)."""
    n, c, hh, ww = x.shape

    def resized(t: Tensor) -> Tensor:
        return t if t.shape[-2:] == (hh, ww) else F.interpolate(t[:, None].float(), size=(hh, ww), mode="bilinear", align_corners=False)[:, 0]

    if ends is None:
        ends = curve_ends(model, x, classes, fill)
    maps = resized(maps)
    tie_break = resized(tie_break) if tie_break is not None else None
    inner = steps - 1  # the steps between the ends
    counts = step_pixels(steps, spacing, hh * ww, x.device)
    thresholds = counts[1:-1]
    # removed[i * inner + k - 1, 0, p]: pixel p of image i is among its map's first counts[k] most salient
    removed = (_ranks(maps, tie_break)[:, None, :] < thresholds[None, :, None]).view(n * inner, 1, hh, ww)
    image = torch.arange(n, device=x.device).repeat_interleave(inner)
    start, end = ends[:, :1], ends[:, 1:]  # the image, the fill
    curves = []
    for first, second, ends_of_curve in ((fill, x, (start, end)), (x, fill, (end, start))):  # deletion: removed pixels become the fill; insertion: the reverse
        between = _class_probs(
            model, image, classes, lambda rows, first=first, second=second: torch.where(removed[rows], first[image[rows]], second[image[rows]]), hh * ww
        )
        curves.append(torch.cat([ends_of_curve[0], between.view(n, inner), ends_of_curve[1]], dim=1))
    fractions = counts.float() / (hh * ww)
    return _auc(curves[0], fractions), _auc(curves[1], fractions)


def centre_prior(n: int, size: int, sigma: float, device: torch.device) -> Tensor:
    """A fixed Gaussian on the image centre: what a map that ignores the image would show."""
    coords = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * (sigma * size) ** 2))
    return g.expand(n, size, size)


@functools.lru_cache(maxsize=None)
def _sobel(device: torch.device, dtype: torch.dtype) -> Tensor:
    """The two Sobel kernels, copied to each device once."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    return torch.stack([kx, kx.T])[:, None].to(device=device, dtype=dtype)


def edge_map(x: Tensor) -> Tensor:
    """Sobel gradient magnitude of the image's grey level (N, H, W): a map of its edges alone."""
    grey = x.mean(1, keepdim=True)
    g = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), _sobel(x.device, grey.dtype))
    return g.pow(2).sum(1).sqrt()


def baseline_maps(x: Tensor, settings: FaithfulnessSettings, noise: Tensor) -> dict[str, Tensor]:
    """The trivial maps of each image for inputs ``x``; ``noise`` (N, h, w) is the random map.
    (coarse_random depends on the layer too: the actor draws it per grid size.)"""
    n, _, hh, ww = x.shape
    return {
        "random": noise,
        "centre": centre_prior(n, hh, settings.centre_sigma, x.device),
        "edge": edge_map(x),
    }
