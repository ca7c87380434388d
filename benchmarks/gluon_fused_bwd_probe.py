"""Can one Gluon kernel compute dK, dV and dQ, running five matrix products per tile pair?

hf_flash's backward on Hopper is the Gluon dK/dV kernel (kernels/_backward_hopper.py, four
products per tile pair: S^T, dP^T, dV, dK) and Triton's dQ kernel, which recomputes S and dP for
a third product: seven products where cudnn's backward runs five. At B4 H32 N4096 D128 (H200) the
pair took 3.79 + 2.96 ms against cudnn's 5.69 ms for the whole backward
(benchmarks/gluon_bwd_probe.py). This probe adds the fifth product to the dK/dV kernel, as
FlashAttention-3 does: dS^T, already in registers, goes to shared memory, and per query tile

    dQ_tile += dS K        (dS = the two groups' dS^T tiles, transposed, 64 queries x 128 keys)

is added into an fp32 dQ in global memory by TMA reductions (`tma.async_atomic_add`: a bulk
add of a shared-memory tile, done by the copy engine near L2). The two consumer groups each hold
64 of the block's 128 keys, so a tile's dQ needs both groups' dS: they meet at an mbarrier per
tile (ds_ready, two buffers). The product is shared between them:

- DQ_MODE 0 (head dim 128): each group computes half of dQ's columns, over all 128 keys (two
  products of 64 keys, its K slices of 64 columns), 32 registers a thread;
- DQ_MODE 1 (head dim 64, whose 32-column slices would cut a 128-byte swizzle row): the groups
  take turns, each computing the whole 64 x 64 tile on every other query tile.

dK's product reads dS^T from shared memory too, which spares the registers of its operand. dQ's
fp32 sum is then scaled and rounded by PyTorch (in hf_flash, a small kernel). Its TMA traffic is
the price: each key block adds N x D x 4 bytes per head, 8.6 GB at D128 4k (the Triton atomic dQ
of docs/perf-notes.md, "Atomic dQ", moved twice that with 64-key blocks and was 20 % slower).
Unlike hf_flash's backward it is not deterministic: the adds land in any order.

Prediction (D128 4k): the four products of the dK/dV kernel ran at 581 TF/s; a fifth at that
rate gives 4.7 ms for the backward, about 1.3 ms less than hf_flash's 6.7 and level with cudnn,
if the reductions (8.6 GB) hide behind the products.

Plain case (no masks, N a multiple of 128), bf16, lse and delta from PyTorch. Needs a Triton
whose Gluon has `tma.async_atomic_add` (3.9 has it; the GPU image's 3.6 has not: carry a newer
Triton). dQ, dK and dV are checked against fp32 autograd (outputs poisoned first) and timed
beside hf_flash's whole backward and cudnn's:

    python3 benchmarks/gluon_fused_bwd_probe.py [--out DIR]
    python3 benchmarks/gluon_fused_bwd_probe.py --compile-only    # sm_90, no GPU needed

An experiment, not a kernel of hf_flash. Compiled for sm_90 on the CPU; not yet run on a GPU
when written.
"""

import argparse
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gluon_bwd_probe import (NUM_BUF, SHAPES, _bwd_producer, _desc, _tma_load,  # noqa: E402
                             _tma_store, make_case, report)

HAS_TMA_ADD = hasattr(tma, "async_atomic_add")


@gluon.jit
def _add_dq(dq, dq_desc, dq_smem, row, col):
    """Add a dQ tile into the fp32 sum in global memory through shared memory (a TMA reduction)."""
    tma.store_wait(pendings=0)  # the last reduction has read dq_smem
    dq_smem.store(dq)
    fence_async_shared()
    tma.async_atomic_add(dq_desc, [row, col], dq_smem)


