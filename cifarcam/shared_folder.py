"""Is the run folder one folder for the whole Ray cluster, with locks the whole cluster honours?

On several nodes, Ray Train's workers write checkpoints and Ray Data's write tasks write CAM parts
into the run folder from wherever they run. If the folder is a node-local disk (the same path on
each node, but not the same files), the driver regroups the files it sees and publishes partial
partitions as complete. If flock is local to each node (Lustre mounted with ``localflock``, BeeGFS
with ``tuneUseGlobalFileLocks = false``), two hosts both "hold" the run's lock, and one job sweeps
another's live staging folder. Both are checked when a job joins a cluster of several nodes,
before any work: the driver writes a random token into the folder and holds a probe lock, and a
task pinned to each node must read the token and must fail to take the lock.
"""

from __future__ import annotations

import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from cifarcam.errors import ConfigError, UserError

PROBE_TIMEOUT_S = 120.0  # each node starts one worker process for its probe


@dataclass(frozen=True)
class NodeView:
    """What one node saw of the run folder."""

    host: str
    token: str | None  # the token file's content there (None: no such file)
    took_lock: bool  # took the probe lock while the driver held it: flock is local to each node


def look(token_file: str, lock_file: str) -> NodeView:
    """Run on each node: read the driver's token, then try the lock the driver holds."""
    try:
        token = Path(token_file).read_text()
    except OSError:
        token = None
    took = False
    if token is not None:  # the lock file is beside the token: only meaningful where the folder is shared
        lock = FileLock(lock_file)
        try:
            lock.acquire(timeout=0)
            took = True
            lock.release()
        except Timeout:
            pass
    return NodeView(socket.gethostname(), token, took)


def verdict(run_dir: Path, driver_host: str, token: str, views: list[NodeView]) -> str | None:
    """The one-line reason the run folder cannot serve this cluster, or None."""
    apart = [v.host for v in views if v.token != token]
    if apart:
        return (
            f"{run_dir}: not the same folder on node(s) {', '.join(apart)} as on {driver_host}: their workers would write checkpoints "
            "and CAM parts to their own disks; put the run folder on a filesystem every node mounts at the same path"
        )
    local = [v.host for v in views if v.took_lock]
    if local:
        return (
            f"{run_dir}: file locks are local to each node (node(s) {', '.join(local)} took a lock {driver_host} holds), so two jobs "
            "could both hold the run's lock; mount the filesystem with global flock (Lustre: flock, not localflock; "
            "BeeGFS: tuneUseGlobalFileLocks = true), or use a run folder on one that has it"
        )
    return None


def _cancel_unfinished(pending: list) -> None:
    """A late probe must not take the lock file back after the cleanup. Only the unfinished are
    cancelled: Ray 2.60's driver aborts ("Tried to complete task that was not pending", measured
    here under load) when a forced cancel meets a task's reply on its way in."""
    import ray

    _, unfinished = ray.wait(pending, num_returns=len(pending), timeout=0)
    for ref in unfinished:
        ray.cancel(ref, force=True)


def check_shared_folder(run_dir: Path) -> int:
    """On a connected Ray cluster of several nodes, refuse a run folder that is not one shared
    folder with shared locks (ConfigError); returns the number of nodes checked (0: one node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cifarcam.results import write_text_atomic

    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2:
        return 0
    token = secrets.token_hex(16)
    token_file, lock_file = run_dir / f".shared-check-{token[:12]}", run_dir / f".shared-check-{token[:12]}.lock"
    write_text_atomic(token_file, token)
    probe = ray.remote(num_cpus=0)(look)
    try:
        with FileLock(lock_file):  # held here while every node tries to take it
            pending = [
                probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(str(token_file), str(lock_file)) for node in nodes
            ]
            try:
                views = ray.get(pending, timeout=PROBE_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                _cancel_unfinished(pending)
                raise UserError(f"{run_dir}: not every node answered the shared-folder check within {PROBE_TIMEOUT_S:.0f} s; see ray status") from None
            except ray.exceptions.RayError as err:  # a node lost meanwhile, a worker that failed to start
                _cancel_unfinished(pending)
                raise UserError(f"{run_dir}: the shared-folder check failed on a node ({type(err).__name__}); see ray status") from None
    finally:
        token_file.unlink(missing_ok=True)
        lock_file.unlink(missing_ok=True)
    problem = verdict(run_dir, socket.gethostname(), token, views)
    if problem:
        raise ConfigError(problem)
    return len(nodes)
