"""The model-randomisation sanity check (Adebayo et al., "Sanity Checks for Saliency Maps", 2018).

Cascading randomisation: re-initialise the model's weights from the top down (first the head, the
layers after the last CAM layer; then each CAM layer, last to first) and compare each map with the
trained model's map of the same image and class (Spearman rank correlation per image). A method
whose maps barely change once everything above the explained layer is random is explaining the
image (its edges, its colours), not what the model learned.

Two comparisons of each pair of maps. The check's: the maps as the CAM stage stores them (ReLU'd,
min-max scaled, upsampled to 32x32), whose 1,024 pixels a coarse layer interpolates from a few
cells. And what Adebayo et al. compare: the map on the layer's own grid before the ReLU, signed and
absolute (Spearman), with the SSIM of the absolute maps scaled to [0, 1] (``layer_map_similarity``).

It runs on a small seeded sample (the first images of the faithfulness sample), for the methods
with a fast path; methods that exist only in pytorch-grad-cam are skipped here (said in the table).
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from cifarcam.cam.heatmap_metrics import constant_maps
from cifarcam.cam.methods import MultiLayerCam, fast_methods, relative_spread
from cifarcam.rank_stats import spearman
from cifarcam.run_layout import RunLayout

# Changes whenever the cascade's steps do, so that files computed the old way are recomputed.
CASCADE_VERSION = 5


@dataclass(frozen=True)
class CascadeStep:
    name: str  # "head", or the CAM layer randomised at this step
    modules: list[nn.Module]  # modules whose own parameters are re-initialised at this step


def _leaves_in_order(model: nn.Module, x: torch.Tensor, layers: list[str]) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters, and the CAM layers themselves (a ReLU given to --layers owns
    none), in the order the forward pass runs them."""
    order: list[tuple[str, nn.Module]] = []
    owners = [(name, m) for name, m in model.named_modules() if name in layers or any(True for _ in m.parameters(recurse=False))]
    hooks = [m.register_forward_hook(lambda m, _i, _o, name=name: order.append((name, m))) for name, m in owners]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for hook in hooks:
            hook.remove()
    seen: set[str] = set()
    return [(n, m) for n, m in order if not (n in seen or seen.add(n))]


def cascade(model: nn.Module, layers: list[str], x: torch.Tensor) -> list[CascadeStep]:
    """Top-down steps that together cover every module with parameters: the head (what runs after
    the last CAM layer), then each CAM layer together with everything between it and the CAM layer
    below it (the blocks between two CAM layers, and the stem below the first, are random too)."""
    leaves = _leaves_in_order(model, x, layers)

    def inside(name: str, layer: str) -> bool:
        return name == layer or name.startswith(layer + ".")

    ends = {layer: max(i for i, (n, _) in enumerate(leaves) if inside(n, layer)) for layer in layers}
    bottom_up = sorted(layers, key=ends.__getitem__)
    steps = [CascadeStep("head", [m for _, m in leaves[ends[bottom_up[-1]] + 1 :]])]
    for below, layer in reversed(list(zip([None, *bottom_up[:-1]], bottom_up, strict=False))):
        start = ends[below] + 1 if below is not None else 0
        steps.append(CascadeStep(layer, [m for _, m in leaves[start : ends[layer] + 1]]))
    return [step for step in steps if step.modules or step.name != "head"]


