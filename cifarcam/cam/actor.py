"""The CAM stage's actor and the Arrow rows it reads and writes (plain Python: Ray Data calls it,
tests and benchmarks call it in-process).

In: ``images_table`` rows (image, label, the run's stored prediction, object mask, whether the
image is in the faithfulness sample). Out: one row per image x layer x method x target with the
heatmap, its statistics (``heatmap_metrics``) and its faithfulness (``faithfulness``), in
``results.CAMS`` plus the partition columns.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from cifarcam import results
from cifarcam.cam.faithfulness import FaithfulnessSettings, baseline_maps, blurred, curve_ends, deletion_insertion, seeded_noise
from cifarcam.cam.faithfulness import sample as faithfulness_sample
from cifarcam.cam.heatmap_metrics import constant_maps, heatmap_stats, localisation
from cifarcam.cam.methods import MultiLayerCam, normalise_maps
from cifarcam.cam.settings import CamSettings
from cifarcam.data import ImageSet
from cifarcam.training import FAMILIES, CamLayer, ModelSpec, load_model, to_model_input

SIDE = results.HEATMAP_SIZE  # the stored images' side: heatmaps are stored at their resolution
# Measured for every map, constant or not: they describe the image and the layer, not the map.
FACTS_OF_THE_IMAGE = ("object_area", "object_cell_share")
OUTPUT_SCHEMA = pa.schema(list(results.CAMS) + [pa.field(name, pa.string()) for name in results.CAM_PARTITIONS])


def images_table(test: ImageSet, pred: np.ndarray | None = None, faithfulness: FaithfulnessSettings | None = None) -> pa.Table:
    """The test set as Arrow rows; ``pred``: the run's stored predicted class per image, if any;
    ``faithfulness``: marks its seeded sample of rows (``stage.sample_first_blocks`` puts them at
    the head of the first blocks)."""
    n = len(test)
    in_sample = faithfulness_sample(n, faithfulness) if faithfulness is not None and faithfulness.enabled else np.zeros(n, bool)
    image = pa.FixedSizeListArray.from_arrays(pa.array(test.images.reshape(-1), pa.uint8()), SIDE * SIDE * 3)
    if test.masks is not None:
        mask = pa.FixedSizeListArray.from_arrays(pa.array(test.masks.reshape(-1).astype(np.uint8), pa.uint8()), SIDE * SIDE)
    else:
        mask = pa.nulls(n, pa.list_(pa.uint8(), SIDE * SIDE))
    pred_column = pa.array(pred, pa.int64()) if pred is not None else pa.nulls(n, pa.int64())
    return pa.table({"image_index": test.index, "label": test.labels, "pred": pred_column, "image": image, "mask": mask, "faithfulness": in_sample})


@dataclass(frozen=True)
class _Batch:
    """An ``images_table`` batch on the device."""

    image_index: np.ndarray
    images: torch.Tensor  # (B, SIDE, SIDE, 3) uint8
    labels: torch.Tensor
    pred: torch.Tensor | None  # the run's stored predictions, or None to take this forward's
    masks: torch.Tensor | None  # (B, SIDE, SIDE) bool
    in_sample: np.ndarray  # (B,) bool: in the faithfulness sample


def _list_column(batch: pa.Table, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    values = batch.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return torch.from_numpy(values.reshape(shape).copy()).to(device)  # Arrow buffers are read-only


def _decode(batch: pa.Table, device: torch.device) -> _Batch:
    n = batch.num_rows
    stored, mask = batch.column("pred"), batch.column("mask")
    return _Batch(
        image_index=batch.column("image_index").to_numpy(),
        images=_list_column(batch, "image", (n, SIDE, SIDE, 3), device),
        labels=torch.from_numpy(batch.column("label").to_numpy().astype(np.int64)).to(device),
        pred=torch.from_numpy(stored.to_numpy().astype(np.int64)).to(device) if stored.null_count == 0 else None,
        masks=_list_column(batch, "mask", (n, SIDE, SIDE), device) > 0 if mask.null_count == 0 else None,
        in_sample=batch.column("faithfulness").to_numpy(zero_copy_only=False).astype(bool),
    )


def _nullable(name: str, values: np.ndarray, null: np.ndarray) -> pa.Array:
    return pa.array(values, type=OUTPUT_SCHEMA.field(name).type, mask=null)


def _measured_columns(measured: dict[str, torch.Tensor], null: np.ndarray) -> dict[str, pa.Array]:
    """A map's statistics as columns, copied to the host in one transfer (one sync per map, not
    one per statistic); a constant map's are null, the facts about the image are not."""
    host = torch.stack([values.float() for values in measured.values()]).cpu().numpy()
    columns = {}
    for name, values in zip(measured, host, strict=True):
        kind = OUTPUT_SCHEMA.field(name).type
        columns[name] = _nullable(name, values > 0.5 if kind == pa.bool_() else values.astype(np.float64), null & (name not in FACTS_OF_THE_IMAGE))
    return columns


