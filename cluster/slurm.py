"""Run any cifarcam job on a SLURM allocation through submitit: a Ray head on the first node, Ray
workers on the others, the job's driver on the head; requeued on preemption or timeout, and resumed.

    python -m cluster.slurm [allocation options] JOB [that job's options]

    python -m cluster.slurm --nodes 2 --gpus-per-node 4 --partition gpu pipeline --config configs/paper.yaml --out /shared/results/paper
    python -m cluster.slurm --nodes 2 --gpus-per-node 4 cam --run /shared/results/paper --methods gradcam++,layercam --layers layer3,layer4
    python -m cluster.slurm --partition cpu report --run /shared/results/paper
    python -m cluster.slurm --nodes 2 --array configs/a.yaml configs/b.yaml pipeline --out /shared/results

JOB is one of pipeline, search, cam and report; its options are that job's (`python -m jobs.JOB
--help`), checked here before anything is queued and handed to its driver as given, with paths
made absolute; but not --address, --num-cpus and --num-gpus, which the job's own Ray cluster sets
(--gpus-per-node asks SLURM for GPUs). The report uses no Ray and runs on one node. With --array
(pipeline, search), each config is one array task writing to <--out>/<config name>. The run folder
and --logs must be on a filesystem every node sees. Without --detach the command waits and exits
with the driver's status.

The older form, without JOB, runs the pipeline: `python -m cluster.slurm --nodes 2 --config X
--out Y`, its options mixed with the allocation's (and an optional `--` before them).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import secrets
import shutil
import sys
from pathlib import Path

from cifarcam.errors import ConfigError, UserError
from cluster.job_kinds import JOBS, JobKind, checked_runs
from jobs.common import console, run

PROG = "python -m cluster.slurm"


def _sbatch_line(text: str) -> str:
    """A value submitit writes into the job script's ``#SBATCH`` lines: a line break there would
    end the comment and run the rest as a command (or add sbatch options) on the cluster."""
    if "\n" in text or "\r" in text:
        raise argparse.ArgumentTypeError(f"must be one line (it becomes an #SBATCH line), got {text!r}")
    return text


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = _sbatch_line(text).partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (an sbatch option without its dashes), got {text!r}")
    return key.lstrip("-"), value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def launcher_parser() -> argparse.ArgumentParser:
    """cluster.slurm's own options (the allocation's), before JOB. Its errors are one line (no
    usage: ``help_parser`` shows it, and each job's parser shows its own)."""
    launcher = argparse.ArgumentParser(prog=PROG, usage=argparse.SUPPRESS, add_help=False, allow_abbrev=False)
    p = launcher.add_argument_group("SLURM allocation (cluster.slurm's own options, before JOB)")
    p.add_argument("--nodes", type=_positive, default=1, help="nodes in the allocation; Ray runs one node per SLURM node (default: 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs to request on each node (default: 0)")
    p.add_argument("--cpus-per-task", type=_positive, default=None, help="CPUs on each node for Ray (one task per node; default: SLURM's)")
    p.add_argument("--mem-gb", type=_positive, default=None, help="memory per node in GB (default: SLURM's)")
    p.add_argument("--partition", type=_sbatch_line, default=None)
    p.add_argument("--account", type=_sbatch_line, default=None)
    p.add_argument("--qos", type=_sbatch_line, default=None)
    p.add_argument("--constraint", type=_sbatch_line, default=None)
    p.add_argument("--time", type=_positive, default=240, help="time limit per attempt in minutes (default: 240)")
    p.add_argument("--requeues", type=int, default=3, help="times a timed-out job is requeued to continue (default: 3; preemptions do not count)")
    p.add_argument(
        "--sbatch-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE", help="any other sbatch option, e.g. mail-type=END (repeatable)"
    )
    p.add_argument("--job-name", type=_sbatch_line, default="cifarcam")
    p.add_argument(
        "--logs",
        type=lambda text: Path(_sbatch_line(text)),  # the job's --output and --error lines
        default=Path("results/slurm"),
        help="submitit folder, shared by all nodes; each job logs to <logs>/<job id> (default: results/slurm)",
    )
    p.add_argument(
        "--interface",
        default=None,
        metavar="NAME",
        help="network interface the nodes reach each other on, for Ray, Gloo and NCCL, e.g. ib0, or a list tried in order, e.g. ib0,eth1 "
        "(default: SLURM's NodeAddr on the head, the route to the head on workers)",
    )
    p.add_argument("--object-store-memory", type=int, default=None, metavar="BYTES", help="Ray object store per node (default: Ray's, 30%% of memory)")
    p.add_argument("--array", nargs="+", type=Path, default=None, metavar="CONFIG", help="one array task per config, each its own sweep (pipeline, search)")
    p.add_argument("--array-parallelism", type=_positive, default=None, help="array tasks running at once (default: all)")
    p.add_argument("--detach", action="store_true", help="print the job id and return instead of waiting for the result")
    return launcher


def help_parser() -> argparse.ArgumentParser:
    """What `python -m cluster.slurm --help` shows: the allocation's options and the jobs (each
    job's own options: `python -m cluster.slurm JOB --help`)."""
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[launcher_parser()], allow_abbrev=False
    )
    p.add_argument("job", metavar="JOB", choices=list(JOBS), help=f"one of {', '.join(JOBS)}; its options follow it")
    return p


