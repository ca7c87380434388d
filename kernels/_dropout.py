"""Attention dropout from a counter-based RNG.

The keep/drop decision for score (b, h, i, j) is a pure function of (seed, b*H + h, i, j): Philox
with the row, column and head as its counter. The forward kernel and both backward kernels call the
same helper, so backward regenerates exactly the mask forward used and the mask is never stored.

Each decision compares 16 random bits with an integer threshold, so the drop probability is p
rounded to a multiple of 2^-16 (at most 7.6e-6 away; `effective_dropout_p` says exactly what it
is) and the kept scores are scaled by 1 / (1 - that probability), which keeps the output
unbiased. 16 bits instead of 32 halve the Philox work (the draws are made three times: in the
forward, and again in each backward kernel).

Philox4x32 runs 7 rounds, not Triton's default of 10, as FlashAttention-2's dropout does. 10 is
the Random123 authors' default for general use, with a margin over the rounds their statistical
tests need; a dropout mask needs far less, and tests/test_kernel.py checks what it relies on (the
kept fraction, independence of neighbouring columns, rows and heads, no bias by column slot).
The three fewer rounds made attention with dropout 5-8 % faster, forward and backward together
(docs/perf-notes.md, "v9").
"""

import torch
import triton
import triton.language as tl

from ._common import cdiv

DROPOUT_LEVELS = 1 << 16  # decisions compare 16-bit draws
PHILOX_ROUNDS = tl.constexpr(7)  # see the module's docstring


def dropout_threshold(p: float) -> int:
    """The kernels' integer form of p: a draw in [0, 2^16) below it drops the score. Kept under
    2^16 so some score always survives and the rescale stays finite (p = 1 is handled apart).
    The kernels take it as a float (exact below 2^24): Triton turns an int argument equal to 1
    into a compile-time constant, which would compile a variant of its own for p ~ 1.5e-5."""
    return min(round(p * DROPOUT_LEVELS), DROPOUT_LEVELS - 1)


def effective_dropout_p(p: float) -> float:
    """The drop probability the kernels realise for a requested p."""
    return dropout_threshold(p) / DROPOUT_LEVELS if p > 0 else 0.0


def dropout_scale(p: float) -> float:
    """The factor kept scores are multiplied by: 1 / (1 - effective p)."""
    return 1.0 / (1.0 - effective_dropout_p(p))


@triton.jit
def dropout_keep(seed, bh, start_m, start_n, threshold,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Boolean (BLOCK_M, BLOCK_N) tile, True where score (start_m + i, start_n + j) of head `bh`
    survives dropout (`threshold`: dropout_threshold, as a float). `start_n` and BLOCK_N must
    be multiples of 32.

    One Philox call yields four 32-bit words, eight 16-bit draws. For column n = start_n + j,
    the call for counter (4 * (n // 32) + (n % 8) // 2, row, head, 0) serves the eight columns of
    its row with the same n // 32 and (n % 8) // 2: word (n % 32) // 8, low half for even n, high
    for odd. A tile costs BLOCK_M * BLOCK_N / 8 calls; counters never repeat within a launch.
    The grouping is the column pattern one thread holds of a Hopper matrix-multiply accumulator
    (pairs of adjacent columns, eight apart), so in the forward and dq kernels each thread draws
    its own scores' bits and no layout conversion moves them between threads. The dK/dV kernel,
    whose tiles are transposed, transposes this tile, so both directions see the same bits.
    """
    tl.static_assert(BLOCK_N % 32 == 0)
    rows = start_m + tl.arange(0, BLOCK_M)[:, None, None]
    groups = start_n // 32 + tl.arange(0, BLOCK_N // 32)[None, :, None]
    lanes = tl.arange(0, 4)[None, None, :]
    c0 = (groups * 4 + lanes + rows * 0).to(tl.uint32)
    c1 = (rows + c0 * 0).to(tl.uint32)
    c2 = (c0 * 0 + bh).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c0 * 0, PHILOX_ROUNDS)  # each [i, group, lane]
    # join appends a dimension: words[.., a, b] is word 2 a + b (r0, r1, r2, r3 in order).
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [i, group, lane, a, b]
    draws = tl.join(words & 0xFFFF, words >> 16)  # [.., half]
    # Column order within a group: 8 * word + 2 * lane + half.
    draws = tl.reshape(tl.permute(draws, (0, 1, 3, 4, 2, 5)), (BLOCK_M, BLOCK_N))
    # Compared as integers: the threshold (an integer below 2^16, exact in fp32) is converted
    # once. Comparing in fp32 cost one int-to-float conversion (I2F) per score in each of the
    # three kernels, an instruction of lower throughput than the integer compare that replaces it.
    return draws >= tl.cast(threshold, tl.uint32)


@triton.jit
def _dropout_mask_kernel(Out, SEED, threshold, H, N_Q, N_K,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Test-only: materialise the keep mask of one launch, for an exact reference.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    seed = tl.load(SEED)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed, bh, pid_m * BLOCK_M, pid_n * BLOCK_N, threshold, BLOCK_M, BLOCK_N)
    ptrs = Out + bh.to(tl.int64) * N_Q * N_K + offs_m[:, None] * N_K + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K))


def dropout_mask(seed: torch.Tensor, dropout_p: float, batch: int, heads: int, q_len: int,
                 k_len: int) -> torch.Tensor:
    """The keep mask (batch, heads, q_len, k_len) that a launch with this seed tensor uses.

    For tests and debugging only: the attention kernels never build this tensor.
    """
    out = torch.empty((batch, heads, q_len, k_len), dtype=torch.int8, device=seed.device)
    grid = (cdiv(q_len, 32), cdiv(k_len, 32), batch * heads)
    # enable_fp_fusion named, as for the attention kernels: integer work only, so its value does
    # not matter, but left unset Triton 3.9 warns that its default changes in 3.10.
    _dropout_mask_kernel[grid](out, seed, float(dropout_threshold(dropout_p)), heads, q_len, k_len,
                               BLOCK_M=32, BLOCK_N=32, enable_fp_fusion=False)
    return out.bool()
