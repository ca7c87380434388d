"""Does Triton's warp-specialised loop compute attention correctly on this GPU?

A minimal attention forward, written for this question alone: no masks, no dropout, no bounds
(N a multiple of both tiles), one loop over the keys, K and V through pointer loads or device-side
tensor descriptors (TMA), and `tl.range(..., warp_specialize=WS)`. Each variant is checked against
PyTorch (fp32 softmax of the same bf16 inputs) and timed with do_bench. hf_flash's own forward gave
wrong outputs under warp specialisation with Triton 3.6 and 3.9 on an H200 (docs/perf-notes.md);
this says whether a kernel without any of hf_flash's features does too, so that the fault can be
placed, and a later Triton checked in one run:

    python3 benchmarks/ws_repro.py [--out DIR]

Prints one row per variant (error relative to PyTorch, ms, TFLOP/s) and writes them as JSON.
"""

import argparse
import json
import math
import os
import sys

import torch
import triton
import triton.language as tl
import triton.testing


@triton.jit
def _attn_fwd(Q, K, V, O, N, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, WS: tl.constexpr, TMA: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    base = tl.program_id(1).to(tl.int64) * N * D  # (batch x head) rows of N x D, contiguous
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    if TMA:
        # Q through a descriptor too: with Q from a pointer load, Triton's warp-specialisation
        # pass stops (its producer-commit lowering: an assertion in Triton 3.6, "unsupported
        # load type for producer commit" in 3.9), as the pointer-load rows below show.
        q_desc = tl.make_tensor_descriptor(Q + base, shape=[N, D], strides=[D, 1],
                                           block_shape=[BLOCK_M, D])
        q = q_desc.load([start_m, 0])
        k_desc = tl.make_tensor_descriptor(K + base, shape=[N, D], strides=[D, 1],
                                           block_shape=[BLOCK_N, D])
        v_desc = tl.make_tensor_descriptor(V + base, shape=[N, D], strides=[D, 1],
                                           block_shape=[BLOCK_N, D])
    else:
        q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start_n in tl.range(0, N, BLOCK_N, warp_specialize=WS):
        if TMA:
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
        else:
            rows = (start_n + offs_n)[:, None] * D + offs_d[None, :]
            k = tl.load(K + base + rows)
            v = tl.load(V + base + rows)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    tl.store(O + base + offs_m[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))


def _scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def run_variant(q, k, v, ref, block_m, block_n, warps, stages, ws, tma):
    bh, n, d = q.shape
    o = torch.full_like(q, float("nan"))  # poisoned: an unwritten element shows
    scale = 1.0 / math.sqrt(d) * 1.4426950408889634

    def call():
        _attn_fwd[(n // block_m, bh)](q, k, v, o, n, scale, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
                                      WS=ws, TMA=tma, num_warps=warps, num_stages=stages)

    try:
        call()
        torch.cuda.synchronize()
    except Exception as e:  # a variant Triton cannot build is a row, not the end of the run
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    err = ((o.float() - ref).norm() / ref.norm()).item()
    # Where the error is NaN: how much of the output is not finite (the poison left unwritten,
    # or NaN computed), and the error over the finite rest.
    finite = torch.isfinite(o).all(-1)
    bad_rows = 1.0 - finite.float().mean().item()
    err_finite = (((o.float() - ref)[finite]).norm() / ref[finite].norm()).item() if finite.any() else float("nan")
    ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
    flops = 4 * bh * n * n * d
    return {"rel_err": err, "nonfinite_rows": bad_rows, "rel_err_finite_rows": err_finite, "ms": ms,
            "tflops": flops / ms * 1e-9}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="", help="folder for ws_repro.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ws_repro: needs a CUDA GPU")
    triton.set_allocator(_scratch)  # device-side descriptors take their scratch from here
    rows = []
    for d, bh, n in ((64, 64, 4096), (128, 128, 4096)):
        g = torch.Generator(device="cuda").manual_seed(d)
        q, k, v = (torch.randn(bh, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        ref = torch.softmax(q.float() @ k.float().transpose(1, 2) / math.sqrt(d), -1) @ v.float()
        # 8 warps without WS: two warp groups of 64 rows. With WS Triton adds a producer warp
        # and splits the 128 rows between consumer groups itself (num_warps: one group's).
        # With 8 warps Triton 3.6 and 3.9 leave warp_specialize out without a word (compiled for
        # sm_90 on a CPU: no warp_specialize op, no setmaxnreg); the row says what that costs.
        for block_n, warps, stages, ws, tma in ((64, 8, 3, False, False), (64, 8, 3, False, True),
                                                (64, 4, 3, True, True), (64, 4, 2, True, True),
                                                (128, 4, 2, True, True), (64, 4, 3, True, False),
                                                (64, 8, 3, True, True)):
            r = run_variant(q, k, v, ref, 128, block_n, warps, stages, ws, tma)
            r.update(d=d, bh=bh, n=n, block_m=128, block_n=block_n, warps=warps, stages=stages,
                     ws=ws, tma=tma)
            rows.append(r)
            print(r, flush=True)
        del q, k, v, ref
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "git_sha": os.environ.get("GIT_SHA", "")}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tag = triton.__version__.replace(".", "")
        with open(os.path.join(args.out, f"ws_repro_triton{tag}.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\nTriton {triton.__version__}, {meta['gpu']}: rel. error vs PyTorch fp32, ms, TFLOP/s")
    print(f"{'D':>4} {'tile':>8} {'warps':>5} {'st':>3} {'WS':>3} {'TMA':>3} {'rel_err':>9} {'ms':>7} {'TF/s':>6}"
          f" {'bad rows':>8} {'err, rest':>9}")
    for r in rows:
        head = (f"{r['d']:>4} {r['block_m']:>4}x{r['block_n']:<3} {r['warps']:>5} {r['stages']:>3} "
                f"{'y' if r['ws'] else 'n':>3} {'y' if r['tma'] else 'n':>3}")
        if "error" in r:
            print(f"{head} {r['error']}")
        else:
            print(f"{head} {r['rel_err']:9.2e} {r['ms']:7.3f} {r['tflops']:6.0f}"
                  f" {r['nonfinite_rows']:8.1%} {r['rel_err_finite_rows']:9.2e}")


if __name__ == "__main__":
    main()
