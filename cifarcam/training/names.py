"""The names a config may use that only the training stage knows: model families (its model zoo)
and optimizers (timm's factory). ``cifarcam.config`` checks values without importing torch, so
that the report reads a run's config without it; jobs that train or explain load theirs here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cifarcam.config import ExperimentConfig, check_run_name, load_config, space_values
from cifarcam.training.models import check_model_name
from cifarcam.training.optim import check_optimizer_name

_CHECKS = {"model": check_model_name, "optimizer": check_optimizer_name}


def check_names(cfg: ExperimentConfig) -> None:
    """Every model and optimizer the config trains or its search may pick is a known one."""
    for key, check in _CHECKS.items():
        check(getattr(cfg.train, key), f"train.{key}")
        for option in space_values(cfg.search).get(key, []):
            check(option, f"search.{key}={key}")


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """``load_config``, the run's name, and ``check_names``: a config a search can start from."""
    cfg = load_config(path, overrides)
    check_run_name(cfg)
    check_names(cfg)
    return cfg
