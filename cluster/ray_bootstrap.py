"""One Ray cluster over the nodes of any batch allocation, and one cifarcam job run on it: the part
of a multi-node launch that does not depend on the scheduler.

A scheduler adapter runs one process per node and describes that node as a ``NodeRole``:

    rank        0 on the node that runs the Ray head and the job's driver; 1 .. nodes-1 elsewhere
    nodes       how many nodes take part
    attempt     0 at first, n on the n-th requeue or restart: each attempt meets in its own folder,
                and from the second on the job continues what an earlier one began (JobKind.restart_flag)
    meeting     that attempt's folder, on a filesystem every node sees, private to the user
    cpus, gpus  what Ray may use on this node (None: Ray counts them)
    node_addr   the address the scheduler reaches this node by, if it knows one (SLURM's NodeAddr,
                torchrun's MASTER_ADDR on rank 0): rank 0's Ray listens there
    label       what makes this node's Ray temp folder unique on its host (a job id)

and calls ``run_node(role, job, options)``. The adapters: ``cluster/ray_on_slurm.py`` (SLURM,
through submitit) and ``cluster/ray_on_env.py`` (RANK / WORLD_SIZE / MASTER_ADDR as torchrun sets
them, or an MPI's ranks). This module does the rest: each node's address, the collective
interfaces, ``ray start`` on the head and the workers, the meeting files, waiting for the nodes,
the driver, and stopping Ray on every node when the driver ends.

The nodes meet through ``meeting``: the head writes its address there, the workers join it, and
the head marks the end so that the workers leave. Every port is picked free on its node, so
several jobs (or several virtual nodes) on one host never collide.

Each node's address comes from ``--interface``, from the route to the head, or from the
scheduler's ``node_addr``; never from ``gethostbyname(hostname)`` alone, which is 127.0.1.1 on
Debian and Ubuntu nodes. Gloo and NCCL get the same interface (GLOO_SOCKET_IFNAME /
NCCL_SOCKET_IFNAME): left to themselves they resolve the host name too, and two DDP ranks on two
such nodes never connect.

Why not ``ray symmetric-run`` (Ray 2.60), which also starts a head and workers and runs a command:
- The head is whichever node finds the given ``--address`` among its own interfaces, so the address
  and GCS port must be fixed before the job starts; a fixed port collides between jobs sharing a
  node, and a host name that resolves differently on the nodes starts no head or several
  (ray-project/ray#58875).
- Workers give up after 30 s (RAY_SYMMETRIC_RUN_CLUSTER_WAIT_TIMEOUT) and their readiness check
  fails against a head that is up (ray-project/ray#59795); nodes of a batch job may start minutes apart.
- It refuses ``--node-ip-address``, so the interface cannot be chosen, and it refuses to start
  where any Ray instance already runs on the node (another job's, or another virtual node's).
- It knows nothing of requeues: here each attempt meets in its own folder and resumes the job.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

import psutil

from cifarcam.errors import ConfigError, UserError
from cifarcam.ray_env import NODE_ENV
from cifarcam.results import write_text_atomic
from cluster.job_kinds import DRIVER_CWD, JOBS, check_on_node
from jobs.common import free_port

HEAD_FILE, DONE_FILE, STATUS_FILE = "ray-head.json", "driver-done", "driver-status.json"


@dataclass(frozen=True)
class NodeRole:
    """This node's part in the allocation, as its scheduler adapter reads it (module docstring)."""

    rank: int
    nodes: int
    attempt: int
    meeting: Path
    cpus: int | None = None
    gpus: int | None = None
    node_addr: str | None = None
    label: str = ""


@dataclass(frozen=True)
class RayNodeOptions:
    """How this submission's Ray nodes start, the same on every node."""

    token_path: Path  # the Ray auth token, on the shared filesystem, mode 0600
    object_store_bytes: int | None = None
    interface: str | None = None  # the network interface Ray, Gloo and NCCL use (default: see node_ip)
    join_timeout_s: float = 600.0


@dataclass(frozen=True)
class JobToRun:
    """The cifarcam job the head's node runs once the cluster is up: a name in ``JOBS`` and its
    options, paths absolute (``cluster.job_kinds.checked_runs``)."""

    name: str
    args: list[str]

    def describe(self) -> str:
        return f"{JOBS[self.name].module} {' '.join(self.args)}"


# -- addresses ------------------------------------------------------------------------------


def interface_address(interface: str) -> str:
    """The IPv4 address of this node's first interface among ``--interface`` (a name, or a
    comma-separated list for nodes whose interfaces are named differently, e.g. ``ib0,eth1``)."""
    interfaces = psutil.net_if_addrs()
    for name in interface.split(","):
        for address in interfaces.get(name.strip(), []):
            if address.family == socket.AF_INET:
                return address.address
    raise ConfigError(f"--interface {interface}: no such interface with an IPv4 address on {socket.gethostname()} (it has {', '.join(sorted(interfaces))})")


def interface_of(ip: str) -> str | None:
    return next((name for name, addresses in psutil.net_if_addrs().items() if any(a.address == ip for a in addresses)), None)


