"""What a search will cost, before it runs: resources per trial, concurrency, the epochs ASHA is
expected to leave, and device-hours. No Ray and no data loading here, so `--dry-run` is instant
and the same arithmetic sizes the real run."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.parquet as pq

from cifarcam.config import ExperimentConfig, SearchConfig, dump_config, load_config
from cifarcam.errors import ConfigError, UserError
from cifarcam.run_layout import RunLayout

# Training-split sizes of the datasets whose files a dry run need not read.
KNOWN_TRAIN_SIZES = {"cifar10": 50_000, "cifar100": 50_000}


@dataclass(frozen=True)
class TrialResources:
    use_gpu: bool
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    max_concurrent_trials: int
    note: str | None = None  # why ``workers`` is not scaling.workers_per_trial, for the terminal


def plan_resources(cfg: ExperimentConfig, cluster: dict[str, float]) -> TrialResources:
    """How many trials fit the cluster at once; fail fast when even one does not.

    The one-GPU rule: when ``scaling.use_gpu`` is unset (use GPUs if there are any) and the cluster
    has GPUs, but fewer than one trial's workers need, a trial runs as many workers as the GPUs
    hold, each still on whole GPUs, and ``note`` says so. So a config written for two GPUs (the
    demo) runs unchanged on a one-GPU workstation, never as two NCCL ranks on one GPU. Each worker
    keeps its ``batch_size``: the global batch shrinks with the workers, as in any DDP job that runs
    on fewer devices. ``use_gpu: true`` insists on the configured workers (and fails fast here)."""
    sc = cfg.scaling
    gpus = cluster.get("GPU", 0.0)
    use_gpu = gpus > 0 if sc.use_gpu is None else sc.use_gpu
    workers, note = sc.workers_per_trial, None
    gpu_fit = math.floor(gpus / sc.gpus_per_worker + 1e-9)
    if use_gpu and sc.use_gpu is None and 1 <= gpu_fit < workers:
        note = (
            f"scaling: the cluster has {gpus:g} GPU{'s' if gpus != 1 else ''}, fewer than a trial's {workers} workers x "
            f"{sc.gpus_per_worker:g} GPU, so each trial runs {gpu_fit} DDP worker{'s' if gpu_fit != 1 else ''} "
            f"instead (each keeps its batch_size, so the global batch is {gpu_fit}/{workers} of the configured one); "
            f"set scaling.use_gpu: true to require {workers}"
        )
        workers = gpu_fit
    cpu_need = workers * sc.cpus_per_worker
    fits = [math.floor(cluster.get("CPU", 0.0) / cpu_need + 1e-9)]
    if use_gpu:
        fits.append(math.floor(gpus / (workers * sc.gpus_per_worker) + 1e-9))
    if min(fits) < 1:
        have = f"{cluster.get('CPU', 0):g} CPUs and {gpus:g} GPUs"
        need = f"{cpu_need:g} CPUs" + (f" and {workers * sc.gpus_per_worker:g} GPUs" if use_gpu else "")
        raise ConfigError(f"scaling: one trial needs {need} ({workers} workers) but the cluster has {have}")
    concurrent = min(fits)
    if cfg.search.max_concurrent_trials:
        concurrent = min(concurrent, cfg.search.max_concurrent_trials)
    return TrialResources(use_gpu, workers, sc.cpus_per_worker, sc.gpus_per_worker if use_gpu else 0.0, concurrent, note)


def count_trials(search: SearchConfig) -> int:
    return math.prod(len(v) for v in search.grid.values()) * search.num_samples


def trial_descriptions(search: SearchConfig) -> list[str]:
    """One line per trial: its grid values, then each sampled hyperparameter's distribution."""
    keys = list(search.grid)
    sampled = ", ".join(f"{key} ~ {kind}{tuple(args)}" for key, spec in search.sample.items() for kind, args in spec.items())
    lines = []
    for _ in range(search.num_samples):
        for values in itertools.product(*(search.grid[k] for k in keys)):
            picked = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
            lines.append(", ".join(part for part in (picked, sampled) if part) or "the train section's values")
    return lines


