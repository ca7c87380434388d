"""Forward kernel: one program per (query block, batch x head), online softmax over key blocks."""

import torch
import triton
import triton.language as tl

from . import _common
from . import _forward_hopper, _hopper
from . import _tuning
from ._common import (AUTOTUNE, bucket, call_signature, cdiv, cfg, default_config,
                      dot_precision, forward_outputs, fp_fusion, key_range, length_args,
                      mask_scores, next_pow2, on_inputs_device, row_stats_base, row_strides,
                      seq_bounds, smem_ok)
from ._dropout import dropout_keep, dropout_scale, dropout_threshold


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptr, kpm_ptr, start_m, start_n, offs_m,
               offs_n,
               d_ok, seed, bh, qk_scale, drop_threshold,
               stride_kn, stride_vn, stride_mm, stride_mn, stride_kpmn,
               N_Q, N_K, causal_offset,
               CHECK_BOUNDS: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
               MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
               CAN_BE_EMPTY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = start_n + offs_n
    if CHECK_BOUNDS:
        kv_mask = (cols[:, None] < N_K) & d_ok[None, :]
    else:
        kv_mask = d_ok[None, :]
    k = tl.load(k_ptrs + start_n * stride_kn, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s = mask_scores(s, offs_m[:, None], cols[None, :], mask_ptr, kpm_ptr, stride_mm, stride_mn,
                    stride_kpmn, N_Q, N_K, causal_offset,
                    CHECK_BOUNDS, IS_CAUSAL, HAS_KPM, MASK_KIND)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if CAN_BE_EMPTY:
        # A row with every score so far masked has m_new = -inf; subtracting 0 instead keeps
        # exp2(-inf - -inf) = NaN out of the sums.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:
        # The normaliser l_i sums the undropped probabilities; only the values see the mask.
        keep = dropout_keep(seed, bh, start_m, start_n, drop_threshold, BLOCK_M, BLOCK_N)
        p = tl.where(keep, p, 0.0)
    v = tl.load(v_ptrs + start_n * stride_vn, mask=kv_mask, other=0.0)
    acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(
    Q, K, V, O, STATS, MASK, KPM, KV_LO, KV_HI, SEED, CU_SEQLENS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_kpmb, stride_kpmn,
    H, N_Q, N_K, STATS_N, GROUP, qk_scale, drop_threshold, dropout_scale, causal_offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        # Later query blocks see more keys: start them first, so the last wave of the
        # grid holds the short blocks instead of a few long ones (the tail effect).
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    off_hk = off_h // GROUP  # grouped-query attention: GROUP query heads share one K/V head
    # Packed sequences (VARLEN): entry off_b of the batch is sequence off_b of the packed rows,
    # rows [seq0, seq0 + its length) of tensors whose batch stride is passed as 0.
    seq0, N_Q, N_K = seq_bounds(CU_SEQLENS, off_b, N_Q, N_K, VARLEN)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N_Q

    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh
              + (seq0 + offs_m)[:, None] * stride_qm + offs_d[None, :])
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
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

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptr, kpm_ptr, start_m, start_n, offs_m, offs_n,
            d_ok, seed, bh, qk_scale, drop_threshold, stride_kn, stride_vn, stride_mm, stride_mn,
            stride_kpmn, N_Q, N_K, causal_offset,
            False, IS_CAUSAL, HAS_KPM, MASK_KIND, HAS_DROPOUT, DOT_PRECISION,
            HAS_KPM or MASK_KIND != 0, BLOCK_M, BLOCK_N)
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptr, kpm_ptr, start_m, start_n, offs_m, offs_n,
            d_ok, seed, bh, qk_scale, drop_threshold, stride_kn, stride_vn, stride_mm, stride_mn,
            stride_kpmn, N_Q, N_K, causal_offset,
            True, IS_CAUSAL, HAS_KPM, MASK_KIND, HAS_DROPOUT, DOT_PRECISION,
            True, BLOCK_M, BLOCK_N)

    # Rows with no visible key (l_i == 0) return zeros and lse = -inf instead of 0/0 = NaN.
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        o = o * dropout_scale
    log2_l = tl.math.log2(tl.where(empty, 1.0, l_i))
    lse = tl.where(empty, float("-inf"), m_i + log2_l)
    o_ptrs = (O + off_b * stride_ob + off_h * stride_oh
              + (seq0 + offs_m)[:, None] * stride_om + offs_d[None, :])
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    # STATS is (B, H, 3, STATS_N): the lse, then its two terms, the row max and log2(sum).
    # Backward under an additive float mask rebuilds P from the terms: a mask of -1e9 on every key
    # of a row makes |max| ~ 1.4e9, where fp32 rounding drops log2(sum) from their sum entirely.
    stats = STATS + row_stats_base(bh, off_h, seq0, STATS_N, 3, VARLEN) + offs_m
    tl.store(stats, lse, mask=m_ok)
    tl.store(stats + STATS_N, m_i, mask=m_ok)
    tl.store(stats + 2 * STATS_N, log2_l, mask=m_ok)


_FWD_CONFIGS = [cfg(128, 128, 8, 3), cfg(128, 64, 8, 3), cfg(128, 64, 4, 3), cfg(128, 32, 4, 4),
                cfg(64, 64, 4, 3), cfg(64, 32, 4, 4), cfg(32, 32, 4, 2)]


