"""The whole pipeline on one config: search, Grad-CAM over the test set, then the report.

python -m jobs.pipeline --config configs/demo.yaml [--out DIR] [--resume] [--address ADDR]
"""

from __future__ import annotations

import argparse

from jobs import cam, report, search
from jobs.common import run


def parser() -> argparse.ArgumentParser:
    p = search.parser()
    p.prog, p.description = "python -m jobs.pipeline", __doc__
    cam.add_cam_options(p)
    return p


def main() -> int:
    args = parser().parse_args()
    if args.dry_run:  # the search is what a dry run can plan; the CAM stage follows it
        search.dry_run(args)
        return 0
    from cifarcam.cam import check_layers
    from cifarcam.training import load_experiment

    settings = cam.settings_from(args)  # checked before the search spends any cluster time
    check_layers(load_experiment(args.config), settings)
    if not args.address:  # a local Ray's size is known now: CAM actors that cannot fit fail before the search
        from cifarcam.cam import actor_layout

        actor_layout(search.cluster_resources(args), settings)
    summary = search.search(args)
    args.run, args.checkpoint = summary.out_dir, None
    cam.cam(args, settings)
    report.report(summary.out_dir)
    return 0


if __name__ == "__main__":
    run(main)
