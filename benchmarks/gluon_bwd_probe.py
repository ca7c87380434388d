"""How fast can attention's dK/dV run on Hopper with its warps specialised by hand?

With the Gluon forward (kernels/_forward_hopper.py) the long bar rows are behind cudnn only in the
backward (B4 H32 N4096 D128: 7.3 ms against 5.2). hf_flash's backward is two Triton kernels, dK/dV
and dQ, each recomputing the scores; this probe is the dK/dV one in Gluon, in the forward's shape:
a producer warp loads Q and dO tiles by TMA into a ring of two buffers, and two consumer warp
groups each own 64 of the block's 128 key rows, holding K, V and their dK, dV accumulators. Per
query tile a group computes

    S^T = K Q^T, dP^T = V dO^T          (both issued, then S^T waited for)
    P^T = exp2(S^T * c - lse)           (while dP^T runs)
    dS^T = P^T * (dP^T - delta)
    dV += P^T dO, dK += dS^T Q          (P^T and dS^T from registers)

and with PINGPONG the two groups take turns at issuing their products, as the forward's do. Plain
case only (no masks, no dropout, N a multiple of 128), bf16; lse and delta come from PyTorch.
Each variant's dK and dV are checked against PyTorch's autograd in fp32 (outputs poisoned first)
and timed beside hf_flash's dK/dV kernel (its GPU time in a profile of hf_flash's backward) and
cudnn's whole backward:

    python3 benchmarks/gluon_bwd_probe.py [--out DIR]

An experiment, not a kernel of hf_flash. Its first GPU run (H200, Triton 3.6, at c0d0f28:
benchmarks/results/h200/experiments/gluon_bwd_probe_c0d0f28.json) was exact, and without
ping-pong the faster: 3.79 ms against 4.20 for hf_flash's dK/dV kernel at B4 H32 N4096 D128. That
variant became kernels/_backward_hopper.py.
"""

import argparse
import json
import math
import os
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_tma_store = tma.async_store if hasattr(tma, "async_store") else tma.async_copy_shared_to_global

NUM_BUF = gl.constexpr(2)  # Q/dO buffers: tile i in use, i + 1 loading