def route_source(peer: str) -> str:
    """The local address the kernel would send from to reach ``peer`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))
        return s.getsockname()[0]


def node_ip(interface: str | None = None, head: str | None = None, node_addr: str | None = None, nodes: int = 1) -> str:
    """The address the other nodes reach this node on.

    Not ``gethostbyname(hostname)``: Debian and Ubuntu map the host name to 127.0.1.1, and a
    multi-homed node may resolve to its management network. In order: the ``--interface`` given;
    on a worker, the source address of its route to the head; on the head, the scheduler's
    ``node_addr`` for the node (else the host name), and if that is a name that resolves to
    loopback on a multi-node job, the address of the default route (Ray's choice)."""
    if interface:
        return interface_address(interface)
    if head:
        return route_source(head)
    name = node_addr or socket.gethostname()
    ip = socket.gethostbyname(name)
    if nodes == 1 or name == ip or not ipaddress.ip_address(ip).is_loopback:
        return ip  # one node may stay on loopback; a literal address is what the admin chose
    from ray.util import get_node_ip_address

    ip = get_node_ip_address()
    if ipaddress.ip_address(ip).is_loopback:
        raise ConfigError(f"{name} resolves to {ip} and no other address routes anywhere: pass --interface (e.g. ib0 or eth0)")
    return ip


def collective_interfaces(ip: str) -> dict[str, str]:
    """Gloo and NCCL pick their interface from the host name by default (127.0.1.1 on Debian, so
    DDP ranks on two nodes never meet): point them at the interface Ray uses, unless the user did."""
    name = interface_of(ip)
    if name is None:
        return {}
    return {var: name for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if var not in os.environ}


# -- shared folders ---------------------------------------------------------------------------


def private_folder(folder: Path, option: str, why: str) -> Path:
    """``folder``, created for this user alone if new. Whoever can write it could plant what the
    nodes read from it (``why``): one that someone else owns or may write is refused."""
    from cifarcam.safe_pickle import others_can_write

    folder = folder.resolve()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{option} {folder}: cannot create it ({err.strerror or err}); choose a folder on a filesystem every node sees") from None
    problem = others_can_write(folder)
    if problem:
        raise UserError(f"{option} {folder}: {problem}, and {why}; check who changed it, then chmod go-w {folder}, or choose another {option}")
    return folder


def wait_until(ready: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s")
        time.sleep(poll_s)


# -- the node's process -------------------------------------------------------------------------


class AttemptEnded(BaseException):
    """The scheduler is ending this attempt (requeue, preemption, cancel, time limit). A
    BaseException so that nothing reports it as the job's result: SLURM's waiting client keeps
    waiting for the requeued attempt."""


def _attempt_ended(signum: int, frame: object) -> None:
    raise AttemptEnded(f"signal {signal.Signals(signum).name}")


def stop_process_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM the group `ray start --block` leads (its raylet, GCS, dashboard), then SIGKILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_node(role: NodeRole, job: JobToRun, options: RayNodeOptions) -> int:
    """This node's part: on rank 0 the job's checks that need no cluster (``check_on_node``), a
    Ray head, then the job's driver, whose exit status is returned (written to
    ``<meeting>/../driver-status.json`` too); elsewhere a Ray worker until the driver ends (0), or
    1 when the head ended before Ray started. A job that uses no Ray (the report) runs on rank 0
    alone."""
    role.meeting.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.gettempdir()) / f"cfr-{role.label}-{role.attempt}-{role.rank}"  # short: AF_UNIX paths
    os.environ.update(
        NODE_ENV,  # token auth with this submission's own token
        RAY_AUTH_TOKEN_PATH=str(options.token_path),
        # the driver and Ray's workers find this venv's python first
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    # SIGTERM (SLURM's, a launcher's) ends the attempt at once: the finally blocks stop Ray, and
    # nothing reports the driver's forced exit as its result.
    signal.signal(signal.SIGTERM, _attempt_ended)
    node = _Node(role, options, temp)
    try:
        if role.rank == 0:
            return node.head(job)
        if not JOBS[job.name].uses_ray:
            print(f"[cifarcam] {job.name} uses no Ray: it runs on rank 0 alone", flush=True)
            return 0
        return node.worker()
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@dataclass
class _Node:
    role: NodeRole
    options: RayNodeOptions
    temp: Path

    def _ray_start(self, ip: str, address: str, extra: list[str], log: IO) -> subprocess.Popen:
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--block",
            "--disable-usage-stats",
            f"--node-ip-address={ip}",
            f"--temp-dir={self.temp}",
            f"--dashboard-agent-listen-port={free_port(ip)}",
            f"--metrics-export-port={free_port(ip)}",
        ]
        if self.role.cpus is not None:
            cmd.append(f"--num-cpus={self.role.cpus}")
        if self.role.gpus is not None:
            cmd.append(f"--num-gpus={self.role.gpus}")
        if self.options.object_store_bytes:
            cmd.append(f"--object-store-memory={self.options.object_store_bytes}")
        # Ray's workers (the DDP ranks) inherit this environment. RAY_ADDRESS: Ray's own clients in
        # them (Ray Train's PlacementGroupCleaner) ask this cluster, not another on the same host.
        env = os.environ | collective_interfaces(ip) | {"RAY_ADDRESS": address}
        # its own session, so that stopping it stops exactly its raylet, GCS and dashboard
        return subprocess.Popen(cmd + extra, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def head(self, job: JobToRun) -> int:
        meeting, kind, restarted = self.role.meeting, JOBS[job.name], self.role.attempt > 0
        try:
            if not kind.uses_ray:
                rc = self._driver(job.name, kind.driver_args(job.args, None, restarted), "one node, no Ray")
            else:
                rc = self._checked_here(job, restarted)
                if rc == 0:
                    rc = self._head_and_driver(job, restarted)
        finally:
            (meeting / DONE_FILE).touch()  # the workers leave (or never wait for a head that will not come)
        write_text_atomic(meeting.parent / STATUS_FILE, json.dumps({"returncode": rc, "resumed": restarted}))
        return rc

    def _checked_here(self, job: JobToRun, restarted: bool) -> int:
        """0, or the job's status for a user error (2) with its one line: the job's checks on
        this node before any Ray starts (``check_on_node``: a search's data may be missing here
        alone). Each would otherwise come only after the cluster's start on every node."""
        kind = JOBS[job.name]
        try:
            check_on_node(kind, kind.driver_args(job.args, None, restarted))
        except (UserError, OSError) as err:  # OSError: a data path this node may not read
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
            print(f"[cifarcam] {kind.module} refused its input on this node; no Ray started", flush=True)
            return 2
        return 0

    def _head_and_driver(self, job: JobToRun, restarted: bool) -> int:
        meeting, nodes = self.role.meeting, self.role.nodes
        ip = node_ip(self.options.interface, node_addr=self.role.node_addr, nodes=nodes)
        try:
            gcs, dashboard, client = free_port(ip), free_port(ip), free_port(ip)
        except OSError as err:  # a MASTER_ADDR (or NodeAddr) that names another host
            raise ConfigError(f"{ip}: not an address of this node ({err.strerror or err}); start rank 0 where it points, or pass --interface") from None
        address = f"{ip}:{gcs}"
        log = meeting / "ray-head.log"
        head_options = [
            "--head",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
        ]
        with open(log, "ab") as out:
            head = self._ray_start(ip, address, head_options, out)
        try:
            api = f"http://127.0.0.1:{dashboard}"
            self._wait_for_nodes(api, head, log, need=1)
            # Atomic: a worker polling on NFS must never read an empty or half-written file.
            write_text_atomic(meeting / HEAD_FILE, json.dumps({"address": address}))  # workers may now join
            self._wait_for_nodes(api, head, log, need=nodes)
            return self._driver(job.name, JOBS[job.name].driver_args(job.args, address, restarted), f"{nodes} Ray node(s) up at {address}")
        finally:
            (meeting / DONE_FILE).touch()  # the workers leave first, before their GCS goes
            stop_process_group(head)

    def _driver(self, name: str, args: list[str], where: str) -> int:
        module = JOBS[name].module
        print(f"[cifarcam] {where}; running {module} {' '.join(args)}", flush=True)
        return subprocess.run([sys.executable, "-m", module, *args], cwd=DRIVER_CWD).returncode

    def _wait_for_nodes(self, dashboard: str, head: subprocess.Popen, log: Path, need: int) -> None:
        """Until ``need`` nodes are alive, as the head's state API (on its dashboard) reports them."""
        token = self.options.token_path.read_text().strip()
        request = urllib.request.Request(f"{dashboard}/api/v0/nodes?limit=10000", headers={"Authorization": f"Bearer {token}"})

        def alive() -> bool:
            if head.poll() is not None:
                raise RuntimeError(f"the Ray head exited with status {head.returncode}; see {log}")
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    nodes = json.load(response)["data"]["result"]["result"]
            except (OSError, ValueError, KeyError):  # still starting
                return False
            return sum(node["state"] == "ALIVE" for node in nodes) >= need

        wait_until(alive, self.options.join_timeout_s, f"Ray cluster ({need} of {self.role.nodes} nodes alive)")

    def worker(self) -> int:
        meeting = self.role.meeting
        head_file, done = meeting / HEAD_FILE, meeting / DONE_FILE
        wait_until(lambda: head_file.exists() or done.exists(), self.options.join_timeout_s, f"Ray head address in {meeting}")
        if done.exists():  # no Ray to join: the head failed before starting it, or it has come and gone
            if head_file.exists():
                return 0  # the job's outcome is rank 0's to report
            print(f"[cifarcam] the head ended before starting Ray (see rank 0's output); {done} says so", file=sys.stderr, flush=True)
            return 1
        address = json.loads(head_file.read_text())["address"]
        ip = node_ip(self.options.interface, head=address.rpartition(":")[0])
        with open(meeting / f"ray-worker-{self.role.rank}.log", "ab") as log:
            worker = self._ray_start(ip, address, [f"--address={address}"], log)
        try:
            wait_until(lambda: done.exists() or worker.poll() is not None, float("inf"), "driver")
        finally:
            stop_process_group(worker)
        return 0
