"""A search never waits silently for a trial's workers.

Ray Train reserves a trial's workers with one placement group (``[{CPU: c, GPU: g}] * workers``)
and waits ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s by default in Ray 2.60) for it; then it
removes the group and asks again, forever. When the cluster never frees what the trial needs (a
reservation that Ray itself left behind, another job, a node that never joins), the search prints
nothing and holds its head's resources until someone notices (issue 19).

``PlacementWatch`` is a Tune callback on the search's driver. It reads Ray's placement-group table
every few seconds; once a worker group of this search has waited ``timeout_s`` without a break,
it ends the run as Ctrl-C does (SIGUSR1: Tune stops its trials and saves the experiment, so
``--resume`` continues it) and leaves one line that says which trial waits, for what, and what the
cluster holds. Train's own start timeout is set above ours (``train_start_timeout``), so Train's
retry, the path on which the hang was seen, never runs before the watch decides.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from cifarcam.errors import JobFailed

# Read by Ray Train's controller; Train propagates it from the trial's process to the controller.
TRAIN_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
WAITING_STATES = ("PENDING", "RESCHEDULING")
# Ray's bookkeeping resources: neither what a trial asks for nor what a user would recognise.
_HIDDEN = ("memory", "object_store_memory", "node:", "accelerator_type:")


class SearchStalled(JobFailed):
    """A trial's workers could not be placed within ``scaling.start_timeout_s``."""


def train_start_timeout(start_timeout_s: float) -> float:
    """Ray Train's own wait for a worker group: twice ours, so that the watch decides first."""
    return 2 * start_timeout_s


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


def waiting_worker_groups(table: dict[str, dict[str, Any]], bundle: dict[str, float], workers: int) -> list[str]:
    """Ids of the placement groups that wait to be placed and are shaped like this search's
    worker groups (Tune's own per-trial groups reserve only memory, and never match)."""
    return [
        pg_id
        for pg_id, group in table.items()
        if group["state"] in WAITING_STATES and len(group["bundles"]) == workers and all(b == bundle for b in group["bundles"].values())
    ]


def cluster_summary(table: dict[str, dict[str, Any]], total: dict[str, float], free: dict[str, float]) -> str:
    """What the cluster holds, in one clause: its resources, what is free, what groups reserve."""
    created = [g for g in table.values() if g["state"] == "CREATED"]
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
        poll_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bundle, self.workers, self.timeout_s, self.poll_s, self.clock = bundle, workers, timeout_s, poll_s, clock
        self.model = model  # the config's model, for trials whose search space does not pick one
        self.waiting_since: float | None = None  # since when a worker group has waited, without a break
        self.last_poll = float("-inf")
        self.starting: dict[str, str] = {}  # trial id -> name, for trials that reported nothing since they started
        self.verdict: str | None = None

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment; a resumed search gets a fresh watch.
        return {**self.__dict__, "clock": time.monotonic}

    # -- Tune's callbacks ---------------------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.starting[trial.trial_id] = f"{trial.trial_id} ({trial.config.get('model', self.model)})".replace(" ()", "")

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
        from ray.util import placement_group_table

        table = placement_group_table()
        if self.observe(table, now):
            self.verdict = self.message(table, ray.cluster_resources(), ray.available_resources())
            self.stop_search()

    # -- the decision -------------------------------------------------------------------------

    def observe(self, table: dict[str, dict[str, Any]], now: float) -> bool:
        """Record one reading of the placement-group table; True once a worker group has waited
        ``timeout_s`` without a reading that found none waiting."""
        if not waiting_worker_groups(table, self.bundle, self.workers):
            self.waiting_since = None
            return False
        if self.waiting_since is None:
            self.waiting_since = now
        return now - self.waiting_since >= self.timeout_s

    def message(self, table: dict[str, dict[str, Any]], total: dict[str, float], free: dict[str, float]) -> str:
        who = f"trial {', '.join(sorted(self.starting.values()))}" if self.starting else "a trial (restarting its workers)"
        per_worker = describe(self.bundle)
        return (
            f"search: {who} could not place its {self.workers} worker{'s' if self.workers != 1 else ''} ({per_worker} each) "
            f"within scaling.start_timeout_s = {self.timeout_s:g} s; {cluster_summary(table, total, free)}; "
            "the search stopped and kept its finished trials and checkpoints: free those resources "
            "(`ray status` shows who holds them), then run again with --resume"
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
