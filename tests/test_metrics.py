"""Heatmap statistics, localisation and faithfulness on cases whose answer is known."""

import pytest
import torch

from cifarcam.cam.faithfulness import FaithfulnessSettings, blurred, centre_prior, curve_ends, deletion_insertion, edge_map, sample, step_pixels
from cifarcam.cam.heatmap_metrics import constant_maps, localisation
from cifarcam.cam.methods import relative_spread


class _LooksAtTopLeft(torch.nn.Module):
    """Class 0's logit is the mean brightness of the top-left 8x8 block; class 1's is 0."""

    def forward(self, x):
        score = x[:, :, :8, :8].mean((1, 2, 3)) * 10
        return torch.stack([score, torch.zeros_like(score)], 1)


def test_a_map_on_what_the_model_uses_beats_its_negation_on_both_curves():
    x = torch.ones(4, 3, 32, 32)
    right = torch.zeros(4, 32, 32)
    right[:, :8, :8] = 1
    classes = torch.zeros(4, dtype=torch.long)
    fill = torch.zeros_like(x)  # removed pixels go dark: the class-0 score falls
    deletion, insertion = deletion_insertion(_LooksAtTopLeft(), x, right, classes, 16, fill)
    wrong_deletion, wrong_insertion = deletion_insertion(_LooksAtTopLeft(), x, 1 - right, classes, 16, fill)
    assert (deletion < wrong_deletion - 0.2).all() and (insertion > wrong_insertion + 0.2).all()
    assert ((0 <= deletion) & (insertion <= 1)).all()


def test_deletion_starts_at_the_image_and_ends_at_the_fill():
    """With one step, the curve is (p(image), p(fill)) for deletion and the reverse for insertion."""
    x, fill = torch.ones(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)
    model, classes = _LooksAtTopLeft(), torch.zeros(1, dtype=torch.long)
    p_image, p_fill = model(x).softmax(1)[0, 0], model(fill).softmax(1)[0, 0]
    deletion, insertion = deletion_insertion(model, x, torch.rand(1, 32, 32), classes, 1, fill)
    assert torch.allclose(deletion, (p_image + p_fill) / 2) and torch.allclose(insertion, (p_image + p_fill) / 2)


def _point(y: float, x: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([float(y)]), torch.tensor([float(x)])


def test_localisation_counts_the_pointing_game_with_its_tolerance():
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[:, 10:14, 10:14] = True
    maps = torch.zeros(3, 32, 32)
    maps[0, 11, 11] = 1  # on the object
    maps[1, 15, 11] = 1  # 2 px below it: a pointing hit, not an exact one
    maps[2, 20, 20] = 1  # far away
    peak_y, peak_x = torch.tensor([11.0, 15.0, 20.0]), torch.tensor([11.0, 11.0, 20.0])
    found = localisation(maps, masks, peak_y, peak_x, (32, 32))
    assert found["peak_in_object"].tolist() == [True, False, False]
    assert found["pointing_hit"].tolist() == [True, True, False]
    assert found["pointing_hit_cell"].tolist() == [True, False, False]  # on a 32x32 grid a cell is a pixel
    assert found["mass_on_object"].tolist() == [1.0, 0.0, 0.0]
    assert torch.allclose(found["object_area"], torch.full((3,), 16 / 1024))
    uniform = localisation(torch.ones(1, 32, 32), masks[:1], *_point(0, 0), (32, 32))
    assert torch.allclose(uniform["mass_on_object"], uniform["object_area"])  # a uniform map scores chance


def test_a_peak_between_pixels_and_the_tolerance_in_cells():
    """A 4x4 map's peak in cell (1, 1) is the point (11.5, 11.5), held by pixel (12, 12). A
    one-pixel object at (15, 15) is 3 px from it: no hit at 2 px; but it lies in the same cell
    (pixels 8-15), which the tolerance in cells counts."""
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, 15, 15] = True
    masks[1, 12, 12] = True  # the peak's pixel
    peak = torch.tensor([11.5, 11.5])
    found = localisation(torch.ones(2, 32, 32), masks, peak, peak, (4, 4))
    assert found["peak_in_object"].tolist() == [False, True]
    assert found["pointing_hit"].tolist() == [False, True]
    assert found["pointing_hit_cell"].tolist() == [True, True]
    assert found["object_cell_share"].tolist() == [1 / 16, 1 / 16]
    masks[0, 14, 14] = True  # 2 px from (12, 12): a hit
    masks[0, 15, 16] = True  # and one more cell, (1, 2)
    again = localisation(torch.ones(2, 32, 32), masks, peak, peak, (4, 4))
    assert again["pointing_hit"][0].item() and again["object_cell_share"][0].item() == 2 / 16


