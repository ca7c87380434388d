"""Pieces shared by the forward and backward kernels: score masking, launch configs, helpers."""

import functools
import os

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether @triton.jit builds GPU code or the CPU interpreter, so
# this is read once, when the kernels are defined.
try:
    INTERPRET = bool(triton.knobs.runtime.interpret)
except AttributeError:  # older Triton without knobs
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# HF_FLASH_AUTOTUNE=0 launches one heuristic config per shape class instead of autotuning: every
# autotuned key compiles and times several configs, which a large test grid cannot afford.
AUTOTUNE = os.environ.get("HF_FLASH_AUTOTUNE", "1") != "0" and not INTERPRET
# Shape classes below this many (bucketed) scores per head are not tuned: such a call runs in a few
# microseconds, under its own launch cost, so no config can win back what timing the candidates
# costs (a compile per candidate, seconds each). Short-sentence fine-tuning and KV-cache decoding
# meet a new length bucket every few steps; they take the heuristic config, as AUTOTUNE=0 does.
TUNE_MIN_SCORES = 512 * 512

# Tests set this to fill every output with NaN before launch, so an element a kernel forgets to
# write shows up instead of hiding behind whatever the allocator returned.
POISON_OUTPUTS = False

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Mask kinds the kernels understand (a constexpr, so each kind compiles its own variant).
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2
# Causal alignments: top-left is PyTorch's is_causal; bottom-right is what decoding with a KV cache
# needs (the last query sees every key).
CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT = 0, 1, 2


@triton.jit
def mask_scores(s, rows, cols, mask_ptr, kpm_ptr, stride_mm, stride_mn, stride_kpmn,
                N_Q, N_K, causal_offset,
                CHECK_BOUNDS: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                MASK_KIND: tl.constexpr):
    """Apply every mask to a tile of base-2 scores.

    `rows` and `cols` are broadcast index tensors of the tile (either orientation), `mask_ptr` and
    `kpm_ptr` already point at this (batch, head)'s dense mask and this batch's key padding row.
    Masked scores become -inf; an additive mask is added (scaled to base 2).
    """
    if CHECK_BOUNDS:
        s = tl.where(cols < N_K, s, float("-inf"))
        if IS_CAUSAL:
            s = tl.where(cols <= rows + causal_offset, s, float("-inf"))
    if HAS_KPM:
        kp = tl.load(kpm_ptr + cols * stride_kpmn, mask=cols < N_K, other=0)
        s = tl.where(kp != 0, s, float("-inf"))
    if MASK_KIND != 0:
        in_bounds = (rows < N_Q) & (cols < N_K)
        m = tl.load(mask_ptr + rows * stride_mm + cols * stride_mn, mask=in_bounds, other=0)
        if MASK_KIND == 1:
            s = tl.where(m != 0, s, float("-inf"))
        else:
            # One explicit FMA, never left to the compiler: fused in one kernel and not in another,
            # the forward and the backward's recomputation would round S apart, by up to 128 at
            # |S| ~ 1.4e9 (a -1e9 mask), and P = exp2(S - lse) would be off by as much as 2^128.
            s = tl.fma(m.to(tl.float32), 1.4426950408889634, s)
    return s


@triton.jit
def seq_bounds(CU_SEQLENS, off_b, N_Q, N_K, VARLEN: tl.constexpr):
    """(first row, q_len, k_len) of batch entry `off_b`. With VARLEN the sequences are packed back
    to back along the rows and CU_SEQLENS holds their cumulative lengths (0 first); each one
    attends only within itself, so its q_len and k_len are its own length."""
    if VARLEN:
        seq0 = tl.load(CU_SEQLENS + off_b).to(tl.int64)
        n_q = (tl.load(CU_SEQLENS + off_b + 1) - seq0).to(tl.int32)
        n_k = n_q
    else:
        # int32 like the row offsets it is added to, so unpacked launches index as before.
        seq0 = tl.zeros([], dtype=tl.int32)
        n_q = N_Q
        n_k = N_K
    return seq0, n_q, n_k