def _table(columns: dict[str, Any], n: int) -> pa.Table:
    """``columns`` as an OUTPUT_SCHEMA table, strictly: a column the schema lacks, or a required
    one left out, is a bug (a new baseline computed and silently dropped, say), never a null."""
    unknown = set(columns) - set(OUTPUT_SCHEMA.names)
    missing = set(OUTPUT_SCHEMA.names) - set(columns) - results.CAM_OPTIONAL
    if unknown or missing:
        raise ValueError(f"CAM rows do not match results.CAMS: not in the schema {sorted(unknown)}, left out {sorted(missing)}")
    return pa.Table.from_pydict({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in OUTPUT_SCHEMA}, schema=OUTPUT_SCHEMA)


class CamActor:
    """A Ray Data actor: loads one checkpoint and its hooks once, then explains batches."""

    def __init__(
        self,
        checkpoint: str,
        run: str,
        settings: CamSettings,
        layers: list[CamLayer],
        progress: Any = None,
        device: str | None = None,
        threads: int | None = None,
    ) -> None:
        # The driver names the device: Ray 2.60 no longer hides the GPUs from an actor that asked
        # for none (ray-project/ray#54868), so CUDA being visible says nothing. None: CUDA if any.
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if threads and self.device.type == "cpu":  # Ray starts a 1-CPU actor with 1 thread; actor_layout says how many it may use
            torch.set_num_threads(threads)
        self.model, meta = load_model(checkpoint, self.device)
        self.spec = ModelSpec(**meta["model"])
        self.run, self.settings, self.layers = run, settings, layers
        for layer in layers:
            if layer.degenerate:
                warnings.warn(layer.degenerate_warning(self.spec), stacklevel=1)
        self.cams = MultiLayerCam(self.model, [layer.name for layer in layers], FAMILIES[self.spec.family].channels_last_output)
        self.progress = progress  # an ImageCounter actor, or None

    def _faithfulness(self, x: torch.Tensor, classes: torch.Tensor, rows: torch.Tensor, chosen: np.ndarray, maps: dict) -> tuple[dict, dict, dict]:
        """Deletion and insertion AUCs for the sampled ``rows`` (NaN for the others), whose image
        indices are ``chosen``: (baseline column -> (B,) array, layer name -> its coarse_random
        columns -> (B,) array, map key -> (deletion, insertion)).
        A constant map is scored as what it is: its pixels are removed in the tie-break's order,
        i.e. at random. Leaving it out would score a method only where it said something, and
        flatter the methods with many constant maps."""
        n, f = len(x), self.settings.faithfulness
        xs, cs = x[rows], classes[rows]
        # sigma is in CIFAR pixels: at input_size 224 the image is 7x larger, and so is the blur
        fill = blurred(xs, f.blur_sigma * x.shape[-1] / SIDE)
        # The random baseline and the tie-break noise are functions of the image alone (its index
        # and the seed): the same whichever actor, batch or job computes them.
        random_map = seeded_noise(chosen, f.seed, SIDE).to(x.device)
        tie_break = seeded_noise(chosen, f.seed + 1, SIDE).to(x.device)
        ends = curve_ends(self.model, xs, cs, fill)  # every map's curves of these images start and end there

        def scores(heat: torch.Tensor) -> torch.Tensor:
            full = torch.full((2, n), float("nan"), device=x.device)
            if len(rows):
                full[:, rows] = torch.stack(deletion_insertion(self.model, xs, heat, cs, f.steps, fill, tie_break, ends, f.spacing))
            return full

        baselines = {}
        for name, heat in baseline_maps(xs, f, random_map).items():
            deletion, insertion = scores(heat).cpu().numpy()
            baselines[f"deletion_auc_{name}"], baselines[f"insertion_auc_{name}"] = deletion, insertion
        coarse = {}  # one draw per grid size, shared by the layers of that size
        for grid in sorted({(layer.height, layer.width) for layer in self.layers}):
            noise = normalise_maps(seeded_noise(chosen, f.seed + 2, grid).to(x.device), SIDE)
            deletion, insertion = scores(noise).cpu().numpy()
            coarse[grid] = {"deletion_auc_coarse_random": deletion, "insertion_auc_coarse_random": insertion}
        per_layer = {layer.name: coarse[(layer.height, layer.width)] for layer in self.layers}
        per_map = {}
        for key, heat in maps.items():
            per_map[key] = tuple(scores(heat[rows]).cpu().numpy())
        return baselines, per_layer, per_map

    def __call__(self, batch: pa.Table) -> pa.Table:
        n, b = batch.num_rows, _decode(batch, self.device)
        x = to_model_input(b.images, self.spec.input_size)
        # One source of truth for the predicted class: the run's predictions.parquet where it
        # covers this checkpoint (its precision and batch shapes may differ from this forward's,
        # which can flip near-ties); this forward's argmax only for checkpoints outside the run.
        targets = {kind: (b.pred if kind == "pred" else b.labels) for kind in self.settings.targets}
        out = self.cams(x, targets, list(self.settings.methods), SIDE)
        pred = out.logits.argmax(1) if b.pred is None else b.pred
        probs = out.logits.float().softmax(1)
        sample_index = np.flatnonzero(b.in_sample)
        sample_rows = torch.from_numpy(sample_index).to(self.device)
        layer_of = {layer.name: layer for layer in self.layers}
        constant = {key: constant_maps(spread, layer_of[key[1]].height, layer_of[key[1]].width) for key, spread in out.spread.items()}
        # A constant map is all zeros, stored and scored: not rounding noise stretched to 0-255
        # (where on the device, by torch.where: no host sync).
        maps = {key: torch.where(constant[key][:, None, None], torch.zeros_like(heat), heat) for key, heat in out.maps.items()}
        shared = {"image_index": b.image_index, "label": b.labels.cpu().numpy(), "pred": pred.cpu().numpy(), "correct": (pred == b.labels).cpu().numpy()}
        parts = []
        for kind in self.settings.targets:
            classes = pred if kind == "pred" else b.labels
            target = {"target": [kind] * n, "target_class": classes.cpu().numpy(), "target_prob": probs.gather(1, classes[:, None])[:, 0].cpu().numpy()}
            faithful = kind == "pred" and self.settings.faithfulness.enabled
            kind_maps = {key: heat for key, heat in maps.items() if key[0] == kind}
            baselines, per_layer, per_map = self._faithfulness(x, classes, sample_rows, b.image_index[sample_index], kind_maps) if faithful else ({}, {}, {})
            for layer in self.layers:
                for method in self.settings.methods:
                    key = (kind, layer.name, method)
                    heat, null = maps[key], constant[key].cpu().numpy()
                    measured = heatmap_stats(heat, out.grid[key])
                    if b.masks is not None:
                        grid_hw = tuple(out.grid[key].shape[-2:])
                        measured |= localisation(heat, b.masks, measured["peak_y"], measured["peak_x"], grid_hw)
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
                        **_measured_columns(measured, null),
                        "faithfulness_sample": b.in_sample & faithful,
                    }
                    if faithful:
                        auc = dict(zip(("deletion_auc", "insertion_auc"), per_map[key], strict=False)) | baselines | per_layer[layer.name]
                        columns |= {name: _nullable(name, values, np.isnan(values)) for name, values in auc.items()}
                    parts.append(_table(columns, n))
        if self.progress is not None:
            self.progress.add.remote(n)  # fire and forget: the driver polls the total
        return pa.concat_tables(parts)
