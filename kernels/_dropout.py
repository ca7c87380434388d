"""Attention dropout from a counter-based RNG.

The keep/drop decision for score (b, h, i, j) is a pure function of (seed, b*H + h, i, j): Philox
with the row, column and head as its counter. The forward kernel and both backward kernels call the
same helper, so backward regenerates exactly the mask forward used and the mask is never stored.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, bh, rows, cols, dropout_p):
    """Boolean tile, True where the score at (rows, cols) of head `bh` survives dropout.

    `rows` and `cols` are index tensors already broadcast against each other (either orientation:
    the backward kernels work on transposed tiles and must draw the same bits).
    """
    r = (rows + cols * 0).to(tl.uint32)
    c = (cols + rows * 0).to(tl.uint32)
    h = (r * 0 + bh).to(tl.uint32)
    zero = r * 0
    # One Philox call per score; counters (col, row, head, 0) never repeat within a launch.
    bits, _, _, _ = tl.philox(seed, c, r, h, zero)
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
    keep = dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], dropout_p)
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
