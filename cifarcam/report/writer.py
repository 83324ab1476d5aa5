"""The report: its sections' words, built from the numbers, and the one place that assembles them.

It reproduces the paper's Table 2 and its Grad-CAM figures (one grid per model, intermediate and
final layers, correct and misclassified examples chosen by query), and adds what the paper could
not show: constant and low-resolution maps by layer size, localisation against object masks,
faithfulness against trivial baselines (random, centre prior, edges), confusions, per-class
accuracy, learning curves and the search itself. The numbers come from cifarcam.report.queries,
the PNGs from cifarcam.report.figures; the same Sections become report.md (here), report.html
(cifarcam.report.html) and the terminal's tables (cifarcam.report.console).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console

from cifarcam.report import figures as fig
from cifarcam.report import queries as q
from cifarcam.report import verdicts
from cifarcam.report.console import print_sections
from cifarcam.report.run_folder import ReportRun, Section
from cifarcam.report.views import has_view
from cifarcam.results import BASELINES, FAIL_SPEARMAN

# The seed paper: Table 1 (parameters, millions) and Table 2 (CIFAR-100 test top-1, %, 40 epochs).
PAPER_PARAMS_M = {"efficientnetv2": 22.0, "mobilenetv3": 4.3, "regnet": 3.3, "resnet34": 21.3, "resnet50": 23.7, "resnet101": 42.7, "swin": 28.3}
PAPER_TOP1_PCT = {"efficientnetv2": 83.65, "mobilenetv3": 62.85, "regnet": 75.47, "resnet34": 70.41, "resnet50": 87.15, "resnet101": 68.48, "swin": 70.85}


def with_paper_columns(frame: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """The seed paper's parameter counts and CIFAR-100 accuracies beside each family's row, for a
    CIFAR-100 run only (on another dataset they compare nothing)."""
    if dataset != "cifar100":
        return frame
    return frame.assign(paper_params_m=frame["model"].map(PAPER_PARAMS_M), paper_test_top1=frame["model"].map(PAPER_TOP1_PCT) / 100)


# -- words that follow the numbers -------------------------------------------------------------


def _size_text(frame: pd.DataFrame, target: str) -> str:
    parts = []
    for row in frame.itertuples(index=False):
        if row.constant_share >= 0.999:
            parts.append(f"{row.feature_size}: every map is constant, so it has no peak, spread or localisation (shown empty)")
        elif row.h <= 2:
            parts.append(f"{row.feature_size}: the map can only name a quadrant ({row.constant_share:.0%} constant)")
    whose = "the predicted class" if target == "pred" else "the true class"
    text = (
        f"Maps of {whose} (one per image, layer and method; a correct image's other map is the same map). "
        "Statistics cover informative maps only; a constant map's are missing, not zero. Entropy is over the layer's own cells, normalised by the log of their count, so upsampling adds none."
    )
    return text + (" " + "; ".join(parts) + "." if parts else " No layer here is 2x2 or smaller.")


def _localisation_text(frame: pd.DataFrame) -> str:
    """Correct images only. pointing_hit: the peak within 2 px of the object; exact_peak: on it
    (chance_exact: what a random point scores); cell_hit: the object touches the peak's cell
    (chance_cell: what a random cell scores); mass_vs_chance: share of map mass on the object over
    the object's share of the image (1 = a uniform map)."""
    text = (
        "Correctly classified images with an object mask. Each map's peak is taken on its layer's own grid, at the centre of its cell."
        " pointing_hit: the peak lies within 2 px of the object; exact_peak: on it (chance_exact: a random point's rate);"
        " cell_hit: the object touches the peak's cell, the tolerance a coarse layer can honour (chance_cell: a random cell's rate);"
        " mass_vs_chance: the map's share of mass on the object over the object's share of the image (1 = no better than a uniform map);"
        " entropy: over the layer's own cells, normalised by the log of their count. Each _se column is the standard error of the"
        " figure before it (a 95% interval is about ±2 SE)."
    )
    # "misses more often than it finds" is a claim about the rate, not one sample's: below 1/2 by 2 SE
    weak = [
        f"{r.model} {r.layer} {r.method} ({r.pointing_hit:.2f} ± {r.pointing_se:.2f})"
        for r in frame.itertuples(index=False)
        if r.pointing_hit + 2 * r.pointing_se < 0.5
    ]
    best = frame.sort_values("pointing_hit", ascending=False).iloc[0] if len(frame) else None
    if best is not None and pd.notna(best.pointing_hit):
        text += f" Best: {best.model} {best.layer} {best.method}, peak within 2 px of the object for {best.pointing_hit:.0%} of images."
    if weak:
        text += " Maps that miss the object more often than they find it (pointing_hit below 1/2 by more than two standard errors): " + ", ".join(weak) + "."
    return text


