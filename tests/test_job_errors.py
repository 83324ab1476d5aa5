"""Bad input, one case each: a one-line error naming the input and what was expected, exit status 2,
before any trial starts (before Ray starts, where the mistake is knowable without a cluster), and an
existing run folder left exactly as it was. Cases that need no cluster run the job's entry point in
this process (an interpreter start per case cost minutes); the rest run the job as a subprocess."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import ROOT, demo_run_cam_options, in_process, run_job, write_config

OK_DATA = "data: {source: synthetic, synthetic: {num_classes: 4, train_size: 200, test_size: 40, colours: per_class}}\n"


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


@pytest.fixture
def existing_run(tmp_path: Path) -> Path:
    """A run folder from an earlier search, which no failed command may touch."""
    run = tmp_path / "existing"
    (run / "cams").mkdir(parents=True)
    (run / ".lock").touch()  # the run's lock file, which every search leaves (taking it changes nothing)
    (run / "config.yaml").write_text("name: earlier\n")
    pq.write_table(pa.table({"trial_id": ["t1"], "val_top1": [0.5]}), run / "trials.parquet")
    return run


def _fails_cleanly(proc, run: Path, before: dict, expected: str) -> str:
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    # knowable without a cluster: nothing but the error line
    assert len(lines) == 1, proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert lines[-1].startswith(expected), lines[-1]
    assert _snapshot(run) == before
    return lines[-1]


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "case.yaml"
    path.write_text(text)
    return path


# --- data ---------------------------------------------------------------------------------------


def _cifar_tarball(src: Path, target: Path) -> Path:
    with tarfile.open(target, "w:gz") as tar:
        for name in ("meta", "test"):
            tar.add(src / name, arcname=f"cifar-100-python/{name}")
        tar.add(src / "test", arcname="cifar-100-python/train")  # the 20 test images stand in for train
    return target


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/cifarcam-pwned",))


def _parquet_dir(folder: Path, table: pa.Table) -> Path:
    folder.mkdir()
    pq.write_table(table, folder / "train.parquet")
    pq.write_table(table, folder / "test.parquet")
    return folder


def _png(shape=(32, 32, 3)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros(shape, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def case_missing_dataset_dir(tmp_path, data):
    return (
        "name: x\ndata: {source: parquet, path: /nonexistent-data}\n",
        "error: data.path /nonexistent-data: not a folder; expected train.parquet and test.parquet in it",
    )


def case_dataset_not_cached_offline(tmp_path, data):
    return (
        "name: x\ndata: {source: cifar100, download: false, cache_dir: /nonexistent-cache}\n",
        "error: cifar100: not in /nonexistent-cache and data.download is false;",
    )


def case_truncated_archive(tmp_path, data):
    whole = _cifar_tarball(data, tmp_path / "whole.tar.gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return f"name: x\ndata: {{source: cifar100, path: {cut}}}\n", f"error: {cut}: truncated or corrupt archive"


def case_checksum_mismatch(tmp_path, data):
    cache = tmp_path / "cache"
    cache.mkdir()
    _cifar_tarball(data, cache / "cifar-100-python.tar.gz")  # not the official archive's bytes
    return f"name: x\ndata: {{source: cifar100, cache_dir: {cache}}}\n", f"error: {cache / 'cifar-100-python.tar.gz'}: checksum mismatch (md5 "


def case_malicious_pickle(tmp_path, data):
    evil = tmp_path / "evil"
    shutil.copytree(data, evil)
    (evil / "meta").write_bytes(pickle.dumps(_Exploit()))
    return f"name: x\ndata: {{source: cifar100, path: {evil}}}\n", f"error: {evil}:meta: not a CIFAR pickle (refused global posix.system)"


def case_parquet_wrong_columns(tmp_path, data):
    folder = _parquet_dir(tmp_path / "pq", pa.table({"img": [_png()], "y": [0]}))
    return (
        f"name: x\ndata: {{source: parquet, path: {folder}}}\n",
        f"error: {folder / 'train.parquet'}: missing column(s) ['image', 'label']; expected image: binary",
    )


def _cifar_with_bad_train(tmp_path, data, name, damage):
    """The shared CIFAR-100 files, with a train file whose pixel array ``damage`` altered."""
    bad = tmp_path / name
    shutil.copytree(data, bad)
    with open(data / "test", "rb") as f:
        raw = pickle.load(f, encoding="latin1")  # trusted: the shared test file
    raw["data"] = damage(raw["data"])
    (bad / "train").write_bytes(pickle.dumps(raw))
    return bad


def case_images_wrong_shape(tmp_path, data):
    bad = _cifar_with_bad_train(tmp_path, data, "shape", lambda pixels: pixels[:, :1024])  # one colour plane only
    return f"name: x\ndata: {{source: cifar100, path: {bad}}}\n", f"error: {bad}:train: data must be uint8 of shape (N, 3072), got uint8 (20, 1024)"


def case_images_wrong_dtype(tmp_path, data):
    bad = _cifar_with_bad_train(tmp_path, data, "dtype", lambda pixels: pixels.astype(np.float32))
    return f"name: x\ndata: {{source: cifar100, path: {bad}}}\n", f"error: {bad}:train: data must be uint8 of shape (N, 3072), got float32 (20, 3072)"


def case_empty_dataset(tmp_path, data):
    folder = _parquet_dir(tmp_path / "empty", pa.table({"image": pa.array([], pa.binary()), "label": pa.array([], pa.int64())}))
    return f"name: x\ndata: {{source: parquet, path: {folder}}}\n", f"error: {folder / 'train.parquet'}: the dataset is empty (0 images)"


def case_string_labels(tmp_path, data):
    folder = _parquet_dir(tmp_path / "names", pa.table({"image": [_png()], "label": ["cat"]}))
    return (
        f"name: x\ndata: {{source: parquet, path: {folder}}}\n",
        f"error: {folder / 'train.parquet'}: column label is string; expected integer class indices 0..C-1 (class names go in classes.json, in index order)",
    )


def case_fractional_labels(tmp_path, data):
    folder = _parquet_dir(tmp_path / "fractions", pa.table({"image": [_png()] * 2, "label": [0.0, 1.5]}))  # 1.5 was truncated to 1
    return f"name: x\ndata: {{source: parquet, path: {folder}}}\n", f"error: {folder / 'train.parquet'}: column label is double; expected integer"


def case_missing_labels(tmp_path, data):
    folder = _parquet_dir(tmp_path / "nulls", pa.table({"image": [_png()] * 2, "label": pa.array([0, None], pa.int64())}))
    return f"name: x\ndata: {{source: parquet, path: {folder}}}\n", f"error: {folder / 'train.parquet'}: column label has 1 null(s)"


def case_images_not_32_pixels(tmp_path, data):
    folder = _parquet_dir(tmp_path / "big", pa.table({"image": [_png((64, 48, 3))], "label": [0]}))
    return (
        f"name: x\ndata: {{source: parquet, path: {folder}}}\n",
        f"error: data.path {folder}: images are 48x64; cifarcam explains 32x32 images (CIFAR's size, at which its maps are stored): resize them to 32x32",
    )


# --- config -------------------------------------------------------------------------------------


def _text(text: str, expected: str):
    return lambda tmp_path, data: (text, expected)


CASES = {
    "missing dataset dir": case_missing_dataset_dir,
    "dataset not cached, offline": case_dataset_not_cached_offline,
    "truncated archive": case_truncated_archive,
    "checksum mismatch": case_checksum_mismatch,
    "malicious pickle": case_malicious_pickle,
    "parquet wrong columns": case_parquet_wrong_columns,
    "images wrong shape": case_images_wrong_shape,
    "images wrong dtype": case_images_wrong_dtype,
    "empty dataset": case_empty_dataset,
    "string labels": case_string_labels,
    "fractional labels": case_fractional_labels,
    "missing labels": case_missing_labels,
    "images not 32x32": case_images_not_32_pixels,
    "synthetic images not 32x32": _text(
        "name: x\ndata: {source: synthetic, synthetic: {image_size: 48}}\n", "error: data.synthetic.image_size: images are 48x48; cifarcam explains 32x32"
    ),
    "unknown model": _text("name: x\ntrain: {model: resnet5O}\n", "error: train.model: unknown model 'resnet5O'; did you mean 'resnet50'?"),
    "unknown model in the grid": _text("name: x\nsearch: {grid: {model: [resnet34, vit]}}\n", "error: search.model=model: unknown model 'vit'"),
    "unknown optimizer": _text("name: x\ntrain: {optimizer: adamw2}\n", "error: train.optimizer: unknown optimizer 'adamw2'"),
    "unknown scheduler": _text("name: x\ntrain: {scheduler: cosin}\n", "error: train.scheduler: expected one of"),
    "zero lr": _text("name: x\ntrain: {lr: 0}\n", "error: train.lr: must be > 0, got 0.0"),
    "negative lr in the grid": _text("name: x\nsearch: {grid: {lr: [0.1, -0.1]}}\n", "error: search.lr=lr: must be > 0, got -0.1"),
    "zero epochs": _text("name: x\ntrain: {epochs: 0}\n", "error: train.epochs: must be > 0, got 0"),
    "negative batch size": _text("name: x\ntrain: {batch_size: -8}\n", "error: train.batch_size: must be > 0, got -8"),
    "batch larger than the dataset": _text(
        "name: x\n" + OK_DATA + "train: {batch_size: 100000}\n", "error: train.batch_size: 100000 is larger than the training split (180 images)"
    ),
    "yaml syntax error": _text("name: x\ntrain: {lr: 0.1\n", "error: "),
    "unknown key (typo)": _text("name: x\nsearch: {grid: {optimzer: [sgd]}}\n", "error: search.grid.optimzer: unknown key; did you mean 'optimizer'?"),
    "wrong value type": _text("name: x\ntrain: {epochs: many}\n", "error: train.epochs: expected an integer, got 'many'"),
    "fractional GPUs for a DDP trial": _text(
        "name: x\nscaling: {workers_per_trial: 2, gpus_per_worker: 0.5}\n",
        "error: scaling.gpus_per_worker: 0.5 is a fraction of a GPU, but a trial has 2 DDP workers and NCCL needs a GPU of its own per worker; use a whole number, or workers_per_trial: 1",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_fails_in_one_line_before_any_trial(case, tmp_path, existing_run, cifar100_test20, capsys):
    text, expected = CASES[case](tmp_path, cifar100_test20)
    before = _snapshot(existing_run)
    proc = in_process(capsys, "jobs.search", "--config", str(_config(tmp_path, text)), "--out", str(existing_run))
    line = _fails_cleanly(proc, existing_run, before, expected)
    if case == "yaml syntax error":
        assert line.startswith(f"error: {tmp_path / 'case.yaml'}: YAML syntax error at line ")
    assert not Path("/tmp/cifarcam-pwned").exists()


def case_missing_test_split(tmp_path, data):
    folder = _parquet_dir(tmp_path / "ds", pa.table({"image": [_png()], "label": [0]}))
    (folder / "test.parquet").unlink()
    return f"name: x\ndata: {{source: parquet, path: {folder}}}\n", f"error: data.path {folder}: no test.parquet in it; expected train.parquet and test.parquet"


@pytest.mark.parametrize("case", [case_missing_dataset_dir, case_missing_test_split, case_dataset_not_cached_offline])
def test_a_node_refuses_missing_data_as_the_job_would_before_its_ray_starts(case, tmp_path, cifar10_parquet, capsys):
    """What a SLURM or plain-launcher node checks before its Ray cluster starts
    (``check_on_node``): the job's own line for data that is not there, without reading any;
    data that is there passes, and a CAM job is left to its launcher's checks."""
    from cifarcam.errors import UserError
    from cluster.job_kinds import JOBS, check_on_node

    text, expected = case(tmp_path, None)
    argv = ["--config", str(_config(tmp_path, text)), "--out", str(tmp_path / "run")]
    with pytest.raises(UserError) as refused:
        check_on_node(JOBS["search"], argv)
    assert f"error: {refused.value}".startswith(expected)
    proc = in_process(capsys, "jobs.search", *argv)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {refused.value}", proc.stderr
    check_on_node(JOBS["search"], [*argv, "--dry-run"])  # it reads no data
    check_on_node(JOBS["cam"], ["--run", str(tmp_path / "no-run")])
    present = _config(tmp_path, f"name: x\ndata: {{source: parquet, path: {cifar10_parquet}}}\n")
    out = tmp_path / "run"
    check_on_node(JOBS["pipeline"], ["--config", str(present), "--out", str(out)])
    (out / "tune" / "x").mkdir(parents=True)  # a search an earlier attempt began: a requeue continues it
    check_on_node(JOBS["pipeline"], JOBS["pipeline"].driver_args(["--config", str(present), "--out", str(out)], None, restarted=True))
    with pytest.raises(UserError, match="--resume"):
        check_on_node(JOBS["pipeline"], ["--config", str(present), "--out", str(out)])


