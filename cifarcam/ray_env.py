"""The Ray environment cifarcam's processes run with, defined once.

``JOB_ENV`` reaches every Ray process of a job: the job's own (``jobs.common`` sets what the user
has not set), the workers of a job sent with ``ray job submit`` (``cluster/runtime_env.yaml``) and
of a KubeRay RayJob (``cluster/kuberay-rayjob.yaml``). ``NODE_ENV`` adds what ``ray start`` itself
reads, for the nodes cifarcam starts (``cluster/ray-head-up.sh``, ``cluster/ray_bootstrap.py``).

The YAML files cannot import this module: ``tests/test_ray_env.py`` fails when they drift from
it, or when any other file spells one of these variables again. ``python -m cifarcam.ray_env``
prints ``NODE_ENV`` as shell exports that keep a value the user set; ``ray-head-up.sh`` evaluates
them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

JOB_ENV: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",  # clusters here are offline and their data private: no usage reports
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # the CAM stage prints its own progress line
}

NODE_ENV: dict[str, str] = {
    **JOB_ENV,
    "RAY_AUTH_MODE": "token",  # set, not left to the installed Ray's default: the job API runs code
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # a node that is stopped (an attempt's end) stops now
}


def set_defaults(values: Mapping[str, str], environ: MutableMapping[str, str] = os.environ) -> None:
    """Each of ``values`` where ``environ`` has no value of its own."""
    for name, value in values.items():
        environ.setdefault(name, value)


def shell_exports(values: Mapping[str, str]) -> str:
    """``export NAME="${NAME:-value}"`` lines: the user's own value wins."""
    return "".join(f'export {name}="${{{name}:-{value}}}"\n' for name, value in values.items())


if __name__ == "__main__":
    print(shell_exports(NODE_ENV), end="")
