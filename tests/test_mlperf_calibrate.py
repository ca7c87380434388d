"""The calibration's target: taken from a rising curve, refused from one that fell or stayed flat."""

import json
import sys
from pathlib import Path

EX = Path(__file__).resolve().parents[1] / "examples" / "mlperf_bert"
sys.path.insert(0, str(EX))
from calibrate import pick_target  # noqa: E402


def _evals(accs, every=20.0):
    return [dict(event="eval", step=128 * (i + 1), run_s=every * (i + 1), train_s=every * (i + 1),
                 mlm_accuracy=a) for i, a in enumerate(accs)]


def test_rising_curve_gives_the_best_accuracy_in_the_window_rounded_down():
    evals = _evals([0.10, 0.12, 0.15, 0.1799, 0.19, 0.30])  # at 20, 40, ..., 120 s
    target, why = pick_target(evals, at=100)
    assert target == 0.190 and "at 100 s" in why  # 0.30 at 120 s lies past the window


def test_curves_that_fall_or_stay_flat_give_no_target():
    # The H200 calibration of 2026-12-01: lr 3e-3 undid the warm start (0.110 -> 0.048).
    assert pick_target(_evals([0.1096, 0.1075, 0.0839] + [0.048] * 9), at=240)[0] is None
    # The H100 run from the random init: the unigram plateau from the second evaluation on.
    assert pick_target(_evals([0.042, 0.0481, 0.0481, 0.0420, 0.0481, 0.0481]), at=120)[0] is None
    # A plateau whose noise puts its maximum late is still flat.
    assert pick_target(_evals([0.0481, 0.0420, 0.0481, 0.0481, 0.0482, 0.0481]), at=120)[0] is None
    target, why = pick_target(_evals([0.2, 0.3]), at=10)
    assert target is None and "no evaluation within 10 s" in why
    assert pick_target(_evals([0.2, 0.3]), at=30)[0] is None  # nothing in the second half


def test_recorded_calibrations_are_refused():
    for name in ("results/calibrate-sdpa-s0-n1.jsonl",
                 "results/h200-2026-12-01/calibrate-lr3e-3-sdpa-s0-n1.jsonl"):
        evals = [r for r in map(json.loads, open(EX / name)) if r["event"] == "eval"]
        assert pick_target(evals, at=240)[0] is None, name
