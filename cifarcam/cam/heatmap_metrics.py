"""What one heatmap says, as numbers a query can average: where its peak is, how spread out it
is, and, where the image has an object mask, whether it points at the object.

Peaks and spread are taken on the layer's own grid, where the map was computed; the stored
32x32 map is that grid upsampled (see ``grid_peak``).

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


# Below this relative spread a map varies by float32 rounding alone (its epsilon is 1.2e-7: this
# is about 80 units in the last place), e.g. the activations of a uniform image.
CONSTANT_RELATIVE_SPREAD = 1e-5


def constant_maps(spread: Tensor, layer_h: int, layer_w: int) -> Tensor:
    """(N,) bool: maps that carry no spatial information. ``spread``: each raw map's relative
    spread before scaling (``methods.relative_spread``: 0 for a constant map), so that a map
    counts as constant by its shape, never by its scale."""
    if layer_h * layer_w == 1:
        return torch.ones_like(spread, dtype=torch.bool)  # no host-to-device copy for the constant
    return spread <= CONSTANT_RELATIVE_SPREAD


def grid_peak(grid: Tensor, side: int) -> tuple[Tensor, Tensor]:
    """Each map's peak, taken on its layer's own grid (N, h, w), as the (row, column) in pixels of
    a ``side`` x ``side`` image of its cell's centre: cell (0, 0) of a 4x4 grid at 32 px is
    (3.5, 3.5), cell (3, 3) is (27.5, 27.5). Exact ties between cells (rare: a constant map is
    null) go to the first in row order; a centroid of distant tied cells could land where the
    map is low.

    Why not the argmax of the upsampled map: bilinear upsampling leaves flat plateaus at the
    borders, and argmax takes a plateau's first pixel in row order, so a coarse map's peak in
    cell (0, 0) would read as pixel (0, 0), always towards the top-left, by up to 7.5 px at 2x2."""
    n, h, w = grid.shape
    cell = grid.flatten(1).argmax(1)
    return ((cell // w).float() + 0.5) * side / h - 0.5, ((cell % w).float() + 0.5) * side / w - 0.5


def peak_pixel(peak: Tensor, side: int) -> Tensor:
    """The pixel (row or column index) that holds a peak coordinate: the nearest, and for a cell
    centre between two pixels (x.5) the one after it, a fixed half-pixel offset (a 1 px window
    keeps a uniformly placed object's chance at its area, which a 2x2 window would not)."""
    return (peak + 0.5).floor().long().clamp(0, side - 1)


def heatmap_stats(maps: Tensor, grid: Tensor) -> dict[str, Tensor]:
    """Per map, stored (N, H, W) and on its layer's grid (N, h, w), both min-max scaled to [0, 1]:
    the peak (``grid_peak``, in pixels), the entropy of the grid's mass normalised by log(h * w)
    (0 = one cell, 1 = uniform: upsampling adds no spread of its own), and the share of the stored
    map's mass in its top 10% of pixels. Meaningless for constant maps (see above)."""
    _, h, w = maps.shape
    peak_y, peak_x = grid_peak(grid, h)
    cells = grid.flatten(1).float()
    mass = cells / cells.sum(1, keepdim=True).clamp(min=1e-12)
    entropy = -(mass * mass.clamp(min=1e-12).log()).sum(1) / math.log(max(cells.shape[1], 2))
    flat = maps.flatten(1)
    k = max(1, (h * w) // 10)
    top = flat.topk(k, dim=1).values.sum(1) / flat.sum(1).clamp(min=1e-12)
    return {"peak_y": peak_y, "peak_x": peak_x, "entropy": entropy, "top10_mass": top}


def localisation(
    maps: Tensor, masks: Tensor, peak_y: Tensor, peak_x: Tensor, grid_hw: tuple[int, int], tolerance: int = POINTING_TOLERANCE_PX
) -> dict[str, Tensor]:
    """Per stored map (N, H, W), object mask (N, H, W, bool, same size), peak (``grid_peak``) and
    the layer's grid size:

    - ``peak_in_object``: the object covers the peak's pixel (``peak_pixel``);
    - ``pointing_hit``: it lies within ``tolerance`` pixels of that pixel (the pointing game);
    - ``pointing_hit_cell``: the object touches the peak's cell of the layer's grid (the
      tolerance in cells: what a coarse map can say), and ``object_cell_share``: the share of
      cells it touches, which is the hit rate of a cell picked at random;
    - ``mass_on_object``: the share of the map's mass on the object;
    - ``object_area``: the share of the image the object covers, which is what a uniform map's
      ``mass_on_object`` would be: ``mass_on_object / object_area`` is the gain over chance.
    """
    n, side, _ = masks.shape
    flat, on = maps.flatten(1), masks.flatten(1).float()
    pixel = peak_pixel(peak_y, side) * side + peak_pixel(peak_x, side)
    near = F.max_pool2d(masks.float()[:, None], 2 * tolerance + 1, stride=1, padding=tolerance)[:, 0].flatten(1)
    h, w = grid_hw
    object_cells = F.adaptive_max_pool2d(masks.float()[:, None], (h, w))[:, 0].flatten(1)
    cell_row = ((peak_y + 0.5) * h / side).floor().long().clamp(0, h - 1)
    cell_col = ((peak_x + 0.5) * w / side).floor().long().clamp(0, w - 1)
    return {
        "peak_in_object": on.gather(1, pixel[:, None])[:, 0] > 0,
        "pointing_hit": near.gather(1, pixel[:, None])[:, 0] > 0,
        "pointing_hit_cell": object_cells.gather(1, (cell_row * w + cell_col)[:, None])[:, 0] > 0,
        "object_cell_share": object_cells.mean(1),
        "mass_on_object": (flat * on).sum(1) / flat.sum(1).clamp(min=1e-12),
        "object_area": on.mean(1),
    }
