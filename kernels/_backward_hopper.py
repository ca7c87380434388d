"""dK and dV for Hopper (sm_90) in Gluon, for the unmasked and causal cases.

_backward.py's dK/dV kernel, compiled by Triton for sm_90, waits for each product before the
elementwise work that follows it. Here the schedule is written out, in the forward's shape
(_forward_hopper.py):

- a producer warp loads the query and dO tiles (64 rows each) by TMA into a ring of buffers, for
  every query head that shares this program's K/V head (grouped-query attention);
- two consumer warp groups each own 64 of the program's 128 keys, holding their K and V tiles and
  their dK, dV accumulators. Per query tile a group issues S^T = K Q^T and dP^T = V dO^T
  together, rebuilds P^T = exp2(S^T c - lse) while dP^T is still on the tensor cores, forms
  dS^T = P^T (dP^T - delta), and issues dV += P^T dO and dK += dS^T Q from registers. The two
  groups run unsynchronised, so one group's exponentials overlap the other's products.

It rebuilds P from the lse that either forward saved (plane 0 of stats) and reads the delta that
_backward.py's dQ kernel writes, which runs first; the dQ kernel stays Triton's. Probed on an
H200 (bf16; benchmarks/gluon_bwd_probe.py): B4 H32 N4096 D128 in 3.79 ms against 4.20 for the
Triton dK/dV kernel, B1 H16 N16384 D64 4.49 against 4.73; at BERT's shape (N512) it was slower,
0.216 against 0.173 ms. A ping-pong between the groups, as the forward has, was slower here
(4.13 ms at D128). attention_backward checks `eligible` before the Triton kernel.
"""

import os

from . import _common
from ._hopper import AVAILABLE, config_from_env, descriptor, plain_call, tma_ok

if AVAILABLE:
    from ._hopper import (fence_async_shared, gl, gluon, mbarrier, tma, tma_load, tma_store,
                          warpgroup_mma, warpgroup_mma_wait)

# HF_FLASH_HOPPER_BWD=0 sends every dK/dV to _backward.py (for comparisons and bisection).
ENABLED = os.environ.get("HF_FLASH_HOPPER_BWD", "1") != "0"

BLOCK_N = 128  # keys per program: two consumer groups of 64
GROUP_N = BLOCK_N // 2
BLOCK_M = 64  # query rows per tile. 128 spills (S^T and dP^T would take 64 registers each)
# NUM_BUF: query/dO buffers (tile i in use, i + 1 loading). WORKER_REGS: registers per thread of
# the worker partitions (consumer group 1, producer) by setmaxnreg; group 0 takes what is left.
CONFIG = {"NUM_BUF": 2, "WORKER_REGS": (240, 24)}
# HF_FLASH_HOPPER_BWD_CONFIG='{"NUM_BUF": 3}' replaces entries (experiments).
CONFIG = config_from_env(CONFIG, "HF_FLASH_HOPPER_BWD_CONFIG")

# The shortest sequence (queries and keys) this kernel takes, per (head dim, causal): from the
# probe's three shapes (module docstring), where it was slower at N512. Every length it served
# in the sweep of 16M-token batches came out faster (H200, bf16, backward in ms, this kernel
# with Triton's dQ / Triton's two kernels;
# benchmarks/results/h200/experiments/ops_sweep_*_bwd_hopper_{on,off}_*.csv):
#   D64:  n=8192 7.51/8.02, 16384 15.14/16.01; causal 8192 4.01/4.35, 16384 7.75/8.47
#   D128: n=2048 1.75/1.96, 4096 3.31/3.75;    causal 2048 1.05/1.11, 4096 1.90/2.01
# Shorter lengths were not timed.
MIN_LENGTH = {(64, False): 8192, (64, True): 8192, (128, False): 2048, (128, True): 2048}


