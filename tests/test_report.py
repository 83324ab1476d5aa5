"""The report and the query job on the demo run: sections, figures, numbers, errors."""

import re
import struct
import sys
from pathlib import Path

import duckdb
import pytest

from cifarcam.report.views import connect, run_sql
from helpers import ROOT, run_job

sys.path.insert(0, str(ROOT / "benchmarks"))

from full_check import report_map_count  # noqa: E402  the full-size check's reading of the same table

SECTIONS = [
    "Table 2: accuracy of each model",
    "Grad-CAM by layer: correct and misclassified examples",
    "Heatmaps by layer feature size",
    "Localisation: do the maps point at the object?",
    "Localisation by class: where the best map misses",
    "Faithfulness against trivial maps",
    "Agreement between layers and between methods",
    "Sanity check: do the maps change when the model's weights are randomised?",
    "Most-confused class pairs",
    "Per-class accuracy",
    "Learning curves",
    "The search: what mattered and what ASHA stopped",
]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_report_has_every_section_and_its_figures(demo_run):
    text = (demo_run / "report" / "report.md").read_text()
    for title in SECTIONS:
        assert f"## {title}" in text, title
    models = [m for (m,) in duckdb.sql(f"select model from '{demo_run}/accuracy.parquet' order by model").fetchall()]
    expected = (
        {f"cams_{m}.png" for m in models}
        | {f"cams_{m}_true_class.png" for m in models}
        | {
            "degenerate_by_size.png",
            "faithfulness.png",
            "sanity.png",
            "confusions.png",
            "per_class_accuracy.png",
            "learning_curves.png",
            "search.png",
        }
    )
    linked = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text))
    assert expected <= linked
    for name in expected:
        width, height = _png_size(demo_run / "report" / name)
        assert 300 <= width <= 3000 and 200 <= height <= 3000, (name, width, height)
    # the per-model grid: image + 3 layers wide, 1.6 in per panel at 100 dpi; 8 examples tall at most
    width, height = _png_size(demo_run / "report" / f"cams_{models[0]}.png")
    assert width == 640 and 200 < height <= 1400


def test_report_numbers_agree_with_direct_counts(demo_run):
    text = (demo_run / "report" / "report.md").read_text()
    table2 = text.split("## Table 2")[1].split("##")[0]
    for model, top1 in duckdb.sql(f"select model, test_top1 from '{demo_run}/accuracy.parquet'").fetchall():
        row = next(line for line in table2.splitlines() if f"| {model} " in line)
        assert f"{top1:.4g}" in row, (row, top1)
    counts = dict(duckdb.sql(f"select status, count(*) from '{demo_run}/trials.parquet' group by status").fetchall())
    assert "Trials by status: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) in text
    (n_wrong_pairs,) = duckdb.sql(
        f"select max(n) from (select count(*) n from '{demo_run}/predictions.parquet' where not correct group by model, label, pred)"
    ).fetchall()[0]
    confusions = text.split("## Most-confused class pairs")[1].split("##")[0]
    first_row = [line for line in confusions.splitlines() if line.startswith("| ") and "model" not in line][0]
    assert first_row.rstrip(" |").endswith(str(n_wrong_pairs))


def test_the_reports_words_follow_its_numbers(demo_run):
    """Every map the faithfulness table does not call better than its strongest baseline on both
    curves is named in a sentence saying so; the others are listed as better. Likewise the sanity
    check's flags and the localisation text's weak maps."""
    text = (demo_run / "report" / "report.md").read_text()
    faithfulness = text.split("## Faithfulness against trivial maps")[1].split("\n## ")[0]
    con = connect(demo_run)
    rows = run_sql(
        con,
        """select model, layer, method,
        avg(least(deletion_auc_random, deletion_auc_centre, deletion_auc_edge) - deletion_auc) as worst_deletion_margin
        from cams where faithfulness_sample and deletion_auc is not null group by all""",
    )
    assert len(rows)
    for r in rows.itertuples(index=False):
        name = f"{r.model} {r.layer} {r.method}"
        said_not = f"{name}: not shown more faithful on" in faithfulness
        said_better = re.search(rf"Better than every baseline on both curves: [^.]*{re.escape(name)}", faithfulness) is not None
        assert said_not != said_better, name  # exactly one verdict in words
        if r.worst_deletion_margin <= 0:  # a per-image average cannot beat a baseline it trails on average
            assert said_not, name
    sanity = text.split("## Sanity check")[1].split("\n## ")[0]
    for model, layer, method, rho in run_sql(con, 'select model, layer, method, spearman from sanity where "check"').itertuples(index=False):
        assert (f"{model} {layer} {method} ({rho:.2f})" in sanity) == (rho >= 0.5)
    if "No map is flagged." in sanity:
        assert run_sql(con, 'select count(*) as n from sanity where "check" and spearman >= 0.5')["n"][0] == 0
    # the feature-size table counts one target's maps, and says whose: its count is DuckDB's
    sizes = text.split("## Heatmaps by layer feature size")[1].split("\n## ")[0]
    assert "Maps of the predicted class (one per image, layer and method" in sizes
    assert report_map_count(demo_run / "report" / "report.md") == run_sql(con, "select count(*) as n from cams where target = 'pred'")["n"][0]