def test_resume_with_a_mistyped_out_refuses_instead_of_starting_afresh(tmp_path, existing_run, capsys):
    """--resume names a search to continue: a folder without it is a typo, not a fresh start (a
    requeued SLURM attempt passes --resume-if-started instead, which starts it)."""
    (existing_run / "tune" / "x").mkdir(parents=True)  # the search that --out was meant to name
    typo = tmp_path / "exisitng"
    proc = in_process(capsys, "jobs.pipeline", "--config", str(_config(tmp_path, "name: x\n" + OK_DATA)), "--out", str(typo), "--resume")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --resume: --out {typo} holds no search 'x' to continue; check --out, or leave out --resume to start one"
    ]
    assert not typo.exists()


def test_resume_if_started_starts_a_search_that_never_began_and_continues_one_that_did(tmp_path):
    """What a requeued attempt passes: its first attempt may have ended before the search began."""
    from cifarcam.config import load_config
    from cifarcam.errors import UserError
    from cifarcam.search import check_resumable

    cfg, out = load_config(_config(tmp_path, "name: x\n" + OK_DATA)), tmp_path / "run"
    check_resumable(cfg, out, resume=True, must_exist=False)  # --resume-if-started: nothing there, start it
    with pytest.raises(UserError, match=r"^--resume: --out .*/run holds no search 'x' to continue"):
        check_resumable(cfg, out, resume=True, must_exist=True)  # --resume
    (out / "tune" / "x").mkdir(parents=True)
    check_resumable(cfg, out, resume=True, must_exist=False)
    check_resumable(cfg, out, resume=True, must_exist=True)
    with pytest.raises(UserError, match=r"already holds search 'x'; pass --resume"):
        check_resumable(cfg, out, resume=False)


