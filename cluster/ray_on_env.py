"""The same Ray cluster and job as ``cluster.slurm``, started by any launcher that runs one process
per node and tells each its rank: torchrun, mpirun, pdsh, ssh in a loop, a Kubernetes Indexed Job.
The scheduler-neutral part is ``cluster/ray_bootstrap.py``; this is its second adapter.

    # by hand, ssh or pdsh: one process per node
    RANK=0 WORLD_SIZE=2 MASTER_ADDR=10.0.0.1 python -m cluster.ray_on_env --meeting /shared/meet/run1 cam --run /shared/results/paper
    RANK=1 WORLD_SIZE=2 python -m cluster.ray_on_env --meeting /shared/meet/run1 cam --run /shared/results/paper
    # torchrun (one process per node; its restarts are this adapter's attempts)
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank $R --master-addr HEAD -m cluster.ray_on_env --meeting /shared/meet/$JOB pipeline --config ...
    # Open MPI, MPICH, Intel MPI (--bind-to none: mpirun would pin Ray, and every trial, to one core)
    mpirun -np 2 --map-by ppr:1:node --bind-to none python -m cluster.ray_on_env --meeting /shared/meet/$JOB search --config ...

What it reads, in order:
- rank and node count: RANK / WORLD_SIZE (torchrun, or set by hand), else OMPI_COMM_WORLD_RANK /
  OMPI_COMM_WORLD_SIZE (Open MPI), else PMI_RANK / PMI_SIZE (MPICH, Intel MPI);
- rank 0's address: --interface, else MASTER_ADDR, else the host name's (never loopback when there
  are several nodes); the others use their route to rank 0;
- the attempt: TORCHELASTIC_RESTART_COUNT (torchrun's restarts), else 0;
- CPUs and GPUs: --cpus-per-node / --gpus-per-node, else Ray's own count.

The nodes meet in ``--meeting`` (a folder every node sees, one per launch, private to the user:
the head's address and this launch's Ray token are there), under ``attempt-<n>``. Rank 0 checks
the job's options before Ray starts, as ``cluster.slurm`` does before queueing, runs the driver and
exits with its status; the others exit 0 once it ends. The launcher's own variables are then
removed from the environment: Ray's workers, the DDP ranks, must not take torchrun's rank, world
size and store for Ray Train's.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from cifarcam.errors import ConfigError, UserError
from cluster.job_kinds import JOBS, checked_runs
from cluster.ray_bootstrap import DONE_FILE, HEAD_FILE, AttemptEnded, JobToRun, NodeRole, RayNodeOptions, private_folder, run_node
from jobs.common import run

PROG = "python -m cluster.ray_on_env"
TOKEN_FILE = "ray-token"

# (rank, size) variables, in the order they are read: torchrun's, Open MPI's, PMI's (MPICH, Intel MPI)
RANK_VARIABLES = (("RANK", "WORLD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"))


def _count(text: str, least: int = 0) -> int:
    value = int(text)
    if value < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--meeting", type=Path, required=True, help="folder every node sees, one per launch: the nodes meet there")
    p.add_argument("--interface", default=None, metavar="NAME", help="network interface for Ray, Gloo and NCCL, e.g. ib0, or a list tried in order")
    p.add_argument("--cpus-per-node", type=lambda text: _count(text, 1), default=None, help="CPUs Ray may use on each node (default: Ray's count)")
    p.add_argument("--gpus-per-node", type=_count, default=None, help="GPUs Ray may use on each node (default: Ray's count)")
    p.add_argument("--object-store-memory", type=int, default=None, metavar="BYTES", help="Ray object store per node (default: Ray's)")
    p.add_argument("--join-timeout", type=float, default=600.0, metavar="S", help="seconds to wait for every node to join (default: 600)")
    p.add_argument("job", choices=list(JOBS), metavar="JOB", help=f"one of {', '.join(JOBS)}")
    p.add_argument("job_args", nargs=argparse.REMAINDER, metavar="...", help="that job's options (python -m jobs.JOB --help)")
    return p


def rank_and_size(environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """This node's rank and the node count, from the first launcher's variables that are set."""
    for rank, size in RANK_VARIABLES:
        if rank in environ and size in environ:
            try:
                values = int(environ[rank]), int(environ[size])
            except ValueError:
                raise ConfigError(f"{rank}={environ[rank]!r}, {size}={environ[size]!r}: expected integers") from None
            if not 0 <= values[0] < values[1]:
                raise ConfigError(f"{rank}={values[0]}, {size}={values[1]}: expected 0 <= {rank} < {size}")
            if int(environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
                raise ConfigError(
                    f"LOCAL_WORLD_SIZE={environ['LOCAL_WORLD_SIZE']}: one process per node (torchrun --nproc-per-node 1); Ray uses the node's GPUs"
                )
            return values
    names = ", ".join(f"{r}/{s}" for r, s in RANK_VARIABLES)
    raise ConfigError(f"no rank and node count in the environment: set one of {names} (e.g. RANK=0 WORLD_SIZE=2 on the first of two nodes)")


# What a launcher sets for its own processes, which Ray's workers (the DDP ranks) must not inherit:
# torch.distributed's env:// rendezvous would take torchrun's rank, world size and agent store
# (TORCHELASTIC_USE_AGENT_STORE) for Ray Train's, and wait for a store that nobody serves.
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
)
LAUNCHER_PREFIXES = ("TORCHELASTIC_", "OMPI_COMM_WORLD_", "PMI_")


def without_launcher_variables(environ: MutableMapping[str, str]) -> None:
    """Remove, once the node's role is read, every variable the launcher set for its own ranks."""
    for name in [n for n in environ if n in LAUNCHER_VARIABLES or n.startswith(LAUNCHER_PREFIXES)]:
        del environ[name]


