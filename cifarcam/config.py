"""Experiment configuration: frozen dataclasses read from YAML, validated before any cluster time.

Every error is one line naming the key and what was expected, e.g.
``search.grid.optimzer: unknown key; did you mean 'optimizer'?``.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# ConfigError lives in the leaf errors module, so that every module may raise it; it is imported
# from here too, for now.
from cifarcam.errors import ConfigError, did_you_mean
from cifarcam.typed_yaml import check_type, from_dict, load_yaml, unknown_key_error

DATA_SOURCES = ("synthetic", "cifar10", "cifar100", "parquet")
STEMS = ("cifar", "imagenet")
SCHEDULERS = ("cosine", "onecycle", "multistep", "none")
EARLY_STOPPING = ("asha", "none")
# The epoch metrics a search may rank trials by, and which way is better.
METRICS = {"val_top1": "max", "val_top5": "max", "val_loss": "min", "train_loss": "min"}
# A run's folder is results/<name> (and cluster.slurm --array's <out>/<name>): one plain name.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class SyntheticConfig:
    num_classes: int = 10
    train_size: int = 5000
    test_size: int = 1000
    image_size: int = 32
    min_object_size: int = 9  # each object's side is drawn from [min, max] pixels
    max_object_size: int = 14
    # "random": the class is the shape alone. "per_class": one colour per class, which a model
    # learns in seconds, for plumbing tests only: it flatters every map (never quote its figures).
    colours: str = "random"


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"
    path: str | None = None  # folder or archive; None: the cache (and a download where allowed)
    cache_dir: str = "~/.cache/cifarcam"
    download: bool = True
    val_fraction: float = 0.1
    seed: int = 0
    limit_train: int | None = None  # stratified subsample of the train split (demos, tests)
    limit_test: int | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class TrainConfig:
    """One trial's hyperparameters. The search space overrides any of these by name."""

    model: str = "resnet18"
    stem: str = "cifar"
    input_size: int = 32
    pretrained: bool | str = False  # True: timm's ImageNet weights; a str: a local weights file
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    scheduler: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = (0.5, 0.75)  # multistep: fractions of the run
    epochs: int = 40
    batch_size: int = 64  # per worker
    label_smoothing: float = 0.0
    grad_clip_norm: float | None = None
    bf16: bool = True  # autocast on CUDA; ignored on CPU
    channels_last: bool = True
    compile: bool = False
    seed: int = 0


@dataclass(frozen=True)
class SearchConfig:
    grid: dict[str, list] = field(default_factory=dict)  # every combination is tried
    sample: dict[str, dict] = field(default_factory=dict)  # {"lr": {"loguniform": [1e-4, 1e-2]}}
    num_samples: int = 1  # repeats of the grid, each with fresh samples
    metric: str = "val_top1"
    mode: str = "max"
    early_stopping: str = "asha"
    grace_period: int = 1  # epochs before ASHA may stop a trial
    reduction_factor: int = 2
    keep_checkpoints: int = 2
    max_concurrent_trials: int | None = None  # None: as many as the cluster's resources fit
    worker_restarts: int = 2  # Ray Train FailureConfig.max_failures: a dead worker or its node
    trial_restarts: int = 2  # Ray Tune FailureConfig.max_failures: a dead trial driver


