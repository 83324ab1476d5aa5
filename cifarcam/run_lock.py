"""The run folder's lock: held by a search for as long as it runs, and by the CAM stage while it
plans, publishes and tidies its staging. It names its holder (host, pid, job, since), so that a
job that must wait says for whom, and one that must not wait fails in one line that says it.

flock-based (filelock): the lock dies with its process, on a crash or a SLURM requeue too. On a
filesystem whose flock is node-local (Lustre mounted with localflock, BeeGFS by default) two hosts
could both hold it; README "One run folder, several jobs" says which filesystems work.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from cifarcam.errors import UserError
from cifarcam.results import write_text_atomic
from cifarcam.run_layout import RunLayout

LOCK_MODE = 0o666  # lock files others in a shared project folder can take too
PATIENCE_S = 30.0  # how long a waiting job waits silently before it says for whom


def holder(run_dir: Path) -> str:
    """Who holds the run's lock, as its holder file says (it may have just let go)."""
    try:
        h = json.loads(RunLayout(run_dir).lock_holder.read_text())
        return f"{h['job']} (pid {h['pid']} on {h['host']}, since {h['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def run_lock(run_dir: Path, job: str, wait: bool = True) -> Iterator[None]:
    """Hold ``run_dir``'s lock. ``wait``: block, with one line on stderr after PATIENCE_S naming
    the holder; otherwise fail at once with a UserError naming it. Never nest two of these."""
    layout = RunLayout(run_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(layout.lock, mode=LOCK_MODE)
    try:
        lock.acquire(timeout=PATIENCE_S if wait else 0)
    except Timeout:
        if not wait:
            raise UserError(f"{run_dir}: in use by {holder(run_dir)}; wait for it to end, or use another folder") from None
        print(f"waiting for {run_dir}, in use by {holder(run_dir)}", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_text_atomic(layout.lock_holder, json.dumps({"job": job, "pid": os.getpid(), "host": socket.gethostname(), "since": since}))
        yield
    finally:
        layout.lock_holder.unlink(missing_ok=True)
        lock.release()
