"""The Gluon forward for Hopper (kernels/_forward_hopper.py).

Gluon has no interpreter: on the CPU its kernel is compiled for sm_90 by the installed Triton
(ptxas included), which catches API drift between Triton releases and register spills. On an
sm_90 GPU it must serve exactly the calls it is built for and agree with the float64 reference
(the ratio rule of test_kernel.py) and with the Triton forward; the test_kernel.py grid also runs
through it wherever its cases are eligible.
"""

import pytest
import torch

import hf_flash
from hf_flash.kernels import _common, _forward_hopper
from conftest import DEVICE
from kernel_utils import GRAD_RATIO, OUT_RATIO, check_ratio, make_qkv, max_err, reference_with_grads

from hopper_utils import Spy, check_compiles_for_sm90, needs_gluon, on_sm90

C_NONE, C_TL, C_BR = 0, 1, 2


@pytest.fixture(autouse=True)
def poison_outputs():
    _common.POISON_OUTPUTS = True
    yield
    _common.POISON_OUTPUTS = False


@pytest.fixture
def any_length(monkeypatch):
    # The length floor is a speed choice (MIN_LENGTH): the tests take the kernel at every length,
    # where partial and single tiles are.
    monkeypatch.setattr(_forward_hopper, "MIN_LENGTH", dict.fromkeys(_forward_hopper.MIN_LENGTH, 1))


@needs_gluon
@pytest.mark.parametrize("d,causal,dtype", [(64, False, "bf16"), (128, True, "bf16"),
                                            (128, False, "fp16")])
def test_compiles_for_sm90_without_spills(d, causal, dtype):
    check_compiles_for_sm90("build_hopper_forward", d, causal, dtype)


@needs_gluon
def test_experimental_configs_still_compile():
    # CARRY is off by default (docs/perf-notes.md, "v13") and kept compiling so that it can be
    # timed again, beside LEAN_TILE0; under Triton 3.6 it spills 8 bytes a thread at head dim 64.
    check_compiles_for_sm90("build_hopper_forward", 64, False, "bf16", max_stack=8,
                            config={"CARRY": True, "LEAN_TILE0": True})


def _spy(monkeypatch):
    """Counts the calls that the Hopper forward served."""
    return Spy(monkeypatch, _forward_hopper, "attention_forward")


@pytest.mark.gpu
@on_sm90
@needs_gluon
def test_serves_exactly_the_calls_it_is_built_for(monkeypatch):
    spy = _spy(monkeypatch)
    dev = "cuda"

    def call(n_q=200, n_k=300, D=64, dtype=torch.bfloat16, **kw):
        h_kv = kw.pop("h_kv", 4)
        q = torch.randn(2, 4, n_q, D, device=dev, dtype=dtype)
        k, v = (torch.randn(2, h_kv, n_k, D, device=dev, dtype=dtype) for _ in range(2))
        before = spy.calls
        hf_flash.flash_attention(q, k, v, enable_gqa=k.shape[1] != 4, **kw)
        return spy.calls - before

    assert call(n_q=4096, n_k=4096) == 1
    assert call(n_q=2048, n_k=3000, D=128, dtype=torch.float16, is_causal=True) == 1
    assert call(n_q=600, n_k=700, D=128, h_kv=2) == 1
    assert call(n_q=2048, n_k=2100, D=128, is_causal=True, causal_alignment="bottom_right") == 1
    # Shorter than MIN_LENGTH: the Triton forward is the faster there.
    assert call(n_q=256, n_k=256, D=64) == 0
    assert call(n_q=1, n_k=4096, D=128) == 0
    monkeypatch.setattr(_forward_hopper, "MIN_LENGTH", dict.fromkeys(_forward_hopper.MIN_LENGTH, 1))
    assert call() == 1
    # Everything else goes to the Triton forward.
    assert call(dtype=torch.float32) == 0
    assert call(D=80) == 0
    assert call(D=32) == 0
    assert call(dropout_p=0.1) == 0
    assert call(key_padding_mask=torch.rand(2, 300, device=dev) > 0.5) == 0
    assert call(attn_mask=torch.rand(2, 1, 200, 300, device=dev) > 0.5) == 0
    # Bottom-right causal with more queries than keys leaves rows with no key.
    assert call(n_q=300, n_k=200, is_causal=True, causal_alignment="bottom_right") == 0
    assert call(scale=-0.3) == 0
    # TMA takes no stride-0 (broadcast) dimension.
    q = torch.randn(2, 4, 200, 64, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 4, 300, 64, device=dev, dtype=torch.bfloat16).expand(2, -1, -1, -1)
    before = spy.calls
    hf_flash.flash_attention(q, k, k)
    assert spy.calls == before
    monkeypatch.setattr(_forward_hopper, "ENABLED", False)
    assert call() == 0


