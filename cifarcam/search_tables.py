"""The search's Parquet tables (trials, epochs, accuracy, predictions), one dataclass each.

A row class's fields *are* its table's columns: the Arrow schema is derived from the annotations
(``str`` string, ``int`` int64, ``float`` float64, ``bool`` bool, ``list[int]`` list of int64;
``X | None`` where the column has nulls), so a column is named in one place.
results/README.md explains every column.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass

import pyarrow as pa

_ARROW = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_(), list[int]: pa.list_(pa.int64())}


def arrow_schema(row_class: type) -> pa.Schema:
    """The Parquet schema of ``row_class``'s fields, in their order."""
    hints = typing.get_type_hints(row_class)
    return pa.schema([(f.name, _ARROW[_without_none(hints[f.name])]) for f in dataclasses.fields(row_class)])


def _without_none(hint: object) -> object:
    if isinstance(hint, types.UnionType):
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return inner
    return hint


@dataclass(frozen=True)
class TrialRow:
    trial_id: str
    model: str
    optimizer: str
    scheduler: str
    lr: float
    weight_decay: float
    batch_size: int
    hyperparameters: str  # JSON of every searched value
    status: str  # completed | stopped_early | diverged | error
    error: str | None
    epochs_run: int
    epochs_planned: int
    stopped_by_asha: bool
    metric: str  # the search's metric (search.metric), which ranks the trials
    best_metric: float | None  # its value at the trial's best epoch (best by search.mode)
    best_val_top1: float | None
    best_epoch: int | None
    best_checkpoint: str | None
    time_s: float


@dataclass(frozen=True)
class EpochRow:
    trial_id: str
    model: str
    epoch: int
    train_loss: float | None
    val_loss: float | None
    val_top1: float | None
    val_top5: float | None
    images_per_s: float | None
    lr: float | None
    epoch_time_s: float | None
    diverged: bool | None
    workers: int | None  # DDP processes that trained this epoch
    nodes: int | None  # distinct Ray nodes those processes ran on
    checkpoint_path: str | None  # null once Train dropped it (only the best k are kept)


@dataclass(frozen=True)
class AccuracyRow:
    model: str
    variant: str  # the timm model behind the family name
    stem: str
    input_size: int
    params: int
    trial_id: str
    optimizer: str
    scheduler: str
    lr: float
    weight_decay: float
    epochs: int
    val_top1: float | None
    test_top1: float
    test_top5: float
    test_superclass_top1: float | None  # null where the dataset has no superclasses
    train_time_s: float
    images_per_s: float | None
    checkpoint: str
    weights_sha256: str  # of the checkpoint's model.pt: predictions.parquet's rows name it too


@dataclass(frozen=True)
class PredictionRow:
    """One test image's prediction (written as columns: evaluation yields whole arrays)."""

    model: str
    image_index: int
    label: int
    coarse_label: int | None
    pred: int
    top5: list[int]
    prob: float
    correct: bool
    weights_sha256: str  # the checkpoint that predicted it (accuracy.parquet's)


TRIALS = arrow_schema(TrialRow)
EPOCHS = arrow_schema(EpochRow)
ACCURACY = arrow_schema(AccuracyRow)
PREDICTIONS = arrow_schema(PredictionRow)
