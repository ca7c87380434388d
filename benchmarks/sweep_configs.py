"""Launch configs of one hf_flash kernel, forced one at a time and timed interleaved.

    python benchmarks/sweep_configs.py --kernel dkdv --cases gpt2,gpt2_drop --out DIR
    python benchmarks/sweep_configs.py --kernel fwd --cases d128_4k --configs 128,64,8,3;128,64,8,4

The tuner picks each kernel's config per shape class by timing its candidates once, right
after compiling them. A few percent between two configs is within what one timing of that kind
resolves (the same config timed twice in one process differed by up to 6 % at the long shapes),
so this script answers "is config A faster than B" more carefully: the GPU is warmed up first,
then every config is timed once per round, in turn, for several rounds, and each config's
median over the rounds is reported with every round's figure and their spread.

A call whose GPU time is below the host's time to queue it is timed by the host, not the kernel:
BERT's forward (~0.11 ms of GPU time) read 0.112, 0.142 and 0.173 ms for one config in three
rounds on one H200 host. The spread column shows it; a config comparison needs rows whose
rounds agree. `--timer kernel` takes the host out: each round then runs the call under the
profiler and reports the swept kernel's own GPU time per launch, as CUPTI records it.

The other kernels of the call keep the config the tuner picks for them (tuned once, then held),
so a row's time is the whole forward (`--kernel fwd`) or backward (`dq`, `dkdv`) with only the
swept kernel's config changing. `--configs` lists BLOCK_M,BLOCK_N,warps,stages[,maxnreg]
separated by ';'; the default is the kernel's own candidate list.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

# name: (B, H, N, D, causal, dropout p)
CASES = {
    "bert": (32, 16, 512, 64, False, 0.0),
    "gpt2": (16, 16, 1024, 64, True, 0.0),
    "gpt2_drop": (16, 16, 1024, 64, True, 0.1),
    "d128_4k": (4, 32, 4096, 128, False, 0.0),
    "d64_16k": (1, 16, 16384, 64, False, 0.0),
}
KERNELS = {"fwd": "_fwd_kernel", "dq": "_bwd_dq_kernel", "dkdv": "_bwd_dkdv_kernel"}


def parse_configs(text):
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        vals = [int(x) for x in part.split(",")]
        if len(vals) not in (4, 5):
            raise SystemExit(f"--configs: {part!r} is not BLOCK_M,BLOCK_N,warps,stages[,maxnreg]")
        c = {"BLOCK_M": vals[0], "BLOCK_N": vals[1], "num_warps": vals[2], "num_stages": vals[3]}
        if len(vals) == 5:
            c["maxnreg"] = vals[4]
        out.append(c)
    return out


def label(c):
    extra = f" r{c['maxnreg']}" if "maxnreg" in c else ""
    return f"{c['BLOCK_M']}x{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}{extra}"


def result_row(case, kernel, cfg, rounds, err):
    """(the results-file row, the table line) of one config's timed rounds."""
    med = statistics.median(rounds)
    spread = max(rounds) / min(rounds) - 1
    row = dict(case=case, kernel=kernel, config=label(cfg), **cfg, ms_median=med,
               ms_rounds=list(rounds), spread=spread, max_rel_diff_vs_first=err)
    line = [case, label(cfg), f"{med:.3f}", " ".join(f"{t:.3f}" for t in rounds),
            f"{100 * spread:.0f} %", f"{err:.1e}"]
    return row, line


def kernel_ms(events, name):
    """The mean GPU time in ms of one launch of the kernel called `name`, from a profile's
    `key_averages()`: its device time over its launch count."""
    hits = [e for e in benchlib.device_kernels(events) if e.key == name]
    if not hits:
        seen = sorted({e.key for e in benchlib.device_kernels(events)})
        raise RuntimeError(f"no GPU kernel named {name} in the profile; it holds {seen}")
    total = sum(e.self_device_time_total for e in hits)
    count = sum(e.count for e in hits)
    return total / count / 1000.0