def _agreement_text(frame: pd.DataFrame) -> str:
    """What the agreement table says: the least and the most agreeing layer pairs."""
    text = (
        "Spearman's rank correlation between two maps of one image (the explained class), averaged over the images where both maps are"
        " informative (constant_pairs: pairs left out, a constant map ranks nothing), ± its standard error. between = layers: the same"
        " method at two layers of one model (a: the one with the larger feature map); between = methods: two methods at one layer."
        " rho near 0: the two maps order the image's pixels unrelatedly; near 1: they point at the same places."
    )
    layers = frame[(frame.between == "layers") & frame.rho.notna()]
    if len(layers):
        low, high = layers.loc[layers.rho.idxmin()], layers.loc[layers.rho.idxmax()]
        text += f" Least agreeing layers: {_pair(low)}; most: {_pair(high)}."
    return text


def _pair(row: pd.Series) -> str:
    se = f" ± {row.rho_se:.2f}" if pd.notna(row.rho_se) else " (one image: no SE)"
    return f"{row.model} {row.a} and {row.b} ({row.of}), rho {row.rho:.2f}{se}"


def _layer_resolution_text(frame: pd.DataFrame) -> str:
    """The same check as Adebayo et al. compute it, beside the one on the stored maps, and where
    the two disagree about the threshold."""
    text = (
        " The verdict reads the maps as the CAM stage stores them (ReLU'd, min-max scaled, upsampled to 32x32, where a 4x4 layer's"
        " 1,024 pixels are interpolated from 16 cells). Beside it, what Adebayo et al. compare, on the layer's own grid before the"
        " ReLU: spearman_layer (signed maps), spearman_layer_abs (their absolute values) and ssim_layer (SSIM of the absolute maps"
        " scaled to [0, 1], one window over the grid, as a 7x7 window does not fit a 4x4 map; 1 = unchanged). A 1-cell grid has no"
        " rank: empty there."
    )
    both = frame.dropna(subset=["spearman", "spearman_layer"])
    differ = [
        f"{r.model} {r.layer} {r.method} ({r.spearman:.2f} stored, {r.spearman_layer:.2f} on the grid)"
        for r in both.itertuples(index=False)
        if (r.spearman >= FAIL_SPEARMAN) != (r.spearman_layer >= FAIL_SPEARMAN)
    ]
    if differ:
        text += f" The two readings fall on different sides of {FAIL_SPEARMAN} for: " + ", ".join(differ) + "."
    elif len(both):
        text += f" The two readings fall on the same side of {FAIL_SPEARMAN} for all {len(both)} maps with both."
    return text


def _two_class_text(frame: pd.DataFrame) -> str:
    """The reference beside the fixed threshold: how alike two maps are that ought to differ."""
    text = (
        " A reference for the threshold, from the stored maps: two_class_rho is the rank correlation between the maps of two classes"
        " of one image (the predicted and the true class of each misclassified test image, two_class_images of them; ± two_class_se),"
        " maps that ought to differ. It is measured on the stored 32x32 maps of the misclassified images, constant pairs left out,"
        " while the check's rho is on its own sample and counts a map made constant as 0: a reference, not the same measurement."
    )
    comparable = frame[frame[["spearman", "spearman_se", "two_class_rho", "two_class_se"]].notna().all(axis=1)]
    closer = [
        f"{r.model} {r.layer} {r.method} ({r.spearman:.2f} against {r.two_class_rho:.2f})"
        for r in comparable.itertuples(index=False)
        if r.spearman - r.two_class_rho > 2 * np.hypot(r.spearman_se, r.two_class_se)
    ]
    if not len(comparable):
        text += " No map has enough images on both sides to be compared with it."
    elif closer:
        text += (
            " Randomising every layer above changed these maps less than switching the class does (by more than two standard errors): "
            + ", ".join(closer)
            + "."
        )
    else:
        text += (
            f" Of the {len(comparable)} maps compared, none stays closer to the trained one under randomisation than two classes' maps"
            " are to each other, by more than two standard errors."
        )
    return text


