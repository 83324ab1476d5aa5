"""The report: DuckDB queries over a run's Parquet, as rich tables, Markdown and PNG figures.

It reproduces the paper's Table 2 and its Grad-CAM figures (one grid per model, intermediate and
final layers, correct and misclassified examples chosen by query), and adds what the paper could
not show: constant and low-resolution maps by layer size, localisation against object masks,
faithfulness against trivial baselines (random, centre prior, edges), confusions, per-class
accuracy, learning curves and the search itself. Its sentences are built from its numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from cifarcam.faithfulness import BASELINES
from cifarcam.queries import connect, has_view, run_sql
from cifarcam.sanity import FAIL_SPEARMAN

# The seed paper: Table 1 (parameters, millions) and Table 2 (CIFAR-100 test top-1, %, 40 epochs).
PAPER_PARAMS_M = {"efficientnetv2": 22.0, "mobilenetv3": 4.3, "regnet": 3.3, "resnet34": 21.3, "resnet50": 23.7, "resnet101": 42.7, "swin": 28.3}
PAPER_TOP1_PCT = {"efficientnetv2": 83.65, "mobilenetv3": 62.85, "regnet": 75.47, "resnet34": 70.41, "resnet50": 87.15, "resnet101": 68.48, "swin": 70.85}
FIGURE_DPI = 100


@dataclass
class Section:
    title: str
    text: str = ""
    table: pd.DataFrame | None = None
    figures: list[str] = field(default_factory=list)


def rich_table(frame: pd.DataFrame, title: str = "") -> Table:
    table = Table(title=title)
    for col in frame.columns:
        table.add_column(str(col), justify="right" if pd.api.types.is_numeric_dtype(frame[col]) else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    return table


def _figure(path: Path, draw, size: tuple[float, float]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=size, dpi=FIGURE_DPI)
    draw(fig)
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path.name


def _overlay(ax, image: np.ndarray, heatmap: np.ndarray | None, title: str) -> None:
    ax.imshow(image, interpolation="nearest")
    if heatmap is not None:
        ax.imshow(heatmap.reshape(32, 32), cmap="jet", alpha=0.45, vmin=0, vmax=255, interpolation="bilinear")
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def with_paper_columns(frame: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """The seed paper's parameter counts and CIFAR-100 accuracies beside each family's row, for a
    CIFAR-100 run only (on another dataset they compare nothing)."""
    if dataset != "cifar100":
        return frame
    return frame.assign(paper_params_m=frame["model"].map(PAPER_PARAMS_M), paper_test_top1=frame["model"].map(PAPER_TOP1_PCT) / 100)


# ---------------------------------------------------------------------------------------------
# Words that follow the numbers


def _size_text(frame: pd.DataFrame) -> str:
    parts = []
    for row in frame.itertuples(index=False):
        if row.constant_share >= 0.999:
            parts.append(f"{row.feature_size}: every map is constant, so it has no peak, spread or localisation (shown empty)")
        elif row.h <= 2:
            parts.append(f"{row.feature_size}: the map can only name a quadrant ({row.constant_share:.0%} constant)")
    text = "Statistics cover informative maps only; a constant map's are missing, not zero."
    return text + (" " + "; ".join(parts) + "." if parts else " No layer here is 2x2 or smaller.")


def _localisation_text(frame: pd.DataFrame) -> str:
    """Correct images only. pointing_hit: the peak within 2 px of the object; exact_peak: on it
    (chance_exact: what a random point scores); mass_vs_chance: share of map mass on the object over
    the object's share of the image (1 = a uniform map)."""
    text = (
        "Correctly classified images with an object mask. pointing_hit: the map's peak lies within 2 px of the object; exact_peak: on it"
        " (chance_exact: a random point's rate); mass_vs_chance: the map's share of mass on the object over the object's share of the image"
        " (1 = no better than a uniform map)."
    )
    weak = [f"{r.model} {r.layer} {r.method} ({r.pointing_hit:.2f})" for r in frame.itertuples(index=False) if r.pointing_hit < 0.5]
    best = frame.sort_values("pointing_hit", ascending=False).iloc[0] if len(frame) else None
    if best is not None and pd.notna(best.pointing_hit):
        text += f" Best: {best.model} {best.layer} {best.method}, peak within 2 px of the object for {best.pointing_hit:.0%} of images."
    if weak:
        text += " Maps that miss the object more often than they find it: " + ", ".join(weak) + "."
    return text


