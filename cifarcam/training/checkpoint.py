"""Checkpoint folders: ``model.pt`` (weights), ``train_state.pt`` (optimizer, scheduler, epoch)
and ``meta.json`` (everything needed to rebuild the model without the search's config)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifarcam.errors import DataError
from cifarcam.training.models import ModelSpec, build_model

MODEL_FILE, STATE_FILE, META_FILE = "model.pt", "train_state.pt", "meta.json"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    spec: ModelSpec,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    epoch: int = 0,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(unwrap(model).state_dict(), folder / MODEL_FILE)
    if optimizer is not None and scheduler is not None:
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch}, folder / STATE_FILE)
    (folder / META_FILE).write_text(json.dumps({"model": spec.to_dict(), "epoch": epoch, **meta}, indent=2, default=str))
    return folder


def weights_sha256(folder: str | Path) -> str:
    """The identity of a checkpoint's weights: what the search's tables and the CAM markers record."""
    from cifarcam.provenance import sha256_of

    return sha256_of(Path(folder) / MODEL_FILE)


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise DataError(f"{folder}: not a cifarcam checkpoint (no {META_FILE})")
    try:
        meta = json.loads(path.read_text())
    except ValueError as err:  # cut short or edited by hand
        raise DataError(f"{path}: not JSON ({err})") from None
    model = meta.get("model") if isinstance(meta, dict) else None
    # Every reader rebuilds the model from these (ModelSpec): name what is missing, not a KeyError.
    for key, kind, what in (("family", str, "a string"), ("num_classes", int, "an integer")):
        if not isinstance(model, dict) or not isinstance(model.get(key), kind):
            raise DataError(f"{path}: model.{key} missing or not {what}; not a cifarcam checkpoint's meta.json")
    unknown = set(model) - {f.name for f in dataclasses.fields(ModelSpec)}
    if unknown:
        raise DataError(f"{path}: model has unknown keys {sorted(unknown)}; written by another version of cifarcam?")
    return meta


def load_weights(model: nn.Module, folder: str | Path, spec: ModelSpec) -> None:
    """Load ``folder``'s weights into ``model`` (safe loader: tensors only, no pickled code)."""
    saved = ModelSpec(**read_meta(folder)["model"])
    if saved != spec:
        raise DataError(f"{folder}: checkpoint is for {saved}, expected {spec}")
    state = torch.load(Path(folder) / MODEL_FILE, map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(state)


def check_weights(folder: str | Path) -> None:
    """Fail early, in one line, when a checkpoint's weights do not fit the model its meta.json names."""
    import pickle

    spec = ModelSpec(**read_meta(folder)["model"])
    try:
        load_weights(build_model(spec), folder, spec)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        first = str(err).strip().splitlines()[0][:300]
        raise DataError(f"{folder}: its weights do not fit the {spec.family} model its {META_FILE} names ({first})") from None


def load_train_state(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def load_model(folder: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a checkpoint's model from its meta.json alone, in eval mode on ``device``."""
    meta = read_meta(folder)
    spec = ModelSpec(**meta["model"])
    model = build_model(spec)
    load_weights(model, folder, spec)
    return model.to(device).eval(), meta
