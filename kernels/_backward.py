"""Backward kernels, recomputing the probabilities from the saved log-sum-exp.

Two kernels, no atomics, so gradients are bit-for-bit deterministic:
- `_bwd_dq_kernel`, launched first: one program per (query block, batch x head), walking key
  blocks like forward; it also writes the per-row correction term delta that dK needs.
- `_bwd_dkdv_kernel`: one program per (key block, batch x K/V head); it walks every query block
  of every query head in its group, so grouped-query gradients are summed in a fixed order.
Both rebuild P = exp2(S - lse) tile by tile; nothing of size (q_len x k_len) is ever stored.
On an H100/H200, long unmasked and causal calls go to the Gluon kernel of _backward_hopper.py
instead (`route`): either for dK/dV alone, after this dQ kernel (deterministic too), or for the
whole backward, dQ summed by atomic adds (not bit-for-bit repeatable; not taken under
torch.use_deterministic_algorithms(True)).
"""

import torch
import triton
import triton.language as tl

from . import _backward_hopper, _hopper
from . import _common
from . import _tuning
from ._common import (AUTOTUNE, bucket, call_signature, cdiv, cfg, default_config,
                      dot_precision, fp_fusion, key_range, length_args, mask_scores, next_pow2,
                      on_inputs_device, row_stats_base, row_strides, seq_bounds, smem_ok)
from ._dropout import dropout_keep, dropout_scale, dropout_threshold


@triton.jit
def _row_stats(stats_h, rows, row_ok, STATS_N, MASK_KIND: tl.constexpr):
    """What backward subtracts from the scores to rebuild P = exp2(S - lse), as (a, b) with
    P = exp2((S - a) - b). Under a float mask a, b are the row max and log2(sum), kept apart as
    a huge finite mask can make the max so large that their fp32 sum loses log2(sum); otherwise
    a = lse and b is unused. Rows past the end, and rows that saw no key (max = -inf), get
    a = +inf, hence P = 0. The three planes of stats are STATS_N apart."""
    if MASK_KIND == 2:
        a = tl.load(stats_h + STATS_N + rows, mask=row_ok, other=float("inf"))
        b = tl.load(stats_h + 2 * STATS_N + rows, mask=row_ok, other=0.0)
    else:
        a = tl.load(stats_h + rows, mask=row_ok, other=float("inf"))
        b = a
    a = tl.where(a == float("-inf"), float("inf"), a)
    return a, b


