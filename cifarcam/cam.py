"""Class activation maps for many layers, methods and targets from one forward pass.

pytorch-grad-cam is the reference: every map here equals its output for the same model, layer,
image and target (``tests/test_cam.py`` checks). The fast path differs only in what it computes:
gradients with respect to the hooked activations alone (parameters do not require grad, so no
weight-gradient kernels run, and backward stops at the earliest CAM layer), every layer from one
forward and one backward per target kind, and resizing/normalising on the device.
Methods that are not simple functions of (activations, gradients) run through pytorch-grad-cam.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cifarcam.config import ConfigError

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


# name -> (fast function of activations and gradients, or None, pytorch-grad-cam class name)
METHODS: dict[str, tuple[Callable[[Tensor, Tensor], Tensor] | None, str]] = {
    "gradcam": (_gradcam, "GradCAM"),
    "gradcam++": (_gradcam_plusplus, "GradCAMPlusPlus"),
    "hirescam": (_hirescam, "HiResCAM"),
    "xgradcam": (_xgradcam, "XGradCAM"),
    "layercam": (_layercam, "LayerCAM"),
    "eigencam": (None, "EigenCAM"),
    "eigengradcam": (None, "EigenGradCAM"),
    "scorecam": (None, "ScoreCAM"),
    "ablationcam": (None, "AblationCAM"),
    "gradcamelementwise": (None, "GradCAMElementWise"),
    "kpcacam": (None, "KPCA_CAM"),
    "randomcam": (None, "RandomCAM"),
}


def method_key(name: str) -> str:
    """'GradCAM++', 'grad-cam++' and 'gradcam++' all name the same method."""
    key = "".join(ch for ch in name.lower() if ch.isalnum() or ch == "+")
    if key not in METHODS:
        close = difflib.get_close_matches(key, METHODS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(METHODS)}"
        raise ConfigError(f"--methods: unknown CAM method {name!r}; {hint}")
    return key


def normalise_maps(cams: Tensor, size: int) -> Tensor:
    """pytorch-grad-cam's scale_cam_image, batched: per map subtract min, divide by max + 1e-7,
    resize bilinearly to ``size`` (cv2.INTER_LINEAR = half-pixel bilinear), then the same again
    (its multi-layer aggregation step, which for one layer is a second min-max scaling)."""

    def minmax(x: Tensor) -> Tensor:
        flat = x.flatten(1)
        flat = flat - flat.min(1, keepdim=True).values
        flat = flat / (flat.max(1, keepdim=True).values + 1e-7)
        return flat.view_as(x)

    scaled = minmax(cams.float())
    if scaled.shape[-2:] != (size, size):
        scaled = F.interpolate(scaled[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return minmax(scaled.clamp(min=0))


@dataclass(frozen=True)
class CamBatch:
    logits: Tensor  # (B, classes)
    maps: dict[tuple[str, str, str], Tensor]  # (target kind, layer, method) -> (B, size, size) in [0, 1]
    raw_peak: dict[tuple[str, str, str], Tensor]  # max - min of the map before scaling: 0 means constant


class MultiLayerCam:
    """Owns forward hooks on several layers of ``model`` (released by the context manager).

    One forward pass captures every layer; one ``torch.autograd.grad`` per target kind returns
    the gradients of the target logit with respect to every captured activation at once.
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
        """Maps for every (target kind, layer, method). A target of None means the predicted class."""
        fast = [m for m in methods if METHODS[m][0] is not None]
        self.activations.clear()
        x = x.detach().requires_grad_(True)  # the graph starts here; parameters stay out of it
        logits = self.model(x)
        acts = [self.activations[name] for name in self.layers]
        maps, raw_peak = {}, {}
        kinds = list(targets)
        for i, kind in enumerate(kinds):
            classes = targets[kind] if targets[kind] is not None else logits.argmax(1)
            score = logits.gather(1, classes[:, None]).sum()
            grads = torch.autograd.grad(score, acts, retain_graph=i < len(kinds) - 1) if fast else []
            for layer, a, g in zip(self.layers, acts, grads):
                a, g = self._nchw(a.detach()).float(), self._nchw(g).float()
                for method in fast:
                    cam = METHODS[method][0](a, g).clamp(min=0)
                    flat = cam.flatten(1)
                    raw_peak[(kind, layer, method)] = flat.max(1).values - flat.min(1).values
                    maps[(kind, layer, method)] = normalise_maps(cam, size)
        return CamBatch(logits.detach(), maps, raw_peak)


def reference_maps(
    model: nn.Module, x: Tensor, layer: str, method: str, classes: Tensor, channels_last_output: bool = False
) -> Tensor:
    """pytorch-grad-cam's own output for one layer (the reference, and the path for methods
    without a fast implementation). Returns (B, H, W) float at the input resolution."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:  # pytorch-grad-cam backpropagates into the weights
        p.requires_grad_(True)
    cls = getattr(pytorch_grad_cam, METHODS[method][1])
    reshape = (lambda t: t.permute(0, 3, 1, 2)) if channels_last_output else None
    try:
        with cls(model=model, target_layers=[model.get_submodule(layer)], reshape_transform=reshape) as cam:
            out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return torch.from_numpy(out)