def _faithfulness_text(frame: pd.DataFrame) -> str:
    """The verdicts in words; each names the baseline it rests on, its margin and adjusted p."""
    lines = []
    for r in frame.itertuples(index=False):
        name = f"{r.model} {r.layer} {r.method}"
        if "n/a" in (r.deletion_verdict, r.insertion_verdict):
            lines.append(f"{name}: too few scored images to judge ({r.images}; a verdict needs {verdicts.MIN_IMAGES}).")
            continue
        failing = [
            f"{curve} ({'not shown better' if verdict == 'tie' else 'worse'} than the {baseline} map, margin {margin:+.3f}, p = {p:.2g})"
            for curve, verdict, baseline, margin, p in (
                ("deletion", r.deletion_verdict, r.deletion_baseline, r.deletion_margin, r.deletion_p_holm),
                ("insertion", r.insertion_verdict, r.insertion_baseline, r.insertion_margin, r.insertion_p_holm),
            )
            if verdict != "better"
        ]
        if failing:
            lines.append(f"{name}: not shown more faithful on " + " and ".join(failing) + ".")
    better = [f"{r.model} {r.layer} {r.method}" for r in frame.itertuples(index=False) if r.deletion_verdict == r.insertion_verdict == "better"]
    if not lines:
        return "Every map beats every baseline on both curves."
    summary = ("Better than every baseline on both curves: " + ", ".join(better) + ". ") if better else "No map beats every baseline on both curves. "
    return summary + " ".join(lines)


# Methods whose weights are ReLU(gradient): with post-ReLU activations their maps are
# non-negative mixtures of the layer's activation maps, whatever the head (issue 22).
NONNEGATIVE_MIXTURES = ("gradcam++", "layercam")


