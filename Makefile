# The README's two commands: `make demo` (the main job) and `make test`. Both create the virtual
# environment and build the extension first when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lora_ops-installed
SOURCES := setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/* csrc/include/lora_ops/*.h)

.PHONY: demo test test-cpp bench install

demo: $(STAMP)
	$(BIN)/lora-ops demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	MAX_JOBS=2 $(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# The standalone CMake library (CPU, and CUDA when nvcc is found) and its C/C++ tests.
test-cpp: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH cmake -S . -B build-cmake -DCMAKE_BUILD_TYPE=Release \
	  -DLORA_OPS_CUBLAS_ROOT=$$($(BIN)/python -c "import glob,os,torch;print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)),'nvidia','cu13'))")
	PATH=$(abspath $(BIN)):$$PATH cmake --build build-cmake -j2
	PATH=$(abspath $(BIN)):$$PATH ctest --test-dir build-cmake --output-on-failure

bench: $(STAMP)
	$(BIN)/lora-ops bench
