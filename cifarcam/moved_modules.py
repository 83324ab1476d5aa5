"""Old module names (before the stage packages) as aliases of their new homes.

Tune pickles a search's callbacks, scheduler and trainable inputs by module name into the run
folder (``tune/<name>/tuner.pkl``, the experiment state); a run started before the move must still
resume. Each old name resolves to the module it became, the very same module object.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

# old module (within cifarcam) -> its module now. data, search, cam and report became the stage
# packages (their faces export what their old modules' pickled objects need).
MOVED = {
    "sources": "data.sources",
    "synthetic": "data.synthetic",
    "image_set": "data.image_set",
    "models": "training.models",
    "optim": "training.optim",
    "train": "training.train",
    "evaluate": "training.evaluate",
    "checkpoint": "training.checkpoint",
    "loader": "training.loader",
    "tuner": "search.tuner",
    "trial_driver": "search.trial_driver",
    "train_worker": "search.train_worker",
    "tune_rows": "search.tune_rows",
    "best_trials": "search.best_trials",
    "planning": "search.planning",
    "progress": "search.progress",
    "mlflow_log": "search.mlflow_log",
    "tensorboard_log": "search.tensorboard_log",
    "placement_watch": "search.placement_watch",
    "resumable_asha": "search.resumable_asha",
    "cam_settings": "cam.settings",
    "cam_actor": "cam.actor",
    "cam_stage": "cam.stage",
    "cam_progress": "cam.progress",
    "cam_run": "cam.runner",
    "partitions": "cam.partitions",
    "heatmap_metrics": "cam.heatmap_metrics",
    "faithfulness": "cam.faithfulness",
    "sanity": "cam.sanity",
    "report_run": "report.run_folder",
    "report_queries": "report.queries",
    "queries": "report.views",
    "report_figures": "report.figures",
    "report_html": "report.html",
    "report_console": "report.console",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self) -> None:
        self._own_specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        old = fullname.removeprefix("cifarcam.")
        if fullname.startswith("cifarcam.") and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(f"cifarcam.{MOVED[spec.name.removeprefix('cifarcam.')]}")
        self._own_specs[spec.name] = module.__spec__  # the import system is about to set the old name's
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The module ran when it was imported under its own name: give it back its spec (reload
        # and find_spec read it); module.__spec__ is the old name's here.
        module.__spec__ = self._own_specs.pop(module.__spec__.name)


def install() -> None:
    """Resolve the old names from now on (idempotent)."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
