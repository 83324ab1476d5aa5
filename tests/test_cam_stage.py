"""The CAM actor's rows, outside Ray: schema, counts, a pytorch-grad-cam-only method, bad input."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from cifarcam.cam.actor import CamActor, images_table
from cifarcam.cam.partitions import check_settings
from cifarcam.cam.settings import CamSettings, resolve_layers
from cifarcam.cam.stage import recorded_settings
from cifarcam.config import DataConfig, SyntheticConfig
from cifarcam.data.splits import load_splits
from cifarcam.errors import ConfigError
from cifarcam.results import BASELINES
from cifarcam.training.checkpoint import save_checkpoint
from cifarcam.training.models import ModelSpec, build_model, cam_layers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    spec = ModelSpec("resnet_tiny", 10)
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), build_model(spec), spec, {}), spec


@pytest.fixture(scope="module")
def test_set():
    return load_splits(DataConfig(synthetic=SyntheticConfig(train_size=100, test_size=20))).test


def test_actor_rows_cover_every_layer_method_and_target(checkpoint, test_set):
    folder, spec = checkpoint
    layers = cam_layers(build_model(spec), spec)
    settings = CamSettings(methods=("gradcam", "eigencam"), targets=("pred", "label"), faithfulness_steps=2, faithfulness_images=8)
    table = CamActor(str(folder), "run", settings, layers)(images_table(test_set, faithfulness=settings.faithfulness))
    assert table.num_rows == 20 * len(layers) * 2 * 2
    assert table.schema.field("heatmap").type == pa.list_(pa.uint8(), 1024)
    rows = table.to_pylist()
    assert {(r["layer"], r["method"], r["target"]) for r in rows} == {
        (layer.name, m, t) for layer in layers for m in ("gradcam", "eigencam") for t in ("pred", "label")
    }
    assert sum(r["degenerate"] for r in rows) < len(rows) / 2
    for r in rows:
        heat = np.array(r["heatmap"])
        assert r["target_class"] == (r["pred"] if r["target"] == "pred" else r["label"])
        assert 0 < r["object_area"] < 1  # synthetic data has masks
        auc = [r[f"{c}_auc{b}"] for c in ("deletion", "insertion") for b in ("", "_random", "_centre", "_edge", "_coarse_random")]
        if r["degenerate"]:  # a constant map (this model is untrained): no peak, no spread; scored as a random map
            assert heat.max() == 0 and r["peak_y"] is None and r["mass_on_object"] is None
            assert (auc[0] is not None and auc[5] is not None) == r["faithfulness_sample"]
            continue
        assert heat.max() == 255 and 0 <= r["peak_y"] <= 31 and 0 <= r["peak_x"] <= 31
        assert r["peak_in_object"] in (True, False) and r["pointing_hit"] in (True, False)
        assert r["peak_in_object"] <= r["pointing_hit"]  # on the object is within 2 px of it
        assert r["peak_in_object"] <= r["pointing_hit_cell"] and 0 < r["object_cell_share"] <= 1
        assert 0 <= r["mass_on_object"] <= 1
        if r["faithfulness_sample"]:  # the seeded sample, predicted class only
            assert r["target"] == "pred" and all(0 <= a <= 1 for a in auc)
        else:
            assert auc == [None] * 10
    # 8 of the 20 images, for every map of the predicted class
    assert sum(r["faithfulness_sample"] for r in rows) == 8 * len(layers) * 2
    # coarse_random is drawn on each layer's own grid: one value per (image, grid size), whatever the method
    coarse = {}
    for r in rows:
        if r["faithfulness_sample"]:
            coarse.setdefault((r["image_index"], r["layer_h"]), set()).add(r["deletion_auc_coarse_random"])
    assert all(len(values) == 1 for values in coarse.values())
    sizes = sorted({layer.height for layer in layers})
    assert len(sizes) > 1 and any(coarse[(i, sizes[0])] != coarse[(i, sizes[-1])] for i, _ in coarse)
    sampled = {r["image_index"] for r in rows if r["faithfulness_sample"]}
    assert len(sampled) == 8 and all(r["image_index"] in sampled for r in rows if r["faithfulness_sample"])


def test_unknown_layer_is_named_with_a_suggestion(checkpoint):
    _, spec = checkpoint
    with pytest.raises(ConfigError, match=r"--layers: model resnet_tiny has no layer 'layer5'; did you mean 'layer4'\?"):
        resolve_layers(spec, ("layer5",), "model resnet_tiny")


def test_any_named_module_can_be_a_layer(checkpoint):
    _, spec = checkpoint
    (layer,) = resolve_layers(spec, ("layer1",), "m")
    assert (layer.name, layer.height, layer.width) == ("layer1", 32, 32)


def _published(cams: Path, partition: str, recorded: dict) -> None:
    """A partition's marker as a job publishes it: its settings are what later jobs compare."""
    folder = cams / partition
    folder.mkdir(parents=True)
    (folder / "_COMPLETE.json").write_text(json.dumps({"files": [], "settings": recorded}))