def test_constant_maps_are_flagged():
    assert constant_maps(torch.tensor([0.0, 0.5, 1e-15]), 4, 4).tolist() == [True, False, True]
    assert constant_maps(torch.tensor([0.5]), 1, 1).tolist() == [True]


def test_a_map_is_constant_by_its_shape_never_by_its_scale():
    """The threshold is relative: a map of tiny activations with a real peak says something; a map
    of large ones that differ by rounding noise says nothing. An absolute threshold (the old
    1e-12) gets both wrong."""
    shape = torch.zeros(4, 4)
    shape[1, 2] = 1.0
    maps = torch.stack([shape * 1e-14, 1000.0 + shape * 1e-7, torch.zeros(4, 4), 3.0 + shape])
    assert constant_maps(relative_spread(maps), 4, 4).tolist() == [False, True, True, False]


def test_the_deletion_auc_of_the_right_map_is_known():
    """16 steps of 64 pixels: the first removes the whole 8x8 block the model reads, so the curve is
    sigmoid(10), then 0.5 fifteen more times; its trapezoid AUC is ((sigmoid(10) + 0.5) / 2 + 15 x 0.5) / 16."""
    x, fill = torch.ones(2, 3, 32, 32), torch.zeros(2, 3, 32, 32)
    right = torch.zeros(2, 32, 32)
    right[:, :8, :8] = 1
    deletion, insertion = deletion_insertion(_LooksAtTopLeft(), x, right, torch.zeros(2, dtype=torch.long), 16, fill)
    expected = ((torch.sigmoid(torch.tensor(10.0)).item() + 0.5) / 2 + 15 * 0.5) / 16
    assert expected == pytest.approx(0.515624, abs=1e-6)
    assert deletion.tolist() == pytest.approx([expected] * 2, abs=1e-6)
    s10 = torch.sigmoid(torch.tensor(10.0)).item()  # insertion: 0.5 from the fill, then sigmoid(10) once the block is back
    assert insertion.tolist() == pytest.approx([((0.5 + s10) / 2 + 15 * s10) / 16] * 2, abs=1e-6)


def test_quadratic_steps_fall_where_the_curves_move_and_weigh_by_their_widths():
    """8 quadratic steps of 1,024 pixels remove 16, 64, 144, ... of them: the 8x8 block the model
    reads is gone by the second step, so the deletion curve is sigmoid(10), sigmoid(7.5), then 0.5
    (insertion: 0.5, sigmoid(2.5), then sigmoid(10)), and each trapezoid weighs by its width."""
    counts = [0, 16, 64, 144, 256, 400, 576, 784, 1024]
    assert step_pixels(8, "quadratic", 1024).tolist() == counts
    assert step_pixels(16, "uniform", 1024).tolist() == [64 * k for k in range(17)]
    x, fill = torch.ones(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)
    right = torch.zeros(1, 32, 32)
    right[:, :8, :8] = 1
    deletion, insertion = deletion_insertion(_LooksAtTopLeft(), x, right, torch.zeros(1, dtype=torch.long), 8, fill, spacing="quadratic")

    def s(v: float) -> float:
        return torch.sigmoid(torch.tensor(v)).item()

    def trapezoid(curve: list[float]) -> float:
        return sum((a + b) / 2 * (q - p) / 1024 for a, b, p, q in zip(curve, curve[1:], counts, counts[1:]))

    assert deletion.item() == pytest.approx(trapezoid([s(10), s(7.5)] + [0.5] * 7), abs=1e-6)
    assert insertion.item() == pytest.approx(trapezoid([0.5, s(2.5)] + [s(10)] * 7), abs=1e-6)
    assert deletion.item() < 0.5 + 0.02  # the block is gone after 6 % of the pixels: nearly the floor


