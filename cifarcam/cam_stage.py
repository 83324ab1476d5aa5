"""The CAM stage on Ray Data: every test image x model x layer x method x target, to Parquet.

Each model is one Ray Data pipeline: the test set as a dataset, ``map_batches`` with a CAM actor
(model and hooks built once per actor, one GPU or a fraction of one per actor where there are
GPUs), written by Ray Data into this job's staging folder, then regrouped into one folder per
``cams/model=…/layer=…/method=…/`` with a completion marker and renamed into place
(``cifarcam.partitions``): a reader never sees half a partition, and a rerun skips the complete ones.
"""

from __future__ import annotations

import difflib
import json
import shutil
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from rich.console import Console

from cifarcam import results
from cifarcam.cam import METHODS, MultiLayerCam, method_key, reference_maps
from cifarcam.checkpoint import load_model
from cifarcam.config import ConfigError
from cifarcam.data import ImageSet
from cifarcam.faithfulness import FaithfulnessSettings, baseline_maps, blurred, deletion_insertion, seeded_noise
from cifarcam.faithfulness import sample as faithfulness_sample
from cifarcam.heatmap_metrics import constant_maps, heatmap_stats, localisation
from cifarcam.loader import to_model_input
from cifarcam.models import FAMILIES, CamLayer, ModelSpec, build_model, cam_layers
from cifarcam.partitions import Source, Staging, claim_model, is_complete, model_dir, partition_dir, publish, regroup, run_lock

TARGET_KINDS = ("pred", "label")


@dataclass(frozen=True)
class CamSettings:
    methods: tuple[str, ...] = ("gradcam",)
    layers: tuple[str, ...] | None = None  # None: every CAM layer the family names
    targets: tuple[str, ...] = TARGET_KINDS
    batch_size: int = 128
    faithfulness_steps: int = 16  # deletion / insertion steps; 0 turns faithfulness off
    faithfulness_images: int = 128  # the seeded sample it is measured on
    sanity_images: int = 64  # the randomisation sanity check's sample; 0 turns it off

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(method_key(m) for m in self.methods))
        for t in self.targets:
            if t not in TARGET_KINDS:
                raise ConfigError(f"--targets: unknown target {t!r}; expected pred, label or both")
        if self.batch_size <= 0:
            raise ConfigError(f"--cam-batch-size: must be > 0, got {self.batch_size}")
        for name in ("faithfulness_steps", "faithfulness_images", "sanity_images"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(self, name)}")

    @property
    def faithfulness(self) -> FaithfulnessSettings:
        return FaithfulnessSettings(steps=self.faithfulness_steps, images=self.faithfulness_images)

    def comparable(self) -> dict:
        """What must match for existing partitions to be reused (also each file's metadata)."""
        faithfulness = self.faithfulness.metadata() if self.faithfulness.enabled else None
        return {"columns": results.CAMS_VERSION, "targets": list(self.targets), "faithfulness": faithfulness}


def resolve_layers(spec: ModelSpec, requested: tuple[str, ...] | None, where: str) -> list[CamLayer]:
    model = build_model(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jobs.cam warns once per layer, on the terminal
        known = cam_layers(model, spec)
    if requested is None:
        return known
    names = dict(model.named_modules())
    chosen = []
    for name in requested:
        if name not in names:
            close = difflib.get_close_matches(name, [l.name for l in known] + list(names), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"{spec.family} has CAM layers {[l.name for l in known]}"
            raise ConfigError(f"--layers: {where} has no layer {name!r}; {hint}")
        match = [l for l in known if l.name == name]
        chosen.append(match[0] if match else _measure(model, spec, name))
    return chosen


def _measure(model: torch.nn.Module, spec: ModelSpec, name: str) -> CamLayer:
    shape: list[int] = []
    handle = model.get_submodule(name).register_forward_hook(lambda _m, _i, out: shape.extend(out.shape))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, spec.input_size, spec.input_size))
    handle.remove()
    h, w = (shape[1], shape[2]) if FAMILIES[spec.family].channels_last_output else (shape[2], shape[3])
    return CamLayer(name, h, w)


