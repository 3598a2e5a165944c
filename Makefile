# Fresh machine -> working medlvr in ./.venv. Every target is idempotent: the install step
# reruns only when pyproject.toml, setup.py or csrc/ changed (stamp files in .make-stamps/).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMPS := .make-stamps
# A CUDA 13.0 build of torch (CPU execution works; the CUDA kernels compile against it).
# Override for another machine, e.g. `make test TORCH_PIN="torch==2.13.0 torchvision"`.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
# setup.py finds the CUDA toolkit itself (nvcc and libcudart together), or builds the C++ kernels alone.
export MAX_JOBS ?= 2

.PHONY: install demo demo-quick test test-fast bench gpu-check clean

$(STAMPS)/venv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/install: $(STAMPS)/venv pyproject.toml setup.py $(wildcard csrc/*)
	$(BIN)/pip install $(TORCH_PIN)
	$(BIN)/pip install -e ".[test,triton]" --no-build-isolation
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
	rm -rf $(STAMPS) build *.egg-info medlvr/_C*.so
