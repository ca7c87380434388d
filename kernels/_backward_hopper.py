"""The backward for Hopper (sm_90) in Gluon, for the unmasked and causal cases.

_backward.py's kernels, compiled by Triton for sm_90, wait for each product before the
elementwise work that follows it. Here the schedule is written out, in the forward's shape
(_forward_hopper.py):

- a producer warp loads the query and dO tiles (64 rows each) by TMA into a ring of buffers, for
  every query head that shares this program's K/V head (grouped-query attention);
- two consumer warp groups each own 64 of the program's 128 keys, holding their K and V tiles and
  their dK, dV accumulators. Per query tile a group issues S^T = K Q^T and dP^T = V dO^T
  together, rebuilds P^T = exp2(S^T c - lse) while dP^T is still on the tensor cores, forms
  dS^T = P^T (dP^T - delta), and issues dV += P^T dO and dK += dS^T Q. The two groups run
  unsynchronised, so one group's exponentials overlap the other's products.

Two routes (`route`):
- "dkdv": _backward.py's dQ kernel runs first and writes delta (in its exact form, the row sums
  of P * dP); this kernel computes dK and dV. Four products per tile pair here and three in the
  dQ kernel, which recomputes S and dP. Deterministic.
- "fused": this kernel computes dQ as well, five products in all, as FlashAttention-3 and cudnn
  do. Each group writes its dS^T tile to shared memory (dK's operand there); the groups meet at
  an mbarrier per tile, and dQ_tile = dS K over the block's 128 keys is added into an fp32 sum
  in global memory: by TMA bulk reductions (tma.async_atomic_add, Triton >= 3.9) or element
  atomics. A small Triton kernel first writes delta in its other form, rowsum(dO * O), and zeroes
  the sum; dS carries sm_scale, so the last step only rounds dQ. The adds land in any order, so
  dQ may differ in its last bit from run to run: under torch.use_deterministic_algorithms(True)
  the dkdv route serves.

Measured on an H200 (bf16, benchmarks/results/h200/experiments/): the dK/dV probe ran B4 H32
N4096 D128 in 3.79 ms against 4.20 for the Triton dK/dV kernel; the fused backward in 5.31 ms
against 6.73 for the dkdv route and 5.29 for cudnn (ops_bar_fused_triton{39,36}_479c863).
Below the floors (MIN_LENGTH, FUSED_MIN_LENGTH) Triton's kernels are the faster.
attention_backward asks `route` before anything else.
"""

import os

import torch
import triton
import triton.language as tl

from . import _common
from ._dropout import PHILOX_ROUNDS, dropout_keep, dropout_scale, dropout_threshold
from ._hopper import AVAILABLE, HAS_TMA_ADD, ONCE, config_from_env, plain_call, tma_ok

if AVAILABLE:
    from ._hopper import (fence_async_shared, gl, gluon, mbarrier, tma, tma_add, tma_load,
                          tma_store, warpgroup_mma, warpgroup_mma_wait)

# HF_FLASH_HOPPER_BWD=0 sends every backward to _backward.py (for comparisons and bisection).
ENABLED = os.environ.get("HF_FLASH_HOPPER_BWD", "1") != "0"

# How the kernel gets dQ (constexpr DQ): not at all (Triton's dQ kernel runs first), or summed
# into an fp32 buffer by TMA bulk reductions (Triton >= 3.9: tma.async_atomic_add) or, where
# Gluon lacks those, by element atomics from registers.
DQ_NONE, DQ_TMA, DQ_ATOMIC = 0, 1, 2

BLOCK_N = 128  # keys per program: two consumer groups of 64
GROUP_N = BLOCK_N // 2
BLOCK_M = 64  # query rows per tile. 128 spills (S^T and dP^T would take 64 registers each)
# NUM_BUF: query/dO buffers (tile i in use, i + 1 loading). WORKER_REGS: registers per thread of
# the worker partitions (consumer group 1, producer) by setmaxnreg; group 0 takes what is left.
# DQ_ADD (the fused route): "tma" where Gluon has TMA reductions, else "atomic"; or either.
CONFIG = {"NUM_BUF": 2, "WORKER_REGS": (240, 24),
          "DQ_ADD": "tma" if HAS_TMA_ADD else "atomic"}
# HF_FLASH_HOPPER_BWD_CONFIG='{"NUM_BUF": 3}' replaces entries (experiments).
CONFIG = config_from_env(CONFIG, "HF_FLASH_HOPPER_BWD_CONFIG")

# HF_FLASH_HOPPER_BWD_FUSED=0 keeps dQ in Triton's kernel (the deterministic route).
FUSED = os.environ.get("HF_FLASH_HOPPER_BWD_FUSED", "1") != "0"

# The fused route takes attention dropout too, drawing the mask once where Triton's two backward
# kernels draw it twice (tests/test_hopper_backward.py checks it against them: the same mask).
# On by default where all its GPU tests have run: dQ by element atomics (Triton 3.6). With TMA
# reductions (Triton 3.9) 19 of its 20 GPU tests passed and the last was cut off by a time limit
# while it ran (H200, eb47f51), so there it waits for HF_FLASH_HOPPER_DROPOUT=1 until a whole run
# passes; it measured 21-39 % faster than Triton's kernels there, within 3 % of cudnn (the table
# below). =0 leaves dropout to Triton's kernels everywhere.
DROPOUT = os.environ.get("HF_FLASH_HOPPER_DROPOUT",
                         "1" if CONFIG["DQ_ADD"] == "atomic" else "0") == "1"
