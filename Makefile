# Fresh machine -> working medlvr in ./.venv. Every target is idempotent: the install step
# reruns only when pyproject.toml, setup.py or csrc/ changed (stamp files in .make-stamps/).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMPS := .make-stamps
# A CUDA 13.0 build of torch (CPU execution works; the CUDA kernels compile against it).
# Override for another machine, e.g. `make test LOCK= TORCH_PIN="torch==2.13.0 torchvision"`.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
# Every install takes the exact versions README's numbers and test counts were measured with
# (`make lock` rewrites the file from .venv). `LOCK=` installs from pyproject.toml's ranges.
LOCK ?= requirements-lock.txt
PIP_LOCK := $(if $(LOCK),-c $(LOCK))
EXTRAS := test,triton,trl
# Read by tests/test_packaging.py: an unlocked install is not held to the lock.
export MEDLVR_UNLOCKED := $(if $(LOCK),,1)
# setup.py finds the CUDA toolkit itself (nvcc and libcudart together), or builds the C++ kernels alone.
export MAX_JOBS ?= 2

.PHONY: install demo demo-quick test test-latest lock bench gpu-check clean

$(STAMPS)/venv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(PIP_LOCK) --upgrade pip setuptools wheel
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/install: $(STAMPS)/venv pyproject.toml setup.py $(wildcard csrc/*) $(LOCK)
	$(BIN)/pip install $(PIP_LOCK) $(TORCH_PIN)
	$(BIN)/pip install $(PIP_LOCK) -e ".[$(EXTRAS)]" --no-build-isolation
	@touch $@

install: $(STAMPS)/install

# The main job: versions and backends, then the end-to-end demo on the embedded model.
demo: install
	$(BIN)/medlvr info
	$(BIN)/medlvr demo

demo-quick: install
	$(BIN)/medlvr demo --quick

# The test suite (CI runs exactly this; see .ci/run).
# With a GPU, the first pass runs Triton natively on CUDA tensors; Triton on CPU tensors
# needs the interpreter from import on, so those cases (marker `interpreter`) get a second
# pass (tests/conftest.py says why). Without a GPU the first pass runs everything.
test: install
	$(BIN)/medlvr info
	$(BIN)/python -m pytest -q tests
	@if $(BIN)/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	  echo "== interpreter pass: Triton kernels on CPU tensors"; \
	  TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m interpreter tests; fi

# The same suite against the newest versions pyproject.toml allows, in a copy of the tree
# (.latest/, its own venv), so the next transformers release is seen the day it lands.
test-latest:
	rm -rf .latest && mkdir -p .latest/src
	git ls-files -co --exclude-standard | while read -r f; do [ -e "$$f" ] && echo "$$f"; done \
	  | tar -cf - -T - | tar -xf - -C .latest/src
	$(MAKE) -C .latest/src test LOCK= TORCH_PIN="torch torchvision"
	.latest/src/$(BIN)/pip freeze --exclude-editable > .latest/versions.txt
	@echo "== test-latest passed with the versions in .latest/versions.txt"

# Rewrite the lock from what .venv has (after a deliberate upgrade that passes make test).
lock:
	{ echo "# medlvr's tested versions: make test, make demo and README's numbers were measured with these"; \
	  echo "# (CPython $$($(BIN)/python -c 'import platform; print(platform.python_version(), platform.machine())'), $$(date -u +%F))."; \
	  echo "# Installed with pip -c (constraints) by the Makefile; regenerate with 'make lock'."; \
	  $(BIN)/pip freeze --all --exclude-editable | grep -v ' @ '; } > requirements-lock.txt

# On a machine with an NVIDIA GPU: the CUDA tests, the quick demo on CUDA (bf16 autocast),
# compute-sanitizer over the CUDA op tests when it is installed, and every benchmark on
# CUDA, each writing benchmarks/results/<op>-<gpu>.{csv,md,png}. Stops at the first failure.
gpu-check: install
	@$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device')"
	$(BIN)/medlvr info
	$(BIN)/python -m pytest -q -m cuda tests
	$(BIN)/medlvr demo --quick --out gpu_check_out/demo --no-progress
	@if command -v compute-sanitizer >/dev/null; then \
	  compute-sanitizer --tool memcheck --error-exitcode 1 $(BIN)/python -m pytest -q -m cuda tests/ops -x; \
	else echo "compute-sanitizer not found: memcheck skipped"; fi
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b --device cuda || exit 1; done

bench: install
	$(BIN)/python benchmarks/bench_logprobs.py

clean:
	rm -rf $(STAMPS) build *.egg-info medlvr/_C*.so .latest
