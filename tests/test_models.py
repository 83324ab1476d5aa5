import warnings

import pytest
import torch

from cifarcam.errors import ConfigError, DataError
from cifarcam.training.models import FAMILIES, PAPER_FAMILIES, ModelSpec, build_model, cam_layers, count_params


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_every_family_builds_runs_forward_and_backward_at_32px(family, stem):
    spec = ModelSpec(family, 100, stem, 32)
    model = build_model(spec)
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 100)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = cam_layers(model, spec)
    assert [layer.name for layer in layers] == list(FAMILIES[family].cam_layers)
    if stem == "cifar":  # the CIFAR stem keeps a usable last-stage map
        assert (layers[-1].height, layers[-1].width) == (4, 4) and not caught
    else:  # the paper's setting: the final layer collapses to 1x1 at 32px, with a warning
        assert (layers[-1].height, layers[-1].width) == (1, 1)
        assert any("degenerate" in str(w.message) for w in caught)


def test_paper_families_have_the_expected_parameter_counts():
    # Table 1 of the paper (ImageNet-style heads aside): timm variants with 100 classes.
    expected_millions = {"resnet34": 21.3, "resnet50": 23.7, "resnet101": 42.7, "efficientnetv2": 22.3, "mobilenetv3": 4.3, "regnet": 3.9, "swin": 27.5}
    for family in PAPER_FAMILIES:
        params = count_params(build_model(ModelSpec(family, 100, "imagenet", 32)))
        assert params / 1e6 == pytest.approx(expected_millions[family], abs=0.1), family


def test_upsampled_input_restores_spatial_maps():
    spec = ModelSpec("resnet18", 10, "imagenet", 128)
    layers = cam_layers(build_model(spec), spec)
    assert (layers[-1].height, layers[-1].width) == (4, 4)


def test_unknown_model_suggests_the_closest_name():
    with pytest.raises(ConfigError, match=r"unknown model 'resnet5'; did you mean 'resnet50'\?"):
        build_model(ModelSpec("resnet5", 10))


def test_pretrained_offline_gives_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"train\.pretrained: cannot load ImageNet weights for resnet18 from .*missing\.pth"):
        build_model(ModelSpec("resnet18", 10), pretrained=str(tmp_path / "missing.pth"))
