#!/usr/bin/env bash
# On a CUDA machine, in one go: the GPU tests, the op-level bar against cudnn, and the BERT-large
# training step (sdpa, hf_flash padded and packed, with a one-step profile). Each part runs within
# its own time limit, so a slow part cannot starve the others. The default parts take up to
# 8.5 minutes; with ops (PARTS="tests ops models") up to 12, more than one 10-minute command.
#
#   bash scripts/gpu_check.sh [OUT]          # default OUT: runs/gpu_check
#
# OUT gets up to nine files: summary.txt (one line per part: exit status and seconds), one log per
# part (tests.log, ops.log, models.log, scale.log), and the benchmarks' CSV/JSON (ops_bar_check.*,
# models_train_check.*).
# PARTS picks the parts, in this order (default "tests models"): tests, ops, models, and scale
# (tests/test_gpu_scale.py alone: offsets past 2^31 elements, 64k/128k tokens with their memory,
# 1000 calls with flat allocator statistics, CUDA-graph capture; ~40 GiB of GPU memory).
# Limits through the environment: TESTS_S (400; the suite took 263 s for 97 % of its tests at f38c3c8), OPS_S (200), MODELS_S (100), SCALE_S (150);
# WORKERS (16, pytest-xdist processes). The benchmarks record the git sha; set GIT_SHA if this
# checkout's git metadata is not the code being run.
set -u
cd "$(dirname "$0")/.."
PARTS=" ${PARTS:-tests models} "
for p in $PARTS; do
    case "$p" in tests | ops | models | scale) ;;
        *) echo "gpu_check: unknown part '$p' in PARTS (parts: tests ops models scale)"; exit 2 ;;
    esac
done
want() { case "$PARTS" in *" $1 "*) return 0 ;; esac; return 1; }
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
rm -f "$OUT"/{tests,ops,models,scale}.log  # a part not run this time must not show an old log
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
    { echo "gpu_check: no CUDA device"; exit 2; }
python3 -c "import hf_flash" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e .

. scripts/parts.sh  # part NAME SECONDS command...
# The kernel tests' inputs are seeded per case; a fresh salt per run draws other inputs, and the
# summary keeps it, so that a failure can be rerun with the same inputs.
export HF_FLASH_TEST_SALT=${HF_FLASH_TEST_SALT:-$RANDOM}
echo "HF_FLASH_TEST_SALT=$HF_FLASH_TEST_SALT" | tee -a "$OUT/summary.txt"

# Autotuning off: every shape class of the grid would otherwise time several compiled configs.
# Three property examples per (head dim, causal) test instead of ten: most of them compile kernels
# of their own, and ten took 60-110 s per test.
want tests && part tests "${TESTS_S:-400}" env HF_FLASH_AUTOTUNE=0 HF_FLASH_PROPERTY_EXAMPLES=3 \
    python3 -m pytest -q -p no:cacheprovider --tb=short -rf -n "${WORKERS:-16}" -k "not long_seq" \
    tests/test_kernel.py tests/test_hopper_forward.py tests/test_hopper_backward.py \
    tests/test_hopper_launches.py tests/test_patch_gpu.py \
    tests/test_reliability.py tests/test_patch_models.py
# The three model-shaped bar cases (each ~40-70 s with its tuning); the long ones take bench_ops alone.
want ops && part ops "${OPS_S:-200}" python3 benchmarks/bench_ops.py --suite bar --quick --cases bert,gpt2 \
    --backends hf_flash,cudnn --out "$OUT" --tag check --time-budget $(( ${OPS_S:-200} - 20 ))
want models && part models "${MODELS_S:-100}" python3 benchmarks/bench_models.py --suite train --models bert \
    --impls sdpa,hf_flash --patch-kwargs '{"packed": true}' --quick --profile --out "$OUT" \
    --tag check --time-budget $(( ${MODELS_S:-100} - 15 ))
# Alone: its tensors take ~40 GiB, and its memory figures are the point (-s prints them).
want scale && part scale "${SCALE_S:-150}" env HF_FLASH_AUTOTUNE=0 \
    python3 -m pytest -q -s -p no:cacheprovider --tb=short -rf tests/test_gpu_scale.py

echo
for log in tests scale; do
    [ -f "$OUT/$log.log" ] || continue
    grep -E "^(FAILED|ERROR)" "$OUT/$log.log" | head -n 20
    tail -n 2 "$OUT/$log.log"
done
[ -f "$OUT/scale.log" ] && grep -iE "GiB|MiB" "$OUT/scale.log" | head -n 8
[ -f "$OUT/ops.log" ] && grep -A 12 "^fwd+bwd: ms" "$OUT/ops.log" | head -n 10
[ -f "$OUT/models.log" ] && grep -B 1 -A 4 "^model " "$OUT/models.log" | head -n 8
cat "$OUT/summary.txt"
