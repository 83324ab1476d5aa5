"""`make device-rehearsal`: prove the device kit here, as the GPU machine will use it.

The device tool's GPU machine (KINDS.md) has its own preinstalled packages, the kit, and no
network. This builds a kit for this Python with the same script (benchmarks/device_kit.py; torch
for the device's Python 3.12 is not on this machine), makes a fresh virtual environment that holds
only the packages the device has preinstalled (DEVICE_PACKAGES, hard-linked from this project's
.venv where it has them) and runs both parts of the GPU check there with --cpu and --kit: the
check installs the kit with `pip --no-index`, with every proxy pointed at a closed port, so that
nothing is downloaded. Exit status 1 when the kit is over its limit or either part fails.

    python benchmarks/device_rehearsal.py [--work .device-rehearsal] [--kit KIT]

--kit: an existing kit (default: build one). `make full-check` runs it (tests/test_device_kit.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from device_kit import LIMIT_MIB, folder_bytes  # noqa: E402

# What KINDS.md lists as preinstalled on nvidia-h200 (read 2026-11-17). Those this project's
# .venv lacks (jax, say) are simply absent here: a rehearsal can then fail where the device would
# not, never the other way round.
DEVICE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _cuda_build_extras() -> set[str]:
    """torch's own CUDA wheels here (nvidia-*-cu12, say) stand for the device's CUDA 13 ones."""
    torch = metadata.distribution("torch")
    return {_normal(r.split(";")[0].split("=")[0].split(">")[0].split("<")[0].strip()) for r in torch.requires or [] if "extra ==" not in r}


def link_preinstalled(site: Path) -> list[str]:
    """Link, file by file, each device package that this Python has into ``site`` (hard links:
    no copy of torch's gigabytes, and each file's path stays inside ``site``)."""
    wanted = {_normal(n) for n in DEVICE_PACKAGES} | {n for n in _cuda_build_extras() if n.startswith(("nvidia-", "triton", "cuda-"))}
    linked = []
    for dist in metadata.distributions():
        name = _normal(dist.metadata["Name"])
        if name not in wanted or name in linked:
            continue
        for file in dist.files or []:
            source = Path(dist.locate_file(file)).resolve()
            if ".." in file.parts or not source.is_file():
                continue  # console scripts (../../bin), files a RECORD lists but pip removed
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                try:
                    os.link(source, target)
                except OSError:  # another filesystem than .venv's: a symbolic link does as well
                    target.symlink_to(source)
        linked.append(name)
    return sorted(linked)


def make_environment(work: Path) -> Path:
    """A fresh venv (with pip: the check installs the kit with it) and the device's packages."""
    env = work / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(env)], check=True)
    site = next((env / "lib").glob("python3*/site-packages"))
    preinstalled = work / "preinstalled"
    linked = link_preinstalled(preinstalled)
    (site / "device-preinstalled.pth").write_text(str(preinstalled) + "\n")
    print(f"rehearsal environment {env}: {len(linked)} of the device's packages from this machine")
    return env / "bin" / "python"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / ".device-rehearsal", help="scratch folder (replaced)")
    p.add_argument("--kit", type=Path, help="an existing kit for this Python (default: build one in --work)")
    args = p.parse_args()
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    kit = args.kit
    if kit is None:
        kit = args.work / "kit"
        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        subprocess.run([sys.executable, "benchmarks/device_kit.py", "--python", python, "--out", str(kit)], cwd=ROOT, check=True)
    kit_mib = folder_bytes(kit) / 2**20
    python = make_environment(args.work)
    closed = "http://127.0.0.1:9"  # the discard port: any download attempt fails at once
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL")}
    env |= {"http_proxy": closed, "https_proxy": closed, "HTTP_PROXY": closed, "HTTPS_PROXY": closed, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}
    results = {}
    for part in ("tests", "measure"):
        began = time.monotonic()
        command = [str(python), "benchmarks/gpu_check.py", "--part", part, "--cpu", "--kit", str(kit), "--out", str(args.work / "out")]
        results[part] = (subprocess.run(command, cwd=ROOT, env=env).returncode, time.monotonic() - began)
    print(f"rehearsal: kit {kit_mib:.1f} MiB (limit {LIMIT_MIB})")
    for part, (code, seconds) in results.items():
        print(f"rehearsal: part {part} {'passed' if code == 0 else f'FAILED (exit status {code})'} in {seconds:.0f} s on the CPU")
    if kit_mib > LIMIT_MIB or any(code for code, _ in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