def reinitialise(module: nn.Module, generator: torch.Generator) -> None:
    """Fresh random weights for a module's own parameters (its usual initialiser where it has one)."""
    devices = sorted({p.device.index or 0 for p in module.parameters(recurse=False) if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # seeded, without touching the caller's RNG state
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:  # e.g. Swin's relative position tables, layer scales
            for p in module.parameters(recurse=False):
                nn.init.normal_(p, std=0.02)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.reset_running_stats()


# SSIM's stabilisers for maps in [0, 1] (Wang et al. 2004: K1 = 0.01, K2 = 0.03, data range 1)
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2
LAYER_METRICS = ("spearman_layer", "spearman_layer_abs", "ssim_layer")


def _unit(maps: np.ndarray) -> np.ndarray:
    """Each row scaled to [0, 1] (a constant row: zeros)."""
    low, high = maps.min(1, keepdims=True), maps.max(1, keepdims=True)
    return np.where(high > low, (maps - low) / np.where(high > low, high - low, 1), 0.0)


def global_ssim(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per row of (N, P) arrays in [0, 1]: SSIM with one window over the whole row (1 for
    identical rows). The usual 7x7 Gaussian window does not fit a 4x4 or 2x2 layer map."""
    mx, my = x.mean(1), y.mean(1)
    vx, vy = x.var(1), y.var(1)
    cov = ((x - mx[:, None]) * (y - my[:, None])).mean(1)
    return ((2 * mx * my + SSIM_C1) * (2 * cov + SSIM_C2)) / ((mx**2 + my**2 + SSIM_C1) * (vx + vy + SSIM_C2))


def layer_map_similarity(before: np.ndarray, after: np.ndarray, after_constant: np.ndarray) -> dict[str, np.ndarray]:
    """Per image, what Adebayo et al. compare, on the layer's own grid (N, h, w) before the ReLU:
    Spearman's rho of the signed maps and of their absolute values, and the SSIM of the absolute
    maps scaled to [0, 1]. A randomised map that is constant (``after_constant``) has changed
    completely: rho = 0, as in the check; its SSIM is computed as it is."""
    b, a = before.reshape(len(before), -1), after.reshape(len(after), -1)
    rho = {"spearman_layer": spearman(b, a), "spearman_layer_abs": spearman(np.abs(b), np.abs(a))}
    return {name: np.where(after_constant, 0.0, value) for name, value in rho.items()} | {"ssim_layer": global_ssim(_unit(np.abs(b)), _unit(np.abs(a)))}


def _mean_and_se(values: np.ndarray) -> tuple[float | None, float | None]:
    """Mean and standard error over the images where the value exists (a 1-cell map has no rho)."""
    values = values[~np.isnan(values)]
    if not len(values):
        return None, None
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None


def randomisation_rows(
    model: nn.Module, x: torch.Tensor, layers: list[str], methods: list[str], channels_last_output: bool, size: int, seed: int = 0, draws: int = 2
) -> list[dict]:
    """One row per (cascade step, layer, method): the mean and standard error over images of the
    rank correlation between the trained model's map and the randomised model's, for the class
    the trained model predicts, as stored (``spearman``) and on the layer's grid before the ReLU
    (``LAYER_METRICS``). The cascade is drawn ``draws`` times (seeds ``seed``, ``seed`` + 1, ...):
    each image's value is its mean over the draws, so that one lucky initialisation cannot decide a
    verdict. ``model`` is not modified (copies are randomised)."""
    fast = fast_methods(methods)
    if not fast:
        return []
    with MultiLayerCam(model, layers, channels_last_output) as cams:
        trained = cams(x, {"pred": None}, fast, size)
    classes = trained.logits.argmax(1)
    # Constant as the CAM stage judges it (relative spread), not by exact equality. A trained map
    # that is constant has nothing to compare: left out. One that the randomisation made constant
    # has changed completely: rho = 0, not left out (leaving it out would raise the mean exactly
    # where the map changed most).
    grid_size = {key: grid.shape[-2:] for key, grid in trained.grid.items()}
    informative = {key: ~constant_maps(trained.spread[key], *grid_size[key]).cpu().numpy() for key in trained.spread}
    names: list[str] = []
    per_draw: dict[tuple[int, str, str], dict[str, list[np.ndarray]]] = {}  # (step, layer, method) -> metric -> value per image, per draw
    for draw in range(draws):
        randomised = copy.deepcopy(model)
        generator = torch.Generator().manual_seed(seed + draw)
        steps = cascade(randomised, layers, x)
        names = [step.name for step in steps]
        for step, cut in enumerate(steps):
            for module in cut.modules:
                reinitialise(module, generator)
            with MultiLayerCam(randomised, layers, channels_last_output) as cams:
                now = cams(x, {"pred": classes}, fast, size)
            for layer in layers:
                for method in fast:
                    key = ("pred", layer, method)
                    before, after = trained.maps[key].flatten(1).cpu().numpy(), now.maps[key].flatten(1).cpu().numpy()
                    became_constant = constant_maps(now.spread[key], *grid_size[key]).cpu().numpy()
                    raw_constant = constant_maps(relative_spread(now.raw[key]), *grid_size[key]).cpu().numpy()
                    values = {
                        "spearman": np.where(became_constant, 0.0, spearman(before, after)),
                        "became_constant": became_constant,
                        **layer_map_similarity(trained.raw[key].cpu().numpy(), now.raw[key].cpu().numpy(), raw_constant),
                    }
                    for metric, value in values.items():
                        per_draw.setdefault((step, layer, method), {}).setdefault(metric, []).append(value)
    # The step after which every layer above a CAM layer is random: the head for the last one,
    # else the CAM layer just above it. That step's correlation is the check.
    check_step = {layer: names.index(layer) - 1 for layer in layers}
    rows = []
    for (step, layer, method), metrics in per_draw.items():
        kept = informative[("pred", layer, method)]
        with warnings.catch_warnings():  # an image without a value in any draw (a 1-cell grid) stays NaN: left out below
            warnings.simplefilter("ignore", RuntimeWarning)
            over_draws = {metric: np.nanmean(np.stack(values).astype(float), axis=0)[kept] for metric, values in metrics.items()}
        valid = over_draws["spearman"]
        row = {
            "layer": layer,
            "method": method,
            "step": step,
            "randomised_to": names[step],
            "images": int(len(valid)),
            "draws": draws,
            "became_constant": float(over_draws["became_constant"].mean()) if len(valid) else None,
            "spearman": float(valid.mean()) if len(valid) else None,
            "spearman_se": float(valid.std(ddof=1) / np.sqrt(len(valid))) if len(valid) > 1 else None,
            "above_random": step >= check_step[layer],  # every layer above this one is random
            "check": step == check_step[layer],
        }
        for metric in LAYER_METRICS:
            row[metric], row[f"{metric}_se"] = _mean_and_se(over_draws[metric])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# One file per model and method: <run>/sanity/model=<family>/method=<method>.parquet


def sanity_file(run_dir: Path, family: str, method: str) -> Path:
    """One file per model and method: two jobs explaining one run with other methods never
    overwrite each other's rows."""
    from cifarcam.cam.partitions import encode

    return RunLayout(run_dir).sanity / f"model={encode(family)}" / f"method={encode(method)}.parquet"


def is_current(path: Path, source_sha256: str, settings: dict) -> bool:
    """The file exists and was computed from these weights with these settings."""
    return _recorded_settings(path, source_sha256) == settings


def recorded_layers(path: Path, source_sha256: str) -> list[str]:
    """The layers whose cascade the file holds, when these weights computed it (else none)."""
    return list((_recorded_settings(path, source_sha256) or {}).get("layers") or [])


def _recorded_settings(path: Path, source_sha256: str) -> dict | None:
    if not path.is_file():
        return None
    meta = pq.read_schema(path).metadata or {}
    if json.loads(meta.get(b"source_sha256", b"null")) != source_sha256:
        return None
    return json.loads(meta.get(b"settings", b"null"))


def check_checkpoint(
    checkpoint: str, layers: list[str], methods: list[str], images: np.ndarray, seed: int, device: str | None = None, draws: int = 2
) -> list[dict]:
    """The rows for one checkpoint (run as a Ray task on a cluster), on ``device``: the one the task
    was given (a task given no GPU may still see them all), or CUDA if there is any."""
    from cifarcam.results import HEATMAP_SIZE
    from cifarcam.training import FAMILIES, ModelSpec, load_model, to_model_input

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_model(checkpoint, device)
    spec = ModelSpec(**meta["model"])
    x = to_model_input(torch.from_numpy(np.array(images)).to(device), spec.input_size)  # a writable copy of Ray's read-only array
    rows = randomisation_rows(model, x, layers, methods, FAMILIES[spec.family].channels_last_output, HEATMAP_SIZE, seed, draws)
    return [{"model": spec.family} | row for row in rows]


def write_sanity(path: Path, rows: list[dict], source_sha256: str, settings: dict) -> None:
    from cifarcam.results import SANITY, write_table

    write_table(rows, SANITY, path, metadata={"source_sha256": source_sha256, "settings": settings})
