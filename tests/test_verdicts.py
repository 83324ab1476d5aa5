"""Faithfulness verdicts on hand-built margins whose answer is known, where the old rule (one
normal 2-SE test against the baseline with the smallest mean margin) and the words disagreed."""

import duckdb
import numpy as np
import pandas as pd
import pytest

from cifarcam.report import queries as q
from cifarcam.report.verdicts import ALPHA, MIN_IMAGES, curve_verdicts, holm, one_sided_p
from cifarcam.report.writer import _faithfulness_text
from cifarcam.results import BASELINES


def test_holm_adjusts_step_down_and_keeps_the_order():
    assert holm(np.array([0.01, 0.04, 0.03])).tolist() == pytest.approx([0.03, 0.06, 0.06])
    adjusted = holm(np.array([[0.2, np.nan], [0.001, 0.5]]))
    assert adjusted[0, 1] != adjusted[0, 1]  # NaN: not a test, and not counted in m
    assert adjusted.ravel()[[0, 2, 3]].tolist() == pytest.approx([0.4, 0.003, 0.5])


def test_the_p_value_is_a_t_tests_and_refuses_small_samples():
    # the t table: t = 2.262 with 9 degrees of freedom is the one-sided 2.5% point (a normal test
    # would say 1.2%: it is too sure of a 10-image mean)
    assert one_sided_p(np.array([0.2262]), np.array([0.1]), np.array([10]))[0] == pytest.approx(0.025, abs=2e-4)
    assert np.isnan(one_sided_p(np.array([0.2]), np.array([0.01]), np.array([MIN_IMAGES - 1]))[0])
    assert one_sided_p(np.array([0.1, -0.1]), np.array([0.0, 0.0]), np.array([10, 10])).tolist() == [0.0, 1.0]


def _one_map(deletion: dict, insertion: dict, n: int = 100) -> dict:
    margins = np.array([[[deletion[b][0] for b in BASELINES], [insertion[b][0] for b in BASELINES]]])
    ses = np.array([[[deletion[b][1] for b in BASELINES], [insertion[b][1] for b in BASELINES]]])
    return curve_verdicts(margins, ses, np.array([n]))


CLEAR = dict.fromkeys(BASELINES, (0.3, 0.01))


def test_every_baseline_is_tested_not_only_the_one_with_the_smallest_margin():
    """The issue's case: random 0.05 +- 0.03, centre 0.04 +- 0.01. The old rule tested the centre
    alone (0.04 > 2 x 0.01: "better"), yet random is not beaten at 2 SE."""
    judged = _one_map({"random": (0.05, 0.03), "centre": (0.04, 0.01), "edge": (0.2, 0.01), "coarse_random": (0.2, 0.01)}, CLEAR)
    assert judged["verdict"].tolist() == [["tie", "better"]]
    assert BASELINES[judged["named"][0, 0]] == "random" and judged["p"][0, 0] >= ALPHA
    assert judged["tests"] == 2 * 2 * len(BASELINES)  # curves x baselines x directions


def test_a_map_a_baseline_beats_is_worse_and_names_that_baseline():
    judged = _one_map({**CLEAR, "centre": (-0.1, 0.01)}, CLEAR)
    assert judged["verdict"][0, 0] == "worse" and BASELINES[judged["named"][0, 0]] == "centre"


def test_many_verdicts_in_one_report_need_more_evidence_each():
    """t = 2.2 (n = 100) clears 5% alone, but not once a report makes 60 such claims (Holm)."""
    one = _one_map(dict.fromkeys(BASELINES, (0.022, 0.01)), CLEAR)
    assert one["verdict"][0, 0] == "tie"  # 16 tests already
    alone = curve_verdicts(np.full((1, 1, 1), 0.022), np.full((1, 1, 1), 0.01), np.array([100]))
    assert alone["verdict"].tolist() == [["better"]] and alone["tests"] == 2
    many = curve_verdicts(np.full((10, 1, 3), 0.022), np.full((10, 1, 3), 0.01), np.full(10, 100))
    assert (many["verdict"] == "tie").all()


def test_too_few_images_get_no_verdict():
    judged = _one_map(CLEAR, CLEAR, n=MIN_IMAGES - 1)
    assert judged["verdict"].tolist() == [["n/a", "n/a"]] and judged["tests"] == 0


def _cams(deletion: dict[str, tuple[float, float]], n: int, seed: int = 0) -> pd.DataFrame:
    """n faithfulness rows of one map whose per-image deletion margin over each baseline has the
    given mean and standard error, exactly; on insertion it beats every baseline clearly."""
    rng = np.random.default_rng(seed)
    rows = {"model": "m", "layer": "l", "layer_h": 4, "method": "gradcam", "faithfulness_sample": True, "degenerate": False}
    frame = pd.DataFrame({**rows, "deletion_auc": np.full(n, 0.5), "insertion_auc": np.full(n, 0.5), "correct": np.arange(n) % 3 > 0}, index=range(n))
    for b, (mean, se) in deletion.items():
        noise = rng.standard_normal(n)
        noise = (noise - noise.mean()) / noise.std(ddof=1) * se * np.sqrt(n)
        frame[f"deletion_auc_{b}"] = 0.5 + mean + noise
        frame[f"insertion_auc_{b}"] = 0.2 + noise * 0.01
    return frame


def test_the_reports_words_follow_the_verdicts_from_parquet_rows():
    """End to end through DuckDB: the random baseline's margin (0.05, SE 0.03) is not beaten, and
    the words say so, naming it; the old rule called this map better."""
    con = duckdb.connect()
    con.register("cams", _cams({"random": (0.05, 0.03), "centre": (0.04, 0.01), "edge": (0.2, 0.01), "coarse_random": (0.2, 0.01)}, 100))
    frame = q.faithfulness(con)
    row = frame.iloc[0]
    assert row.deletion_verdict == "tie" and row.deletion_baseline == "random" and row.insertion_verdict == "better"
    assert row.deletion_margin == pytest.approx(0.05) and row.deletion_se == pytest.approx(0.03)
    assert (row.images, row.images_correct, row.deletion_correct, row.insertion_misclassified) == (100, 66, 0.5, 0.5)  # the split by correct
    text = _faithfulness_text(frame)
    assert text.startswith("No map beats every baseline on both curves.")
    assert "m l gradcam: not shown more faithful on deletion (not shown better than the random map, margin +0.050, p = " in text


def test_a_map_is_said_to_miss_the_object_only_when_its_rate_is_below_half_by_two_se():
    from cifarcam.report.writer import _localisation_text

    frame = pd.DataFrame({"model": "m", "layer": ["a", "b"], "method": "gradcam", "pointing_hit": [0.45, 0.30], "pointing_se": [0.05, 0.05]})
    text = _localisation_text(frame)
    assert "m b gradcam (0.30 ± 0.05)" in text and "m a gradcam" not in text.split("than they find it")[1]
