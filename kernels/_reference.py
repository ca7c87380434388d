"""Attention written plainly in PyTorch: the CPU fallback and the reference the tests compare to.

It builds the (q_len x k_len) scores, so it is for small shapes only. It follows hf_flash's
conventions: masks combine, and a row with no visible key returns zeros (PyTorch returns NaN).
"""

import torch

from ._common import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE
from ._dropout import effective_dropout_p


def allowed_keys(q_len, k_len, *, causal=CAUSAL_NONE, kpm=None, bool_mask=None, device=None):
    """Boolean (B|1, H|1, q_len, k_len) tensor, True where a query may attend to a key."""
    allowed = torch.ones((1, 1, q_len, k_len), dtype=torch.bool, device=device)
    if causal != CAUSAL_NONE:
        offset = k_len - q_len if causal == CAUSAL_BOTTOM_RIGHT else 0
        rows = torch.arange(q_len, device=device)[:, None]
        cols = torch.arange(k_len, device=device)[None, :]
        allowed = allowed & (cols <= rows + offset)
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    if bool_mask is not None:
        allowed = allowed & bool_mask
    return allowed


def reference_attention(q, k, v, *, float_mask=None, bool_mask=None, kpm=None,
                        causal=CAUSAL_NONE, scale=None, dropout_p=0.0, keep_mask=None,
                        compute_dtype=None):
    """Returns (out, lse). `keep_mask` (B, H, q_len, k_len) replays a dropout mask exactly (a mask
    from `dropout_mask` comes with the kernels' rounding of p, which the rescale then follows);
    with dropout_p > 0 and no keep_mask, a fresh mask is drawn from torch's generator."""
    out_dtype = q.dtype
    if compute_dtype is not None:
        q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    B, H, q_len, D = q.shape
    group = H // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scale = D ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    allowed = allowed_keys(q_len, k.shape[2], causal=causal, kpm=kpm, bool_mask=bool_mask,
                           device=q.device)
    s = s.masked_fill(~allowed, float("-inf"))
    if float_mask is not None:
        s = s + float_mask.to(s.dtype)
    s_lse = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    empty = torch.isneginf(s_lse.amax(dim=-1, keepdim=True))
    # A fully masked row's lse is -inf; taken of zeros and then filled, so that a gradient
    # through the lse gives that row zeros, not exp(-inf - -inf) = NaN.
    lse = torch.logsumexp(s_lse.masked_fill(empty, 0.0), dim=-1).masked_fill(empty[..., 0],
                                                                          float("-inf"))
    # Softmax of a fully masked row is 0/0; give it zeros without letting NaN reach autograd.
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if dropout_p > 0:
        if keep_mask is None:
            keep_mask = torch.rand_like(p, dtype=torch.float32) >= dropout_p
        else:
            dropout_p = effective_dropout_p(dropout_p)
        p = p * keep_mask / (1.0 - dropout_p)
    out = torch.matmul(p.to(v.dtype), v)
    return out.to(out_dtype), lse.float()
