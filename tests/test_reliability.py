"""Hostile inputs: random shapes, strides and masks against the float64 reference, and special
values (NaN, inf, huge scores, fp16 near its top) behaving as eager attention does.

The property test draws few examples on the CPU (the interpreter is slow) and more on a GPU. It
is split by head dim and causal alignment: on a GPU nearly every example compiles kernel variants
of its own (head dim, mask kind and stride classes are compile-time), and as 15 separate tests they
spread over pytest-xdist's workers instead of compiling one after another. (Split only by head
dim, 30 examples each, the GPU pass did not finish within 4 minutes on 16 workers.)
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention.bias import causal_lower_right

import hf_flash
from conftest import DEVICE, GPU_GRID
from kernel_utils import (GRAD_RATIO, OUT_RATIO, base2_reference_with_grads, check_ratio,
                          reference_with_grads, replayed_keep_mask)

HEAD_DIMS = [1, 3, 8, 24, 40]
CAUSAL = ["none", "top_left", "bottom_right"]
# Per (head dim, causal) test: 10 on a GPU, 2 on the CPU. HF_FLASH_PROPERTY_EXAMPLES overrides it
# (scripts/gpu_check.sh takes 3 to fit its time limit; a property pass can take more).
EXAMPLES = int(os.environ.get("HF_FLASH_PROPERTY_EXAMPLES", 10 if GPU_GRID else 2))


@st.composite
def attention_case(draw, D, causal):
    B = draw(st.integers(1, 2))
    h_kv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 2))
    n_q = draw(st.integers(1, 40))
    n_k = draw(st.integers(1, 40))
    kpm_kind = draw(st.sampled_from(["none", "random", "all_masked_row", "single_key"]))
    float_mask = draw(st.sampled_from(["none", "neg_inf", "large_negative", "huge_negative"]))
    layout = draw(st.sampled_from(["bhnd", "bnhd", "sliced"]))
    dropout = draw(st.sampled_from([0.0, 0.0, 0.1, 0.6]))  # half the examples without
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(B=B, h_kv=h_kv, group=group, n_q=n_q, n_k=n_k, D=D, causal=causal,
                kpm_kind=kpm_kind, float_mask=float_mask, layout=layout, dropout=dropout,
                seed=seed)


def _tensor(shape, layout, gen):
    B, H, N, D = shape
    if layout == "bnhd":  # HF's transposed view
        return torch.randn(B, N, H, D, generator=gen).transpose(1, 2)
    if layout == "sliced":  # a view with a last-dim stride of 2
        return torch.randn(B, H, N, 2 * D, generator=gen)[..., ::2]
    return torch.randn(B, H, N, D, generator=gen)


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("D", HEAD_DIMS)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_cases_match_reference(D, causal, data):
    case = data.draw(attention_case(D, causal))
    gen = torch.Generator().manual_seed(case["seed"])
    B, h_kv, n_q, n_k = case["B"], case["h_kv"], case["n_q"], case["n_k"]
    H = h_kv * case["group"]
    q = _tensor((B, H, n_q, D), case["layout"], gen).to(DEVICE).requires_grad_()
    k = _tensor((B, h_kv, n_k, D), case["layout"], gen).to(DEVICE).requires_grad_()
    v = _tensor((B, h_kv, n_k, D), case["layout"], gen).to(DEVICE).requires_grad_()
    fa, ref = {}, {}
    if case["causal"] == "top_left":
        fa["is_causal"], ref["causal"] = True, 1
    elif case["causal"] == "bottom_right":
        fa["attn_mask"], ref["causal"] = causal_lower_right(n_q, n_k), 2
    if case["kpm_kind"] != "none":
        kpm = torch.rand(B, n_k, generator=gen) > 0.3
        if case["kpm_kind"] == "all_masked_row":
            kpm[0] = False
        elif case["kpm_kind"] == "single_key":
            kpm[:] = False
            kpm[:, n_k // 2] = True
        fa["key_padding_mask"] = ref["kpm"] = kpm.to(DEVICE)
    if case["float_mask"] != "none" and "attn_mask" not in fa:
        m = torch.randn(B, 1, n_q, n_k, generator=gen)
        # -1e4 is the "large negative" HF's older models add, -1e9 what some user code adds; rows
        # made only of such scores are where a single fp32 lse would drop log2(sum).
        fill = {"neg_inf": float("-inf"), "large_negative": -1e4, "huge_negative": -1e9}[
            case["float_mask"]]
        m[torch.rand(B, 1, n_q, n_k, generator=gen) > 0.6] = fill
        if case["float_mask"] != "neg_inf" and n_q > 1:
            m[:, :, 0] = fill  # at least one row made only of the finite fill
        fa["attn_mask"] = m.to(DEVICE)
        ref["float_mask"] = m.double().to(DEVICE)
    p = case["dropout"]
    if p > 0:
        # The references replay the kernel's own dropout mask: the same seed draws the same one.
        fa["dropout_p"] = ref["dropout_p"] = p
        ref["keep_mask"] = replayed_keep_mask(case["seed"], p, B, H, n_q, n_k, DEVICE)
        torch.manual_seed(case["seed"])
    out = hf_flash.flash_attention(q, k, v, enable_gqa=case["group"] > 1, **fa)
    do = torch.randn(out.shape, generator=gen).to(DEVICE)
    out.backward(do)
    o64, _, g64 = reference_with_grads(q, k, v, do, **ref)
    o32, _, g32 = reference_with_grads(q, k, v, do, dtype=torch.float32, **ref)
    outs, grads = [o32], [[g] for g in g32]
    if "float_mask" in ref:  # the same fp32 sum of scores and mask, in the kernels' base 2
        o2, g2 = base2_reference_with_grads(q, k, v, do, float_mask=ref["float_mask"],
                                            causal=ref.get("causal", 0), kpm=ref.get("kpm"),
                                            dropout_p=p, keep_mask=ref.get("keep_mask"))
        outs.append(o2)
        for g, extra in zip(grads, g2):
            g.append(extra)
    check_ratio("out", out, o64, outs, OUT_RATIO, torch.float32)
    for name, t, r64, r32 in zip(("dq", "dk", "dv"), (q, k, v), g64, grads):
        check_ratio(name, t.grad, r64, r32, GRAD_RATIO, torch.float32, floor_ulps=64)


def _sdpa_math(q, k, v, **kw):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize("where", ["query", "key", "value"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_like_eager(where, value):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16, device=DEVICE) for _ in range(3))
    {"query": q, "key": k, "value": v}[where][0, 1, 5, 3] = value
    got = hf_flash.flash_attention(q, k, v)
    want = _sdpa_math(q, k, v)
    # The same elements are NaN (no silent zero or number), and the untouched head is unharmed.
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = torch.isfinite(want)
    assert torch.allclose(got[finite], want[finite], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got[0, 0]).all()


def test_huge_scores_stay_exact():
    # Scores around 1e4: a softmax that does not subtract the running max would overflow.
    torch.manual_seed(0)
    q = torch.randn(1, 2, 33, 32, device=DEVICE) * 30
    k = torch.randn(1, 2, 33, 32, device=DEVICE) * 30
    v = torch.randn(1, 2, 33, 32, device=DEVICE)
    got = hf_flash.flash_attention(q, k, v, is_causal=True)
    want = _sdpa_math(q.double(), k.double(), v.double(), is_causal=True)
    assert torch.isfinite(got).all()
    assert (got.double() - want).abs().max() < 1e-4


def test_fp16_near_its_top_does_not_overflow():
    # q.k reaches ~1e6, far past fp16's 65504: the kernel accumulates scores in fp32.
    torch.manual_seed(0)
    q, k = (torch.full((1, 1, 20, 64), 120.0, device=DEVICE) * (1 + torch.rand(1, 1, 20, 64,
            device=DEVICE)) for _ in range(2))
    v = torch.randn(1, 1, 20, 64, device=DEVICE)
    got = hf_flash.flash_attention(q.half(), k.half(), v.half())
    want = _sdpa_math(q.half().double(), k.half().double(), v.half().double())
    assert torch.isfinite(got).all()
    assert (got.double() - want).abs().max() < 2e-2


# A -1e9 mask on every key of a row puts the row max near -1.4e9 (base 2), where fp32 spacing is 128:
# an lse stored as max + log2(sum) would lose log2(sum) and backward would rebuild P without 1/sum.
def test_huge_finite_mask_on_a_fully_masked_row_gradients():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 2, 8, device=DEVICE, requires_grad=True) for _ in range(3))
    mask = torch.full((1, 1, 2, 2), -1e9, device=DEVICE)
    do = torch.randn(1, 1, 2, 8, device=DEVICE)
    hf_flash.flash_attention(q, k, v, attn_mask=mask).backward(do)
    o64, _, g64 = reference_with_grads(q, k, v, do, float_mask=mask.double())
    o32, _, g32 = reference_with_grads(q, k, v, do, dtype=torch.float32, float_mask=mask)
    for name, t, r64, r32 in zip(("dq", "dk", "dv"), (q, k, v), g64, g32):
        check_ratio(name, t.grad, r64, r32, GRAD_RATIO, torch.float32, floor_ulps=64)
