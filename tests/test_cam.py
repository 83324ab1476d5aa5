"""The CAM fast path against pytorch-grad-cam, orientation, localisation and faithfulness."""

import numpy as np
import pytest
import torch
from torch import nn

from cifarcam.cam import METHODS, MultiLayerCam, method_key, reference_maps
from cifarcam.faithfulness import blurred, deletion_insertion
from cifarcam.heatmap_metrics import heatmap_stats, localisation
from cifarcam.config import ConfigError, DataConfig, SyntheticConfig, TrainConfig
from cifarcam.data import load_splits
from cifarcam.loader import DeviceLoader, to_model_input
from cifarcam.models import FAMILIES, ModelSpec, build_model
from cifarcam.train import fit
from helpers import assert_fast_path_matches_pytorch_grad_cam

FAST = [m for m, (fn, _) in METHODS.items() if fn is not None]


@pytest.mark.parametrize("family", ["resnet_tiny", "mobilenetv3_small", "resnet18"])
def test_every_fast_method_equals_pytorch_grad_cam(family):
    torch.manual_seed(0)
    model = build_model(ModelSpec(family, 10)).eval()
    x = torch.randn(6, 3, 32, 32)
    assert_fast_path_matches_pytorch_grad_cam(model, x, torch.arange(6) % 10, list(FAMILIES[family].cam_layers), atol=1e-4)


def test_swin_through_its_reshape_transform_equals_pytorch_grad_cam():
    torch.manual_seed(0)
    model = build_model(ModelSpec("swin", 10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with MultiLayerCam(model, ["layers.2"], channels_last_output=True) as cams:
        out = cams(x, {"pred": None}, ["gradcam"], 32)
    reference = reference_maps(model, x, "layers.2", "gradcam", out.logits.argmax(1), channels_last_output=True)
    np.testing.assert_allclose(out.maps[("pred", "layers.2", "gradcam")].numpy(), reference.numpy(), atol=1e-4)


class _RedChannel(nn.Module):
    """A model whose 'features' layer is the input's red channel: its Grad-CAM is that channel."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 1, 1, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0], [-1.0]]))

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_heatmaps_are_neither_transposed_nor_flipped():
    x = torch.zeros(1, 3, 32, 32)
    x[0, 0, 3, 20] = 10.0  # one bright red pixel at row 3, column 20: not symmetric in any axis
    with MultiLayerCam(_RedChannel(), ["features"]) as cams:
        out = cams(x, {"label": torch.tensor([0])}, ["gradcam"], 32)
    heat = out.maps[("label", "features", "gradcam")]
    stats = heatmap_stats(heat)
    assert (stats["peak_y"].item(), stats["peak_x"].item()) == (3, 20)
    stored = (heat * 255).round().to(torch.uint8).flatten(1)[0].numpy()  # what the stage writes
    assert stored[3 * 32 + 20] == 255 and stored[20 * 32 + 3] == 0 and stored[3 * 32 + 11] == 0


def test_stats_of_a_point_and_a_uniform_map():
    point = torch.zeros(1, 32, 32)
    point[0, 5, 6] = 1
    uniform = torch.ones(1, 32, 32)
    p, u = heatmap_stats(point), heatmap_stats(uniform)
    assert p["entropy"].item() == pytest.approx(0, abs=1e-6) and p["top10_mass"].item() == pytest.approx(1)
    assert u["entropy"].item() == pytest.approx(1, abs=1e-6) and u["top10_mass"].item() == pytest.approx(102 / 1024)


def test_unknown_method_suggests_the_closest():
    assert method_key("GradCAM++") == "gradcam++" and method_key("Grad-CAM") == "gradcam"
    with pytest.raises(ConfigError, match=r"unknown CAM method 'gradcan'; did you mean 'gradcam'\?"):
        method_key("gradcan")


def test_gradcam_localises_objects_on_the_hard_synthetic_set():
    """A small ResNet trained for about a minute on shapes whose colour, size (9-14 px), position
    and background are random, so that only the shape tells the class. Its layer2 (16x16) Grad-CAM
    must point at the object (the pointing game, 2 px) far more often than a random point, put more
    of its mass there than chance, and be more faithful (deletion, blur fill) than a random map.
    Measured here: accuracy 0.513, pointing game 0.760 (random point 0.156), exact peak 0.649,
    mass on the object 3.7x chance, deletion 0.150 (random map 0.232)."""
    torch.manual_seed(0)
    splits = load_splits(DataConfig(synthetic=SyntheticConfig(train_size=5000, test_size=300)))
    cfg = TrainConfig(model="resnet_tiny", epochs=5, batch_size=64, lr=0.004, warmup_epochs=0.3, label_smoothing=0.1)
    model = build_model(ModelSpec("resnet_tiny", 10))
    fit(model, cfg, DeviceLoader(splits.train.images, splits.train.labels, 64), DeviceLoader(splits.val.images, splits.val.labels, 256, train=False))
    x = to_model_input(torch.from_numpy(splits.test.images))
    labels = torch.from_numpy(splits.test.labels)
    with MultiLayerCam(model, ["layer2"]) as cams:
        out = cams(x, {"label": labels}, ["gradcam"], 32)
    correct = out.logits.argmax(1) == labels
    heat = out.maps[("label", "layer2", "gradcam")][correct]
    masks = torch.from_numpy(splits.test.masks)[correct]
    found = localisation(heat, masks)
    random_found = localisation(torch.rand(heat.shape, generator=torch.Generator().manual_seed(0)), masks)
    hit, random_hit = found["pointing_hit"].float().mean().item(), random_found["pointing_hit"].float().mean().item()
    gain = (found["mass_on_object"] / found["object_area"]).mean().item()

    xs, ys = x[correct][:150], labels[correct][:150]
    fill = blurred(xs, 2.0)
    deletion, insertion = deletion_insertion(model.eval(), xs, heat[:150], ys, 16, fill)
    r_deletion, r_insertion = deletion_insertion(model, xs, torch.rand(len(xs), 32, 32, generator=torch.Generator().manual_seed(1)), ys, 16, fill)
    print(
        f"accuracy {correct.float().mean():.3f}; pointing game: Grad-CAM {hit:.3f}, random {random_hit:.3f}; "
        f"exact peak {found['peak_in_object'].float().mean():.3f}; mass on object / chance {gain:.2f}; "
        f"deletion {deletion.mean():.3f} (random {r_deletion.mean():.3f}), insertion {insertion.mean():.3f} (random {r_insertion.mean():.3f})"
    )
    assert correct.float().mean() > 0.4
    assert hit >= 0.45 and hit > 2 * random_hit
    assert gain > 2
    # Deletion separates the map from a random one clearly; insertion (blur fill) barely does
    # (measured: 0.236 against 0.230), so only its direction is asserted.
    assert deletion.mean() < r_deletion.mean() - 0.03 and insertion.mean() > r_insertion.mean()
