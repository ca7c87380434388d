#!/usr/bin/env bash
# On a CUDA machine, the examples' GPU runs for examples/README.md, each part under its own time
# limit: the classifier with each backend, generation speed, and the on-policy distillation at a
# reduced size with each backend (PARTS below: more than one 10-minute call in all).
#
#   bash scripts/gpu_examples.sh [OUT]       # default OUT: runs/gpu_examples
#
# The classifier needs the MiniLM-L6 weights and en-corpus' labeled.tsv.xz: MODEL (a folder,
# default .carry/minilm) and DATA (the folder holding labeled.tsv.xz, default .carry), both carried
# along, and evaluate: where the image lacks it, its wheels in .whl/. OUT gets three files (few, to keep what is copied back small): summary.txt, results.json (each part's
# result.json by part name) and logs.txt (the end of each part's log); the logs stay in
# runs/examples/logs.
# DISTILL_TEXT: a folder holding train.txt.xz and eval.txt.xz (en-corpus's layout) for the
# distillation's teacher, student and prompts; unset, the repository's small sample text.
# Limits through the environment: CLS_S (100 per backend), GEN_S (100), DISTILL_S (250 for the
# run that trains its teacher; 230 s on an H200), DISTILL_REUSE_S (220 for one that reuses it);
# DISTILL_STEPS (100) sets the distillation steps of each method (at 60, on en-corpus, an H200
# took 116 s for distill, 95 for distill_sdpa and 93 for distill_eager: one call fits all three).
# PARTS picks the parts, in this order (default "classifier generation", ~400 s): classifier (one
# run per backend), generation, distill (hf_flash, training the teacher and saving it),
# distill_sdpa and distill_eager (the same distillation in that attention, on distill's teacher:
# in the same call as distill or a later one on the same machine). One call fits
# "distill distill_sdpa" (~470 s); distill_eager then takes a call of its own.
set -u
cd "$(dirname "$0")/.."
PARTS=" ${PARTS:-classifier generation} "
for p in $PARTS; do
    case "$p" in classifier | generation | distill | distill_sdpa | distill_eager) ;;
        *) echo "gpu_examples: unknown part '$p' in PARTS (parts: classifier generation distill distill_sdpa distill_eager)"; exit 2 ;;
    esac
done
want() { case "$PARTS" in *" $1 "*) return 0 ;; esac; return 1; }
OUT=${1:-runs/gpu_examples}
MODEL=${MODEL:-.carry/minilm}
DATA=${DATA:-.carry}
LOGS=runs/examples/logs
# A result.json of an earlier call must not pass for this one's. The distillation's teacher stays
# for distill_sdpa / distill_eager in a later call, unless this call makes a new one.
find runs/examples -name result.json -delete 2>/dev/null
rm -rf runs/examples/logs
case "$PARTS" in *" distill "*) rm -rf runs/examples/distill ;; esac
mkdir -p "$OUT" "$LOGS"
: > "$OUT/summary.txt"
# TINY=1: every example in its --tiny mode, on the CPU too (tests the script, measures nothing).
TINY=${TINY:-0}
if [ "$TINY" = 1 ]; then
    tiny=(--tiny); cls_data=(); distill_size=(); gen_size=()
else
    python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
        { echo "gpu_examples: no CUDA device"; exit 2; }
    tiny=(); cls_data=(--model "$MODEL" --data "$DATA")
    # Reduced to fit their parts: the distillation from 2000/200/300 steps, generation from 5
    # timed repeats to 2 (it took 108 s with 5 on an H200, ~8 s a repeat of the three backends).
    distill_size=(--teacher_steps 800 --warmup_steps 100 --distill_steps "${DISTILL_STEPS:-100}")
    gen_size=(--repeats 2)
