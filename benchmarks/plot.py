"""PNG plots from the benchmark CSVs, laid out like the FlashAttention paper's figures.

    python benchmarks/plot.py --results benchmarks/results     # PNGs into benchmarks/results/plots

All ops_*.csv files are merged (split runs of one sweep make one set of figures; where two files
have the same point, the later run wins), and likewise all models_*.csv. Figures: the bar-table
cases (TFLOP/s per backend and mode); the sweep, one figure per variant (rows head dim, columns
fwd / bwd / fwd+bwd, bars per backend over sequence length); peak memory against sequence
length; ms per training step, and tokens/s and peak memory against context. A backend tried
without a result for a point gets an "x" at the axis bottom: its reason is in the CSV. The
subtitle names the GPU, versions, git sha and date of the runs.
"""

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on the benchmark machines
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"hf_flash": "#d62728", "hf_flash_packed": "#bcbd22", "flash": "#1f77b4",
          "efficient": "#2ca02c", "cudnn": "#9467bd", "math": "#7f7f7f", "flex": "#ff7f0e",
          "sdpa": "#1f77b4", "eager": "#7f7f7f",
          "hf_flash+opts": "#8c564b", "sdpa+compile": "#17becf", "hf_flash+compile": "#e377c2"}
MODES = ("fwd", "bwd", "fwd+bwd")
NOT_TRIED = float("nan")  # grouped_bars draws nothing for it (None: tried, no result)


def load(csv_path: Path):
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if v in ("True", "False"):
                r[k] = v == "True"
            else:
                try:
                    r[k] = int(v)
                except (TypeError, ValueError):
                    try:
                        r[k] = float(v)
                    except (TypeError, ValueError):
                        pass
    meta = {}
    js = csv_path.with_suffix(".json")
    if js.exists():
        meta = json.loads(js.read_text()).get("meta", {})
    return rows, meta


def subtitle(meta) -> str:
    return (f"{meta.get('gpu', '?')} | torch {meta.get('torch', '?')} | triton "
            f"{meta.get('triton', '?')} | git {meta.get('git_sha', '?')} | {meta.get('date_utc', '?')}")


def legend(ax, series):
    # Proxies, not the bars: a series with no bar in this axis still gets its own colour.
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=COLORS.get(s, "gray"), label=s) for s in series], fontsize=7)


def ok(r) -> bool:
    return r.get("status") == "ok"