def test_changed_settings_refuse_to_mix_with_existing_partitions(tmp_path, test_set):
    recorded = recorded_settings(CamSettings(), test_set)
    check_settings(tmp_path, recorded)  # nothing published: any settings go, and nothing is written
    assert list(tmp_path.iterdir()) == []
    _published(tmp_path, "model=resnet_tiny/layer=layer3/method=gradcam", recorded)
    check_settings(tmp_path, recorded)
    with pytest.raises(ConfigError, match=r"^\S+method=gradcam: computed with targets \['pred', 'label'\] \(now asked for \['pred'\]\); use the same"):
        check_settings(tmp_path, recorded_settings(CamSettings(targets=("pred",)), test_set))


def test_partitions_from_before_the_spacing_count_as_uniform_steps(tmp_path, test_set):
    """A marker written before faithfulness had a spacing (16 uniform steps, the default then) is
    reused by a job that asks for those steps, and refused, in words that say how, by the new default."""
    old = recorded_settings(CamSettings(faithfulness_steps=16, faithfulness_spacing="uniform"), test_set)
    del old["faithfulness"]["spacing"]
    _published(tmp_path, "model=resnet_tiny/layer=layer3/method=gradcam", old)
    check_settings(tmp_path, recorded_settings(CamSettings(faithfulness_steps=16, faithfulness_spacing="uniform"), test_set))
    with pytest.raises(
        ConfigError,
        match=r"computed with faithfulness.steps 16 \(now asked for 12\), faithfulness.spacing 'uniform' \(now asked for 'quadratic'\); use the same",
    ):
        check_settings(tmp_path, recorded_settings(CamSettings(), test_set))


def test_the_sample_leads_the_first_block_of_every_actor_and_no_row_is_lost(test_set):
    """The faithfulness sample is split over the first ``actors`` blocks, at their head, so that it
    fills whole batches on every actor (its curves then run in a few large forward passes); every
    row comes once, with its own image, label and index, and the others keep their order."""
    from cifarcam.cam.stage import sample_first_blocks

    settings = CamSettings(faithfulness_images=6)
    table = images_table(test_set, faithfulness=settings.faithfulness)
    for rows, actors in ((8, 2), (8, 3), (128, 1), (1, 4), (5, 20)):
        blocks = sample_first_blocks(table, rows, actors)
        joined = pa.concat_tables(blocks)
        assert sorted(joined["image_index"].to_pylist()) == sorted(table["image_index"].to_pylist())
        flags = [b["faithfulness"].to_pylist() for b in blocks]
        heads = [sum(f) for f in flags]
        assert sum(heads) == 6 and all(f == sorted(f, reverse=True) for f in flags)  # sampled rows lead their block
        assert heads[: min(actors, 6)] == [len(g) for g in np.array_split(np.arange(6), actors)][: min(actors, 6)]
        others = [i for b in blocks for i, f in zip(b["image_index"].to_pylist(), b["faithfulness"].to_pylist()) if not f]
        assert others == sorted(others)
        by_index = {r["image_index"]: r for r in table.to_pylist()}
        assert all(by_index[r["image_index"]] == r for r in joined.to_pylist())
    assert sample_first_blocks(images_table(test_set), 8, 2)[0]["image_index"].to_pylist() == list(test_set.index[:8])  # no sample