_OUTPUT_SCHEMA = pa.schema(list(results.CAMS) + [pa.field(name, pa.string()) for name in results.CAM_PARTITIONS])


def _fast(method: str) -> bool:
    return METHODS[method][0] is not None


class CamActor:
    """A Ray Data actor: loads one checkpoint and its hooks once, then explains batches."""

    def __init__(self, checkpoint: str, run: str, settings: CamSettings, layers: list[CamLayer], progress: Any = None) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, meta = load_model(checkpoint, self.device)
        self.spec = ModelSpec(**meta["model"])
        self.channels_last_output = FAMILIES[self.spec.family].channels_last_output
        self.run, self.settings, self.layers = run, settings, layers
        for layer in layers:
            if layer.degenerate:
                warnings.warn(layer.degenerate_warning(self.spec), stacklevel=1)
        self.cams = MultiLayerCam(self.model, [layer.name for layer in layers], self.channels_last_output)
        self.progress = progress  # an ImageCounter actor, or None

    def _maps(self, x: torch.Tensor, labels: torch.Tensor, pred: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
        """Logits, the predicted classes, and (target kind, layer, method) -> map and its
        pre-scaling range. ``pred``: the run's stored predictions, or None to take this forward's."""
        targets = {kind: (pred if kind == "pred" else labels) for kind in self.settings.targets}
        out = self.cams(x, targets, [m for m in self.settings.methods if _fast(m)], results.HEATMAP_SIZE)
        maps, spread = dict(out.maps), dict(out.raw_peak)
        pred = out.logits.argmax(1) if pred is None else pred
        for method in (m for m in self.settings.methods if not _fast(m)):  # through pytorch-grad-cam
            for kind in self.settings.targets:
                for layer in self.layers:
                    classes = pred if kind == "pred" else labels
                    heat = reference_maps(self.model, x, layer.name, method, classes, self.channels_last_output).to(self.device)
                    heat = torch.nn.functional.interpolate(heat[:, None], size=(results.HEATMAP_SIZE,) * 2, mode="bilinear")[:, 0]
                    maps[(kind, layer.name, method)] = heat
                    spread[(kind, layer.name, method)] = heat.flatten(1).amax(1) - heat.flatten(1).amin(1)
        return out.logits, pred, maps, spread

    def _faithfulness(self, x: torch.Tensor, classes: torch.Tensor, rows: torch.Tensor, chosen: np.ndarray, maps: dict, constant: dict) -> tuple[dict, dict]:
        """Deletion and insertion AUCs for the sampled ``rows`` (NaN for the others, and for
        constant maps), whose image indices are ``chosen``: (baseline column -> (B,) array,
        map key -> (deletion, insertion))."""
        n, f = len(x), self.settings.faithfulness
        xs, cs = x[rows], classes[rows]
        # sigma is in CIFAR pixels: at input_size 224 the image is 7x larger, and so is the blur
        fill = blurred(xs, f.blur_sigma * x.shape[-1] / results.HEATMAP_SIZE)
        # The random baseline and the tie-break noise are functions of the image alone (its index
        # and the seed): the same whichever actor, batch or job computes them.
        random_map = seeded_noise(chosen, f.seed, results.HEATMAP_SIZE).to(x.device)
        tie_break = seeded_noise(chosen, f.seed + 1, results.HEATMAP_SIZE).to(x.device)

        def scores(heat: torch.Tensor) -> torch.Tensor:
            full = torch.full((2, n), float("nan"), device=x.device)
            if len(rows):
                full[:, rows] = torch.stack(deletion_insertion(self.model, xs, heat, cs, f.steps, fill, tie_break))
            return full

        baselines = {}
        for name, heat in baseline_maps(xs, f, random_map).items():
            deletion, insertion = scores(heat).cpu().numpy()
            baselines[f"deletion_auc_{name}"], baselines[f"insertion_auc_{name}"] = deletion, insertion
        per_map = {}
        for key, heat in maps.items():
            full = torch.where(constant[key], float("nan"), scores(heat[rows]))  # no boolean-mask indexing: no host sync
            per_map[key] = tuple(full.cpu().numpy())
        return baselines, per_map

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        image_bytes = batch.column("image").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        images = torch.from_numpy(image_bytes.reshape(n, 32, 32, 3).copy()).to(self.device)  # Arrow buffers are read-only
        labels = torch.from_numpy(batch.column("label").to_numpy().astype(np.int64)).to(self.device)
        # One source of truth for the predicted class: the run's predictions.parquet where it
        # covers this checkpoint (its precision and batch shapes may differ from this forward's,
        # which can flip near-ties); this forward's argmax only for checkpoints outside the run.
        stored = batch.column("pred")
        pred = torch.from_numpy(stored.to_numpy().astype(np.int64)).to(self.device) if stored.null_count == 0 else None
        x = to_model_input(images, self.spec.input_size)
        logits, pred, maps, spread = self._maps(x, labels, pred)
        probs = logits.float().softmax(1)
        masks = None
        if batch.column("mask").null_count == 0:
            masks = torch.from_numpy(batch.column("mask").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, 32, 32).copy()).to(self.device) > 0
        in_sample = batch.column("faithfulness").to_numpy(zero_copy_only=False).astype(bool)
        sample_index = np.flatnonzero(in_sample)
        sample_rows = torch.from_numpy(sample_index).to(self.device)
        layer_of = {layer.name: layer for layer in self.layers}
        constant = {key: constant_maps(spread[key], layer_of[key[1]].height, layer_of[key[1]].width) for key in maps}
        shared = {"image_index": batch.column("image_index").to_numpy(), "label": labels.cpu().numpy(), "pred": pred.cpu().numpy(), "correct": (pred == labels).cpu().numpy()}
        parts = []
        for kind in self.settings.targets:
            classes = pred if kind == "pred" else labels
            target = {"target": [kind] * n, "target_class": classes.cpu().numpy(), "target_prob": probs.gather(1, classes[:, None])[:, 0].cpu().numpy()}
            faithful = kind == "pred" and self.settings.faithfulness.enabled
            kind_maps = {key: heat for key, heat in maps.items() if key[0] == kind}
            baselines, per_map = self._faithfulness(x, classes, sample_rows, shared["image_index"][sample_index], kind_maps, constant) if faithful else ({}, {})
            for layer in self.layers:
                for method in self.settings.methods:
                    key = (kind, layer.name, method)
                    heat, null = maps[key], constant[key].cpu().numpy()
                    measured = heatmap_stats(heat) | (localisation(heat, masks) if masks is not None else {})
                    columns = {
                        **shared,
                        **target,
                        "run": [self.run] * n,
                        "model": [self.spec.family] * n,
                        "layer": [layer.name] * n,
                        "method": [method] * n,
                        "layer_h": [layer.height] * n,
                        "layer_w": [layer.width] * n,
                        "low_res_layer": [layer.degenerate] * n,
                        "heatmap": list((heat * 255).round().to(torch.uint8).flatten(1).cpu().numpy()),
                        "degenerate": null,
                        # a constant map has no peak, spread or object overlap: null, not 0
                        **{name: _nullable(name, values.cpu().numpy(), null & (name != "object_area")) for name, values in measured.items()},
                        "faithfulness_sample": in_sample & faithful,
                    }
                    if faithful:
                        auc = dict(zip(("deletion_auc", "insertion_auc"), per_map[key])) | baselines
                        columns |= {name: _nullable(name, values, np.isnan(values)) for name, values in auc.items()}
                    parts.append(pa.Table.from_pydict({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in _OUTPUT_SCHEMA}, schema=_OUTPUT_SCHEMA))
        if self.progress is not None:
            self.progress.add.remote(n)  # fire and forget: the driver polls the total
        return pa.concat_tables(parts)