def test_the_tie_break_orders_equal_values_and_nothing_else():
    """A constant map is removed in the tie-break's order: with the right map as the tie-break it
    scores as the right map does, and without one (raster order) it does not. A map with a
    real order keeps it whatever the tie-break."""
    x, fill = torch.ones(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)
    model, classes = _LooksAtTopLeft(), torch.zeros(1, dtype=torch.long)
    right = torch.zeros(1, 32, 32)
    right[:, :8, :8] = 1
    flat = torch.zeros(1, 32, 32)

    def auc(heat, tie_break=None):
        return deletion_insertion(model, x, heat, classes, 16, fill, tie_break)[0].item()

    assert auc(flat, tie_break=right) == pytest.approx(auc(right))
    assert auc(flat) > auc(right) + 0.05  # raster order: the first 64 pixels hold half the block
    assert auc(right, tie_break=torch.rand(1, 32, 32)) == pytest.approx(auc(right))
    assert auc(right, tie_break=1 - right) == pytest.approx(auc(right))


def test_baselines_know_nothing_of_the_model():
    centre = centre_prior(2, 32, 0.25, torch.device("cpu"))
    assert int(centre[0].argmax()) in {15 * 32 + 15, 15 * 32 + 16, 16 * 32 + 15, 16 * 32 + 16}
    x = torch.zeros(1, 3, 32, 32)
    x[:, :, :, 16:] = 1  # one vertical edge between columns 15 and 16
    edges = edge_map(x)[0]
    assert edges[:, 15:17].min() > 0 and edges[:, :14].max() == 0 and edges[:, 18:].max() == 0
    assert blurred(x, 2.0)[0, 0, 5, 15] > 0  # the blur spreads the edge


def test_the_sample_is_seeded_and_sized():
    settings = FaithfulnessSettings(steps=16, images=10, seed=3)
    first = sample(100, settings)
    assert first.sum() == 10 and (first == sample(100, settings)).all()
    assert not (first == sample(100, FaithfulnessSettings(steps=16, images=10, seed=4))).all()
    assert sample(5, settings).sum() == 5  # fewer images than the sample: all of them


def test_chunked_forward_passes_give_the_same_curves(monkeypatch):
    """Inputs are built one chunk at a time (bounded memory); the chunk size must not matter."""
    import cifarcam.cam.faithfulness as faithfulness

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x, maps = torch.randn(5, 3, 32, 32), torch.rand(5, 8, 8)
    classes, fill = torch.tensor([0, 1, 2, 0, 1]), blurred(torch.randn(5, 3, 32, 32), 2.0)
    whole = deletion_insertion(model, x, maps, classes, 16, fill)
    monkeypatch.setattr(faithfulness, "FORWARD_CHUNK", 7)  # 75 inputs per curve: 11 chunks
    chunked = deletion_insertion(model, x, maps, classes, 16, fill)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, chunked, strict=False))


class _Counting(torch.nn.Module):
    """A small CNN that counts the images it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
        self.images = 0

    def forward(self, x):
        self.images += len(x)
        return self.net(x)


def test_every_map_of_an_image_shares_the_curves_ends():
    """Deletion starts at the image and ends at its fill, insertion the reverse, for every map:
    those two forwards run once per image (curve_ends), not twice per map, and the curves are the
    same either way. 16 steps: 2 x 15 inputs per image and map instead of 2 x 17."""
    torch.manual_seed(0)
    model = _Counting().eval()
    x, classes = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1])
    fill, maps = blurred(x, 2.0), [torch.rand(5, 8, 8) for _ in range(3)]
    alone = [deletion_insertion(model, x, m, classes, 16, fill) for m in maps]
    assert model.images == 3 * 5 * (2 * 15 + 2)
    model.images = 0
    ends = curve_ends(model, x, classes, fill)
    shared = [deletion_insertion(model, x, m, classes, 16, fill, ends=ends) for m in maps]
    assert model.images == 5 * 2 + 3 * 5 * 2 * 15
    assert all(torch.allclose(a, b, atol=1e-6) for pair in zip(alone, shared, strict=True) for a, b in zip(*pair, strict=True))
    with torch.no_grad():
        probs = model.net(torch.cat([x, fill])).softmax(1)
    assert torch.allclose(ends, torch.stack([probs[:5].gather(1, classes[:, None])[:, 0], probs[5:].gather(1, classes[:, None])[:, 0]], 1), atol=1e-6)