def _verdict(margin: float, se: float) -> str:
    if not (np.isfinite(margin) and np.isfinite(se)):  # no image, or one (no standard error)
        return "n/a"
    if margin > 2 * se:
        return "better"
    return "worse" if margin < -2 * se else "tie"


def _against_strongest(raw: pd.DataFrame) -> pd.DataFrame:
    """Per row: the margin over the strongest baseline on each curve (the smallest margin), its
    standard error, which baseline that is, and a verdict (better / tie / worse at 2 SE)."""
    out = raw[["model", "layer", "method", "images", "deletion", "insertion"]].copy()
    for curve, short in (("deletion", "del"), ("insertion", "ins")):
        margins = raw[[f"{short}_margin_{b}" for b in BASELINES]].to_numpy()
        strongest = np.nanargmin(np.where(np.isnan(margins), np.inf, margins), axis=1)
        rows = np.arange(len(raw))
        out[f"{curve}_margin"] = margins[rows, strongest]
        out[f"{curve}_se"] = raw[[f"{short}_se_{b}" for b in BASELINES]].to_numpy()[rows, strongest]
        out[f"{curve}_strongest"] = [BASELINES[i] for i in strongest]
        out[f"{curve}_verdict"] = [_verdict(m, e) for m, e in zip(out[f"{curve}_margin"], out[f"{curve}_se"])]
    return out


def _faithfulness_text(frame: pd.DataFrame) -> str:
    lines = []
    for r in frame.itertuples(index=False):
        name = f"{r.model} {r.layer} {r.method}"
        if "n/a" in (r.deletion_verdict, r.insertion_verdict):
            lines.append(f"{name}: too few scored images to judge ({r.images}).")
            continue
        verdicts = {"deletion": (r.deletion_verdict, r.deletion_strongest, r.deletion_margin), "insertion": (r.insertion_verdict, r.insertion_strongest, r.insertion_margin)}
        failing = [f"{curve} ({verdict} than the {baseline} map, margin {margin:+.3f})" for curve, (verdict, baseline, margin) in verdicts.items() if verdict != "better"]
        if failing:
            prior = " It does not beat the centre prior." if any(b == "centre" for curve, (v, b, _) in verdicts.items() if v != "better") else ""
            lines.append(f"{name}: not more faithful on " + " and ".join(failing).replace("tie than", "no better than") + "." + prior)
    if not lines:
        return "Every map beats every baseline on both curves by more than two standard errors."
    better = [f"{r.model} {r.layer} {r.method}" for r in frame.itertuples(index=False) if r.deletion_verdict == r.insertion_verdict == "better"]
    summary = ("Better than every baseline on both curves: " + ", ".join(better) + ". ") if better else "No map beats every baseline on both curves. "
    return summary + " ".join(lines)


