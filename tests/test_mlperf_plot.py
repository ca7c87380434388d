"""examples/mlperf_bert/plot.py: the results table and plot from curve logs."""

import json
import sys
from pathlib import Path

EX = Path(__file__).resolve().parents[1] / "examples" / "mlperf_bert"
sys.path.insert(0, str(EX))
import plot  # noqa: E402

RESULTS = EX / "results" / "h200-2026-12-01"  # seed 1, kernels compiled inside the clock
WARMED = EX / "results" / "h200-2026-12-01-warmed"  # seed 2, kernels warmed before the clock


def _curve(path, attn, seconds, warmed, paused_at=None):
    head = {"event": "run", "attn": attn, "target": 0.5, "world_size": 1, "seed": 1,
            "device": "test GPU", "layers": 2, "hidden": 8, "kernel_warmup_s": 3.0 if warmed else None}
    ev = {"event": "eval", "step": 10, "run_s": seconds, "train_s": seconds - 1, "mlm_accuracy": 0.5}
    res = {"event": "result", "reached": True, "time_to_target_s": seconds,
           "train_time_to_target_s": seconds - 1, "steps_to_target": 10, "tokens_to_target": 1000}
    if paused_at is not None:  # stopped by its time limit before the target, to be resumed
        res = {"event": "paused", "step": paused_at, "run_s": seconds}
    path.write_text("".join(json.dumps(r) + "\n" for r in (head, ev, res)))
    return path


def test_committed_h200_runs_give_the_readme_figures():
    runs = [plot.load_run(p) for p in sorted(RESULTS.glob("*-t0.140-*.jsonl"))]
    text = plot.table(runs)
    assert "| hf_flash | 1 | no | 0.14 | 229.4 (n=1) | 1280.0 (n=1) |" in text
    assert "| sdpa | 1 | no | 0.14 | 187.4 (n=1) | 1280.0 (n=1) |" in text
    assert "hf_flash / sdpa mean time to target" in text and ": 1.224" in text


def _table(paths):
    """plot.py's table of the curve logs at `paths`, and its ratio lines by their pair."""
    text = plot.table([plot.load_run(p) for p in sorted(paths)])
    ratios = {ln.split(" mean")[0]: ln.rsplit(": ", 1)[1] for ln in text.splitlines()
              if ln.startswith("- ")}
    return text, ratios


def test_committed_warmed_h200_runs_give_the_readme_figures():
    text, ratios = _table(WARMED.glob("*-t0.140-*.jsonl"))
    assert "| hf_flash | 1 | yes | 0.14 | 191.9 (n=1) | 1280.0 (n=1) |" in text
    assert "| sdpa | 1 | yes | 0.14 | 190.5 (n=1) | 1280.0 (n=1) |" in text
    assert "| eager | 1 | yes | 0.14 | 278.3 (n=1) | 1152.0 (n=1) |" in text
    assert "hf_flash_packed-t0.140-s2-n1.jsonl (paused at step 860, not resumed)" in text
    assert ratios == {"- eager / sdpa": "1.461", "- hf_flash / sdpa": "1.007",
                      "- hf_flash / eager": "0.689", "- sdpa / eager": "0.684"}


def test_runs_warmed_before_the_clock_are_kept_apart(tmp_path):
    runs = [plot.load_run(_curve(tmp_path / f"{a}-{w}.jsonl", a, s, w)) for a, s, w in
            (("sdpa", 100.0, False), ("hf_flash", 130.0, False), ("sdpa", 90.0, True),
             ("hf_flash", 60.0, True))]
    text = plot.table(runs)
    assert "| hf_flash | 1 | yes | 0.5 | 60.0 (n=1) |" in text
    assert "| hf_flash | 1 | no | 0.5 | 130.0 (n=1) |" in text
    ratios = [ln for ln in text.splitlines() if ln.startswith("- hf_flash / sdpa")]
    assert len(ratios) == 2 and any(ln.endswith(": 1.300") for ln in ratios)
    assert any(ln.endswith(": 0.667") for ln in ratios)
    paused = plot.load_run(_curve(tmp_path / "paused.jsonl", "hf_flash", 40.0, True, paused_at=7))
    assert "paused.jsonl (paused at step 7, not resumed)" in plot.table([paused])
    # Resumed after the pause (a new header) and not finished: not reported as paused.
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text((tmp_path / "paused.jsonl").read_text()
                       + (tmp_path / "paused.jsonl").read_text().splitlines()[0] + "\n")
    text = plot.table([plot.load_run(resumed)])
    assert "resumed.jsonl" in text and "not resumed" not in text
    png = tmp_path / "p.png"
    plot.plot(runs, png)
    assert png.stat().st_size > 1000


def test_all_warmed_h200_seeds_give_the_readme_means():
    text, ratios = _table(WARMED.parent.glob("h200-2026-12-01-warmed*/*-t0.140-*.jsonl"))
    assert "| eager | 1 | yes | 0.14 | 310.1 +- 31.3 [278.3, 341.0] (n=3) |" in text
    assert "| hf_flash | 1 | yes | 0.14 | 192.5 +- 2.4 [190.4, 195.1] (n=3) |" in text
    assert "| sdpa | 1 | yes | 0.14 | 197.0 +- 8.0 [190.5, 205.9] (n=3) |" in text
    assert "eager-t0.140-s3-n1.jsonl (paused at step 1340, not resumed)" in text
    assert ratios == {"- eager / sdpa": "1.574", "- hf_flash / sdpa": "0.977",
                      "- hf_flash / eager": "0.621", "- sdpa / eager": "0.635"}
