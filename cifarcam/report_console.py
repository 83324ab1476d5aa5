"""Terminal summaries of a stage's results (rich tables): the search's, any query's, the report's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from cifarcam.report_run import Section
    from cifarcam.search import SearchSummary


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def print_search_summary(summary: SearchSummary, console: Console) -> None:
    counts: dict[str, int] = {}
    for t in summary.trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    console.print(f"trials: {len(summary.trials)} (" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")")
    table = Table(title="best trial per model, on the test set")
    for col in ("model", "variant", "params (M)", "optimizer", "scheduler", "lr", "epochs", "val top-1", "test top-1", "test top-5", "superclass", "img/s"):
        table.add_column(col, justify="right" if col not in ("model", "variant", "optimizer", "scheduler") else "left")
    for a in summary.accuracy:
        table.add_row(
            a.model,
            a.variant,
            f"{a.params / 1e6:.2f}",
            a.optimizer,
            a.scheduler,
            f"{a.lr:.2g}",
            str(a.epochs),
            _pct(a.val_top1),
            _pct(a.test_top1),
            _pct(a.test_top5),
            _pct(a.test_superclass_top1),
            f"{a.images_per_s:.0f}" if a.images_per_s else "-",
        )
    console.print(table)
    console.print(f"results: {summary.out_dir}")


def rich_table(frame: pd.DataFrame, title: str = "") -> Table:
    """``frame`` as a rich Table: numbers right-aligned, floats to 4 significant digits."""
    table = Table(title=title)
    for col in frame.columns:
        table.add_column(str(col), justify="right" if pd.api.types.is_numeric_dtype(frame[col]) else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    return table


def print_sections(console: Console, sections: Sequence[Section], out_dir: Path) -> None:
    """The report on the terminal: each section's words and table, and where its figures are."""
    for s in sections:
        console.rule(s.title)
        if s.text:
            console.print(s.text)
        if s.table is not None and len(s.table):
            console.print(rich_table(s.table))
        for name in s.figures:
            console.print(f"figure: {out_dir / name}")