class RunReport:
    def __init__(self, run_dir: Path) -> None:
        from cifarcam.config import load_config
        from cifarcam.data import load_splits

        self.run_dir = Path(run_dir)
        self.con = connect(self.run_dir)
        self.cfg = load_config(self.run_dir / "config.yaml")
        self.test = load_splits(self.cfg.data).test
        self.position = {int(i): n for n, i in enumerate(self.test.index)}  # image_index -> row
        self.names = list(self.test.class_names)
        self.out = self.run_dir / "report"
        self.out.mkdir(parents=True, exist_ok=True)
        self.has_cams = has_view(self.con, "cams")

    def sql(self, query: str, params: list | None = None) -> pd.DataFrame:
        return run_sql(self.con, query, params)

    def image(self, image_index: int) -> np.ndarray:
        return self.test.images[self.position[int(image_index)]]

    # -- sections --------------------------------------------------------------------------

    def table2(self) -> Section:
        sc = self.cfg.scaling
        per_worker = sc.gpus_per_worker if sc.use_gpu else sc.cpus_per_worker
        unit = "GPU-h" if sc.use_gpu else "CPU-h" if sc.use_gpu is False else "device-h"
        frame = self.sql(
            f"""select model, variant, round(params / 1e6, 2) as params_m, test_top1, test_top5, test_superclass_top1,
                       epochs, optimizer, scheduler, round(train_time_s, 1) as train_time_s,
                       round(train_time_s * {sc.workers_per_trial * per_worker} / 3600, 4) as "{unit}",
                       round(images_per_s) as images_per_s
                from accuracy order by test_top1 desc"""
        )
        text = f"Best trial per model on the {len(self.test)} test images. {unit}: workers x {'GPUs' if sc.use_gpu else 'CPUs'} per worker x training wall time."
        frame = with_paper_columns(frame, self.cfg.data.source)
        if self.cfg.data.source == "cifar100":
            text += (
                f" paper_params_m and paper_test_top1 are the seed paper's Tables 1 and 2 (CIFAR-100, 40 epochs); this run trained"
                f" {self.cfg.train.epochs} epochs with its own search, so a gap says how far this run is from the paper's setting."
            )
        return Section("Table 2: accuracy of each model", text, frame)

    def cam_grids(self) -> Section:
        section = Section("Grad-CAM by layer: correct and misclassified examples (the paper's Figures 1-7)")
        if not self.has_cams:
            section.text = "No cams in this run: run jobs.cam."
            return section
        for (model,) in self.sql("select distinct model from cams order by model").itertuples(index=False):
            layers = self.sql(f"select layer, any_value(layer_h) h, any_value(layer_w) w from cams where model = '{model}' group by layer order by h desc")
            method = self.sql(f"select min(method) m from cams where model = '{model}'")["m"][0]
            # Examples by query: the 4 most confident correct and the 4 most confident mistakes.
            picks = self.sql(
                f"""(select image_index, label, pred, correct, target_prob from cams
                     where model = '{model}' and target = 'pred' and method = '{method}' and layer = '{layers.layer[0]}' and correct
                     order by target_prob desc, image_index limit 4)
                    union all
                    (select image_index, label, pred, correct, target_prob from cams
                     where model = '{model}' and target = 'pred' and method = '{method}' and layer = '{layers.layer[0]}' and not correct
                     order by target_prob desc, image_index limit 4)"""
            )
            maps = self.sql(f"select image_index, layer, heatmap from cams where model = '{model}' and target = 'pred' and method = '{method}' and image_index in ({','.join(map(str, picks.image_index)) or -1})")
            lookup = {(r.image_index, r.layer): np.asarray(r.heatmap, np.uint8) for r in maps.itertuples(index=False)}

            def draw(fig, picks=picks, layers=layers, lookup=lookup):
                cols = 1 + len(layers)
                for r, p in enumerate(picks.itertuples(index=False)):
                    verdict = "ok" if p.correct else "wrong"
                    _overlay(fig.add_subplot(len(picks), cols, r * cols + 1), self.image(p.image_index), None, f"{self.names[p.label]} -> {self.names[p.pred]} ({verdict})")
                    for c, layer in enumerate(layers.itertuples(index=False)):
                        _overlay(fig.add_subplot(len(picks), cols, r * cols + 2 + c), self.image(p.image_index), lookup.get((p.image_index, layer.layer)), f"{layer.layer} {layer.h}x{layer.w}")
                fig.suptitle(f"{model}: {method} for the predicted class", fontsize=9)
                fig.tight_layout()

            if len(picks):
                section.figures.append(_figure(self.out / f"cams_{model}.png", draw, (1.6 * (1 + len(layers)), 1.7 * len(picks) + 0.4)))
        section.text = "Rows: the most confident correct predictions, then the most confident mistakes; columns: the image, then each CAM layer from the earliest to the last."
        return section

    def degenerate(self) -> Section:
        if not self.has_cams:
            return Section("Heatmaps by layer feature size", "No cams in this run.")
        # Statistics of constant maps are null: the averages below cover the informative maps only.
        frame = self.sql(
            """select layer_h || 'x' || layer_w as feature_size, any_value(layer_h) as h, count(distinct model || layer) as layers,
                      count(*) as maps, avg(degenerate::int) as constant_share, avg(entropy) as mean_entropy,
                      avg(top10_mass) as mean_top10_mass, avg(pointing_hit::int) as pointing_hit
               from cams group by layer_h, layer_w order by layer_h desc"""
        )
        measures = {
            "mean_entropy": "entropy (1 = uniform)",
            "mean_top10_mass": "mass in top 10% of pixels",
            "pointing_hit": "peak within 2 px of the object",
            "constant_share": "constant maps",
        }

        def draw(fig):
            ax = fig.add_subplot(1, 1, 1)
            shown = [c for c in measures if frame[c].notna().any()]
            x = np.arange(len(frame))
            width = 0.8 / len(shown)
            for k, column in enumerate(shown):
                ax.bar(x + (k - (len(shown) - 1) / 2) * width, frame[column].fillna(0), width, label=measures[column])
            ax.set_xticks(x, frame.feature_size)
            ax.set_xlabel("CAM layer feature map")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7)
            fig.tight_layout()

        return Section("Heatmaps by layer feature size", _size_text(frame), frame.drop(columns="h"), [_figure(self.out / "degenerate_by_size.png", draw, (5, 3.2))])

    def localisation(self) -> Section:
        title = "Localisation: do the maps point at the object?"
        if not self.has_cams or not self.sql("select count(*) as n from cams where object_area is not null")["n"][0]:
            return Section(title, "This dataset has no object masks, so localisation is not scored (see results/README.md for adding masks or boxes).")
        target = "pred" if "pred" in set(self.sql("select distinct target from cams").target) else "label"
        frame = self.sql(
            """select model, layer, any_value(layer_h) as h, method, count(*) as images, avg(degenerate::int) as constant_share,
                      avg(pointing_hit::int) as pointing_hit, avg(peak_in_object::int) as exact_peak, avg(object_area) as chance_exact,
                      avg(mass_on_object / nullif(object_area, 0)) as mass_vs_chance
               from cams where correct and object_area is not null and target = ?
               group by model, layer, method order by model, h desc, method""",
            [target],
        )
        return Section(title, _localisation_text(frame), frame.drop(columns="h"))

    def faithfulness(self) -> Section:
        title = "Faithfulness against trivial maps"
        if not self.has_cams or not self.sql("select count(*) as n from cams where faithfulness_sample")["n"][0]:
            why = "--faithfulness-steps 0 or --faithfulness-images 0"
            if self.has_cams and "pred" not in set(self.sql("select distinct target from cams").target):
                why = "it is measured for the predicted class, and this run explained the label only (--targets label)"
            return Section(title, f"No faithfulness scores in this run ({why}).")
        columns = []
        for b in BASELINES:  # per image: how much better the map is than baseline b (paired)
            columns += [
                f"avg(deletion_auc_{b} - deletion_auc) as del_margin_{b}, stddev_samp(deletion_auc_{b} - deletion_auc) / sqrt(count(*)) as del_se_{b}",
                f"avg(insertion_auc - insertion_auc_{b}) as ins_margin_{b}, stddev_samp(insertion_auc - insertion_auc_{b}) / sqrt(count(*)) as ins_se_{b}",
            ]
        raw = self.sql(
            f"""select model, layer, any_value(layer_h) as h, method, count(*) as images,
                       avg(deletion_auc) as deletion, avg(insertion_auc) as insertion, {', '.join(columns)}
                from cams where faithfulness_sample and deletion_auc is not null
                group by model, layer, method order by model, h desc, method"""
        )
        frame = _against_strongest(raw)

        def draw(fig):
            ax = fig.add_subplot(1, 1, 1)
            labels = [f"{m}\n{l}\n{k}" for m, l, k in zip(frame.model, frame.layer, frame.method)]
            x = np.arange(len(frame))
            ax.bar(x - 0.2, frame.deletion_margin, 0.4, yerr=2 * frame.deletion_se, label="deletion margin")
            ax.bar(x + 0.2, frame.insertion_margin, 0.4, yerr=2 * frame.insertion_se, label="insertion margin")
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_xticks(x, labels, fontsize=6)
            ax.set_ylabel("margin over the strongest baseline")
            ax.legend(fontsize=7)
            fig.tight_layout()

        settings = self.sql("select count(distinct image_index) as n from cams where faithfulness_sample")["n"][0]
        text = (
            f"Deletion (lower is better) and insertion (higher is better) AUCs of the predicted class on a seeded sample of {settings} test images,"
            " removed pixels filled with a blurred copy of the image. Each map is compared with three maps that know nothing of the model"
            " (random, a centre Gaussian, the image's Sobel edges); margin = how much better than the *strongest* of them, per curve,"
            " with its standard error over images (error bars: 2 SE). " + _faithfulness_text(frame)
        )
        return Section(title, text, frame, [_figure(self.out / "faithfulness.png", draw, (max(5, 0.9 * len(frame)), 3.6))] if len(frame) else [])

    def sanity(self) -> Section:
        title = "Sanity check: do the maps change when the model's weights are randomised?"
        if not has_view(self.con, "sanity"):
            return Section(title, "No sanity check in this run (--sanity-images 0, or no method with a fast path).")
        frame = self.sql(
            """select model, layer, method, randomised_to as random_above, images, spearman, spearman_se
               from sanity where "check" order by model, layer, method"""
        )
        frame["verdict"] = np.where(frame.spearman.isna(), "n/a", np.where(frame.spearman >= FAIL_SPEARMAN, "insensitive", "changes"))
        text = (
            "Cascading randomisation (Adebayo et al., 2018) on a seeded sample: the weights are re-initialised from the head down, and each"
            " map is compared with the trained model's map of the same image and class (Spearman rank correlation, 1 = unchanged)."
            f" Shown: the step at which every layer above the explained one is random. At {FAIL_SPEARMAN} or more a map is flagged"
            " 'insensitive': it depends more on the image than on what the model learned above that layer."
        )
        flagged = [f"{r.model} {r.layer} {r.method} ({r.spearman:.2f})" for r in frame.itertuples(index=False) if r.verdict == "insensitive"]
        text += (" Flagged: " + ", ".join(flagged) + ".") if flagged else " No map is flagged."
        unmeasured = [f"{r.model} {r.layer} {r.method}" for r in frame.itertuples(index=False) if r.verdict == "n/a"]
        if unmeasured:
            text += " Not measurable (every map constant): " + ", ".join(unmeasured) + "."
        steps = self.sql("select model, layer, method, step, randomised_to, spearman from sanity order by model, layer, method, step")

        def draw(fig):
            ax = fig.add_subplot(1, 1, 1)
            for (model, layer, method), part in steps.groupby(["model", "layer", "method"]):
                ax.plot(part.step, part.spearman, marker="o", markersize=3, label=f"{model} {layer} {method}")
            first = steps.drop_duplicates("step").sort_values("step")
            ax.set_xticks(first.step, [f"+{n}" for n in first.randomised_to], fontsize=7)
            ax.set_xlabel("randomised, top down (cumulative)")
            ax.set_ylabel("rank correlation with the trained map")
            ax.axhline(FAIL_SPEARMAN, color="grey", linestyle="--", linewidth=0.8)
            ax.legend(fontsize=6)
            fig.tight_layout()

        return Section(title, text, frame, [_figure(self.out / "sanity.png", draw, (6, 3.6))] if len(steps) else [])

    def confusions(self) -> Section:
        frame = self.sql(
            """select model, label, pred, count(*) as n from predictions where not correct
               group by all order by n desc, model, label, pred limit 10"""
        )
        frame.insert(2, "true_class", [self.names[i] for i in frame.label])
        frame.insert(4, "predicted_class", [self.names[i] for i in frame.pred])
        section = Section("Most-confused class pairs", "", frame)
        coarse = self.sql("select count(*) filter (where coarse_label is not null) as n from predictions")["n"][0]
        if coarse:
            sup = self.sql(
                """select p.model, avg((c.coarse_label = p.coarse_label)::int) as same_superclass_share
                   from predictions p join (select distinct label, coarse_label from predictions) c on c.label = p.pred
                   where not p.correct group by p.model order by p.model"""
            )
            section.text = "Share of mistakes that stay within the true superclass: " + ", ".join(f"{m} {s:.2f}" for m, s in sup.itertuples(index=False))
        if self.has_cams and len(frame):
            examples = []
            for row in frame.head(6).itertuples(index=False):
                ex = self.sql(
                    f"""select image_index, heatmap, layer from cams where model = '{row.model}' and label = {row.label} and pred = {row.pred}
                        and target = 'pred' and layer_h >= 4 order by layer_h desc, target_prob desc limit 1"""
                )
                if len(ex):
                    examples.append((row, ex.iloc[0]))

            def draw(fig):
                for i, (row, ex) in enumerate(examples):
                    _overlay(fig.add_subplot(1, len(examples), i + 1), self.image(ex.image_index), np.asarray(ex.heatmap, np.uint8), f"{row.model}\n{self.names[row.label]} as {self.names[row.pred]}\n({ex.layer})")
                fig.tight_layout()

            if examples:
                section.figures.append(_figure(self.out / "confusions.png", draw, (1.8 * len(examples), 2.4)))
        return section

    def per_class(self) -> Section:
        frame = self.sql("select model, label, avg(correct::int) as accuracy, count(*) as n from predictions group by all order by model, label")
        frame.insert(2, "class", [self.names[i] for i in frame.label])

        def draw(fig):
            ax = fig.add_subplot(1, 1, 1)
            models = list(dict.fromkeys(frame.model))
            width = 0.8 / len(models)
            for k, model in enumerate(models):
                part = frame[frame.model == model]
                ax.bar(part.label + k * width, part.accuracy, width, label=model)
            ticks = sorted(set(frame.label))
            if len(ticks) <= 20:
                ax.set_xticks(ticks, [self.names[i] for i in ticks], rotation=45, fontsize=7)
            ax.set_ylabel("test accuracy")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7)
            fig.tight_layout()

        worst = frame.sort_values(["accuracy", "model", "label"]).head(10).reset_index(drop=True)
        return Section("Per-class accuracy", "The ten weakest (model, class) pairs; the figure shows every class.", worst, [_figure(self.out / "per_class_accuracy.png", draw, (7, 3.4))])

    def learning_curves(self) -> Section:
        frame = self.sql("select e.trial_id, e.model, t.optimizer, t.status, e.epoch, e.val_top1 from epochs e join trials t using (trial_id) order by e.trial_id, e.epoch")

        def draw(fig):
            ax = fig.add_subplot(1, 1, 1)
            for _trial, part in frame.groupby("trial_id"):
                first = part.iloc[0]
                ax.plot(part.epoch, part.val_top1, marker="o", markersize=3, label=f"{first.model} {first.optimizer} ({first.status})")
            ax.set_xlabel("epoch")
            ax.set_ylabel("val top-1")
            ax.legend(fontsize=6)
            fig.tight_layout()

        summary = self.sql("select model, count(distinct trial_id) as trials, max(epoch) as max_epoch, max(val_top1) as best_val_top1 from epochs group by model order by model")
        figures = [_figure(self.out / "learning_curves.png", draw, (6, 3.6))] if len(frame) else []
        return Section("Learning curves", "Validation top-1 per epoch of every trial.", summary, figures)

    def search(self) -> Section:
        searched = list(self.cfg.search.grid) + list(self.cfg.search.sample)
        effects = []
        for key in searched:
            frame = self.sql(
                f"""select '{key}' as hyperparameter, json_extract_string(hyperparameters, '$.{key}') as value,
                           count(*) as trials, avg(best_val_top1) as mean_best_val, max(best_val_top1) as max_best_val,
                           sum(stopped_by_asha::int) as stopped_by_asha
                    from trials group by value order by mean_best_val desc"""
            )
            if key in self.cfg.search.sample:  # continuous: summarise, do not list every sample
                frame = frame.head(0)
            effects.append(frame)
        table = pd.concat(effects, ignore_index=True) if effects else None
        status = self.sql("select status, count(*) as n from trials group by status order by status")
        frame = self.sql("select lr, best_val_top1, optimizer, model, stopped_by_asha from trials where best_val_top1 is not null")

        def draw(fig):
            ax = fig.add_subplot(1, 1, 1)
            for (model, opt), part in frame.groupby(["model", "optimizer"]):
                ax.scatter(part.lr, part.best_val_top1, label=f"{model} {opt}", marker="x" if part.stopped_by_asha.all() else "o")
            ax.set_xscale("log")
            from matplotlib.ticker import NullFormatter

            ax.xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels collide
            ax.set_xlabel("learning rate")
            ax.set_ylabel("best val top-1")
            ax.legend(fontsize=6)
            fig.tight_layout()

        text = "Trials by status: " + ", ".join(f"{n} {s}" for s, n in status.itertuples(index=False)) + ". Mean best validation accuracy by each searched value (x in the figure: stopped by ASHA)."
        return Section("The search: what mattered and what ASHA stopped", text, table, [_figure(self.out / "search.png", draw, (5.5, 3.4))] if len(frame) else [])

    # -- assembly ----------------------------------------------------------------------------

    def failed_search(self) -> Section:
        frame = self.sql("select trial_id, model, optimizer, scheduler, lr, status, epochs_run, error from trials order by trial_id")
        text = (
            f"No trial produced a usable checkpoint ({len(frame)} trials), so nothing was evaluated on the test set or explained. "
            "Each trial's status and the last line of its error follow; the full tracebacks are in the trials' folders under tune/."
        )
        return Section("The search produced no usable trial", text, frame)

    def sections(self) -> list[Section]:
        if not self.sql("select count(*) as n from accuracy")["n"][0]:
            return [self.failed_search(), self.learning_curves(), self.search()]
        return [
            self.table2(), self.cam_grids(), self.degenerate(), self.localisation(), self.faithfulness(), self.sanity(),
            self.confusions(), self.per_class(), self.learning_curves(), self.search(),
        ]


def write_report(run_dir: Path, console: Console | None = None) -> Path:
    """Write ``run_dir/report/report.md`` and its figures; print the tables to ``console``."""
    report = RunReport(run_dir)
    sections = report.sections()
    lines = [f"# Report: {report.cfg.name}", "", f"Run folder `{report.run_dir}`, dataset `{report.cfg.data.source}`.", ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.text:
            lines += [s.text, ""]
        if s.table is not None and len(s.table):
            lines += [s.table.to_markdown(index=False, floatfmt=".4g"), ""]
        lines += [f"![{name}]({name})" for name in s.figures] + [""]
        if console is not None:
            console.rule(s.title)
            if s.text:
                console.print(s.text)
            if s.table is not None and len(s.table):
                console.print(rich_table(s.table))
            for name in s.figures:
                console.print(f"figure: {report.out / name}")
    path = report.out / "report.md"
    from cifarcam.results import write_text_atomic

    write_text_atomic(path, "\n".join(lines))
    return path
