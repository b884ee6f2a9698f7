#!/usr/bin/env bash
# The tree against the GPU machine's Python packages, on this machine, before a GPU session:
# the GPU image runs Python 3.12 with torch 2.11.0+cu130 and Triton 3.6.0 (device docs,
# KINDS.md), CI here torch 2.14.1 and Triton 3.8. A difference between them (a torch.library
# rule, a Triton API) would otherwise first show in the GPU session's few minutes.
#
# Builds the extension (CUDA sources too, sm_90a, with CUTLASS when the project venv has it) in a
# clean clone of HEAD against that torch and runs the test suite, which compiles the Triton
# kernels for sm_90 and sm_80 with that Triton (tests/test_triton_compile.py).
#
#   bash scripts/check_gpu_image_versions.sh        # first run: ~3 GB of wheels, then ~10 minutes
#
# Settings: PYTHON312 (a Python 3.12), VENV (/tmp/lora_ops_gpu_image_venv, kept between runs),
# TORCH_VERSION (2.11.0), TRITON_VERSION (3.6.0), WORK (a clone of HEAD, /tmp/lora_ops_gpu_image).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# The first Python 3.12 that runs (a pyenv shim is found on PATH but fails outside its versions).
if [[ -z "${PYTHON312:-}" ]]; then
  for candidate in $(command -v python3.12) /root/.pyenv/versions/3.12*/bin/python3.12; do
    if "$candidate" -c "" 2>/dev/null; then PYTHON312=$candidate; break; fi
  done
fi
PYTHON312=${PYTHON312:-}
VENV=${VENV:-/tmp/lora_ops_gpu_image_venv}
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
TRITON_VERSION=${TRITON_VERSION:-3.6.0}
WORK=${WORK:-/tmp/lora_ops_gpu_image}
[[ -x "$PYTHON312" ]] || { echo "no Python 3.12 found: set PYTHON312"; exit 2; }

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON312" -m venv "$VENV"
fi
# The test dependencies of requirements-dev.txt, at whatever versions resolve with that torch.
"$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" numpy ninja \
  pybind11 pytest pytest-benchmark safetensors tqdm peft transformers matplotlib setuptools
"$VENV/bin/python" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"

rm -rf "$WORK"
git clone -q "$ROOT" "$WORK"
cd "$WORK"
for dir in "$ROOT"/.venv/lib/python3*/site-packages/cutlass_library/source/include; do
  [[ -f "$dir/cutlass/cutlass.h" ]] && export LORA_OPS_CUTLASS_DIR=$dir
done
export PATH="/usr/local/cuda/bin:$VENV/bin:$PATH" MAX_JOBS=${MAX_JOBS:-2} TORCH_CUDA_ARCH_LIST=9.0a
python setup.py build_ext --inplace > build.log 2>&1 || { tail -40 build.log; exit 1; }
python -c "import lora_ops; print(lora_ops.build_info()); print(lora_ops.available_backends())"
status=0
# tests/test_triton_compile.py runs the Triton compile check with this Triton
python -m pytest tests benchmarks -q -p no:cacheprovider || status=1
echo "gpu image versions check: $([[ $status == 0 ]] && echo passed || echo failed)"
exit $status
