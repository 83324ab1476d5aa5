"""DuckDB over a run's Parquet: the tables as views, and one-line errors for bad runs and SQL."""

from __future__ import annotations

from pathlib import Path

import duckdb

from cifarcam.errors import UserError
from cifarcam.run_layout import SEARCH_TABLES, RunLayout


def connect(run_dir: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with views trials, epochs, accuracy, predictions, and cams and sanity
    where the CAM stage wrote them; it may read the run's files only."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    layout = RunLayout(run_dir)
    missing = [layout.table(name).name for name in SEARCH_TABLES if not layout.table(name).is_file()]
    if missing:
        raise UserError(f"{run_dir}: not a finished run (missing {', '.join(missing)}); run jobs.search first")
    con = duckdb.connect()
    for name in SEARCH_TABLES:
        con.execute(f"create view {name} as select * from read_parquet({_literal(layout.table(name))})")
    if any(layout.sanity.glob("model=*/method=*.parquet")):
        con.execute(f"create view sanity as select * from read_parquet({_literal(layout.sanity)} || '/model=*/method=*.parquet', hive_partitioning = false)")
    if any(layout.cams.glob("model=*/layer=*/method=*/*.parquet")):
        con.execute(f"create view cams as select * from read_parquet({_literal(layout.cams)} || '/**/*.parquet', hive_partitioning = true)")
    # From here on the connection reads this run and nothing else: no file written (COPY ... TO),
    # no other file read, no extension installed or loaded, and no setting changed back.
    # The run as given and as its symlinks resolve (cams/ or a table may live on scratch).
    tables = [layout.table(name).resolve().parent for name in SEARCH_TABLES]
    places = {run_dir.absolute(), run_dir.resolve(), layout.cams.resolve(), layout.sanity.resolve(), *tables}
    con.execute("set allowed_directories = ?", [sorted(map(str, places))])
    con.execute("set enable_external_access = false")
    con.execute("set lock_configuration = true")
    return con


def _literal(path: Path) -> str:
    """``path`` as a SQL string literal (a view cannot take a parameter): a quote in a folder's
    name must not end the string."""
    return "'" + str(path.absolute()).replace("'", "''") + "'"


def has_view(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(con.execute("select count(*) from duckdb_views() where view_name = ?", [name]).fetchall()[0][0])


def run_sql(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None):
    """A DataFrame of ``sql``'s result (``?`` placeholders bound to ``params``); DuckDB's errors
    become one-line ValueErrors."""
    try:
        return con.execute(sql, params or []).df()
    except duckdb.Error as err:
        first = " ".join(str(err).split())
        raise UserError(f"SQL: {first}") from None
