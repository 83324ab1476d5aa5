"""The CAM fast path against pytorch-grad-cam, orientation, statistics. (Localisation and
faithfulness of trained maps: tests/test_pipeline_job.py, on the demo run's hard shapes.)"""

import numpy as np
import pytest
import torch
from torch import nn

from cifarcam.cam.heatmap_metrics import heatmap_stats
from cifarcam.cam.methods import METHODS, MultiLayerCam, method_key, minmax, normalise_maps, reference_maps
from cifarcam.cam.settings import CamSettings
from cifarcam.errors import ConfigError
from cifarcam.training.models import FAMILIES, ModelSpec, build_model
from helpers import assert_fast_path_matches_pytorch_grad_cam


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
    stats = heatmap_stats(heat, out.grid[("label", "features", "gradcam")])
    assert (stats["peak_y"].item(), stats["peak_x"].item()) == (3, 20)
    stored = (heat * 255).round().to(torch.uint8).flatten(1)[0].numpy()  # what the stage writes
    assert stored[3 * 32 + 20] == 255 and stored[20 * 32 + 3] == 0 and stored[3 * 32 + 11] == 0


def test_stats_of_a_point_and_a_uniform_map():
    point = torch.zeros(1, 32, 32)
    point[0, 5, 6] = 1
    uniform = torch.ones(1, 32, 32)
    p, u = heatmap_stats(point, point), heatmap_stats(uniform, uniform)
    assert p["entropy"].item() == pytest.approx(0, abs=1e-6) and p["top10_mass"].item() == pytest.approx(1)
    assert u["entropy"].item() == pytest.approx(1, abs=1e-6) and u["top10_mass"].item() == pytest.approx(102 / 1024)


def test_unknown_method_suggests_the_closest():
    assert method_key("GradCAM++") == "gradcam++" and method_key("Grad-CAM") == "gradcam"
    assert CamSettings(methods=("Grad-CAM++", "EigenCAM")).methods == ("gradcam++", "eigencam")
    with pytest.raises(ConfigError, match=r"^--methods: unknown CAM method 'gradcan'; did you mean 'gradcam'\?$"):
        CamSettings(methods=("gradcan",))
    with pytest.raises(ConfigError, match=r"^--methods: unknown CAM method 'xyz'; expected one of gradcam, gradcam\+\+, "):
        CamSettings(methods=("xyz",))


def test_every_method_names_its_pytorch_grad_cam_class():
    import pytorch_grad_cam

    assert all(isinstance(getattr(pytorch_grad_cam, m.reference), type) for m in METHODS.values())
    assert {m.name for m in METHODS.values() if m.is_fast} == {"gradcam", "gradcam++", "hirescam", "xgradcam", "layercam"}


@pytest.mark.parametrize(("cells", "cell", "centre"), [(4, (0, 0), (3.5, 3.5)), (4, (3, 3), (27.5, 27.5)), (2, (0, 1), (7.5, 23.5)), (8, (2, 5), (9.5, 21.5))])
def test_a_coarse_maps_peak_is_its_cells_centre_not_the_plateaus_first_pixel(cells, cell, centre):
    """Bilinear upsampling leaves a flat plateau at the border: the stored map's first maximum in
    row order is pixel (0, 0) for cell (0, 0) of a 4x4 map, and (28, 28) for cell (3, 3), always
    towards the top-left. On the layer's own grid the peak is the cell's centre."""
    grid = torch.rand(1, cells, cells) * 0.5
    grid[0, cell[0], cell[1]] = 1.0
    stored = normalise_maps(grid, 32)
    first = int(stored.flatten(1).argmax())
    stats = heatmap_stats(stored, minmax(grid))
    assert (stats["peak_y"].item(), stats["peak_x"].item()) == centre
    if cell == (0, 0):
        assert divmod(first, 32) == (0, 0)  # what the old argmax reported, 3.5 px off in each axis


def test_cells_tied_for_the_peak_give_the_first_cells_centre():
    """Exact ties go to the first cell in row order, never to a centroid: two tied cells in
    opposite corners would put it in the middle, where the map is low."""
    grid = torch.zeros(1, 4, 4)
    grid[0, 0, 3] = grid[0, 3, 0] = 1.0
    stats = heatmap_stats(normalise_maps(grid, 32), grid)
    assert (stats["peak_y"].item(), stats["peak_x"].item()) == (3.5, 27.5)


def test_entropy_counts_the_layers_cells_not_the_upsampled_pixels():
    """A 4x4 map with its mass on one cell says "one cell": entropy 0, although its 32x32 upsampling
    spreads it over 64 pixels and more (by log 1024 that read as 0.6)."""
    grid = torch.zeros(1, 4, 4)
    grid[0, 2, 1] = 1.0
    stored = normalise_maps(grid, 32)
    assert heatmap_stats(stored, grid)["entropy"].item() == pytest.approx(0, abs=1e-6)
    assert heatmap_stats(torch.ones(1, 32, 32), torch.ones(1, 4, 4))["entropy"].item() == pytest.approx(1, abs=1e-6)
