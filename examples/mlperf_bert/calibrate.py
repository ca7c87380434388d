"""The target accuracy from a calibration curve: the best accuracy sdpa reached within AT seconds.

    python examples/mlperf_bert/calibrate.py CURVE.jsonl [AT=240]

Prints every evaluation, then `TARGET=0.xyz`, or `NO TARGET: ...` when the curve cannot give one.
A target must be something training reaches: the best accuracy of the window's second half must
beat the first half's by RISE. A curve that fell or stayed flat (e.g. an lr that undoes the
starting checkpoint) would give a target every run "reaches" at its first evaluations, and the time
to target would measure nothing.
"""

import json
import math
import sys


RISE = 0.005  # accuracy the window's second half must gain over its first to count as rising


def pick_target(evals, at):
    """(target or None, reason) from the `eval` records of a curve and the window in seconds."""
    upto = [r for r in evals if r["run_s"] <= at]
    if not upto:
        return None, f"no evaluation within {at:.0f} s: lower --eval_every or raise CALIBRATE_AT"
    early = [r["mlm_accuracy"] for r in upto if r["run_s"] <= at / 2]
    late = [r for r in upto if r["run_s"] > at / 2]
    if not early or not late:
        return None, f"too few evaluations within {at:.0f} s to see a rise: lower --eval_every"
    best = max(late, key=lambda r: r["mlm_accuracy"])
    if best["mlm_accuracy"] < max(early) + RISE:
        return None, (f"the curve is not rising: best {max(early):.4f} in the first half of "
                      f"{at:.0f} s, {best['mlm_accuracy']:.4f} in the second")
    target = math.floor(best["mlm_accuracy"] * 1000) / 1000
    return target, (f"best sdpa accuracy within {at:.0f} s, at {best['run_s']:.0f} s; "
                    f"{len(evals)} evaluations, last at {evals[-1]['run_s']:.0f} s")


def main(argv):
    evals = [r for r in map(json.loads, open(argv[0])) if r["event"] == "eval"]
    at = float(argv[1]) if len(argv) > 1 else 240.0
    for r in evals:
        print(f"step {r['step']:6d}  run_s {r['run_s']:8.1f}  train_s {r['train_s']:8.1f}  "
              f"acc {r['mlm_accuracy']:.4f}")
    target, why = pick_target(evals, at)
    print(f"TARGET={target:.3f}  ({why})" if target is not None else f"NO TARGET: {why}")


if __name__ == "__main__":
    main(sys.argv[1:])