@dataclass(frozen=True)
class ScalingConfig:
    workers_per_trial: int = 1
    use_gpu: bool | None = None  # None: use GPUs when the cluster has any
    gpus_per_worker: float = 1.0  # fractions let small trials share a GPU
    cpus_per_worker: float = 1.0
    # How long a trial may wait for its workers to be placed before the search ends with a line
    # that says what it waits for (cifarcam.search.placement_watch); --resume continues it.
    start_timeout_s: float = 600.0


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SAMPLERS = ("uniform", "loguniform", "choice", "randint")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_train(cfg: TrainConfig, where: str = "train") -> None:
    """Value checks for one trial's hyperparameters. The model and optimizer names are checked by
    the training stage, which owns their registries (``cifarcam.training.load_experiment``)."""
    _require(cfg.lr > 0, f"{where}.lr: must be > 0, got {cfg.lr}")
    _require(cfg.weight_decay >= 0, f"{where}.weight_decay: must be >= 0, got {cfg.weight_decay}")
    _require(cfg.epochs > 0, f"{where}.epochs: must be > 0, got {cfg.epochs}")
    _require(cfg.batch_size > 0, f"{where}.batch_size: must be > 0, got {cfg.batch_size}")
    _require(cfg.input_size >= 16, f"{where}.input_size: must be >= 16 pixels, got {cfg.input_size}")
    _require(cfg.stem in STEMS, f"{where}.stem: expected one of {', '.join(STEMS)}, got {cfg.stem!r}")
    _require(cfg.scheduler in SCHEDULERS, f"{where}.scheduler: expected one of {', '.join(SCHEDULERS)}, got {cfg.scheduler!r}")
    _require(0 <= cfg.warmup_epochs < cfg.epochs, f"{where}.warmup_epochs: must be in [0, epochs), got {cfg.warmup_epochs}")
    _require(0 <= cfg.label_smoothing < 1, f"{where}.label_smoothing: must be in [0, 1), got {cfg.label_smoothing}")
    _require(0 <= cfg.momentum < 1, f"{where}.momentum: must be in [0, 1), got {cfg.momentum}")
    clip = cfg.grad_clip_norm
    _require(clip is None or clip > 0, f"{where}.grad_clip_norm: must be > 0 (or null: no clipping), got {clip}")


def space_values(cfg: SearchConfig) -> dict[str, list]:
    """Every value the grid names, and each sampler's bounds, by hyperparameter."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, list] = {}
    for key, options in cfg.grid.items():
        if key not in train_fields:
            raise unknown_key_error(key, sorted(train_fields), f"search.grid.{key}")
        _require(isinstance(options, list) and options, f"search.grid.{key}: expected a non-empty list")
        values[key] = options
    for key, spec in cfg.sample.items():
        if key not in train_fields:
            raise unknown_key_error(key, sorted(train_fields), f"search.sample.{key}")
        _require(
            isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SAMPLERS,
            f"search.sample.{key}: expected one of {{{', '.join(SAMPLERS)}: [...]}}, got {spec!r}",
        )
        ((kind, args),) = spec.items()
        _require(isinstance(args, list) and args, f"search.sample.{key}.{kind}: expected a list of bounds or options")
        if kind in ("uniform", "loguniform", "randint"):
            _require(len(args) == 2 and args[0] < args[1], f"search.sample.{key}.{kind}: expected [low, high] with low < high")
        if kind == "loguniform":
            _require(args[0] > 0, f"search.sample.{key}.loguniform: bounds must be > 0, got {args}")
        if kind in ("uniform", "loguniform"):
            _require(
                typing.get_type_hints(TrainConfig)[key] is not int,
                f"search.sample.{key}.{kind}: {key} is a whole number, and {kind} draws fractions; use randint or choice",
            )
        _require(key not in values, f"search.sample.{key}: already in search.grid; name it in one place")
        values[key] = args
    return values


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check everything that can be checked without a cluster; raise ConfigError naming the input."""
    d, s, sc = cfg.data, cfg.search, cfg.scaling
    _require(d.source in DATA_SOURCES, f"data.source: expected one of {', '.join(DATA_SOURCES)}, got {d.source!r}")
    _require(d.synthetic.colours in ("random", "per_class"), f"data.synthetic.colours: expected random or per_class, got {d.synthetic.colours!r}")
    _require(0 < d.val_fraction < 1, f"data.val_fraction: must be in (0, 1), got {d.val_fraction}")
    for key in ("limit_train", "limit_test"):
        n = getattr(d, key)
        _require(n is None or n > 0, f"data.{key}: must be > 0, got {n}")
    _require(s.num_samples > 0, f"search.num_samples: must be > 0, got {s.num_samples}")
    _require(s.mode in ("max", "min"), f"search.mode: expected max or min, got {s.mode!r}")
    if s.metric not in METRICS:
        raise ConfigError(f"search.metric: unknown metric {s.metric!r}; " + (did_you_mean(s.metric, METRICS) or f"expected one of {', '.join(METRICS)}"))
    better = METRICS[s.metric]
    _require(s.mode == better, f"search.mode: {s.metric} is better when {'higher' if better == 'max' else 'lower'}; set mode: {better}, got {s.mode}")
    _require(
        s.early_stopping in EARLY_STOPPING,
        f"search.early_stopping: expected one of {', '.join(EARLY_STOPPING)}, got {s.early_stopping!r}",
    )
    _require(s.keep_checkpoints > 0, f"search.keep_checkpoints: must be > 0, got {s.keep_checkpoints}")
    for key in ("worker_restarts", "trial_restarts"):
        _require(getattr(s, key) >= 0, f"search.{key}: must be >= 0, got {getattr(s, key)}")
    _require(sc.workers_per_trial > 0, f"scaling.workers_per_trial: must be > 0, got {sc.workers_per_trial}")
    _require(sc.cpus_per_worker > 0, f"scaling.cpus_per_worker: must be > 0, got {sc.cpus_per_worker}")
    _require(sc.gpus_per_worker > 0, f"scaling.gpus_per_worker: must be > 0, got {sc.gpus_per_worker}")
    _require(sc.start_timeout_s > 0, f"scaling.start_timeout_s: must be > 0 seconds, got {sc.start_timeout_s:g}")
    # Ray may place two ranks of one trial on the same GPU when each holds a fraction, and NCCL
    # refuses a process group with a duplicate GPU. Fractions are for single-worker trials.
    _require(
        sc.use_gpu is False or sc.workers_per_trial == 1 or float(sc.gpus_per_worker).is_integer(),
        f"scaling.gpus_per_worker: {sc.gpus_per_worker:g} is a fraction of a GPU, but a trial has {sc.workers_per_trial} "
        "DDP workers and NCCL needs a GPU of its own per worker; use a whole number, or workers_per_trial: 1",
    )
    validate_train(cfg.train)
    if s.early_stopping == "asha":
        _require(s.reduction_factor >= 2, f"search.reduction_factor: must be >= 2 (ASHA keeps 1 in reduction_factor trials), got {s.reduction_factor}")
        _require(
            1 <= s.grace_period <= cfg.train.epochs,
            f"search.grace_period: must be in [1, train.epochs = {cfg.train.epochs}], got {s.grace_period}",
        )
    # Each value the search may pick must itself be valid: check every grid value and bound.
    for key, options in space_values(s).items():
        for option in options:
            try:
                value = check_type(option, typing.get_type_hints(TrainConfig)[key], f"search.{key}")
                validate_train(dataclasses.replace(cfg.train, **{key: value}), where="search")
            except ConfigError as err:
                raise ConfigError(str(err).replace("search.", f"search.{key}=", 1)) from None
    return cfg


