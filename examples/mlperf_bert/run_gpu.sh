#!/usr/bin/env bash
# The GPU side of the MLPerf-style BERT run: one invocation = one GPU job of at most 10 minutes.
# Run from the repo root on the GPU machine, with .carry/ (prepared data + vocab) and .whl/ (evaluate,
# datasets, dill, multiprocess wheels) carried along; logs go to $OUT (default runs/mlperf_bert/out).
#
#   bash examples/mlperf_bert/run_gpu.sh warmup [TARGET=0.10] [SEED=0]
#       the short-sequence first phase (samples cropped to WARMUP_SEQ=128 tokens, batch 128, sdpa,
#       deterministic kernels) from the seeded init, up to the first evaluation at or above TARGET
#       (past the unigram plateau, ~0.05); saved as $RUNS/start-seed$INIT_SEED with its sha256, and
#       from then on the start of `calibrate` and `run` on this machine. Too big to carry (1.3 GB):
#       each new machine makes it again (the same line resumes a warm-up cut by the budget).
#   bash examples/mlperf_bert/run_gpu.sh calibrate [TRAIN_SECONDS=300] [SEED=0]
#       sdpa with an unreachable target for TRAIN_SECONDS of training; prints the target to use:
#       the best accuracy sdpa had reached by CALIBRATE_AT seconds (default 240, i.e. ~4 minutes).
#   bash examples/mlperf_bert/run_gpu.sh run "ATTN [ATTN...]" TARGET [SEED=1]
#       each backend in turn to TARGET, within this command's budget; a run that does not finish
#       checkpoints and continues when the same line is issued again (--resume), while the machine
#       is still held (the checkpoints live in runs/, which is not carried back). With
#       EXTRA=--compile each backend's BERT body runs compiled (train.py --compile), in folders and
#       curves named ATTN-compiled-...
#
# Settings through the environment: BUDGET (seconds this command may use, default 570), OUT,
# RUNS (default runs/mlperf_bert), DATA (default .carry/mlperf_bert/data), INIT_SEED (0), NPROC (1:
# processes per node for torchrun), CONFIG (large), EXTRA (more train.py arguments for calibrate and
# run, e.g. "--per_device_batch 24"), WARMUP_SEQ/WARMUP_BATCH/WARMUP_ARGS (the warm-up's), CALIBRATE_AT
# and CALIBRATE_MARGIN, EXPECTED_INIT_SHA/EXPECTED_START_SHA (below), FROM_INIT=1 (let calibrate and
# run start from the bare init when no warm-up exists). An unfinished warm-up, or a calibrate/run
# without one, exits 5, so `warmup ... && calibrate ...` stops there. tests/test_mlperf_train.py runs
# the three modes on the CPU with the tiny config.
set -euo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
BUDGET=${BUDGET:-570}
OUT=${OUT:-runs/mlperf_bert/out}
RUNS=${RUNS:-runs/mlperf_bert}
DATA=${DATA:-.carry/mlperf_bert/data}
INIT_SEED=${INIT_SEED:-0}
CONFIG=${CONFIG:-large}  # tiny (with EXTRA=--tiny) only to try this script on a CPU
NPROC=${NPROC:-1}
EXTRA=${EXTRA:-}
CALIBRATE_AT=${CALIBRATE_AT:-240}
CALIBRATE_MARGIN=${CALIBRATE_MARGIN:-75}  # seconds of start-up in the calibration's time limit
# Warm-up settings. On BERT-large (H200, 2026-12-01) they reached 0.113 at the 4th evaluation (step
# 512, 82 s of training, lr still warming up through 5e-4): past the unigram plateau (~0.048) that
# 3e-3 at batch 32 never left. An evaluation every 128 steps (16384 samples) cost 1.5 s a time.
WARMUP_SEQ=${WARMUP_SEQ:-128}
WARMUP_BATCH=${WARMUP_BATCH:-128}
WARMUP_ARGS=${WARMUP_ARGS:---lr 1e-3 --warmup_steps 1000 --decay_steps 20000 --eval_every 16384}
# sha256 of the seed-0 BERT-large init's state dict: the GPU image's (torch 2.11 + transformers 5.17,
# the same on an H100 and an H200) and the CPU machine's (torch 2.13). Set it empty for another
# CONFIG or INIT_SEED. A mismatch is reported, not fatal: all backends of one machine still start
# from the same weights, and init.json in every curve header records the hash. EXPECTED_START_SHA:
# the warm-up's checkpoint on the GPU image (deterministic kernels; a new value on the same
# software means the warm-up did not repeat bit for bit).
EXPECTED_INIT_SHA=${EXPECTED_INIT_SHA-3f0e8ecb6a57401241a074b57d1375ae8c3070eb6ac2ee4f4eaf062e07e261c4 042f74f95f59738fb64056f892e6d0181db7f7e35b03d3364386a05d3f764aed}
EXPECTED_START_SHA=${EXPECTED_START_SHA-92bad3e37b9356d544032b33431b739985797530b2f53b0336cac16aca39529e}
mkdir -p "$OUT" "$RUNS"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_EVALUATE_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

left() { echo $((BUDGET - ($(date +%s) - START))); }

# -- set-up: wheels the image lacks, the project itself, the fixed checkpoint ------------------------
if [ -d .whl ] && ! python3 -c "import evaluate" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import evaluate, datasets" || { echo "evaluate/datasets do not import: carry .whl (../shared/device/gpu-wheels.sh)"; exit 3; }
python3 -c "import hf_flash" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e .
[ -f "$DATA/meta.json" ] || { echo "no $DATA/meta.json: carry .carry (prepare_data.py)"; exit 3; }

