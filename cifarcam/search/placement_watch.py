"""A search never waits silently for a trial's workers.

Ray Train reserves a trial's workers with one placement group (``[{CPU: c, GPU: g}] * workers``)
and waits ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s by default in Ray 2.60) for it; then it
removes the group and asks again, forever. When the cluster never frees what the trial needs (a
reservation that Ray itself left behind, another job, a node that never joins), the search prints
nothing and holds its head's resources until someone notices (issue 19).

``PlacementWatch`` is a Tune callback on the search's driver. It reads the cluster's placement
groups every few seconds (Ray's state API, served by the dashboard that every cifarcam head runs);
once a worker group of this search's own job has waited ``timeout_s`` without a break,
it ends the run as Ctrl-C does (SIGUSR1: Tune stops its trials and saves the experiment, so
``--resume`` continues it) and leaves one line that says which trial waits, for what, and what the
cluster holds. Train's own start timeout is set above ours (``train_start_timeout``), so Train's
retry, the path on which the hang was seen, never runs before the watch decides.

What it cannot see: workers whose group is placed but whose processes start slowly (an image pull,
a ``runtime_env`` install) wait in Ray Train's actor start-up, not in a placement group.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from cifarcam.errors import JobFailed
from cifarcam.search.progress import trial_name

logger = logging.getLogger(__name__)

# Read by Ray Train's controller; Train propagates it from the trial's process to the controller.
TRAIN_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
WAITING_STATES = ("PENDING", "RESCHEDULING")
# Ray's bookkeeping resources: neither what a trial asks for nor what a user would recognise.
_HIDDEN = ("memory", "object_store_memory", "node:", "accelerator_type:")


class SearchStalled(JobFailed):
    """A trial's workers could not be placed within ``scaling.start_timeout_s``."""


def poll_interval(start_timeout_s: float) -> float:
    """Seconds between readings: a few readings within the timeout, and no more than one per 5 s."""
    return min(5.0, start_timeout_s / 4)


def train_start_timeout(start_timeout_s: float) -> float:
    """Ray Train's own wait for a worker group: well past the moment the watch decides (a group is
    first seen up to one poll after it was created, and judged up to one poll after the timeout)."""
    return 2 * start_timeout_s + 30


def worker_bundle(cpus_per_worker: float, gpus_per_worker: float) -> dict[str, float]:
    """One worker's reservation as Ray's placement-group table reports it."""
    return {"CPU": float(cpus_per_worker)} | ({"GPU": float(gpus_per_worker)} if gpus_per_worker else {})


def describe(resources: dict[str, float]) -> str:
    """``2 CPU, 1 GPU``: the resources a user asked for, without Ray's bookkeeping entries."""
    # A created group's share shows up as ``CPU_group_<pg id>`` and ``CPU_group_<i>_<pg id>``: hidden,
    # the groups are summed separately (cluster_summary).
    shown = [f"{amount:g} {name}" for name, amount in sorted(resources.items()) if amount and not name.startswith(_HIDDEN) and "_group_" not in name]
    return ", ".join(shown) or "nothing"


