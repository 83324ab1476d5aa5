"""The cascading-randomisation sanity check: its cascade, its statistic, and that it tells a map
that depends on the model's weights from one that does not."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from cifarcam.cam import methods
from cifarcam.cam.methods import CamMethod
from cifarcam.cam.sanity import SSIM_C2, cascade, global_ssim, layer_map_similarity, randomisation_rows
from cifarcam.rank_stats import spearman
from cifarcam.results import FAIL_SPEARMAN
from cifarcam.training.models import ModelSpec, build_model


def test_the_cascade_goes_top_down_from_the_head():
    model = build_model(ModelSpec("resnet_tiny", 10))
    steps = cascade(model, ["layer2", "layer3", "layer4"], torch.zeros(1, 3, 32, 32))
    assert [s.name for s in steps] == ["head", "layer4", "layer3", "layer2"]
    assert steps[0].modules == [model.fc]
    assert all(any(m is other for other in model.layer4.modules()) for m in steps[1].modules)
    assert any(m is model.conv1 for m in steps[-1].modules)  # the stem goes with the first CAM layer


def test_the_cascade_covers_the_blocks_between_cam_layers():
    """mobilenetv3_small's CAM layers are blocks.1, .3 and .5: blocks.2 and .4 (and the stem) must
    be randomised too, or the check would compare maps of a partly trained model."""
    from cifarcam.training.models import FAMILIES

    model = build_model(ModelSpec("mobilenetv3_small", 10))
    steps = cascade(model, list(FAMILIES["mobilenetv3_small"].cam_layers), torch.zeros(1, 3, 32, 32))
    randomised = {id(m) for step in steps for m in step.modules}
    owners = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    assert [n for n, m in owners if id(m) not in randomised] == []
    assert sum(len(step.modules) for step in steps) == len(randomised)  # each exactly once
    assert [s.name for s in steps] == ["head", "blocks.5", "blocks.3", "blocks.1"]


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, (6, 40)).astype(float), rng.integers(0, 5, (6, 40)).astype(float)
    expected = [spearmanr(x, y).statistic for x, y in zip(a, b, strict=False)]
    assert np.allclose(spearman(a, b), expected)
    assert np.isnan(spearman(np.ones((1, 4)), b[:1, :4]))[0]


def test_a_map_blind_to_the_weights_above_fails_and_gradcam_passes(monkeypatch):
    """An activation-only map ignores every layer above its own: randomising them leaves it
    unchanged (the check fails). Grad-CAM's gradients come from those layers: it changes."""
    monkeypatch.setitem(methods.METHODS, "activations", CamMethod("activations", reference="none", fast=lambda a, g: a.sum(1)))
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet_tiny", 10)).eval()
    x = torch.randn(16, 3, 32, 32)
    rows = randomisation_rows(model, x, ["layer2", "layer3"], ["gradcam", "activations"], False, 32)
    check = {(r["layer"], r["method"]): r["spearman"] for r in rows if r["check"]}
    assert set(check) == {(layer, m) for layer in ("layer2", "layer3") for m in ("gradcam", "activations")}
    assert check[("layer2", "activations")] == pytest.approx(1.0) and check[("layer3", "activations")] == pytest.approx(1.0)
    assert check[("layer2", "activations")] >= FAIL_SPEARMAN  # what the report flags
    # Grad-CAM changes (an untrained model's maps still share its activations' structure: not to 0)
    assert check[("layer2", "gradcam")] < 0.8 and check[("layer3", "gradcam")] < 0.8
    # randomising the explained layer itself changes even the activation map
    last = {(r["layer"], r["method"]): r["spearman"] for r in rows if r["randomised_to"] == "layer2"}
    assert last[("layer2", "activations")] < 0.9
    # on the layer's own grid, before the ReLU, the blind map is unchanged too: signed, absolute, SSIM
    grid = {(r["layer"], r["method"]): r for r in rows if r["check"]}
    for layer in ("layer2", "layer3"):
        blind = grid[(layer, "activations")]
        assert blind["spearman_layer"] == pytest.approx(1.0) and blind["spearman_layer_abs"] == pytest.approx(1.0)
        assert blind["ssim_layer"] == pytest.approx(1.0) and blind["spearman_layer_se"] == pytest.approx(0.0, abs=1e-9)
        assert grid[(layer, "gradcam")]["spearman_layer"] < 0.8 and grid[(layer, "gradcam")]["ssim_layer"] < 0.9


