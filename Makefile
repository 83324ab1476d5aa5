# Two commands on a fresh machine: `make demo` (the whole pipeline, offline) and `make test`.
# Each creates .venv and installs everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU-only machines here carry these wheels on disk; elsewhere pip fetches them.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# Faithfulness on 64 sampled images instead of 128: it is most of the CAM stage's time on 2 CPU
# cores. tests/conftest.py's demo run passes the same options.
DEMO_CAM := --faithfulness-images 64

.PHONY: demo test lint bench gpu-check device-kit device-rehearsal full-check clean

# Byte-compiled once here, on all cores: pip would compile the 19,000 modules one by one (--no-compile
# skips that), and Python compiles on import only where it may write. This machine's environment sets
# PYTHONDONTWRITEBYTECODE=1, so without this step every process (each Ray worker, each job the tests
# start) recompiled torch, Ray and timm from source: 37 s instead of 9 s to import them, and the suite
# ran 2.2 times longer (README, "The suite's time"). The packages' own test suites are skipped (the
# pattern is matched against whole paths: anchored in site-packages), and a file that does not compile
# on this Python is skipped, as pip skips it.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --no-compile $(TORCH_SPEC)
	$(VENV)/bin/pip install -q --no-compile -e '.[dev]'
	$(PY) -m compileall -qq -j 0 -x 'site-packages/(.+/)?tests?/|torch/testing/_internal/' $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || true
	touch $@

demo: $(VENV)/.installed
	$(PY) -m jobs.pipeline --config configs/demo.yaml --out results/demo $(DEMO_CAM)

# Serial by default. TEST_WORKERS=2: two pytest-xdist workers, each expensive fixture on one
# (tests/conftest.py); not faster on 2 cores, where two Ray clusters oversubscribe (README).
TEST_WORKERS ?= 0
test: $(VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder $(PYTEST_ARGS)

# The formatter's and the linter's verdicts (configured in pyproject.toml); CI runs this first.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PY) benchmarks/train_throughput.py

# On a GPU machine with this .venv: both parts of the GPU check (the GPU tests, then the measured
# tables results/gpu-check/{tests,measure}.md). Without CUDA it runs the small CPU mode.
gpu-check: $(VENV)/.installed
	$(PY) benchmarks/gpu_check.py --part all --out results/gpu-check

# For the device tool's offline GPU machine: .device-kit/ (the packages it lacks, for cp312, and a
# CIFAR-10 subset), at most 56 MiB. The README's "GPU check" gives the two commands to run there.
device-kit: $(VENV)/.installed
	$(PY) benchmarks/device_kit.py --out .device-kit

# Both parts of the GPU check with --cpu in a fresh environment holding only the device's
# packages and a kit built for this Python, offline. `make full-check` runs it (tests/test_device_kit.py).
device-rehearsal: $(VENV)/.installed
	$(PY) benchmarks/device_rehearsal.py

# Outside CI: the pipeline at full size (paper.yaml's 7 families on real CIFAR-10, 1 epoch on a
# subsample; the CAM stage on all 10,000 test images), with checks; within 45 minutes on 2 cores.
# Then what CI leaves out for time (pytest -m full): the tests that read the demo at its full size
# (a trained model's maps; the demo alone is about 9 minutes here) and the whole device rehearsal.
full-check: $(VENV)/.installed
	$(PY) benchmarks/full_check.py --out results/full-check
	CIFARCAM_REQUIRE_SLURM=1 $(PY) -m pytest -m full  # the SLURM requeue must run, not be skipped (root and apt-get)

clean:
	rm -rf $(VENV) .pytest_cache .device-kit .device-rehearsal