def _nullable(name: str, values: np.ndarray, null: np.ndarray) -> pa.Array:
    return pa.array(values, type=_OUTPUT_SCHEMA.field(name).type, mask=null)


# ---------------------------------------------------------------------------------------------
# The test set as a Ray Dataset


def images_table(test: ImageSet, pred: np.ndarray | None = None, faithfulness: FaithfulnessSettings | None = None) -> pa.Table:
    """The test set as Arrow rows; ``pred``: the run's stored predicted class per image, if any;
    ``faithfulness``: marks its seeded sample of rows."""
    n = len(test)
    in_sample = faithfulness_sample(n, faithfulness) if faithfulness is not None and faithfulness.enabled else np.zeros(n, bool)
    image = pa.FixedSizeListArray.from_arrays(pa.array(test.images.reshape(-1), pa.uint8()), 32 * 32 * 3)
    if test.masks is not None:
        mask = pa.FixedSizeListArray.from_arrays(pa.array(test.masks.reshape(-1).astype(np.uint8), pa.uint8()), 32 * 32)
    else:
        mask = pa.nulls(n, pa.list_(pa.uint8(), 32 * 32))
    pred_column = pa.array(pred, pa.int64()) if pred is not None else pa.nulls(n, pa.int64())
    return pa.table({"image_index": test.index, "label": test.labels, "pred": pred_column, "image": image, "mask": mask, "faithfulness": in_sample})