def test_the_layer_resolution_comparison_has_known_answers():
    """What Adebayo et al. compare, on hand-built 2x2 maps: a map whose sign flips is the opposite
    map (signed rho -1) with the same importance (absolute rho 1, SSIM 1); a map made constant
    changed completely (rho 0); SSIM of [0, 1] against [1, 0] is (-0.5 + C2) / (0.5 + C2)."""
    before = np.array([[[1.0, -2.0], [3.0, 0.5]], [[1.0, 2.0], [3.0, 4.0]]])
    after = np.stack([-before[0], np.full((2, 2), 7.0)])
    result = layer_map_similarity(before, after, after_constant=np.array([False, True]))
    assert result["spearman_layer"].tolist() == pytest.approx([-1.0, 0.0])
    assert result["spearman_layer_abs"].tolist() == pytest.approx([1.0, 0.0])
    assert result["ssim_layer"][0] == pytest.approx(1.0)
    assert global_ssim(np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]]))[0] == pytest.approx((-0.5 + SSIM_C2) / (0.5 + SSIM_C2))
    assert global_ssim(np.array([[0.2, 0.2]]), np.array([[0.2, 0.2]]))[0] == pytest.approx(1.0)


def test_a_cam_layer_that_owns_no_parameters_gets_its_own_step():
    """A ReLU given to --layers owns no weights: its step randomises what lies between it and the
    CAM layer below (before: max() of an empty list)."""
    model = build_model(ModelSpec("resnet_tiny", 10))
    steps = cascade(model, ["layer2", "layer3.0.act2"], torch.zeros(1, 3, 32, 32))
    assert [s.name for s in steps] == ["head", "layer3.0.act2", "layer2"]
    assert any(m is model.layer3[0].conv1 for m in steps[1].modules) and not any(m is model.fc for m in steps[1].modules)


def test_a_map_the_randomisation_made_constant_counts_as_changed_completely(monkeypatch):
    """Once the weights above are random, this method's map is all zeros (a constant): it changed
    completely, rho = 0, and its share is reported. Dropping the NaN (as before) left no image,
    and the mean rho undefined, for the map that changed most."""
    trained_state = {}

    def trained_only(a, g):
        return a.sum(1) if trained_state.setdefault("calls", 0) == 0 else torch.zeros_like(a[:, 0])

    def first_call_then_zero(a, g):
        out = trained_only(a, g)
        trained_state["calls"] += 1
        return out

    monkeypatch.setitem(methods.METHODS, "fades", CamMethod("fades", reference="none", fast=first_call_then_zero))
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet_tiny", 10)).eval()
    rows = randomisation_rows(model, torch.randn(8, 3, 32, 32), ["layer3"], ["fades"], False, 32)
    check = next(r for r in rows if r["check"])
    assert check["images"] == 8 and check["became_constant"] == 1.0 and check["spearman"] == 0.0


def test_the_randomisation_is_seeded_and_averaged_over_draws():
    """The same seed gives the same rows; another seed, or another number of draws, other
    correlations; the rows say how many draws each image's rho averages."""
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet_tiny", 10)).eval()
    x = torch.randn(6, 3, 32, 32)

    def check(seed, draws):
        rows = randomisation_rows(model, x, ["layer3"], ["gradcam"], False, 32, seed=seed, draws=draws)
        (row,) = [r for r in rows if r["check"]]
        return row

    first = check(0, 2)
    assert first["draws"] == 2 and first == check(0, 2)
    assert check(5, 2)["spearman"] != first["spearman"] and check(0, 1)["spearman"] != first["spearman"]


def test_a_job_with_other_layers_extends_the_cascade_instead_of_overwriting_it(tmp_path):
    """Two jobs on one method with different --layers: the second recomputes one cascade over both
    jobs' layers (a cascade's steps depend on its layer set), and a third asking for fewer finds
    the file current. Before, each job rewrote the file with its own layers only."""
    from cifarcam.cam.partitions import Source
    from cifarcam.cam.runner import sanity_work
    from cifarcam.cam.sanity import sanity_file, write_sanity
    from cifarcam.cam.settings import CamSettings
    from cifarcam.cam.stage import ModelPlan, ModelToExplain
    from cifarcam.training.models import CamLayer

    spec, source = ModelSpec("resnet_tiny", 10), Source("ckpt", "a" * 64)
    settings = CamSettings(methods=("gradcam",))

    def job(*layers: str) -> list:
        plan = ModelPlan(ModelToExplain("resnet_tiny", "ckpt"), spec, [CamLayer(n, 4, 4) for n in layers], [], source, {})
        work = sanity_work(tmp_path, [plan], settings, images=8)
        for _, _, wanted, missing in work:  # what sanity_checks writes, rows aside
            for method in missing:
                write_sanity(sanity_file(tmp_path, "resnet_tiny", method), [], source.weights_sha256, wanted)
        return [(computed, missing) for _, computed, _, missing in work]

    assert job("layer3", "layer4") == [(["layer3", "layer4"], ["gradcam"])]
    assert job("layer2") == [(["layer2", "layer3", "layer4"], ["gradcam"])]
    assert job("layer4") == []  # current: its cascade covers layer4 already
    other_weights = Source("ckpt", "b" * 64)
    plan = ModelPlan(ModelToExplain("resnet_tiny", "ckpt"), spec, [CamLayer("layer4", 4, 4)], [], other_weights, {})
    assert [w[1] for w in sanity_work(tmp_path, [plan], settings, images=8)] == [["layer4"]]  # another checkpoint's layers do not count
