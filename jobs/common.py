"""What every job shares: the common options, connecting to Ray, and one-line errors."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Callable

from rich.console import Console

from cifarcam.errors import ClusterUnreachable, JobFailed, UserError
from cifarcam.ray_env import JOB_ENV, set_defaults
from cifarcam.ray_logs import VERBOSE_ENV, RayLogRouting, discard_active, job_log_folder, verbose_from_env

# Logs and CI are no terminals: give tables room there instead of rich's default 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join, e.g. 10.0.0.1:6379 or 'auto' (default: $RAY_ADDRESS; unset: start a local Ray in-process)",
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all of this machine's)")
    parser.add_argument(
        "--num-gpus", type=int, default=None, help="GPUs for a local Ray (default: all of this machine's); with --dry-run, the GPUs to plan for"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=verbose_from_env(),
        help=f"show Ray's driver and worker logs here too (default: ${VERBOSE_ENV}; otherwise they go to <run>/logs/)",
    )


def run_folder(text: str) -> Path:
    """An argparse type for --out / --run: a local or shared-filesystem folder. Object-store URIs
    are refused here, before any cluster time: Path() would turn ``s3://b/x`` into a local folder
    ``s3:/b/x`` on the head, gone with it (tables, CAM parts and checkpoints are plain files)."""
    if "://" in text:
        raise argparse.ArgumentTypeError(
            f"{text}: object-store URIs are not supported; expected a folder on a filesystem every node sees "
            "(an NFS or Lustre path, a Kubernetes PVC, or a bucket mounted with mountpoint-s3 or s3fs)"
        )
    return Path(text)


def default_out(name: str) -> Path:
    return Path("results") / name


def _probe(address: str) -> None:
    """Fail in seconds when nothing listens at ``address`` (ray.init would retry for minutes)."""
    if address in ("auto", "local"):
        return
    host, _, port = address.split("://")[-1].rstrip("/").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except ValueError:
        raise ClusterUnreachable(f"--address {address}: expected HOST:PORT (or 'auto'), e.g. 10.0.0.1:6379") from None
    except OSError as err:
        raise ClusterUnreachable(f"--address {address}: no Ray cluster answers there ({err.strerror or err})") from None


def connect_ray(args: argparse.Namespace, run_dir: Path | None = None) -> None:
    """Join the cluster at ``args.address``, or start a local one bound to 127.0.0.1. With a
    ``run_dir`` and without ``--verbose``, Ray's own output goes to ``<run>/logs/`` (the terminal
    says where), so that the terminal shows the job's lines alone."""
    import ray

    num_gpus = getattr(args, "num_gpus", None)
    if num_gpus is not None and not args.address:
        import torch

        if not 0 <= num_gpus <= torch.cuda.device_count():  # Ray would announce GPUs that torch cannot use
            raise UserError(f"--num-gpus {num_gpus}: this machine has {torch.cuda.device_count()} CUDA GPUs (--dry-run plans for any number)")
    set_defaults(JOB_ENV)
    routing = None
    if run_dir is not None and not getattr(args, "verbose", False):
        routing = RayLogRouting(job_log_folder(run_dir, Path(sys.argv[0]).stem or "job"))
        routing.route_driver_loggers()
    _init(args.address, args.num_cpus, num_gpus)
    if routing is not None:
        routing.route_driver_loggers()
        routing.route_worker_output()
        routing.note_session()
        console.print(f"Ray's logs: {routing.folder} (--verbose shows them here)", highlight=False)
    if run_dir is not None:
        from cifarcam.shared_folder import check_shared_folder

        nodes = check_shared_folder(run_dir)
        if nodes:
            console.print(f"run folder: one folder, with shared locks, on all {nodes} nodes", highlight=False)
    if not ray.cluster_resources().get("GPU"):
        warn("no GPU in this Ray cluster: training and Grad-CAM run on its CPUs")


_warned: set[str] = set()


def warn(text: str) -> None:
    """A warning the user must see, once per job however often it is met, in the project's words."""
    if text not in _warned:
        _warned.add(text)
        console.print(f"warning: {text}", style="yellow", highlight=False, markup=False)


def _init(address: str | None, num_cpus: int | None, num_gpus: int | None = None) -> None:
    import ray

    if address:
        _probe(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ClusterUnreachable(f"--address {address}: no Ray cluster answers there ({first})") from None
        return
    # A one-node cluster has no node that can be drained: Ray Train's preemption watcher (one more
    # actor process started per trial, seconds each on a busy laptop) would watch nothing.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The dashboard (on loopback) is not optional: Ray Train's PlacementGroupCleaner asks the
    # state API it serves whether a trial's controller still lives, and without it a trial that
    # Tune stops mid-shutdown leaks its workers' CPUs and the next trial waits forever; the
    # search's placement watch reads the placement groups there too.
    # address="local": always a new cluster, never one another job left running on this machine.
    # Its GCS on a port chosen here, so that every process of the cluster can inherit RAY_ADDRESS:
    # Ray's own clients inside it (Ray Train's PlacementGroupCleaner asks the state API with no
    # address) otherwise pick whichever cluster on this host started last, and a trial stopped
    # while its cleaner asked the wrong one keeps its CPUs (two jobs, or two tests, on one host).
    # (A port the user set in RAY_GCS_SERVER_PORT is kept.) While the cluster runs, the driver's
    # own state-API calls (the placement watch) find it through RAY_ADDRESS too.
    before = {name: os.environ.get(name) for name in ("RAY_GCS_SERVER_PORT", "RAY_ADDRESS")}
    port = before["RAY_GCS_SERVER_PORT"] or str(free_port("127.0.0.1"))
    os.environ.update(RAY_GCS_SERVER_PORT=port, RAY_ADDRESS=f"127.0.0.1:{port}")
    started = False
    try:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True, dashboard_host="127.0.0.1")
        started = True
    finally:
        for name, value in before.items():
            if name == "RAY_ADDRESS" and started:
                continue
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def free_port(host: str) -> int:
    """A TCP port free on ``host`` now (the OS's choice; taken again only by a race of moments)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run(main: Callable[[], int]) -> None:
    """Run a job's ``main``; user mistakes (``UserError``) print ``error: …`` (one line) and exit 2,
    a job whose work came to nothing (``JobFailed``) likewise with exit status 1. Anything else,
    a ValueError or OSError included, is a bug or an unforeseen failure: it keeps its traceback."""
    try:
        sys.exit(main())
    except (UserError, JobFailed) as err:
        if os.environ.get("CIFARCAM_DEBUG"):
            traceback.print_exc()
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        if isinstance(err, UserError):  # raised before any work: the run folder stays as it was
            discard_active()
        sys.exit(1 if isinstance(err, JobFailed) else 2)
