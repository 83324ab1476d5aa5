"""A device-side loader: each split is one uint8 tensor on the training device; cropping,
flipping, normalising and sharding happen there, with no per-image Python and no worker processes."""

from __future__ import annotations

import functools
import warnings
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from cifarcam.data import CIFAR_MEAN, CIFAR_STD
from cifarcam.errors import ConfigError


@functools.lru_cache(maxsize=None)
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR mean and std (0-255 scale) on ``device``, made once: a tensor built from Python
    numbers on a GPU is a host-to-device copy that makes the host wait, at every step."""
    mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def to_model_input(batch_uint8_nhwc: torch.Tensor, input_size: int = 32) -> torch.Tensor:
    """uint8 NHWC images -> normalised float NCHW (channels_last in memory), resized to ``input_size``."""
    # NHWC -> NCHW by permute is already channels_last in memory: no copy for the conv layers.
    x = batch_uint8_nhwc.permute(0, 3, 1, 2).float()
    mean, std = _normalisation(x.device)
    x = (x - mean) / std
    if input_size != x.shape[-1]:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    return x


def device_generator(device: torch.device, seed: int) -> torch.Generator | None:
    """A seeded generator on ``device``. The meta device (the tests run device code there to catch
    tensors left on the CPU and host reads) has no random state: None draws shapes only."""
    if device.type == "meta":
        return None
    return torch.Generator(device=device).manual_seed(seed)


class DeviceLoader:
    """Batches of (float images NCHW in channels_last memory, int64 labels) on ``device``.

    ``train=True``: a seeded permutation per epoch (same on every rank), this rank's shard of it,
    random crop with 4 pixels of zero padding and horizontal flips, incomplete batches dropped.
    ``train=False``: this rank's contiguous shard in order, no augmentation, every image once.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        batch_size: int,
        device: torch.device | str = "cpu",
        train: bool = True,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        input_size: int = 32,
        pad: int = 4,
    ) -> None:
        self.device = torch.device(device)
        with warnings.catch_warnings():
            # Arrays from the object store are read-only and shared zero-copy; nothing writes them.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.images = torch.as_tensor(images).to(self.device)  # uint8 NHWC, uploaded once
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(self.device)
        n = len(self.labels)
        if batch_size > n // world_size and train:  # config.check_batch_fits says so before any trial
            raise ConfigError(f"batch_size {batch_size} is larger than this worker's share of the data ({n} images / {world_size} workers = {n // world_size})")
        self.batch_size, self.train, self.rank, self.world_size = batch_size, train, rank, world_size
        self.seed, self.input_size, self.pad = seed, input_size, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rows(self) -> torch.Tensor:
        n = len(self.labels)
        if not self.train:  # contiguous shards whose sizes differ by at most one image
            start, stop = (self.rank * n) // self.world_size, ((self.rank + 1) * n) // self.world_size
            return torch.arange(start, stop, device=self.device)
        # The permutation must be the same on every rank, whatever its device: drawn on the CPU,
        # and copied to the device once per epoch.
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(n, generator=generator)
        per_rank = n // self.world_size  # equal step counts on every rank (DDP needs them)
        return perm[self.rank * per_rank : (self.rank + 1) * per_rank].to(self.device)

    def __len__(self) -> int:
        n = len(self.labels)
        if self.train:
            return (n // self.world_size) // self.batch_size
        return -(-len(self._rows()) // self.batch_size)

    @property
    def num_images(self) -> int:
        return len(self._rows()) if not self.train else len(self) * self.batch_size

    def _augment(self, batch: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Random crop (zero padding ``pad``) and horizontal flip, by one gather for the batch.

        Offsets and flips are drawn on the device: a CPU draw copied over would make the host
        wait for the device at every step."""
        b, h, w, _ = batch.shape
        padded = F.pad(batch, (0, 0, self.pad, self.pad, self.pad, self.pad))
        offsets = torch.randint(0, 2 * self.pad + 1, (2, b), generator=generator, device=self.device)
        flips = torch.rand(b, generator=generator, device=self.device) < 0.5
        ys = offsets[0, :, None] + torch.arange(h, device=self.device)
        cols = torch.arange(w, device=self.device).expand(b, w)
        xs = offsets[1, :, None] + torch.where(flips[:, None], cols.flip(1), cols)
        return padded[torch.arange(b, device=self.device)[:, None, None], ys[:, :, None], xs[:, None, :]]

    def normalize(self, batch_uint8_nhwc: torch.Tensor) -> torch.Tensor:
        return to_model_input(batch_uint8_nhwc, self.input_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rows = self._rows()
        generator = device_generator(self.device, self.seed * 100_003 + self.epoch + 7919 * (self.rank + 1))
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = rows[start : start + self.batch_size]
            batch = self.images[idx]
            if self.train:
                batch = self._augment(batch, generator)
            yield self.normalize(batch), self.labels[idx]
