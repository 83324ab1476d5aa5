"""The report and any query on the terminal (rich tables)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from cifarcam.report.run_folder import Section


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