if AVAILABLE:
    @gluon.jit
    def _producer(q_desc, do_desc, q_smem, do_smem, ready, free, off_b, first_head, GROUP,
                  q_lo, n_tiles, BLOCK_M: gl.constexpr, D: gl.constexpr,
                  NUM_BUF: gl.constexpr):
        tile_bytes: gl.constexpr = 2 * BLOCK_M * D * q_desc.dtype.primitive_bitwidth // 8
        for g in range(0, GROUP):
            for t in range(0, n_tiles):
                i = g * n_tiles + t
                buf = i % NUM_BUF
                # Once the ring is full, both groups must have released the buffer's last tile.
                mbarrier.wait(free.index(buf), phase=((i // NUM_BUF) + 1) & 1, pred=i >= NUM_BUF)
                mbarrier.expect(ready.index(buf), tile_bytes)
                # Rows past the queries' end come back as zeros; their lse reads as +inf (P = 0).
                row = q_lo + t * BLOCK_M
                tma_load(q_desc, [off_b, first_head + g, row, 0], ready.index(buf),
                         q_smem.index(buf))
                tma_load(do_desc, [off_b, first_head + g, row, 0], ready.index(buf),
                         do_smem.index(buf))

    @gluon.jit
    def _tile(i, dk, dv, k, v, q_smem, do_smem, ready, free, lse_ptr, delta_ptr, start_m, keys,
              offs_m, s_zero, qk_scale, CAUSAL: gl.constexpr,
              BLOCK_M: gl.constexpr, D: gl.constexpr, NUM_BUF: gl.constexpr,
              a_layout: gl.constexpr):
        """One query tile against this group's keys, on transposed tiles (keys x queries) so that
        P^T and dS^T are the A operands of dV's and dK's products. CAUSAL: mask the scores."""
        buf = i % NUM_BUF
        mbarrier.wait(ready.index(buf), phase=(i // NUM_BUF) & 1)
        q = q_smem.index(buf).reshape([BLOCK_M, D])
        do = do_smem.index(buf).reshape([BLOCK_M, D])
        st = warpgroup_mma(k, q.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dpt = warpgroup_mma(v, do.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        rows = start_m + offs_m
        # Padded to whole tiles (dkdv()): no load mask, whose registers head dim 128 lacks.
        lse = gl.load(lse_ptr + rows)
        delta = gl.load(delta_ptr + rows)
        st = warpgroup_mma_wait(num_outstanding=1, deps=(st,))  # dP^T may still run
        if CAUSAL:
            # Row r sees key j iff j - causal_offset <= r; -inf times c > 0 stays -inf, P = 0.
            # (keys holds j - causal_offset: this form is the one that fits in registers.)
            seen = gl.expand_dims(keys, 1) <= gl.expand_dims(rows, 0)
            st = gl.where(seen, st, float("-inf"))
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))
        dpt = warpgroup_mma_wait(num_outstanding=0, deps=(dpt,))
        dst = pt * (dpt - gl.expand_dims(delta, 0))
        dv = warpgroup_mma(gl.convert_layout(pt.to(k.dtype), a_layout), do, dv, is_async=True)
        dk = warpgroup_mma(gl.convert_layout(dst.to(k.dtype), a_layout), q, dk, is_async=True)
        dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
        mbarrier.arrive(free.index(buf))
        return dk, dv

    @gluon.jit
    def _consumer(dk_desc, dv_desc, k_smem, v_smem, q_smem, do_smem, kv_bar, ready, free, ROWS,
                  off_b, off_hk, first_head, H, GROUP, key0, n_pad, q_lo, n_tiles,
                  causal_offset, qk_scale, sm_scale, IS_CAUSAL: gl.constexpr,
                  GROUP_N: gl.constexpr, BLOCK_M: gl.constexpr, D: gl.constexpr,
                  NUM_BUF: gl.constexpr):
        dtype: gl.constexpr = dk_desc.dtype
        # One warp group: 4 warps x 16 key rows.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_M, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0],
                                                             warps_per_cta=[4, 1],
                                                             instr_shape=[16, D, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout,
                                                     k_width=2)
        s_zero = gl.zeros([GROUP_N, BLOCK_M], gl.float32, layout=s_layout)
        dk = gl.zeros([GROUP_N, D], gl.float32, layout=acc_layout)
        dv = gl.zeros([GROUP_N, D], gl.float32, layout=acc_layout)
        offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
        keys = key0 - causal_offset + gl.arange(0, GROUP_N,
                                                layout=gl.SliceLayout(1, s_layout))
        k = k_smem.reshape([GROUP_N, D])
        v = v_smem.reshape([GROUP_N, D])
        mbarrier.wait(kv_bar, phase=0)
        for g in range(0, GROUP):
            bh = (off_b * H + first_head + g).to(gl.int64)
            lse_ptr = ROWS + bh * 2 * n_pad  # (B, H, 2, n_pad): lse (base 2), delta
            delta_ptr = lse_ptr + n_pad
            # One loop, with the causal mask on every tile (a compare and a select per score):
            # a second loop for just the tiles the diagonal crosses made ptxas spill 80-216
            # bytes per thread at head dim 128.
            for t in range(0, n_tiles):
                dk, dv = _tile(g * n_tiles + t, dk, dv, k, v, q_smem, do_smem, ready, free,
                               lse_ptr, delta_ptr, q_lo + t * BLOCK_M, keys, offs_m, s_zero,
                               qk_scale, IS_CAUSAL, BLOCK_M, D, NUM_BUF, a_layout)
        # K's and V's buffers stage dK and dV for the TMA stores, which write only the rows
        # inside this head's N_K (keys past it were zeros and got gradients of their own).
        k.store((dk * sm_scale).to(dtype))
        v.store(dv.to(dtype))
        fence_async_shared()
        tma_store(dk_desc, [off_b, off_hk, key0, 0], k_smem)
        tma_store(dv_desc, [off_b, off_hk, key0, 0], v_smem)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _dkdv_hopper_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, ROWS, H,
                            GROUP, N_Q, N_PAD, N_K, causal_offset, qk_scale, sm_scale,
                            BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, D: gl.constexpr,
                            IS_CAUSAL: gl.constexpr, NUM_BUF: gl.constexpr,
                            WORKER_REGS: gl.constexpr, num_warps: gl.constexpr):
        GROUP_N: gl.constexpr = BLOCK_N // 2
        dtype: gl.constexpr = q_desc.dtype
        start_n = gl.program_id(0) * BLOCK_N
        bhk = gl.program_id(1)
        H_KV = H // GROUP
        off_b = bhk // H_KV
        off_hk = bhk % H_KV
        first_head = off_hk * GROUP  # the query heads that share this K/V head
        q_lo = 0
        if IS_CAUSAL:
            # Row r sees key j iff j <= r + causal_offset: rows before start_n - causal_offset see
            # none of this block's keys.
            q_lo = (gl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
        n_tiles = gl.maximum(N_Q - q_lo + BLOCK_M - 1, 0) // BLOCK_M

        k_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, GROUP_N, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, GROUP_N, D], v_desc.layout)
        q_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, 1, 1, BLOCK_M, D], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, 1, 1, BLOCK_M, D], do_desc.layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        for j in gl.static_range(NUM_BUF):
            mbarrier.init(ready.index(j), count=1)
            mbarrier.init(free.index(j), count=2)  # both groups release a buffer
        fence_async_shared()
        mbarrier.expect(kv_bar, 2 * BLOCK_N * D * dtype.primitive_bitwidth // 8)
        for j in gl.static_range(2):
            tma_load(k_desc, [off_b, off_hk, start_n + j * GROUP_N, 0], kv_bar, k_smem.index(j))
            tma_load(v_desc, [off_b, off_hk, start_n + j * GROUP_N, 0], kv_bar, v_smem.index(j))
        gl.warp_specialize([
            (_consumer, (dk_desc, dv_desc, k_smem.index(0), v_smem.index(0), q_smem, do_smem,
                         kv_bar, ready, free, ROWS, off_b, off_hk, first_head, H, GROUP,
                         start_n, N_PAD, q_lo, n_tiles, causal_offset, qk_scale,
                         sm_scale, IS_CAUSAL, GROUP_N, BLOCK_M, D, NUM_BUF)),
            (_consumer, (dk_desc, dv_desc, k_smem.index(1), v_smem.index(1), q_smem, do_smem,
                         kv_bar, ready, free, ROWS, off_b, off_hk, first_head, H, GROUP,
                         start_n + GROUP_N, N_PAD, q_lo, n_tiles, causal_offset,
                         qk_scale, sm_scale, IS_CAUSAL, GROUP_N, BLOCK_M, D, NUM_BUF)),
            (_producer, (q_desc, do_desc, q_smem, do_smem, ready, free, off_b, first_head, GROUP,
                         q_lo, n_tiles, BLOCK_M, D, NUM_BUF)),
        ], [4, 1], WORKER_REGS)


def eligible(q, k, v, do, dk, dv, mask, kpm, dropout_p, varlen, causal, causal_offset,
             scale) -> bool:
    """Whether this kernel computes dK and dV for the call; otherwise _backward.py does."""
    # The length first, as in _forward_hopper.eligible.
    floor = MIN_LENGTH.get((q.shape[3], bool(causal)))
    if not ENABLED or floor is None or min(q.shape[2], k.shape[2]) < floor:
        return False
    if do.dtype != q.dtype or not (tma_ok(do) and tma_ok(dk) and tma_ok(dv)):
        return False
    return plain_call(q, k, v, mask, kpm, dropout_p, varlen, causal, causal_offset, scale)


def dkdv(q, k, v, do, dk, dv, stats, delta, causal, causal_offset, scale, config=None):
    """Write dK and dV into `dk`, `dv` (k's and v's shapes, TMA-readable strides), given the
    forward's `stats` (fp32 (B, H, 3, N_Q)) and the dQ kernel's `delta` (fp32 (B, H, N_Q)).
    `config` (for experiments) replaces entries of CONFIG."""
    cfg = {**CONFIG, **(config or {})}
    B, H, N_Q, D = q.shape
    H_KV, N_K = k.shape[1], k.shape[2]
    # The kernel's per-row terms, padded to whole query tiles: rows past the end read an lse of
    # +inf (P = 0; their Q and dO rows are zeros too) and a delta of 0.
    n_pad = -(-N_Q // BLOCK_M) * BLOCK_M
    rows = stats.new_empty((B, H, 2, n_pad))
    rows[:, :, 0, :N_Q] = stats[:, :, 0]
    rows[:, :, 1, :N_Q] = delta
    rows[:, :, 0, N_Q:] = float("inf")
    rows[:, :, 1, N_Q:] = 0.0
    grid = (-(-N_K // BLOCK_N), B * H_KV)
    _dkdv_hopper_kernel[grid](
        descriptor(q, BLOCK_M), descriptor(k, GROUP_N), descriptor(v, GROUP_N),
        descriptor(do, BLOCK_M), descriptor(dk, GROUP_N), descriptor(dv, GROUP_N), rows,
        H, H // H_KV, N_Q, n_pad, N_K, causal_offset, scale * _common.LOG2E, scale,
        BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, D=D, IS_CAUSAL=bool(causal), NUM_BUF=cfg["NUM_BUF"],
        WORKER_REGS=cfg["WORKER_REGS"], num_warps=4)
