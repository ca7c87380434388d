#!/usr/bin/env bash
# Set up a fresh machine (CPU or GPU) and run one job: `demo` or `test` (extra args go to the job).
#   bash scripts/run.sh demo
#   bash scripts/run.sh test [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
job=${1:-demo}
shift || true

# torch first: on a CPU machine plain `pip install torch` pulls a multi-GB CUDA build, so the CPU
# wheel is pinned. A GPU image brings its own CUDA torch, which is kept as it is.
if ! $PY -c "import torch" 2>/dev/null; then
    $PY -m pip install -q "torch==2.13.0"
fi
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    has_gpu=1
else
    has_gpu=0
fi

if [ "$has_gpu" = 1 ]; then
    # GPU machines may have no package index: install the project itself, offline, over the image.
    $PY -m pip install -q --no-deps --no-build-isolation -e .
else
    $PY -m pip install -q -e ".[test]"
    # Triton's interpreter runs the real kernels on the CPU; it must be chosen before import.
    export TRITON_INTERPRET=1
fi

# Python's -m puts the current folder first on sys.path; from the repository root its kernels/
# folder (installed as hf_flash.kernels) would then shadow the `kernels` package transformers
# imports. PYTHONSAFEPATH (Python >= 3.11) leaves the current folder off.
export PYTHONSAFEPATH=1

case "$job" in
    demo) exec $PY -m hf_flash demo "$@" ;;
    test) exec $PY -m pytest -q tests "$@" ;;
    *) echo "usage: bash scripts/run.sh {demo|test} [args]" >&2; exit 2 ;;
esac