def _total(groups: list[dict[str, Any]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for group in groups:
        for bundle in group["bundles"].values():
            for name, amount in bundle.items():
                total[name] = total.get(name, 0.0) + amount
    return total


def read_placement_groups(job: str | None = None) -> dict[str, dict[str, Any]]:
    """The placement groups of ``job`` (of the whole cluster without one), as
    ``{id: {"state", "job", "bundles": {index: resources}}}``."""
    from ray.util.state import list_placement_groups

    table = {}
    filters = [("creator_job_id", "=", job)] if job else None  # filtered by the server: every poll reads only ours
    # 10,000: the most the state API serves at once
    for group in list_placement_groups(filters=filters, detail=True, limit=10_000, timeout=10, raise_on_missing_output=False):
        bundles = {i: {k: float(v) for k, v in (b.get("unit_resources") or {}).items()} for i, b in enumerate(group.bundles or [])}
        table[group.placement_group_id] = {"state": group.state, "job": group.creator_job_id, "bundles": bundles}
    return table


def waiting_worker_groups(table: dict[str, dict[str, Any]], bundle: dict[str, float], workers: int, job: str) -> list[str]:
    """Ids of the placement groups of this search's job (another search on the cluster is not
    ours to judge) that wait to be placed and are shaped like its worker groups (Tune's own
    per-trial groups reserve only memory, and never match)."""
    return [
        pg_id
        for pg_id, group in table.items()
        if group["job"] == job and group["state"] in WAITING_STATES and len(group["bundles"]) == workers and all(b == bundle for b in group["bundles"].values())
    ]


def cluster_summary(table: dict[str, dict[str, Any]], total: dict[str, float], free: dict[str, float]) -> str:
    """What the cluster holds, in one clause: its resources, what is free, and what placement groups
    reserve (groups that hold only Ray's bookkeeping resources, such as Tune's, are left out)."""
    created = [g for g in table.values() if g["state"] == "CREATED" and describe(_total([g])) != "nothing"]
    reserved = f"{describe(_total(created))} reserved by {len(created)} placement group{'s' if len(created) != 1 else ''}"
    return f"the cluster has {describe(total)}, {describe(free)} free, {reserved}"


class PlacementWatch(Callback):
    """Ends the search with one line when a trial's workers wait longer than ``timeout_s``."""

    def __init__(
        self,
        bundle: dict[str, float],
        workers: int,
        timeout_s: float,
        model: str = "",
        job: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bundle, self.workers, self.timeout_s, self.clock = bundle, workers, timeout_s, clock
        self.poll_s = poll_interval(timeout_s)
        self.job = job  # the search's Ray job id (hex): its groups are the ones judged
        self.model = model  # the config's model, for trials whose search space does not pick one
        self.waiting_since: float | None = None  # since when a worker group has waited, without a break
        self.last_poll = float("-inf")
        self.starting: dict[str, str] = {}  # trial id -> name, for trials that reported nothing since they started
        self.verdict: str | None = None
        self.read_failed = False

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment. A resumed search gets this job's own watch
        # (tuner.make_tuner); readings of another process's clock would mean nothing anyway.
        return {**self.__dict__, "clock": time.monotonic, "waiting_since": None, "last_poll": float("-inf")}

    # -- Tune's callbacks ---------------------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.starting[trial.trial_id] = trial_name(trial, self.model)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.starting.pop(trial.trial_id, None)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.starting.pop(trial.trial_id, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.starting.pop(trial.trial_id, None)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        """Tune's loop calls this many times a second, on the driver's main thread."""
        now = self.clock()
        if self.verdict is not None or now - self.last_poll < self.poll_s:
            return
        self.last_poll = now
        import ray

        try:
            table = read_placement_groups(self.job)
        except Exception as err:  # a slow or restarting dashboard: skip one reading, never end the search
            if not self.read_failed:  # once: the next readings are likely to fail the same way
                logger.warning("placement watch: could not read the placement groups (%s); it goes on trying every %g s", err, self.poll_s)
            self.read_failed = True
            return
        if self.observe(table, now):
            # the whole cluster's groups, once: what holds the resources is likely another job's
            self.verdict = self.message(read_placement_groups(), ray.cluster_resources(), ray.available_resources())
            self.stop_search()

    # -- the decision -------------------------------------------------------------------------

    def observe(self, table: dict[str, dict[str, Any]], now: float) -> bool:
        """Record one reading of the placement-group table; True once a worker group has waited
        ``timeout_s`` without a reading that found none waiting."""
        if not waiting_worker_groups(table, self.bundle, self.workers, self.job):
            self.waiting_since = None
            return False
        if self.waiting_since is None:
            self.waiting_since = now
        return now - self.waiting_since >= self.timeout_s

    def message(self, table: dict[str, dict[str, Any]], total: dict[str, float], free: dict[str, float]) -> str:
        names = sorted(self.starting.values())
        who = f"trial {names[0]}" if len(names) == 1 else f"one of trials {', '.join(names)}" if names else "a trial (restarting its workers)"
        per_worker = describe(self.bundle)
        return (
            f"search: {who} could not place its {self.workers} worker{'s' if self.workers != 1 else ''} ({per_worker} each) "
            f"within scaling.start_timeout_s = {self.timeout_s:g} s; {cluster_summary(table, total, free)}; "
            "the search stopped and kept its finished trials and checkpoints: free those resources "
            "(`ray status` shows who holds them), then run again with --resume "
            "(with a longer scaling.start_timeout_s if placement is merely slow here)"
        )

    def stop_search(self) -> None:
        """End Tune's run as Ctrl-C does: Tune saves the experiment state (the waiting trial stays
        unfinished, so --resume runs it) and stops its trials. Tune handles SIGUSR1 only when it
        runs on the main thread; elsewhere the callback's exception ends the run instead."""
        handler = signal.getsignal(signal.SIGUSR1)
        if threading.current_thread() is threading.main_thread() and callable(handler):
            os.kill(os.getpid(), signal.SIGUSR1)
        else:
            raise SearchStalled(self.verdict)
