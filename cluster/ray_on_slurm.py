"""The SLURM adapter of ``cluster/ray_bootstrap.py``: what runs on each node of an allocation that
``python -m cluster.slurm`` submitted through submitit.

It reads the node's part from SLURM and submitit (rank and node count from the job environment,
the attempt from SLURM_RESTART_COUNT, the CPUs from SLURM_CPUS_PER_TASK, the node's address from
its NodeAddr) and meets the other nodes in the job's submitit folder, which submitit already
requires on a filesystem every node sees: ``<logs>/<job id>/attempt-<n>/``. Everything else is
the bootstrap's.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import submitit

from cluster.ray_bootstrap import JobToRun, NodeRole, RayNodeOptions, run_node


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


def slurm_role(env: submitit.JobEnvironment, requeued: bool = False) -> NodeRole:
    """This node's part. `scontrol requeue` reruns the original submission, so SLURM's restart
    count says which attempt this is; ``requeued``: submitit's checkpoint said so too."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    cpus = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE")
    return NodeRole(
        rank=env.global_rank,
        nodes=env.num_tasks,
        attempt=max(restarts, int(requeued)),
        meeting=env.paths.folder / f"attempt-{restarts}",
        cpus=int(cpus) if cpus else None,
        node_addr=slurm_node_addr() if env.global_rank == 0 else None,
        label=str(env.job_id),
    )


@dataclass
class RayOnSlurm(submitit.helpers.Checkpointable):
    """The submitted callable: one task per node; global rank 0 is the Ray head and the driver."""

    job: JobToRun
    options: RayNodeOptions
    resume: bool = False  # set by checkpoint() when submitit requeues on preemption or timeout

    def __setstate__(self, state: dict) -> None:
        """A job pickled by the version that ran only the pipeline (queued across an upgrade, then
        requeued) had these fields instead."""
        if "job" not in state:
            options = RayNodeOptions(Path(state["token_path"]), state.get("object_store_bytes"), state.get("interface"), state.get("join_timeout_s", 600.0))
            state = {"job": JobToRun("pipeline", state["pipeline_args"]), "options": options, "resume": state.get("resume", False)}
        self.__dict__.update(state)

    def checkpoint(self, *args: object, **kwargs: object) -> submitit.helpers.DelayedSubmission:
        # Requeued after preemption or timeout: the job continues from what the run folder holds.
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self, resume=True))

    def __call__(self) -> int:
        role = slurm_role(submitit.JobEnvironment(), requeued=self.resume)
        rc = run_node(role, self.job, self.options)
        if role.rank == 0 and rc != 0:  # the SLURM job fails with the driver, and submitit's result says why
            raise RuntimeError(f"{self.job.name} exited with status {rc}")
        return rc
