import numpy as np
import pytest

from cifarcam.config import DataConfig, SyntheticConfig
from cifarcam.data.splits import ImageSet, load_splits, stratified_split
from cifarcam.data.synthetic import make_synthetic
from cifarcam.errors import DataError


def test_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), 100)
    train, val = stratified_split(labels, 0.1, seed=3)
    assert len(set(train) & set(val)) == 0 and len(train) + len(val) == 1000
    assert np.bincount(labels[val]).tolist() == [10] * 10
    again, _ = stratified_split(labels, 0.1, seed=3)
    other, _ = stratified_split(labels, 0.1, seed=4)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_test_set_stays_apart_from_train_and_val():
    splits = load_splits(DataConfig(synthetic=SyntheticConfig(train_size=500, test_size=100)))
    assert len(splits.train) == 450 and len(splits.val) == 50 and len(splits.test) == 100
    assert len(set(splits.train.index) & set(splits.val.index)) == 0


def test_synthetic_is_deterministic_and_masks_cover_the_object():
    cfg = SyntheticConfig(num_classes=4, train_size=40, test_size=8)
    (a, _), (b, _) = make_synthetic(cfg, seed=1), make_synthetic(cfg, seed=1)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, make_synthetic(cfg, seed=2)[0].images)
    assert np.bincount(a.labels).tolist() == [10] * 4
    # object pixels are the class colour, so they differ from the texture around them
    for i in range(5):
        inside = a.images[i][a.masks[i]].astype(float)
        assert a.masks[i].sum() > 20 and inside.std(0).max() < 25  # one flat colour (+ jitter)


def test_bad_images_are_rejected_with_the_source_named():
    with pytest.raises(DataError, match=r"src: images must be uint8 of shape \(N, H, W, 3\), got float32 \(2, 32, 32, 3\)"):
        ImageSet(np.zeros((2, 32, 32, 3), np.float32), np.zeros(2, np.int64), ("a",)).validate("src")
    with pytest.raises(DataError, match=r"src: the dataset is empty"):
        ImageSet(np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64), ("a",)).validate("src")
    with pytest.raises(DataError, match=r"labels must lie in \[0, 1\), got \[0, 3\]"):
        ImageSet(np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 3]), ("a",)).validate("src")