def test_a_resume_may_change_the_start_timeout_and_nothing_else(tmp_path):
    """A search stopped because its workers could not be placed in time may be resumed with a longer
    scaling.start_timeout_s (its message says so); any other change is another search."""
    from cifarcam.config import dump_config, load_config
    from cifarcam.errors import ConfigError
    from cifarcam.search import check_resumable

    out = tmp_path / "run"
    (out / "tune" / "x").mkdir(parents=True)
    (out / "config.yaml").write_text(dump_config(load_config(_config(tmp_path, "name: x\n" + OK_DATA + "scaling: {start_timeout_s: 10}\n"))))
    check_resumable(load_config(_config(tmp_path, "name: x\n" + OK_DATA + "scaling: {start_timeout_s: 900}\n")), out, resume=True)
    changed = load_config(_config(tmp_path, "name: x\n" + OK_DATA + "scaling: {start_timeout_s: 10, workers_per_trial: 2}\n"))
    with pytest.raises(ConfigError, match=r"the config differs from the run's config.yaml; .*only scaling.start_timeout_s may change"):
        check_resumable(changed, out, resume=True)


def test_more_gpus_than_this_machine_has_fail_before_ray(tmp_path, existing_run, capsys):
    import torch

    before = _snapshot(existing_run)
    many = torch.cuda.device_count() + 1
    text = "name: x\n" + OK_DATA
    proc = in_process(capsys, "jobs.search", "--config", str(_config(tmp_path, text)), "--out", str(existing_run), "--num-gpus", str(many))
    _fails_cleanly(proc, existing_run, before, f"error: --num-gpus {many}: this machine has {many - 1} CUDA GPUs")


