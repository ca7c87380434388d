"""Attention dropout from a counter-based RNG.

The keep/drop decision for score (b, h, i, j) is a pure function of (seed, b*H + h, i, j): Philox
with the row, column and head as its counter. The forward kernel and both backward kernels call the
same helper, so backward regenerates exactly the mask forward used and the mask is never stored.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, bh, start_m, start_n, dropout_p,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Boolean (BLOCK_M, BLOCK_N) tile, True where score (start_m + i, start_n + j) of head `bh`
    survives dropout. `start_n` must be a multiple of 4.

    One Philox call yields four 32-bit words: the call for counter (j // 4, row, head, 0) serves
    columns 4*(j // 4) .. +3, so a tile costs BLOCK_M * BLOCK_N / 4 calls. Counters never repeat
    within a launch. The backward kernels that work on transposed tiles transpose this tile
    rather than drawing in another order, so both directions see the same bits.
    """
    rows = start_m + tl.arange(0, BLOCK_M)[:, None]
    quads = start_n // 4 + tl.arange(0, BLOCK_N // 4)[None, :]
    c0 = (quads + rows * 0).to(tl.uint32)
    c1 = (rows + quads * 0).to(tl.uint32)
    c2 = (c0 * 0 + bh).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c0 * 0)
    # [.., q, a, b] = r_(2a+b); flattening the last three dims puts word i at column 4q + i.
    bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_M, BLOCK_N))
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _dropout_mask_kernel(Out, SEED, dropout_p, H, N_Q, N_K,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Test-only: materialise the keep mask of one launch, for an exact reference.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    seed = tl.load(SEED)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed, bh, pid_m * BLOCK_M, pid_n * BLOCK_N, dropout_p, BLOCK_M, BLOCK_N)
    ptrs = Out + bh.to(tl.int64) * N_Q * N_K + offs_m[:, None] * N_K + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K))


def dropout_mask(seed: torch.Tensor, dropout_p: float, batch: int, heads: int, q_len: int,
                 k_len: int) -> torch.Tensor:
    """The keep mask (batch, heads, q_len, k_len) that a launch with this seed tensor uses.

    For tests and debugging only: the attention kernels never build this tensor.
    """
    out = torch.empty((batch, heads, q_len, k_len), dtype=torch.int8, device=seed.device)
    grid = (triton.cdiv(q_len, 32), triton.cdiv(k_len, 32), batch * heads)
    _dropout_mask_kernel[grid](out, seed, float(dropout_p), heads, q_len, k_len,
                               BLOCK_M=32, BLOCK_N=32)
    return out.bool()