def test_the_papers_accuracies_stand_beside_ours_for_cifar100_only():
    import pandas as pd

    from cifarcam.report.writer import with_paper_columns

    frame = pd.DataFrame({"model": ["resnet50", "swin", "resnet_tiny"], "test_top1": [0.5, 0.4, 0.3]})
    paper = with_paper_columns(frame, "cifar100")
    assert paper["paper_test_top1"].tolist()[:2] == pytest.approx([0.8715, 0.7085]) and pd.isna(paper["paper_test_top1"].tolist()[2])
    assert paper["paper_params_m"].tolist()[:2] == [23.7, 28.3]
    assert "paper_test_top1" not in with_paper_columns(frame, "cifar10").columns


def test_the_ten_documented_queries_run(demo_run):
    readme = (ROOT / "results" / "README.md").read_text()
    block = readme.split("```sql")[1].split("```")[0]
    without_comments = re.sub(r"^--.*$", "", block, flags=re.M)
    queries = [q.strip() for q in without_comments.split(";") if q.strip()]
    assert len(queries) == 10
    con = connect(demo_run)
    for q in queries:
        frame = run_sql(con, q)
        assert len(frame) > 0, q


def test_query_job_prints_and_writes(demo_run, tmp_path):
    proc = run_job("jobs.query", str(demo_run), "select model, test_top1 from accuracy order by model", timeout=120)
    assert proc.returncode == 0, proc.stderr
    for (model,) in duckdb.sql(f"select model from '{demo_run}/accuracy.parquet'").fetchall():
        assert model in proc.stdout
    out = tmp_path / "acc.csv"
    proc = run_job("jobs.query", str(demo_run), "select count(*) as n from cams", "--csv", str(out), timeout=120)
    assert proc.returncode == 0 and out.read_text().splitlines()[1] == str(
        duckdb.sql(f"select count(*) from read_parquet('{demo_run}/cams/**/*.parquet')").fetchall()[0][0]
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["/nonexistent-run", "select 1"], "error: /nonexistent-run: no such run folder"),
        (
            ["{tmp}", "select 1"],
            "error: {tmp}: not a finished run (missing trials.parquet, epochs.parquet, accuracy.parquet, predictions.parquet); run jobs.search first",
        ),
        (["{demo}", "selct * from trials"], 'error: SQL: Parser Error: syntax error at or near "selct"'),
        (["{demo}", "select * from nosuchtable"], "error: SQL: Catalog Error: Table with name nosuchtable does not exist!"),
    ],
)
def test_bad_run_or_sql_gives_one_line(demo_run, tmp_path, args, expected):
    args = [a.format(tmp=tmp_path, demo=demo_run) for a in args]
    proc = run_job("jobs.query", *args, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected.format(tmp=tmp_path)), lines


def test_report_job_on_a_bad_run_folder(tmp_path):
    proc = run_job("jobs.report", "--run", str(tmp_path / "missing"), timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path / 'missing'}: no such run folder"


def test_faithfulness_split_and_localisation_errors_are_the_maps_own(demo_run):
    """The faithfulness AUCs split by correct and misclassified images, and the localisation means'
    standard errors, recomputed from the stored maps."""
    from cifarcam.report import queries as q
    from cifarcam.report.views import connect

    con = connect(demo_run)
    split = q.faithfulness(con)
    direct = con.execute(
        """select model, layer, method, count(*) filter (where correct), avg(deletion_auc) filter (where correct),
                  avg(insertion_auc) filter (where not correct)
           from cams where faithfulness_sample and deletion_auc is not null group by all"""
    ).fetchall()
    assert len(split) == len(direct) > 0
    for model, layer, method, n_correct, deletion_correct, insertion_wrong in direct:
        row = split[(split.model == model) & (split.layer == layer) & (split.method == method)].iloc[0]
        assert row.images_correct == n_correct and row.images_correct <= row.images
        # no correct (or no misclassified) image in a map's sample: SQL's null, the frame's NaN
        assert row.deletion_correct == pytest.approx(float("nan") if deletion_correct is None else deletion_correct, nan_ok=True)
        assert row.insertion_misclassified == pytest.approx(float("nan") if insertion_wrong is None else insertion_wrong, nan_ok=True)
    target = q.explained_target(con)
    local = q.localisation(con, target)
    entropies = con.execute(
        "select model, layer, method, entropy from cams where correct and object_area is not null and target = ? and entropy is not null", [target]
    ).df()
    for (model, layer, method), group in entropies.groupby(["model", "layer", "method"]):
        row = local[(local.model == model) & (local.layer == layer) & (local.method == method)].iloc[0]
        assert row.entropy == pytest.approx(group.entropy.mean())
        assert row.entropy_se == pytest.approx(group.entropy.std(ddof=1) / len(group) ** 0.5, nan_ok=True)
    assert (local.mass_vs_chance_se.dropna() >= 0).all() and local.mass_vs_chance_se.notna().any()


