"""Where everything lives in a run folder: one name per file, for every stage (results/README.md
documents what each holds)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The search's tables, each <name>.parquet at the run folder's top (the report's DuckDB views).
SEARCH_TABLES = ("trials", "epochs", "accuracy", "predictions")


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def table(self, name: str) -> Path:
        """One of SEARCH_TABLES."""
        return self.root / f"{name}.parquet"

    @property
    def config(self) -> Path:  # the resolved config the run was started with
        return self.root / "config.yaml"

    @property
    def versions(self) -> Path:  # package versions and git revision
        return self.root / "versions.json"

    @property
    def resources(self) -> Path:  # what each trial asked for (the search's resource plan)
        return self.root / "resources.json"

    @property
    def trials(self) -> Path:
        return self.table("trials")

    @property
    def epochs(self) -> Path:
        return self.table("epochs")

    @property
    def accuracy(self) -> Path:
        return self.table("accuracy")

    @property
    def predictions(self) -> Path:
        return self.table("predictions")

    @property
    def lock(self) -> Path:  # the run's lock (cifarcam.run_lock), and who holds it
        return self.root / ".lock"

    @property
    def lock_holder(self) -> Path:
        return self.root / ".lock.holder"

    def stored(self, path: str | None) -> str | None:
        """A path as the run's tables store it: relative to the run folder where it lies inside it,
        so that a moved or copied run finds its own checkpoints; as given elsewhere."""
        if path is None:
            return None
        # As written first: a train/ that links to scratch space stays a path inside the run.
        for inside, root in ((Path(path), self.root), (Path(path).resolve(), self.root.resolve())):
            if inside.is_relative_to(root):
                return str(inside.relative_to(root))
        return path

    def located(self, stored: str) -> Path:
        """A path from the run's tables, where this run folder finds it (``stored``'s inverse): joining
        an absolute path keeps it as it is."""
        return self.root / stored

    @property
    def tensorboard(self) -> Path:  # one event file per trial: tensorboard --logdir <this>
        return self.root / "tensorboard"

    @property
    def tune(self) -> Path:  # Tune's experiment state, one folder per search name
        return self.root / "tune"

    @property
    def train(self) -> Path:  # Ray Train runs: train/trial_<id>/checkpoint_*
        return self.root / "train"

    @property
    def cams(self) -> Path:  # cams/model=<m>/layer=<l>/method=<k>/part-*.parquet
        return self.root / "cams"

    @property
    def sanity(self) -> Path:  # sanity/model=<m>/method=<k>.parquet
        return self.root / "sanity"

    @property
    def report(self) -> Path:  # report.md, report.html and their figures
        return self.root / "report"

    @property
    def logs(self) -> Path:  # one folder per job process: logs/<job>-<UTC time>-<pid>
        return self.root / "logs"