@gluon.jit
def _bwd_producer(q_desc, do_desc, q_smem, do_smem, ready, free, row0, n_tiles,
                  BLOCK_M: gl.constexpr, D: gl.constexpr):
    tile_bytes: gl.constexpr = 2 * BLOCK_M * D * q_desc.dtype.primitive_bitwidth // 8
    for i in range(0, n_tiles):
        buf = i % NUM_BUF
        mbarrier.wait(free.index(buf), phase=((i // NUM_BUF) + 1) & 1, pred=i >= NUM_BUF)
        mbarrier.expect(ready.index(buf), tile_bytes)
        _tma_load(q_desc, [row0 + i * BLOCK_M, 0], ready.index(buf), q_smem.index(buf))
        _tma_load(do_desc, [row0 + i * BLOCK_M, 0], ready.index(buf), do_smem.index(buf))


@gluon.jit
def _bwd_consumer(dk_desc, dv_desc, k_smem, v_smem, q_smem, do_smem, kv_bar, ready, free, my_turn,
                  their_turn, LSE, DELTA, row0, kv_row, n_tiles, qk_scale, sm_scale,
                  FIRST_GROUP: gl.constexpr, PINGPONG: gl.constexpr, GROUP_N: gl.constexpr,
                  BLOCK_M: gl.constexpr, D: gl.constexpr):
    dtype: gl.constexpr = dk_desc.dtype
    # One warp group: 4 warps x 16 key rows.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, D, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    s_zero = gl.zeros([GROUP_N, BLOCK_M], gl.float32, layout=s_layout)
    dk = gl.zeros([GROUP_N, D], gl.float32, layout=acc_layout)
    dv = gl.zeros([GROUP_N, D], gl.float32, layout=acc_layout)
    offs_m = gl.arange(0, BLOCK_M, layout=col_s)
    mbarrier.wait(kv_bar, phase=0)
    for i in range(0, n_tiles):
        buf = i % NUM_BUF
        mbarrier.wait(ready.index(buf), phase=(i // NUM_BUF) & 1)
        if PINGPONG:
            if FIRST_GROUP:
                mbarrier.wait(my_turn, phase=(i + 1) & 1, pred=i >= 1)
            else:
                mbarrier.wait(my_turn, phase=i & 1)
        q = q_smem.index(buf)
        do = do_smem.index(buf)
        st = warpgroup_mma(k_smem, q.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dpt = warpgroup_mma(v_smem, do.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        rows = row0 + i * BLOCK_M + offs_m
        lse = gl.load(LSE + rows)
        delta = gl.load(DELTA + rows)
        st = warpgroup_mma_wait(num_outstanding=1, deps=(st,))
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))
        dpt = warpgroup_mma_wait(num_outstanding=0, deps=(dpt,))
        dst = pt * (dpt - gl.expand_dims(delta, 0))
        dv = warpgroup_mma(gl.convert_layout(pt.to(dtype), a_layout), do, dv, is_async=True)
        dk = warpgroup_mma(gl.convert_layout(dst.to(dtype), a_layout), q, dk, is_async=True)
        if PINGPONG:
            mbarrier.arrive(their_turn)
        dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
        mbarrier.arrive(free.index(buf))
    # K's and V's buffers stage dK and dV for the TMA stores.
    k_smem.store((dk * sm_scale).to(dtype))
    v_smem.store(dv.to(dtype))
    fence_async_shared()
    _tma_store(dk_desc, [kv_row, 0], k_smem)
    _tma_store(dv_desc, [kv_row, 0], v_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def _probe_dkdv(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, LSE, DELTA, N, qk_scale,
                sm_scale, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, D: gl.constexpr,
                PINGPONG: gl.constexpr, WORKER_REGS: gl.constexpr, num_warps: gl.constexpr):
    # k/v/dk/dv descriptors' blocks are one group's key rows (BLOCK_N // 2).
    GROUP_N: gl.constexpr = BLOCK_N // 2
    dtype: gl.constexpr = q_desc.dtype
    bh = gl.program_id(1)
    row0 = bh * N  # this (batch, head)'s first row in the (B*H*N, D) views
    kv_row = row0 + gl.program_id(0) * BLOCK_N
    k_smem = gl.allocate_shared_memory(dtype, [2, GROUP_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, GROUP_N, D], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_M, D], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_M, D], do_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for j in gl.static_range(NUM_BUF):
        mbarrier.init(ready.index(j), count=1)
        mbarrier.init(free.index(j), count=2)  # both groups release a buffer
    for j in gl.static_range(2):
        mbarrier.init(turn.index(j), count=1)
    fence_async_shared()
    mbarrier.expect(kv_bar, 2 * BLOCK_N * D * dtype.primitive_bitwidth // 8)
    for g in gl.static_range(2):
        _tma_load(k_desc, [kv_row + g * GROUP_N, 0], kv_bar, k_smem.index(g))
        _tma_load(v_desc, [kv_row + g * GROUP_N, 0], kv_bar, v_smem.index(g))
    n_tiles = N // BLOCK_M
    gl.warp_specialize([
        (_bwd_consumer, (dk_desc, dv_desc, k_smem.index(0), v_smem.index(0), q_smem, do_smem,
                         kv_bar, ready, free, turn.index(0), turn.index(1), LSE, DELTA, row0,
                         kv_row, n_tiles, qk_scale, sm_scale, True, PINGPONG, GROUP_N, BLOCK_M,
                         D)),
        (_bwd_consumer, (dk_desc, dv_desc, k_smem.index(1), v_smem.index(1), q_smem, do_smem,
                         kv_bar, ready, free, turn.index(1), turn.index(0), LSE, DELTA, row0,
                         kv_row + GROUP_N, n_tiles, qk_scale, sm_scale, False, PINGPONG, GROUP_N,
                         BLOCK_M, D)),
        (_bwd_producer, (q_desc, do_desc, q_smem, do_smem, ready, free, row0, n_tiles, BLOCK_M,
                         D)),
    ], [4, 1], WORKER_REGS)


def _desc(t, block):
    flat = t.reshape(-1, t.shape[-1])
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), block, layout)


def probe(q, k, v, do, lse2, delta, block_m=64, pingpong=True, worker_regs=(240, 24)):
    """Launch closure and (dk, dv) outputs for contiguous bf16 (B, H, N, D) inputs. lse2: the base-2
    log-sum-exp of the scaled scores, delta: rowsum(dO * O), both fp32 (B, H, N)."""
    b, h, n, d = q.shape
    block_n = 128
    assert n % block_n == 0 and n % block_m == 0
    dk, dv = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    scale = 1.0 / math.sqrt(d)
    descs = (_desc(q, [block_m, d]), _desc(k, [block_n // 2, d]), _desc(v, [block_n // 2, d]),
             _desc(do, [block_m, d]), _desc(dk, [block_n // 2, d]), _desc(dv, [block_n // 2, d]))

    def call():
        _probe_dkdv[(n // block_n, b * h)](*descs, lse2, delta, n, scale * 1.4426950408889634,
                                           scale, BLOCK_N=block_n, BLOCK_M=block_m, D=d,
                                           PINGPONG=pingpong, WORKER_REGS=worker_regs,
                                           num_warps=4)
    return (dk, dv), call


# name: (query rows per tile, PINGPONG, WORKER_REGS). 128-row query tiles spill (400 bytes at
# head dim 64, 696 at 128, compiled for sm_90 with Triton 3.9): not listed.
VARIANTS = {
    "m64 pp r240/24": (64, True, (240, 24)),
    "m64 r240/24": (64, False, (240, 24)),
}


def compile_only():
    """Compile every variant for sm_90 at head dims 64 and 128 (no GPU needed)."""
    import re
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    import compile_kernels as ck
    for d in (64, 128):
        for name, (block_m, pingpong, regs) in VARIANTS.items():
            def desc(rows):
                layout = gl.NVMMASharedLayout.get_default_for([rows, d], gl.bfloat16)
                return f"tensordesc<bf16[{rows},{d}],{layout!r}>"
            sig = {"q_desc": desc(block_m), "k_desc": desc(64), "v_desc": desc(64),
                   "do_desc": desc(block_m), "dk_desc": desc(64), "dv_desc": desc(64),
                   "LSE": "*fp32", "DELTA": "*fp32", "N": "i32", "qk_scale": "fp32",
                   "sm_scale": "fp32"}
            cx = {"BLOCK_N": 128, "BLOCK_M": block_m, "D": d, "PINGPONG": pingpong,
                  "WORKER_REGS": regs, "num_warps": 4}
            sig.update({key: "constexpr" for key in cx})
            names = list(sig)
            src = GluonASTSource(_probe_dkdv, signature=sig,
                                 constexprs={(names.index(key),): val for key, val in cx.items()},
                                 attrs={})
            try:
                c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                   options={"num_warps": 4})
                nreg = re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", c.asm["ptx"])
                print(f"D{d} {name}: registers / stack {ck.registers(c)}, shared "
                      f"{c.metadata.shared} B, setmaxnreg {sorted(set(nreg))}")
            except Exception as e:
                lines = [ln for ln in str(e).splitlines() if "error" in ln.lower()]
                print(f"D{d} {name}: does not compile: {(lines or [str(e)])[0][:200]}")


SHAPES = ((4, 32, 4096, 128), (1, 16, 16384, 64), (32, 16, 512, 64))  # (B, H, N, D)


def make_case(b, h, n, d):
    """Seeded bf16 (B, H, N, D) q, k, v and dO on the GPU, with the fp32 reference: the base-2 lse
    of the scaled scores, delta = rowsum(dO * O) with O rounded to bf16 as a forward stores it,
    and (dQ, dK, dV) by autograd."""
    g = torch.Generator(device="cuda").manual_seed(n + d)
    q, k, v, do = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(4))
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    s = qf @ kf.transpose(-1, -2) / math.sqrt(d)
    out = torch.softmax(s, -1) @ vf
    out.backward(do.float())
    lse2 = (torch.logsumexp(s.detach(), -1) * 1.4426950408889634).contiguous()
    delta = (do.float() * out.detach().to(torch.bfloat16).float()).sum(-1).contiguous()
    return (q, k, v, do), lse2, delta, (qf.grad, kf.grad, vf.grad)


def report(rows, out_dir, name, title):
    """Write `rows` with the run's versions to OUT_DIR/NAME.json (if given) and print a table: ms
    and each relative error (rel_err_* keys) per shape and kernel."""
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "git_sha": os.environ.get("GIT_SHA", "")}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\nTriton {triton.__version__}, {meta['gpu']}: {title}")
    for r in rows:
        shape = f"B{r['b']} H{r['h']} N{r['n']} D{r['d']}"
        if "error" in r:
            print(f"{shape:22} {r['impl']:30} {r['error']}")
        else:
            errs = "".join(f"  {key[len('rel_err_'):]} err {r[key]:.2e}" for key in r
                           if key.startswith("rel_err_"))
            print(f"{shape:22} {r['impl']:30} {r['ms']:7.3f}{errs}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="", help="folder for gluon_bwd_probe.json")
    p.add_argument("--compile-only", action="store_true", help="compile for sm_90 and stop")
    args = p.parse_args()
    if args.compile_only:
        return compile_only()
    if not torch.cuda.is_available():
        sys.exit("gluon_bwd_probe: needs a CUDA GPU (or --compile-only)")
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import hf_flash
    sys.path.insert(0, os.path.dirname(__file__))
    from sweep_configs import kernel_ms
    rows = []
    for (b, h, n, d) in SHAPES:
        (q, k, v, do), lse2, delta, (_, *ref) = make_case(b, h, n, d)
        flops = 4 * 2 * b * h * n * n * d  # dK/dV's four products of 2 N^2 D each
        base = {"b": b, "h": h, "n": n, "d": d}

        # hf_flash: its dK/dV kernel's GPU time, from a profile of its backward.
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
        o = hf_flash.flash_attention(qg, kg, vg)
        o.backward(do, retain_graph=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                o.backward(do, retain_graph=True)
            torch.cuda.synchronize()
        events = prof.key_averages()
        for impl, kernel in (("hf_flash dK/dV kernel", "_bwd_dkdv_kernel"),
                             ("hf_flash dQ kernel", "_bwd_dq_kernel")):
            rows.append({**base, "impl": impl, "ms": kernel_ms(events, kernel)})
        for r in rows[-2:]:
            print(r, flush=True)

        def cudnn_bwd():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                oc = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg)
            return oc

        oc = cudnn_bwd()
        ms = triton.testing.do_bench(lambda: oc.backward(do, retain_graph=True), warmup=25,
                                     rep=100, return_mode="median")
        rows.append({**base, "impl": "cudnn backward (dQ, dK, dV)", "ms": ms})
        print(rows[-1], flush=True)
        for name, (block_m, pingpong, regs) in VARIANTS.items():
            row = {**base, "impl": f"gluon dK/dV {name}"}
            try:
                (dk, dv), call = probe(q, k, v, do, lse2, delta, block_m, pingpong, regs)
                call()
                torch.cuda.synchronize()
                row["rel_err_dk"] = ((dk.float() - ref[0]).norm() / ref[0].norm()).item()
                row["rel_err_dv"] = ((dv.float() - ref[1]).norm() / ref[1].norm()).item()
                row["ms"] = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
                row["tflops"] = flops / row["ms"] * 1e-9
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            print(row, flush=True)
        del q, k, v, do, ref, qg, kg, vg, o, oc
    report(rows, args.out, "gluon_bwd_probe", "backward pieces, bf16, non-causal; ms")


if __name__ == "__main__":
    main()
