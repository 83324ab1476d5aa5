"""The run a report draws on (its DuckDB connection, config and test images) and the report's
unit, the section, whatever the medium (terminal, Markdown, HTML)."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cifarcam.errors import UserError
from cifarcam.report.views import connect, has_view
from cifarcam.run_layout import RunLayout


@dataclass
class Section:
    """One part of the report, whatever the medium: figures are PNG names in the report folder."""

    title: str
    text: str = ""
    table: pd.DataFrame | None = None
    figures: list[str] = field(default_factory=list)


class ReportRun:
    """A run's Parquet (as DuckDB views), config and test images."""

    def __init__(self, run_dir: Path) -> None:
        from cifarcam.config import load_config
        from cifarcam.data import load_splits

        self.run_dir = Path(run_dir)
        self.con = connect(self.run_dir)
        self.out = RunLayout(self.run_dir).report
        try:  # before any work: a run on a read-only share, or a file in the way
            self.out.mkdir(parents=True, exist_ok=True)
            if not os.access(self.out, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        except OSError as err:
            raise UserError(f"{self.out}: cannot write the report there ({err.strerror or err}); copy the run folder somewhere writable") from None
        self.cfg = load_config(RunLayout(self.run_dir).config)
        self.test = load_splits(self.cfg.data).test
        self.position = {int(i): n for n, i in enumerate(self.test.index)}  # image_index -> row
        self.names = list(self.test.class_names)
        self.has_cams = has_view(self.con, "cams")
        self._refuse_older_columns()
        self.title = f"Report: {self.cfg.name}"

    def _refuse_older_columns(self) -> None:
        """CAM or sanity files an older cifarcam wrote lack columns the report reads: one line that
        says how to recompute them, before any work, not a DuckDB binder error half-way."""
        from cifarcam.results import CAMS, SANITY

        for view, schema in (("cams", CAMS), ("sanity", SANITY)):
            if not has_view(self.con, view):
                continue
            present = {row[0] for row in self.con.execute(f"describe {view}").fetchall()}
            missing = [name for name in schema.names if name not in present]
            if missing:
                raise UserError(
                    f"{self.run_dir}: its {view} were written by an older cifarcam (no column {', '.join(missing[:3])}"
                    f"{' …' if len(missing) > 3 else ''}); rerun `python -m jobs.cam --run {self.run_dir}` to recompute them"
                )

    def image(self, image_index: int) -> np.ndarray:
        """A test image by its index in the Parquet (the CAM rows' image_index)."""
        return self.test.images[self.position[int(image_index)]]

    def images(self, image_indices: Iterable[int]) -> dict[int, np.ndarray]:
        return {int(i): self.image(i) for i in image_indices}

    def resources(self) -> dict:
        """What each trial asked for (resources.json, written by the search: the one-GPU rule may
        have changed the workers); a run from before that file: the config's, CPUs unless it says GPUs."""
        path = RunLayout(self.run_dir).resources
        if path.is_file():
            return json.loads(path.read_text())
        sc = self.cfg.scaling
        return {"use_gpu": bool(sc.use_gpu), "workers": sc.workers_per_trial, "cpus_per_worker": sc.cpus_per_worker, "gpus_per_worker": sc.gpus_per_worker}
