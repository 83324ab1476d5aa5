"""The whole pipeline on one config: search (then, as they land, the CAM and report stages).

    python -m jobs.pipeline --config configs/demo.yaml [--out DIR] [--resume] [--address ADDR]
"""

from __future__ import annotations

import argparse

from jobs import search
from jobs.common import run


def parser() -> argparse.ArgumentParser:
    p = search.parser()
    p.prog, p.description = "python -m jobs.pipeline", __doc__
    return p


def main() -> int:
    args = parser().parse_args()
    search.search(args)
    return 0


if __name__ == "__main__":
    run(main)
