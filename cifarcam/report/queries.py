"""The report's numbers: DuckDB queries over a run's views (cifarcam.report.views), as DataFrames.

Every value that comes from the run or its config is bound as a parameter, never pasted into the
SQL text, so a class name or a hyperparameter key cannot break or change a query. Only
identifiers from fixed sets in code (the faithfulness baselines, a column label) are in the text.
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb
import numpy as np
import pandas as pd

from cifarcam.rank_stats import spearman
from cifarcam.report import verdicts
from cifarcam.report.views import run_sql
from cifarcam.results import BASELINES

Con = duckdb.DuckDBPyConnection


def count(con: Con, view: str, where: str = "true") -> int:
    """Rows of ``view`` matching ``where`` (both fixed text in the report's code)."""
    return int(run_sql(con, f"select count(*) as n from {view} where {where}")["n"][0])


def cam_targets(con: Con) -> set[str]:
    """Which classes the CAM stage explained: 'pred', 'label' or both (--targets)."""
    return set(run_sql(con, "select distinct target from cams").target)


def explained_target(con: Con) -> str:
    """The class whose maps the report shows: the predicted one, unless only the label was explained."""
    return "pred" if "pred" in cam_targets(con) else "label"


def accuracy(con: Con, device_per_worker: float, configured_workers: int, unit: str) -> pd.DataFrame:
    """Table 2: the best trial per model; ``unit`` (GPU-h, CPU-h, device-h) names the cost column:
    training wall time x the workers the trial ran (epochs.workers: the one-GPU rule may have run
    fewer than configured) x ``device_per_worker``."""
    return run_sql(
        con,
        f"""select model, variant, round(params / 1e6, 2) as params_m, test_top1, test_top5, test_superclass_top1,
                   epochs, optimizer, scheduler, round(train_time_s, 1) as train_time_s,
                   round(train_time_s * coalesce(w.workers, ?) * ? / 3600, 4) as "{unit}", round(images_per_s) as images_per_s
            from accuracy a left join (select trial_id, max(workers) as workers from epochs group by trial_id) w using (trial_id)
            order by test_top1 desc, model""",
        [configured_workers, device_per_worker],
    )


def cam_models(con: Con) -> list[str]:
    return list(run_sql(con, "select distinct model from cams order by model").model)


def cam_layers(con: Con, model: str) -> pd.DataFrame:
    """The model's CAM layers (layer, h, w), largest feature map (earliest layer) first."""
    return run_sql(con, "select layer, any_value(layer_h) h, any_value(layer_w) w from cams where model = ? group by layer order by h desc", [model])


def cam_methods(con: Con, model: str) -> list[str]:
    return list(run_sql(con, "select distinct method from cams where model = ? order by method", [model]).method)


def confident_picks(con: Con, model: str, method: str, layer: str, per_outcome: int = 4) -> pd.DataFrame:
    """The ``per_outcome`` most confident correct predictions, then as many most confident mistakes."""

    def one(outcome: str) -> str:  # outcome: 'correct' or 'not correct'
        return f"""(select image_index, label, pred, correct, target_prob from cams
                    where model = ? and target = 'pred' and method = ? and layer = ? and {outcome}
                    order by target_prob desc, image_index limit ?)"""

    return run_sql(con, f"{one('correct')} union all {one('not correct')}", [model, method, layer, per_outcome] * 2)


def spread_picks(con: Con, model: str, target: str, per_outcome: int) -> pd.DataFrame:
    """Up to ``per_outcome`` correct and as many mistaken images of ``model``, taken round-robin over
    the true classes (lowest image index first) so that a class filter has something to show."""
    return run_sql(
        con,
        """with images as (select distinct image_index, label, pred, correct from cams where model = ? and target = ?),
                ranked as (select *, row_number() over (partition by correct, label order by image_index) as turn from images)
           select image_index, label, pred, correct from ranked
           qualify row_number() over (partition by correct order by turn, label, image_index) <= ?
           order by correct desc, turn, label, image_index""",
        [model, target, per_outcome],
    )


def heatmaps(con: Con, model: str, method: str, target: str, image_indices: Sequence[int]) -> dict[tuple[int, str], np.ndarray]:
    """{(image_index, layer): uint8 heatmap} of ``model``'s ``method`` maps of those images."""
    frame = run_sql(
        con,
        "select image_index, layer, heatmap from cams where model = ? and target = ? and method = ? and list_contains(?, image_index)",
        [model, target, method, [int(i) for i in image_indices]],
    )
    return {(int(r.image_index), r.layer): np.asarray(r.heatmap, np.uint8) for r in frame.itertuples(index=False)}


def by_feature_size(con: Con, target: str) -> pd.DataFrame:
    # One target: a correct image's pred and label maps are the same map, counted twice otherwise.
    # Statistics of constant maps are null: the averages cover the informative maps only.
    return run_sql(
        con,
        """select layer_h || 'x' || layer_w as feature_size, any_value(layer_h) as h, count(distinct model || layer) as layers,
                  count(*) as maps, avg(degenerate::int) as constant_share, avg(entropy) as mean_entropy,
                  avg(top10_mass) as mean_top10_mass, avg(pointing_hit::int) as pointing_hit
           from cams where target = ? group by layer_h, layer_w order by layer_h desc""",
        [target],
    )


def localisation(con: Con, target: str) -> pd.DataFrame:
    return run_sql(
        con,
        """select model, layer, any_value(layer_h) as h, method, count(*) as images, avg(degenerate::int) as constant_share,
                  avg(pointing_hit::int) as pointing_hit, stddev_samp(pointing_hit::int) / sqrt(count(pointing_hit)) as pointing_se,
                  avg(peak_in_object::int) as exact_peak, avg(object_area) as chance_exact,
                  avg(pointing_hit_cell::int) as cell_hit, avg(object_cell_share) as chance_cell,
                  avg(mass_on_object / nullif(object_area, 0)) as mass_vs_chance,
                  stddev_samp(mass_on_object / nullif(object_area, 0)) / sqrt(count(mass_on_object / nullif(object_area, 0))) as mass_vs_chance_se,
                  avg(entropy) as entropy, stddev_samp(entropy) / sqrt(count(entropy)) as entropy_se
           from cams where correct and object_area is not null and target = ?
           group by model, layer, method order by model, h desc, method""",
        [target],
    )


def localisation_by_class(con: Con, target: str) -> pd.DataFrame:
    """Pointing rate per class, for each model's best-pointing map (layer and method), on the
    correctly classified images with an object mask; ``images``: the maps with a peak (a constant
    map has none); weakest classes first, a class without one informative map before them all."""
    return run_sql(
        con,
        """with maps as (select model, layer, method, label, pointing_hit from cams where correct and object_area is not null and target = ?),
                best as (select model, layer, method from (select model, layer, method, avg(pointing_hit::int) as rate from maps group by all)
                         qualify row_number() over (partition by model order by rate desc, layer, method) = 1)
           select model, layer, method, label, count(pointing_hit) as images, avg(pointing_hit::int) as pointing_hit,
                  stddev_samp(pointing_hit::int) / sqrt(count(pointing_hit)) as pointing_se
           from maps join best using (model, layer, method) group by all order by model, pointing_hit nulls first, label""",
        [target],
    )


def faithfulness(con: Con) -> pd.DataFrame:
    """Per map: deletion and insertion AUCs, the share of its scored maps that were constant
    (scored by the tie-break alone, i.e. as a random map), and on each curve a verdict on every
    baseline (``verdicts``): the verdict, the baseline its words name, that margin (positive:
    the map is better), its standard error and the Holm-adjusted p. Margins are paired per
    image, so the SE is of the difference."""
    columns = []
    for b in BASELINES:
        columns += [
            f"avg(deletion_auc_{b} - deletion_auc) as del_margin_{b}, stddev_samp(deletion_auc_{b} - deletion_auc) / sqrt(count(*)) as del_se_{b}",
            f"avg(insertion_auc - insertion_auc_{b}) as ins_margin_{b}, stddev_samp(insertion_auc - insertion_auc_{b}) / sqrt(count(*)) as ins_se_{b}",
        ]
    raw = run_sql(
        con,
        f"""select model, layer, any_value(layer_h) as h, method, count(*) as images, avg(degenerate::int) as constant_share,
                   avg(deletion_auc) as deletion, avg(insertion_auc) as insertion, count(*) filter (where correct) as images_correct,
                   avg(deletion_auc) filter (where correct) as deletion_correct, avg(deletion_auc) filter (where not correct) as deletion_misclassified,
                   avg(insertion_auc) filter (where correct) as insertion_correct, avg(insertion_auc) filter (where not correct) as insertion_misclassified,
                   {", ".join(columns)}
            from cams where faithfulness_sample and deletion_auc is not null
            group by model, layer, method order by model, h desc, method""",
    )
    split = ["images_correct", "deletion_correct", "deletion_misclassified", "insertion_correct", "insertion_misclassified"]
    out = raw[["model", "layer", "method", "images", "constant_share", "deletion", "insertion", *split]].copy()
    curves = (("deletion", "del"), ("insertion", "ins"))
    margins = np.stack([raw[[f"{short}_margin_{b}" for b in BASELINES]].to_numpy(float) for _, short in curves], 1)
    ses = np.stack([raw[[f"{short}_se_{b}" for b in BASELINES]].to_numpy(float) for _, short in curves], 1)
    judged = verdicts.curve_verdicts(margins, ses, raw["images"].to_numpy())
    rows = np.arange(len(raw))
    for c, (curve, _) in enumerate(curves):
        named = judged["named"][:, c]
        out[f"{curve}_verdict"] = judged["verdict"][:, c]
        out[f"{curve}_baseline"] = [BASELINES[i] for i in named]
        out[f"{curve}_margin"] = margins[rows, c, named]
        out[f"{curve}_se"] = ses[rows, c, named]
        out[f"{curve}_p_holm"] = judged["p"][:, c]
    out.attrs["tests"] = judged["tests"]
    return out


def map_agreement(con: Con, target: str) -> pd.DataFrame:
    """Spearman's rho between two maps of one image: every pair of a model's layers (one method:
    do the intermediate and final maps point at the same places?) and every pair of methods (one
    layer). Mean and standard error over the images where both maps are informative: a constant
    map ranks nothing (``constant_pairs`` counts the pairs left out)."""
    rows = []
    for model in cam_models(con):  # one model's maps in memory at a time (10,000 images x layers x methods)
        maps = run_sql(
            con,
            "select layer, layer_h, method, image_index, heatmap from cams where model = ? and target = ? order by layer_h desc, layer, method, image_index",
            [model, target],
        )
        layers = list(dict.fromkeys(maps.layer))  # earliest (largest) first
        methods = sorted(set(maps.method))
        stacked = {key: part.set_index("image_index").heatmap for key, part in maps.groupby(["layer", "method"])}
        pairs = [("layers", method, a, b) for method in methods for i, a in enumerate(layers) for b in layers[i + 1 :]]
        pairs += [("methods", layer, a, b) for layer in layers for i, a in enumerate(methods) for b in methods[i + 1 :]]
        for kind, fixed, a, b in pairs:
            first, second = ((a, fixed), (b, fixed)) if kind == "layers" else ((fixed, a), (fixed, b))
            if first not in stacked or second not in stacked:
                continue
            rows.append((model, kind, fixed, a, b, *_paired_rho(stacked[first], stacked[second])))
    return pd.DataFrame(rows, columns=["model", "between", "of", "a", "b", "images", "constant_pairs", "rho", "rho_se"])


def two_class_agreement(con: Con) -> pd.DataFrame:
    """The sanity check's reference: Spearman's rho between the maps of two classes of one image,
    the predicted and the true one of each misclassified image (maps that ought to differ), per
    model, layer and method; empty unless both targets were explained."""
    frame = run_sql(
        con,
        "select model, layer, method, target, image_index, heatmap from cams where not correct and target in ('pred', 'label') order by image_index",
    )
    rows = []
    for (model, layer, method), maps in frame.groupby(["model", "layer", "method"], sort=True):
        by_target = {target: part.set_index("image_index").heatmap for target, part in maps.groupby("target")}
        if {"pred", "label"} <= set(by_target):
            n, _, rho, se = _paired_rho(by_target["pred"], by_target["label"])
            rows.append((model, layer, method, n, rho, se))
    return pd.DataFrame(rows, columns=["model", "layer", "method", "two_class_images", "two_class_rho", "two_class_se"])


def _paired_rho(first: pd.Series, second: pd.Series) -> tuple[int, int, float, float]:
    """(images, constant pairs left out, mean rho, its SE) of two series of maps by image index."""
    images = first.index.intersection(second.index)
    if not len(images):
        return 0, 0, np.nan, np.nan
    rho = spearman(np.stack(first[images].to_numpy()), np.stack(second[images].to_numpy()))
    kept = rho[~np.isnan(rho)]
    se = kept.std(ddof=1) / np.sqrt(len(kept)) if len(kept) > 1 else np.nan
    return len(kept), len(rho) - len(kept), kept.mean() if len(kept) else np.nan, se


def faithfulness_images(con: Con) -> int:
    return int(run_sql(con, "select count(distinct image_index) as n from cams where faithfulness_sample")["n"][0])


def sanity_checks(con: Con) -> pd.DataFrame:
    """The step at which every layer above the explained one is random, per map."""
    return run_sql(
        con,
        """select model, layer, method, randomised_to as random_above, images, draws, became_constant, spearman, spearman_se,
                  spearman_layer, spearman_layer_se, spearman_layer_abs, spearman_layer_abs_se, ssim_layer, ssim_layer_se
           from sanity where "check" order by model, layer, method""",
    )


def sanity_steps(con: Con) -> pd.DataFrame:
    return run_sql(con, "select model, layer, method, step, randomised_to, spearman from sanity order by model, layer, method, step")


def confusions(con: Con, limit: int = 10) -> pd.DataFrame:
    return run_sql(
        con,
        """select model, label, pred, count(*) as n from predictions where not correct
           group by all order by n desc, model, label, pred limit ?""",
        [limit],
    )


def same_superclass_share(con: Con) -> pd.DataFrame:
    """Per model, the share of mistakes whose predicted class is in the true class's superclass."""
    return run_sql(
        con,
        """select p.model, avg((c.coarse_label = p.coarse_label)::int) as same_superclass_share
           from predictions p join (select distinct label, coarse_label from predictions) c on c.label = p.pred
           where not p.correct group by p.model order by p.model""",
    )


def confusion_example(con: Con, model: str, label: int, pred: int) -> pd.DataFrame:
    """The most confident map of that confusion at the largest layer of at least 4x4 (0 or 1 row)."""
    return run_sql(
        con,
        """select image_index, heatmap, layer from cams where model = ? and label = ? and pred = ?
           and target = 'pred' and layer_h >= 4 order by layer_h desc, target_prob desc limit 1""",
        [model, int(label), int(pred)],
    )


def per_class(con: Con) -> pd.DataFrame:
    return run_sql(con, "select model, label, avg(correct::int) as accuracy, count(*) as n from predictions group by all order by model, label")


def epochs(con: Con) -> pd.DataFrame:
    return run_sql(
        con, "select e.trial_id, e.model, t.optimizer, t.status, e.epoch, e.val_top1 from epochs e join trials t using (trial_id) order by e.trial_id, e.epoch"
    )


def epochs_by_model(con: Con) -> pd.DataFrame:
    return run_sql(
        con,
        "select model, count(distinct trial_id) as trials, max(epoch) as max_epoch, max(val_top1) as best_val_top1 from epochs group by model order by model",
    )


def hyperparameter_effect(con: Con, key: str) -> pd.DataFrame:
    """Trials and best validation accuracy by each value the search gave hyperparameter ``key``."""
    return run_sql(
        con,
        """select ? as hyperparameter, json_extract_string(hyperparameters, '$.' || ?) as value,
                  count(*) as trials, avg(best_val_top1) as mean_best_val, max(best_val_top1) as max_best_val,
                  sum(stopped_by_asha::int) as stopped_by_asha
           from trials group by value order by mean_best_val desc""",
        [key, key],
    )


def trial_status(con: Con) -> pd.DataFrame:
    return run_sql(con, "select status, count(*) as n from trials group by status order by status")


def trial_points(con: Con) -> pd.DataFrame:
    return run_sql(con, "select lr, best_val_top1, optimizer, model, stopped_by_asha from trials where best_val_top1 is not null")


def trial_errors(con: Con) -> pd.DataFrame:
    return run_sql(con, "select trial_id, model, optimizer, scheduler, lr, status, epochs_run, error from trials order by trial_id")