def stored_predictions(run_dir: Path, model: ModelToExplain, image_index: np.ndarray) -> np.ndarray | None:
    """The run's predicted class per image (in ``image_index`` order) for ``model``, when its
    checkpoint is the one accuracy.parquet evaluated; None otherwise."""
    import duckdb

    accuracy, predictions = run_dir / "accuracy.parquet", run_dir / "predictions.parquet"
    if not (accuracy.is_file() and predictions.is_file()):
        return None
    rows = duckdb.execute("select checkpoint from read_parquet(?) where model = ?", [str(accuracy), model.name]).fetchall()
    if not rows or Path(rows[0][0]).resolve() != Path(model.checkpoint).resolve():
        return None
    frame = duckdb.execute("select image_index, pred from read_parquet(?) where model = ?", [str(predictions), model.name]).df()
    by_index = dict(zip(frame.image_index, frame.pred))
    if not all(int(i) in by_index for i in image_index):
        return None
    return np.array([by_index[int(i)] for i in image_index], dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Partitions: what exists, staging, atomic publication


def check_settings(cams_dir: Path, settings: CamSettings) -> None:
    """Existing partitions are reused only when they were computed the same way."""
    path = cams_dir / "_settings.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != settings.comparable():
            raise ConfigError(f"{cams_dir}: computed with {saved}, now asked for {settings.comparable()}; use the same settings or remove {cams_dir}")
    else:
        results.write_text_atomic(path, json.dumps(settings.comparable()))


@dataclass(frozen=True)
class ModelToExplain:
    name: str  # the model family
    checkpoint: str


@dataclass(frozen=True)
class ModelPlan:
    model: ModelToExplain
    spec: ModelSpec
    layers: list[CamLayer]
    missing: list[tuple[CamLayer, str]]  # (layer, method) partitions not yet published
    source: Source  # the checkpoint's weights, recorded in each partition's marker


def plan(run_dir: Path, models: list[ModelToExplain], settings: CamSettings) -> list[ModelPlan]:
    """Check every layer name and the stored settings, and find what is left to compute:
    all before any cluster time is spent. Partitions of another checkpoint are refused."""
    from cifarcam.checkpoint import read_meta

    cams_dir = run_dir / "cams"
    families = [read_meta(m.checkpoint)["model"]["family"] for m in models]
    twice = sorted({f for f in families if families.count(f) > 1})
    if twice:
        raise ConfigError(f"--checkpoint: two checkpoints of {', '.join(twice)}; one run's cams/ holds one checkpoint per model family")
    # Layer names first: a typo is named before any stored setting is compared.
    specs = [ModelSpec(**read_meta(model.checkpoint)["model"]) for model in models]
    layers_of = [resolve_layers(spec, settings.layers, f"model {model.name}") for spec, model in zip(specs, models)]
    plans = []
    with run_lock(run_dir):
        check_settings(cams_dir, settings)
        for model, spec, layers in zip(models, specs, layers_of):
            source = Source.of(model.checkpoint)
            claim_model(model_dir(cams_dir, spec.family), source)
            missing = [(l, m) for l in layers for m in settings.methods if not is_complete(partition_dir(cams_dir, spec.family, l.name, m), source)]
            plans.append(ModelPlan(model, spec, layers, missing, source))
    return plans


def explain(
    run_dir: Path, plans: list[ModelPlan], test: ImageSet, settings: CamSettings, actors: int, gpus_per_actor: float, console: Console | None = None
) -> dict[str, Any]:
    """Run the CAM stage for the planned models; Ray must be up.

    Ray Data writes each model's rows into this job's staging folder; they are then regrouped into
    one folder per (layer, method), each with its files and its marker, and published one by one.
    With a ``console``, each model's progress (images explained, rate, time left) is shown there."""
    import ray

    from cifarcam.cam_progress import ImageCounter, run_with_progress
    from cifarcam.ray_logs import native_stderr_in_log

    cams_dir = run_dir / "cams"
    summary: dict[str, Any] = {"skipped": 0, "written": []}
    with Staging(run_dir) as staging:
        staging.sweep()  # what killed jobs left; never visible under cams/
        for p in plans:
            model, spec, layers, missing = p.model, p.spec, p.layers, p.missing
            summary["skipped"] += len(layers) * len(settings.methods) - len(missing)
            if not missing:
                continue
            # Several blocks, so that every actor gets work (no shuffle needed).
            table = images_table(test, stored_predictions(run_dir, model, test.index), settings.faithfulness)
            rows = max(settings.batch_size, -(-len(test) // (4 * actors)))
            dataset = ray.data.from_arrow([table.slice(i, rows) for i in range(0, len(test), rows)])
            needed_layers = [l for l in layers if any(l == ml for ml, _ in missing)]
            needed_methods = tuple(m for m in settings.methods if any(m == mm for _, mm in missing))
            raw = staging.folder / f"raw-{uuid.uuid4().hex[:8]}"
            counter = ImageCounter.remote() if console is not None else None
            explained = dataset.map_batches(
                CamActor,
                fn_constructor_kwargs={
                    "checkpoint": model.checkpoint,
                    "run": run_dir.name,
                    "settings": CamSettings(**{**asdict(settings), "methods": needed_methods}),
                    "layers": needed_layers,
                    "progress": counter,
                },
                batch_size=settings.batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_gpus=gpus_per_actor or None,
                num_cpus=None if gpus_per_actor else 1,
            )
            with native_stderr_in_log():
                if counter is None:
                    explained.write_parquet(str(raw))
                else:
                    label = f"cams {spec.family} ({', '.join(needed_methods)})"
                    run_with_progress(lambda: explained.write_parquet(str(raw)), counter, len(test), label, console)
                    ray.kill(counter)
            parts = staging.folder / "parts"
            staged = regroup(sorted(raw.glob("*.parquet")), parts, results.CAM_PARTITIONS, p.source, settings.comparable())
            shutil.rmtree(raw)
            wanted = {partition_dir(parts, spec.family, l.name, m) for l, m in missing}
            with run_lock(run_dir):
                for folder in sorted(staged):
                    if folder not in wanted:  # computed alongside a missing one: the published copy stands
                        continue
                    target = cams_dir / folder.relative_to(parts)
                    if publish(folder, target, p.source, staging.folder / "trash"):
                        summary["written"].append(target)
                    else:
                        summary["skipped"] += 1
            shutil.rmtree(parts, ignore_errors=True)
    return summary