def test_partitions_of_another_test_set_are_refused(tmp_path, test_set):
    """A regenerated test set gets another fingerprint: stored ``image_index`` values would point at
    other images."""
    _published(tmp_path, "model=resnet_tiny/layer=layer3/method=gradcam", recorded_settings(CamSettings(), test_set))
    relabelled = replace(test_set, labels=np.roll(test_set.labels, 1))
    assert relabelled.fingerprint() != test_set.fingerprint() == replace(test_set).fingerprint()
    with pytest.raises(ConfigError, match=r"computed with test_set '[0-9a-f]{12}\.\.\.' \(now asked for '[0-9a-f]{12}\.\.\.'\)"):
        check_settings(tmp_path, recorded_settings(CamSettings(), relabelled))
    with pytest.raises(ConfigError, match=r"computed with test_set"):
        check_settings(tmp_path, recorded_settings(CamSettings(), test_set.subset(np.arange(len(test_set) - 1))))
    # a marker from before fingerprints cannot say which test set it had: its other settings decide
    legacy = tmp_path / "legacy"
    _published(legacy, "model=resnet_tiny/layer=layer3/method=gradcam", CamSettings().comparable())
    check_settings(legacy, recorded_settings(CamSettings(), relabelled))
    with pytest.raises(ConfigError, match=r"computed with targets"):
        check_settings(legacy, recorded_settings(CamSettings(targets=("pred",)), relabelled))


def test_settings_are_checked():
    with pytest.raises(ConfigError, match=r"--targets: unknown target 'truth'"):
        CamSettings(targets=("truth",))
    with pytest.raises(ConfigError, match=r"--cam-batch-size: must be > 0"):
        CamSettings(batch_size=0)


def test_low_resolution_layers_warn_and_are_flagged(tmp_path, test_set):
    """The paper's setting (ImageNet stem at 32 px): layer3 is 2x2, layer4 1x1."""
    spec = ModelSpec("resnet_tiny", 10, stem="imagenet")
    folder = save_checkpoint(tmp_path, build_model(spec), spec, {})
    layers = resolve_layers(spec, None, "m")
    with pytest.warns(UserWarning, match=r"resnet_tiny layer layer4 is 1x1 at 32px: its Grad-CAM maps are degenerate"):
        actor = CamActor(str(folder), "run", CamSettings(targets=("pred",), faithfulness_steps=0), layers)
    rows = actor(images_table(test_set)).to_pylist()
    by_layer = {r["layer"]: r for r in rows}
    assert (by_layer["layer2"]["layer_h"], by_layer["layer2"]["low_res_layer"]) == (4, False)
    assert (by_layer["layer3"]["layer_h"], by_layer["layer3"]["low_res_layer"]) == (2, True)
    assert all(r["degenerate"] for r in rows if r["layer"] == "layer4")  # a 1x1 map says nothing about where


def test_a_batch_without_a_sampled_image_has_null_aucs_and_the_same_schema(checkpoint, test_set):
    """On the full test set about one CAM batch in five holds no image of the faithfulness sample
    (128 of 10,000 at batch 128): such a batch, a batch of one image and the sampled batch must
    give the same columns, with null AUCs where nothing was sampled."""
    folder, spec = checkpoint
    layers = cam_layers(build_model(spec), spec)
    settings = CamSettings(methods=("gradcam",), targets=("pred", "label"), faithfulness_steps=2, faithfulness_images=3)
    table = images_table(test_set, faithfulness=settings.faithfulness)
    sampled = np.flatnonzero(table["faithfulness"].to_numpy(zero_copy_only=False))
    unsampled = np.setdiff1d(np.arange(len(test_set)), sampled)
    actor = CamActor(str(folder), "run", settings, layers)
    with_sample = actor(table.take(np.concatenate([sampled, unsampled[:2]])))
    without = actor(table.take(unsampled[:4]))
    one_image = actor(table.take(unsampled[:1]))
    assert without.schema == with_sample.schema == one_image.schema
    assert without.num_rows == 4 * len(layers) * 2 and one_image.num_rows == len(layers) * 2
    aucs = [c for c in without.column_names if "_auc" in c]
    assert len(aucs) == 2 * (1 + len(BASELINES)) and all(without[c].null_count == without.num_rows for c in aucs)
    assert not any(without["faithfulness_sample"].to_pylist())
    assert with_sample["deletion_auc_random"].null_count < with_sample.num_rows


