"""The search's result on the terminal: trials by status, and the best trial per model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from cifarcam.search.runner import SearchSummary


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
