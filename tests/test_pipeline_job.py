"""The demo pipeline end to end on a real local Ray: search, then the Ray Data CAM stage."""

import subprocess
import sys

import duckdb
import numpy as np
import pytest

from cifarcam.config import load_config
from cifarcam.data.splits import load_splits
from cifarcam.training.models import FAMILIES
from helpers import demo_run_cam_options, in_process

CAMS = "read_parquet('{out}/cams/**/*.parquet', hive_partitioning = true)"


def test_cam_rows_are_images_x_models_x_layers_x_methods_x_targets(demo_run):
    cfg = load_config(demo_run / "config.yaml")
    models = [m for (m,) in duckdb.sql(f"select model from '{demo_run}/accuracy.parquet'").fetchall()]
    layers = sum(len(FAMILIES[m].cam_layers) for m in models)
    expected = cfg.data.synthetic.test_size * layers * 1 * 2  # 1 method (gradcam), 2 targets
    cams = CAMS.format(out=demo_run)
    assert duckdb.sql(f"select count(*) from {cams}").fetchall() == [(expected,)]
    # keys are unique: no duplicate rows
    assert duckdb.sql(f"select count(*) from (select distinct model, layer, method, target, image_index from {cams})").fetchall() == [(expected,)]


def test_cams_agree_with_predictions(demo_run):
    cams = CAMS.format(out=demo_run)
    disagreements = duckdb.sql(
        f"select count(*) from {cams} c join '{demo_run}/predictions.parquet' p using (model, image_index) "
        "where c.pred != p.pred or c.correct != p.correct or c.label != p.label"
    ).fetchall()
    assert disagreements == [(0,)]


# The model and layer these tests read are pinned, not "the best one": which demo model scores
# best differs between machines (issue 19: 34.4 / 30.0 % test top-1 on one machine, 34.8 / 34.0 on
# another; CPU builds pick different vectorised kernels, so training is bit-reproducible on one
# machine only), and the tests must read the same layer everywhere.
PINNED_MODEL, PINNED_LAYER = "resnet_tiny", FAMILIES["resnet_tiny"].cam_layers[0]


def _pinned_layers_maps(demo_run, columns: str, correct_only: bool = True) -> tuple[np.ndarray, list[tuple]]:
    """The regenerated object masks, and ``columns`` of the pinned layer's informative label maps
    (of correctly classified images only, unless told otherwise)."""
    masks = load_splits(load_config(demo_run / "config.yaml").data).test.masks
    correct = "and correct " if correct_only else ""
    rows = duckdb.sql(
        f"select {columns} from {CAMS.format(out=demo_run)} where model = '{PINNED_MODEL}' and layer = '{PINNED_LAYER}' "
        f"and target = 'label' {correct}and not degenerate order by image_index"
    ).fetchall()
    return masks, rows


def _stored_maps(rows: list[tuple]) -> np.ndarray:
    return np.array([r[1] for r in rows], dtype=np.uint8).reshape(-1, 32, 32)


@pytest.mark.full
def test_stored_heatmaps_point_at_the_objects(full_demo_run):
    """Recompute each peak from the stored uint8 heatmap (row-major 32x32) and look it up in the
    regenerated synthetic masks: a transposed or flipped storage would miss the objects. A trained
    model's maps are needed to tell, so it reads the demo at full size."""
    masks, rows = _pinned_layers_maps(full_demo_run, "image_index, heatmap")
    n = np.arange(len(rows))
    on = masks[np.array([r[0] for r in rows])]
    peaks = _stored_maps(rows).reshape(len(rows), -1).argmax(1)
    on_object = on.reshape(len(rows), -1)[n, peaks].mean()
    transposed = on.transpose(0, 2, 1).reshape(len(rows), -1)[n, peaks].mean()
    flipped = on[:, :, ::-1].reshape(len(rows), -1)[n, peaks].mean()
    print(f"{PINNED_MODEL} {PINNED_LAYER}: stored peak on the object {on_object:.3f}, transposed {transposed:.3f}, flipped {flipped:.3f}")
    # The demo's hard shapes and short training leave about half the peaks exactly on the object
    # (0.49 measured); a transposed or flipped storage falls to chance, several times lower.
    assert on_object >= 0.3 and on_object > 2 * transposed and on_object > 2 * flipped


def test_stored_peaks_sit_where_the_stored_maps_are_high(demo_run):
    """The stored peak is the centre of the peak's cell on the layer's own 16x16 grid, between two
    pixels in each axis, held by the pixel after it: the stored map is high there, and the stored
    peak_in_object is the mask looked up there, like with like (any model, trained or not)."""
    masks, rows = _pinned_layers_maps(demo_run, "image_index, heatmap, peak_y, peak_x, peak_in_object", correct_only=False)
    assert len(rows) >= 100, len(rows)
    n = np.arange(len(rows))
    maps = _stored_maps(rows)
    on = masks[np.array([r[0] for r in rows])]
    held = np.array([int(np.floor(py + 0.5)) * 32 + int(np.floor(px + 0.5)) for _, _, py, px, _ in rows])
    high = np.mean(maps.reshape(len(rows), -1)[n, held] >= 0.7 * 255)
    assert high >= 0.95, high  # ties on the grid (the first cell wins) are the rare exception
    assert (on.reshape(len(rows), -1)[n, held] > 0).tolist() == [hit for *_, hit in rows]


