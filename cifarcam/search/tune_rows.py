"""From Tune's results to the search's table rows (``TrialRow``, ``EpochRow``).

Tune's per-trial log is incomplete in two ways this module repairs: a trial resumed after a crash
logs afresh from the epoch it restarted at (the earlier epochs come back from the history its
checkpoint carries), and a trial whose driver died after its last epoch logged nothing at all
(its epochs come back from its checkpoints alone).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, TypeVar

from cifarcam.config import ExperimentConfig, trial_config
from cifarcam.errors import DataError
from cifarcam.search_tables import EpochRow, TrialRow
from cifarcam.training import META_FILE, read_meta

Row = TypeVar("Row")
_EPOCH_METRICS = [f.name for f in dataclasses.fields(EpochRow) if f.name not in ("trial_id", "model", "checkpoint_path")]


def best(items: list[Row], key: str, mode: str) -> Row | None:
    """The item (a dict or a row) with the best ``key`` under ``mode`` ('max' or 'min'), or None
    when empty. Ties go to the later epoch, as Ray Train breaks them when it decides which
    checkpoints to keep."""
    if not items:
        return None
    sign = 1 if mode == "max" else -1
    return max(items, key=lambda item: (sign * _get(item, key), _get(item, "epoch", 0)))


def _get(item: Any, key: str, default: Any = None) -> Any:
    return item.get(key, default) if isinstance(item, dict) else getattr(item, key, default)


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def _surviving(path: str | None) -> str | None:
    """A local checkpoint path if Train kept it (it keeps only the best k); remote URIs as given."""
    if path is None or "://" in path:
        return path
    return path if (Path(path) / META_FILE).is_file() else None


def _with_earlier_epochs(rows: list[dict]) -> list[dict]:
    """A resumed trial's epochs before the restart, from its newest surviving checkpoint's history."""
    if not rows or min(r["epoch"] for r in rows) <= 1:
        return rows
    seen = {r["epoch"] for r in rows}
    for row in sorted(rows, key=lambda r: -r["epoch"]):
        path = _surviving(row.get("checkpoint_path"))
        if path and "://" not in path:
            earlier = [h | {"checkpoint_path": None} for h in read_meta(path).get("history", []) if h["epoch"] not in seen]
            return sorted(earlier + rows, key=lambda r: r["epoch"])
    return rows


def _readable_meta(folder: Path) -> dict | None:
    try:
        return read_meta(folder)
    except DataError:
        return None


def epochs_from_checkpoints(trial_dir: Path) -> list[dict]:
    """Every epoch a trial's newest checkpoint in ``trial_dir`` (its Train run) records: for a trial
    that reported nothing to Tune (its driver died after the last epoch, and the restarted driver
    found no epoch left to run), and for ASHA's rungs after a restart. A checkpoint cut short
    (killed while Train wrote it) is passed over: the one before it stands."""
    metas = {f: meta for f in trial_dir.glob("checkpoint_*") if (meta := _readable_meta(f))}
    folders = {meta["epoch"]: f for f, meta in metas.items() if meta.get("epoch")}
    if not folders:
        return []
    history = metas[folders[max(folders)]].get("history", [])
    return [h | {"checkpoint_path": str(folders[h["epoch"]]) if h["epoch"] in folders else None} for h in history]


def _failure(result: Any, rows: list[dict]) -> str | None:
    """Why a trial failed: its exception's last line, or the epoch its loss stopped being finite."""
    if result.error is not None:
        return str(result.error).strip().splitlines()[-1][:500]
    if rows and rows[-1].get("diverged"):
        return f"diverged: training loss {rows[-1].get('train_loss')} at epoch {int(rows[-1]['epoch'])}"
    return None


def trial_rows(results: Any, cfg: ExperimentConfig, train_dir: Path) -> tuple[list[TrialRow], list[EpochRow]]:
    """The rows of a Tune ``ResultGrid`` (or any iterable of ``ray.tune.Result``); ``train_dir``
    holds each trial's Train run (``trial_<id>``), read when Tune holds no epoch of a trial."""
    trials, epochs = [], []
    searched = set(cfg.search.grid) | set(cfg.search.sample)
    metric, mode = cfg.search.metric, cfg.search.mode
    for result in results:
        picks = {k: v for k, v in (result.config or {}).items() if k in searched}
        tcfg = trial_config(cfg.train, picks)
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix("trial_")
        frame = result.metrics_dataframe
        rows = _with_earlier_epochs([] if frame is None or frame.empty else frame.to_dict("records"))
        rows = rows or epochs_from_checkpoints(train_dir / f"trial_{trial_id}")
        epochs += [
            EpochRow(trial_id=trial_id, model=tcfg.model, checkpoint_path=_surviving(row.get("checkpoint_path")), **{k: row.get(k) for k in _EPOCH_METRICS})
            for row in rows
        ]
        diverged = bool(rows and rows[-1].get("diverged"))
        done = int(rows[-1]["epoch"]) if rows else 0
        status = "error" if result.error else "diverged" if diverged else "completed" if done >= tcfg.epochs else "stopped_early"
        # A NaN metric on an epoch that was not flagged diverged would scramble the ranking.
        scored = [r for r in rows if _finite(r.get(metric)) and not r.get("diverged")]
        top = best(scored, metric, mode)
        # Train keeps the best-k checkpoints by the same metric, so the best epoch's survives.
        top_kept = best([r for r in scored if r.get("checkpoint_path")], metric, mode)
        trials.append(
            TrialRow(
                trial_id=trial_id,
                model=tcfg.model,
                optimizer=tcfg.optimizer,
                scheduler=tcfg.scheduler,
                lr=tcfg.lr,
                weight_decay=tcfg.weight_decay,
                batch_size=tcfg.batch_size,
                hyperparameters=json.dumps(picks, sort_keys=True, default=str),
                status=status,
                error=_failure(result, rows),
                epochs_run=done,
                epochs_planned=tcfg.epochs,
                stopped_by_asha=status == "stopped_early" and cfg.search.early_stopping == "asha",
                metric=metric,
                best_metric=float(top[metric]) if top else None,
                best_val_top1=top["val_top1"] if top else None,
                best_epoch=int(top["epoch"]) if top else None,
                best_checkpoint=top_kept["checkpoint_path"] if top_kept else None,
                time_s=float(sum(r.get("epoch_time_s") or 0 for r in rows)),
            )
        )
    return trials, epochs
