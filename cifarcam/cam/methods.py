"""Class activation maps for many layers, methods and targets from one forward pass.

pytorch-grad-cam is the reference: every map here equals its output for the same model, layer,
image and target (``tests/test_cam.py`` checks). The fast path differs only in what it computes:
gradients with respect to the hooked activations alone (parameters do not require grad, so no
weight-gradient kernels run, and backward stops at the earliest CAM layer), every layer from one
forward and one backward per target kind, and resizing/normalising on the device.
Methods that are not simple functions of (activations, gradients) run through pytorch-grad-cam.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def _weighted(weights: Tensor, acts: Tensor) -> Tensor:
    return (weights[:, :, None, None] * acts).sum(1)


def _gradcam(a: Tensor, g: Tensor) -> Tensor:
    return _weighted(g.mean((2, 3)), a)


def _hirescam(a: Tensor, g: Tensor) -> Tensor:
    return (g * a).sum(1)


def _xgradcam(a: Tensor, g: Tensor) -> Tensor:
    return _weighted((g * a / (a.sum((2, 3), keepdim=True) + 1e-7)).sum((2, 3)), a)


def _layercam(a: Tensor, g: Tensor) -> Tensor:
    return (g.clamp(min=0) * a).sum(1)


def _gradcam_plusplus(a: Tensor, g: Tensor) -> Tensor:
    g2 = g * g
    aij = g2 / (2 * g2 + a.sum((2, 3), keepdim=True) * g2 * g + 1e-6)
    aij = torch.where(g != 0, aij, torch.zeros_like(aij))
    return _weighted((g.clamp(min=0) * aij).sum((2, 3)), a)


Weighting = Callable[[Tensor, Tensor], Tensor]  # (activations, gradients), both (B, C, h, w) -> (B, h, w)


@dataclass(frozen=True)
class CamMethod:
    """One CAM method: its fast path where it is a simple function of (activations, gradients),
    and the pytorch-grad-cam class that is its reference (and its only path without a fast one).
    The class is named, not imported: pytorch-grad-cam loads OpenCV, which only the fallback needs."""

    name: str
    reference: str  # a class of pytorch_grad_cam
    fast: Weighting | None = None

    @property
    def is_fast(self) -> bool:
        return self.fast is not None


# The one list of methods: adding one is one line here (with its weighting, if it has a fast path).
METHODS: dict[str, CamMethod] = {
    m.name: m
    for m in (
        CamMethod("gradcam", "GradCAM", _gradcam),
        CamMethod("gradcam++", "GradCAMPlusPlus", _gradcam_plusplus),
        CamMethod("hirescam", "HiResCAM", _hirescam),
        CamMethod("xgradcam", "XGradCAM", _xgradcam),
        CamMethod("layercam", "LayerCAM", _layercam),
        CamMethod("eigencam", "EigenCAM"),
        CamMethod("eigengradcam", "EigenGradCAM"),
        CamMethod("scorecam", "ScoreCAM"),
        CamMethod("ablationcam", "AblationCAM"),
        CamMethod("gradcamelementwise", "GradCAMElementWise"),
        CamMethod("kpcacam", "KPCA_CAM"),
        CamMethod("randomcam", "RandomCAM"),
    )
}


def method_key(name: str) -> str:
    """'GradCAM++', 'grad-cam++' and 'gradcam++' all spell the key 'gradcam++' (which may name no
    method: ``find_method`` says, and its callers word the error for their own option)."""
    return "".join(ch for ch in name.lower() if ch.isalnum() or ch == "+")


def find_method(name: str) -> CamMethod | None:
    return METHODS.get(method_key(name))


def fast_methods(names: Iterable[str] | None = None) -> list[str]:
    """Those of ``names`` (default: every method) with a fast path, in their order."""
    return [m for m in (METHODS if names is None else names) if METHODS[m].is_fast]


def minmax(x: Tensor) -> Tensor:
    """Each map (N, ...) scaled to [0, 1]: minus its min, over its max + 1e-7 (pytorch-grad-cam's)."""
    flat = x.flatten(1)
    flat = flat - flat.min(1, keepdim=True).values
    flat = flat / (flat.max(1, keepdim=True).values + 1e-7)
    return flat.view_as(x)


def normalise_maps(cams: Tensor, size: int) -> Tensor:
    """pytorch-grad-cam's scale_cam_image, batched: per map subtract min, divide by max + 1e-7,
    resize bilinearly to ``size`` (cv2.INTER_LINEAR = half-pixel bilinear), then the same again
    (its multi-layer aggregation step, which for one layer is a second min-max scaling)."""
    scaled = minmax(cams.float())
    if scaled.shape[-2:] != (size, size):
        scaled = F.interpolate(scaled[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return minmax(scaled.clamp(min=0))


@dataclass(frozen=True)
class CamBatch:
    logits: Tensor  # (B, classes)
    maps: dict[tuple[str, str, str], Tensor]  # (target kind, layer, method) -> (B, size, size) in [0, 1]
    grid: dict[tuple[str, str, str], Tensor]  # the same maps on the layer's own grid (B, h, w), in [0, 1]
    spread: dict[tuple[str, str, str], Tensor]  # (max - min) / largest magnitude, before scaling: 0 means constant
    # methods with a fast path: the map on the layer's grid before the ReLU, signed and unscaled (the sanity check's)
    raw: dict[tuple[str, str, str], Tensor] = field(default_factory=dict)


class MultiLayerCam:
    """Owns forward hooks on several layers of ``model`` (released by the context manager).

    One forward pass captures every layer; one ``torch.autograd.grad`` per target kind returns
    the gradients of the target logit with respect to every captured activation at once. Methods
    without a fast path are computed beside them by ``reference_maps``, so that a caller asks for
    every method the same way.
    """

    def __init__(self, model: nn.Module, layers: list[str], channels_last_output: bool = False) -> None:
        self.model = model.eval()
        self._grad_flags = [(p, p.requires_grad) for p in model.parameters()]
        for p in model.parameters():  # no weight gradients: backward stops at the earliest CAM layer
            p.requires_grad_(False)
        self.layers = layers
        self.channels_last_output = channels_last_output
        self.activations: dict[str, Tensor] = {}
        self._handles = [model.get_submodule(name).register_forward_hook(self._keep(name)) for name in layers]

    def _keep(self, name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            self.activations[name] = output

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for p, flag in self._grad_flags:
            p.requires_grad_(flag)

    def __enter__(self) -> MultiLayerCam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _nchw(self, t: Tensor) -> Tensor:
        return t.permute(0, 3, 1, 2) if self.channels_last_output else t

    def __call__(self, x: Tensor, targets: dict[str, Tensor | None], methods: list[str], size: int) -> CamBatch:
        """Maps for every (target kind, layer, method), at ``size`` x ``size``. A target of None
        means the class this forward predicts. Methods without a fast path go through
        pytorch-grad-cam, one call per (method, target kind, layer)."""
        fast = fast_methods(methods)
        self.activations.clear()
        x_graph = x.detach().requires_grad_(True)  # the graph starts here; parameters stay out of it
        logits = self.model(x_graph)
        acts = [self.activations[name] for name in self.layers]
        maps, grid, spread, raw, grads = {}, {}, {}, {}, []
        kinds = list(targets)
        classes_of = {kind: targets[kind] if targets[kind] is not None else logits.argmax(1) for kind in kinds}
        for i, kind in enumerate(kinds):
            score = logits.gather(1, classes_of[kind][:, None]).sum()
            grads = torch.autograd.grad(score, acts, retain_graph=i < len(kinds) - 1) if fast else []
            for layer, a, g in zip(self.layers, acts, grads, strict=False):
                a, g = self._nchw(a.detach()).float(), self._nchw(g).float()
                for method in fast:
                    raw[(kind, layer, method)] = signed = METHODS[method].fast(a, g)
                    cam = signed.clamp(min=0)
                    spread[(kind, layer, method)] = relative_spread(cam)
                    grid[(kind, layer, method)] = minmax(cam)
                    maps[(kind, layer, method)] = normalise_maps(cam, size)
        # The forward graph (kept alive when no method is fast) is not needed past here: without
        # it the fallback's many forwards (ScoreCAM, AblationCAM) do not share memory with it.
        logits = logits.detach()
        del acts, grads
        self.activations.clear()
        for method in (m for m in methods if not METHODS[m].is_fast):
            for kind in kinds:
                for layer in self.layers:
                    layer_map: list = []
                    heat = reference_maps(self.model, x, layer, method, classes_of[kind], self.channels_last_output, layer_map).to(x.device)
                    heat = F.interpolate(heat[:, None], size=(size, size), mode="bilinear")[:, 0]
                    maps[(kind, layer, method)] = heat
                    # its own layer map, not one pooled back from the upsampled one (which blurs)
                    grid[(kind, layer, method)] = minmax(torch.from_numpy(layer_map[-1]).float().clamp(min=0).to(x.device))
                    spread[(kind, layer, method)] = relative_spread(heat)
        self.activations.clear()  # the hooks saw the fallback's forwards too
        return CamBatch(logits, maps, grid, spread, raw)


def relative_spread(cams: Tensor) -> Tensor:
    """(B,) each map's max - min over its largest magnitude: 0 for a constant map, tiny for one
    that varies by rounding noise alone, whatever the map's scale (``heatmap_metrics.constant_maps``)."""
    flat = cams.flatten(1)
    top, bottom = flat.max(1).values, flat.min(1).values
    scale = torch.maximum(top.abs(), bottom.abs())
    return torch.where(scale > 0, (top - bottom) / scale.clamp(min=torch.finfo(scale.dtype).tiny), torch.zeros_like(scale))


def reference_maps(
    model: nn.Module, x: Tensor, layer: str, method: str, classes: Tensor, channels_last_output: bool = False, grid: list | None = None
) -> Tensor:
    """pytorch-grad-cam's own output for one layer (the reference, and the path for methods
    without a fast implementation). Returns (B, H, W) float at the input resolution; ``grid``, if
    given, receives its map at the layer's own resolution, before the ReLU and upsampling."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:  # pytorch-grad-cam backpropagates into the weights
        p.requires_grad_(True)
    cls = getattr(pytorch_grad_cam, METHODS[method].reference)
    reshape = (lambda t: t.permute(0, 3, 1, 2)) if channels_last_output else None
    try:
        with cls(model=model, target_layers=[model.get_submodule(layer)], reshape_transform=reshape) as cam:
            if grid is not None:  # every method computes its layer map here before scaling it up
                compute = cam.get_cam_image
                cam.get_cam_image = lambda *args, **kwargs: grid.append(compute(*args, **kwargs)) or grid[-1]
            out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return torch.from_numpy(out)