def node_role(meeting: Path, cpus: int | None, gpus: int | None, environ: Mapping[str, str] = os.environ) -> NodeRole:
    rank, nodes = rank_and_size(environ)
    attempt = int(environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return NodeRole(
        rank=rank,
        nodes=nodes,
        attempt=attempt,
        meeting=meeting / f"attempt-{attempt}",
        cpus=cpus,
        gpus=gpus,
        node_addr=environ.get("MASTER_ADDR") if rank == 0 else None,
        label=f"{os.getpid()}",
    )


def start_head(role: NodeRole, name: str, job_argv: list[str]) -> tuple[JobToRun, Path]:
    """Rank 0's checks, before Ray starts anywhere: the job's options, and a meeting folder this
    launch has not used; then this launch's Ray token. A failure marks the attempt ended, so that
    the other nodes stop waiting for a head."""
    try:
        if (role.meeting / HEAD_FILE).exists() or (role.meeting / DONE_FILE).exists():
            raise UserError(
                f"--meeting {role.meeting.parent}: attempt {role.attempt} already ran there; give each launch its own folder (e.g. with its job id)"
            )
        kind = JOBS[name]
        if not kind.uses_ray and role.nodes > 1:
            print(f"[cifarcam] {name} uses no Ray: it runs on rank 0 alone", flush=True)
        # checked as the driver will run: a restarted search continues what the first attempt began
        restarted_argv = kind.driver_args(job_argv, None, role.attempt > 0)
        (args,) = checked_runs(kind, restarted_argv, f"{PROG} [options] {name}", "cluster.ray_on_env")
        token = role.meeting / TOKEN_FILE
        token.touch(mode=0o600)
        token.write_text(secrets.token_hex(32))
        return JobToRun(name, args), token
    except BaseException:
        (role.meeting / DONE_FILE).touch()
        raise


def main(argv: list[str] | None = None) -> int:
    opts = parser().parse_args(sys.argv[1:] if argv is None else argv)
    role = node_role(
        private_folder(opts.meeting, "--meeting", "the nodes read the head's address and the Ray token from there"), opts.cpus_per_node, opts.gpus_per_node
    )
    without_launcher_variables(os.environ)
    role.meeting.mkdir(exist_ok=True)
    if role.rank == 0:
        job, token = start_head(role, opts.job, opts.job_args)
    else:  # the head writes the token before its address; the workers read it after
        job, token = JobToRun(opts.job, opts.job_args), role.meeting / TOKEN_FILE
    options = RayNodeOptions(token, opts.object_store_memory, opts.interface, opts.join_timeout)
    try:
        return run_node(role, job, options)
    except AttemptEnded:
        return 143  # SIGTERM's status: the launcher ended this attempt


if __name__ == "__main__":
    run(main)
