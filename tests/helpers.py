"""Running the jobs as a user does: real subprocesses, real local Ray."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from cifarcam.ray_env import JOB_ENV

ROOT = Path(__file__).resolve().parent.parent


def demo_cam_options() -> list[str]:
    """The CAM options `make demo` passes (its DEMO_CAM line), so that tests run the README's demo."""
    import re

    return re.search(r"^DEMO_CAM := (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()


# The demo_run fixture's faithfulness sample at test size: 24 of its 200 test images (make demo: 64
# of 500), so that the curves, their baselines and the report's verdicts (5 images at least) are there.
DEMO_CAM_AT_TEST_SIZE = ["--faithfulness-images", "24"]


def demo_run_cam_options() -> list[str]:
    """The CAM options the demo_run fixture ran with: a CAM job on it must ask for the same."""
    return [*demo_cam_options(), *DEMO_CAM_AT_TEST_SIZE]


# Ray's own lines that a quiet job keeps off the terminal (issue 13's measured examples).
RAY_NOISE = (
    "TrainingReport",
    "Reporting training result",
    "Checkpoint successfully created",
    "core_worker.cc",
    "(RayTrainWorker",
    "(TrainController",
    "controller actor",
    "logging_progress",
    "streaming_executor",
    "Configuration for experiment",
    "tensorboard --logdir",
)


def assert_quiet(terminal: str, run: Path, moved: str = "Reporting training result") -> None:
    """The terminal shows none of Ray's lines, names where they went, and they (``moved``) are there."""
    noise = [line for line in terminal.splitlines() if any(n in line for n in RAY_NOISE)]
    assert not noise, noise[:5]
    folders = sorted((run / "logs").iterdir())
    assert folders and all(f"Ray's logs: {f}" in terminal for f in folders)
    workers = "".join((f / "ray-workers.log").read_text() for f in folders)
    assert moved in workers  # moved, not lost


def run_job(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**JOB_ENV, **os.environ}
    full_env.pop("RAY_ADDRESS", None)  # a local Ray per job unless the test names a cluster
    full_env.update(env or {})
    # A session of its own: a job that overruns is killed with everything it started (its local
    # Ray's processes included), so that nothing it left holds CPUs or a GPU for the next test.
    with subprocess.Popen(
        [sys.executable, "-m", *args], cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise subprocess.TimeoutExpired(proc.args, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def in_process(capsys, module: str, *args: str) -> SimpleNamespace:
    """Run a job's ``main`` here, as its ``python -m`` entry point would (same argv, same error
    handling), without paying an interpreter start per case; Ray must not have been started."""
    import ray

    from jobs.common import run

    main = importlib.import_module(module).main
    argv, sys.argv = sys.argv, [module, *args]
    address = os.environ.pop("RAY_ADDRESS", None)  # as run_job: no cluster unless the case names one
    try:
        run(main)
        code = 0
    except SystemExit as exit:
        code = exit.code
    finally:
        sys.argv = argv
        if address is not None:
            os.environ["RAY_ADDRESS"] = address
    out = capsys.readouterr()
    assert not ray.is_initialized()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


SMALL_SEARCH = """
name: {name}
data:
  source: synthetic
  # the easy variant: these tests check plumbing and need a model that learns in seconds
  synthetic: {{num_classes: 10, train_size: 2000, test_size: 300, colours: per_class}}
train:
  model: resnet_tiny
  epochs: 2
  batch_size: 64
  lr: 0.004
  warmup_epochs: 0.2
search:
  grid:
    lr: [0.004, 0.000001]   # the second cannot learn in one epoch: ASHA must stop it
  early_stopping: asha
  grace_period: 1
  reduction_factor: 2
  keep_checkpoints: 1
scaling:
  workers_per_trial: 2
  cpus_per_worker: 1
"""


def write_config(folder: Path, name: str = "small", text: str = SMALL_SEARCH) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text.format(name=name))
    return path


class BackgroundJob:
    """A job in the background, in its own session, so that a test can kill it and everything it
    started (its local Ray included) as one process group. Output goes to a file (a pipe nobody
    reads would fill up and stall the job). As a context manager it never outlives a failed test:
    an orphaned job would compete with the next test's Ray for the 2 CPUs. ``command`` (with
    ``env``) runs something else than ``python -m args``, e.g. `ray job submit`; killing that
    client leaves its job on the cluster, which the cluster's own teardown ends."""

    def __init__(self, log: Path, *args: str, command: list[str] | None = None, env: dict | None = None) -> None:
        if env is None:
            env = {**JOB_ENV, **os.environ}
            env.pop("RAY_ADDRESS", None)
        self.log = log
        with open(log, "w") as out:
            argv = command if command is not None else [sys.executable, "-m", *args]
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> "BackgroundJob":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the job's whole process group, as a crash or a lost node would."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def wait_for(self, condition, what: str, timeout: float = 300) -> object:
        """Poll ``condition`` until true, and return its value; folders that Ray creates and
        deletes meanwhile may vanish under a glob, which counts as not yet."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if value := condition():
                    return value
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"the job ended before {what}: {self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.2)

    def finish(self, timeout: float = 600) -> int:
        self.proc.wait(timeout=timeout)
        return self.proc.returncode


def descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every process below ``pid``, read from /proc (Ray renames its
    workers' command lines, e.g. ``ray::RayTrainWorker``)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            todo.append(child)
    return found


def assert_fast_path_matches_pytorch_grad_cam(model, x, labels, layers: list[str], atol: float) -> None:
    """Every fast CAM method, for the predicted class and the label, at every layer, against
    pytorch-grad-cam's own maps for the same model and images, on the inputs' device."""
    import numpy as np

    from cifarcam.cam.methods import MultiLayerCam, fast_methods, reference_maps

    fast = fast_methods()
    with MultiLayerCam(model, layers) as cams:
        out = cams(x, {"pred": None, "label": labels}, fast, 32)
    pred = out.logits.argmax(1)
    for kind, classes in (("pred", pred), ("label", labels)):
        for layer in layers:
            for method in fast:
                ours = out.maps[(kind, layer, method)]
                assert ours.device == x.device
                reference = reference_maps(model, x, layer, method, classes)
                np.testing.assert_allclose(ours.cpu().numpy(), reference.numpy(), atol=atol, err_msg=f"{layer} {method} {kind}")
