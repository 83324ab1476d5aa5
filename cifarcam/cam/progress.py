"""Live progress of the CAM stage on the driver: images explained per model, the rate, time left.

Ray Data's own counter counts blocks: with a few large blocks it sat at "MapBatches(CamActor): 0/1"
for minutes. Instead each CAM actor adds its batch's image count to one small counter actor, and the
driver polls it while Ray Data writes. On a terminal that is a live bar; in a log file (``ray job
logs``, SLURM's ``*_log.out``) a line every ``LOG_EVERY_S`` seconds.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

LOG_EVERY_S = 30.0


@ray.remote(num_cpus=0)
class ImageCounter:
    """How many images the CAM actors have explained so far."""

    def __init__(self) -> None:
        self.done = 0

    def add(self, images: int) -> None:
        self.done += images

    def count(self) -> int:
        return self.done


def run_with_progress(work: Callable[[], None], counter: ray.actor.ActorHandle, total: int, label: str, console: Console) -> None:
    """Run ``work`` (which blocks until the stage is written) while showing ``counter``'s count."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as err:  # re-raised on the driver's thread below
            failure.append(err)

    thread = threading.Thread(target=target, name="cam-stage", daemon=True)
    started = time.monotonic()
    thread.start()
    if console.is_terminal:
        with Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console
        ) as bar:
            task = bar.add_task(label, total=total, rate="")
            while thread.is_alive():
                thread.join(timeout=1.0)
                done = ray.get(counter.count.remote())
                bar.update(task, completed=done, rate=f"{done / max(time.monotonic() - started, 1e-9):.0f} images/s")
    else:
        last = started
        while thread.is_alive():
            thread.join(timeout=1.0)
            if time.monotonic() - last >= LOG_EVERY_S and thread.is_alive():
                last = time.monotonic()
                console.print(status_line(label, ray.get(counter.count.remote()), total, last - started))
    if failure:
        raise failure[0]
    console.print(status_line(label, total, total, time.monotonic() - started))


def status_line(label: str, done: int, total: int, elapsed_s: float) -> str:
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    left = f", about {(total - done) / rate:.0f} s left" if 0 < rate and done < total else ""
    return f"{label}: {done}/{total} images ({done / max(total, 1):.0%}), {rate:.1f} images/s, {elapsed_s:.0f} s{left}"