def test_agreement_between_layers_is_the_rank_correlation_of_the_stored_maps(demo_run):
    """One pair recomputed by hand (scipy's Spearman on the stored uint8 maps), and the report's
    words name the least agreeing pair the table holds."""
    from scipy.stats import spearmanr

    from cifarcam.report import queries as q
    from cifarcam.report.views import connect

    con = connect(demo_run)
    target = q.explained_target(con)
    frame = q.map_agreement(con, target)
    layers = frame[frame.between == "layers"]
    assert len(layers) and set(layers.of) == set(con.execute("select distinct method from cams").df().method)
    row = layers.iloc[0]
    maps = con.execute(
        "select image_index, layer, heatmap from cams where model = ? and method = ? and target = ? and layer in (?, ?) order by image_index",
        [row.model, row.of, target, row.a, row.b],
    ).df()
    a, b = (maps[maps.layer == name].set_index("image_index").heatmap for name in (row.a, row.b))
    rho = [spearmanr(a[i], b[i]).statistic for i in a.index]
    rho = [r for r in rho if r == r]  # constant maps rank nothing
    assert row.images == len(rho) and row.rho == pytest.approx(sum(rho) / len(rho))
    text = (demo_run / "report" / "report.md").read_text().split("## Agreement between layers and between methods")[1].split("\n## ")[0]
    low = layers.loc[layers.rho.idxmin()]
    assert f"Least agreeing layers: {low.model} {low.a} and {low.b} ({low.of}), rho {low.rho:.2f}" in text


def test_the_sanity_checks_reference_is_two_classes_maps_of_one_image(demo_run):
    """two_class_rho recomputed by hand for one map (the predicted and the true class's maps of
    each misclassified image), and the words follow the rule they state."""
    import numpy as np
    from scipy.stats import spearmanr

    from cifarcam.report import queries as q
    from cifarcam.report.views import connect

    con = connect(demo_run)
    reference = q.two_class_agreement(con)
    assert len(reference) and (reference.two_class_images > 0).all()
    row = reference.iloc[0]
    maps = con.execute(
        "select image_index, target, heatmap from cams where not correct and model = ? and layer = ? and method = ?", [row.model, row.layer, row.method]
    ).df()
    pred, label = (maps[maps.target == t].set_index("image_index").heatmap for t in ("pred", "label"))
    rho = [r for r in (spearmanr(pred[i], label[i]).statistic for i in pred.index) if r == r]
    assert row.two_class_images == len(rho) and row.two_class_rho == pytest.approx(np.mean(rho))
    text = (demo_run / "report" / "report.md").read_text().split("## Sanity check")[1].split("\n## ")[0]
    sanity = q.sanity_checks(con).merge(reference, on=["model", "layer", "method"])
    closer = sanity[sanity.spearman - sanity.two_class_rho > 2 * np.hypot(sanity.spearman_se, sanity.two_class_se)]
    assert ("changed these maps less than switching the class does" in text) == bool(len(closer))
    for r in closer.itertuples(index=False):
        assert f"{r.model} {r.layer} {r.method} ({r.spearman:.2f} against {r.two_class_rho:.2f})" in text


def test_localisation_by_class_is_the_best_maps_own_pointing_rate(demo_run):
    from cifarcam.report import queries as q
    from cifarcam.report.views import connect

    con = connect(demo_run)
    target = q.explained_target(con)
    overall = q.localisation(con, target)
    by_class = q.localisation_by_class(con, target)
    for model, rows in by_class.groupby("model"):
        best = overall[overall.model == model].sort_values(["pointing_hit", "layer", "method"], ascending=[False, True, True]).iloc[0]
        assert set(zip(rows.layer, rows.method)) == {(best.layer, best.method)}  # one map per model, the best-pointing one
        (peaks,) = con.execute(
            "select count(pointing_hit) from cams where correct and object_area is not null and target = ? and model = ? and layer = ? and method = ?",
            [target, model, best.layer, best.method],
        ).fetchall()[0]
        assert rows.images.sum() == peaks  # every correctly classified image's map with a peak, once
        scored = rows[rows.images > 0]
        assert (scored.pointing_hit * scored.images).sum() / scored.images.sum() == pytest.approx(best.pointing_hit)
        rates = list(rows.pointing_hit.dropna())
        assert rates == sorted(rates) and rows.pointing_hit.isna().sum() == (rows.images == 0).sum()  # weakest first, no peak at all before them