class RunReport(ReportRun):
    """A run's report: one method per section, each a query, its words and its figure."""

    # -- sections --------------------------------------------------------------------------

    def table2(self) -> Section:
        ran = self.resources()
        per_worker = ran["gpus_per_worker"] if ran["use_gpu"] else ran["cpus_per_worker"]
        unit = "GPU-h" if ran["use_gpu"] else "CPU-h"
        frame = with_paper_columns(q.accuracy(self.con, per_worker, ran["workers"], unit), self.cfg.data.source)
        text = f"Best trial per model on the {len(self.test)} test images. {unit}: workers x {'GPUs' if ran['use_gpu'] else 'CPUs'} per worker x training wall time."
        if self.cfg.data.source == "cifar100":
            text += (
                f" paper_params_m and paper_test_top1 are the seed paper's Tables 1 and 2 (CIFAR-100, 40 epochs); this run trained"
                f" {self.cfg.train.epochs} epochs with its own search, so a gap says how far this run is from the paper's setting."
            )
        return Section("Table 2: accuracy of each model", text, frame)

    def cam_grids(self) -> Section:
        section = Section("Grad-CAM by layer: correct and misclassified examples (the paper's Figures 1-7)")
        if not self.has_cams:
            return Section(section.title, "No cams in this run: run jobs.cam.")
        for model in q.cam_models(self.con):
            layers = q.cam_layers(self.con, model)
            method = q.cam_methods(self.con, model)[0]
            # Examples by query: the 4 most confident correct and the 4 most confident mistakes.
            picks = q.confident_picks(self.con, model, method, layers.layer[0])
            if len(picks):
                maps = q.heatmaps(self.con, model, method, "pred", picks.image_index)
                title = f"{model}: {method} for the predicted class"
                section.figures.append(fig.cam_grid(self.out / f"cams_{model}.png", title, picks, layers, maps, self.images(picks.image_index), self.names))
                mistakes = picks[~picks.correct.astype(bool)]
                if len(mistakes) and "label" in q.cam_targets(self.con):  # the same mistakes, explained for the class they should have named
                    maps = q.heatmaps(self.con, model, method, "label", mistakes.image_index)
                    title = f"{model}: {method} for the true class of the same mistakes"
                    path = self.out / f"cams_{model}_true_class.png"
                    section.figures.append(fig.cam_grid(path, title, mistakes, layers, maps, self.images(mistakes.image_index), self.names))
        section.text = (
            "Rows: the most confident correct predictions, then the most confident mistakes; columns: the image, then each CAM layer"
            " from the earliest to the last. Where the true class was explained too (--targets pred,label), a second figure per model"
            " shows the mistakes' maps for the class they should have named: where the model found evidence for it."
        )
        return section

    def degenerate(self) -> Section:
        if not self.has_cams:
            return Section("Heatmaps by layer feature size", "No cams in this run.")
        target = q.explained_target(self.con)
        frame = q.by_feature_size(self.con, target)
        measures = {
            "mean_entropy": "entropy over the layer's cells (1 = uniform)",
            "mean_top10_mass": "mass in top 10% of pixels",
            "pointing_hit": "peak within 2 px of the object",
            "constant_share": "constant maps",
        }
        figure = fig.grouped_bars(self.out / "degenerate_by_size.png", frame, measures, "CAM layer feature map")
        return Section("Heatmaps by layer feature size", _size_text(frame, target), frame.drop(columns="h"), [figure])

    def localisation(self) -> Section:
        title = "Localisation: do the maps point at the object?"
        if not self.has_cams or not q.count(self.con, "cams", "object_area is not null"):
            return Section(title, "This dataset has no object masks, so localisation is not scored (see results/README.md for adding masks or boxes).")
        frame = q.localisation(self.con, q.explained_target(self.con))
        return Section(title, _localisation_text(frame), frame.drop(columns="h"))

    def localisation_by_class(self) -> Section:
        title = "Localisation by class: where the best map misses"
        if not self.has_cams or not q.count(self.con, "cams", "object_area is not null"):
            return Section(title, "No object masks: nothing to score by class.")
        frame = q.localisation_by_class(self.con, q.explained_target(self.con))
        frame.insert(4, "class", [self.names[i] for i in frame.label])
        weakest = frame.groupby("model", sort=True).head(5).reset_index(drop=True)
        text = (
            "For each model's best-pointing map (layer and method), its pointing rate by class on the correctly classified images"
            " (± SE, over the images column's count): the five weakest classes per model, where an average over all classes hides them."
        )
        return Section(title, text, weakest)

    def faithfulness(self) -> Section:
        title = "Faithfulness against trivial maps"
        if not self.has_cams or not q.count(self.con, "cams", "faithfulness_sample"):
            why = "--faithfulness-steps 0 or --faithfulness-images 0"
            if self.has_cams and "pred" not in q.cam_targets(self.con):
                why = "it is measured for the predicted class, and this run explained the label only (--targets label)"
            return Section(title, f"No faithfulness scores in this run ({why}).")
        frame = q.faithfulness(self.con)
        text = (
            f"Deletion (lower is better) and insertion (higher is better) AUCs of the predicted class on a seeded sample of {q.faithfulness_images(self.con)} test images,"
            f" removed pixels filled with a blurred copy of the image. Each map is compared with {len(BASELINES)} maps that know nothing of the model"
            " (random, a centre Gaussian, the image's Sobel edges, and coarse_random: noise on the explained layer's own grid, upsampled as"
            " its maps are, which separates a coarse map from a meaningful one). A map is better on a curve when it beats each of them:"
            f" one-sided paired t-tests per baseline, Holm-adjusted over this report's {frame.attrs['tests']} tests, at {verdicts.ALPHA:.0%}."
            " Margin (positive: the map is better) and SE are against the baseline the verdict names: the one the map is least surely"
            " better than, or for 'worse' the one that beats it (error bars: 2 SE). A constant map is scored as what it is, pixels"
            " removed in random order (constant_share: their share). The AUCs are also split by correctly classified (images_correct of"
            " them) and misclassified images: a map may follow the evidence for a right answer and not for a wrong one."
            " " + _faithfulness_text(frame)
        )
        return Section(title, text, frame, [fig.faithfulness_margins(self.out / "faithfulness.png", frame)] if len(frame) else [])

    def agreement(self) -> Section:
        title = "Agreement between layers and between methods"
        if not self.has_cams:
            return Section(title, "No cams in this run: run jobs.cam.")
        frame = q.map_agreement(self.con, q.explained_target(self.con))
        if not len(frame):
            return Section(title, "Each model has one CAM layer and one method here: there is no pair of maps to compare.")
        return Section(title, _agreement_text(frame), frame)

    def sanity(self) -> Section:
        title = "Sanity check: do the maps change when the model's weights are randomised?"
        if not has_view(self.con, "sanity"):
            return Section(title, "No sanity check in this run (--sanity-images 0, or no method with a fast path).")
        frame = q.sanity_checks(self.con)
        frame["verdict"] = np.where(frame.spearman.isna(), "n/a", np.where(frame.spearman >= FAIL_SPEARMAN, "insensitive", "changes"))
        reference = q.two_class_agreement(self.con) if self.has_cams else pd.DataFrame()
        if len(reference):
            frame = frame.merge(reference, on=["model", "layer", "method"], how="left")
        text = (
            "Cascading randomisation (Adebayo et al., 2018) on a seeded sample: the weights are re-initialised from the head down, and each"
            " map is compared with the trained model's map of the same image and class (Spearman rank correlation, 1 = unchanged),"
            " each image's correlation averaged over independent randomisations (draws)."
            f" Shown: the step at which every layer above the explained one is random. At {FAIL_SPEARMAN} or more a map is flagged"
            " 'insensitive': once the head and every layer above the explained one are random, the map barely changes, so it"
            " shows little of what the model learned above that layer (the explained layer and those below it are still trained"
            " at this step). A map the randomisation made constant has changed completely and counts as rho = 0"
            " (became_constant: their share)."
        )
        by_construction = sorted({r.method for r in frame.itertuples(index=False) if r.method in NONNEGATIVE_MIXTURES})
        if by_construction:
            text += (
                f" Where the explained layer's activations are non-negative (it ends in a ReLU, as a ResNet's blocks do),"
                f" a high rho is expected by construction for {', '.join(by_construction)}: they weigh the activations by"
                " ReLU(gradient), so their maps are non-negative mixtures of the layer's own activation maps whatever the layers"
                " above it hold. There it is no finding; elsewhere (MobileNet's and EfficientNet's linear block outputs) it is."
            )
        flagged = [f"{r.model} {r.layer} {r.method} ({r.spearman:.2f})" for r in frame.itertuples(index=False) if r.verdict == "insensitive"]
        text += (" Flagged: " + ", ".join(flagged) + ".") if flagged else " No map is flagged."
        text += _layer_resolution_text(frame)
        if "two_class_rho" in frame:
            text += _two_class_text(frame)
        unmeasured = [f"{r.model} {r.layer} {r.method}" for r in frame.itertuples(index=False) if r.verdict == "n/a"]
        if unmeasured:
            text += " Not measurable (every map constant): " + ", ".join(unmeasured) + "."
        steps = q.sanity_steps(self.con)
        return Section(title, text, frame, [fig.sanity_curves(self.out / "sanity.png", steps, FAIL_SPEARMAN)] if len(steps) else [])

    def confusions(self) -> Section:
        frame = q.confusions(self.con)
        frame.insert(2, "true_class", [self.names[i] for i in frame.label])
        frame.insert(4, "predicted_class", [self.names[i] for i in frame.pred])
        section = Section("Most-confused class pairs", "", frame)
        if q.count(self.con, "predictions", "coarse_label is not null"):
            shares = q.same_superclass_share(self.con)
            section.text = "Share of mistakes that stay within the true superclass: " + ", ".join(f"{m} {s:.2f}" for m, s in shares.itertuples(index=False))
        if self.has_cams and len(frame):
            panels = []
            for row in frame.head(6).itertuples(index=False):
                for ex in q.confusion_example(self.con, row.model, row.label, row.pred).itertuples(index=False):
                    title = f"{row.model}\n{self.names[row.label]} as {self.names[row.pred]}\n({ex.layer})"
                    panels.append((title, self.image(ex.image_index), np.asarray(ex.heatmap, np.uint8)))
            if panels:
                section.figures.append(fig.overlay_row(self.out / "confusions.png", panels))
        return section

    def per_class(self) -> Section:
        frame = q.per_class(self.con)
        frame.insert(2, "class", [self.names[i] for i in frame.label])
        figure = fig.per_class_bars(self.out / "per_class_accuracy.png", frame, self.names)
        worst = frame.sort_values(["accuracy", "model", "label"]).head(10).reset_index(drop=True)
        return Section("Per-class accuracy", "The ten weakest (model, class) pairs; the figure shows every class.", worst, [figure])

    def learning_curves(self) -> Section:
        frame = q.epochs(self.con)
        figures = [fig.learning_curves(self.out / "learning_curves.png", frame)] if len(frame) else []
        return Section("Learning curves", "Validation top-1 per epoch of every trial.", q.epochs_by_model(self.con), figures)

    def search(self) -> Section:
        effects = []
        for key in list(self.cfg.search.grid) + list(self.cfg.search.sample):
            frame = q.hyperparameter_effect(self.con, key)
            effects.append(frame.head(0) if key in self.cfg.search.sample else frame)  # continuous: summarised, not listed
        table = pd.concat(effects, ignore_index=True) if effects else None
        status = q.trial_status(self.con)
        points = q.trial_points(self.con)
        text = (
            "Trials by status: "
            + ", ".join(f"{n} {s}" for s, n in status.itertuples(index=False))
            + ". Mean best validation accuracy by each searched value (x in the figure: stopped by ASHA)."
        )
        return Section(
            "The search: what mattered and what ASHA stopped", text, table, [fig.search_scatter(self.out / "search.png", points)] if len(points) else []
        )

    def failed_search(self) -> Section:
        frame = q.trial_errors(self.con)
        text = (
            f"No trial produced a usable checkpoint ({len(frame)} trials), so nothing was evaluated on the test set or explained. "
            "Each trial's status and the last line of its error follow; the full tracebacks are in the trials' folders under tune/."
        )
        return Section("The search produced no usable trial", text, frame)

    def sections(self) -> list[Section]:
        if not q.count(self.con, "accuracy"):
            return [self.failed_search(), self.learning_curves(), self.search()]
        return [
            self.table2(),
            self.cam_grids(),
            self.degenerate(),
            self.localisation(),
            self.localisation_by_class(),
            self.faithfulness(),
            self.agreement(),
            self.sanity(),
            self.confusions(),
            self.per_class(),
            self.learning_curves(),
            self.search(),
        ]


# -- assembly --------------------------------------------------------------------------------


def markdown(report: RunReport, sections: list[Section]) -> str:
    """report.md: a heading per section, its words, its table and links to its PNGs beside it."""
    lines = [f"# {report.title}", "", f"Run folder `{report.run_dir}`, dataset `{report.cfg.data.source}`.", ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.text:
            lines += [s.text, ""]
        if s.table is not None and len(s.table):
            lines += [s.table.to_markdown(index=False, floatfmt=".4g"), ""]
        lines += [f"![{name}]({name})" for name in s.figures] + [""]
    return "\n".join(lines)


def write_report(run_dir: Path, console: Console | None = None) -> Path:
    """Write ``run_dir/report/report.md`` and ``report.html`` with the figures; print the tables
    to ``console``. Returns report.md's path (report.html lies beside it)."""
    from cifarcam.report.html import write_html
    from cifarcam.results import write_text_atomic

    report = RunReport(run_dir)
    sections = report.sections()
    if console is not None:
        print_sections(console, sections, report.out)
    path = report.out / "report.md"
    write_text_atomic(path, markdown(report, sections))
    write_html(report, sections)
    return path
