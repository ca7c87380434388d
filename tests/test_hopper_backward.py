"""The Gluon dK/dV kernel for Hopper (kernels/_backward_hopper.py).

As for the Gluon forward (test_hopper_forward.py): on the CPU the kernel is compiled for sm_90 by
the installed Triton, which catches API drift and register spills; on an sm_90 GPU it must serve
exactly the calls it is built for, and its dK and dV must hold the ratio rule against the float64
reference (with the lse of either forward, and with a gradient through the lse) and agree with
the Triton dK/dV kernel's.
"""

import pytest
import torch

import hf_flash
from hf_flash.kernels import _backward_hopper, _common, _forward_hopper
from conftest import DEVICE
from kernel_utils import GRAD_RATIO, check_ratio, make_qkv

from hopper_utils import Spy, check_compiles_for_sm90, needs_gluon, on_sm90

C_NONE, C_TL, C_BR = 0, 1, 2


@pytest.fixture(autouse=True)
def poison_outputs():
    _common.POISON_OUTPUTS = True
    yield
    _common.POISON_OUTPUTS = False


@pytest.fixture
def any_length(monkeypatch):
    # Both Gluon kernels at every length (their floors are speed choices): partial and single
    # tiles, in both directions.
    for mod in (_forward_hopper, _backward_hopper):
        monkeypatch.setattr(mod, "MIN_LENGTH", dict.fromkeys(mod.MIN_LENGTH, 1))


@needs_gluon
@pytest.mark.parametrize("d,causal,dtype", [(64, True, "bf16"), (128, True, "bf16"),
                                            (128, False, "fp16")])
def test_compiles_for_sm90_without_spills(d, causal, dtype):
    # Triton 3.9 compiles it without a stack. Triton 3.6's ptxas keeps 32-40 bytes of loop
    # scalars (counters, offsets) on the stack at head dim 128, a few loads per tile; the H200
    # timings of docs/perf-notes.md are of that build. A tile spilled (a second loop for the
    # causal diagonal made 80-400 bytes) would exceed the bound.
    check_compiles_for_sm90("build_hopper_backward", d, causal, dtype, max_stack=64)


def _spy(monkeypatch):
    """Counts the backward calls whose dK/dV the Gluon kernel computed."""
    return Spy(monkeypatch, _backward_hopper, "dkdv")


@pytest.mark.gpu
@on_sm90
@needs_gluon
def test_serves_exactly_the_calls_it_is_built_for(monkeypatch):
    spy = _spy(monkeypatch)
    dev = "cuda"

    def call(n_q=200, n_k=300, D=64, dtype=torch.bfloat16, **kw):
        h_kv = kw.pop("h_kv", 4)
        q = torch.randn(2, 4, n_q, D, device=dev, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(2, h_kv, n_k, D, device=dev, dtype=dtype, requires_grad=True)
                for _ in range(2))
        before = spy.calls
        hf_flash.flash_attention(q, k, v, enable_gqa=h_kv != 4, **kw).sum().backward()
        return spy.calls - before

    assert call(n_q=8192, n_k=8192) == 1
    assert call(n_q=2048, n_k=3000, D=128, dtype=torch.float16, is_causal=True) == 1
    assert call(n_q=2100, n_k=2300, D=128, h_kv=2) == 1
    # Shorter than MIN_LENGTH: the Triton kernel is the faster there.
    assert call(n_q=512, n_k=512, D=64) == 0
    assert call(n_q=1, n_k=4096, D=128) == 0
    monkeypatch.setattr(_backward_hopper, "MIN_LENGTH",
                        dict.fromkeys(_backward_hopper.MIN_LENGTH, 1))
    assert call() == 1
    # Everything else goes to the Triton kernel.
    assert call(dtype=torch.float32) == 0
    assert call(D=80) == 0
    assert call(dropout_p=0.1) == 0
    assert call(key_padding_mask=torch.rand(2, 300, device=dev) > 0.5) == 0
    assert call(attn_mask=torch.rand(2, 1, 200, 300, device=dev) > 0.5) == 0
    assert call(n_q=300, n_k=200, is_causal=True, causal_alignment="bottom_right") == 0
    assert call(scale=-0.3) == 0
    monkeypatch.setattr(_backward_hopper, "ENABLED", False)
    assert call() == 0