_EDGE = [
    # (n_q, n_k, causal): one tile and a partial one; lengths that leave no full tile; tails in
    # both directions; a causal diagonal that crosses tiles; bottom-right with n_q < n_k.
    (1, 1, C_NONE), (1, 1, C_TL), (64, 64, C_NONE), (65, 130, C_TL), (128, 128, C_TL),
    (129, 1000, C_NONE), (1000, 129, C_TL), (1000, 129, C_NONE), (300, 1100, C_BR),
    (777, 777, C_TL), (2048, 2048, C_NONE),
]


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
    out, lse = hf_flash.flash_attention(q, k, v, enable_gqa=gqa, return_lse=True, **fa)
    assert spy.calls == 1
    do = torch.randn_like(out)
    out.backward(do)
    o64, lse64, g64 = reference_with_grads(q, k, v, do, causal=causal)
    o_lo, _, g_lo = reference_with_grads(q, k, v, do, dtype=dtype, causal=causal)
    check_ratio("out", out, o64, o_lo, OUT_RATIO, dtype)
    assert max_err(lse, lse64) <= 1e-3 + 1e-5 * lse64.abs().max().item()
    # The backward (Triton's) recomputes P from this forward's lse: its gradients hold the rule.
    for name, t, r64, r_lo in zip(("dq", "dk", "dv"), (q, k, v), g64, g_lo):
        check_ratio(name, t.grad, r64, r_lo, GRAD_RATIO, dtype)


@pytest.mark.gpu
@on_sm90
@needs_gluon
@pytest.mark.parametrize("programs", [1, 3])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("n_q,n_k,causal", [(1000, 1000, C_TL), (777, 1300, C_NONE),
                                            (300, 1100, C_BR), (129, 129, C_TL)])
def test_persistent_programs_take_items_in_turn(monkeypatch, any_length, programs, D, n_q, n_k,
                                                causal):
    # A persistent grid has one program per SM, so the tests' small batches would give each
    # program one item. With one or three programs every program takes many items in turn, of
    # different tile counts when causal: the K/V ring and the groups' turns carry over from item
    # to item, and Q loads and O stores overlap them.
    asked = []
    monkeypatch.setattr(_forward_hopper, "sm_count", lambda device: asked.append(device) or programs)
    spy = _spy(monkeypatch)
    torch.manual_seed(n_q + n_k + D + programs)
    gqa = n_q % 2 == 1
    q, k, v = make_qkv(2, 4, 2 if gqa else 4, n_q, n_k, D, torch.bfloat16, DEVICE,
                       "bnhd" if gqa else "bhnd")
    fa = {"is_causal": causal != C_NONE,
          "causal_alignment": "bottom_right" if causal == C_BR else "top_left"}
    out, lse = hf_flash.flash_attention(q, k, v, enable_gqa=gqa, return_lse=True, **fa)
    assert spy.calls == 1 and asked, "the persistent grid was not taken"
    o64, lse64, _ = reference_with_grads(q, k, v, torch.zeros_like(out), causal=causal)
    o_lo, _, _ = reference_with_grads(q, k, v, torch.zeros_like(out), dtype=torch.bfloat16,
                                      causal=causal)
    check_ratio("out", out, o64, o_lo, OUT_RATIO, torch.bfloat16)
    assert max_err(lse, lse64) <= 1e-3 + 1e-5 * lse64.abs().max().item()


@pytest.mark.gpu
@on_sm90
@needs_gluon
@pytest.mark.parametrize("causal", [False, True])
def test_agrees_with_the_triton_forward(monkeypatch, any_length, causal):
    # Same inputs through both forwards: both round P to bf16 and sum in fp32 in another order,
    # so an output may differ by a rounding step of the terms it sums (at most about its row's
    # largest output), not of itself where they cancel.
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 8, 1500, 128, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    out_h, lse_h = hf_flash.flash_attention(q, k, v, is_causal=causal, return_lse=True)
    monkeypatch.setattr(_forward_hopper, "ENABLED", False)
    out_t, lse_t = hf_flash.flash_attention(q, k, v, is_causal=causal, return_lse=True)
    diff = (out_h.float() - out_t.float()).abs()
    row_scale = out_t.float().abs().amax(-1, keepdim=True)
    worst = (diff / row_scale).max().item()
    assert worst <= 2.0 ** -6, f"outputs differ by {worst:.2e} of their row's largest output"
    assert (lse_h - lse_t).abs().max().item() < 1e-4
