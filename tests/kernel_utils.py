"""Helpers shared by the kernel tests: random inputs, the reference, and the error-ratio rule."""

import torch

from hf_flash.kernels import dropout_mask, dropout_seed, reference_attention

# The rule (after FlashAttention's own suite): hf_flash's error against a float64 reference may be
# at most RATIO x the error of plain PyTorch attention computed in the same dtype, plus a floor of
# a few units in the last place (an exact fp32 kernel can beat a same-dtype reference that is
# itself almost exact, and then the ratio alone would demand the impossible).
OUT_RATIO = 2.0
GRAD_RATIO = 3.0
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def make_qkv(B, H, H_KV, n_q, n_k, D, dtype, device, layout="bhnd"):
    """Fresh random inputs. layout='bnhd' gives HF's transposed views (B, H, N, D) over (B, N, H, D)."""
    def one(h, n):
        if layout == "bnhd":
            t = torch.randn(B, n, h, D, dtype=dtype, device=device).transpose(1, 2)
        else:
            t = torch.randn(B, h, n, D, dtype=dtype, device=device)
        return t.requires_grad_()
    return one(H, n_q), one(H_KV, n_k), one(H_KV, n_k)


def replayed_keep_mask(seed_state, p, B, H, n_q, n_k, device):
    """The dropout mask a call made right after torch.manual_seed(seed_state) used."""
    torch.manual_seed(seed_state)
    return dropout_mask(dropout_seed(device), p, B, H, n_q, n_k)


def max_err(a, b):
    return (a.double() - b.double()).abs().nan_to_num(nan=float("inf")).max().item()


def base2_reference_with_grads(q, k, v, do, *, float_mask, causal=0, kpm=None, dropout_p=0.0,
                               keep_mask=None):
    """Output and grads of fp32 attention evaluated as the kernels do it: scores and the additive
    mask scaled to base 2 and added in fp32, then exp2.

    Where a row's scores are all pushed far from zero by a finite mask (-1e4, as older HF models
    add), adding the mask rounds every score to the fp32 grid at that magnitude (~1e-3), in natural
    units as in base 2, and where the values land on the grid decides the row's error: one fp32
    evaluation can be lucky by two orders of magnitude. Taking the worse of this and the natural
    evaluation as the same-dtype error keeps the ratio rule about the kernel, not the luck.
    `keep_mask` replays a dropout mask of `dropout_p`, as in reference_attention.
    """
    from hf_flash.kernels import effective_dropout_p
    from hf_flash.kernels._reference import allowed_keys
    log2e = 1.4426950408889634
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    kk, vv = (t.repeat_interleave(group, dim=1) for t in (k, v))
    s = torch.matmul(q, kk.transpose(-1, -2)) * (q.shape[-1] ** -0.5 * log2e)
    s = s + float_mask.float() * log2e
    allowed = allowed_keys(q.shape[2], k.shape[2], causal=causal, kpm=kpm, device=q.device)
    s = s.masked_fill(~allowed, float("-inf"))
    row_max = s.amax(-1, keepdim=True).detach()
    empty = torch.isneginf(row_max)
    p = torch.exp2(s - row_max.masked_fill(empty, 0.0))
    p = p / p.sum(-1, keepdim=True).masked_fill(empty, 1.0)
    if keep_mask is not None:
        p = p * keep_mask / (1.0 - effective_dropout_p(dropout_p))
    out = torch.matmul(p, vv)
    out.backward(do.float())
    return out.detach(), [t.grad for t in (q, k, v)]


def check_ratio(name, got, ref64, same_dtype, ratio, dtype, floor_ulps=4):
    """Assert err(got) <= ratio * err(same_dtype) + floor, both against the float64 reference.
    `same_dtype` may be a list of equally valid same-dtype evaluations: the worst one counts."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = max_err(got, ref64)
    evals = same_dtype if isinstance(same_dtype, (list, tuple)) else [same_dtype]
    base = max(max_err(t, ref64) for t in evals)
    floor = floor_ulps * EPS[dtype] * max(1.0, ref64.abs().max().item())
    assert err <= ratio * base + floor, (
        f"{name}: error {err:.3e} > {ratio} x same-dtype error {base:.3e} + floor {floor:.1e}")
    return err, base


def reference_with_grads(q, k, v, do, dtype=None, **kw):
    """Reference output, lse and grads, in `dtype` (float64 when None) from q/k/v's values."""
    dtype = dtype or torch.float64
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = reference_attention(*leaves, **kw)
    out.backward(do.to(dtype))
    return out.detach(), lse.detach(), [t.grad for t in leaves]