_EDGE = [
    # (n_q, n_k, causal): single and partial tiles; tails in both directions; a diagonal that
    # crosses tiles and the two key groups of a block; bottom-right with n_q < n_k; key blocks
    # that no query sees (top-left, n_k > n_q).
    (1, 1, C_NONE), (1, 1, C_TL), (64, 64, C_NONE), (65, 130, C_TL), (128, 128, C_TL),
    (129, 1000, C_NONE), (1000, 129, C_TL), (1000, 129, C_NONE), (300, 1100, C_BR),
    (200, 900, C_TL), (777, 777, C_TL), (2048, 2048, C_NONE),
]


def _grads(q, k, v, do, w, fa, gqa):
    for t in (q, k, v):
        t.grad = None
    out, lse = hf_flash.flash_attention(q, k, v, enable_gqa=gqa, return_lse=True, **fa)
    ((out * do).sum() + (lse * w).sum()).backward()
    return k.grad.clone(), v.grad.clone()


@pytest.mark.gpu
@on_sm90
@needs_gluon
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_q,n_k,causal", _EDGE)
def test_matches_the_reference(monkeypatch, any_length, n_q, n_k, causal, dtype, D):
    spy = _spy(monkeypatch)
    torch.manual_seed(n_q * 7 + n_k + D + causal)
    gqa = n_q % 2 == 1  # odd lengths also take grouped heads and HF's transposed layout
    q, k, v = make_qkv(2, 4, 2 if gqa else 4, n_q, n_k, D, dtype, DEVICE,
                       "bnhd" if gqa else "bhnd")
    fa = {"is_causal": causal != C_NONE,
          "causal_alignment": "bottom_right" if causal == C_BR else "top_left"}
    do = torch.randn(2, 4, n_q, D, device=DEVICE, dtype=dtype)
    w = torch.randn(2, 4, n_q, device=DEVICE)  # a gradient through the lse too (in delta)
    # The lse it rebuilds P from, from either forward.
    for gluon_forward in (True, False):
        monkeypatch.setattr(_forward_hopper, "ENABLED", gluon_forward)
        before = spy.calls
        dk, dv = _grads(q, k, v, do, w, fa, gqa)
        assert spy.calls == before + 1
        refs = []
        for ref_dtype in (torch.float64, dtype):
            leaves = [t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v)]
            o, lse = hf_flash.kernels.reference_attention(*leaves, causal=causal)
            ((o * do.to(ref_dtype)).sum() + (lse * w.to(ref_dtype)).sum()).backward()
            refs.append([t.grad for t in leaves[1:]])
        for name, got, r64, r_lo in zip(("dk", "dv"), (dk, dv), refs[0], refs[1]):
            check_ratio(name, got, r64, r_lo, GRAD_RATIO, dtype)


@pytest.mark.gpu
@on_sm90
@needs_gluon
@pytest.mark.parametrize("causal", [C_NONE, C_TL, C_BR])
def test_agrees_with_the_triton_kernel(monkeypatch, any_length, causal):
    # Same inputs, dQ and delta alike: both kernels round P^T and dS^T to bf16 and sum the tiles
    # in fp32, in another order, so a gradient may differ by a rounding step of the terms it sums
    # (at most about its row's largest entry).
    spy = _spy(monkeypatch)
    torch.manual_seed(5 + causal)
    q = torch.randn(2, 8, 1500, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 4, 1700, 128, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)
    w = torch.zeros(2, 8, 1500, device="cuda")
    fa = {"is_causal": causal != C_NONE,
          "causal_alignment": "bottom_right" if causal == C_BR else "top_left"}
    got = _grads(q, k, v, do, w, fa, True)
    assert spy.calls == 1
    monkeypatch.setattr(_backward_hopper, "ENABLED", False)
    want = _grads(q, k, v, do, w, fa, True)
    assert spy.calls == 1
    for name, a, b in zip(("dk", "dv"), got, want):
        row_scale = b.float().abs().amax(-1, keepdim=True).clamp_min(1e-6)
        worst = ((a.float() - b.float()).abs() / row_scale).max().item()
        assert worst <= 2.0 ** -6, f"{name} differs by {worst:.2e} of its row's largest entry"