INIT=$RUNS/init-$CONFIG-seed$INIT_SEED
if [ ! -f "$INIT/init.json" ]; then
    python3 examples/mlperf_bert/make_checkpoint.py --config "$CONFIG" --seed "$INIT_SEED" --out "$INIT"
fi
sha_of() {  # sha_of FOLDER: the state-dict hash its init.json records
    python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['state_dict_sha256'])" "$1/init.json"
}
sha=$(sha_of "$INIT")
known() {  # known SHA "LIST": is SHA one of the LIST (an empty LIST knows every SHA)
    [ -z "$2" ] && return 0
    case " $2 " in *" $1 "*) return 0 ;; esac
    return 1
}
known "$sha" "$EXPECTED_INIT_SHA" || echo "WARNING: init sha256 $sha is none of the known $EXPECTED_INIT_SHA"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  echo "init $INIT sha256 $sha"; git rev-parse HEAD 2>/dev/null || true; } | tee -a "$OUT/machine.txt"

# The start of calibrate/run: the warm-up's checkpoint once it exists on this machine, else the init.
WARM=$RUNS/start-seed$INIT_SEED
if [ -f "$WARM/init.json" ]; then FROM=$WARM; else FROM=$INIT; fi
check_start() {
    local start
    start=$(sha_of "$WARM")
    echo "start $WARM sha256 $start" | tee -a "$OUT/machine.txt"
    known "$start" "$EXPECTED_START_SHA" ||
        echo "WARNING: warm-up sha256 $start is not the known $EXPECTED_START_SHA" | tee -a "$OUT/machine.txt"
}
if [ "$FROM" = "$WARM" ]; then check_start; fi
if [ "${1:-}" != warmup ]; then
    # From the bare init, BERT-large at seq 512 sits on the unigram plateau for the whole window
    # (H200, 2026-12-01): a calibration or run from there measures nothing, so it takes a choice.
    if [ "$FROM" = "$INIT" ] && [ "${FROM_INIT:-0}" != 1 ]; then
        echo "no warm-up checkpoint $WARM on this machine: run the warmup mode first (FROM_INIT=1 starts from the init)"
        exit 5
    fi
    echo "runs start from $FROM"
fi

launch() {  # train.py under python (1 process) or torchrun (NPROC processes)
    if [ "$NPROC" -gt 1 ]; then
        python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC" examples/mlperf_bert/train.py "$@"
    else
        python3 examples/mlperf_bert/train.py "$@"
    fi
}

mode=${1:?usage: run_gpu.sh calibrate [SECONDS] [SEED] | run "ATTNS" TARGET [SEED]}
case "$mode" in
warmup)
    target=${2:-0.10}; seed=${3:-0}
    dir=$RUNS/warmup-s$seed-n$NPROC
    limit=$(( $(left) - 40 ))
    launch --data "$DATA" --init "$INIT" --attn sdpa --target "$target" --seed "$seed" --out "$dir" \
        --max_seq_len "$WARMUP_SEQ" --per_device_batch "$WARMUP_BATCH" $WARMUP_ARGS --deterministic \
        --save_final "$WARM" --time_limit "$limit" --resume || echo "warm-up exited with $?"
    cp "$dir/curve.jsonl" "$OUT/warmup-s$seed-n$NPROC.jsonl" || { echo "no curve written"; exit 4; }
    if [ -f "$WARM/init.json" ]; then cp "$WARM/init.json" "$OUT/start-init.json"; cat "$WARM/init.json"; check_start
    else echo "warm-up not finished: issue the same line again"; exit 5; fi
    ;;
calibrate)
    secs=${2:-300}; seed=${3:-0}
    dir=$RUNS/calibrate-sdpa-s$seed-n$NPROC
    rm -rf "$dir"
    # --time_limit counts from process start (~1 min of start-up on BERT-large), hence the margin.
    limit=$(( secs + CALIBRATE_MARGIN < $(left) - 15 ? secs + CALIBRATE_MARGIN : $(left) - 15 ))
    launch --data "$DATA" --init "$FROM" --attn sdpa --target 1.01 --seed "$seed" --out "$dir" \
        --time_limit "$limit" --on_time_limit stop $EXTRA || echo "calibration run exited with $?"
    cp "$dir/curve.jsonl" "$OUT/calibrate-sdpa-s$seed-n$NPROC.jsonl" || { echo "no curve written"; exit 4; }
    python3 examples/mlperf_bert/calibrate.py "$dir/curve.jsonl" "$CALIBRATE_AT" | tee -a "$OUT/calibration.txt"
    ;;
run)
    attns=${2:?attention backends, e.g. "hf_flash sdpa"}; target=${3:?target accuracy}; seed=${4:-1}
    # A compiled run (EXTRA="--compile") is a configuration of its own: its own folder and curve.
    case " $EXTRA " in *" --compile "*) compiled=-compiled ;; *) compiled= ;; esac
    for attn in $attns; do
        name=$attn$compiled-t$target-s$seed-n$NPROC
        dir=$RUNS/$name
        limit=$(( $(left) - 40 ))  # room to write a BERT-large + LAMB checkpoint (~4 GB) and exit
        if [ "$limit" -lt 90 ]; then echo "no time left for $attn (issue the same line again)"; break; fi
        launch --data "$DATA" --init "$FROM" --attn "$attn" --target "$target" --seed "$seed" \
            --out "$dir" --time_limit "$limit" --resume $EXTRA || echo "$attn exited with $?"
        cp "$dir/curve.jsonl" "$OUT/$name.jsonl" || { echo "$attn wrote no curve"; break; }
        [ -f "$dir/result.json" ] || break  # paused: the next command resumes it first
    done
    ;;
*) echo "unknown mode $mode" >&2; exit 2 ;;
esac
ls -la "$OUT"
