"""The KubeRay RayJob manifest parses and runs the same entrypoint as the other launch paths.
(No Kubernetes here: this checks structure, not a deployment.)"""

import shlex

import yaml

import cifarcam
from cifarcam.ray_env import JOB_ENV, NODE_ENV
from helpers import ROOT


def _pods(spec: dict) -> list[dict]:
    cluster = spec["rayClusterSpec"]
    return [spec["submitterPodTemplate"], cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def test_rayjob_manifest_fields():
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pipeline"] and "--config" in argv and "--out" in argv
    assert (ROOT / argv[argv.index("--config") + 1]).is_file()
    # a resubmitted RayJob continues the search it started (jobs.pipeline's own parser reads it)
    from jobs import pipeline

    assert pipeline.parser().parse_args(argv[3:]).resume_if_started
    images = {c["image"] for pod in _pods(spec) for c in pod["spec"]["containers"]}
    assert images == {f"cifarcam:{cifarcam.__version__}"}  # one pinned image, never :latest
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    local = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    assert env["env_vars"] == local["env_vars"] == JOB_ENV  # cifarcam/ray_env.py, defined once
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.")
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["name"] == "ray-head"
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_every_ray_container_and_the_submitter_authenticate_with_the_secrets_token():
    """The dashboard listens on the pod network: without a token anything there could run code."""
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    spec = doc["spec"]
    pods = _pods(spec)
    secrets = set()
    for pod in pods:
        for container in pod["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
            assert {name: env[name]["value"] for name in NODE_ENV} == NODE_ENV, container["name"]  # every Ray node's environment
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            secrets.add((ref["name"], ref["key"]))
    assert len(secrets) == 1  # one Secret for all, so the submitter's token is the cluster's
    name, key = secrets.pop()
    text = (ROOT / "cluster" / "kuberay-rayjob.yaml").read_text()
    # the token from a file (here a process substitution), never on kubectl's command line
    assert f"kubectl create secret generic {name} --from-file={key}=<(" in text and "--from-literal" not in text
    assert "s3://" not in spec["entrypoint"] and "--out s3://" not in text


def test_the_cam_rayjob_re_explains_a_finished_run_on_the_same_cluster():
    """The second RayJob runs jobs.cam on the first one's run folder; everything but its name and
    entrypoint is the first one's, so the two cannot drift apart (image, token, PVC, Ray env)."""
    search, explain = (yaml.safe_load((ROOT / "cluster" / name).read_text()) for name in ("kuberay-rayjob.yaml", "kuberay-rayjob-cam.yaml"))
    argv = shlex.split(explain["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.cam"]
    from jobs import cam

    args = cam.parser().parse_args(argv[3:])
    cam.settings_from(args)  # the options are valid CAM settings
    out = shlex.split(search["spec"]["entrypoint"])
    assert str(args.run) == out[out.index("--out") + 1]  # the run the first RayJob writes
    assert explain["metadata"]["name"] != search["metadata"]["name"]
    for doc in (search, explain):
        doc["metadata"].pop("name")
        doc["spec"].pop("entrypoint")
    assert explain == search
