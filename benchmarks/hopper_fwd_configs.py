"""Launch configs of the Gluon forward (kernels/_forward_hopper.py) at short sequences, where its
default (128-key tiles, one 384-thread program per SM) loses to the Triton forward.

Each config is checked first (bf16, odd lengths, causal top-left and bottom-right, grouped heads,
against PyTorch in fp32; output poisoned), then timed beside the Triton forward and cudnn on
model-shaped cases (do_bench medians, forward only):

    python3 benchmarks/hopper_fwd_configs.py [--out DIR]

What a config changes: PERSISTENT (one program per SM taking work items in turn, or one program
per item), PAIRED (causal query blocks taken in pairs of equal work), CARRY (an item's last P V
and epilogue overlapping the next item's first tile), LEAN_TILE0 (an item's first key tile masked
only where it must be), BLOCK_N (keys per tile), NUM_BUF (K/V
buffers), WORKER_REGS (setmaxnreg of the worker partitions) and maxnreg (the launch's registers
per thread: 80 lets two programs share an SM, 65536 / (80 x 384) = 2.1; no faster at e46ee33,
docs/perf-notes.md "v10").
"""

import argparse
import json
import os
import statistics
import sys

import torch
import triton.testing


CONFIGS = {
    "one per item": {"PERSISTENT": False, "PAIRED": False, "CARRY": False, "LEAN_TILE0": False},
    "persistent": {"PERSISTENT": True, "PAIRED": False, "CARRY": False, "LEAN_TILE0": False},
    "paired": {"PERSISTENT": True, "PAIRED": True, "CARRY": False, "LEAN_TILE0": False},
    "paired lean": {"PERSISTENT": True, "PAIRED": True, "CARRY": False, "LEAN_TILE0": True},
    "paired lean carry": {"PERSISTENT": True, "PAIRED": True, "CARRY": True, "LEAN_TILE0": True},
}
CASES = [  # (name, B, H, N, D, causal)
    ("bert B32 H16 N512 D64", 32, 16, 512, 64, False),
    ("gpt2 B16 H16 N1024 D64 causal", 16, 16, 1024, 64, True),
    ("B8 H16 N2048 D64", 8, 16, 2048, 64, False),
    ("B8 H16 N2048 D64 causal", 8, 16, 2048, 64, True),
    ("B1 H16 N16384 D64", 1, 16, 16384, 64, False),
    ("B16 H16 N1024 D128 causal", 16, 16, 1024, 128, True),
    ("B32 H16 N512 D128", 32, 16, 512, 128, False),
    ("B4 H32 N4096 D128", 4, 32, 4096, 128, False),
]


def check(config, head_dim):
    """Worst relative error of the config over odd shapes at one head dim (inf if a row was left
    unwritten)."""
    from hf_flash.kernels import _common, _forward_hopper as hop
    worst = 0.0
    for (b, h, hk, nq, nk, d, causal, offset) in (
            (2, 4, 2, 1000, 1000, 64, True, 0), (2, 4, 4, 129, 700, 64, False, 0),
            (1, 4, 4, 300, 1100, 128, True, 800), (2, 2, 1, 77, 77, 128, False, 0),
            # more work items than SMs: persistent programs take several each
            (8, 16, 8, 1000, 1000, 64, True, 0), (4, 16, 16, 1100, 900, 128, False, 0)):
        if d != head_dim:
            continue
        g = torch.Generator(device="cuda").manual_seed(nq + nk + d)
        q = torch.randn(b, h, nq, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(b, hk, nk, d, device="cuda", dtype=torch.bfloat16, generator=g)
                for _ in range(2))
        _common.POISON_OUTPUTS = True
        o, _ = hop.attention_forward(q, k, v, causal, offset, d ** -0.5, config)
        _common.POISON_OUTPUTS = False
        kk, vv = (t.repeat_interleave(h // hk, 1).float() for t in (k, v))
        mask = None
        if causal:
            mask = (torch.arange(nk, device="cuda")[None, :]
                    <= torch.arange(nq, device="cuda")[:, None] + offset)
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=mask)
        if not torch.isfinite(o).all():
            return float("inf")
        worst = max(worst, ((o.float() - ref).norm() / ref.norm()).item())
    return worst


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="")
    p.add_argument("--head-dims", default="64,128", help="comma-separated")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (median reported)")
    args = p.parse_args()
    dims = [int(x) for x in args.head_dims.split(",")]
    if not torch.cuda.is_available():
        sys.exit("hopper_fwd_configs: needs a CUDA GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from hf_flash.kernels import _forward, _forward_hopper as hop
    rows = []
    errors = {}
    for name, cfg in CONFIGS.items():
        for d in dims:
            try:
                errors[name, d] = check(cfg, d)
            except Exception as e:  # a config that does not compile or launch
                errors[name, d] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            print(name, d, errors[name, d], flush=True)
    for case, b, h, n, d, causal in CASES:
        if d not in dims:
            continue
        g = torch.Generator(device="cuda").manual_seed(n + d)
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
        scale = d ** -0.5

        def triton_fwd():
            hop.ENABLED = False
            try:
                return _forward.attention_forward(q, k, v, None, 0, None, None, None, causal, 0,
                                                  scale, 0.0, None)
            finally:
                hop.ENABLED = True

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

        impls = [("triton forward", triton_fwd), ("cudnn", cudnn)]
        impls += [(f"gluon {name}", (lambda c=cfg: hop.attention_forward(q, k, v, causal, 0,
                                                                         scale, c)))
                  for name, cfg in CONFIGS.items() if isinstance(errors[name, d], float)
                  and errors[name, d] < 1e-2]
        for _, fn in impls:
            fn()
        # Rounds, each timing every impl in turn: a drift of the GPU's clocks or of the host
        # meets all impls alike, and the spread of the rounds shows how far one timing is good.
        times = {impl: [] for impl, _ in impls}
        for _ in range(args.rounds):
            for impl, fn in impls:
                times[impl].append(triton.testing.do_bench(fn, warmup=10, rep=40,
                                                           return_mode="median"))
        for impl, _ in impls:
            ms = statistics.median(times[impl])
            rows.append({"case": case, "impl": impl, "ms": ms, "tflops": flops / ms * 1e-9,
                         "min_ms": min(times[impl]), "max_ms": max(times[impl]),
                         "rounds_ms": times[impl]})
            print(rows[-1], flush=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "git_sha": os.environ.get("GIT_SHA", ""),
            "configs": {k: {kk: list(vv) if isinstance(vv, tuple) else vv for kk, vv in c.items()}
                        for k, c in CONFIGS.items()},
            "check_rel_err": {f"{k[0]} D{k[1]}": v for k, v in errors.items()}}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "hopper_fwd_configs.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\nforward ms, median of {args.rounds} rounds (TFLOP/s) [min-max], bf16; checks (worst "
          "relative error):",
          {f"{k[0]} D{k[1]}": (f"{v:.1e}" if isinstance(v, float) else v[:40])
           for k, v in errors.items()})
    for r in rows:
        print(f"{r['case']:30} {r['impl']:25} {r['ms']:7.3f} ({r['tflops']:4.0f}) "
              f"[{r['min_ms']:.3f}-{r['max_ms']:.3f}]")


if __name__ == "__main__":
    main()
