"""What one heatmap says, as numbers a query can average: where its peak is, how spread out it
is, and, where the image has an object mask, whether it points at the object.

A constant map (every 1x1 layer, and any map whose activations or gradients are all equal) says
nothing: min-max scaling turns it into all zeros, which would read as "all mass on pixel (0, 0)".
Its statistics are therefore missing (null), never a number (``constant_maps``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# The pointing game counts a hit within 15 px of the object at 224 px (Zhang et al., 2016); at
# CIFAR's 32 px that is about 2 px. The exact peak is reported beside it.
POINTING_TOLERANCE_PX = 2


def constant_maps(spread: Tensor, layer_h: int, layer_w: int) -> Tensor:
    """(N,) bool: maps that carry no spatial information. ``spread``: each raw map's max - min
    before scaling (0 for a constant map; tiny relative noise counts as constant too)."""
    if layer_h * layer_w == 1:
        return torch.ones_like(spread, dtype=torch.bool)  # no host-to-device copy for the constant
    return spread <= 1e-12


def heatmap_stats(maps: Tensor) -> dict[str, Tensor]:
    """Per map (N, H, W) in [0, 1]: peak row/column, entropy (0 = one pixel, 1 = uniform) and the
    share of the map's mass in its top 10% of pixels. Meaningless for constant maps (see above)."""
    n, h, w = maps.shape
    flat = maps.flatten(1)
    peak = flat.argmax(1)
    mass = flat / flat.sum(1, keepdim=True).clamp(min=1e-12)
    entropy = -(mass * mass.clamp(min=1e-12).log()).sum(1) / math.log(h * w)
    k = max(1, (h * w) // 10)
    top = flat.topk(k, dim=1).values.sum(1) / flat.sum(1).clamp(min=1e-12)
    return {"peak_y": peak // w, "peak_x": peak % w, "entropy": entropy, "top10_mass": top}


def localisation(maps: Tensor, masks: Tensor, tolerance: int = POINTING_TOLERANCE_PX) -> dict[str, Tensor]:
    """Per map (N, H, W) and object mask (N, H, W, bool, same size):

    - ``peak_in_object``: the map's peak pixel lies on the object;
    - ``pointing_hit``: it lies within ``tolerance`` pixels of the object (the pointing game);
    - ``mass_on_object``: the share of the map's mass on the object;
    - ``object_area``: the share of the image the object covers, which is what a uniform map's
      ``mass_on_object`` would be: ``mass_on_object / object_area`` is the gain over chance.
    """
    flat, on = maps.flatten(1), masks.flatten(1).float()
    peak = flat.argmax(1, keepdim=True)
    near = F.max_pool2d(masks.float()[:, None], 2 * tolerance + 1, stride=1, padding=tolerance)[:, 0].flatten(1)
    return {
        "peak_in_object": on.gather(1, peak)[:, 0] > 0,
        "pointing_hit": near.gather(1, peak)[:, 0] > 0,
        "mass_on_object": (flat * on).sum(1) / flat.sum(1).clamp(min=1e-12),
        "object_area": on.mean(1),
    }
