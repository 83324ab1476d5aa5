"""Any DuckDB SQL over a run's tables (views: trials, epochs, accuracy, predictions, cams).
The SQL reads the run and nothing else: it cannot write files, read others, or load extensions.

python -m jobs.query results/demo "select model, test_top1 from accuracy"
python -m jobs.query results/demo "select * from cams where layer = 'layer2'" --parquet out.parquet
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cifarcam.errors import UserError
from jobs.common import console, run, run_folder


def _rows(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of rows >= 0, got {text}")
    return int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.query", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=run_folder, help="run folder")
    p.add_argument("sql", help="DuckDB SQL")
    p.add_argument("--csv", type=Path, help="write the result as CSV instead of printing it")
    p.add_argument("--parquet", type=Path, help="write the result as Parquet instead of printing it")
    p.add_argument("--limit", type=_rows, default=50, help="rows to print (default: 50)")
    return p


def main() -> int:
    from cifarcam.report import connect, rich_table, run_sql

    args = parser().parse_args()
    frame = run_sql(connect(args.run), args.sql)
    for option, path, write in (("--csv", args.csv, frame.to_csv), ("--parquet", args.parquet, frame.to_parquet)):
        if path:
            try:
                write(path, index=False)
            except OSError as err:  # a missing folder or no permission: the user's to fix
                raise UserError(f"{option} {path}: cannot write it ({err.strerror or err})") from None
    if not (args.csv or args.parquet):
        console.print(rich_table(frame.head(args.limit), title=f"{len(frame)} rows"))
    return 0


if __name__ == "__main__":
    run(main)