def test_a_constant_map_has_no_statistics(tmp_path, test_set):
    """The final layer of the paper's ImageNet stem at 32 px is 1x1: its map is constant. Its peak,
    entropy, concentration and object overlap are null, not "all mass on pixel (0, 0)"; its
    faithfulness is scored as what it is, pixels removed in random order (the tie-break's)."""
    spec = ModelSpec("resnet_tiny", 10, stem="imagenet")
    folder = save_checkpoint(tmp_path, build_model(spec), spec, {})
    layers = resolve_layers(spec, ("layer2", "layer4"), "m")
    settings = CamSettings(methods=("gradcam", "gradcam++"), targets=("pred",), faithfulness_steps=2, faithfulness_images=20)
    with pytest.warns(UserWarning, match="degenerate"):
        actor = CamActor(str(folder), "run", settings, layers)
    rows = actor(images_table(test_set, faithfulness=settings.faithfulness)).to_pylist()
    statistics = ("peak_y", "peak_x", "entropy", "top10_mass", "peak_in_object", "pointing_hit", "pointing_hit_cell", "mass_on_object")
    last = [r for r in rows if r["layer"] == "layer4"]
    assert len(last) == 40 and all(r["degenerate"] for r in last)
    assert all(r[s] is None for r in last for s in statistics)
    assert all(r["object_area"] > 0 and r["object_cell_share"] == 1 and r["deletion_auc_centre"] is not None for r in last)  # facts stay
    assert all(0 <= r["deletion_auc"] <= 1 and 0 <= r["insertion_auc"] <= 1 for r in last)
    intermediate = [r for r in rows if r["layer"] == "layer2" and not r["degenerate"]]
    assert intermediate and all(r[s] is not None for r in intermediate for s in statistics)


def test_the_runs_stored_predictions_are_the_predicted_class(checkpoint, test_set):
    """One source of truth: the actor explains the class predictions.parquet holds (computed at
    another precision and batch shape on a GPU), not its own forward's argmax."""
    folder, spec = checkpoint
    stored = (test_set.labels + 1) % 10  # never the label, and unlike this model's own argmax
    layers = resolve_layers(spec, ("layer3",), "m")
    settings = CamSettings(targets=("pred", "label"), faithfulness_steps=0)
    rows = CamActor(str(folder), "run", settings, layers)(images_table(test_set, stored)).to_pylist()
    by_image = {int(i): int(p) for i, p in zip(test_set.index, stored, strict=False)}
    assert all(r["pred"] == by_image[r["image_index"]] and r["correct"] is False for r in rows)
    assert all(r["target_class"] == r["pred"] for r in rows if r["target"] == "pred")
    own = CamActor(str(folder), "run", settings, layers)(images_table(test_set)).to_pylist()
    assert any(a["pred"] != b["pred"] for a, b in zip(rows, own, strict=False))  # the stored column was really used


def test_stored_predictions_only_for_the_checkpoint_the_run_evaluated(tmp_path, checkpoint):
    from cifarcam import results
    from cifarcam.cam.stage import ModelToExplain, stored_predictions
    from cifarcam.search_tables import ACCURACY, PREDICTIONS
    from cifarcam.training import weights_sha256

    folder, _ = checkpoint
    weights = weights_sha256(folder)
    results.write_table([{"model": "resnet_tiny", "checkpoint": str(folder), "weights_sha256": weights}], ACCURACY, tmp_path / "accuracy.parquet")

    def predictions(by: str) -> None:
        rows = [(7, 9), (3, 8), (5, 7)]
        rows = [
            {"model": "resnet_tiny", "image_index": i, "label": 0, "pred": p, "top5": [p], "prob": 0.5, "correct": False, "weights_sha256": by} for i, p in rows
        ]
        results.write_table(rows, PREDICTIONS, tmp_path / "predictions.parquet")

    predictions(weights)
    image_index = np.array([3, 5, 7])
    assert stored_predictions(tmp_path, ModelToExplain("resnet_tiny", str(folder)), image_index, weights).tolist() == [8, 7, 9]
    assert stored_predictions(tmp_path, ModelToExplain("resnet_tiny", str(tmp_path / "other")), image_index, weights) is None
    assert stored_predictions(tmp_path, ModelToExplain("resnet_tiny", str(folder)), np.array([3, 4]), weights) is None
    # a search killed between its two writes, on a resume that changed the best checkpoint: the
    # predictions are another checkpoint's, whatever the path accuracy.parquet names
    predictions("f" * 64)
    assert stored_predictions(tmp_path, ModelToExplain("resnet_tiny", str(folder)), image_index, weights) is None