def asha_rungs(max_t: int, grace_period: int, reduction_factor: int) -> list[int]:
    """The epochs at which ASHA compares trials, as Ray's AsyncHyperBand places them (below max_t)."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [r for r in (grace_period * reduction_factor**k for k in range(count)) if r < max_t]


def expected_epochs_per_trial(cfg: ExperimentConfig) -> float:
    """Epochs a trial is expected to run: at each rung ASHA keeps the best 1/reduction_factor.

    An estimate: the first trials to reach an empty rung always go on, so a small search runs
    somewhat more than this."""
    s, epochs = cfg.search, cfg.train.epochs
    if s.early_stopping == "none":
        return float(epochs)
    rungs = asha_rungs(epochs, s.grace_period, s.reduction_factor)
    if not rungs:
        return float(epochs)
    total, reached = float(rungs[0]), 1.0
    for start, stop in zip(rungs, rungs[1:] + [epochs]):
        reached /= s.reduction_factor
        total += (stop - start) * reached
    return total


def train_images(cfg: ExperimentConfig) -> int | None:
    """Training-split size (after the validation split), without reading images where it is known."""
    d = cfg.data
    if d.source == "synthetic":
        full = d.synthetic.train_size
    elif d.source in KNOWN_TRAIN_SIZES:
        full = KNOWN_TRAIN_SIZES[d.source]
    elif d.path:
        path = Path(d.path).expanduser() / "train.parquet"
        if not path.is_file():
            return None
        full = pq.ParquetFile(path).metadata.num_rows
    else:
        return None
    if d.limit_train:
        full = min(full, d.limit_train)
    return round(full * (1 - d.val_fraction))


@dataclass(frozen=True)
class SearchPlan:
    trials: list[str]
    resources: TrialResources | None  # None: one trial does not fit the cluster (``misfit`` says why)
    misfit: str | None
    cluster: dict[str, float]
    epochs_per_trial: float
    train_images: int | None
    images_per_s: float | None  # one trial's training throughput, as benchmarks/gpu_check.py measures it

    @property
    def total_epochs(self) -> float:
        return self.epochs_per_trial * len(self.trials)

    @property
    def trial_hours(self) -> float | None:
        """Hours of training if every trial ran at ``images_per_s`` (validation passes excluded)."""
        if not (self.images_per_s and self.train_images):
            return None
        return self.total_epochs * self.train_images / self.images_per_s / 3600

    def lines(self) -> list[str]:
        r = self.resources
        out = [f"{len(self.trials)} trials:"] + [f"  {i + 1:3d}. {t}" for i, t in enumerate(self.trials)]
        out += [
            f"cluster: {self.cluster.get('CPU', 0):g} CPUs, {self.cluster.get('GPU', 0):g} GPUs",
            f"epochs: {self.epochs_per_trial:.1f} per trial expected after early stopping, {self.total_epochs:.0f} in all",
        ]
        if r is None:
            return out + [f"per trial: does not fit this cluster ({self.misfit})"]
        per_trial = f"{r.workers} worker(s) x ({r.cpus_per_worker:g} CPU" + (f" + {r.gpus_per_worker:g} GPU" if r.use_gpu else "") + ")"
        out.insert(-1, f"per trial: {per_trial}; {r.max_concurrent_trials} trial(s) at once")
        if r.note:
            out.insert(-1, r.note)
        if self.trial_hours is not None:
            unit = "GPU" if r.use_gpu else "CPU"
            held = r.workers * (r.gpus_per_worker if r.use_gpu else r.cpus_per_worker)
            out += [
                f"at {self.images_per_s:g} images/s per trial on {self.train_images} training images: {self.trial_hours:.2f} trial-hours, "
                f"{self.trial_hours * held:.2f} {unit}-hours held, about {self.trial_hours / r.max_concurrent_trials:.2f} h of wall clock "
                "(assumes each trial keeps that speed while packed; gpu_check's packing rows show the combined rate)"
            ]
        return out


def plan_search(cfg: ExperimentConfig, cluster: dict[str, float], images_per_s: float | None = None) -> SearchPlan:
    """The plan on ``cluster``; a trial too large for it is reported in the plan, not raised."""
    try:
        resources, misfit = plan_resources(cfg, cluster), None
    except ConfigError as err:
        resources, misfit = None, str(err)
    return SearchPlan(
        trials=trial_descriptions(cfg.search),
        resources=resources,
        misfit=misfit,
        cluster=cluster,
        epochs_per_trial=expected_epochs_per_trial(cfg),
        train_images=train_images(cfg),
        images_per_s=images_per_s,
    )


def check_resumable(cfg: ExperimentConfig, out_dir: Path, resume: bool, must_exist: bool = False) -> None:
    """A run folder holding this search is continued only on --resume, and only with its own config.
    ``must_exist`` (the user's --resume): a folder holding no such search is a mistyped --out, not
    a fresh start; --resume-if-started, what a requeued attempt passes, starts it instead."""
    saved = RunLayout(out_dir).config
    if not (RunLayout(out_dir).tune / cfg.name).exists():
        if must_exist:
            raise UserError(f"--resume: --out {out_dir} holds no search {cfg.name!r} to continue; check --out, or leave out --resume to start one")
        return
    if not resume:
        raise UserError(f"--out {out_dir}: already holds search {cfg.name!r}; pass --resume to continue it, or choose another --out")
    if saved.is_file() and saved.read_text() != dump_config(_with_saved_start_timeout(cfg, saved)):
        raise ConfigError(
            f"--resume {out_dir}: the config differs from the run's config.yaml; resume with the same config (only scaling.start_timeout_s may change)"
        )


def _with_saved_start_timeout(cfg: ExperimentConfig, saved: Path) -> ExperimentConfig:
    """``cfg`` with the saved run's ``scaling.start_timeout_s``: the one setting a resume may change.
    A search stopped because its workers could not be placed in time is resumed by a user who may
    know that placement is slow here (an autoscaler adding nodes), and Tune's restored trials take
    the new value; every other setting defines the search being continued."""
    try:
        timeout = load_config(saved).scaling.start_timeout_s
    except UserError:
        return cfg  # the saved text differs anyway: the caller's comparison says so
    return replace(cfg, scaling=replace(cfg.scaling, start_timeout_s=timeout))
