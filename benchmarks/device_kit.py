"""`make device-kit`: what the GPU check needs on a GPU machine that can download nothing.

The `device` tool's GPU machine (KINDS.md: nvidia-h200) has Python 3.12, torch 2.11 (CUDA 13),
torchvision, timm, numpy, pyarrow, pandas, pytest, rich, tensorboard, matplotlib, opencv and
scikit-learn, and no network; only the working tree travels, 64 MiB at most. This script runs
where pip reaches its registry and fills an ignored folder (default .device-kit/) with:

  wheels.tar.xz  every package the check imports that the device lacks (KIT below, with what those
                 need), for one Python (default cp312) on manylinux x86_64, minus the parts never
                 imported (STRIP), re-zipped uncompressed so that xz sees the raw bytes
  data/          real CIFAR-10 (../shared/data/cifar10-jpeg), the same Parquet layout, a balanced
                 subset: the first --per-class images of each class, train and test
  kit.json       versions, sizes and what was stripped

It prints the kit's size and fails above 56 MiB, which leaves room for the tree. The GPU check
installs it with `pip install --no-index --no-deps` (benchmarks/gpu_check.py --kit).

    python benchmarks/device_kit.py [--python 3.12] [--out .device-kit] [--per-class 500]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MIB = 56

# What the device lacks, pinned to the versions this project's .venv runs with torch 2.14, which
# also hold with the device's torch 2.11: ray[data,train,tune,default], grad-cam and duckdb, and
# every one of their needs that KINDS.md's package list does not name. The dashboard's packages
# are here because jobs.common starts the dashboard on purpose (Ray Train's PlacementGroupCleaner
# asks it whether a trial's controller lives).
KIT = {
    "ray": "2.60.0",
    "duckdb": "2.0.1",
    "grad-cam": "1.5.7",  # an sdist only: built into a pure-Python wheel here
    "ttach": "0.0.3",
    "tensorboardX": "2.6.5",
    "pydantic": "2.14.4",
    "pydantic-core": "2.50.5",
    "annotated-types": "0.8.0",
    "typing-inspection": "0.4.5",
    "jsonschema": "4.26.0",
    "jsonschema-specifications": "2025.9.1",
    "referencing": "0.37.0",
    "rpds-py": "2026.9.1",
    "aiohttp-cors": "0.8.1",
    "colorful": "0.5.8",
    "opencensus": "0.11.4",
    "opencensus-context": "0.1.3",
    "google-api-core": "2.44.0",
    "google-auth": "2.63.0",
    "googleapis-common-protos": "1.76.0",
    "proto-plus": "1.29.0",
    "pyasn1": "0.6.5",
    "pyasn1-modules": "0.4.2",
    "opentelemetry-api": "1.45.2",
    "opentelemetry-sdk": "1.45.2",
    "opentelemetry-semantic-conventions": "0.66b2",
    "opentelemetry-exporter-prometheus": "0.66b2",
    "opentelemetry-proto": "1.45.2",
    "smart-open": "9.0.2",
    "virtualenv": "21.15.11",
    "distlib": "0.4.4",
    "platformdirs": "4.14.8",
    "python-discovery": "1.9.6",
}
# Left out on purpose: py-spy (an executable the dashboard runs only when asked for a profile) and
# cryptography with cffi (google-auth imports it only for credentials that sign; Ray only for TLS).

# Paths inside a wheel that nothing here imports: Ray's Java jars, RLlib, Serve, the LLM and
# workflow libraries and the dashboard's web app (its scripts and profiler viewer: the dashboard
# must find build/ and build/static/ to start, so index.html and a placeholder stay; its API
# works without them); virtualenv's seed wheels (only for making virtualenvs).
STRIP = {
    "ray": (
        "ray/jars/",
        "ray/rllib/",
        "ray/serve/",
        "ray/llm/",
        "ray/workflow/",
        "ray/dashboard/client/build/static/",
        "ray/dashboard/client/build/speedscope-",
    ),
    "virtualenv": ("virtualenv/seed/wheels/embed/",),
}
# Ray's three big binaries (about 120 MB) carry their full symbol tables; `strip --strip-unneeded`
# keeps what loading and linking need (the dynamic symbols) and drops a third of their size. Only
# a crash's stack trace in Ray's logs loses its function names.
STRIP_SYMBOLS = ("ray/_raylet.so", "ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args], check=True)


def download(python: str, into: Path) -> list[Path]:
    """The pinned wheels for CPython ``python`` (e.g. "3.12"), and grad-cam built from its sdist."""
    binary = [f"{name}=={version}" for name, version in KIT.items() if name != "grad-cam"]
    tags = ["--python-version", python, "--implementation", "cp", "--abi", "cp" + python.replace(".", "")]
    tags += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    _pip("download", "--no-deps", "--only-binary=:all:", *tags, "-d", str(into), *binary)
    _pip("wheel", "--no-deps", "-w", str(into), f"grad-cam=={KIT['grad-cam']}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != len(KIT):
        raise SystemExit(f"device-kit: expected {len(KIT)} wheels, pip gave {len(wheels)}: {[w.name for w in wheels]}")
    return wheels


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _strip_symbols(binary: bytes) -> bytes:
    with tempfile.NamedTemporaryFile() as f:
        f.write(binary)
        f.flush()
        subprocess.run(["strip", "--strip-unneeded", f.name], check=True)
        return Path(f.name).read_bytes()


def strip_wheel(wheel: Path, into: Path) -> dict:
    """The wheel without its STRIP paths, stored uncompressed, with a RECORD that matches."""
    project = wheel.name.split("-")[0].lower().replace("_", "-")
    drop = STRIP.get(project, ())
    out = into / wheel.name
    removed = 0
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for info in src.infolist():
            if info.filename == record_name:
                continue
            if info.filename.startswith(drop):
                removed += info.file_size
                continue
            data = src.read(info)
            if info.filename in STRIP_SYMBOLS:
                before = len(data)
                data = _strip_symbols(data)
                removed += before - len(data)
            info.compress_type = zipfile.ZIP_STORED
            dst.writestr(info, data)
            lines.append(_record_line(info.filename, data))
        for folder in {prefix for prefix in drop if prefix.endswith("/static/")}:
            placeholder = f"{folder}STRIPPED"  # the folder must exist: the dashboard serves it
            dst.writestr(placeholder, b"stripped by benchmarks/device_kit.py\n")
            lines.append(_record_line(placeholder, b"stripped by benchmarks/device_kit.py\n"))
        dst.writestr(record_name, "\n".join([*lines, f"{record_name},,"]) + "\n")
    return {"wheel": wheel.name, "stripped_bytes": removed}


def pack_wheels(stripped: Path, archive: Path) -> None:
    """A tar of the uncompressed wheels through xz, on every core (a third smaller than the wheels'
    own deflate); any xz reader unpacks it, Python's tarfile on the device included."""
    names = sorted(w.name for w in stripped.glob("*.whl"))
    with open(archive, "wb") as out:
        tar = subprocess.Popen(["tar", "-cf", "-", "-C", str(stripped), *names], stdout=subprocess.PIPE)
        subprocess.run(["xz", "-6", "-T0", "-c"], stdin=tar.stdout, stdout=out, check=True)
        tar.stdout.close()
        if tar.wait():
            raise SystemExit("device-kit: tar failed")


