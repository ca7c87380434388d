"""The target accuracy from a calibration curve: the best accuracy sdpa reached within AT seconds.

    python examples/mlperf_bert/calibrate.py CURVE.jsonl [AT=240]

Prints every evaluation, then `TARGET=0.xyz`, or `NO TARGET: ...` when the curve cannot give one.
A target must be something training reaches: if the best accuracy of the window came early (the
curve fell or stayed flat, e.g. an lr that undoes the starting checkpoint), every run would "reach"
it at its first evaluation and the time to target would measure nothing.
"""

import json
import math
import sys


def pick_target(evals, at):
    """(target or None, reason) from the `eval` records of a curve and the window in seconds."""
    upto = [r for r in evals if r["run_s"] <= at]
    if not upto:
        return None, f"no evaluation within {at:.0f} s: lower --eval_every or raise CALIBRATE_AT"
    best = max(upto, key=lambda r: r["mlm_accuracy"])
    if best is upto[0] or best["run_s"] < at / 2:
        return None, (f"the best accuracy within {at:.0f} s ({best['mlm_accuracy']:.4f}) came at "
                      f"{best['run_s']:.0f} s, not late in the window: the curve is not rising")
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