# The fused route takes key padding too (HF_FLASH_HOPPER_KPM=1), on the lengths it serves
# otherwise: blocks of padded keys run no query tile (dK = dV = 0 there), and padded keys inside
# a block get P = 0 from the same compare as the causal mask. Off by default: its first GPU run
# (H100, Triton 3.6, e952c0e) passed 45 of its 46 tests but failed dQ's agreement with dropout
# (no causality; open), and on BERT's padding + dropout row it saved no GPU time: this first
# pass and dQ's rounding spend what the kernel saves (docs/perf-notes.md, "Key padding ... first
# GPU run" and the section after it). Compiled for sm_90 by the CPU tests.
# With dropout, unmasked only: this kernel's delta is rowsum(dO * O) of the 16-bit O, and under
# dropout a batch entry with one real key makes every row's P one-hot with O = V / (1 - p)
# rounded, so dS would keep that rounding where it should cancel, and dK of the key would sum it
# over every row (the fault _backward.py's dQ kernel avoids by summing P * dP exactly). Without
# causality the rows that see one key are those of an entry whose span is one key (kv_hi - kv_lo
# == 1), and the first pass takes their delta from that key (_prep_kernel), equal to the kernel's
# up to fp32 summation order. With causality many rows of an entry of several keys may see just
# one (padding [1, 0, ..., 0, 1, ...], top-left): not known from the span, so causal calls with
# key padding and dropout stay on Triton's kernels.
KEY_PADDING = os.environ.get("HF_FLASH_HOPPER_KPM", "0") == "1"
# Head dims it takes dropout at. At 128 the drawn tile made ptxas spill 170-450 bytes per thread
# (64: none with TMA reductions, 8-56 bytes with element atomics; compile_kernels.py --hopper).
DROPOUT_HEAD_DIMS = (64,)
# Dropout calls take the fused route from the lower of its floor and this one: drawing once pays
# from shorter lengths. H200, Triton 3.6 (element atomics), bf16 backward at 16k tokens, p = 0.1,
# ms, Triton's kernels -> fused (benchmarks/results/h200/experiments/ops_sweep_d64_dropout-*):
#                  n=  1024          2048          4096
#   D64              1.873 -> 1.406  3.595 -> 2.490  7.048 -> 4.673   (cudnn 1.207 2.188 4.139)
#   D64 causal       1.117 -> 0.975  1.987 -> 1.611  3.744 -> 2.868   (cudnn 0.818 1.354 2.416)
# Triton 3.9 (TMA reductions), HF_FLASH_HOPPER_DROPOUT=1 (ops_sweep_d64_dropout-*_t39_eb47f51):
#   D64              1.836 -> 1.240  3.539 -> 2.240  6.957 -> 4.265   (cudnn 1.200 2.173 4.143)
#   D64 causal       1.063 -> 0.838  1.889 -> 1.360  3.539 -> 2.412   (cudnn 0.814 1.343 2.403)
DROPOUT_MIN_LENGTH = {(64, False): 1024, (64, True): 1024}

