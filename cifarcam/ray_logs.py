"""A quiet terminal: Ray's own output goes to files in the run folder, the project's lines stay.

Ray writes three things on a job's terminal, none of them meant for the person running it:

- its driver-side Python loggers (``ray``, ``ray.data``, ``ray.tune`` …): the auth-token notice,
  Ray Data's block counts every few seconds, Tune's "Wrote the latest version …";
- every worker's stdout and stderr, which the driver receives from the cluster and prints with a
  "(RayTrainWorker pid=…)" prefix: a "Reporting training result" per worker and epoch, Ray Train's
  red ``E … core_worker.cc`` lines about its PreemptionWatcher, "… controller actor is dead";
- Tune's console reporter (an experiment banner and a TensorBoard hint into Ray's temp folder).

A quiet job (the default) writes the first two to ``ray-driver.log`` and ``ray-workers.log`` in a
folder of its own under ``<run>/logs/`` and turns the third off. Worker output still travels to
the driver, so this holds on a multi-node cluster, under ``ray job submit`` and under SLURM.
``--verbose`` or ``CIFARCAM_VERBOSE=1`` keeps Ray's defaults.

The driver's own C++ core worker writes its ERROR lines straight to file descriptor 2, past
every Python logger: one per CAM stage, because Ray Data's actor pool keeps its constructor in the
object store (ray-project/ray#53727). While the CAM stage runs, :func:`native_stderr_in_log`
points descriptor 2 at ``driver-stderr.log``. Only there: a local Ray's raylet and GCS are the
driver's children and would inherit a redirect made before ``ray.init``.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, TextIO

from cifarcam.run_layout import RunLayout

VERBOSE_ENV = "CIFARCAM_VERBOSE"
_WORKER_HANDLER = "ray_print_logs"  # the name Ray's driver registers its worker-output printer under
_active: RayLogRouting | None = None  # this process's routing, once a job has asked for it
_work_started = False  # set when a stage starts its work: its logs are kept whatever follows


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def job_log_folder(run_dir: Path, job: str) -> Path:
    """``<run>/logs/<job>-<UTC time>-<pid>``: one folder per job process, so that two jobs on one
    run folder, or a rerun, never write into each other's files."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return RunLayout(run_dir).logs / f"{job}-{stamp}-{os.getpid()}"


class RayLogRouting:
    """Sends Ray's driver loggers and its forwarded worker output to ``folder``."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.driver_handler = logging.FileHandler(folder / "ray-driver.log", encoding="utf-8")
        self.driver_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d -- %(message)s"))
        self.workers: TextIO = open(folder / "ray-workers.log", "a", encoding="utf-8", buffering=1)  # open as long as the job
        self._lock = threading.Lock()
        # Tune's reporter prints with print(); the legacy one is silent at verbose=0.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        global _active
        _active = self

    def route_driver_loggers(self) -> None:
        """Swap every console handler of Ray's loggers for the log file. Called before ray.init
        (its auth-token warning) and after it and after importing ray.data, which (re)configure
        their loggers."""
        import ray.data  # noqa: F401  (configures the ray.data logger now, not mid-job)

        loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name == "ray" or name.startswith("ray.")]
        for logger in loggers:
            for handler in list(logger.handlers):
                if _writes_to_terminal(handler):
                    logger.removeHandler(handler)
                    if self.driver_handler not in logger.handlers:
                        logger.addHandler(self.driver_handler)

    def route_worker_output(self) -> None:
        """Replace the driver's printer of worker output (``ray.init(log_to_driver=True)``) by one
        that appends to ``ray-workers.log``. Uses Ray's internal dispatcher (``log_to_driver`` is
        the only public switch, and it drops the output): if a Ray release renames it, worker
        output stays on the terminal as before, and nothing is lost."""
        try:
            from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return
        dispatcher.remove_handler(_WORKER_HANDLER)
        dispatcher.add_handler(_WORKER_HANDLER, self._write_worker_lines)

    def _write_worker_lines(self, data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({who} pid={data.get('pid')}, ip={data.get('ip')}{', stderr' if data.get('is_err') else ''}) "
        with self._lock:
            self.workers.write("".join(prefix + line + "\n" for line in data.get("lines", [])))

    def discard(self) -> None:
        """Undo this routing for a job that stops on a user error before doing any work (bad
        address, a trial larger than the cluster): stop Ray, close the files and remove the job's
        folder (and ``logs/`` if it is left empty), so that the run folder is left as it was."""
        import ray

        global _active
        _active = None
        if ray.is_initialized():
            ray.shutdown()  # before the files go: its shutdown still logs
        for logger in [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]:
            if self.driver_handler in logger.handlers:
                logger.removeHandler(self.driver_handler)
        self.driver_handler.close()
        self.workers.close()
        for path in sorted(self.folder.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        self.folder.rmdir()
        with contextlib.suppress(OSError):  # another job's logs are there
            self.folder.parent.rmdir()

    def note_session(self) -> None:
        """Where Ray keeps the rest (raylet, GCS, core-worker logs), written into the driver log."""
        import ray

        session = ray.get_runtime_context().get_session_name()
        temp = ray.get_runtime_context().get_temp_dir()
        logging.getLogger("ray").info("Ray's own logs (raylet, GCS, core workers): %s/%s/logs on each node", temp, session)


def mark_work_started() -> None:
    """A stage starts its work (the search's trials, the CAM stage): from here on, the job's logs
    are kept even when it ends on a user error."""
    global _work_started
    _work_started = True


def discard_active() -> None:
    """:meth:`RayLogRouting.discard` for this process's routing, if there is one and no stage
    has started its work."""
    if _active is not None and not _work_started:
        _active.discard()


def _writes_to_terminal(handler: logging.Handler) -> bool:
    # Ray's own console handler (PlainRayHandler) looks sys.stderr up at emit time, so the handler's
    # class, not its stream, says where it writes: every stream handler but a file's.
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


@contextlib.contextmanager
def native_stderr_in_log() -> Iterator[None]:
    """Point file descriptor 2 at ``driver-stderr.log`` for the block, when Ray's output is routed
    (otherwise a no-op). Python's own errors are raised after the block and still shown."""
    if _active is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(_active.folder / "driver-stderr.log", "ab") as log:
        os.dup2(log.fileno(), 2)
    # A crash (segfault, CUDA abort) still reaches the real stderr, with Python's stacks.
    terminal = os.fdopen(os.dup(saved), "w")
    was_enabled = faulthandler.is_enabled()
    faulthandler.enable(file=terminal)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if was_enabled:
            faulthandler.enable(file=sys.stderr)
        else:
            faulthandler.disable()
        terminal.close()