def _fwd_candidates(block_d, elt_size, n_q):
    first = default_config("fwd", block_d, elt_size)
    if n_q <= 16:
        # Decode steps (one query row, or a folded group of a few): a 16-row block instead of
        # 64-128 mostly-empty rows. For sm_90 with key padding at head dim 64 (bf16) it compiles
        # to 96-124 registers and no spills against the 128-row default's 255 (and 104 bytes of
        # spills with Triton 3.9), in 55 % fewer instructions (scripts/compile_kernels.py --short).
        first = {**first, "BLOCK_M": 16}
        if "num_warps" in first:
            first["num_warps"] = 4
    if not AUTOTUNE:
        return [first]
    kept = [c for c in _FWD_CONFIGS if smem_ok(c, block_d, elt_size, 1, 2)]
    # Short query sequences waste most of a 128-row block: drop those configs there.
    kept = [c for c in kept if c["BLOCK_M"] <= max(32, next_pow2(n_q))] or [first]
    return [first] + [c for c in kept if c != first]


@on_inputs_device
def attention_forward(q, k, v, mask, mask_kind, kpm, kv_lo, kv_hi, causal, causal_offset,
                      scale, dropout_p, seed, cu_seqlens=None, max_seqlen=0):
    """Launch the forward kernel. Returns (out with q's layout, stats): stats is fp32 (B, H, 3, Nq)
    holding, in base 2, the lse and its two terms (row max, log2 of the row sum).

    With `cu_seqlens` (int32, n + 1 cumulative lengths) q, k, v are (1, H, total, D): n sequences
    packed along the rows, the longest `max_seqlen` long, each attending only within itself."""
    varlen = cu_seqlens is not None
    gluon = _forward_hopper.eligible(q, k, v, mask, kpm, dropout_p, varlen, causal, causal_offset,
                                     scale)
    # A call with the same signature repeats these launches (_tuning's plans). Which kernel
    # serves is part of it: its switches and floors may change between calls.
    sig = ("fwd", call_signature(q, k, v, mask, mask_kind, kpm, kv_lo, kv_hi, seed, cu_seqlens,
                                 max_seqlen, causal, causal_offset, scale, dropout_p), gluon)
    if gluon:
        # The Gluon forward makes its own outputs; its plan keeps the compiled launch.
        plan = _tuning.planned(sig, (q, k, v))
        launches = plan[0] if plan is not None else _hopper.Launches()
        out = _forward_hopper.attention_forward(q, k, v, causal, causal_offset, scale,
                                                launches=launches)
        if plan is None:
            _tuning.remember(sig, (q, k, v), (launches,))
        return out
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    o, stats = forward_outputs(q, torch.empty_like(q))
    if N_Q == 0:
        return o, stats
    mask_t = mask if mask is not None else q  # any tensor: never read when MASK_KIND is 0
    kpm_t = kpm if kpm is not None else q
    lo_t = kv_lo if kv_lo is not None else stats
    hi_t = kv_hi if kv_hi is not None else stats
    seed_t = seed if seed is not None else stats
    cu_t = cu_seqlens if varlen else stats
    tensors = (q, k, v, o, stats, mask_t, kpm_t, lo_t, hi_t, seed_t, cu_t)
    plan = _tuning.planned(sig, tensors)
    if plan is not None:
        plan[0](tensors)
        return o, stats
    n_batch = cu_seqlens.numel() - 1 if varlen else B
    rows_q, rows_k = (max_seqlen, max_seqlen) if varlen else (N_Q, N_K)
    mask_strides = mask.stride() if mask is not None else (0, 0, 0, 0)
    kpm_strides = kpm.stride() if kpm is not None else (0, 0)
    block_d = max(16, next_pow2(D))
    group = H // k.shape[1]
    scalars = (*row_strides(q, varlen), *row_strides(k, varlen), *row_strides(v, varlen),
               *row_strides(o, varlen), *mask_strides, *kpm_strides,
               H, *length_args(rows_q, rows_k, varlen), N_Q, group, scale * 1.4426950408889634,
               float(dropout_threshold(dropout_p)), dropout_scale(dropout_p), causal_offset)
    constexprs = dict(HEAD_DIM=D, BLOCK_D=block_d, IS_CAUSAL=causal, HAS_KPM=kpm is not None,
                      MASK_KIND=mask_kind, HAS_DROPOUT=dropout_p > 0,
                      DOT_PRECISION=dot_precision(q.dtype), VARLEN=varlen,
                      enable_fp_fusion=fp_fusion(q.dtype))  # a compile option, passed alike
    key = (bucket(rows_q), bucket(rows_k), n_batch * H > 64, group, q.dtype, q.device.index,
           *constexprs.values())
    go = _tuning.launch(_fwd_kernel, "fwd", key,
                        lambda: _fwd_candidates(block_d, q.element_size(), rows_q),
                        lambda c: (cdiv(rows_q, c["BLOCK_M"]), n_batch * H), tensors, scalars,
                        constexprs, outputs=(3, 4))  # o, stats
    _tuning.remember(sig, tensors, (go,))
    return o, stats
