"""The KubeRay RayJob manifest parses and runs the same entrypoint as the other launch paths.
(No Kubernetes here: this checks structure, not a deployment.)"""

import shlex

import yaml

from helpers import ROOT


def test_rayjob_manifest_fields():
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pipeline"] and "--config" in argv and "--out" in argv
    assert (ROOT / argv[argv.index("--config") + 1]).is_file()
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    local = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    assert env["env_vars"] == local["env_vars"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.")
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["name"] == "ray-head"
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