def test_missing_config_file(tmp_path, existing_run, capsys):
    before = _snapshot(existing_run)
    proc = in_process(capsys, "jobs.search", "--config", str(tmp_path / "nope.yaml"), "--out", str(existing_run))
    assert _fails_cleanly(proc, existing_run, before, "error: ") == f"error: {tmp_path / 'nope.yaml'}: config file not found"


@pytest.mark.parametrize("job, option", [("jobs.pipeline", "--out"), ("jobs.search", "--out"), ("jobs.cam", "--run"), ("jobs.report", "--run")])
def test_an_object_store_uri_is_refused_before_ray(job, option, tmp_path, monkeypatch, capsys):
    """Path("s3://b/run") would be a local folder "s3:/b/run" on the head, gone with it."""
    monkeypatch.chdir(tmp_path)
    config = ["--config", str(write_config(tmp_path))] if option == "--out" else []
    proc = in_process(capsys, job, *config, option, "s3://bucket/run")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"error: argument {option}: s3://bucket/run: object-store URIs are not supported; expected a folder on a filesystem every node sees "
            "(an NFS or Lustre path, a Kubernetes PVC, or a bucket mounted with mountpoint-s3 or s3fs)"
        )
    )
    assert not (tmp_path / "s3:").exists()


def test_unwritable_results_folder(tmp_path, capsys):
    proc = in_process(capsys, "jobs.search", "--config", str(write_config(tmp_path)), "--out", "/proc/cifarcam-run")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.strip().startswith("error: --out /proc/cifarcam-run: cannot create the results folder")


