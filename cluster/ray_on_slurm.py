"""What runs on each node of a SLURM allocation: a Ray head or a Ray worker, and on the head the
pipeline's driver (`python -m jobs.pipeline`).

The nodes meet through the job's submitit folder, which submitit already requires on a filesystem
every node sees: the head writes its address there, the workers join it, and the head marks the end
so that the workers leave. Every port is picked free on its node, so several jobs (or several
virtual nodes) on one host never collide, and each attempt of a requeued job meets in its own folder.

Each node's address comes from SLURM (its NodeAddr), from the route to the head, or from
``--interface``; never from ``gethostbyname(hostname)``, which is 127.0.1.1 on Debian and Ubuntu
nodes. Gloo and NCCL get the same interface (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME): left to
themselves they resolve the host name too, and two DDP ranks on two such nodes never connect.

Why not ``ray symmetric-run`` (Ray 2.60), which also starts a head and workers and runs a command:
- The head is whichever node finds the given ``--address`` among its own interfaces, so the address
  and GCS port must be fixed before the job starts; a fixed port collides between jobs sharing a
  node, and a host name that resolves differently on the nodes starts no head or several
  (ray-project/ray#58875).
- Workers give up after 30 s (RAY_SYMMETRIC_RUN_CLUSTER_WAIT_TIMEOUT) and their readiness check
  fails against a head that is up (ray-project/ray#59795); nodes of a SLURM job may start minutes apart.
- It refuses ``--node-ip-address``, so the interface cannot be chosen, and it refuses to start
  where any Ray instance already runs on the node (another job's, or another virtual node's).
- It knows nothing of requeues: here each attempt meets in its own folder and resumes the search.
Submission, requeue and job arrays stay with submitit either way.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
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
from typing import IO

import psutil
import submitit

from cifarcam.errors import ConfigError
from cifarcam.ray_env import NODE_ENV
from cifarcam.results import write_text_atomic
from jobs.common import free_port

ROOT = Path(__file__).resolve().parent.parent
HEAD_FILE, DONE_FILE, STATUS_FILE = "ray-head.json", "driver-done", "driver-status.json"


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


def slurm_node_addr() -> str | None:
    """This node's NodeAddr, as slurmctld knows it: the address SLURM itself reaches the node on."""
    name = os.environ.get("SLURMD_NODENAME")
    if not name or shutil.which("scontrol") is None:
        return None
    try:
        shown = subprocess.run(["scontrol", "show", "node", "-o", name], capture_output=True, text=True, timeout=60).stdout
    except subprocess.TimeoutExpired:  # slurmctld busy: fall back to the host name's address
        return None
    match = re.search(r"\bNodeAddr=(\S+)", shown)
    return match.group(1) if match else None