@triton.jit
def key_range(KV_LO, KV_HI, off_b, start_m, N_Q, N_K, causal_offset, IS_CAUSAL: tl.constexpr,
              HAS_KPM: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """(lo, full_hi, hi): the key blocks a query block starting at row `start_m` walks, in
    steps of BLOCK_N from lo to hi; those below full_hi need no bounds or causal test. The
    forward and dq kernels both take it, so they walk the same blocks."""
    # Padded keys outside [lo, hi) are skipped as whole tiles.
    lo = 0
    hi = N_K
    if HAS_KPM:
        lo = tl.load(KV_LO + off_b)
        hi = tl.load(KV_HI + off_b)
    lo = (lo // BLOCK_N) * BLOCK_N
    full_hi = hi
    if IS_CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + causal_offset)
        # Blocks entirely at or below the diagonal for every row need no causal test.
        full_hi = tl.minimum(full_hi, start_m + 1 + causal_offset)
    full_hi = tl.maximum(lo, (full_hi // BLOCK_N) * BLOCK_N)
    if VARLEN:
        # Query blocks past this sequence's end (the grid is sized for the longest) walk no
        # keys: at lengths uniform in [N/2, N] they are an eighth of the grid's blocks.
        hi = tl.where(start_m < N_Q, hi, lo)
        full_hi = tl.where(start_m < N_Q, full_hi, lo)
    return lo, full_hi, hi


@triton.jit
def row_stats_base(bh, off_h, seq0, STATS_N, PLANES: tl.constexpr, VARLEN: tl.constexpr):
    """Offset of this (batch entry, head)'s first row in a per-row fp32 array laid out
    (B, H, PLANES, STATS_N); packed sequences share B = 1 and start at their first row."""
    if VARLEN:
        base = off_h * PLANES * STATS_N + seq0
    else:
        base = bh.to(tl.int64) * PLANES * STATS_N
    return base


def on_inputs_device(launcher):
    """Runs `launcher(t, ...)` with `t`'s CUDA device current. Triton compiles for, and launches
    on, the current device; a model spread over GPUs (device_map) runs its layers with another
    device current, where a launch would read memory of another GPU on a stream that does not
    wait for that GPU's work."""
    @functools.wraps(launcher)
    def run(t, *args, **kwargs):
        # (torch.cuda.current_device without its lazy-init check: t on a GPU means CUDA is up.)
        if t.is_cuda and t.get_device() != torch._C._cuda_getDevice():
            with torch.cuda.device(t.device):
                return launcher(t, *args, **kwargs)
        return launcher(t, *args, **kwargs)
    return run


def call_signature(q, k, v, mask, mask_kind, kpm, kv_lo, kv_hi, seed, cu_seqlens, max_seqlen,
                   causal, causal_offset, scale, dropout_p) -> tuple:
    """What the launches of a forward or backward call derive from, apart from the tensors'
    addresses: the key of its plan (_tuning.planned). Outputs made inside (o, dq, dk, dv,
    stats, delta) are laid out from these. The device is q's, current while the launchers run
    (on_inputs_device)."""
    return (q.get_device(), q.dtype, q.shape, q.stride(), k.shape, k.stride(), v.shape,
            v.stride(),
            None if mask is None else (mask.dtype, mask_kind, mask.stride()),
            None if kpm is None else (kpm.dtype, kpm.stride(), kv_lo.dtype, kv_hi.dtype),
            None if seed is None else seed.dtype,
            None if cu_seqlens is None else (cu_seqlens.dtype, cu_seqlens.shape, max_seqlen),
            causal, causal_offset, scale, dropout_p)


def default_config(kind: str, head_dim_padded: int, elt_size: int) -> dict:
    """The config used when not autotuning (and under the interpreter)."""
    if INTERPRET:
        return {"BLOCK_M": 32, "BLOCK_N": 32}
    if elt_size >= 4:
        # fp32 multiplies in true fp32 (dot_precision), on CUDA cores rather than tensor cores,
        # which needs far more registers per tile: for sm_90 the bf16-sized tiles spill 2-10 KB
        # per thread at head dims 64 and 128, 32 x 32 with 4 warps little or nothing (forward
        # and dq at head dim 64: none; compile-only survey, Triton 3.9, docs/perf-notes.md).
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4,
                "num_stages": 2 if head_dim_padded <= 128 else 1}
    wide = head_dim_padded * elt_size  # bytes per row of a tile
    if kind == "fwd":
        if wide <= 128:
            return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
        if wide <= 256:
            return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
        if wide <= 512:
            return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if wide <= 128:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    if wide <= 256:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def forward_outputs(q: "torch.Tensor", o: "torch.Tensor") -> tuple:
    """(o, stats) for a forward launch: stats is fp32 (B, H, 3, N_Q); both NaN under
    POISON_OUTPUTS."""
    B, H, N_Q, _ = q.shape
    stats = torch.empty((B, H, 3, N_Q), device=q.device, dtype=torch.float32)
    if POISON_OUTPUTS:
        o.fill_(float("nan"))
        stats.fill_(float("nan"))
    return o, stats


def row_strides(t: "torch.Tensor", varlen: bool) -> tuple:
    """(batch, head, row) strides as the kernels take them; packed sequences are told apart by
    their first row, not by a batch index, so their batch stride is 0."""
    st = t.stride()
    return (0, st[1], st[2]) if varlen else (st[0], st[1], st[2])


def dropout_seed(device) -> "torch.Tensor":
    """The dropout seed for one launch: drawn on the tensors' device from torch's generator, so
    torch.manual_seed makes runs repeatable, with no host sync, and safe in a CUDA graph."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def bucket(n: int) -> int:
    """Round a length up to a power of two: the autotuner keys on this to bound re-tuning."""
    return 1 << max(n - 1, 0).bit_length()


# Plain-Python forms of triton.next_power_of_2 and triton.cdiv for the launch path: Triton's are
# constexpr functions whose wrapper costs ~2 us a call, several times per attention call.
next_pow2 = bucket


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def length_args(rows_q: int, rows_k: int, varlen: bool) -> tuple:
    """The N_Q, N_K the kernels are launched with, from the lengths that size the grid. Packed
    sequences read their own lengths from cu_seqlens in the kernel, so these are dead there; they
    go as the longest length rounded up to a multiple of 16, which Triton specialises one way
    only, instead of compiling a second variant whenever the longest sequence of a batch is not
    a multiple of 16 (same code)."""
    if varlen:
        return (cdiv(rows_q, 16) * 16,) * 2
    return rows_q, rows_k


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products: TF32 would lose ~3 decimal digits against what a user of
    # fp32 expects (and against PyTorch's math path).
    return "ieee" if dtype == torch.float32 else "tf32"


def fp_fusion(dtype: torch.dtype) -> bool:
    """Whether the compiler may fuse a multiply and an add into one FMA (Triton's
    `enable_fp_fusion`): not for fp32. The backward recomputes P = exp2(S - lse) from scores it
    computes again, which is exact only if every kernel rounds S as the forward did, and where
    the compiler fuses depends on each kernel's code around it. (On an H200 a row whose only key
    carried an fp32 mask of -1e4 got P = 1.000677 in the backward: for that call, Triton 3.6's
    sm_90 code added the mask in one FMA in the forward and apart in dK/dV; docs/reliability.md.)
    The mask's add is an explicit FMA in every kernel (mask_scores); unfused, fp32 rounds every
    other product and sum on its own, alike everywhere. The 16-bit paths keep fusion for speed:
    what it can still round apart is an unmasked tile's scaled score, by half a step of |S|,
    far below their own rounding for scores of any usual size."""
    return dtype != torch.float32


def smem_ok(cfg: dict, head_dim_padded: int, elt_size: int, tiles_m: int, tiles_n: int,
            limit: int = 227 * 1024) -> bool:
    """Rough shared-memory estimate: pipelined K/V (or Q/dO) tiles times stages."""
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    need = (tiles_m * bm + tiles_n * bn * cfg["num_stages"]) * head_dim_padded * elt_size
    return need <= limit


def cfg(bm, bn, warps, stages) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
