"""The tuner run again and again on one shape: does it pick the same configs each time, and what
does each pick's call cost?

    python benchmarks/tuner_repeat.py --cases gpt2,d128_4k --trials 5 --settings 1:1,3:1,3:8

The tuner times each candidate of a kernel once per shape class, in a 20 ms window, at the first
call (HF_FLASH_TUNE_ROUNDS=1), or in that window split into interleaved rounds, ranked by median
round; a round runs each candidate at least TUNE_MIN_RUNS times, its window grown to fit. A
setting is ROUNDS:MIN_RUNS. A pick that changes from trial to trial with a call time that
changes with it is a pick decided by timing noise. Each trial forgets every pick (the compiled
kernels stay in Triton's cache, so no trial compiles), tunes forward and backward on one fwd+bwd
call, then times that call with do_bench; the settings take turns, trial by trial, so that a
drift of the machine reaches each alike. The JSON keeps every trial: its picks, its time and
what the tuner timed for each candidate.
"""

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from sweep_configs import CASES, KERNELS, label  # noqa: E402


def parse_settings(text):
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        bits = part.split(":")
        if len(bits) != 2 or not all(b.isdigit() and int(b) >= 1 for b in bits):
            raise SystemExit(f"--settings: {part!r} is not ROUNDS:MIN_RUNS (whole numbers >= 1)")
        out.append((int(bits[0]), int(bits[1])))
    return out


def summary_row(case, setting, trials):
    """One case and setting (rounds, min runs) over its trials (each: picks per kernel, fwd+bwd
    ms)."""
    ms = [t["ms"] for t in trials]
    row = dict(case=case, tune_rounds=setting[0], min_runs=setting[1], trials=len(trials),
               ms_median=statistics.median(ms), ms_min=min(ms), ms_max=max(ms), ms_trials=ms)
    for kernel in KERNELS:
        seen = Counter(t["picks"].get(kernel, "-") for t in trials)
        row[f"{kernel}_picks"] = "; ".join(f"{cfg} x{n}" for cfg, n in seen.most_common())
        row[f"{kernel}_distinct"] = len(seen)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="gpt2", help="comma-separated: " + ",".join(CASES))
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--settings", default="1:1,3:1,3:8",
                   help="ROUNDS:MIN_RUNS tuner settings to compare, comma-separated")
    p.add_argument("--rep", type=int, default=100, help="do_bench window timing each pick, ms")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    settings = parse_settings(args.settings)

    import torch
    import triton.testing
    from hf_flash.kernels import _tuning, flash_attention

    if not torch.cuda.is_available():
        raise SystemExit("tuner_repeat.py times GPU kernels: no CUDA device here")
    benchlib.warm_up_gpu()
    meta = benchlib.run_metadata(args)
    out_dir = benchlib.output_dir(args.out, False)
    stem = "tuner_repeat" + (f"_{args.tag}" if args.tag else "")
    rows, body, every = [], [], []
    for name in cases:
        B, H, N, D, causal, p_drop = CASES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
                   .requires_grad_() for _ in range(3))
        do = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)

        def call():
            o = flash_attention(q, k, v, is_causal=causal, dropout_p=p_drop)
            return torch.autograd.grad(o, (q, k, v), do)

        call()  # compiles every candidate once, into Triton's cache
        trials = {st: [] for st in settings}
        for _ in range(args.trials):
            for st in settings:
                _tuning.TUNE_ROUNDS, _tuning.TUNE_MIN_RUNS = st
                _tuning._CHOSEN.clear()
                _tuning._COMPILED.clear()
                _tuning._PLANS.clear()
                _tuning._TIMINGS.clear()
                call()
                picks = {kname: label(cfg) for (kname, _key), cfg
                         in _tuning.chosen_configs().items() if kname in KERNELS}
                tuned = {t["kernel"]: {label(c): [round(x, 4) for x in ms] for c, ms in t["timed"]}
                         for t in _tuning._TIMINGS}
                ms = triton.testing.do_bench(call, warmup=20, rep=args.rep, return_mode="median")
                trials[st].append(dict(picks=picks, ms=ms))
                every.append(dict(case=name, tune_rounds=st[0], min_runs=st[1], picks=picks,
                                  ms=ms, tuner_ms=tuned))
        for st in settings:
            row = summary_row(name, st, trials[st])
            rows.append(row)
            body.append([name, f"{st[0]}:{st[1]}", f"{row['ms_median']:.3f}",
                         f"{row['ms_min']:.3f}", f"{row['ms_max']:.3f}"]
                        + [row[f"{kname}_picks"] for kname in KERNELS])
        benchlib.write_results(out_dir, stem, meta, rows, extra=dict(trials=every))
    print(f"\nfwd+bwd ms over {args.trials} trials per setting (each trial tunes afresh), and "
          f"the configs picked (x: how many trials)")
    print(benchlib.table(["case", "rounds:min", "median", "min", "max"] + list(KERNELS), body))
    print(f"results: {out_dir / stem}.csv and .json")


if __name__ == "__main__":
    main()
