"""Device mistakes caught without a GPU: the device code runs on PyTorch's ``meta`` device.

A meta tensor has a device but no data, so the CPU build runs every kernel's device checks
there: a CPU tensor mixed into device tensors fails ("Tensor on device cpu is not on the expected
device meta"), as it would on CUDA, and reading a value on the host (``.item()``, ``.tolist()``,
``.cpu()``) fails because there is no value to read. A dispatch mode also counts every copy
between the host and the device: on CUDA each one makes the host wait for the device.
(FakeTensorMode with device="cuda" was tried first: it lets a CPU scalar tensor join a stack of
CUDA tensors, so it misses the very mistake these tests exist for.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cifarcam.cam.faithfulness import FaithfulnessSettings, blurred, centre_prior, deletion_insertion, edge_map
from cifarcam.cam.heatmap_metrics import constant_maps, heatmap_stats, localisation
from cifarcam.cam.methods import MultiLayerCam, fast_methods
from cifarcam.config import TrainConfig
from cifarcam.training.loader import DeviceLoader
from cifarcam.training.models import FAMILIES, ModelSpec, build_model, cam_layers
from cifarcam.training.optim import build_optimizer, build_scheduler
from cifarcam.training.train import evaluation_totals, predictions_on_device, train_epoch

META = torch.device("meta")
FAMILIES_TESTED = ["resnet_tiny", "mobilenetv3_small", "swin"]


class HostDeviceTraffic(TorchDispatchMode):
    """Records each copy between the CPU and another device, and each host read of a device value."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        outputs = {t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        if func is torch.ops.aten._local_scalar_dense.default and inputs - {"cpu"}:
            self.events.append("host read")
        elif ("cpu" in inputs and outputs - {"cpu"}) or (inputs - {"cpu"} and "cpu" in outputs):
            self.events.append(f"{func}: {sorted(inputs)} -> {sorted(outputs)}")
        return out


def _data(n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 10


def _meta_model(family: str) -> tuple[torch.nn.Module, ModelSpec]:
    spec = ModelSpec(family, 10, stem="imagenet" if family == "swin" else "cifar")
    return build_model(spec).to(META).to(memory_format=torch.channels_last), spec


@pytest.mark.parametrize("family", FAMILIES_TESTED)
def test_evaluation_and_prediction_stay_on_the_device(family):
    model, _ = _meta_model(family)
    images, labels = _data()
    loader = DeviceLoader(images, labels, 16, device=META, train=False)
    with HostDeviceTraffic() as traffic:
        totals = evaluation_totals(model, loader)
        classes, probs = predictions_on_device(model, loader)
    assert totals.device == META and totals.shape == (4,)
    assert classes.device == probs.device == META and classes.shape == (48, 5)
    assert traffic.events == []


@pytest.mark.parametrize("family", FAMILIES_TESTED)
def test_a_training_epoch_copies_to_the_device_once(family):
    """The epoch's shuffled order is the one copy (drawn on the CPU, so that every rank agrees);
    crops, flips, normalisation constants and the loss never cross per step."""
    model, _ = _meta_model(family)
    images, labels = _data()
    cfg = TrainConfig(model=family, epochs=1, batch_size=8, grad_clip_norm=1.0, label_smoothing=0.1)
    loader = DeviceLoader(images, labels, 8, device=META, train=True)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(loader))
    with HostDeviceTraffic() as traffic:
        loss_sum = train_epoch(model, model, loader, optimizer, scheduler, cfg)
    assert loss_sum.device == META
    assert len(loader) == 6 and traffic.events == ["aten._to_copy.default: ['cpu'] -> ['meta']"]


@pytest.mark.parametrize("family", FAMILIES_TESTED)
def test_the_cam_fast_path_stays_on_the_device(family):
    model, spec = _meta_model(family)
    layers = [layer.name for layer in cam_layers(build_model(spec), spec)]
    images, labels = _data(8)
    x, y = next(iter(DeviceLoader(images, labels, 8, device=META, train=False)))
    fast = fast_methods()
    edge_map(x)  # its Sobel kernels are copied to a device once per process, not per batch
    with HostDeviceTraffic() as traffic, MultiLayerCam(model, layers, FAMILIES[family].channels_last_output) as cams:
        out = cams(x, {"pred": None, "label": y}, fast, 32)
        heat = out.maps[("pred", layers[0], "gradcam")]
        grid = out.grid[("pred", layers[0], "gradcam")]
        stats = heatmap_stats(heat, grid)
        stats |= localisation(heat, torch.zeros(8, 32, 32, dtype=torch.bool, device=META), stats["peak_y"], stats["peak_x"], tuple(grid.shape[-2:]))
        constant = constant_maps(out.spread[("pred", layers[0], "gradcam")], 16, 16)
        settings = FaithfulnessSettings(steps=4, images=128)
        curves = deletion_insertion(model, x, heat, y, 4, blurred(x, settings.blur_sigma), spacing=settings.spacing)
        baselines = {"centre": centre_prior(8, 32, settings.centre_sigma, META), "edge": edge_map(x)}
    assert len(out.maps) == 2 * len(layers) * len(fast)
    assert {t.device for t in [*out.maps.values(), *out.spread.values(), *stats.values(), constant, *curves, *baselines.values()]} == {META}
    assert heat.shape == (8, 32, 32)
    assert traffic.events == []