def unsteady(rows, limit=0.05):
    """The cases with a config whose rounds are more than `limit` apart."""
    return sorted({r["case"] for r in rows if r["spread"] > limit})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", choices=tuple(KERNELS), required=True)
    p.add_argument("--cases", default="gpt2", help="comma-separated: " + ",".join(CASES))
    p.add_argument("--configs", default="", help="';'-separated BLOCK_M,BLOCK_N,warps,stages[,maxnreg]")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rep", type=int, default=50, help="timing window per round, ms")
    p.add_argument("--timer", choices=("bench", "kernel"), default="bench",
                   help="bench: do_bench's median of the whole call; kernel: the swept kernel's "
                        "own GPU time, from the profiler")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")

    import torch
    import torch.profiler
    import triton.testing
    from hf_flash.kernels import _backward, _forward, _tuning, flash_attention

    if not torch.cuda.is_available():
        raise SystemExit("sweep_configs.py times GPU kernels: no CUDA device here")
    configs = parse_configs(args.configs) or list(
        _forward._FWD_CONFIGS if args.kernel == "fwd" else _backward._BWD_CONFIGS)
    target = KERNELS[args.kernel]
    tuned_pick = _tuning._pick
    held = {}  # the other kernels' picks, per case: tuned once, then held
    forced = {}

    def pick(kernel, cands, grid, call_args, constexprs, outputs=()):
        if kernel.__name__ == target:
            return forced["cfg"]
        if kernel.__name__ not in held:
            held[kernel.__name__] = tuned_pick(kernel, cands, grid, call_args, constexprs, outputs)
        return held[kernel.__name__]

    _tuning._pick = pick
    _tuning.worth_tuning = lambda key: True  # the short cases too: their class is forced anyway

    def use(cfg):
        # The chosen-config, compiled-kernel and plan caches are keyed by shape, not by config.
        forced["cfg"] = cfg
        _tuning._CHOSEN.clear()
        _tuning._COMPILED.clear()
        _tuning._PLANS.clear()

    benchlib.warm_up_gpu()

    meta = benchlib.run_metadata(args)
    out_dir = benchlib.output_dir(args.out, False)
    stem = (f"sweep_configs_{args.kernel}" + ("_kernel" if args.timer == "kernel" else "")
            + (f"_{args.tag}" if args.tag else ""))
    rows, body = [], []
    for name in cases:
        B, H, N, D, causal, p_drop = CASES[name]
        held.clear()
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
                   .requires_grad_() for _ in range(3))
        do = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
        state = {}

        def prepare(cfg):
            use(cfg)
            torch.manual_seed(1)  # the same dropout mask for every config
            o = flash_attention(q, k, v, is_causal=causal, dropout_p=p_drop)
            if args.kernel == "fwd":
                state["fn"] = lambda: flash_attention(q, k, v, is_causal=causal, dropout_p=p_drop)
                return o.detach().float()
            grads = torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
            state["fn"] = lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
            return [t.float() for t in grads]

        ok, ref = [], None
        for cfg in configs:  # compile each once (Triton keeps it), check it against the first
            try:
                got = prepare(cfg)
            except Exception as e:
                if not _tuning.out_of_resources(e):
                    raise
                print(f"{name} {label(cfg)}: does not fit ({benchlib.short_reason(e)})", flush=True)
                continue
            got = got if isinstance(got, list) else [got]
            ref = ref or got
            err = max(((a - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                      for a, r in zip(got, ref))
            ok.append((cfg, err))
        def timed():
            if args.timer == "bench":
                return triton.testing.do_bench(state["fn"], warmup=20, rep=args.rep,
                                               return_mode="median")
            t0 = time.perf_counter()
            for _ in range(20):  # warm-up, and a guess at the call's time
                state["fn"]()
            torch.cuda.synchronize()
            calls = max(5, int(args.rep / 1000 / ((time.perf_counter() - t0) / 20)))
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    state["fn"]()
                torch.cuda.synchronize()
            return kernel_ms(prof.key_averages(), target)

        times = {label(c): [] for c, _ in ok}
        for _ in range(args.rounds):
            for cfg, _ in ok:
                prepare(cfg)
                times[label(cfg)].append(timed())
        for cfg, err in ok:
            row, line = result_row(name, args.kernel, cfg, times[label(cfg)], err)
            rows.append(row)
            body.append(line)
        benchlib.write_results(out_dir, stem, meta, rows)
    what = "forward" if args.kernel == "fwd" else "backward"
    if args.timer == "kernel":
        what = f"{target}'s GPU"
    print(f"\n{what} ms with {args.kernel}'s config forced (median of {args.rounds} interleaved "
          f"rounds; spread: slowest round over fastest; diff: max relative difference of the "
          f"outputs against the first config)")
    print(benchlib.table(["case", args.kernel + " config", "ms", "rounds", "spread", "diff"], body))
    wide = unsteady(rows)
    if wide:
        print(f"rounds more than 5 % apart in {', '.join(wide)}: the host or the machine moved "
              f"under the timing there (a host-bound call times the host); compare only rows "
              f"whose rounds agree")
    print(f"results: {out_dir / stem}.csv and .json")


if __name__ == "__main__":
    main()