def split_command(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """(the allocation's options, JOB, the job's options). The allocation's options come first;
    JOB is the first word that is not one of them or their values. Without JOB (the older form,
    where the first word the launcher does not know is a pipeline option, or `--`): (argv, None, [])."""
    actions = launcher_parser()._option_string_actions  # noqa: SLF001 (argparse has no public map of option to arity)
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in JOBS:
            return argv[:i], token, argv[i + 1 :]
        if token in ("-h", "--help"):
            help_parser().parse_args(["--help"])  # prints and exits
        action = actions.get(token.split("=", 1)[0])
        if action is None:
            return argv, None, []
        i += 1
        if "=" in token or action.nargs == 0:
            continue
        if action.nargs == "+":  # --array's configs run up to JOB or the next option
            while i < len(argv) and argv[i] not in JOBS and not argv[i].startswith("-"):
                i += 1
        else:
            i += 1
    return argv, None, []


def older_form(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The pipeline's options mixed with the allocation's (``split_command`` found no JOB): the
    allocation's options, and the rest as given. A `--` before the pipeline's options, as the
    first form of this command had it, is dropped (argparse would take what follows as positionals)."""
    if "--" in argv:
        cut = argv.index("--")
        argv = argv[:cut] + argv[cut + 1 :]
    return launcher_parser().parse_known_args(argv)


def job_runs(argv: list[str]) -> tuple[argparse.Namespace, JobKind, list[list[str]]]:
    """The allocation's options, the job, and one checked argument list per SLURM job (one per
    --array config, else one), with absolute paths: a mistake costs no allocation."""
    launcher_argv, name, job_argv = split_command(argv)
    if name is None:
        own, job_argv = older_form(argv)
        kind, prog = JOBS["pipeline"], PROG
    else:
        own = launcher_parser().parse_args(launcher_argv)
        kind, prog = JOBS[name], f"{PROG} [allocation options] {name}"
    if not kind.uses_ray and own.nodes > 1:
        raise ConfigError(f"--nodes {own.nodes}: {kind.name} uses no Ray and runs on one node; ask for --nodes 1")
    return own, kind, checked_runs(kind, job_argv, prog, "cluster.slurm", own.array)


def make_executor(opts: argparse.Namespace):
    import submitit

    if shutil.which("sbatch") is None:
        raise UserError("sbatch: not found on PATH; cluster.slurm runs on a SLURM login node")
    executor = submitit.AutoExecutor(folder=private_logs(opts.logs) / "%j", cluster="slurm", slurm_max_num_timeout=opts.requeues)
    params = dict(
        name=opts.job_name,
        nodes=opts.nodes,
        tasks_per_node=1,
        timeout_min=opts.time,
        slurm_partition=opts.partition,
        slurm_account=opts.account,
        slurm_qos=opts.qos,
        slurm_constraint=opts.constraint,
        slurm_additional_parameters=dict(opts.sbatch_arg),
        slurm_array_parallelism=opts.array_parallelism,
        cpus_per_task=opts.cpus_per_task,
        gpus_per_node=opts.gpus_per_node or None,
        mem_gb=opts.mem_gb,
    )
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None and v != {}})
    return executor


def private_logs(logs: Path) -> Path:
    """``--logs``, created for this user alone if new. submitit pickles each job there, and each
    node unpickles it (again on every requeue): whoever can write the folder runs code as this
    user. A folder someone else owns or may write is refused (``others_can_write``)."""
    from cluster.ray_bootstrap import private_folder

    return private_folder(logs, "--logs", "each node unpickles its job from there")


def new_token(logs: Path) -> Path:
    """A Ray auth token for this submission's clusters, readable by its owner only."""
    path = logs.resolve() / "tokens" / secrets.token_hex(8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(secrets.token_hex(32))
    return path


def driver_status(job) -> int:
    """The driver's exit status, as the head wrote it; 1 when the job ended without one."""
    from cluster.ray_bootstrap import STATUS_FILE

    status = job.paths.folder / STATUS_FILE
    if status.is_file():
        return int(json.loads(status.read_text())["returncode"])
    console.print(f"job {job.job_id}: ended {job.state} without running the driver to the end; see {job.paths.stderr}")
    return 1


def submit(executor, tasks: list, array: bool) -> list:
    """The submitted jobs. sbatch's refusal (CPUs, memory, a partition or a time SLURM cannot
    give) ends in one line with sbatch's reasons, not submitit's traceback and sbatch's echo."""
    import submitit

    echoed = io.StringIO()  # submitit prints sbatch's stderr before raising it
    try:
        with contextlib.redirect_stderr(echoed):
            if array:
                with executor.batch():
                    return [executor.submit(task) for task in tasks]
            return [executor.submit(tasks[0])]
    except submitit.core.utils.FailedJobError as refused:
        reasons = [line.strip().removeprefix("sbatch: error: ") for line in str(refused).splitlines() if line.strip()]
        raise UserError(f"sbatch refused the job: {'; '.join(reasons) or 'no reason given'}") from None


def main(argv: list[str] | None = None) -> int:
    from cluster.ray_bootstrap import JobToRun, RayNodeOptions
    from cluster.ray_on_slurm import RayOnSlurm

    opts, kind, runs = job_runs(sys.argv[1:] if argv is None else argv)
    executor = make_executor(opts)
    token = new_token(opts.logs)
    options = RayNodeOptions(token, opts.object_store_memory, opts.interface)
    tasks = [RayOnSlurm(JobToRun(kind.name, args), options) for args in runs]
    try:
        jobs = submit(executor, tasks, bool(opts.array))
    except UserError:
        token.unlink()  # nothing was queued that could use it
        raise
    for job, task in zip(jobs, tasks, strict=True):
        print(f"submitted job {job.job_id} ({opts.nodes} node(s)): {task.job.describe()}; logs in {job.paths.folder}", flush=True)
    if opts.detach:
        return 0
    for job in jobs:
        job.wait()
    codes = [driver_status(job) for job in jobs]
    for job, code in zip(jobs, codes, strict=True):
        console.print(f"job {job.job_id}: driver exit status {code}; logs in {job.paths.folder}")
    return max(codes)


if __name__ == "__main__":
    run(main)