def grouped_bars(ax, groups, series, value, label_fmt="{:.0f}", log=False):
    """Bars for each series within each group; value(group, series) -> float, None (tried
    without a result: an x at the axis bottom) or NaN (not tried: nothing drawn)."""
    n = max(len(series), 1)
    width = 0.8 / n
    if log:
        ax.set_yscale("log")
    misses = []
    for i, s in enumerate(series):
        xs, ys, miss = [], [], []
        for j, g in enumerate(groups):
            x = j - 0.4 + width * (i + 0.5)
            y = value(g, s)
            if y is None:
                miss.append(x)
            elif y == y:  # NaN: not tried here
                xs.append(x)
                ys.append(y)
        bars = ax.bar(xs, ys, width, label=s, color=COLORS.get(s, "gray"))
        for b, y in zip(bars, ys):
            ax.annotate(label_fmt.format(y), (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=5, rotation=90,
                        xytext=(0, 1), textcoords="offset points")
        misses += [(x, s) for x in miss]
    # Drawn once the bars have set the axis range, so a log axis has a bottom to mark.
    bottom = ax.get_ylim()[0]
    for x, s in misses:
        ax.plot([x], [bottom], "x", color=COLORS.get(s, "gray"), markersize=4, clip_on=False)
    ax.set_ylim(bottom=bottom)
    ax.set_xlim(-0.5, len(groups) - 0.5)  # the same slots whether or not every series has a bar
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([str(g) for g in groups])
    ax.grid(axis="y", alpha=0.3)


def present(rows, key, order):
    have = {r[key] for r in rows}
    return [x for x in order if x in have] + sorted(have - set(order), key=str)


def variant(r) -> str:
    if r["padded"] and r["dropout"]:
        return "padded+dropout"
    if r["padded"]:
        return "padded"
    if r["dropout"]:
        return "causal_dropout" if r["causal"] else "dropout"
    return "causal" if r["causal"] else "plain"


def plot_bar_suite(rows, meta, out: Path):
    rows = [r for r in rows if r["suite"] == "bar"]
    if not rows:
        return []
    cases = list(dict.fromkeys(r["case"] for r in rows))
    backends = present(rows, "backend", COLORS)
    idx = {(r["case"], r["backend"], r["mode"]): r for r in rows}
    ncols = min(3, len(cases))
    nrows = -(-len(cases) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(cases):]:
        ax.set_visible(False)
    for ax, c in zip(axes.flat, cases):
        modes = [m for m in MODES if any((c, b, m) in idx for b in backends)]
        grouped_bars(ax, modes, backends, lambda m, b: idx[(c, b, m)]["tflops"]
                     if (c, b, m) in idx and ok(idx[(c, b, m)]) else None)
        ax.set_title(c, fontsize=8)
        ax.set_ylabel("TFLOP/s")
    legend(axes[0][0], backends)
    fig.suptitle("Attention, bar cases\n" + subtitle(meta), fontsize=9)
    fig.tight_layout()
    path = out / "bar_cases.png"
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return [path]


def plot_sweep(rows, meta, out: Path):
    rows = [r for r in rows if r["suite"] == "sweep"]
    paths = []
    backends = present(rows, "backend", COLORS)
    for var in present(rows, "variant", ("plain", "causal", "padded", "dropout",
                                         "causal_dropout")):
        vr = [r for r in rows if r["variant"] == var]
        dims = sorted({r["D"] for r in vr})
        modes = [m for m in MODES if any(r["mode"] == m for r in vr)]
        idx = {(r["D"], r["N"], r["backend"], r["mode"]): r for r in vr}
        fig, axes = plt.subplots(len(dims), len(modes), squeeze=False,
                                 figsize=(5.2 * len(modes), 3.4 * len(dims)))
        for i, d in enumerate(dims):
            seqs = sorted({r["N"] for r in vr if r["D"] == d})
            for j, m in enumerate(modes):
                ax = axes[i][j]
                grouped_bars(ax, seqs, backends, lambda n, b: idx[(d, n, b, m)]["tflops"]
                             if (d, n, b, m) in idx and ok(idx[(d, n, b, m)]) else None)
                ax.set_title(f"{var}, head dim {d}, {m}", fontsize=9)
                ax.set_xlabel("sequence length")
                ax.set_ylabel("TFLOP/s")
        legend(axes[0][0], backends)
        fig.suptitle(f"Attention speed, {var} (batch x seq = 16k tokens, hidden 2048)\n"
                     + subtitle(meta), fontsize=9)
        fig.tight_layout()
        path = out / f"sweep_{var}.png"
        fig.savefig(path, dpi=150)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_memory(rows, meta, out: Path):
    rows = [r for r in rows if r["suite"] == "memory" and r["mode"] == "fwd+bwd"]
    if not rows:
        return []
    backends = present(rows, "backend", COLORS)
    seqs = sorted({r["N"] for r in rows})
    idx = {(r["N"], r["backend"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(8, 4))
    grouped_bars(ax, seqs, backends,
                 lambda n, b: idx[(n, b)]["peak_mib"] if (n, b) in idx and ok(idx[(n, b)])
                 and isinstance(idx[(n, b)].get("peak_mib"), float) else None, log=True)
    ax.set_xlabel("sequence length (B4 H16 D64; 65536 at B1)")
    ax.set_ylabel("extra peak memory, fwd+bwd (MiB)")
    legend(ax, backends)
    fig.suptitle("Attention memory\n" + subtitle(meta), fontsize=9)
    fig.tight_layout()
    path = out / "memory.png"
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return [path]


def plot_models(rows, meta, out: Path):
    paths = []
    order = ("eager", "sdpa", "hf_flash", "hf_flash+opts", "sdpa+compile", "hf_flash+compile")
    train = [r for r in rows if r["suite"] in ("train", "dry-run")]
    if train:
        impls = present(train, "impl", order)
        models = list(dict.fromkeys(r["model"] for r in train))
        idx = {(r["model"], r["impl"]): r for r in train}
        fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.8), squeeze=False)
        for ax, m in zip(axes[0], models):
            grouped_bars(ax, ["train step"], impls,
                         lambda _, i: NOT_TRIED if (m, i) not in idx else
                         idx[(m, i)]["ms_step"] if ok(idx[(m, i)]) else None, label_fmt="{:.1f}")
            ax.set_title(m, fontsize=8)
            ax.set_ylabel("ms per step (lower is better)")
        legend(axes[0][0], impls)
        fig.suptitle("Training step\n" + subtitle(meta), fontsize=9)
        fig.tight_layout()
        path = out / "models_train.png"
        fig.savefig(path, dpi=150)
        plt.close(fig)
        paths.append(path)
    long = [r for r in rows if r["suite"] == "long"]
    if long:
        impls = present(long, "impl", order)
        ctxs = sorted({r["N"] for r in long})
        idx = {(r["N"], r["impl"]): r for r in long}
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, key, ylabel, fmt in ((axes[0], "tokens_s", "tokens/s", "{:.0f}"),
                                     (axes[1], "peak_gib", "peak memory (GiB)", "{:.1f}")):
            grouped_bars(ax, ctxs, impls,
                         lambda n, i: NOT_TRIED if (n, i) not in idx else
                         idx[(n, i)][key] if ok(idx[(n, i)]) else None, label_fmt=fmt)
            ax.set_xlabel("context (GPT-2-small, batch 1); x = out of memory or n/a")
            ax.set_ylabel(ylabel)
        legend(axes[0], impls)
        fig.suptitle("Longer context\n" + subtitle(meta), fontsize=9)
        fig.tight_layout()
        path = out / "models_long.png"
        fig.savefig(path, dpi=150)
        plt.close(fig)
        paths.append(path)
    return paths


def merge(paths):
    """Rows of several result files as one set; a later file (by date) replaces an earlier
    one's row for the same point, so a re-run of part of a sweep updates the plots. A point a
    later run did not measure (time budget, error) keeps an earlier run's measurement."""
    loaded = [load(p) for p in paths]
    loaded.sort(key=lambda rm: rm[1].get("date_utc", ""))
    merged, metas = {}, []
    for rows, meta in loaded:
        if rows:
            metas.append(meta)
        for r in rows:
            if r.get("compiled") is True:  # a torch.compile'd step is another contender, not a re-run
                r["impl"] = f"{r['impl']}+compile"
            key = (r.get("suite"), r.get("case") or r.get("model"), r.get("backend") or r.get("impl"),
                   r.get("mode"))
            if r.get("status") != "ok" and merged.get(key, {}).get("status") == "ok":
                continue
            merged[key] = r
    meta = {}
    for k in ("gpu", "torch", "triton", "git_sha", "date_utc"):
        # shas and timestamps to 10 characters (a sha's prefix, the day) before telling runs apart
        cut = 10 if k in ("git_sha", "date_utc") else None
        vals = list(dict.fromkeys(str(m.get(k, "?"))[:cut] for m in metas))
        what = "commits" if k == "git_sha" else "values"
        meta[k] = "/".join(vals) if len(vals) <= 3 else f"{vals[0]} .. {vals[-1]} ({len(vals)} {what})"
    return list(merged.values()), meta


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot benchmark CSVs to PNG.")
    p.add_argument("--results", default="benchmarks/results", help="folder with the CSVs")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: <results>/plots)")
    p.add_argument("--include-dry-run", action="store_true",
                   help="also plot the CPU dry-run files (plumbing checks only)")
    args = p.parse_args(argv)
    res = Path(args.results)
    out = Path(args.out) if args.out else res / "plots"
    out.mkdir(parents=True, exist_ok=True)
    keep = lambda path: args.include_dry_run or "dry-run" not in path.stem
    made = []
    ops = [q for q in sorted(res.glob("ops_*.csv")) if keep(q)]
    if ops:
        rows, meta = merge(ops)
        for r in rows:
            r["variant"] = variant(r)
        made += plot_bar_suite(rows, meta, out) + plot_sweep(rows, meta, out)
        made += plot_memory(rows, meta, out)
    models = [q for q in sorted(res.glob("models_*.csv")) if keep(q)]
    if models:
        rows, meta = merge(models)
        made += plot_models(rows, meta, out)
    for m in made:
        print(m)
    if not made:
        print(f"no ops_*.csv or models_*.csv with rows in {res}")


if __name__ == "__main__":
    main()
