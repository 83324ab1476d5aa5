"""How many deletion / insertion steps do the faithfulness verdicts need? (issue 20, item 4)

Faithfulness costs 2 x (steps - 1) forward passes per sampled image and map, so the step count is
the lever on its cost. Fewer steps coarsen each curve (a trapezoid over fewer points), but a
verdict compares a map's curve with each baseline's on the same image, where much of that error
is shared. This measures what fewer steps change, on a real run's own checkpoints and test set:

- each model's faithfulness sample (the stage's seeded sample, the default 128 images, predicted
  class) is explained by a ``CamActor`` in this process, once per step count, on the same maps;
- per map, curve and baseline: the mean paired margin and its standard error, and the verdicts
  as the report computes them (``cifarcam.report.queries.faithfulness``: one-sided paired t-tests,
  Holm over each step count's tests);
- per-image agreement of the AUCs with the finest step count (Pearson's r, mean |difference|),
  and the seconds each step count took (one process, the step counts interleaved, best of
  ``--repeats``).

    python benchmarks/faithfulness_steps.py --run RUN [--steps 64u,16u,16q,8q] [--models regnet] [--out faithfulness_steps.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cifarcam.cam.actor import CamActor, images_table  # noqa: E402
from cifarcam.cam.settings import CamSettings, resolve_layers  # noqa: E402
from cifarcam.config import load_config  # noqa: E402
from cifarcam.data.splits import load_splits  # noqa: E402
from cifarcam.report.queries import faithfulness  # noqa: E402
from cifarcam.results import BASELINES, CAM_FAITHFULNESS  # noqa: E402
from cifarcam.run_layout import RunLayout  # noqa: E402
from cifarcam.training.checkpoint import read_meta  # noqa: E402
from cifarcam.training.models import ModelSpec  # noqa: E402


def sample_rows(run: Path, model: str, settings: CamSettings) -> tuple[pa.Table, str]:
    """The model's checkpoint and its faithfulness sample's rows as the stage feeds them to actors,
    with the run's own predictions (the class the curves follow)."""
    cfg = load_config(RunLayout(run).config)
    test = load_splits(cfg.data).test
    ((checkpoint,),) = duckdb.sql(f"select checkpoint from '{run}/accuracy.parquet' where model = ?", params=[model]).fetchall()
    pred = duckdb.sql(f"select pred from '{run}/predictions.parquet' where model = ? order by image_index", params=[model]).fetchnumpy()["pred"]
    table = images_table(test, pred, settings.faithfulness)
    return table.filter(table.column("faithfulness")), str(run / checkpoint)


def all_margins(frame: pd.DataFrame) -> pd.DataFrame:
    """Every paired margin (positive: the map is better) with its standard error, per layer,
    method, curve and baseline: what the verdicts test, not only the margin the report names."""
    rows = []
    for (layer, method), group in frame.groupby(["layer", "method"]):
        for baseline in BASELINES:
            for curve, diff in (
                ("deletion", group[f"deletion_auc_{baseline}"] - group["deletion_auc"]),
                ("insertion", group["insertion_auc"] - group[f"insertion_auc_{baseline}"]),
            ):
                rows.append(
                    {"layer": layer, "method": method, "curve": curve, "baseline": baseline, "margin": diff.mean(), "se": diff.std() / np.sqrt(len(diff))}
                )
    return pd.DataFrame(rows).set_index(["layer", "method", "curve", "baseline"])


