# The README's two commands: `make demo` (the main job) and `make test`. Both create the virtual
# environment and build the extension first when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lora_ops-installed
# The pinned versions (see requirements-lock.txt); `make install CONSTRAINTS=` installs unpinned.
CONSTRAINTS ?= requirements-lock.txt
PIP_INSTALL := $(BIN)/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# Index downloads get three tries: one interrupted download once failed a whole CI run. pip keeps
# what it finished in its cache, so a retry fetches only what is missing.
retry = for try in 1 2 3; do $(1) && break; test $$try = 3 && exit 1; echo "retrying: $(1)"; sleep 15; done
# CUTLASS's headers (the Hopper adapter-in-GEMM kernel, csrc/cuda/adapter_gemm_sm90*); only
# the headers are used, so none of the package's Python dependencies.
CUTLASS := nvidia-cutlass==4.2.0.0
SOURCES := setup.py pyproject.toml requirements-dev.txt $(CONSTRAINTS) $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/* csrc/include/lora_ops/*.h)

.PHONY: demo test test-cpp test-sanitize lint bench install

demo: $(STAMP)
	$(BIN)/lora-ops demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(call retry,$(PIP_INSTALL) --upgrade pip)
	$(call retry,$(PIP_INSTALL) -r requirements-dev.txt)
	$(call retry,$(PIP_INSTALL) --no-deps $(CUTLASS))
	MAX_JOBS=2 $(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# The standalone CMake library (CPU, and CUDA when nvcc is found) and its C/C++ tests.
test-cpp: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH cmake -S . -B build-cmake -DCMAKE_BUILD_TYPE=Release \
	  -DLORA_OPS_CUBLAS_ROOT=$$($(BIN)/python -c "import glob,os,torch;print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)),'nvidia','cu13'))")
	PATH=$(abspath $(BIN)):$$PATH cmake --build build-cmake -j2
	PATH=$(abspath $(BIN)):$$PATH ctest --test-dir build-cmake --output-on-failure

# The CPU kernels and the C ABI's tests again under AddressSanitizer and UBSan (out-of-bounds
# reads of ragged tiles, misaligned vector loads, out-of-range enums from C callers), no CUDA.
SANITIZE := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
test-sanitize:
	cmake -S . -B build-sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLORA_OPS_WITH_CUDA=OFF \
	  -DCMAKE_CXX_FLAGS="$(SANITIZE)" -DCMAKE_C_FLAGS="$(SANITIZE)" \
	  -DCMAKE_EXE_LINKER_FLAGS="$(SANITIZE)" -DCMAKE_SHARED_LINKER_FLAGS="$(SANITIZE)"
	cmake --build build-sanitize -j2
	ctest --test-dir build-sanitize --output-on-failure

# Unused names, undefined names, shadowed imports: pyflakes over every Python file of the project.
lint: $(STAMP)
	$(BIN)/python -m pyflakes setup.py lora_ops tests benchmarks scripts

# Sleeping OpenMP waiters, the benchmarks' method on CPU (benchmarks/conftest.py says why); read
# when the OpenMP runtime loads, so set before Python starts. A caller's own setting wins.
bench: $(STAMP)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/lora-ops bench
