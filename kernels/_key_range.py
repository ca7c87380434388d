"""The span of real keys of each batch entry of a key padding mask, computed on the device.

The attention kernels skip whole key tiles outside [lo, hi) (_common.key_range); holes inside the
span are masked from the mask itself, so any boolean mask is exact. The span is computed anew
for every call, by one small kernel on the call's stream: no host sync, and under CUDA-graph
capture it is recorded with the attention kernels, so a replay after the mask's buffer is
rewritten skips the right tiles. (Keeping the span per mask object, as an earlier version did,
trusted the tensor's version counter, which writes through `.data`, NumPy or DLPack do not bump,
and a graph captured after a warm-up call never recomputed it.)
"""

import torch
import triton
import triton.language as tl

from . import _tuning
from ._common import next_pow2, on_inputs_device


@triton.jit
def _key_range_kernel(KPM, LO, HI, stride_b, stride_n, N_K, BLOCK: tl.constexpr):
    """LO[b], HI[b]: the first real key of row b of KPM and one past its last; 0, 0 for a row
    with none."""
    b = tl.program_id(0)
    row = KPM + b.to(tl.int64) * stride_b
    lo = N_K
    hi = 0
    for start in range(0, N_K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        real = tl.load(row + cols * stride_n, mask=cols < N_K, other=0) != 0
        lo = tl.minimum(lo, tl.min(tl.where(real, cols, N_K), 0))
        hi = tl.maximum(hi, tl.max(tl.where(real, cols + 1, 0), 0))
    tl.store(LO + b, tl.where(hi > 0, lo, 0))
    tl.store(HI + b, hi)


@on_inputs_device
def key_range(kpm: torch.Tensor):
    """(lo, hi), int32 (batch,) on kpm's device: each row's span of real (nonzero) keys of the
    (batch, k_len) mask `kpm` (bool viewed as uint8, or any integer dtype)."""
    B, n_k = kpm.shape
    lo = torch.empty(B, dtype=torch.int32, device=kpm.device)
    hi = torch.empty_like(lo)
    if B == 0:
        return lo, hi
    tensors = (kpm, lo, hi)
    # A model hands every layer the same mask layout: the launch repeats from a plan.
    sig = ("key_range", kpm.get_device(), kpm.dtype, kpm.shape, kpm.stride())
    plan = _tuning.planned(sig, tensors)
    if plan is not None:
        plan[0](tensors)
        return lo, hi
    block = min(1024, max(16, next_pow2(n_k)))
    # Never timed (the shape key's lengths are 1): the config is the one candidate.
    go = _tuning.launch(_key_range_kernel, "key_range", (1, 1, kpm.dtype, block),
                        lambda: [{"num_warps": 4}], lambda c: (B,), tensors,
                        (*kpm.stride(), n_k), {"BLOCK": block, "enable_fp_fusion": False})
    _tuning.remember(sig, tensors, (go,))
    return lo, hi


def key_range_reference(kpm: torch.Tensor):
    """key_range in PyTorch ops, for tests."""
    n_k = kpm.shape[1]
    as_int = (kpm != 0).to(torch.int32)
    any_key = as_int.any(dim=1)
    lo = torch.argmax(as_int, dim=1)  # argmax returns the first maximum
    hi = n_k - torch.argmax(as_int.flip(1), dim=1)
    return (torch.where(any_key, lo, 0).to(torch.int32),
            torch.where(any_key, hi, 0).to(torch.int32))

