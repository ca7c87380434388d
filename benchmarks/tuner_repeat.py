"""The tuner run again and again on one shape: does it pick the same configs each time, and what
does each pick's call cost?

    python benchmarks/tuner_repeat.py --cases gpt2,d128_4k --trials 5 --rounds 1,3

The tuner times each candidate of a kernel once per shape class, in a 20 ms window, at the first
call (HF_FLASH_TUNE_ROUNDS=1), or in that window split into interleaved rounds, ranked by median
round. A pick that changes from trial to trial with a call time that changes with it is a pick
decided by timing noise. Each trial forgets every pick (the compiled kernels stay in Triton's
cache, so no trial compiles), tunes forward and backward on one fwd+bwd call, then times that
call with do_bench; the settings of --rounds take turns, trial by trial, so that a drift of the
machine reaches each alike.
"""

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from sweep_configs import CASES, KERNELS, label  # noqa: E402


def summary_row(case, rounds, trials):
    """One case and rounds setting over its trials (each: picks per kernel, fwd+bwd ms)."""
    ms = [t["ms"] for t in trials]
    row = dict(case=case, tune_rounds=rounds, trials=len(trials), ms_median=statistics.median(ms),
               ms_min=min(ms), ms_max=max(ms), ms_trials=ms)
    for kernel in KERNELS:
        seen = Counter(t["picks"].get(kernel, "-") for t in trials)
        row[f"{kernel}_picks"] = "; ".join(f"{cfg} x{n}" for cfg, n in seen.most_common())
        row[f"{kernel}_distinct"] = len(seen)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="gpt2", help="comma-separated: " + ",".join(CASES))
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--rounds", default="1,3", help="HF_FLASH_TUNE_ROUNDS settings to compare")
    p.add_argument("--rep", type=int, default=100, help="do_bench window timing each pick, ms")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    settings = [int(r) for r in args.rounds.split(",") if r]

    import torch
    import triton.testing
    from hf_flash.kernels import _tuning, flash_attention

    if not torch.cuda.is_available():
        raise SystemExit("tuner_repeat.py times GPU kernels: no CUDA device here")
    benchlib.warm_up_gpu()
    meta = benchlib.run_metadata(args)
    out_dir = benchlib.output_dir(args.out, False)
    stem = "tuner_repeat" + (f"_{args.tag}" if args.tag else "")
    rows, body = [], []
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
        trials = {r: [] for r in settings}
        for _ in range(args.trials):
            for r in settings:
                _tuning.TUNE_ROUNDS = r
                _tuning._CHOSEN.clear()
                _tuning._COMPILED.clear()
                _tuning._PLANS.clear()
                call()
                picks = {kname: label(cfg) for (kname, _key), cfg
                         in _tuning.chosen_configs().items() if kname in KERNELS}
                ms = triton.testing.do_bench(call, warmup=20, rep=args.rep, return_mode="median")
                trials[r].append(dict(picks=picks, ms=ms))
        for r in settings:
            row = summary_row(name, r, trials[r])
            rows.append(row)
            body.append([name, r, f"{row['ms_median']:.3f}", f"{row['ms_min']:.3f}",
                         f"{row['ms_max']:.3f}"]
                        + [row[f"{kname}_picks"] for kname in KERNELS])
        benchlib.write_results(out_dir, stem, meta, rows)
    print(f"\nfwd+bwd ms over {args.trials} trials per setting (each trial tunes afresh), and "
          f"the configs picked (x: how many trials)")
    print(benchlib.table(["case", "rounds", "median", "min", "max"] + list(KERNELS), body))
    print(f"results: {out_dir / stem}.csv and .json")


if __name__ == "__main__":
    main()
