"""The report: DuckDB queries over a run's Parquet, as rich tables, Markdown and PNG figures.

It reproduces the paper's Table 2 and its Grad-CAM figures (one grid per model, intermediate and
final layers, correct and misclassified examples chosen by query), and adds what the paper could
not show: degenerate maps by layer size, faithfulness against a random baseline, confusions,
per-class accuracy, learning curves and the search itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from cifarcam.queries import connect, has_view, run_sql

# The paper's Table 1 (parameter counts, millions). Its accuracy figures are not in this
# repository; they are not invented here.
PAPER_PARAMS_M = {"efficientnetv2": 22.0, "mobilenetv3": 4.3, "regnet": 3.3, "resnet34": 21.3, "resnet50": 23.7, "resnet101": 42.7, "swin": 28.3}
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

    def sql(self, query: str) -> pd.DataFrame:
        return run_sql(self.con, query)

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
        if self.cfg.data.source == "cifar100":
            frame["paper_params_m"] = frame["model"].map(PAPER_PARAMS_M)
            text += " paper_params_m is the paper's Table 1; its accuracies are not reproduced here."
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
            return Section("Degenerate maps by layer feature size", "No cams in this run.")
        frame = self.sql(
            """select layer_h || 'x' || layer_w as feature_size, count(distinct model || layer) as layers,
                      avg(degenerate::int) as degenerate_share, avg(entropy) as mean_entropy,
                      avg(top10_mass) as mean_top10_mass, avg(peak_in_object::int) as peak_on_object
               from cams group by layer_h, layer_w order by layer_h desc"""
        )

        measures = {
            "mean_entropy": "entropy (1 = uniform)",
            "mean_top10_mass": "mass in top 10% of pixels",
            "peak_on_object": "peak on the object (synthetic)",
            "degenerate_share": "degenerate share",
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

        return Section(
            "Degenerate maps by layer feature size",
            "The paper found final-layer maps meaningless at 32x32: a 1x1 or 2x2 layer can only say which quadrant. Entropy rises and object hits fall as the map shrinks.",
            frame,
            [_figure(self.out / "degenerate_by_size.png", draw, (5, 3.2))],
        )

    def faithfulness(self) -> Section:
        if not self.has_cams:
            return Section("Faithfulness", "No cams in this run.")
        frame = self.sql(
            """select model, layer, any_value(layer_h) as h, avg(deletion_auc) as deletion_auc,
                      avg(deletion_auc_random) as random_auc, avg(deletion_auc_random) - avg(deletion_auc) as margin
               from cams where target = 'pred' and deletion_auc is not null group by model, layer order by model, h desc"""
        )

        def draw(fig):
            ax = fig.add_subplot(1, 1, 1)
            labels = [f"{m}\n{l}" for m, l in zip(frame.model, frame.layer)]
            x = np.arange(len(frame))
            ax.bar(x - 0.2, frame.deletion_auc, 0.4, label="Grad-CAM")
            ax.bar(x + 0.2, frame.random_auc, 0.4, label="random heatmap")
            ax.set_xticks(x, labels, fontsize=6, rotation=30, ha="right")
            ax.set_ylabel("deletion AUC (lower = more faithful)")
            ax.legend(fontsize=7)
            fig.tight_layout()

        return Section("Faithfulness by model and layer", "Deletion AUC of the predicted class against a random heatmap of the same image.", frame, [_figure(self.out / "faithfulness.png", draw, (max(5, 0.9 * len(frame)), 3.4))] if len(frame) else [])

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
        return [self.table2(), self.cam_grids(), self.degenerate(), self.faithfulness(), self.confusions(), self.per_class(), self.learning_curves(), self.search()]


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