def test_an_unreachable_mlflow_store_fails_before_ray(tmp_path, capsys):
    """A tracking store that cannot be opened is named before any trial, not after the first epoch."""
    bad = "mlfow://typo"
    proc = in_process(capsys, "jobs.search", "--config", str(write_config(tmp_path)), "--out", str(tmp_path / "run"), "--mlflow", bad)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.strip().startswith(f"error: --mlflow {bad}: cannot reach the tracking store (")
    assert not (tmp_path / "run" / "tune").exists()


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--methods", "gradkam"], "error: --methods: unknown CAM method 'gradkam'"),
        (["--layers", "layer3,lyer4"], "error: --layers: model resnet_tiny has no layer 'lyer4'; did you mean 'layer4'?"),
        (["--targets", "both"], "error: --targets: unknown target 'both'; expected pred, label, or both as pred,label"),
        (["--cam-batch-size", "0"], "error: --cam-batch-size: must be > 0, got 0"),
        (["--faithfulness-spacing", "log"], "error: --faithfulness-spacing: expected uniform or quadratic, got 'log'"),
        (["--actors", "2", "--num-cpus", "2"], "error: --actors 2: at most 1 CPU actors fit this 2-CPU cluster (one CPU is left for writing)"),
    ],
)
def test_bad_cam_options_fail_before_the_search(options, expected, tmp_path, existing_run, capsys):
    before = _snapshot(existing_run)
    proc = in_process(capsys, "jobs.pipeline", "--config", str(write_config(tmp_path)), "--out", str(existing_run), *options)
    _fails_cleanly(proc, existing_run, before, expected)


