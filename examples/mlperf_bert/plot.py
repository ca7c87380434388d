"""Accuracy-vs-time plot and a results table from the curve logs (curve.jsonl) of several runs.

    python examples/mlperf_bert/plot.py runs/mlperf_bert/out/*.jsonl \
        --png examples/mlperf_bert/accuracy_vs_time.png --table examples/mlperf_bert/results.md

Each log is one run (train.py's curve.jsonl, or run_gpu.sh's copy of it). The table gives, per backend,
time-to-target (evaluation included, MLPerf's quantity) and steps-to-target as mean +- sample standard
deviation and range over the runs that reached the target, training tokens/s, and the ratios to sdpa
and eager. Runs that did not reach their target are listed, never averaged in.
"""

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

COLORS = {"eager": "tab:red", "sdpa": "tab:blue", "hf_flash": "tab:green", "hf_flash_packed": "tab:olive"}


def load_run(path):
    recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    heads = [r for r in recs if r["event"] == "run"]
    if not heads:
        raise ValueError(f"{path}: no run header")
    results = [r for r in recs if r["event"] == "result"]
    # A pause counts only if nothing came after it: a resumed run writes a new header (and, once
    # there, a result) after the pause.
    last_head = max(i for i, r in enumerate(recs) if r["event"] == "run")
    paused = [r for r in recs[last_head:] if r["event"] == "paused"]
    return {"path": str(path), "head": heads[0], "evals": [r for r in recs if r["event"] == "eval"],
            "result": results[-1] if results else None, "paused": paused[-1] if paused else None}


def _not_reached(r):
    """How a run that has no time to target is listed: its file, and whether it was only paused."""
    name = Path(r["path"]).name
    if r["result"] is None and r["paused"] is not None:
        return f"{name} (paused at step {r['paused']['step']}, not resumed)"
    return name


def _mean_sd(xs):
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.1f} (n=1)"
    return (f"{statistics.mean(xs):.1f} +- {statistics.stdev(xs):.1f} "
            f"[{min(xs):.1f}, {max(xs):.1f}] (n={len(xs)})")


def table(runs):
    by = defaultdict(list)
    for r in runs:
        if r["head"]["target"] > 1:  # a calibration run (unreachable target): curve only
            continue
        # Runs that compiled their kernels before the clock (train.py's warm-up) are not averaged
        # with runs that compiled them inside it.
        warmed = "yes" if r["head"].get("kernel_warmup_s") is not None else "no"
        by[(r["head"]["attn"], r["head"]["target"], r["head"]["world_size"], warmed)].append(r)
    lines = ["| backend | processes | kernels warmed before the clock | target | time to target, s | "
             "steps to target | train tokens/s | runs not reaching target |",
             "|---|---|---|---|---|---|---|---|"]
    means = {}
    for (attn, target, world, warmed), rs in sorted(by.items()):
        done = [r["result"] for r in rs if r["result"] and r["result"]["reached"]]
        missed = [_not_reached(r) for r in rs if not (r["result"] and r["result"]["reached"])]
        t = [d["time_to_target_s"] for d in done]
        s = [float(d["steps_to_target"]) for d in done]
        tps = [d["tokens_to_target"] / d["train_time_to_target_s"] for d in done
               if d.get("tokens_to_target") and d.get("train_time_to_target_s")]
        if t:
            means[(attn, target, world, warmed)] = statistics.mean(t)
        rate = f"{statistics.mean(tps):,.0f}" if tps else "-"
        lines.append(f"| {attn} | {world} | {warmed} | {target} | {_mean_sd(t)} | {_mean_sd(s)} | "
                     f"{rate} | {', '.join(missed) or '-'} |")
    ratios = []
    for (attn, target, world, warmed), m in sorted(means.items()):
        for ref in ("sdpa", "eager"):
            if attn != ref and (ref, target, world, warmed) in means:
                ratios.append(f"- {attn} / {ref} mean time to target (target {target}, {world} processes, "
                              f"kernels warmed before the clock: {warmed}): "
                              f"{m / means[(ref, target, world, warmed)]:.3f}")
    lines.append("")
    lines.append("Times are wall seconds from training start to the evaluation that first reached the target, "
                 "evaluations included; +- is the sample standard deviation, [min, max] the range.")
    return "\n".join(lines + [""] + ratios) + "\n"


def plot(runs, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    targets = set()
    for r in runs:
        h = r["head"]
        if not r["evals"]:
            continue
        x = [e["run_s"] / 60 for e in r["evals"]]
        y = [e["mlm_accuracy"] for e in r["evals"]]
        # Runs that compiled their kernels inside the clock are a different group (never averaged
        # with the warmed ones): drawn faint, so the same seed's two groups tell apart.
        warmed = h.get("kernel_warmup_s") is not None
        ax.plot(x, y, color=COLORS.get(h["attn"], "gray"), alpha=0.8 if warmed else 0.3,
                lw=1.5 if warmed else 1.0, marker="." if warmed else "x",
                ls=("-", "--", ":", "-.")[h["seed"] % 4],
                label=f"{h['attn']} seed {h['seed']}" + (f" x{h['world_size']}" if h["world_size"] > 1 else "")
                + (", kernels warmed" if warmed else ", kernels compiled in the clock")
                + (f", paused at step {r['paused']['step']}" if r["result"] is None and r["paused"] else ""))
        if h["target"] <= 1:
            targets.add(h["target"])
    for t in sorted(targets):
        ax.axhline(t, color="black", lw=0.8, ls="--")
    h0 = runs[0]["head"]
    ax.set_title(f"BERT ({h0['layers']} layers, hidden {h0['hidden']}) masked LM: accuracy vs time "
                 f"({h0.get('device', '')})")
    ax.set_xlabel("wall time since training start, evaluation included (min)")
    ax.set_ylabel("masked-LM accuracy (fixed eval set)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("logs", nargs="+", help="curve.jsonl files, one per run")
    p.add_argument("--png", default="accuracy_vs_time.png")
    p.add_argument("--table", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    runs = [load_run(f) for f in args.logs]
    plot(runs, args.png)
    text = table(runs)
    print(text)
    if args.table:
        Path(args.table).write_text(text)


if __name__ == "__main__":
    main()