def explain(actor: CamActor, rows: pa.Table) -> tuple[pa.Table, float]:
    started = time.perf_counter()
    out = actor(rows)
    return out, time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a run folder whose search finished (its checkpoints and test set)")
    p.add_argument("--models", default=None, help="comma-separated families (default: every model of the run)")
    p.add_argument("--steps", default="64u,16u,16q,8q", help="step counts, the reference first; u: uniform, q: quadratic spacing (the default)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("faithfulness_steps.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps.split(",")
    models = args.models.split(",") if args.models else [m for (m,) in duckdb.sql(f"select model from '{args.run}/accuracy.parquet' order by model").fetchall()]

    report: dict = {"run": str(args.run), "steps": steps, "models": {}}
    for model in models:
        rows, checkpoint = sample_rows(args.run, model, CamSettings(targets=("pred",)))
        layers = resolve_layers(ModelSpec(**read_meta(checkpoint)["model"]), None, model)  # the same for every step count
        actors = {}
        for s in steps:
            count, spacing = int(s.rstrip("uq")), {"u": "uniform", "q": "quadratic"}.get(s[-1], "quadratic")
            settings = CamSettings(targets=("pred",), faithfulness_steps=count, faithfulness_spacing=spacing)
            actors[s] = CamActor(checkpoint, str(args.run), settings, layers, device="cpu", threads=args.threads)
        explain(actors[steps[-1]], rows.slice(0, 4))  # warm: the first forward pays for allocations
        seconds = {s: [] for s in steps}
        tables = {}
        for _ in range(args.repeats):
            for s in steps:
                tables[s], took = explain(actors[s], rows)
                seconds[s].append(took)
        frames = {s: tables[s].select(["model", "layer", "method", "image_index", *CAM_FAITHFULNESS]).to_pandas() for s in steps}
        verdicts = {}
        for s in steps:
            con = duckdb.connect()
            con.register("cams", tables[s])
            verdicts[s] = faithfulness(con)
        margins = {s: all_margins(frames[s]) for s in steps}
        ref_margins = margins[steps[0]]
        margin_error = {
            s: ((m["margin"] - ref_margins["margin"]).abs() / ref_margins["se"])
            .rename("error_in_se")
            .to_frame()
            .join(m["margin"])
            .reset_index()
            .to_dict("records")
            for s, m in margins.items()
            if s != steps[0]
        }
        ref = frames[steps[0]]
        agreement = {}
        for s in steps[1:]:
            other = frames[s]
            agreement[s] = {
                column: {
                    "pearson_r": float(np.corrcoef(ref[column], other[column])[0, 1]),
                    "mean_abs_diff": float((ref[column] - other[column]).abs().mean()),
                    "mean_diff": float((other[column] - ref[column]).mean()),
                }
                for column in CAM_FAITHFULNESS
            }
        report["models"][model] = {
            "images": rows.num_rows,
            "seconds_best": {s: min(v) for s, v in seconds.items()},
            "verdicts": {
                s: v.drop(columns=[c for c in v.columns if c.endswith(("_correct", "_misclassified"))]).to_dict("records") for s, v in verdicts.items()
            },
            "agreement": agreement,
            "margin_error": margin_error,
        }
        print(f"\n{model}: {rows.num_rows} sampled images; best of {args.repeats}: " + ", ".join(f"{s} steps {min(v):.1f} s" for s, v in seconds.items()))
        table = pd.concat({s: v.set_index(["layer", "method"]) for s, v in verdicts.items()}, names=["steps"])
        show = [
            "deletion",
            "deletion_verdict",
            "deletion_baseline",
            "deletion_margin",
            "deletion_se",
            "insertion",
            "insertion_verdict",
            "insertion_baseline",
            "insertion_margin",
            "insertion_se",
        ]
        with pd.option_context("display.width", 250, "display.max_columns", 20, "display.precision", 4):
            print(table[show].sort_index(level=[1, 0], sort_remaining=False))
        for s, rows_ in margin_error.items():
            worst = max(rows_, key=lambda r: r["error_in_se"])
            print(
                f"  {s}: every margin (layer x curve x baseline) within {worst['error_in_se']:.2f} SE of {steps[0]}'s "
                f"(worst: {worst['layer']} {worst['curve']} vs {worst['baseline']})"
            )
        for s, columns in agreement.items():
            worst = min(columns.items(), key=lambda kv: kv[1]["pearson_r"])
            print(
                f"  {s} steps against {steps[0]}: per-image AUCs' Pearson r >= {worst[1]['pearson_r']:.4f} (lowest: {worst[0]}); "
                f"mean |difference| <= {max(c['mean_abs_diff'] for c in columns.values()):.4f}"
            )
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
