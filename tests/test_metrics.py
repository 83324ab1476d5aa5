"""Heatmap statistics, localisation and faithfulness on cases whose answer is known."""

import torch

from cifarcam.cam.faithfulness import FaithfulnessSettings, blurred, centre_prior, deletion_insertion, edge_map, sample
from cifarcam.cam.heatmap_metrics import constant_maps, localisation


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


def test_localisation_counts_the_pointing_game_with_its_tolerance():
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[:, 10:14, 10:14] = True
    maps = torch.zeros(3, 32, 32)
    maps[0, 11, 11] = 1  # on the object
    maps[1, 15, 11] = 1  # 2 px below it: a pointing hit, not an exact one
    maps[2, 20, 20] = 1  # far away
    found = localisation(maps, masks)
    assert found["peak_in_object"].tolist() == [True, False, False]
    assert found["pointing_hit"].tolist() == [True, True, False]
    assert found["mass_on_object"].tolist() == [1.0, 0.0, 0.0]
    assert torch.allclose(found["object_area"], torch.full((3,), 16 / 1024))
    uniform = localisation(torch.ones(1, 32, 32), masks[:1])
    assert torch.allclose(uniform["mass_on_object"], uniform["object_area"])  # a uniform map scores chance


def test_constant_maps_are_flagged():
    assert constant_maps(torch.tensor([0.0, 0.5, 1e-15]), 4, 4).tolist() == [True, False, True]
    assert constant_maps(torch.tensor([0.5]), 1, 1).tolist() == [True]


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
    monkeypatch.setattr(faithfulness, "FORWARD_CHUNK", 7)  # 85 inputs per curve: 13 chunks
    chunked = deletion_insertion(model, x, maps, classes, 16, fill)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, chunked, strict=False))