def test_two_checkpoints_of_one_family_are_refused(tmp_path, checkpoint, test_set):
    from cifarcam.cam.stage import ModelToExplain, plan

    folder, spec = checkpoint
    other = save_checkpoint(tmp_path / "other", build_model(spec), spec, {})
    models = [ModelToExplain("resnet_tiny", str(folder)), ModelToExplain("resnet_tiny", str(other))]
    with pytest.raises(ConfigError, match=r"^--checkpoint: two checkpoints of resnet_tiny; one run's cams/ holds one checkpoint per model family$"):
        plan(tmp_path / "run", models, CamSettings(), test_set)


def test_the_command_line_derives_every_cam_default_from_the_settings():
    from jobs import cam, pipeline

    for p in (cam.parser(), pipeline.parser()):
        args = p.parse_args(["--run", "r"] if p.prog.endswith("cam") else ["--config", "c.yaml"])
        assert cam.settings_from(args) == CamSettings()
    args = cam.parser().parse_args(["--run", "r", "--methods", "gradcam,LayerCAM", "--cam-batch-size", "7", "--gpus-per-actor", "0.5"])
    assert cam.settings_from(args) == CamSettings(methods=("gradcam", "layercam"), batch_size=7, gpus_per_actor=0.5)


@pytest.mark.parametrize(
    "cluster, options, expected",
    [
        ({"CPU": 16, "GPU": 2}, {}, (2, 1.0)),
        ({"CPU": 16, "GPU": 2}, {"gpus_per_actor": 0.5}, (4, 0.5)),
        ({"CPU": 16, "GPU": 2}, {"gpus_per_actor": 0}, (15, 0.0)),  # CPU actors on a GPU cluster (this divided by zero)
        ({"CPU": 16, "GPU": 2}, {"actors": 3, "gpus_per_actor": 0}, (3, 0.0)),
        ({"CPU": 2}, {}, (1, 0.0)),  # one CPU stays free for Ray Data's writer
    ],
)
def test_actor_layout_fits_the_cluster(cluster, options, expected):
    from cifarcam.cam.runner import actor_layout

    layout = actor_layout(cluster, CamSettings(**options))
    assert (layout.actors, layout.gpus_per_actor) == expected


@pytest.mark.parametrize(
    "cpus, nodes, free, actors, threads",
    [
        (2, 1, None, None, 2),  # one actor on 2 cores: the writer's core computes too
        (16, 1, None, None, 1),  # 15 actors: one thread each
        (16, 1, None, 1, 16),
        (16, 1, 8, 2, 4),  # another job holds half the node
        (2, 2, None, None, 1),  # two 1-CPU nodes
        (16, 2, None, 3, 1),  # two 8-CPU nodes: Ray Data may put all 3 actors on one
    ],
)
def test_cpu_actors_share_a_single_node_s_free_cores(cpus, nodes, free, actors, threads):
    from cifarcam.cam.runner import actor_layout

    assert actor_layout({"CPU": cpus}, CamSettings(actors=actors), nodes, free).threads == threads


def test_actor_options_out_of_range_are_named():
    from cifarcam.cam.runner import actor_layout

    with pytest.raises(ConfigError, match=r"^--actors 2: at most 1 CPU actors fit this 2-CPU cluster"):
        actor_layout({"CPU": 2}, CamSettings(actors=2))
    with pytest.raises(ConfigError, match=r"^--actors 3: at most 2 actors of 1 GPU fit this cluster's 2 GPUs$"):
        actor_layout({"CPU": 16, "GPU": 2}, CamSettings(actors=3))
    with pytest.raises(ConfigError, match=r"^--actors 1: at most 0 CPU actors fit this 1-CPU cluster"):
        actor_layout({"CPU": 1}, CamSettings())
    with pytest.raises(ConfigError, match=r"^--gpus-per-actor: expected a share of one GPU from 0 \(CPU actors\) to 1, got -1$"):
        CamSettings(gpus_per_actor=-1)
    with pytest.raises(ConfigError, match=r"^--actors: must be > 0, got 0$"):
        CamSettings(actors=0)


@pytest.mark.parametrize(
    "given, message",
    [
        ({"methods": ("gradcam", "GradCAM")}, "--methods: 'gradcam' and 'GradCAM' name 'gradcam' twice; give each once"),
        ({"methods": ()}, "--methods: expected at least one name, got none"),
        ({"layers": ("layer4", "layer4")}, "--layers: 'layer4' names 'layer4' twice; give each once"),
        ({"layers": ()}, "--layers: expected at least one name, got none"),
        ({"targets": ()}, "--targets: expected at least one name, got none"),
        ({"targets": ("pred", "pred")}, "--targets: 'pred' names 'pred' twice; give each once"),
    ],
)
def test_each_method_layer_and_target_once(given, message):
    """Twice would store every row twice; none would do nothing and exit 0."""
    with pytest.raises(ConfigError) as info:
        CamSettings(**given)
    assert str(info.value) == message