@pytest.mark.full
def test_the_demo_maps_point_at_the_hard_shapes_far_above_chance(full_demo_run):
    """The demo trains on the hard set (the class is the shape alone). Its ResNet's layer2 (16x16)
    Grad-CAM must point at the object (within 2 px) far more often than a random point would, and
    put more of its mass there than a uniform map. Measured: pointing 0.764 and 0.605 on two
    machines (a random point about 0.2), mass on the object about 3x chance. The bounds are the
    claim itself (twice chance), not one run's figures."""
    import torch

    from cifarcam.cam.heatmap_metrics import localisation

    masks, rows = _pinned_layers_maps(full_demo_run, "image_index, pointing_hit, mass_on_object / object_area, layer_h")
    index, cells = np.array([r[0] for r in rows]), rows[0][3]
    # chance: the pointing game's rate for a peak at a random cell's centre, the points a map's peak can take
    centres = (torch.arange(cells) + 0.5) * 32 / cells - 0.5
    every_y, every_x = centres.repeat_interleave(cells).repeat(len(index)), centres.repeat(cells).repeat(len(index))
    every_mask = torch.from_numpy(masks[index]).repeat_interleave(cells * cells, 0)
    found = localisation(every_mask.float(), every_mask, every_y, every_x, (cells, cells))
    chance = found["pointing_hit"].float().mean().item()
    hit = np.mean([r[1] for r in rows])
    gain = np.mean([r[2] for r in rows])
    print(f"{PINNED_MODEL} {PINNED_LAYER}: pointing game {hit:.3f} (random point {chance:.3f}), mass on the object {gain:.2f}x chance, {len(rows)} images")
    assert len(rows) >= 50 and hit > 2 * chance and gain > 2


def test_low_resolution_layers_are_flagged_and_faithfulness_has_a_baseline(demo_run):
    cams = CAMS.format(out=demo_run)
    flags = duckdb.sql(f"select distinct layer_h, low_res_layer from {cams} order by layer_h").fetchall()
    assert flags == [(4, False), (8, False), (16, False)]  # the CIFAR stem keeps 4x4 at the end
    # every measured curve has its random baseline, on the same images
    assert duckdb.sql(f"select count(*) from {cams} where (deletion_auc is null) != (deletion_auc_random is null)").fetchall() == [(0,)]


@pytest.mark.full
def test_the_trained_demo_model_deletes_the_evidence_faster_than_random_masks(full_demo_run):
    cams = CAMS.format(out=full_demo_run)
    # The pinned model's maps delete the evidence faster than random masks do. Not asserted of every
    # model: on one machine the demo's MobileNet (30 % test top-1) came out worse than random
    # (deletion AUC 0.202 against 0.188 on its 21 correct sampled images): a finding, reported.
    ((auc, random_auc, n),) = duckdb.sql(
        f"select avg(deletion_auc), avg(deletion_auc_random), count(deletion_auc) from {cams} where correct and model = '{PINNED_MODEL}'"
    ).fetchall()
    print(f"{PINNED_MODEL}: deletion AUC {auc:.3f}, random masks {random_auc:.3f}, {n} curves")
    assert n > 0 and auc < random_auc


def test_pandas_reads_the_cams_without_ray(demo_run):
    code = (
        "import sys; sys.modules['ray'] = None\n"  # importing ray now fails: prove it is not needed
        "import pandas as pd\n"
        f"df = pd.read_parquet('{demo_run}/cams')\n"
        "assert {'model', 'layer', 'method', 'heatmap', 'peak_y'} <= set(df.columns), df.columns\n"
        "assert len(df['heatmap'].iloc[0]) == 1024\n"
        "print(len(df))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) == duckdb.sql(f"select count(*) from {CAMS.format(out=demo_run)}").fetchall()[0][0]


def test_bad_layer_and_method_fail_before_any_work(demo_run, capsys):
    proc = in_process(capsys, "jobs.cam", "--run", str(demo_run), "--layers", "layer9", *demo_run_cam_options())
    assert proc.returncode == 2 and "has no layer 'layer9'" in proc.stderr.strip().splitlines()[-1]
    assert len(proc.stderr.strip().splitlines()) == 1 and "Started a local Ray" not in proc.stdout  # no cluster time
    proc = in_process(capsys, "jobs.cam", "--run", str(demo_run), "--methods", "gradcan", *demo_run_cam_options())
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == ["error: --methods: unknown CAM method 'gradcan'; did you mean 'gradcam'?"]
