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


def check_ratio(name, got, ref64, same_dtype, ratio, dtype, floor_ulps=4):
    """Assert err(got) <= ratio * err(same_dtype) + floor, both against the float64 reference."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = max_err(got, ref64)
    base = max_err(same_dtype, ref64)
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