def check_run_name(cfg: ExperimentConfig) -> None:
    """Before a search: a run whose folder is results/<name> needs a plain name. (Not on reading a
    finished run's config: a run named otherwise before this check existed is still reported.)"""
    _require(NAME.fullmatch(cfg.name) is not None, f"name: expected a plain folder name (letters, digits, '.', '_', '-'), got {cfg.name!r}")


def searched_models(cfg: ExperimentConfig) -> list[str]:
    """Every model family a trial of this search may train."""
    return sorted({cfg.train.model, *space_values(cfg.search).get("model", [])})


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read, type-check and validate a YAML experiment file."""
    raw = load_yaml(Path(path)) or {}
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return validate(from_dict(ExperimentConfig, raw, ""))


def dump_config(cfg: ExperimentConfig) -> str:
    def plain(obj: Any) -> Any:
        if isinstance(obj, tuple):
            return [plain(v) for v in obj]
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        return obj

    return yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False)


def trial_config(base: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """The trial's hyperparameters: ``base`` with the search's picks (type-coerced) applied."""
    hints = typing.get_type_hints(TrainConfig)
    picked = {k: check_type(v, hints[k], f"trial.{k}") for k, v in overrides.items() if k in hints}
    return dataclasses.replace(base, **picked)


def check_batch_fits(cfg: ExperimentConfig, train_images: int) -> None:
    """Every batch size the search may use must fit each worker's share of the training split."""
    sizes = [cfg.train.batch_size] + [int(b) for b in cfg.search.grid.get("batch_size", [])]
    workers = cfg.scaling.workers_per_trial
    for size in sizes:
        if size > train_images // workers:
            share = f"{train_images} images" + (f" / {workers} workers" if workers > 1 else "")
            raise ConfigError(f"train.batch_size: {size} is larger than the training split ({share})")
