"""The report of a run: the paper's Table 2 and Grad-CAM figures, and what the paper could not show.

    python -m jobs.report --run results/demo

Prints rich tables and writes DIR/report/report.md with its PNG figures, and DIR/report/report.html
(the same, self-contained, plus a filterable heatmap gallery; open it from disk in a browser).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.common import console, run, run_folder


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=run_folder, required=True, help="run folder")
    return p


def report(run_dir: Path) -> Path:
    from cifarcam.report import write_report

    path = write_report(run_dir, console)
    console.print(f"report: {path}")
    console.print(f"report: {path.with_name('report.html')}")
    return path


def main() -> int:
    report(parser().parse_args().run)
    return 0


if __name__ == "__main__":
    run(main)
