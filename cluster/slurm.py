"""Run the pipeline on a SLURM allocation through submitit: a Ray head on the first node, Ray
workers on the others, the driver on the head; requeued on preemption or timeout, and resumed.

    python -m cluster.slurm [--nodes N] [--gpus-per-node G] [--cpus-per-task C] [--partition P]
        [--account A] [--time MIN] [--qos Q] [--constraint X] [--sbatch-arg KEY=VALUE ...]
        [--logs DIR] [--detach] --config configs/paper.yaml --out /shared/results/paper [...]

    python -m cluster.slurm --nodes 2 --array configs/a.yaml configs/b.yaml --out /shared/results

Every `python -m jobs.pipeline` option is an option here too (that parser is this one's parent),
checked here and handed to the driver as given, with --config and --out made absolute; but not
--address, --num-cpus and --num-gpus, which the job's own Ray cluster sets (--gpus-per-node asks SLURM for GPUs). With --array, each config is one
array task writing to <--out>/<config name>. The run folder and --logs must be on a filesystem
every node sees. Without --detach the command waits and exits with the
driver's status. The older form, with `--` before the jobs.pipeline options, still works.
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
from jobs import cam, pipeline
from jobs.common import console, run

PROG = "python -m cluster.slurm"
OWN_CLUSTER = ("--address", "--num-cpus", "--num-gpus")  # pipeline options the job's own Ray cluster sets
PER_JOB = ("--config", "--out")  # pipeline options each job gets its own, absolute value of


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
    """cluster.slurm's own options (the allocation's): a parent of ``parser``, and alone in
    ``launcher_options``, where its errors are one line (no usage; ``parser`` prints it)."""
    launcher = argparse.ArgumentParser(prog=PROG, usage=argparse.SUPPRESS, add_help=False, allow_abbrev=False)
    p = launcher.add_argument_group("SLURM allocation (cluster.slurm's own options; all others are jobs.pipeline's)")
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
    p.add_argument("--array", nargs="+", type=Path, default=None, metavar="CONFIG", help="one array task per config, each its own sweep")
    p.add_argument("--array-parallelism", type=_positive, default=None, help="array tasks running at once (default: all)")
    p.add_argument("--detach", action="store_true", help="print the job id and return instead of waiting for the result")
    return launcher


def parser() -> argparse.ArgumentParser:
    """jobs.pipeline's parser as the parent, so that a new pipeline option needs no change here;
    its -h/--help lists both (hence add_help=False here). No abbreviations: an abbreviated
    pipeline option would not be told apart from the launcher's in ``launcher_options``."""
    return argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[pipeline.parser(), launcher_parser()],
        add_help=False,
        allow_abbrev=False,
    )


def launcher_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's options, and the rest as given: what every job runs jobs.pipeline with.
    --config and --out are set aside (each job gets its own), and --address and --num-cpus too,
    to be refused."""
    p = launcher_parser()
    for option in (*PER_JOB, *OWN_CLUSTER):
        p.add_argument(option)
    return p.parse_known_args(argv)


def accept_separator(argv: list[str]) -> list[str]:
    """The older form put `--` before the jobs.pipeline options; accepted (quietly: scripts parse
    the first line of output) for a while. argparse would take what follows it as positionals."""
    if "--" not in argv:
        return argv
    cut = argv.index("--")
    return argv[:cut] + argv[cut + 1 :]


def pipeline_runs(argv: list[str]) -> tuple[argparse.Namespace, list[list[str]]]:
    """The launcher's options, and one jobs.pipeline argument list per job, with absolute paths
    (nodes need not share a cwd), checked here so that a mistake costs no allocation."""
    from cifarcam.results import check_writable

    own, rest = launcher_options(argv)
    for option in OWN_CLUSTER:
        if getattr(own, option.lstrip("-").replace("-", "_")) is not None:
            raise ConfigError(f"{option}: set by cluster.slurm (the job's own Ray cluster); remove it")
    if own.array and own.config:
        raise ConfigError("--array: each config is one array task; do not pass --config as well")
    # The whole command line; --config is required there, and with --array the first config stands
    # in for it. argparse's own mistakes (and --help) exit here, before submitting.
    args = parser().parse_args([*argv, "--config", str(own.array[0])] if own.array else argv)
    cam.settings_from(args)
    from cifarcam.search import check_resumable
    from cifarcam.training import load_experiment  # torch: after --help, which exits above

    runs = []
    for config in own.array or [Path(args.config)]:
        cfg = load_experiment(config)
        out = (args.out / cfg.name if own.array and args.out else args.out) or Path("results") / cfg.name
        check_resumable(cfg, out.resolve(), args.resume or args.resume_if_started, must_exist=args.resume)  # a mistyped --out costs no allocation
        check_writable(out)
        runs.append([*rest, "--config", str(Path(config).resolve()), "--out", str(out.resolve())])
    return own, runs


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
    from cifarcam.safe_pickle import others_can_write

    logs = logs.resolve()
    try:
        logs.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--logs {logs}: cannot create it ({err.strerror or err}); choose a folder on a filesystem every node sees") from None
    problem = others_can_write(logs)
    if problem:
        raise UserError(
            f"--logs {logs}: {problem}, and each node unpickles its job from there; check who changed it, then chmod go-w {logs}, or choose another --logs"
        )
    return logs


def new_token(logs: Path) -> Path:
    """A Ray auth token for this submission's clusters, readable by its owner only."""
    path = logs.resolve() / "tokens" / secrets.token_hex(8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(secrets.token_hex(32))
    return path


def driver_status(job) -> int:
    """The driver's exit status, as the head wrote it; 1 when the job ended without one."""
    from cluster.ray_on_slurm import STATUS_FILE

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
    from cluster.ray_on_slurm import RayOnSlurm

    opts, runs = pipeline_runs(accept_separator(sys.argv[1:] if argv is None else argv))
    executor = make_executor(opts)
    token = new_token(opts.logs)
    tasks = [RayOnSlurm(args, str(token), opts.object_store_memory, interface=opts.interface) for args in runs]
    try:
        jobs = submit(executor, tasks, bool(opts.array))
    except UserError:
        token.unlink()  # nothing was queued that could use it
        raise
    for job, args in zip(jobs, runs, strict=True):
        print(f"submitted job {job.job_id} ({opts.nodes} node(s)): jobs.pipeline {' '.join(args)}; logs in {job.paths.folder}", flush=True)
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