def test_a_worker_given_no_gpu_stays_on_the_cpu_where_cuda_is_visible(checkpoint, test_set, monkeypatch):
    """Ray 2.60 leaves every GPU visible to an actor or task that asked for none (ray#54868): the
    driver names the device, and a CPU actor or sanity task must not pick CUDA by itself."""
    from cifarcam.cam.sanity import check_checkpoint

    folder, spec = checkpoint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what such a worker sees on a GPU node
    actor = CamActor(str(folder), "run", CamSettings(targets=("pred",), faithfulness_steps=0), cam_layers(build_model(spec), spec)[:1], device="cpu")
    assert actor.device.type == "cpu" and all(p.device.type == "cpu" for p in actor.model.parameters())
    assert len(actor(images_table(test_set)).to_pylist()) == len(test_set)
    rows = check_checkpoint(str(folder), ["layer2"], ["gradcam"], test_set.images[:2], 0, device="cpu")
    assert rows and all(r["method"] == "gradcam" for r in rows)


def test_cam_rows_are_written_strictly():
    """A filled column the schema lacks (a new baseline, say) is an error, not silently dropped; a
    required column left out is an error, not a column of nulls."""
    from cifarcam import results
    from cifarcam.cam.actor import _table

    with pytest.raises(ValueError, match=r"not in the schema \['deletion_auc_new_baseline'\], left out \[.*'heatmap'"):
        _table({"deletion_auc_new_baseline": [0.5]}, 1)
    assert results.CAMS_VERSION.startswith(f"{results.CAMS_MEANING}-")
    assert set(results.CAM_FAITHFULNESS) == {f"{c}_auc{s}" for c in ("deletion", "insertion") for s in ["", *(f"_{b}" for b in BASELINES)]}


def test_a_cpu_actor_computes_with_the_threads_it_was_given(tmp_path):
    spec = ModelSpec("resnet_tiny", 10)
    folder = save_checkpoint(tmp_path / "c", build_model(spec), spec, {})
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            CamActor(str(folder), "run", CamSettings(), cam_layers(build_model(spec), spec)[:1], device="cpu", threads=threads)
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_a_moved_run_finds_its_own_checkpoints_and_predictions(tmp_path, checkpoint, test_set):
    """accuracy.parquet stores checkpoints relative to the run folder: after a move (or on a copy)
    the CAM stage explains the run's own checkpoint, and reuses its stored predictions."""
    import shutil

    from cifarcam import results
    from cifarcam.cam.runner import models_to_explain
    from cifarcam.cam.stage import stored_predictions
    from cifarcam.run_layout import RunLayout
    from cifarcam.search_tables import ACCURACY, PREDICTIONS
    from cifarcam.training import weights_sha256

    run = tmp_path / "run"
    inside = run / "train" / "trial_0" / "checkpoint_000001"
    shutil.copytree(checkpoint[0], inside)
    weights = weights_sha256(inside)
    assert RunLayout(run).stored(str(inside)) == "train/trial_0/checkpoint_000001"
    assert RunLayout(run).stored("/elsewhere/ckpt") == "/elsewhere/ckpt" and RunLayout(run).stored(None) is None
    row = {"model": "resnet_tiny", "checkpoint": RunLayout(run).stored(str(inside)), "weights_sha256": weights}
    results.write_table([row], ACCURACY, RunLayout(run).accuracy)
    rows = [
        {"model": "resnet_tiny", "image_index": int(i), "label": 0, "pred": 1, "top5": [1], "prob": 0.5, "correct": False, "weights_sha256": weights}
        for i in test_set.index
    ]
    results.write_table(rows, PREDICTIONS, RunLayout(run).predictions)

    moved = tmp_path / "moved"
    run.rename(moved)
    (model,) = models_to_explain(moved, None, num_classes=10)
    assert Path(model.checkpoint) == moved / "train" / "trial_0" / "checkpoint_000001"
    assert stored_predictions(moved, model, test_set.index, weights).tolist() == [1] * len(test_set)