fi
if [ -n "${DISTILL_TEXT:-}" ]; then
    for f in train eval; do
        [ -f "$DISTILL_TEXT/$f.txt.xz" ] || { echo "gpu_examples: no $DISTILL_TEXT/$f.txt.xz (DISTILL_TEXT)"; exit 3; }
    done
    distill_size+=(--train_text "$DISTILL_TEXT/train.txt.xz" --eval_text "$DISTILL_TEXT/eval.txt.xz")
fi
python3 -c "import hf_flash" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e .
# The classifier scores with an evaluate module. Where it does not import, it is installed from
# the wheels in .whl/ (as examples/mlperf_bert/run_gpu.sh does) into a folder of its own, put on
# the path of the classifier's runs only, so the other parts keep the image's packages.
cls_env=()
if want classifier && ! python3 -c "import evaluate" 2>/dev/null; then
    [ -d .whl ] || { echo "gpu_examples: evaluate does not import and there is no .whl/ to install it from"; exit 3; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    cls_env=(env "PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}")
    "${cls_env[@]}" python3 -c "import evaluate" || { echo "gpu_examples: evaluate does not import from .whl/"; exit 3; }
fi
export HF_HUB_OFFLINE=1
. scripts/parts.sh  # part NAME SECONDS command...

# hf_flash first: it pays Triton's compilations, the others CUDA's own first-use costs.
want classifier && for attn in hf_flash sdpa eager; do
    part "classifier_$attn" "${CLS_S:-100}" "${cls_env[@]}" python3 examples/finetune_classifier.py --attn "$attn" \
        "${cls_data[@]}" "${tiny[@]}" --out "runs/examples/classifier_$attn"
done
want generation && part generation "${GEN_S:-100}" python3 examples/generation_speed.py "${tiny[@]}" \
    "${gen_size[@]}" --out runs/examples/generation
# The teacher is kept with a note of the sizes it was made at: a run on it must use the same.
sizes="TINY=$TINY ${distill_size[*]}"
if want distill; then
    part distill "${DISTILL_S:-250}" python3 examples/onpolicy_distillation.py \
        --out runs/examples/distill "${distill_size[@]}" "${tiny[@]}"
    [ -f runs/examples/distill/teacher/config.json ] && echo "$sizes" > runs/examples/distill/sizes.txt
fi
for attn in sdpa eager; do
    want "distill_$attn" || continue
    if [ ! -f runs/examples/distill/teacher/config.json ]; then
        echo "distill_$attn: no runs/examples/distill/teacher (run the distill part first)" |
            tee -a "$OUT/summary.txt"
        continue
    fi
    if [ "$(cat runs/examples/distill/sizes.txt 2>/dev/null)" != "$sizes" ]; then
        echo "distill_$attn: the saved teacher was made at other sizes ($(cat runs/examples/distill/sizes.txt 2>/dev/null || echo unknown)), not $sizes: run distill again" |
            tee -a "$OUT/summary.txt"
        continue
    fi
    part "distill_$attn" "${DISTILL_REUSE_S:-220}" python3 examples/onpolicy_distillation.py \
        --attn "$attn" --teacher runs/examples/distill/teacher --out "runs/examples/distill_$attn" \
        "${distill_size[@]}" "${tiny[@]}"
done

python3 - "$OUT" "$LOGS" <<'PY'
import json, re, sys
from pathlib import Path
out, logs = Path(sys.argv[1]), Path(sys.argv[2])
results = {}
for f in sorted(Path("runs/examples").glob("*/result.json")):
    results[f.parent.name] = json.loads(f.read_text())
(out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
with open(out / "logs.txt", "w") as fh:
    for log in sorted(logs.glob("*.log")):
        # Progress bars redraw with carriage returns: keep each line's last state.
        lines = [ln.split("\r")[-1] for ln in log.read_text(errors="replace").split("\n")]
        fh.write(f"==== {log.name}\n" + "\n".join(lines[-40:]) + "\n")
for name, r in results.items():
    print(name, json.dumps(r)[:400])
PY
cat "$OUT/summary.txt"
