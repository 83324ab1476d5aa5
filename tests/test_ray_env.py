"""The Ray environment is defined once (cifarcam/ray_env.py): what the shell head script sets, and
that no other file spells one of its variables again (the YAML manifests are checked against it
in test_kuberay_manifest.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from cifarcam.ray_env import JOB_ENV, NODE_ENV
from helpers import ROOT

# Where a variable of the definition may appear: the definition, the manifests checked against it,
# and the words about them (kuberay-rayjob-cam.yaml is checked equal to kuberay-rayjob.yaml).
ALLOWED = {
    "cifarcam/ray_env.py",
    "cluster/runtime_env.yaml",
    "cluster/kuberay-rayjob.yaml",
    "cluster/kuberay-rayjob-cam.yaml",
    "README.md",
    "tests/test_ray_env.py",
}


def test_the_head_script_takes_the_definition_and_keeps_a_users_value():
    head_up = (ROOT / "cluster" / "ray-head-up.sh").read_text()
    assert 'ray_env="$("$venv/bin/python" -m cifarcam.ray_env)"' in head_up and 'eval "$ray_env"' in head_up  # set -e sees a failure
    script = f'eval "$({sys.executable} -m cifarcam.ray_env)"; env'
    clean = {k: v for k, v in os.environ.items() if k not in NODE_ENV}
    seen = dict(
        line.split("=", 1)
        for line in subprocess.run(["bash", "-c", script], env=clean, capture_output=True, text=True, check=True).stdout.splitlines()
        if "=" in line
    )
    assert {name: seen.get(name) for name in NODE_ENV} == NODE_ENV
    own = subprocess.run(["bash", "-c", script], env={**clean, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, check=True).stdout
    assert "RAY_AUTH_MODE=disabled" in own.splitlines()


def test_no_other_file_spells_the_ray_environment_again():
    """RAY_AUTH_MODE aside (clients set it too), each of these is a default that lives in one place."""
    names = [name for name in {**JOB_ENV, **NODE_ENV} if name != "RAY_AUTH_MODE"]
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    spelled = sorted(
        f"{path}: {name}"
        for path in files
        if path and path not in ALLOWED and (ROOT / path).is_file()
        for name in names
        if name in (ROOT / path).read_text(errors="replace")
    )
    assert spelled == []