@gluon.jit
def _fused_consumer(dk_desc, dv_desc, dq_desc, k_all, q_smem, do_smem, ds_smem, dq_smem, kv_bar,
                    ready, free, ds_ready, LSE, DELTA, row0, kv_row, n_tiles, qk_scale, sm_scale,
                    G: gl.constexpr, DQ_MODE: gl.constexpr, GROUP_N: gl.constexpr,
                    BLOCK_M: gl.constexpr, D: gl.constexpr, DQ_N: gl.constexpr):
    dtype: gl.constexpr = dk_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, D, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DQ_N, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    s_zero = gl.zeros([GROUP_N, BLOCK_M], gl.float32, layout=s_layout)
    dq_zero = gl.zeros([BLOCK_M, DQ_N], gl.float32, layout=dq_layout)
    dk = gl.zeros([GROUP_N, D], gl.float32, layout=acc_layout)
    dv = gl.zeros([GROUP_N, D], gl.float32, layout=acc_layout)
    offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
    k = k_all.index(G)
    v = k_all.index(2 + G)  # k_all holds K's two halves, then V's
    if DQ_MODE == 0:
        # This group's columns of K, for dQ's columns G * DQ_N ...
        kq0 = k_all.index(0).slice(G * DQ_N, DQ_N, dim=1)
        kq1 = k_all.index(1).slice(G * DQ_N, DQ_N, dim=1)
    else:
        kq0 = k_all.index(0)
        kq1 = k_all.index(1)
    mbarrier.wait(kv_bar, phase=0)
    for i in range(0, n_tiles):
        buf = i % NUM_BUF
        mbarrier.wait(ready.index(buf), phase=(i // NUM_BUF) & 1)
        q = q_smem.index(buf)
        do = do_smem.index(buf)
        st = warpgroup_mma(k, q.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dpt = warpgroup_mma(v, do.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        rows = row0 + i * BLOCK_M + offs_m
        lse = gl.load(LSE + rows)
        delta = gl.load(DELTA + rows)
        st = warpgroup_mma_wait(num_outstanding=1, deps=(st,))
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))
        dpt = warpgroup_mma_wait(num_outstanding=0, deps=(dpt,))
        dst = pt * (dpt - gl.expand_dims(delta, 0))
        # dS^T to shared memory: dK's A operand here, and with the other group's, dQ's.
        dsb = i % 2
        ds_mine = ds_smem.index(dsb * 2 + G)
        ds_mine.store(dst.to(dtype))
        fence_async_shared()
        mbarrier.arrive(ds_ready.index(dsb))
        dv = warpgroup_mma(gl.convert_layout(pt.to(dtype), a_layout), do, dv, is_async=True)
        dk = warpgroup_mma(ds_mine, q, dk, is_async=True)
        mbarrier.wait(ds_ready.index(dsb), phase=(i // 2) & 1)
        # dQ_tile = dS K over both groups' keys: dS^T tiles transposed (A from shared memory,
        # MN-major), K's rows of each half.
        if DQ_MODE == 0:
            dq = warpgroup_mma(ds_smem.index(dsb * 2).permute((1, 0)), kq0, dq_zero,
                               use_acc=False, is_async=True)
            dq = warpgroup_mma(ds_smem.index(dsb * 2 + 1).permute((1, 0)), kq1, dq,
                               is_async=True)
            dv, dk, dq = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, dq))
            mbarrier.arrive(free.index(buf))
            _add_dq(dq, dq_desc, dq_smem, row0 + i * BLOCK_M, G * DQ_N)
        else:
            # (A branch taken at run time cannot hold products in flight: dK and dV first.)
            dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
            mbarrier.arrive(free.index(buf))
            if (i % 2) == G:
                dq = warpgroup_mma(ds_smem.index(dsb * 2).permute((1, 0)), kq0, dq_zero,
                                   use_acc=False, is_async=True)
                dq = warpgroup_mma(ds_smem.index(dsb * 2 + 1).permute((1, 0)), kq1, dq,
                                   is_async=True)
                dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq,))
                _add_dq(dq, dq_desc, dq_smem, row0 + i * BLOCK_M, 0)
    tma.store_wait(pendings=0)
    # K's and V's buffers stage dK and dV (every product that reads K is done: the last
    # ds_ready wait follows both groups' last dS, and this group's dQ products are waited).
    # The other group may still read this group's K half for its last dQ: meet first.
    mbarrier.arrive(ds_ready.index(n_tiles % 2))
    mbarrier.wait(ds_ready.index(n_tiles % 2), phase=(n_tiles // 2) & 1)
    k.store((dk * sm_scale).to(dtype))
    v.store(dv.to(dtype))
    fence_async_shared()
    _tma_store(dk_desc, [kv_row, 0], k)
    _tma_store(dv_desc, [kv_row, 0], v)
    tma.store_wait(pendings=0)


@gluon.jit
def _probe_fused(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, dq_desc, LSE, DELTA, N,
                 qk_scale, sm_scale, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                 D: gl.constexpr, DQ_MODE: gl.constexpr, WORKER_REGS: gl.constexpr,
                 num_warps: gl.constexpr):
    GROUP_N: gl.constexpr = BLOCK_N // 2
    DQ_N: gl.constexpr = D // 2 if DQ_MODE == 0 else D
    dtype: gl.constexpr = q_desc.dtype
    bh = gl.program_id(1)
    row0 = bh * N
    kv_row = row0 + gl.program_id(0) * BLOCK_N
    k_all = gl.allocate_shared_memory(dtype, [4, GROUP_N, D], k_desc.layout)  # K0 K1 V0 V1
    q_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_M, D], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_M, D], do_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([GROUP_N, BLOCK_M], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [4, GROUP_N, BLOCK_M], ds_layout)  # [buf, group]
    dq_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, DQ_N], dq_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for j in gl.static_range(NUM_BUF):
        mbarrier.init(ready.index(j), count=1)
        mbarrier.init(free.index(j), count=2)
    for j in gl.static_range(2):
        mbarrier.init(ds_ready.index(j), count=2)  # both groups' dS^T of a tile
    fence_async_shared()
    mbarrier.expect(kv_bar, 2 * BLOCK_N * D * dtype.primitive_bitwidth // 8)
    for g in gl.static_range(2):
        _tma_load(k_desc, [kv_row + g * GROUP_N, 0], kv_bar, k_all.index(g))
        _tma_load(v_desc, [kv_row + g * GROUP_N, 0], kv_bar, k_all.index(2 + g))
    n_tiles = N // BLOCK_M
    gl.warp_specialize([
        (_fused_consumer, (dk_desc, dv_desc, dq_desc, k_all, q_smem, do_smem, ds_smem,
                           dq_smem.index(0), kv_bar, ready, free, ds_ready, LSE, DELTA, row0,
                           kv_row, n_tiles, qk_scale, sm_scale, 0, DQ_MODE, GROUP_N, BLOCK_M, D,
                           DQ_N)),
        (_fused_consumer, (dk_desc, dv_desc, dq_desc, k_all, q_smem, do_smem, ds_smem,
                           dq_smem.index(1), kv_bar, ready, free, ds_ready, LSE, DELTA, row0,
                           kv_row + GROUP_N, n_tiles, qk_scale, sm_scale, 1, DQ_MODE, GROUP_N,
                           BLOCK_M, D, DQ_N)),
        (_bwd_producer, (q_desc, do_desc, q_smem, do_smem, ready, free, row0, n_tiles, BLOCK_M,
                         D)),
    ], [4, 1], WORKER_REGS)


def _dq_desc(t, block):
    flat = t.reshape(-1, t.shape[-1])
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.float32)
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), block, layout)