@pytest.fixture
def run_with_checkpoints(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A run folder (config only) plus a 100-class checkpoint and one whose weights belong to
    another model than its meta.json says: what a mixed-up checkpoint folder looks like."""
    from cifarcam.training.checkpoint import save_checkpoint
    from cifarcam.training.models import ModelSpec, build_model

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(write_config(tmp_path).read_text())
    other_dataset = save_checkpoint(tmp_path / "c100", build_model(ModelSpec("resnet_tiny", 100)), ModelSpec("resnet_tiny", 100), {})
    swapped = save_checkpoint(tmp_path / "swapped", build_model(ModelSpec("resnet_tiny", 10)), ModelSpec("resnet_tiny", 10), {})
    torch_model = build_model(ModelSpec("mobilenetv3_small", 10))
    import torch

    torch.save(torch_model.state_dict(), swapped / "model.pt")
    return run, other_dataset, swapped


def test_checkpoint_of_another_dataset(run_with_checkpoints, capsys):
    run, other, _ = run_with_checkpoints
    before = _snapshot(run)
    proc = in_process(capsys, "jobs.cam", "--run", str(run), "--checkpoint", str(other))
    _fails_cleanly(proc, run, before, f"error: --checkpoint {other}: a 100-class model, but the run's dataset has 10 classes")


def test_checkpoint_whose_weights_are_another_model(run_with_checkpoints, capsys):
    run, _, swapped = run_with_checkpoints
    before = _snapshot(run)
    proc = in_process(capsys, "jobs.cam", "--run", str(run), "--checkpoint", str(swapped))
    _fails_cleanly(proc, run, before, f"error: {swapped}: its weights do not fit the resnet_tiny model its meta.json names (")


@pytest.mark.parametrize(
    "meta, expected",
    [
        ({"epoch": 1}, "model.family missing or not a string; not a cifarcam checkpoint's meta.json"),
        ({"model": {"family": "resnet_tiny"}}, "model.num_classes missing or not an integer; not a cifarcam checkpoint's meta.json"),
        ({"model": {"family": "resnet_tiny", "num_classes": 10, "depth": 3}}, "model has unknown keys ['depth']; written by another version of cifarcam?"),
    ],
)
def test_checkpoint_whose_meta_lacks_the_model(run_with_checkpoints, capsys, meta, expected):
    import json

    run, _, swapped = run_with_checkpoints
    (swapped / "meta.json").write_text(json.dumps(meta))
    before = _snapshot(run)
    proc = in_process(capsys, "jobs.cam", "--run", str(run), "--checkpoint", str(swapped))
    _fails_cleanly(proc, run, before, f"error: {swapped / 'meta.json'}: {expected}")


def test_ray_address_that_does_not_answer(tmp_path, existing_run, capsys):
    before = _snapshot(existing_run)
    started = time.monotonic()
    proc = in_process(capsys, "jobs.search", "--config", str(write_config(tmp_path)), "--out", str(existing_run), "--address", "127.0.0.1:1")
    _fails_cleanly(proc, existing_run, before, "error: --address 127.0.0.1:1: no Ray cluster answers there (Connection refused)")
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    "scaling, expected",
    [
        ("{workers_per_trial: 3, cpus_per_worker: 1}", "error: scaling: one trial needs 3 CPUs (3 workers) but the cluster has 2 CPUs and 0 GPUs"),
        ("{workers_per_trial: 1, use_gpu: true}", "error: scaling: one trial needs 1 CPUs and 1 GPUs (1 workers) but the cluster has 2 CPUs and 0 GPUs"),
    ],
)
def test_trial_larger_than_the_cluster_fails_fast(scaling, expected, tmp_path, existing_run, capsys):
    data = "data: {source: synthetic, synthetic: {num_classes: 4, train_size: 1000, test_size: 40, colours: per_class}}\n"
    text = f"name: x\n{data}train: {{model: resnet_tiny, epochs: 1}}\nscaling: {scaling}\n"
    before = _snapshot(existing_run)
    started = time.monotonic()
    proc = in_process(capsys, "jobs.search", "--config", str(_config(tmp_path, text)), "--out", str(existing_run), "--num-cpus", "2")
    _fails_cleanly(proc, existing_run, before, expected)  # a local Ray's size is known before it starts
    assert time.monotonic() - started < 60


def test_help_explains_every_option():
    proc = run_job("jobs.pipeline", "--help", timeout=60)
    assert proc.returncode == 0
    for option in ("--config", "--out", "--resume", "--address", "--num-cpus", "--methods", "--layers", "--cam-batch-size"):
        assert option in proc.stdout


def test_maps_of_another_checkpoint_are_refused_before_any_work(demo_run, tmp_path, capsys):
    """cams/ holds the run's best resnet_tiny; explaining another resnet_tiny checkpoint into the
    same run would mix two models' maps under one name."""
    from cifarcam.training.checkpoint import save_checkpoint
    from cifarcam.training.models import ModelSpec, build_model

    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("report", ".staging"))
    spec = ModelSpec("resnet_tiny", 10)
    other = save_checkpoint(tmp_path / "other", build_model(spec), spec, {})
    before = _snapshot(run)
    proc = in_process(capsys, "jobs.cam", "--run", str(run), "--checkpoint", str(other), *demo_run_cam_options())
    line = _fails_cleanly(proc, run, before, f"error: {run / 'cams' / 'model=resnet_tiny'}: computed from checkpoint ")
    assert f"), not {other} (sha256 " in line
    assert line.endswith(f"); remove {run / 'cams' / 'model=resnet_tiny'} to explain the new checkpoint, or use another --run")