# The shortest sequence (queries and keys) each route takes, per (head dim, causal); H200, bf16,
# backward in ms at 16k-token batches (benchmarks/results/h200/experiments/ops_sweep_*_bwd_*:
# min0_{on,off}_0c39220, fused_{tma,atomic}_996f229, unfused_996f229,
# hopper_{on,off}_70df10c).
#                    n=   512   1024   2048   4096  16384
#   D64   Triton only   0.60   1.11   2.08   4.14  16.01
#         dkdv             -   1.11   2.05   3.91  15.14
#         fused, TMA    0.63   0.97   1.70   3.20  12.25
#         fused, atomic 0.71   1.14   2.00   3.71  14.11
#   D64 causal          0.44   0.70   1.25   2.25   8.47    (dkdv 0.71 1.17 2.20 7.75)
#         fused, TMA    0.48   0.67   1.07   1.85   6.60    (atomic 0.62 0.74 1.19 2.09 7.34)
#   D128  Triton only   0.60   1.08   2.01   3.96      -    (dkdv 0.98 1.80 3.44)
#         fused, TMA    0.67   0.82   1.44   2.70  10.35    (atomic 0.65 1.09 1.89 3.51 13.97)
#   D128 causal         0.42   0.65   1.15   2.11      -    (dkdv 0.63 1.07 1.95)
#         fused, TMA    0.55   0.68   0.88   1.53   5.33    (atomic 0.52 0.77 1.24 2.17 7.52)
# Below 1024 the fused route's extra passes (delta, zeroing dQ's fp32 sum, rounding it: ~0.1 ms
# at 16k tokens) cost more than its products save. Element atomics (Triton before 3.9) only pay
# at head dim 64 from 4096. The floors start at 2048, not 1024: the route's host time (seven TMA
# descriptors, three launches) made GPT-2's backward (B16 H16 N1024 causal) host-bound under
# Triton 3.9, 0.90 ms against 0.36 by Triton's kernels (ops_bar_fused_triton39_479c863). A
# plan's calls have since skipped Triton's dispatch and the descriptors' checks (_hopper.Launches);
# whether 1024 pays now is for the GPU to say.
MIN_LENGTH = {(64, False): 2048, (64, True): 2048, (128, False): 1024, (128, True): 1024}
_FUSED_FLOORS = {
    "tma": {(64, False): 2048, (64, True): 2048, (128, False): 2048, (128, True): 2048},
    "atomic": {(64, False): 4096, (64, True): 4096},
}
FUSED_MIN_LENGTH = _FUSED_FLOORS[CONFIG["DQ_ADD"]]


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
    def _philox(k0, k1, c0, c1, c2, c3, N_ROUNDS: gl.constexpr):
        """Philox4x32 (Salmon et al., SC'11) with key (k0, k1): the same rounds, constants and
        word order as Triton's tl.philox, which _dropout.dropout_keep calls, so both kernels
        draw the same bits."""
        for _ in gl.static_range(N_ROUNDS):
            a0 = c0
            a2 = c2
            c0 = gl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
            c2 = gl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
            c1 = a2 * 0xCD9E8D57
            c3 = a0 * 0xD2511F53
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        return c0, c1, c2, c3

    @gluon.jit
    def _keep_t(seed, bh, start_m, start_n, threshold, s_layout: gl.constexpr,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """_dropout.dropout_keep's tile for queries start_m.. and keys start_n.., transposed
        (keys x queries) and in `s_layout`, the layout of this kernel's S^T. The same counters
        and the same joins, permutes and reshape, so the same bits in the same places. One
        Philox call serves eight keys of one query row, which S^T's layout spreads over four
        threads: each thread draws whole calls in a layout of its own (4 calls a thread for a
        64 x 64 tile), and the decisions reach S^T's layout through shared memory (4 KiB)."""
        calls: gl.constexpr = gl.BlockedLayout([1, BLOCK_N // 32, 1], [8, 1, 4], [4, 1, 1],
                                               [2, 1, 0])
        rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, gl.SliceLayout(2, calls)))
        groups = start_n // 32 + gl.arange(0, BLOCK_N // 32,
                                           layout=gl.SliceLayout(0, gl.SliceLayout(2, calls)))
        lanes = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, calls)))
        r3 = gl.expand_dims(gl.expand_dims(rows, 1), 2)
        g3 = gl.expand_dims(gl.expand_dims(groups, 0), 2)
        l3 = gl.expand_dims(gl.expand_dims(lanes, 0), 1)
        c0 = (g3 * 4 + l3 + r3 * 0).to(gl.uint32)
        c1 = (r3 + c0 * 0).to(gl.uint32)
        c2 = (c0 * 0 + bh).to(gl.uint32)
        s64 = seed.to(gl.uint64)
        k0 = (s64 & 0xFFFFFFFF).to(gl.uint32)
        k1 = ((s64 >> 32) & 0xFFFFFFFF).to(gl.uint32)
        r0, r1, r2, r3 = _philox(k0, k1, c0, c1, c2, c0 * 0, PHILOX_ROUNDS)
        words = gl.join(gl.join(r0, r2), gl.join(r1, r3))  # [query, group, lane, a, b]
        draws = gl.join(words & 0xFFFF, words >> 16)
        keep = draws >= threshold.to(gl.uint32)
        keep = gl.reshape(gl.permute(keep, (0, 1, 3, 4, 2, 5)), (BLOCK_M, BLOCK_N))
        return gl.convert_layout(gl.permute(keep, (1, 0)), s_layout)

    @gluon.jit
    def _add_dq(dq, dq_desc, dq_ptr, dq_smem, off_b, head, row, col, N_Q, DQ: gl.constexpr,
                D: gl.constexpr):
        """Add a (BLOCK_M, DQ_N) tile of dQ into the fp32 sum at (row, col) of a head."""
        if DQ == 1:  # DQ_TMA: the copy engine adds a shared-memory tile, near L2
            tma.store_wait(pendings=0)  # the last reduction has read dq_smem
            dq_smem.reshape(dq.shape).store(dq)
            fence_async_shared()
            tma_add(dq_desc, [off_b, head, row, col], dq_smem)
        else:  # DQ_ATOMIC: dq_ptr is the head's (N_Q, D) fp32 sum
            r = row + gl.arange(0, dq.shape[0], layout=gl.SliceLayout(1, dq.type.layout))
            c = col + gl.arange(0, dq.shape[1], layout=gl.SliceLayout(0, dq.type.layout))
            ptrs = dq_ptr + gl.expand_dims(r * D, 1) + gl.expand_dims(c, 0)
            gl.atomic_add(ptrs, dq, mask=gl.expand_dims(r < N_Q, 1) & gl.expand_dims(c < D, 0),
                          sem="relaxed")

    @gluon.jit
    def _tile(i, dk, dv, k, v, kq0, kq1, q_smem, do_smem, ds_smem, dq_smem, ready, free,
              ds_ready, lse_ptr, delta_ptr, dq_desc, dq_ptr, off_b, head, N_Q, start_m, keys,
              offs_m, s_zero, dq_zero, qk_scale, ds_scale, seed, bh, key0, drop_threshold,
              MASKED: gl.constexpr, DQ: gl.constexpr, DROPOUT: gl.constexpr, G: gl.constexpr,
              BLOCK_M: gl.constexpr, D: gl.constexpr, DQ_N: gl.constexpr, NUM_BUF: gl.constexpr,
              a_layout: gl.constexpr, s_layout: gl.constexpr):
        """One query tile against this group's keys, on transposed tiles (keys x queries) so that
        P^T and dS^T are the A operands of dV's and dK's products. MASKED: mask the scores of
        key j for row r unless keys[j] <= r (causal, key padding or both; see _consumer). With
        DQ, also this tile's share of dQ (see _consumer). DROPOUT: the forward's keep mask,
        drawn again (dV and dS see only kept scores; delta comes in units of 1 / the dropout
        scale, which dQ, dK and dV take once, as in _backward.py)."""
        buf = i % NUM_BUF
        mbarrier.wait(ready.index(buf), phase=(i // NUM_BUF) & 1)
        q = q_smem.index(buf).reshape([BLOCK_M, D])
        do = do_smem.index(buf).reshape([BLOCK_M, D])
        st = warpgroup_mma(k, q.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dpt = warpgroup_mma(v, do.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        if DROPOUT:  # drawn while both products run
            keep = _keep_t(seed, bh, start_m, key0, drop_threshold, s_layout, BLOCK_M,
                           keys.shape[0])
        rows = start_m + offs_m
        # Padded to whole tiles (dkdv()): no load mask, whose registers head dim 128 lacks.
        lse = gl.load(lse_ptr + rows)
        delta = gl.load(delta_ptr + rows)
        st = warpgroup_mma_wait(num_outstanding=1, deps=(st,))  # dP^T may still run
        if MASKED:
            # -inf times c > 0 stays -inf: P = 0. (One compare against a per-key bound is the
            # form that fits in registers.)
            seen = gl.expand_dims(keys, 1) <= gl.expand_dims(rows, 0)
            st = gl.where(seen, st, float("-inf"))
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))
        dpt = warpgroup_mma_wait(num_outstanding=0, deps=(dpt,))
        pt_used = pt
        if DROPOUT:
            pt_used = gl.where(keep, pt, 0.0)
            dpt = gl.where(keep, dpt, 0.0)
        if DQ == 0:
            dst = pt * (dpt - gl.expand_dims(delta, 0))
            dv = warpgroup_mma(gl.convert_layout(pt_used.to(k.dtype), a_layout), do, dv,
                               is_async=True)
            dk = warpgroup_mma(gl.convert_layout(dst.to(k.dtype), a_layout), q, dk,
                               is_async=True)
            dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
            mbarrier.arrive(free.index(buf))
        else:
            # dS^T, scaled (dQ and dK both want sm_scale), to shared memory: dK's A operand
            # there, and with the other group's tile, dQ's. Two buffers: a group writes tile
            # i + 2's only after the meet of tile i + 1, which the other group reaches after
            # its tile-i products.
            dst = pt * ((dpt - gl.expand_dims(delta, 0)) * ds_scale)
            dsb = i % 2
            ds_mine = ds_smem.index(dsb * 2 + G)
            ds_mine.store(dst.to(k.dtype))
            fence_async_shared()
            mbarrier.arrive(ds_ready.index(dsb))
            dv = warpgroup_mma(gl.convert_layout(pt_used.to(k.dtype), a_layout), do, dv,
                               is_async=True)
            dk = warpgroup_mma(ds_mine, q, dk, is_async=True)
            mbarrier.wait(ds_ready.index(dsb), phase=(i // 2) & 1)
            # dQ_tile = dS K over the block's 128 keys: both groups' dS^T tiles, transposed
            # (an MN-major A operand from shared memory), against the two K halves.
            if DQ_N < D:
                # Head dim 128: this group's half of dQ's columns, every tile.
                dq = warpgroup_mma(ds_smem.index(dsb * 2).permute((1, 0)), kq0, dq_zero,
                                   use_acc=False, is_async=True)
                dq = warpgroup_mma(ds_smem.index(dsb * 2 + 1).permute((1, 0)), kq1, dq,
                                   is_async=True)
                dv, dk, dq = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, dq))
                mbarrier.arrive(free.index(buf))
                _add_dq(dq, dq_desc, dq_ptr, dq_smem, off_b, head, start_m, G * DQ_N, N_Q, DQ,
                        D)
            else:
                # Head dim 64 (32-column halves would cut the 128-byte swizzle rows): the groups
                # take turns, each the whole tile of every other query tile. A branch taken at
                # run time cannot keep products in flight across it: dK and dV first.
                dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
                mbarrier.arrive(free.index(buf))
                if (i % 2) == G:
                    dq = warpgroup_mma(ds_smem.index(dsb * 2).permute((1, 0)), kq0, dq_zero,
                                       use_acc=False, is_async=True)
                    dq = warpgroup_mma(ds_smem.index(dsb * 2 + 1).permute((1, 0)), kq1, dq,
                                       is_async=True)
                    dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq,))
                    _add_dq(dq, dq_desc, dq_ptr, dq_smem, off_b, head, start_m, 0, N_Q, DQ, D)
        return dk, dv

    @gluon.jit
    def _consumer(dk_desc, dv_desc, dq_desc, DQ_ACC, k_smem, v_smem, q_smem, do_smem, ds_smem,
                  dq_smem, kv_bar, ready, free, ds_ready, ROWS, off_b, off_hk, first_head, H,
                  GROUP, N_Q, key0, n_pad, q_lo, n_tiles, causal_offset, qk_scale, sm_scale,
                  SEED, drop_threshold, drop_scale, kpm_row, stride_kpmn, N_K,
                  IS_CAUSAL: gl.constexpr, DQ: gl.constexpr, DROPOUT: gl.constexpr,
                  HAS_KPM: gl.constexpr, G: gl.constexpr,
                  GROUP_N: gl.constexpr, BLOCK_M: gl.constexpr, D: gl.constexpr,
                  DQ_N: gl.constexpr, NUM_BUF: gl.constexpr):
        """Consumer group G: keys key0 .. key0 + GROUP_N of the block, K and V half G."""
        dtype: gl.constexpr = dk_desc.dtype
        # One warp group: 4 warps x 16 key rows.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_M, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0],
                                                             warps_per_cta=[4, 1],
                                                             instr_shape=[16, D, 16])
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, DQ_N, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout,
                                                     k_width=2)
        s_zero = gl.zeros([GROUP_N, BLOCK_M], gl.float32, layout=s_layout)
        dq_zero = gl.zeros([BLOCK_M, DQ_N], gl.float32, layout=dq_layout)
        dk = gl.zeros([GROUP_N, D], gl.float32, layout=acc_layout)
        dv = gl.zeros([GROUP_N, D], gl.float32, layout=acc_layout)
        offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
        offs_n = gl.arange(0, GROUP_N, layout=gl.SliceLayout(1, s_layout))
        # Row r sees key j iff keys[j] <= r. Causal: keys[j] = j - causal_offset. A padded key
        # (key padding mask 0, or past N_K) gets the largest int32, which no row reaches; a real
        # key without causality the smallest one.
        keys = key0 - causal_offset + offs_n
        if HAS_KPM:
            cols = key0 + offs_n
            real = gl.load(kpm_row + cols * stride_kpmn, mask=cols < N_K, other=0) != 0
            if not IS_CAUSAL:
                keys = gl.full_like(keys, -2147483647)
            keys = gl.where(real, keys, 2147483647)
        MASKED: gl.constexpr = IS_CAUSAL or HAS_KPM
        k = k_smem.index(G).reshape([GROUP_N, D])
        v = v_smem.index(G).reshape([GROUP_N, D])
        # dQ's B operands: both K halves, at head dim 128 only this group's DQ_N columns.
        kq0 = k_smem.index(0).reshape([GROUP_N, D]).slice(G * (D - DQ_N), DQ_N, dim=1)
        kq1 = k_smem.index(1).reshape([GROUP_N, D]).slice(G * (D - DQ_N), DQ_N, dim=1)
        dq_mine = dq_smem.index(G)
        # dS^T wants sm_scale, and with dropout its scale too (delta came in units of 1 / it):
        # with dQ it leaves with them in it (dQ and dK both want them); otherwise dK takes them
        # at the end. dV takes dropout's scale at the end.
        scale = sm_scale
        dv_scale = 1.0
        seed = 0
        if DROPOUT:
            seed = gl.load(SEED)
            scale = sm_scale * drop_scale
            dv_scale = drop_scale
        ds_scale = scale
        dk_scale = 1.0
        if DQ == 0:
            ds_scale = 1.0
            dk_scale = scale
        mbarrier.wait(kv_bar, phase=0)
        for g in range(0, GROUP):
            bh = (off_b * H + first_head + g).to(gl.int64)
            lse_ptr = ROWS + bh * 2 * n_pad  # (B, H, 2, n_pad): lse (base 2), delta
            delta_ptr = lse_ptr + n_pad
            dq_ptr = DQ_ACC + bh * N_Q * D
            # One loop, with the causal mask on every tile (a compare and a select per score):
            # a second loop for just the tiles the diagonal crosses made ptxas spill 80-216
            # bytes per thread at head dim 128.
            for t in range(0, n_tiles):
                dk, dv = _tile(g * n_tiles + t, dk, dv, k, v, kq0, kq1, q_smem, do_smem, ds_smem,
                               dq_mine, ready, free, ds_ready, lse_ptr, delta_ptr, dq_desc,
                               dq_ptr, off_b, first_head + g, N_Q, q_lo + t * BLOCK_M, keys,
                               offs_m, s_zero, dq_zero, qk_scale, ds_scale, seed, bh, key0,
                               drop_threshold, MASKED, DQ, DROPOUT, G, BLOCK_M, D, DQ_N,
                               NUM_BUF, a_layout, s_layout)
        if DQ != 0:
            tma.store_wait(pendings=0)
            # The other group may still read this group's K half for its last dQ: meet once
            # more before K's buffer is overwritten.
            last = GROUP * n_tiles
            mbarrier.arrive(ds_ready.index(last % 2))
            mbarrier.wait(ds_ready.index(last % 2), phase=(last // 2) & 1)
        # K's and V's buffers stage dK and dV for the TMA stores, which write only the rows
        # inside this head's N_K (keys past it were zeros and got gradients of their own).
        k.store((dk * dk_scale).to(dtype))
        v.store((dv * dv_scale).to(dtype))
        fence_async_shared()
        tma_store(dk_desc, [off_b, off_hk, key0, 0], k_smem.index(G))
        tma_store(dv_desc, [off_b, off_hk, key0, 0], v_smem.index(G))
        tma.store_wait(pendings=0)

    @gluon.jit
    def _dkdv_hopper_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, dq_desc, DQ_ACC,
                            ROWS, SEED, KPM, KV_LO, KV_HI, H, GROUP, N_Q, N_PAD, N_K,
                            causal_offset, qk_scale, sm_scale, drop_threshold, drop_scale,
                            stride_kpmb, stride_kpmn,
                            BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, D: gl.constexpr,
                            IS_CAUSAL: gl.constexpr, DQ: gl.constexpr, DROPOUT: gl.constexpr,
                            HAS_KPM: gl.constexpr, NUM_BUF: gl.constexpr, WORKER_REGS: gl.constexpr,
                            num_warps: gl.constexpr):
        GROUP_N: gl.constexpr = BLOCK_N // 2
        DQ_N: gl.constexpr = D // 2 if D == 128 else D  # dQ columns a group computes per tile
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
        kpm_row = KPM
        if HAS_KPM:
            # A block outside its batch entry's span of real keys (_key_range.py) has dK = dV = 0
            # and adds nothing to dQ: no query tile runs, and the zeros are stored as usual.
            kpm_row = KPM + off_b.to(gl.int64) * stride_kpmb
            lo = gl.load(KV_LO + off_b)
            hi = gl.load(KV_HI + off_b)
            if (start_n >= hi) | (start_n + BLOCK_N <= lo):
                n_tiles = 0

        k_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, GROUP_N, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, GROUP_N, D], v_desc.layout)
        q_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, 1, 1, BLOCK_M, D], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, 1, 1, BLOCK_M, D], do_desc.layout)
        # dQ's buffers (unused without DQ): dS^T per (tile parity, group), a dQ tile per group.
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([GROUP_N, BLOCK_M], dtype)
        ds_smem = gl.allocate_shared_memory(dtype, [4, GROUP_N, BLOCK_M], ds_layout)
        dq_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK_M, DQ_N],
                                                                       gl.float32)
        dq_smem = gl.allocate_shared_memory(gl.float32, [2, 1, 1, BLOCK_M, DQ_N], dq_layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        for j in gl.static_range(NUM_BUF):
            mbarrier.init(ready.index(j), count=1)
            mbarrier.init(free.index(j), count=2)  # both groups release a buffer
        for j in gl.static_range(2):
            mbarrier.init(ds_ready.index(j), count=2)  # both groups' dS^T of a tile
        fence_async_shared()
        mbarrier.expect(kv_bar, 2 * BLOCK_N * D * dtype.primitive_bitwidth // 8)
        for j in gl.static_range(2):
            tma_load(k_desc, [off_b, off_hk, start_n + j * GROUP_N, 0], kv_bar, k_smem.index(j))
            tma_load(v_desc, [off_b, off_hk, start_n + j * GROUP_N, 0], kv_bar, v_smem.index(j))
        gl.warp_specialize([
            (_consumer, (dk_desc, dv_desc, dq_desc, DQ_ACC, k_smem, v_smem, q_smem, do_smem,
                         ds_smem, dq_smem, kv_bar, ready, free, ds_ready, ROWS, off_b, off_hk,
                         first_head, H, GROUP, N_Q, start_n, N_PAD, q_lo, n_tiles,
                         causal_offset, qk_scale, sm_scale, SEED, drop_threshold, drop_scale,
                         kpm_row, stride_kpmn, N_K, IS_CAUSAL, DQ, DROPOUT, HAS_KPM, 0, GROUP_N,
                         BLOCK_M, D, DQ_N, NUM_BUF)),
            (_consumer, (dk_desc, dv_desc, dq_desc, DQ_ACC, k_smem, v_smem, q_smem, do_smem,
                         ds_smem, dq_smem, kv_bar, ready, free, ds_ready, ROWS, off_b, off_hk,
                         first_head, H, GROUP, N_Q, start_n + GROUP_N, N_PAD, q_lo, n_tiles,
                         causal_offset, qk_scale, sm_scale, SEED, drop_threshold, drop_scale,
                         kpm_row, stride_kpmn, N_K, IS_CAUSAL, DQ, DROPOUT, HAS_KPM, 1, GROUP_N,
                         BLOCK_M, D, DQ_N, NUM_BUF)),
            (_producer, (q_desc, do_desc, q_smem, do_smem, ready, free, off_b, first_head, GROUP,
                         q_lo, n_tiles, BLOCK_M, D, NUM_BUF)),
        ], [4, 1], WORKER_REGS)


@triton.jit
def _prep_kernel(O, DO, STATS, DLSE, ROWS, DQ_ACC, V, KV_LO, KV_HI, SEED, stride_ob, stride_oh,
                 stride_om, stride_dob, stride_doh, stride_dom, stride_sb, stride_sh, stride_vb,
                 stride_vh, stride_vn, H, GROUP, N_Q, N_PAD, delta_unit, drop_threshold,
                 D: tl.constexpr, BLOCK: tl.constexpr, HAS_DLSE: tl.constexpr,
                 ONE_KEY: tl.constexpr):
    """For the kernel with dQ: the padded per-row terms (as dkdv() builds them), with delta =
    (rowsum(dO * O) - dlse log2(e)) / delta_unit, the form known before any key is seen
    (delta_unit: dropout's scale, else 1); and dQ's fp32 sum zeroed. ONE_KEY (dropout and key
    padding, no causality): in a batch entry with a single real key (KV_HI - KV_LO == 1), delta
    from that key exactly (KEY_PADDING says why)."""
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N_Q
    cols = tl.arange(0, D)
    # (int64 row offsets: in HF's (B, N, H, D) layout a row's stride is H * D.)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + rows.to(tl.int64)[:, None] * stride_om
                + cols[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh
                 + rows.to(tl.int64)[:, None] * stride_dom + cols[None, :], mask=ok[:, None],
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    dlse_e = 0.0
    if HAS_DLSE:
        # As _backward.py's dQ kernel: the lse's own gradient, in base 2.
        dlse = tl.load(DLSE + bh.to(tl.int64) * N_Q + rows, mask=ok, other=0.0)
        dlse_e = dlse * 1.4426950408889634
    delta = (delta - dlse_e) / delta_unit
    if ONE_KEY:
        lo = tl.load(KV_LO + off_b)
        if tl.load(KV_HI + off_b) - lo == 1:
            # Every row's P is one-hot on key lo: rowsum(P * dP), in units of 1 / the scale, is
            # keep * (dO . V[lo]), in fp32 from the 16-bit inputs as the kernel's dP is (the two
            # differ only in fp32 summation order).
            v = tl.load(V + off_b * stride_vb + (off_h // GROUP) * stride_vh
                        + lo.to(tl.int64) * stride_vn + cols)
            keep = dropout_keep(tl.load(SEED), bh, tl.program_id(0) * BLOCK, (lo // 32) * 32,
                                drop_threshold, BLOCK, 32)
            kept = tl.sum(tl.where(tl.arange(0, 32)[None, :] == lo % 32, keep, 0), 1) > 0
            dp = tl.sum(do.to(tl.float32) * v.to(tl.float32)[None, :], 1)
            delta = tl.where(kept, dp, 0.0) - dlse_e / delta_unit
    lse = tl.load(STATS + off_b * stride_sb + off_h * stride_sh + rows, mask=ok,
                  other=float("inf"))
    # A row that saw no key (every key padded) has lse = -inf; +inf gives it P = 0 where
    # exp2(s - -inf) would give NaN.
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    out = ROWS + bh.to(tl.int64) * 2 * N_PAD + rows
    tl.store(out, lse)
    tl.store(out + N_PAD, tl.where(ok, delta, 0.0))
    tl.store(DQ_ACC + bh.to(tl.int64) * N_Q * D + rows[:, None] * D + cols[None, :],
             tl.zeros([BLOCK, D], tl.float32), mask=ok[:, None])


def route(q, k, v, o, do, dk, dv, mask, kpm, dropout_p, varlen, causal, causal_offset,
          scale) -> str:
    """Which backward serves the call: "fused" (this kernel computes dQ, dK and dV: backward()),
    "dkdv" (Triton's dQ kernel, then this kernel's dK and dV: dkdv()) or "" (_backward.py's two
    Triton kernels)."""
    # The lengths first, as in _forward_hopper.eligible: short calls pay nothing more.
    n = min(q.shape[2], k.shape[2])
    key = (q.shape[3], bool(causal))
    floor = MIN_LENGTH.get(key)
    fused_floor = FUSED_MIN_LENGTH.get(key)
    # Dropout only on the fused route (DROPOUT), which draws the mask once: the dkdv route would
    # draw it in Triton's dQ kernel and again here.
    dropout = dropout_p > 0
    if dropout:
        if not (DROPOUT and q.shape[3] in DROPOUT_HEAD_DIMS):
            return ""
        floors = [f for f in (fused_floor, DROPOUT_MIN_LENGTH.get(key)) if f is not None]
        fused_floor = min(floors) if floors else None
    # Key padding, as dropout, only on the fused route; with dropout, unmasked only (KEY_PADDING).
    padded = kpm is not None
    if padded and (not KEY_PADDING or (dropout and causal)):
        return ""
    fused = FUSED and fused_floor is not None and n >= fused_floor
    if (dropout or padded) and not fused:
        return ""
    if not ENABLED or not (fused or (floor is not None and n >= floor)):
        return ""
    if do.dtype != q.dtype or not (tma_ok(do) and tma_ok(dk) and tma_ok(dv)):
        return ""
    # (Dropout and key padding were decided above: the rest of a plain call as the forward's.)
    if not plain_call(q, k, v, mask, None, 0.0, varlen, causal, causal_offset, scale):
        return ""
    # The fused kernel's dQ is a sum of atomic adds in no fixed order: not under
    # torch.use_deterministic_algorithms(True).
    if fused and o.stride(3) == 1 and not torch.are_deterministic_algorithms_enabled():
        return "fused"
    return "dkdv" if not (dropout or padded) and floor is not None and n >= floor else ""


def _launch(q, k, v, do, dk, dv, dq_desc, dq_acc, rows, n_pad, causal, causal_offset, scale,
            dq_kind, config, launches, dropout_p=0.0, seed=None, kpm=None, kv_lo=None,
            kv_hi=None):
    cfg = {**CONFIG, **(config or {})}
    B, H, N_Q, D = q.shape
    H_KV, N_K = k.shape[1], k.shape[2]
    dropout = dropout_p > 0
    has_kpm = kpm is not None
    # Unused pointer arguments take `rows` (any tensor will do).
    padding = (kpm, kv_lo, kv_hi) if has_kpm else (rows, rows, rows)
    launches(
        "main", _dkdv_hopper_kernel, (-(-N_K // BLOCK_N), B * H_KV),
        (launches.descriptor("q", q, BLOCK_M), launches.descriptor("k", k, GROUP_N),
         launches.descriptor("v", v, GROUP_N), launches.descriptor("do", do, BLOCK_M),
         launches.descriptor("dk", dk, GROUP_N), launches.descriptor("dv", dv, GROUP_N), dq_desc,
         dq_acc, rows, seed if dropout else rows, *padding, H, H // H_KV, N_Q, n_pad, N_K,
         causal_offset, scale * _common.LOG2E, scale, float(dropout_threshold(dropout_p)),
         dropout_scale(dropout_p), *(kpm.stride() if has_kpm else (0, 0))),
        dict(BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, D=D, IS_CAUSAL=bool(causal), DQ=dq_kind,
             DROPOUT=dropout, HAS_KPM=has_kpm, NUM_BUF=cfg["NUM_BUF"],
             WORKER_REGS=cfg["WORKER_REGS"], num_warps=4,
             enable_fp_fusion=_common.fp_fusion(q.dtype)))


def dkdv(q, k, v, do, dk, dv, stats, delta, causal, causal_offset, scale, config=None,
         launches=ONCE):
    """Write dK and dV into `dk`, `dv` (k's and v's shapes, TMA-readable strides), given the
    forward's `stats` (fp32 (B, H, 3, N_Q)) and the dQ kernel's `delta` (fp32 (B, H, N_Q)).
    `config` (for experiments) replaces entries of CONFIG. `launches`: a plan's (_hopper.Launches),
    for calls of one signature."""
    B, H, N_Q, D = q.shape
    # The kernel's per-row terms, padded to whole query tiles: rows past the end read an lse of
    # +inf (P = 0; their Q and dO rows are zeros too) and a delta of 0.
    n_pad = -(-N_Q // BLOCK_M) * BLOCK_M
    rows = stats.new_empty((B, H, 2, n_pad))
    rows[:, :, 0, :N_Q] = stats[:, :, 0]
    rows[:, :, 1, :N_Q] = delta
    rows[:, :, 0, N_Q:] = float("inf")
    rows[:, :, 1, N_Q:] = 0.0
    _launch(q, k, v, do, dk, dv, rows, rows, rows, n_pad, causal, causal_offset, scale, DQ_NONE,
            config, launches)


def prepare(o, do, stats, dlse, launches=ONCE, dropout_p=0.0, one_key=None):
    """The fused route's first pass (_prep_kernel): returns the padded per-row terms, fp32
    (B, H, 2, N_Q rounded up to BLOCK_M), and dQ's zeroed fp32 sum, (B, H, N_Q, D). `one_key`:
    (v, kv_lo, kv_hi, seed) of a call with dropout and key padding (no causality), whose batch
    entries with a single real key take their delta from it exactly."""
    B, H, N_Q, D = o.shape
    n_pad = -(-N_Q // BLOCK_M) * BLOCK_M
    rows = stats.new_empty((B, H, 2, n_pad))
    dq_acc = torch.empty((B, H, N_Q, D), device=o.device, dtype=torch.float32)
    v, lo, hi, seed = one_key if one_key is not None else (o, stats, stats, stats)
    # Fusion named, as for every launch (_common.fp_fusion): Triton 3.9 warns where it is left
    # to its default, which 3.10 turns off.
    launches("prep", _prep_kernel, (n_pad // BLOCK_M, B * H),
             (o, do, stats, dlse if dlse is not None else stats, rows, dq_acc, v, lo, hi, seed,
              *o.stride()[:3], *do.stride()[:3], stats.stride(0), stats.stride(1),
              *v.stride()[:3], H, H // v.shape[1], N_Q, n_pad, dropout_scale(dropout_p),
              float(dropout_threshold(dropout_p))),
             dict(D=D, BLOCK=BLOCK_M, HAS_DLSE=dlse is not None, ONE_KEY=one_key is not None,
                  enable_fp_fusion=_common.fp_fusion(o.dtype)))
    return rows, dq_acc


def backward(q, k, v, o, do, dq, dk, dv, stats, dlse, causal, causal_offset, scale,
             config=None, launches=ONCE, dropout_p=0.0, seed=None, kpm=None, kv_lo=None,
             kv_hi=None):
    """The whole backward in this kernel: write dQ, dK, dV into `dq`, `dk`, `dv` (q's, k's, v's
    shapes; dk, dv TMA-readable), given the forward's output `o` and `stats`, and `dlse` (fp32
    (B, H, N_Q), contiguous) or None; with `dropout_p` > 0, the forward's dropout from its
    `seed` tensor; with `kpm` (uint8 (B, N_K), nonzero = real key), that key padding and its
    span of real keys per batch entry, `kv_lo` and `kv_hi` (_key_range.py). `config`,
    `launches` as for dkdv()."""
    D = q.shape[3]
    one_key = (v, kv_lo, kv_hi, seed) if kpm is not None and dropout_p > 0 else None
    rows, dq_acc = prepare(o, do, stats, dlse, launches, dropout_p, one_key)
    n_pad = rows.shape[3]
    if {**CONFIG, **(config or {})}["DQ_ADD"] == "tma":
        dq_kind, dq_desc = DQ_TMA, launches.descriptor("dq", dq_acc, BLOCK_M,
                                                       D // 2 if D == 128 else D)
    else:
        dq_kind, dq_desc = DQ_ATOMIC, dq_acc
    _launch(q, k, v, do, dk, dv, dq_desc, dq_acc, rows, n_pad, causal, causal_offset, scale,
            dq_kind, config, launches, dropout_p, seed, kpm, kv_lo, kv_hi)
    dq.copy_(dq_acc)  # dS carried sm_scale: this only rounds
