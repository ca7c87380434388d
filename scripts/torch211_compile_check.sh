#!/usr/bin/env bash
# The compile tests on a CPU machine under the torch and transformers of the GPU image (torch 2.11,
# transformers 5.17), which the CPU suite (torch 2.13) does not run: dynamo's rules differ between
# the two (2.11 passes only tensors and constants to assume_constant_result functions, for one),
# and a compiled model that works under one may fail under the other.
#
#   bash scripts/torch211_compile_check.sh        # first run: a venv in .venv-torch211 (~4 GB)
#
# PyPI's torch 2.11 is the CUDA build: it brings NVIDIA's libraries, unused here. Triton is the
# CPU suite's 3.9, installed over the 3.6 that torch 2.11 pins: these tests run the kernels under
# Triton's interpreter, and 3.6's fails on the key-range kernel with numpy 2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-torch211}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.11.0 transformers==5.17.0 peft accelerate hypothesis \
        pytest pytest-xdist setuptools wheel
    "$VENV/bin/pip" install -q --no-deps triton==3.9.0
    "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
fi
"$VENV/bin/python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
TRITON_INTERPRET=1 PYTHONSAFEPATH=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider -n 2 \
    tests/test_kernel.py tests/test_patch_models.py tests/test_patch_packed.py tests/test_patch_api.py \
    -k "compile or fullgraph or fallback or compiled" "$@"