def dq_mode(d):
    return 0 if d == 128 else 1


def probe(q, k, v, do, lse2, delta, worker_regs=(240, 24)):
    """Launch closure and (dq, dk, dv) getters for contiguous bf16 (B, H, N, D) inputs; lse2 and
    delta as in gluon_bwd_probe.probe. dQ is summed in fp32 (zeroed by the closure)."""
    b, h, n, d = q.shape
    block_n, block_m = 128, 64
    assert n % block_n == 0
    mode = dq_mode(d)
    dq_n = d // 2 if mode == 0 else d
    dk, dv = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    dq_acc = torch.empty(b, h, n, d, device=q.device, dtype=torch.float32)
    scale = 1.0 / math.sqrt(d)
    descs = (_desc(q, [block_m, d]), _desc(k, [block_n // 2, d]), _desc(v, [block_n // 2, d]),
             _desc(do, [block_m, d]), _desc(dk, [block_n // 2, d]), _desc(dv, [block_n // 2, d]),
             _dq_desc(dq_acc, [block_m, dq_n]))

    def call():
        dq_acc.zero_()
        _probe_fused[(n // block_n, b * h)](*descs, lse2, delta, n, scale * 1.4426950408889634,
                                            scale, BLOCK_N=block_n, BLOCK_M=block_m, D=d,
                                            DQ_MODE=mode, WORKER_REGS=worker_regs, num_warps=4)
    return (lambda: (dq_acc * scale).to(q.dtype), lambda: dk, lambda: dv), call


VARIANTS = {"fused r240/24": (240, 24)}


def compile_only():
    """Compile the kernel for sm_90 at head dims 64 and 128 (no GPU needed)."""
    import re
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    import compile_kernels as ck
    for d in (64, 128):
        mode = dq_mode(d)
        dq_n = d // 2 if mode == 0 else d
        for name, regs in VARIANTS.items():
            def desc(rows, cols=d, dt=gl.bfloat16, ty="bf16"):
                layout = gl.NVMMASharedLayout.get_default_for([rows, cols], dt)
                return f"tensordesc<{ty}[{rows},{cols}],{layout!r}>"
            sig = {"q_desc": desc(64), "k_desc": desc(64), "v_desc": desc(64),
                   "do_desc": desc(64), "dk_desc": desc(64), "dv_desc": desc(64),
                   "dq_desc": desc(64, dq_n, gl.float32, "fp32"),
                   "LSE": "*fp32", "DELTA": "*fp32", "N": "i32", "qk_scale": "fp32",
                   "sm_scale": "fp32"}
            cx = {"BLOCK_N": 128, "BLOCK_M": 64, "D": d, "DQ_MODE": mode,
                  "WORKER_REGS": regs, "num_warps": 4}
            sig.update({key: "constexpr" for key in cx})
            names = list(sig)
            src = GluonASTSource(_probe_fused, signature=sig,
                                 constexprs={(names.index(key),): val for key, val in cx.items()},
                                 attrs={})
            try:
                c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                   options={"num_warps": 4})
                nreg = re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", c.asm["ptx"])
                print(f"D{d} {name}: registers / stack {ck.registers(c)}, shared "
                      f"{c.metadata.shared} B, setmaxnreg {sorted(set(nreg))}, "
                      f"bulk reduce {'cp.reduce.async.bulk' in c.asm['ptx']}")
            except Exception as e:
                lines = [ln for ln in str(e).splitlines() if "error" in ln.lower()]
                print(f"D{d} {name}: does not compile: {(lines or [str(e)])[0][:300]}")
                if os.environ.get("PROBE_VERBOSE"):
                    while e.__cause__ is not None or e.__context__ is not None:
                        e = e.__cause__ or e.__context__
                    print(type(e).__name__, str(e)[-2000:])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="", help="folder for gluon_fused_bwd_probe.json")
    p.add_argument("--compile-only", action="store_true", help="compile for sm_90 and stop")
    args = p.parse_args()
    if not HAS_TMA_ADD:
        sys.exit(f"gluon_fused_bwd_probe: Triton {triton.__version__}'s Gluon has no "
                 "tma.async_atomic_add (3.9 has it)")
    if args.compile_only:
        return compile_only()
    if not torch.cuda.is_available():
        sys.exit("gluon_fused_bwd_probe: needs a CUDA GPU (or --compile-only)")
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import hf_flash
    rows = []
    for (b, h, n, d) in SHAPES:
        (q, k, v, do), lse2, delta, ref = make_case(b, h, n, d)
        base = {"b": b, "h": h, "n": n, "d": d}
        flops = 5 * 2 * b * h * n * n * d  # the five products of 2 N^2 D each

        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
        o = hf_flash.flash_attention(qg, kg, vg)
        ms = triton.testing.do_bench(lambda: o.backward(do, retain_graph=True), warmup=25,
                                     rep=100, return_mode="median")
        rows.append({**base, "impl": "hf_flash backward", "ms": ms})
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            oc = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg)
        ms = triton.testing.do_bench(lambda: oc.backward(do, retain_graph=True), warmup=25,
                                     rep=100, return_mode="median")
        rows.append({**base, "impl": "cudnn backward", "ms": ms})
        for r in rows[-2:]:
            print(r, flush=True)
        for name, regs in VARIANTS.items():
            row = {**base, "impl": f"gluon fused {name}"}
            try:
                getters, call = probe(q, k, v, do, lse2, delta, regs)
                call()
                torch.cuda.synchronize()
                for label, get, r in zip(("dq", "dk", "dv"), getters, ref):
                    row[f"rel_err_{label}"] = ((get().float() - r).norm() / r.norm()).item()
                row["ms"] = triton.testing.do_bench(call, warmup=25, rep=100,
                                                    return_mode="median")
                row["tflops"] = flops / row["ms"] * 1e-9
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            print(row, flush=True)
        del q, k, v, do, ref, qg, kg, vg, o, oc
    report(rows, args.out, "gluon_fused_bwd_probe",
           "backward, bf16, non-causal; ms (the fused kernel's includes zeroing dQ's fp32 sum, "
           "not its final scaling)")


if __name__ == "__main__":
    main()
