"""Test-set evaluation of a checkpoint: accuracy figures and one prediction row per image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cifarcam.data import ImageSet
from cifarcam.training.checkpoint import load_model
from cifarcam.training.loader import DeviceLoader
from cifarcam.training.models import count_params
from cifarcam.training.train import predict


@dataclass(frozen=True)
class TestEvaluation:
    top1: float
    top5: float
    superclass_top1: float | None
    params: int
    predictions: dict[str, Any]  # columns of search_tables.PREDICTIONS (without ``model`` and ``weights_sha256``)


def superclass_of(labels: np.ndarray, fine: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """Map fine class ids to coarse ones using the (fine, coarse) pairs seen in the data."""
    table = np.full(int(max(fine.max(), labels.max())) + 1, -1, dtype=np.int64)
    table[fine] = coarse
    return table[labels]


def evaluate_checkpoint(folder: str, test: ImageSet, batch_size: int = 512, device: str | torch.device = "cpu") -> TestEvaluation:
    model, meta = load_model(folder, device)
    spec = meta["model"]
    loader = DeviceLoader(test.images, test.labels, batch_size, device=device, train=False, input_size=spec["input_size"])
    out = predict(model, loader, bf16=meta.get("train", {}).get("bf16", True))
    top = out["topk_classes"]
    labels = test.labels
    pred = top[:, 0]
    correct = pred == labels
    superclass = None
    if test.coarse_labels is not None:
        pred_coarse = superclass_of(pred, test.labels, test.coarse_labels)
        superclass = float((pred_coarse == test.coarse_labels).mean())
    coarse = test.coarse_labels if test.coarse_labels is not None else np.full(len(labels), None)
    return TestEvaluation(
        top1=float(correct.mean()),
        top5=float((top == labels[:, None]).any(1).mean()),
        superclass_top1=superclass,
        params=count_params(model),
        predictions={
            "image_index": test.index.tolist(),
            "label": labels.tolist(),
            "coarse_label": coarse.tolist(),
            "pred": pred.tolist(),
            "top5": top.tolist(),
            "prob": out["topk_probs"][:, 0].astype(float).tolist(),
            "correct": correct.tolist(),
        },
    )
