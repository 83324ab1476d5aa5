"""The shared-folder check: each node's probe with real files and real flocks in other processes,
and the verdict on what the nodes saw. Its Ray path runs on two SLURM nodes (test_slurm.py)."""

from __future__ import annotations

import multiprocessing
import re
from pathlib import Path

import pytest
from filelock import FileLock

from cifarcam.shared_folder import NodeView, look, verdict


def _look_elsewhere(token_file: str, lock_file: str) -> NodeView:
    """The probe in another process, as a task on another node runs it."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(look, (token_file, lock_file))


def test_a_probe_reads_the_token_and_cannot_take_a_lock_another_process_holds(tmp_path):
    token_file, lock_file = tmp_path / "token", tmp_path / "token.lock"
    assert _look_elsewhere(str(token_file), str(lock_file)).token is None  # a node-local folder: no token there
    token_file.write_text("abc")
    with FileLock(lock_file):
        held = _look_elsewhere(str(token_file), str(lock_file))
    assert (held.token, held.took_lock) == ("abc", False)  # one kernel's flock is shared by all its processes
    assert _look_elsewhere(str(token_file), str(lock_file)).took_lock  # the probe can take it once released


@pytest.mark.parametrize(
    "views, expected",
    [
        ([NodeView("head", "t", False), NodeView("n2", "t", False)], None),
        (
            [NodeView("head", "t", False), NodeView("n2", None, False), NodeView("n3", "other", False)],
            r"^/run: not the same folder on node\(s\) n2, n3 as on head: their workers would write checkpoints and CAM parts to their own disks",
        ),
        (
            [NodeView("head", "t", False), NodeView("n2", "t", True)],
            r"^/run: file locks are local to each node \(node\(s\) n2 took a lock head holds\), so two jobs could both hold the run's lock; "
            r"mount the filesystem with global flock \(Lustre: flock, not localflock",
        ),
    ],
)
def test_the_verdict_names_the_nodes_that_do_not_share_the_folder_or_its_locks(views, expected):
    problem = verdict(Path("/run"), "head", "t", views)
    assert problem is None if expected is None else re.match(expected, problem), problem