@triton.jit
def _dkdv_block(dk, dv, k, v, kp_cols, q_ptrs, do_ptrs, mask_ptr, kpm_ptr, STATS_H, DELTA_H,
                start_m, start_n, offs_m, offs_n, d_ok, seed, bh, qk_scale, drop_threshold,
                dropout_scale, stride_qm, stride_dom, stride_mm, stride_mn, stride_kpmn,
                N_Q, N_K, STATS_N, causal_offset,
                CHECK_BOUNDS: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Works on transposed tiles (keys x queries) so that P^T and dS^T feed the dots directly.
    rows = start_m + offs_m
    row_ok = rows < N_Q
    q = tl.load(q_ptrs + start_m * stride_qm, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(do_ptrs + start_m * stride_dom, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    stat_a, stat_b = _row_stats(STATS_H, rows, row_ok, STATS_N, MASK_KIND)
    delta = tl.load(DELTA_H + rows, mask=row_ok, other=0.0)
    sT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
    sT = mask_scores(sT, rows[None, :], offs_n[:, None], mask_ptr, kpm_ptr, stride_mm, stride_mn,
                     stride_kpmn, N_Q, N_K, causal_offset,
                     CHECK_BOUNDS, IS_CAUSAL, False, MASK_KIND)
    if HAS_KPM:
        sT = tl.where(kp_cols[:, None] != 0, sT, float("-inf"))
    if MASK_KIND == 2:
        pT = tl.math.exp2((sT - stat_a[None, :]) - stat_b[None, :])
    else:
        pT = tl.math.exp2(sT - stat_a[None, :])
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep = tl.trans(dropout_keep(seed, bh, start_m, start_n, drop_threshold, BLOCK_M, BLOCK_N))
        # Kept scores are worth dropout_scale times theirs; the factor is left to the end (dV,
        # and dK with delta read in units of 1 / dropout_scale): two multiplies fewer a score.
        pT_used = tl.where(keep, pT, 0.0)
        dpT = tl.where(keep, dpT, 0.0)
    else:
        pT_used = pT
    dv += tl.dot(pT_used.to(do.dtype), do, input_precision=DOT_PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, STATS, DELTA, MASK, KPM, KV_LO, KV_HI, SEED, CU_SEQLENS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_kpmb, stride_kpmn,
    H, N_Q, N_K, STATS_N, GROUP, qk_scale, sm_scale, drop_threshold, dropout_scale, causal_offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    H_KV = H // GROUP
    off_b = (bhk // H_KV).to(tl.int64)
    off_hk = (bhk % H_KV).to(tl.int64)
    seq0, N_Q, N_K = seq_bounds(CU_SEQLENS, off_b, N_Q, N_K, VARLEN)  # see _fwd_kernel
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_ok = (offs_n[:, None] < N_K) & d_ok[None, :]
    k = tl.load(K + off_b * stride_kb + off_hk * stride_kh + (seq0 + offs_n)[:, None] * stride_kn
                + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_hk * stride_vh + (seq0 + offs_n)[:, None] * stride_vn
                + offs_d[None, :], mask=kv_ok, other=0.0)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    kpm_ptr = KPM + off_b * stride_kpmb
    kp_cols = offs_n
    q_end = N_Q
    if HAS_KPM:
        kp_cols = tl.load(kpm_ptr + offs_n * stride_kpmn, mask=offs_n < N_K, other=0)
        lo = tl.load(KV_LO + off_b)
        hi = tl.load(KV_HI + off_b)
        # A key block wholly in the padding gets zero gradients without touching any query.
        q_end = tl.where((start_n >= hi) | (start_n + BLOCK_N <= lo), 0, N_Q)
    if VARLEN:
        # Key blocks past this sequence's end (the grid is sized for the longest) do nothing.
        q_end = tl.where(start_n < N_K, N_Q, 0)

    # Query blocks that can see this key block: row i sees key j iff j <= i + causal_offset.
    q_lo = 0
    q_full = 0
    if IS_CAUSAL:
        q_lo = tl.maximum(start_n - causal_offset, 0)
        q_lo = (q_lo // BLOCK_M) * BLOCK_M
        # From q_full on, every row of the block sees every key of this block.
        q_full = start_n + BLOCK_N - 1 - causal_offset
        q_full = tl.maximum(q_lo, tl.cdiv(tl.maximum(q_full, 0), BLOCK_M) * BLOCK_M)
        q_full = tl.minimum(q_full, q_end)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        bh = off_b * H + off_h
        q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh
                  + (seq0 + offs_m)[:, None] * stride_qm + offs_d[None, :])
        do_ptrs = (DO + off_b * stride_dob + off_h * stride_doh
                   + (seq0 + offs_m)[:, None] * stride_dom + offs_d[None, :])
        mask_ptr = MASK + off_b * stride_mb + off_h * stride_mh
        STATS_H = STATS + row_stats_base(bh, off_h, seq0, STATS_N, 3, VARLEN)
        DELTA_H = DELTA + row_stats_base(bh, off_h, seq0, STATS_N, 1, VARLEN)
        for start_m in range(q_lo, q_full, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, kp_cols, q_ptrs, do_ptrs, mask_ptr, kpm_ptr, STATS_H, DELTA_H,
                start_m, start_n, offs_m, offs_n, d_ok, seed, bh, qk_scale, drop_threshold,
                dropout_scale, stride_qm, stride_dom, stride_mm, stride_mn, stride_kpmn, N_Q, N_K,
                STATS_N, causal_offset, True, IS_CAUSAL, HAS_KPM, MASK_KIND, HAS_DROPOUT,
                DOT_PRECISION, BLOCK_M, BLOCK_N)
        for start_m in range(q_full, q_end, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, kp_cols, q_ptrs, do_ptrs, mask_ptr, kpm_ptr, STATS_H, DELTA_H,
                start_m, start_n, offs_m, offs_n, d_ok, seed, bh, qk_scale, drop_threshold,
                dropout_scale, stride_qm, stride_dom, stride_mm, stride_mn, stride_kpmn, N_Q, N_K,
                STATS_N, causal_offset, False, IS_CAUSAL, HAS_KPM, MASK_KIND, HAS_DROPOUT,
                DOT_PRECISION, BLOCK_M, BLOCK_N)

    if HAS_DROPOUT:
        dk = dk * (sm_scale * dropout_scale)
        dv = dv * dropout_scale
    else:
        dk = dk * sm_scale
    tl.store(DK + off_b * stride_dkb + off_hk * stride_dkh + (seq0 + offs_n)[:, None] * stride_dkn
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + (seq0 + offs_n)[:, None] * stride_dvn
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_block(dq, dp_sum, q, do, stat_a, stat_b, delta, k_ptrs, v_ptrs, mask_ptr, kpm_ptr,
              start_m, start_n, offs_m, offs_n, d_ok, seed, bh, qk_scale, drop_threshold,
              dropout_scale, stride_kn, stride_vn, stride_mm, stride_mn, stride_kpmn, N_Q, N_K,
              causal_offset,
              CHECK_BOUNDS: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
              MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = start_n + offs_n
    if CHECK_BOUNDS:
        kv_mask = (cols[:, None] < N_K) & d_ok[None, :]
    else:
        kv_mask = d_ok[None, :]
    k = tl.load(k_ptrs + start_n * stride_kn, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs + start_n * stride_vn, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s = mask_scores(s, offs_m[:, None], cols[None, :], mask_ptr, kpm_ptr, stride_mm, stride_mn,
                    stride_kpmn, N_Q, N_K, causal_offset,
                    CHECK_BOUNDS, IS_CAUSAL, HAS_KPM, MASK_KIND)
    if MASK_KIND == 2:
        p = tl.math.exp2((s - stat_a[:, None]) - stat_b[:, None])
    else:
        p = tl.math.exp2(s - stat_a[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, bh, start_m, start_n, drop_threshold, BLOCK_M, BLOCK_N)
        # dropout_scale is left to the end, as in _dkdv_block.
        dp = tl.where(keep, dp, 0.0)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq, dp_sum + tl.sum(p * dp, 1)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, O, DO, DQ, STATS, DELTA, DLSE, MASK, KPM, KV_LO, KV_HI, SEED, CU_SEQLENS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_kpmb, stride_kpmn,
    H, N_Q, N_K, STATS_N, GROUP, qk_scale, sm_scale, drop_threshold, dropout_scale, causal_offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_DLSE: tl.constexpr,
    VARLEN: tl.constexpr,
):
    # Runs before the dK/dV kernel: it also writes delta, which that kernel reads.
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        # Later query blocks see more keys: start them first, so the last wave of the
        # grid holds the short blocks instead of a few long ones (the tail effect).
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    off_hk = off_h // GROUP
    seq0, N_Q, N_K = seq_bounds(CU_SEQLENS, off_b, N_Q, N_K, VARLEN)  # see _fwd_kernel
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N_Q
    q_mask = m_ok[:, None] & d_ok[None, :]
    rows = seq0 + offs_m  # in the tensor
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm
                + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows[:, None] * stride_dom
                 + offs_d[None, :], mask=q_mask, other=0.0)
    stats_h = STATS + row_stats_base(bh, off_h, seq0, STATS_N, 3, VARLEN)
    stat_a, stat_b = _row_stats(stats_h, offs_m, m_ok, STATS_N, MASK_KIND)
    # delta_i = rowsum(P * dP) = sum_d dO_id * O_id, the softmax-backward correction term. This
    # program's own dS takes the second form, the only one known before its key loop. But O is
    # rounded to its 16-bit dtype, so that delta carries noise of ~eps * |dO| |O|, and where a
    # row's P is (near) one-hot, dS = P * (dP - delta) should cancel to ~0 and keeps the noise
    # instead. A query row adds its noise to dQ once; in dK of the key it attends to, the noise of
    # every such row adds up (a one-key row under key padding: 256 rows gave 9x the fp16
    # reference's dK error). So the key loop also sums P * dP in fp32, and that exact first form
    # is what the dK/dV kernel reads.
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_om
                + offs_d[None, :], mask=q_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    dlse_e = 0.0
    if HAS_DLSE:
        # The lse is differentiable too: d(lse_e)/dS = P, so its gradient folds into the
        # correction term, dS = P * (dP - (delta - dlse_e)); dlse_e in base 2 is dlse * log2(e).
        dlse = tl.load(DLSE + row_stats_base(bh, off_h, seq0, STATS_N, 1, VARLEN) + offs_m,
                       mask=m_ok, other=0.0)
        dlse_e = dlse * 1.4426950408889634
        delta -= dlse_e
    if HAS_DROPOUT:
        # The key loop leaves dP's dropout_scale out (a multiply fewer a score), so delta, and dS
        # with it, are taken in units of 1 / dropout_scale; dQ gets the factor at the end, and
        # dK/dV reads delta in the same units.
        dlse_e = dlse_e / dropout_scale
        delta = delta / dropout_scale
    k_ptrs = (K + off_b * stride_kb + off_hk * stride_kh
              + (seq0 + offs_n)[:, None] * stride_kn + offs_d[None, :])
    v_ptrs = (V + off_b * stride_vb + off_hk * stride_vh
              + (seq0 + offs_n)[:, None] * stride_vn + offs_d[None, :])
    mask_ptr = MASK + off_b * stride_mb + off_h * stride_mh
    kpm_ptr = KPM + off_b * stride_kpmb
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    lo, full_hi, hi = key_range(KV_LO, KV_HI, off_b, start_m, N_Q, N_K, causal_offset, IS_CAUSAL,
                                HAS_KPM, VARLEN, BLOCK_M, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dp_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(lo, full_hi, BLOCK_N):
        dq, dp_sum = _dq_block(dq, dp_sum, q, do, stat_a, stat_b, delta, k_ptrs, v_ptrs,
                               mask_ptr, kpm_ptr, start_m, start_n, offs_m, offs_n, d_ok, seed,
                               bh, qk_scale, drop_threshold, dropout_scale,
                               stride_kn, stride_vn, stride_mm, stride_mn, stride_kpmn, N_Q, N_K,
                               causal_offset, False, IS_CAUSAL, HAS_KPM, MASK_KIND, HAS_DROPOUT,
                               DOT_PRECISION, BLOCK_M, BLOCK_N)
    for start_n in range(full_hi, hi, BLOCK_N):
        dq, dp_sum = _dq_block(dq, dp_sum, q, do, stat_a, stat_b, delta, k_ptrs, v_ptrs,
                               mask_ptr, kpm_ptr, start_m, start_n, offs_m, offs_n, d_ok, seed,
                               bh, qk_scale, drop_threshold, dropout_scale,
                               stride_kn, stride_vn, stride_mm, stride_mn, stride_kpmn, N_Q, N_K,
                               causal_offset, True, IS_CAUSAL, HAS_KPM, MASK_KIND, HAS_DROPOUT,
                               DOT_PRECISION, BLOCK_M, BLOCK_N)
    tl.store(DELTA + row_stats_base(bh, off_h, seq0, STATS_N, 1, VARLEN) + offs_m,
             dp_sum - dlse_e, mask=m_ok)
    if HAS_DROPOUT:
        dq = dq * (sm_scale * dropout_scale)
    else:
        dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + rows[:, None] * stride_dqm
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


# dq and dkdv are tuned apart over the same list. Each keeps one block resident (dq: BLOCK_M query
# rows; dkdv: BLOCK_N key rows) and streams the other, so the lopsided tiles serve one kernel each:
# (128, 32) a resident query block for dq, (32, 128) a resident key block for dkdv (at head dim 128
# the H200 picked (64, 32) and (32, 64) from the square-ish rest). (32, 128) with 8 warps compiles
# for sm_90 without spills at head dim 128, where 4 warps spill ~1 KB a thread. Not listed:
# (64, 64) with 8 warps and 3 stages, which gave wrong dQ on an H200 (Triton 3.6) at lengths
# divisible by 16 (docs/perf-notes.md, "Atomic dQ"). The last two have two stages: at GPT-2's
# causal shape (32, 64) ran dK/dV 4.5 % faster than the best three-stage tile on three H200s, and
# the tuner takes it there; (64, 64) with 4 warps and 2 stages, already the head-dim-64 default,
# is listed for head dim 128, where the tuner took it for dQ at 4k (docs/perf-notes.md, "Launch
# configs, forced and timed in turn").
_BWD_CONFIGS = [cfg(64, 128, 8, 2), cfg(64, 64, 4, 3), cfg(128, 64, 8, 2), cfg(32, 64, 4, 3),
                cfg(64, 32, 4, 3), cfg(32, 32, 4, 2), cfg(128, 32, 8, 3), cfg(32, 128, 4, 3),
                cfg(32, 128, 8, 2), cfg(32, 64, 4, 2), cfg(64, 64, 4, 2)]


def _bwd_candidates(block_d, elt_size):
    first = default_config("bwd", block_d, elt_size)
    if not AUTOTUNE:
        return [first]
    # Two resident tiles (K, V or Q, dO) plus two streamed, pipelined tiles.
    kept = [c for c in _BWD_CONFIGS if smem_ok(c, block_d, elt_size, 2, 2)]
    return [first] + [c for c in kept if c != first]


@on_inputs_device
def attention_backward(do, q, k, v, o, stats, dlse, mask, mask_kind, kpm, kv_lo, kv_hi, causal,
                       causal_offset, scale, dropout_p, seed, cu_seqlens=None, max_seqlen=0):
    """Launch the backward kernels; returns (dq, dk, dv) with the layouts of q, k, v. Packed
    sequences (`cu_seqlens`, `max_seqlen`) as in attention_forward."""
    B, H, N_Q, D = q.shape
    H_KV, N_K = k.shape[1], k.shape[2]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if _common.POISON_OUTPUTS:
        for t in (dq, dk, dv):
            t.fill_(float("nan"))
    if N_Q == 0 or N_K == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    varlen = cu_seqlens is not None
    delta = stats.new_empty((B, H, N_Q))
    if _common.POISON_OUTPUTS:
        delta.fill_(float("nan"))
    if dlse is not None:
        dlse = dlse.float().contiguous()
    mask_t = mask if mask is not None else q
    kpm_t = kpm if kpm is not None else q
    lo_t = kv_lo if kv_lo is not None else stats
    hi_t = kv_hi if kv_hi is not None else stats
    seed_t = seed if seed is not None else stats
    cu_t = cu_seqlens if varlen else stats
    dq_tensors = (q, k, v, o, do, dq, stats, delta, dlse if dlse is not None else stats, mask_t,
                  kpm_t, lo_t, hi_t, seed_t, cu_t)
    dkdv_tensors = (q, k, v, do, dk, dv, stats, delta, mask_t, kpm_t, lo_t, hi_t, seed_t, cu_t)
    # On Hopper, part or all of the backward may be _backward_hopper.py's Gluon kernel: which is
    # part of the signature, as its switches (ENABLED, FUSED, the length floors, deterministic
    # mode) may change between calls.
    hopper = _backward_hopper.route(q, k, v, o, do, dk, dv, mask, kpm, dropout_p, varlen, causal,
                                    causal_offset, scale)
    # As in attention_forward, with what only the backward takes (dO; the saved o and stats).
    sig = ("bwd", call_signature(q, k, v, mask, mask_kind, kpm, kv_lo, kv_hi, seed, cu_seqlens,
                                 max_seqlen, causal, causal_offset, scale, dropout_p),
           o.stride(), do.dtype, do.stride(), stats.shape, stats.stride(),
           None if dlse is None else dlse.shape, hopper)
    everything = (*dq_tensors, dk, dv)
    plan = _tuning.planned(sig, everything)
    if plan is not None:
        plan[0](dq_tensors, dkdv_tensors)
        return dq, dk, dv
    if hopper == "fused":
        # dQ, dK and dV from one Gluon kernel. The plan keeps its compiled launches.
        has_dlse, has_kpm = dlse is not None, kpm is not None
        launches = _hopper.Launches()

        def go(dq_t, dkdv_t):
            q, k, v, o, do, dq, stats, _, dlse_t = dq_t[:9]
            kpm_t, lo_t, hi_t = dkdv_t[9:12] if has_kpm else (None, None, None)
            _backward_hopper.backward(q, k, v, o, do, dq, dkdv_t[4], dkdv_t[5], stats,
                                      dlse_t if has_dlse else None, causal, causal_offset, scale,
                                      launches=launches, dropout_p=dropout_p,
                                      seed=dkdv_t[12], kpm=kpm_t, kv_lo=lo_t, kv_hi=hi_t)
        go(dq_tensors, dkdv_tensors)
        _tuning.remember(sig, everything, (go,))
        return dq, dk, dv
    n_batch = cu_seqlens.numel() - 1 if varlen else B
    rows_q, rows_k = (max_seqlen, max_seqlen) if varlen else (N_Q, N_K)
    block_d = max(16, next_pow2(D))
    mask_strides = mask.stride() if mask is not None else (0, 0, 0, 0)
    kpm_strides = kpm.stride() if kpm is not None else (0, 0)
    group = H // H_KV
    constexprs = dict(HEAD_DIM=D, BLOCK_D=block_d, IS_CAUSAL=causal, HAS_KPM=kpm is not None,
                      MASK_KIND=mask_kind, HAS_DROPOUT=dropout_p > 0,
                      DOT_PRECISION=dot_precision(q.dtype), VARLEN=varlen,
                      enable_fp_fusion=fp_fusion(q.dtype))  # a compile option, passed alike
    scalars = (H, *length_args(rows_q, rows_k, varlen), N_Q, group,
               scale * 1.4426950408889634, scale,
               float(dropout_threshold(dropout_p)), dropout_scale(dropout_p),
               causal_offset)
    key = (bucket(rows_q), bucket(rows_k), n_batch * H > 64, group, q.dtype, q.device.index,
           *constexprs.values())
    candidates = lambda: _bwd_candidates(block_d, q.element_size())  # noqa: E731
    strides = (*row_strides(q, varlen), *row_strides(k, varlen), *row_strides(v, varlen))
    go_dq = _tuning.launch(
        _bwd_dq_kernel, "dq", key, candidates,
        lambda c: (cdiv(rows_q, c["BLOCK_M"]), n_batch * H), dq_tensors,
        (*strides, *row_strides(o, varlen), *row_strides(do, varlen), *row_strides(dq, varlen),
         *mask_strides, *kpm_strides, *scalars),
        {**constexprs, "HAS_DLSE": dlse is not None}, outputs=(5, 7))  # dq, delta
    if hopper == "dkdv":
        # From the delta the dQ kernel has just written.
        launches = _hopper.Launches()

        def go_dkdv(t):
            _backward_hopper.dkdv(*t[:8], causal, causal_offset, scale, launches=launches)
        go_dkdv(dkdv_tensors)
    else:
        go_dkdv = _tuning.launch(
            _bwd_dkdv_kernel, "dkdv", key, candidates,
            lambda c: (cdiv(rows_k, c["BLOCK_N"]), n_batch * H_KV), dkdv_tensors,
            (*strides, *row_strides(do, varlen), *row_strides(dk, varlen),
             *row_strides(dv, varlen), *mask_strides, *kpm_strides, *scalars), constexprs,
            outputs=(4, 5))  # dk, dv
    # The plan's one launcher takes both kernels' tensors (as the fused route's does).
    both = (None if go_dq is None or go_dkdv is None
            else lambda dq_t, dkdv_t: (go_dq(dq_t), go_dkdv(dkdv_t)))
    _tuning.remember(sig, everything, (both,))
    return dq, dk, dv