def route_source(peer: str) -> str:
    """The local address the kernel would send from to reach ``peer`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))
        return s.getsockname()[0]


def node_ip(interface: str | None = None, head: str | None = None, nodes: int = 1) -> str:
    """The address the other nodes reach this node on.

    Not ``gethostbyname(hostname)``: Debian and Ubuntu map the host name to 127.0.1.1, and a
    multi-homed node may resolve to its management network. In order: the ``--interface`` given;
    on a worker, the source address of its route to the head; on the head, SLURM's NodeAddr for
    the node, and if that is a name that resolves to loopback on a multi-node job, the address
    of the default route (Ray's choice)."""
    if interface:
        return interface_address(interface)
    if head:
        return route_source(head)
    name = slurm_node_addr() or socket.gethostname()
    ip = socket.gethostbyname(name)
    if nodes == 1 or name == ip or not ipaddress.ip_address(ip).is_loopback:
        return ip  # one node may stay on loopback; a literal NodeAddr is what the admin chose
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


def wait_until(ready, timeout_s: float, what: str, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s")
        time.sleep(poll_s)


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


class AttemptEnded(BaseException):
    """SLURM is ending this attempt (requeue, preemption, scancel, time limit). A BaseException so
    that submitit records no result: the waiting client keeps waiting for the requeued attempt."""


def _attempt_ended(signum: int, frame: object) -> None:
    raise AttemptEnded(f"signal {signal.Signals(signum).name}")


@dataclass
class RayOnSlurm(submitit.helpers.Checkpointable):
    """The submitted callable: one task per node; global rank 0 is the Ray head and the driver."""

    pipeline_args: list[str]
    token_path: str  # per-submission Ray auth token, on the shared filesystem, mode 0600
    object_store_bytes: int | None = None
    join_timeout_s: float = 600.0
    interface: str | None = None  # the network interface Ray, Gloo and NCCL use (default: see node_ip)
    resume: bool = False  # set by checkpoint() when submitit requeues on preemption or timeout

    def checkpoint(self, *args: object, **kwargs: object) -> submitit.helpers.DelayedSubmission:
        # Requeued after preemption or timeout: the search resumes from its Tune storage.
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self, resume=True))

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        # `scontrol requeue` reruns the original submission: SLURM's restart count says so.
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        meeting = env.paths.folder / f"attempt-{attempt}"
        meeting.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.gettempdir()) / f"cfr-{env.job_id}-{attempt}-{env.global_rank}"  # short: AF_UNIX paths
        os.environ.update(
            NODE_ENV,  # token auth with this submission's own token
            RAY_AUTH_TOKEN_PATH=self.token_path,
            # the driver and Ray's workers find this venv's python first
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        # submitit ignores SIGTERM; here it ends the attempt at once: the finally blocks stop Ray,
        # and nothing reports the driver's forced exit as its result.
        signal.signal(signal.SIGTERM, _attempt_ended)
        try:
            if env.global_rank == 0:
                return self._head(env.num_tasks, meeting, temp, resume=self.resume or attempt > 0)
            return self._worker(meeting, temp)
        finally:
            shutil.rmtree(temp, ignore_errors=True)

    # -- Ray processes ----------------------------------------------------------------------

    def _ray_start(self, ip: str, address: str, extra: list[str], temp: Path, log: IO) -> subprocess.Popen:
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--block",
            "--disable-usage-stats",
            f"--node-ip-address={ip}",
            f"--temp-dir={temp}",
            f"--dashboard-agent-listen-port={free_port(ip)}",
            f"--metrics-export-port={free_port(ip)}",
        ]
        cpus = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE")
        if cpus:
            cmd.append(f"--num-cpus={cpus}")
        if self.object_store_bytes:
            cmd.append(f"--object-store-memory={self.object_store_bytes}")
        # Ray's workers (the DDP ranks) inherit this environment. RAY_ADDRESS: Ray's own clients in
        # them (Ray Train's PlacementGroupCleaner) ask this cluster, not another on the same host.
        env = os.environ | collective_interfaces(ip) | {"RAY_ADDRESS": address}
        # its own session, so that stopping it stops exactly its raylet, GCS and dashboard
        return subprocess.Popen(cmd + extra, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def _head(self, num_nodes: int, meeting: Path, temp: Path, resume: bool) -> int:
        ip = node_ip(self.interface, nodes=num_nodes)
        gcs, dashboard, client = free_port(ip), free_port(ip), free_port(ip)
        address = f"{ip}:{gcs}"
        log = meeting / "ray-head.log"
        with open(log, "ab") as out:
            head = self._ray_start(
                ip,
                address,
                [
                    "--head",
                    f"--port={gcs}",
                    "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}",
                    f"--ray-client-server-port={client}",
                ],
                temp,
                out,
            )
        try:
            api = f"http://127.0.0.1:{dashboard}"
            self._wait_for_nodes(api, num_nodes, head, log, need=1)
            # Atomic: a worker polling on NFS must never read an empty or half-written file.
            write_text_atomic(meeting / HEAD_FILE, json.dumps({"address": address}))  # workers may now join
            self._wait_for_nodes(api, num_nodes, head, log, need=num_nodes)
            # A requeued attempt continues what an earlier one started, or starts it: the first may
            # have ended before the search began (--resume alone would then refuse the folder).
            again = ["--resume-if-started"] if resume and "--resume" not in self.pipeline_args else []
            args = [*self.pipeline_args, "--address", address, *again]
            print(f"[cifarcam] {num_nodes} Ray node(s) up at {address}; running jobs.pipeline {' '.join(args)}", flush=True)
            rc = subprocess.run([sys.executable, "-m", "jobs.pipeline", *args], cwd=ROOT).returncode
        finally:
            (meeting / DONE_FILE).touch()
            stop_process_group(head)
        write_text_atomic(meeting.parent / STATUS_FILE, json.dumps({"returncode": rc, "resumed": resume}))
        if rc != 0:  # the SLURM job fails with the driver, and submitit's result says why
            raise RuntimeError(f"jobs.pipeline exited with status {rc}")
        return rc

    def _wait_for_nodes(self, dashboard: str, num_nodes: int, head: subprocess.Popen, log: Path, need: int) -> None:
        """Until ``need`` nodes are alive, as the head's state API (on its dashboard) reports them."""
        token = Path(self.token_path).read_text().strip()
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

        wait_until(alive, self.join_timeout_s, f"Ray cluster ({need} of {num_nodes} nodes alive)")

    def _worker(self, meeting: Path, temp: Path) -> int:
        wait_until((meeting / HEAD_FILE).exists, self.join_timeout_s, f"Ray head address in {meeting}")
        address = json.loads((meeting / HEAD_FILE).read_text())["address"]
        ip = node_ip(self.interface, head=address.rpartition(":")[0])
        with open(meeting / f"ray-worker-{submitit.JobEnvironment().global_rank}.log", "ab") as log:
            worker = self._ray_start(ip, address, [f"--address={address}"], temp, log)
        try:
            wait_until(lambda: (meeting / DONE_FILE).exists() or worker.poll() is not None, float("inf"), "driver")
        finally:
            stop_process_group(worker)
        return 0
