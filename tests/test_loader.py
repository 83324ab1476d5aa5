import numpy as np
import pytest
import torch

from cifarcam.data.splits import CIFAR_MEAN, CIFAR_STD
from cifarcam.errors import ConfigError
from cifarcam.training.loader import DeviceLoader


def _images(n=64):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 10


def test_ranks_get_disjoint_equal_shards_that_change_every_epoch():
    images, labels = _images(64)
    loaders = [DeviceLoader(images, np.arange(64), 8, rank=r, world_size=2, seed=5) for r in range(2)]
    seen = [torch.cat([y for _, y in loader]) for loader in loaders]
    assert len(seen[0]) == len(seen[1]) == 32
    assert set(seen[0].tolist()).isdisjoint(seen[1].tolist())
    for loader in loaders:
        loader.set_epoch(1)
    assert not torch.equal(torch.cat([y for _, y in loaders[0]]), seen[0])


def test_eval_loader_covers_every_image_once_in_order():
    images, labels = _images(50)
    shards = [torch.cat([y for _, y in DeviceLoader(images, np.arange(50), 16, train=False, rank=r, world_size=3)]) for r in range(3)]
    assert torch.cat(shards).tolist() == list(range(50))


def test_batches_are_normalised_channels_last_float():
    images, labels = _images(16)
    x, y = next(iter(DeviceLoader(images, labels, 4, train=False)))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    expected = (images[0, 2, 3, 1] / 255 - CIFAR_MEAN[1]) / CIFAR_STD[1]
    assert x[0, 1, 2, 3].item() == pytest.approx(expected, abs=1e-5)


def test_augmentation_is_a_padded_crop_or_its_mirror():
    images, labels = _images(32)
    loader = DeviceLoader(images, np.arange(32), 32, seed=1)
    x, idx = next(iter(loader))
    mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(CIFAR_STD).view(3, 1, 1) * 255
    flips = 0
    for crop, i in zip(x, idx.tolist()):
        pixels = (crop * std + mean).round().to(torch.uint8).permute(1, 2, 0).numpy()
        padded = np.pad(images[i], ((4, 4), (4, 4), (0, 0)))
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if np.array_equal(pixels, (padded[dy : dy + 32, dx : dx + 32][:, ::-1] if flip else padded[dy : dy + 32, dx : dx + 32]))
        ]
        assert matches, f"image {i} is not a crop of its padded original"
        flips += matches[0][2]
    assert 4 < flips < 28  # both flipped and unflipped images occur


def test_batch_larger_than_the_shard_is_rejected():
    images, labels = _images(16)
    with pytest.raises(ConfigError, match=r"batch_size 64 is larger than this worker's share of the data \(16 images / 2 workers = 8\)"):
        DeviceLoader(images, labels, 64, world_size=2)


def test_input_upsampling():
    images, labels = _images(4)
    x, _ = next(iter(DeviceLoader(images, labels, 4, train=False, input_size=64)))
    assert x.shape == (4, 3, 64, 64)
