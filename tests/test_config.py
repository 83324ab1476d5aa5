import subprocess
import sys
from pathlib import Path

import pytest

from cifarcam.config import TrainConfig, load_config, trial_config
from cifarcam.errors import ConfigError
from cifarcam.training import load_experiment

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["demo", "paper"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.name == name


def test_paper_config_is_the_papers_study():
    cfg = load_config(ROOT / "configs" / "paper.yaml")
    assert len(cfg.search.grid["model"]) == 7 and cfg.search.grid["optimizer"] == ["adamw", "sgd"]
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.data.val_fraction, cfg.data.source) == (40, 64, 0.1, "cifar100")


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {optimzer: adamw}", r"^train\.optimzer: unknown key; did you mean 'optimizer'\?$"),
        ("search: {grid: {modle: [resnet18]}}", r"^search\.grid\.modle: unknown key; did you mean 'model'\?$"),
        ("train: {lr: 0}", r"^train\.lr: must be > 0, got 0\.0$"),
        ("train: {lr: -1}", r"^train\.lr: must be > 0, got -1\.0$"),
        ("train: {epochs: 0}", r"^train\.epochs: must be > 0, got 0$"),
        ("train: {batch_size: -8}", r"^train\.batch_size: must be > 0, got -8$"),
        ("train: {model: resnet5}", r"^train\.model: unknown model 'resnet5'; did you mean 'resnet50'\?$"),
        ("train: {optimizer: adamx}", r"^train\.optimizer: unknown optimizer 'adamx'; did you mean 'adamax'\?$"),
        ("train: {scheduler: cosin}", r"^train\.scheduler: expected one of cosine, onecycle, multistep, none, got 'cosin'$"),
        ("search: {grid: {model: [resnet18, resnet1O1]}}", r"^search\.model=model: unknown model 'resnet1O1'; did you mean 'resnet101'\?$"),
        ("search: {grid: {lr: [0.1, -0.1]}}", r"^search\.lr=lr: must be > 0, got -0\.1$"),
        ("search: {sample: {lr: {loguniform: [0, 1]}}}", r"^search\.sample\.lr\.loguniform: bounds must be > 0"),
        ("train: {epochs: ten}", r"^train\.epochs: expected an integer, got 'ten'$"),
        ("data: {source: imagenet}", r"^data\.source: expected one of synthetic, cifar10, cifar100, parquet, got 'imagenet'$"),
        ("train: [1, 2", r"cfg\.yaml: YAML syntax error at line 1"),
        ("search: {reduction_factor: 1}", r"^search\.reduction_factor: must be >= 2 \(ASHA keeps 1 in reduction_factor trials\), got 1$"),
        ("train: {epochs: 3}\nsearch: {grace_period: 5}", r"^search\.grace_period: must be in \[1, train\.epochs = 3\], got 5$"),
        ("search: {metric: val_acc}", r"^search\.metric: unknown metric 'val_acc'; expected one of val_top1, val_top5, val_loss, train_loss$"),
        ("search: {metric: val_loss}", r"^search\.mode: val_loss is better when lower; set mode: min, got max$"),
        (
            "search: {sample: {epochs: {uniform: [2, 4]}}}",
            r"^search\.sample\.epochs\.uniform: epochs is a whole number, and uniform draws fractions; use randint or choice$",
        ),
        ("name: ../escaped", r"^name: expected a plain folder name \(letters, digits, '\.', '_', '-'\), got '\.\./escaped'$"),
        ("train: {grad_clip_norm: -1}", r"^train\.grad_clip_norm: must be > 0 \(or null: no clipping\), got -1\.0$"),
        ("train: {momentum: 1.5}", r"^train\.momentum: must be in \[0, 1\), got 1\.5$"),
    ],
)
def test_bad_configs_give_one_line_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_experiment(_write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_reading_a_config_imports_no_torch():
    """The report reads a run's config.yaml; only the names (models, optimizers) need the training
    stage, which load_experiment adds."""
    probe = "import sys; from cifarcam.config import load_config; load_config('configs/paper.yaml'); print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_trial_picks_override_and_are_type_checked():
    cfg = trial_config(TrainConfig(), {"lr": 1, "model": "resnet34"})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.model == "resnet34"


def test_fractional_gpus_are_for_single_worker_trials(tmp_path):
    """Two ranks of one trial on one GPU would make NCCL refuse the process group."""
    with pytest.raises(ConfigError, match=r"^scaling\.gpus_per_worker: 0\.25 is a fraction of a GPU, but a trial has 4 DDP workers"):
        load_config(_write(tmp_path, "scaling: {workers_per_trial: 4, gpus_per_worker: 0.25}"))
    assert load_config(_write(tmp_path, "scaling: {workers_per_trial: 1, gpus_per_worker: 0.25}")).scaling.gpus_per_worker == 0.25
    assert load_config(_write(tmp_path, "scaling: {workers_per_trial: 4, gpus_per_worker: 2}")).scaling.workers_per_trial == 4
    assert load_config(_write(tmp_path, "scaling: {workers_per_trial: 4, gpus_per_worker: 0.5, use_gpu: false}")).scaling.use_gpu is False


def test_exponent_floats_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML's default) reads 1e-3 as a string; people write learning rates that way."""
    cfg = load_config(_write(tmp_path, "train: {lr: 1e-3, weight_decay: 5E-4, epochs: 3}\nsearch: {sample: {lr: {loguniform: [1e-4, 1.0e-2]}}}"))
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.epochs) == (0.001, 0.0005, 3)
    assert cfg.search.sample["lr"]["loguniform"] == [0.0001, 0.01]
    assert load_config(_write(tmp_path, "name: 1e3x")).name == "1e3x"