@pytest.fixture
def tiny_run(tmp_path) -> Path:
    """A finished run's four tables, one row each, in a folder whose name holds a quote."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = tmp_path / "it's run"
    run.mkdir()
    for name in ("trials", "epochs", "accuracy", "predictions"):
        pq.write_table(pa.table({"model": ["resnet_tiny"], "n": [1]}), run / f"{name}.parquet")
    return run


def test_a_query_reads_a_run_whose_path_holds_a_quote(tiny_run, capsys):
    proc = in_process(capsys, "jobs.query", str(tiny_run), "select model from accuracy")
    assert proc.returncode == 0 and "resnet_tiny" in proc.stdout, proc.stderr


@pytest.mark.parametrize(
    "sql, refused",
    [
        ("copy (select 1) to '{out}'", 'error: SQL: Permission Error: Cannot access file "{out}"'),
        ("select * from read_csv('/etc/passwd')", 'error: SQL: Permission Error: Cannot access file "/etc/passwd"'),
        ("install httpfs", "error: SQL: Permission Error"),
        ("set enable_external_access = true", 'error: SQL: Invalid Input Error: Cannot change configuration option "enable_external_access"'),
    ],
)
def test_a_query_reads_the_run_and_nothing_else(tiny_run, tmp_path, capsys, sql, refused):
    out = tmp_path / "written.csv"
    proc = in_process(capsys, "jobs.query", str(tiny_run), sql.format(out=out))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(refused.format(out=out)), proc.stderr
    assert not out.exists()


def test_a_negative_row_limit_is_refused(tiny_run, capsys):
    proc = in_process(capsys, "jobs.query", str(tiny_run), "select 1", "--limit", "-5")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith("error: argument --limit: expected a whole number of rows >= 0, got -5")


def test_a_ray_state_folder_others_can_write_is_refused(tmp_path):
    """Its pid file says what ray-head-down.sh kills: a folder others can write is refused, and no
    Ray starts."""
    import os
    import subprocess

    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    env = {**os.environ, "RAY_STATE_DIR": str(state), "RAY_VENV": str(ROOT / ".venv")}
    proc = subprocess.run(["bash", "cluster/ray-head-up.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {state}: not this user's own private folder; remove it or set RAY_STATE_DIR"
    assert list(state.iterdir()) == []


def test_a_report_that_cannot_be_written_fails_before_any_work(tiny_run, capsys):
    """A run on a read-only share (root ignores modes here, so a file stands where report/ goes)."""
    (tiny_run / "report").write_text("not a folder")
    proc = in_process(capsys, "jobs.report", "--run", str(tiny_run))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tiny_run / 'report'}: cannot write the report there (File exists); copy the run folder somewhere writable"


def test_a_report_on_cams_an_older_version_wrote_says_how_to_recompute_them(tiny_run, capsys):
    """CAM files from before a column existed: one line naming the rerun, before any work (not a
    DuckDB binder error half-way through the report)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tiny_run / "config.yaml").write_text("name: old\ndata: {source: synthetic, synthetic: {num_classes: 10, train_size: 40, test_size: 20}}\n")
    part = tiny_run / "cams" / "model=resnet_tiny" / "layer=layer2" / "method=gradcam"
    part.mkdir(parents=True)
    pq.write_table(pa.table({"image_index": [0], "peak_y": [3], "peak_x": [4]}), part / "part-0.parquet")
    proc = in_process(capsys, "jobs.report", "--run", str(tiny_run))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {tiny_run}: its cams were written by an older cifarcam (no column run, layer_h, layer_w …); "
        f"rerun `python -m jobs.cam --run {tiny_run}` to recompute them"
    )