def subset_cifar10(source: Path, into: Path, per_class: int) -> dict:
    """The first ``per_class`` images of each class of each split: real images, balanced."""
    into.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "test"):
        table = pq.read_table(source / f"{split}.parquet")
        keep = []
        for label in pc.unique(table["label"]).to_pylist():
            rows = pc.indices_nonzero(pc.equal(table["label"], label))
            keep.extend(rows.to_pylist()[:per_class])
        subset = table.take(sorted(keep))
        pq.write_table(subset, into / f"{split}.parquet", compression="none")  # JPEG bytes: nothing to gain
        counts[split] = subset.num_rows
    shutil.copy(source / "classes.json", into / "classes.json")
    return counts


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def build(python: str, out: Path, data: Path, per_class: int) -> dict:
    if not (data / "train.parquet").is_file():
        raise SystemExit(f"device-kit: --data {data}: expected CIFAR-10 Parquet (train.parquet, test.parquet, classes.json)")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        downloaded, stripped = Path(tmp, "downloaded"), Path(tmp, "stripped")
        stripped.mkdir()
        wheels = [strip_wheel(w, stripped) for w in download(python, downloaded)]
        pack_wheels(stripped, out / "wheels.tar.xz")
    images = subset_cifar10(data, out / "data" / "cifar10-jpeg", per_class)
    manifest = {
        "python": python,
        "packages": KIT,
        "stripped": {w["wheel"]: w["stripped_bytes"] for w in wheels if w["stripped_bytes"]},
        "images": images,
        "wheels_xz_bytes": (out / "wheels.tar.xz").stat().st_size,
        "data_bytes": folder_bytes(out / "data"),
    }
    (out / "kit.json").write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["total_bytes"] = folder_bytes(out)
    return manifest


def install(kit: Path, site: Path) -> None:
    """The one-line offline install the GPU check starts with: the kit's wheels into ``site``."""
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(kit / "wheels.tar.xz") as tar:
            tar.extractall(tmp, filter="data")
        wheels = sorted(str(w) for w in Path(tmp).glob("*.whl"))
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--disable-pip-version-check"]
        subprocess.run([*command, "--target", str(site), *wheels], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default="3.12", help="the CPython the kit is for (the device's: 3.12)")
    p.add_argument("--out", type=Path, default=ROOT / ".device-kit")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-jpeg", help="CIFAR-10 Parquet folder")
    p.add_argument("--per-class", type=int, default=500, help="images per class and split (default 500: 5,000 train, 5,000 test)")
    args = p.parse_args()
    manifest = build(args.python, args.out, args.data, args.per_class)
    mib = manifest["total_bytes"] / 2**20
    print(
        f"device kit for CPython {args.python} in {args.out}: {mib:.1f} MiB "
        f"(wheels {manifest['wheels_xz_bytes'] / 2**20:.1f} MiB xz, data {manifest['data_bytes'] / 2**20:.1f} MiB: "
        f"{manifest['images']['train']} train + {manifest['images']['test']} test images); limit {LIMIT_MIB} MiB"
    )
    if mib > LIMIT_MIB:
        raise SystemExit(f"device-kit: {mib:.1f} MiB is over the {LIMIT_MIB} MiB limit (the device tool carries 64 MiB with the tree)")


if __name__ == "__main__":
    main()
