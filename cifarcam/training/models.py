"""The model zoo: the paper's seven families (and small ones for demos) built with timm,
each with its CIFAR stem and the layers Grad-CAM looks at.

Nothing here reads the experiment config; ``cifarcam.training.names`` checks a config's model
names against FAMILIES."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from cifarcam.errors import ConfigError, DataError, did_you_mean


def _unstride(module: nn.Module) -> None:
    """Make every stride-2 conv/pool in ``module`` stride 1 (a stage stops downsampling).
    Convs and their shortcut projections change together, so residual shapes still match."""
    for child in module.modules():
        if isinstance(child, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and child.stride in ((2, 2), 2):
            child.stride = (1, 1) if isinstance(child, nn.Conv2d) else 1


def _resnet_cifar_stem(model: nn.Module) -> None:
    # The classic CIFAR ResNet stem: 3x3 stride-1 conv, no max-pool (total stride 8: 4x4 at 32px).
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()


def _stem_and_first_stage(stage: str) -> Callable[[nn.Module], None]:
    """Stride-1 stem conv plus an unstrided first downsampling stage (total stride 8)."""

    def patch(model: nn.Module) -> None:
        stem = model.get_submodule("conv_stem" if hasattr(model, "conv_stem") else "stem")
        _unstride(stem)
        _unstride(model.get_submodule(stage))

    return patch


@dataclass(frozen=True)
class Family:
    timm_name: str
    cam_layers: tuple[str, ...]  # intermediate stages first, the last stage at the end
    cifar_stem: Callable[[nn.Module], None] | None = None
    create_kwargs: dict = field(default_factory=dict)  # extra timm kwargs, always
    cifar_kwargs: dict = field(default_factory=dict)  # extra timm kwargs with stem: cifar
    channels_last_output: bool = False  # Swin's stages return (B, H, W, C)


FAMILIES: dict[str, Family] = {
    # The paper's seven.
    "resnet34": Family("resnet34", ("layer2", "layer3", "layer4"), _resnet_cifar_stem),
    "resnet50": Family("resnet50", ("layer2", "layer3", "layer4"), _resnet_cifar_stem),
    "resnet101": Family("resnet101", ("layer2", "layer3", "layer4"), _resnet_cifar_stem),
    "efficientnetv2": Family("efficientnetv2_rw_s", ("blocks.2", "blocks.3", "blocks.5"), _stem_and_first_stage("blocks.1")),
    "mobilenetv3": Family("mobilenetv3_large_100", ("blocks.2", "blocks.3", "blocks.6"), _stem_and_first_stage("blocks.1")),
    "regnet": Family("regnety_004", ("s2", "s3", "s4"), _stem_and_first_stage("s1")),
    "swin": Family(
        "swin_tiny_patch4_window7_224",
        ("layers.1", "layers.2", "layers.3"),
        cifar_kwargs={"patch_size": 1, "window_size": 4},  # 32x32 tokens, stages 32/16/8/4
        channels_last_output=True,
    ),
    # Small ones for CPU demos and tests.
    "resnet18": Family("resnet18", ("layer2", "layer3", "layer4"), _resnet_cifar_stem),
    "resnet_tiny": Family(
        "resnet18",
        ("layer2", "layer3", "layer4"),
        _resnet_cifar_stem,
        create_kwargs={"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128)},
    ),
    "mobilenetv3_small": Family("mobilenetv3_small_050", ("blocks.1", "blocks.3", "blocks.5"), _stem_and_first_stage("blocks.0")),
}

PAPER_FAMILIES = ("resnet34", "resnet50", "resnet101", "efficientnetv2", "mobilenetv3", "regnet", "swin")


def check_model_name(name: str, where: str = "model") -> None:
    if name not in FAMILIES:
        hint = did_you_mean(name, FAMILIES) or f"expected one of {', '.join(FAMILIES)}"
        raise ConfigError(f"{where}: unknown model {name!r}; {hint}")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model (stored in each checkpoint's meta.json)."""

    family: str
    num_classes: int
    stem: str = "cifar"
    input_size: int = 32

    @property
    def timm_name(self) -> str:
        return FAMILIES[self.family].timm_name

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(spec: ModelSpec, pretrained: bool | str = False) -> nn.Module:
    """A timm model for ``spec``; ``pretrained`` is True (timm's ImageNet weights, needs internet)
    or a local weights file."""
    check_model_name(spec.family)
    fam = FAMILIES[spec.family]
    kwargs = dict(fam.create_kwargs, num_classes=spec.num_classes)
    if fam.channels_last_output:  # Swin's patch grid is fixed at construction
        kwargs["img_size"] = spec.input_size
    if spec.stem == "cifar":
        kwargs.update(fam.cifar_kwargs)
    if isinstance(pretrained, str):
        kwargs["pretrained_cfg_overlay"] = {"file": pretrained}
    try:
        import timm

        model = timm.create_model(fam.timm_name, pretrained=bool(pretrained), **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if not pretrained:
            raise
        source = pretrained if isinstance(pretrained, str) else "the Hugging Face hub"
        raise DataError(
            f"train.pretrained: cannot load ImageNet weights for {fam.timm_name} from {source} "
            f"({type(err).__name__}); offline, download them elsewhere and set pretrained: /path/to/file"
        ) from None
    if spec.stem == "cifar" and fam.cifar_stem is not None:
        fam.cifar_stem(model)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class CamLayer:
    name: str
    height: int
    width: int

    @property
    def degenerate(self) -> bool:
        """2x2 or smaller: Grad-CAM can only say which quadrant (the paper's final-layer finding)."""
        return self.height <= 2 and self.width <= 2

    def degenerate_warning(self, spec: ModelSpec) -> str:
        return (
            f"{spec.family} layer {self.name} is {self.height}x{self.width} at {spec.input_size}px: "
            "its Grad-CAM maps are degenerate; use stem: cifar or a larger input_size"
        )


def cam_layers(model: nn.Module, spec: ModelSpec) -> list[CamLayer]:
    """The family's CAM target layers with their feature-map size at ``spec.input_size``,
    measured by one forward pass (exact for every stem and input size)."""
    layers = measure_layers(model, spec, FAMILIES[spec.family].cam_layers)
    for layer in layers:
        if layer.degenerate:
            warnings.warn(layer.degenerate_warning(spec), stacklevel=2)
    return layers


def measure_layers(model: nn.Module, spec: ModelSpec, names: tuple[str, ...] | list[str]) -> list[CamLayer]:
    """Each named module's feature-map size at ``spec.input_size`` (any module, not only the
    family's CAM layers), from one forward pass in eval mode; the model's mode is restored."""
    channels_last = FAMILIES[spec.family].channels_last_output
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
            h, w = (out.shape[1], out.shape[2]) if channels_last else (out.shape[2], out.shape[3])
            sizes[name] = (int(h), int(w))

        return hook

    hooks = [model.get_submodule(name).register_forward_hook(record(name)) for name in names]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, spec.input_size, spec.input_size, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return [CamLayer(name, *sizes[name]) for name in names]
