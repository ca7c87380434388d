"""The Gluon backward for Hopper (kernels/_backward_hopper.py), on both of its routes: dK/dV
after Triton's dQ kernel ("dkdv"), and dQ, dK and dV from the one kernel ("fused").

As for the Gluon forward (test_hopper_forward.py): on the CPU the kernel is compiled for sm_90 by
the installed Triton, in each of its dQ forms, which catches API drift and register spills; on an
sm_90 GPU each route must serve exactly the calls it is built for, and its gradients must hold
the ratio rule against the float64 reference (with the lse of either forward, and with a gradient
through the lse) and agree with the Triton kernels'. Deterministic mode must take the dkdv route
and give the same bits twice.
"""

import pytest
import torch

import hf_flash
from hf_flash.kernels import _backward_hopper, _common, _forward_hopper
from conftest import DEVICE
from kernel_utils import GRAD_RATIO, check_ratio, make_qkv, replayed_keep_mask

from hopper_utils import Spy, check_compiles_for_sm90, needs_gluon, on_sm90

C_NONE, C_TL, C_BR = 0, 1, 2


@pytest.fixture(autouse=True)
def poison_outputs():
    _common.POISON_OUTPUTS = True
    yield
    _common.POISON_OUTPUTS = False


ROUTES = ["dkdv", "fused"]


@pytest.fixture
def any_length(monkeypatch):
    # Both Gluon kernels at every length (their floors are speed choices): partial and single
    # tiles, in both directions.
    for mod in (_forward_hopper, _backward_hopper):
        monkeypatch.setattr(mod, "MIN_LENGTH", dict.fromkeys(mod.MIN_LENGTH, 1))
    # (Every head dim, including those the fused route's floors leave out.)
    monkeypatch.setattr(_backward_hopper, "FUSED_MIN_LENGTH",
                        dict.fromkeys(_backward_hopper.MIN_LENGTH, 1))


_DQ_KINDS = ([("tma", _backward_hopper.DQ_TMA)] if _backward_hopper.HAS_TMA_ADD else []) + [
    ("atomic", _backward_hopper.DQ_ATOMIC)]


@needs_gluon
@pytest.mark.parametrize("dq", [("none", _backward_hopper.DQ_NONE)] + _DQ_KINDS,
                         ids=lambda x: x[0])
@pytest.mark.parametrize("d,causal,dtype", [(64, True, "bf16"), (128, True, "bf16"),
                                            (128, False, "fp16")])
def test_compiles_for_sm90_without_spills(d, causal, dtype, dq):
    # Compiled as launched (aligned pointers): Triton 3.9 builds the dkdv route without a
    # stack, and the fused one with 40-64 bytes at head dim 128 (loop scalars: counters,
    # offsets). Triton 3.6's ptxas keeps 40-48 bytes at head dim 128 on the dkdv route; its
    # fused route (element atomics: 3.6 has no TMA reductions) 80-88. A tile spilled (a second
    # loop for the causal diagonal made 80-400 bytes on the dkdv route) would exceed the bound.
    check_compiles_for_sm90("build_hopper_backward", d, causal, dtype,
                            max_stack=128 if dq[0] == "atomic" else 64, dq=dq[1])


@needs_gluon
@pytest.mark.parametrize("dq", _DQ_KINDS, ids=lambda x: x[0])
@pytest.mark.parametrize("causal", [False, True])
def test_compiles_for_sm90_with_dropout(causal, dq):
    # The fused route with the dropout mask drawn in the kernel (head dim 64 only: at 128 the
    # drawn tile spills hundreds of bytes). Triton 3.9: no stack with TMA reductions, 0-8 bytes
    # with element atomics; 3.6 (element atomics) 32-56.
    check_compiles_for_sm90("build_hopper_backward", 64, causal, "bf16",
                            max_stack=96 if dq[0] == "atomic" else 16, dq=dq[1], dropout=True)


@needs_gluon
@pytest.mark.parametrize("dq", _DQ_KINDS, ids=lambda x: x[0])
@pytest.mark.parametrize("causal,dropout", [(False, False), (True, False), (False, True)])
def test_compiles_for_sm90_with_key_padding(causal, dropout, dq):
    # The fused route with key padding (HF_FLASH_HOPPER_KPM=1; with dropout, unmasked only): a
    # per-key bound folded into the causal compare, so the tile costs no more registers. Triton
    # 3.9: no stack but 24 bytes with dropout and TMA reductions; 3.6 up to 48 (with dropout).
    check_compiles_for_sm90("build_hopper_backward", 64, causal, "bf16",
                            max_stack=96 if dq[0] == "atomic" else 32, dq=dq[1], dropout=dropout,
                            kpm=True)


class _Routes:
    """Counts the backward calls each route served."""

    def __init__(self, monkeypatch):
        self.spies = {"dkdv": Spy(monkeypatch, _backward_hopper, "dkdv"),
                      "fused": Spy(monkeypatch, _backward_hopper, "backward")}

    def counts(self):
        return {name: spy.calls for name, spy in self.spies.items()}


def _take_route(monkeypatch, route):
    monkeypatch.setattr(_backward_hopper, "FUSED", route == "fused")


@pytest.mark.gpu
@on_sm90
@needs_gluon
def test_serves_exactly_the_calls_it_is_built_for(monkeypatch):
    routes = _Routes(monkeypatch)
    dev = "cuda"
    monkeypatch.setattr(_backward_hopper, "KEY_PADDING", False)  # (HF_FLASH_HOPPER_KPM may be set)

    def call(n_q=200, n_k=300, D=64, dtype=torch.bfloat16, **kw):
        h_kv = kw.pop("h_kv", 4)
        q = torch.randn(2, 4, n_q, D, device=dev, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(2, h_kv, n_k, D, device=dev, dtype=dtype, requires_grad=True)
                for _ in range(2))
        before = routes.counts()
        hf_flash.flash_attention(q, k, v, enable_gqa=h_kv != 4, **kw).sum().backward()
        after = routes.counts()
        served = [name for name in after if after[name] != before[name]]
        assert len(served) <= 1 and all(after[n] - before[n] == 1 for n in served)
        return served[0] if served else ""

    # The floors are speed choices (and the fused one depends on the Triton): fixed here.
    keys = list(_backward_hopper.MIN_LENGTH)
    monkeypatch.setattr(_backward_hopper, "MIN_LENGTH", dict.fromkeys(keys, 1024))
    monkeypatch.setattr(_backward_hopper, "FUSED_MIN_LENGTH", dict.fromkeys(keys, 2048))
    assert call(n_q=2048, n_k=2048) == "fused"
    assert call(n_q=2048, n_k=3000, D=128, dtype=torch.float16, is_causal=True) == "fused"
    assert call(n_q=2100, n_k=2300, D=128, h_kv=2) == "fused"
    assert call(n_q=1024, n_k=4000, D=128) == "dkdv"
    assert call(n_q=1500, n_k=3000, is_causal=True, causal_alignment="bottom_right") == "dkdv"
    assert call(n_q=1000, n_k=1000, D=64) == ""
    assert call(n_q=1, n_k=4096, D=128) == ""
    # Dropout calls from the lower of the fused floor and the dropout floor (head dim 64 only).
    monkeypatch.setattr(_backward_hopper, "DROPOUT", True)
    monkeypatch.setattr(_backward_hopper, "DROPOUT_MIN_LENGTH", {(64, False): 1024})
    assert call(n_q=1024, n_k=1024, dropout_p=0.1) == "fused"
    assert call(n_q=1024, n_k=1024) == "dkdv"
    assert call(n_q=1000, n_k=1000, dropout_p=0.1) == ""
    assert call(n_q=1024, n_k=1024, dropout_p=0.1, is_causal=True) == ""
    assert call(n_q=2048, n_k=2048, dropout_p=0.1, is_causal=True) == "fused"
    assert call(n_q=2048, n_k=2048, dropout_p=0.1, D=128) == ""
    # Without the fused route, or in deterministic mode, the dkdv route from its own floor.
    monkeypatch.setattr(_backward_hopper, "FUSED", False)
    assert call(n_q=2048, n_k=2048, D=64) == "dkdv"
    monkeypatch.setattr(_backward_hopper, "FUSED", True)
    torch.use_deterministic_algorithms(True)
    try:
        assert call(n_q=2048, n_k=2048, D=64) == "dkdv"
        assert call(n_q=1000, n_k=1000, D=64) == ""
    finally:
        torch.use_deterministic_algorithms(False)
    # A head dim without a fused floor (element atomics lose at 128): the dkdv route.
    monkeypatch.setattr(_backward_hopper, "FUSED_MIN_LENGTH", {(64, False): 2048})
    assert call(n_q=2048, n_k=2048, D=128) == "dkdv"
    monkeypatch.setattr(_backward_hopper, "MIN_LENGTH", dict.fromkeys(keys, 1))
    monkeypatch.setattr(_backward_hopper, "FUSED_MIN_LENGTH", dict.fromkeys(keys, 1))
    assert call() == "fused"
    # Everything else goes to the Triton kernels.
    assert call(dtype=torch.float32) == ""
    assert call(D=80) == ""
    monkeypatch.setattr(_backward_hopper, "DROPOUT", False)
    assert call(dropout_p=0.1) == ""
    # Dropout on the fused route, where it is switched on (DROPOUT), at head dim 64 only; never
    # on the dkdv route, which would draw the mask twice.
    monkeypatch.setattr(_backward_hopper, "DROPOUT", True)
    assert call(dropout_p=0.1) == "fused"
    assert call(dropout_p=0.1, is_causal=True, h_kv=2) == "fused"
    assert call(dropout_p=0.1, D=128) == ""
    assert call(dropout_p=0.1, key_padding_mask=torch.rand(2, 300, device=dev) > 0.5) == ""
    torch.use_deterministic_algorithms(True)
    try:
        assert call(dropout_p=0.1) == ""
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setattr(_backward_hopper, "DROPOUT", False)
    assert call(key_padding_mask=torch.rand(2, 300, device=dev) > 0.5) == ""
    # Key padding on the fused route, where it is switched on (KEY_PADDING); never on the dkdv
    # route, nor with a mask, nor below the floors.
    monkeypatch.setattr(_backward_hopper, "KEY_PADDING", True)
    assert call(key_padding_mask=torch.rand(2, 300, device=dev) > 0.5) == "fused"
    assert call(key_padding_mask=torch.rand(2, 300, device=dev) > 0.5, is_causal=True,
                h_kv=2) == "fused"
    assert call(key_padding_mask=torch.rand(2, 300, device=dev) > 0.5,
                attn_mask=torch.rand(2, 1, 200, 300, device=dev) > 0.5) == ""
    # With dropout, unmasked only (with causality no first pass knows which rows see one key).
    monkeypatch.setattr(_backward_hopper, "DROPOUT", True)
    assert call(key_padding_mask=torch.rand(2, 300, device=dev) > 0.5, dropout_p=0.1) == "fused"
    assert call(key_padding_mask=torch.rand(2, 300, device=dev) > 0.5, dropout_p=0.1,
                is_causal=True) == ""
    monkeypatch.setattr(_backward_hopper, "DROPOUT", False)
    monkeypatch.setattr(_backward_hopper, "FUSED_MIN_LENGTH", dict.fromkeys(keys, 1024))
    assert call(key_padding_mask=torch.rand(2, 300, device=dev) > 0.5) == ""
    monkeypatch.setattr(_backward_hopper, "FUSED_MIN_LENGTH", dict.fromkeys(keys, 1))
    monkeypatch.setattr(_backward_hopper, "FUSED", False)
    assert call(key_padding_mask=torch.rand(2, 300, device=dev) > 0.5) == ""
    monkeypatch.setattr(_backward_hopper, "FUSED", True)
    monkeypatch.setattr(_backward_hopper, "KEY_PADDING", False)
    assert call(attn_mask=torch.rand(2, 1, 200, 300, device=dev) > 0.5) == ""
    assert call(n_q=300, n_k=200, is_causal=True, causal_alignment="bottom_right") == ""
    assert call(scale=-0.3) == ""
    monkeypatch.setattr(_backward_hopper, "ENABLED", False)
    assert call() == ""


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
    return q.grad.clone(), k.grad.clone(), v.grad.clone()


@pytest.mark.gpu
@on_sm90
@needs_gluon
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_q,n_k,causal", _EDGE)
def test_matches_the_reference(monkeypatch, any_length, n_q, n_k, causal, dtype, D, route):
    routes = _Routes(monkeypatch)
    _take_route(monkeypatch, route)
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
        before = routes.counts()[route]
        grads = _grads(q, k, v, do, w, fa, gqa)
        assert routes.counts()[route] == before + 1
        _check_against_the_reference(grads, q, k, v, do, w, dtype, causal=causal)


def _check_against_the_reference(grads, q, k, v, do, w, dtype, **ref):
    """The ratio rule for (dq, dk, dv) of loss (out * do).sum() + (lse * w).sum(): against the
    float64 reference, with the same reference in `dtype` as the yardstick."""
    refs = []
    for ref_dtype in (torch.float64, dtype):
        leaves = [t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v)]
        o, lse = hf_flash.kernels.reference_attention(*leaves, **ref)
        ((o * do.to(ref_dtype)).sum() + (lse * w.to(ref_dtype)).sum()).backward()
        refs.append([t.grad for t in leaves])
    for name, got, r64, r_lo in zip(("dq", "dk", "dv"), grads, refs[0], refs[1]):
        check_ratio(name, got, r64, r_lo, GRAD_RATIO, dtype)


@pytest.mark.gpu
@on_sm90
@needs_gluon
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("causal", [C_NONE, C_TL, C_BR])
def test_agrees_with_the_triton_kernels(monkeypatch, any_length, causal, route):
    # Same inputs: the kernels round P^T and dS^T to bf16 and sum the tiles in fp32, in another
    # order (the fused route's delta also takes its other form, rowsum(dO * O)), so a gradient
    # may differ by a rounding step of the terms it sums (at most about its row's largest
    # entry).
    fa = {"is_causal": causal != C_NONE,
          "causal_alignment": "bottom_right" if causal == C_BR else "top_left"}
    _check_agreement(monkeypatch, route, 5 + causal, 128, fa, weighted_lse=False)


def _check_agreement(monkeypatch, route, seed, D, fa, weighted_lse, call_seed=None, batch=2):
    """One GQA call (lengths off the tiles) through `route`, then through Triton's kernels (the
    draw of a dropout mask seeded alike by call_seed): each gradient within a rounding step of
    its row's largest entry."""
    routes = _Routes(monkeypatch)
    _take_route(monkeypatch, route)
    torch.manual_seed(seed)
    q = torch.randn(batch, 8, 1500, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, 4, 1700, D, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)
    w = (torch.randn if weighted_lse else torch.zeros)(batch, 8, 1500, device="cuda")
    grads = []
    for enabled in (True, False):
        monkeypatch.setattr(_backward_hopper, "ENABLED", enabled)
        if call_seed is not None:
            torch.manual_seed(call_seed)
        grads.append(_grads(q, k, v, do, w, fa, True))
        assert routes.counts()[route] == 1
    report = []
    for name, a, b in zip(("dq", "dk", "dv"), *grads):
        row_scale = b.float().abs().amax(-1, keepdim=True).clamp_min(1e-6)
        ratio = (a.float() - b.float()).abs() / row_scale
        worst = ratio.max().item()
        if worst > 2.0 ** -6:
            # Where, and how large that row is: a row whose exact value is zero (all of its
            # scale is the clamp) tells rounding apart from a fault.
            at = divmod(ratio.argmax().item(), a.shape[-1])[0]
            entry, rest = divmod(at, a.shape[1] * a.shape[2])
            # And each batch entry's worst, in ratio and in absolute terms: an error confined to
            # one entry (its lengths) reads apart from one spread over all.
            per_entry = ", ".join(
                f"{r.max().item():.1e} ({(x - y).abs().max().item():.1e})" for r, x, y in
                zip(ratio, a.float(), b.float()))
            report.append(f"{name} differs by {worst:.2e} of its row's largest entry (batch entry "
                          f"{entry}, head {rest // a.shape[2]}, row {rest % a.shape[2]}, whose "
                          f"largest entry is {b.float().abs().amax(-1).flatten()[at].item():.2e}; "
                          f"per entry: {per_entry})")
    assert not report, "; ".join(report)


_DROP_EDGE = [(1, 1, C_NONE), (65, 130, C_TL), (129, 1000, C_NONE), (1000, 129, C_TL),
              (300, 1100, C_BR), (777, 777, C_TL)]


@pytest.mark.gpu
@on_sm90
@needs_gluon
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_q,n_k,causal", _DROP_EDGE)
def test_dropout_matches_the_reference(monkeypatch, any_length, n_q, n_k, causal, dtype):
    # The fused route with dropout (HF_FLASH_HOPPER_DROPOUT=1) against the float64 reference
    # replaying the call's keep mask: the kernel must draw the forward's mask (the Triton
    # forward's, the Gluon forward takes no dropout) and apply dropout's scale once to each
    # gradient, with a gradient through the lse too.
    monkeypatch.setattr(_backward_hopper, "DROPOUT", True)
    routes = _Routes(monkeypatch)
    _take_route(monkeypatch, "fused")
    torch.manual_seed(n_q * 3 + n_k + causal)
    gqa = n_q % 2 == 1
    B, H, D, p = 2, 4, 64, 0.25
    q, k, v = make_qkv(B, H, 2 if gqa else 4, n_q, n_k, D, dtype, DEVICE,
                       "bnhd" if gqa else "bhnd")
    fa = {"is_causal": causal != C_NONE, "dropout_p": p,
          "causal_alignment": "bottom_right" if causal == C_BR else "top_left"}
    do = torch.randn(B, H, n_q, D, device=DEVICE, dtype=dtype)
    w = torch.randn(B, H, n_q, device=DEVICE)
    torch.manual_seed(77)  # the call draws its dropout seed first
    grads = _grads(q, k, v, do, w, fa, gqa)
    assert routes.counts()["fused"] == 1
    keep = replayed_keep_mask(77, p, B, H, n_q, n_k, DEVICE)
    _check_against_the_reference(grads, q, k, v, do, w, dtype, causal=causal, dropout_p=p,
                                 keep_mask=keep)


@pytest.mark.gpu
@on_sm90
@needs_gluon
@pytest.mark.parametrize("causal", [C_NONE, C_TL, C_BR])
def test_dropout_agrees_with_the_triton_kernels(monkeypatch, any_length, causal):
    # The same call with the same seed through the fused route and through Triton's kernels:
    # the same mask, so the gradients agree as without dropout (test_agrees_with_the_triton_
    # kernels), at a GPT-2-like shape (head dim 64, GQA, lengths off the tiles).
    monkeypatch.setattr(_backward_hopper, "DROPOUT", True)
    fa = {"is_causal": causal != C_NONE, "dropout_p": 0.1,
          "causal_alignment": "bottom_right" if causal == C_BR else "top_left"}
    _check_agreement(monkeypatch, "fused", 9 + causal, 64, fa, weighted_lse=True, call_seed=1)


def _key_padding(B, n_k, seed):
    """A (B, n_k) key padding mask of every kind the kernel must handle: entry 0 all real;
    1 padded at the end (BERT's form); 2 the first key padded (under top-left causality row 0
    sees no key, while later rows of its tile do) and holes; 3 all padded (its blocks run no
    query tile); 4 the first half padded (blocks before the real keys skipped; under causality,
    query tiles that see no key); 5 one real key (every row one-hot); then the same again."""
    g = torch.Generator().manual_seed(seed)
    kpm = torch.ones(B, n_k, dtype=torch.bool)
    for b in range(B):
        kind = b % 6
        if kind == 1:
            kpm[b, int(torch.randint(1, n_k + 1, (1,), generator=g)):] = False
        elif kind == 2:
            kpm[b] = torch.rand(n_k, generator=g) > 0.3
            kpm[b, 0] = False
        elif kind == 3:
            kpm[b] = False
        elif kind == 4:
            kpm[b, :n_k // 2] = False
        elif kind == 5:
            kpm[b] = False
            kpm[b, int(torch.randint(0, n_k, (1,), generator=g))] = True
    return kpm.to(DEVICE)


_KPM_EDGE = [(1, 1, C_NONE), (65, 130, C_TL), (129, 1000, C_NONE), (1000, 129, C_TL),
             (300, 1100, C_BR), (777, 777, C_TL), (512, 512, C_NONE)]


@pytest.mark.gpu
@on_sm90
@needs_gluon
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_q,n_k,causal,D,p", [
    (*edge, D, p) for edge in _KPM_EDGE for D, p in ((64, 0.0), (128, 0.0), (64, 0.25))
    if p == 0 or edge[2] == C_NONE])  # with dropout the route takes key padding unmasked only
def test_key_padding_matches_the_reference(monkeypatch, any_length, n_q, n_k, causal, dtype, D,
                                           p):
    # The fused route with key padding (HF_FLASH_HOPPER_KPM=1) against the float64 reference
    # (replaying the keep mask), with a gradient through the lse: padded keys get no gradient
    # and give none, rows that see no key get zeros, one-hot rows cancel (under dropout by the
    # first pass's exact delta), and blocks of padded keys are skipped whole.
    monkeypatch.setattr(_backward_hopper, "KEY_PADDING", True)
    monkeypatch.setattr(_backward_hopper, "DROPOUT", True)
    routes = _Routes(monkeypatch)
    _take_route(monkeypatch, "fused")
    torch.manual_seed(n_q * 5 + n_k + causal + D)
    gqa = n_q % 2 == 1
    B, H = 6, 4
    q, k, v = make_qkv(B, H, 2 if gqa else 4, n_q, n_k, D, dtype, DEVICE,
                       "bnhd" if gqa else "bhnd")
    kpm = _key_padding(B, n_k, n_q + n_k)
    fa = {"is_causal": causal != C_NONE, "key_padding_mask": kpm, "dropout_p": p,
          "causal_alignment": "bottom_right" if causal == C_BR else "top_left"}
    do = torch.randn(B, H, n_q, D, device=DEVICE, dtype=dtype)
    w = torch.randn(B, H, n_q, device=DEVICE)
    torch.manual_seed(78)  # the call draws its dropout seed first
    grads = _grads(q, k, v, do, w, fa, gqa)
    assert routes.counts()["fused"] == 1
    ref = {"causal": causal, "kpm": kpm}
    if p > 0:
        ref.update(dropout_p=p, keep_mask=replayed_keep_mask(78, p, B, H, n_q, n_k, DEVICE))
    _check_against_the_reference(grads, q, k, v, do, w, dtype, **ref)
    # Padded keys: exactly zero gradients (the reference's may be rounding-small, not zero).
    for name, g in (("dk", grads[1]), ("dv", grads[2])):
        assert torch.all(g.transpose(1, 2)[~kpm] == 0), f"{name} of a padded key"


_BERT_LIKE_LENGTHS = (1700, 900, 1, 1337)  # one entry of a single real key: its rows are one-hot


@pytest.mark.gpu
@on_sm90
@needs_gluon
@pytest.mark.parametrize("causal", [C_NONE, C_TL])
def test_key_padding_agrees_with_the_triton_kernels(monkeypatch, any_length, causal):
    # A BERT-like padded batch through the fused route and through Triton's kernels. Without
    # dropout the one-key entry's output is that key's value exactly, so both take the same
    # delta and agree; with dropout see the test below.
    monkeypatch.setattr(_backward_hopper, "KEY_PADDING", True)
    lengths = torch.tensor(_BERT_LIKE_LENGTHS)
    kpm = (torch.arange(1700)[None, :] < lengths[:, None]).to("cuda")
    fa = {"is_causal": causal != C_NONE, "key_padding_mask": kpm}
    _check_agreement(monkeypatch, "fused", 13 + causal, 64, fa, weighted_lse=True, batch=4)


@pytest.mark.gpu
@on_sm90
@needs_gluon
def test_key_padding_with_dropout_matches_the_reference_per_entry(monkeypatch, any_length):
    # With dropout the two routes part on the one-key entry, and the float64 reference (its
    # keep mask replayed) says which is right. Its rows are one-hot, so dS = dP - delta is
    # exactly zero: the fused route's first pass takes that row's delta from the key itself
    # and gets it; Triton's kernels take rowsum(dO * O) from the bf16 output, v / (1 - p)
    # rounded, and leave a residue (on an H200, Triton 3.6: dQ 2.8e-2 from the reference there,
    # the fused route 5.9e-3; benchmarks/kpm_dq_probe.py). So each batch entry is held to the
    # ratio rule on its own, where a fault in one entry's tiles cannot hide behind the others'
    # larger values.
    monkeypatch.setattr(_backward_hopper, "KEY_PADDING", True)
    monkeypatch.setattr(_backward_hopper, "DROPOUT", True)
    routes = _Routes(monkeypatch)
    _take_route(monkeypatch, "fused")
    B, p, seed = len(_BERT_LIKE_LENGTHS), 0.1, 2
    torch.manual_seed(13)
    q = torch.randn(B, 8, 1500, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, 4, 1700, 64, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(2))
    do, w = torch.randn_like(q), torch.randn(B, 8, 1500, device="cuda")
    kpm = (torch.arange(1700)[None, :] < torch.tensor(_BERT_LIKE_LENGTHS)[:, None]).to("cuda")
    torch.manual_seed(seed)  # the call draws its dropout seed first
    grads = _grads(q, k, v, do, w, {"key_padding_mask": kpm, "dropout_p": p}, True)
    assert routes.counts()["fused"] == 1
    keep = replayed_keep_mask(seed, p, B, 8, 1500, 1700, DEVICE)
    refs = []
    for ref_dtype in (torch.float64, torch.bfloat16):
        leaves = [t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v)]
        o, lse = hf_flash.kernels.reference_attention(*leaves, kpm=kpm, dropout_p=p,
                                                      keep_mask=keep)
        ((o * do.to(ref_dtype)).sum() + (lse * w.to(ref_dtype)).sum()).backward()
        refs.append([t.grad for t in leaves])
    for name, got, r64, r_lo in zip(("dq", "dk", "dv"), grads, *refs):
        for e in range(B):
            check_ratio(f"{name} of batch entry {e} ({_BERT_LIKE_LENGTHS[e]} real keys)",
                        got[e], r64[e], r_lo[e], GRAD_RATIO, torch.bfloat16)


@pytest.mark.gpu
@on_sm90
@needs_gluon
def test_deterministic_mode_repeats_bits(monkeypatch, any_length):
    # The fused route adds dQ up in no fixed order; under torch.use_deterministic_algorithms
    # the dkdv route serves, and two backwards give the same bits.
    routes = _Routes(monkeypatch)
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 4, 2048, 64, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    w = torch.zeros(1, 4, 2048, device="cuda")
    torch.use_deterministic_algorithms(True)
    try:
        first, second = (_grads(q, k, v, do, w, {}, False) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(False)
    assert routes.counts() == {"dkdv": 2, "fused": 0}
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    _grads(q, k, v, do, w, {}, False)
    assert routes.counts()["fused"] == 1


@pytest.mark.parametrize("n_q,layout,with_dlse,p", [(1, "bhnd", True, 0.0),
                                                    (100, "bnhd", False, 0.0),
                                                    (128, "bhnd", False, 0.3),
                                                    (130, "bnhd", True, 0.1)])
def test_prepare_writes_the_fused_routes_row_terms(n_q, layout, with_dlse, p):
    # The fused route's first pass (a Triton kernel: it runs under the interpreter too): per row
    # lse and delta = rowsum(dO * O) - dlse log2(e), padded to whole query tiles with +inf and 0
    # (P = 0 there), and dQ's fp32 sum zeroed; O and dO in either layout. With dropout, delta in
    # units of 1 / dropout's scale, as the kernel takes it.
    torch.manual_seed(n_q)
    B, H, D = 2, 3, 64

    def tensor():
        t = torch.randn(B, n_q, H, D, device=DEVICE, dtype=torch.float16)
        return t.transpose(1, 2) if layout == "bnhd" else t.transpose(1, 2).contiguous()
    o, do = tensor(), tensor()
    stats = torch.randn(B, H, 3, n_q, device=DEVICE)
    stats[0, 0, 0, 0] = float("-inf")  # a row that saw no key (key padding): P = 0 needs +inf
    dlse = torch.randn(B, H, n_q, device=DEVICE) if with_dlse else None
    rows, dq_acc = _backward_hopper.prepare(o, do, stats, dlse, dropout_p=p)
    n_pad = -(-n_q // _backward_hopper.BLOCK_M) * _backward_hopper.BLOCK_M
    assert rows.shape == (B, H, 2, n_pad) and dq_acc.shape == (B, H, n_q, D)
    delta = (o.float() * do.float()).sum(-1)
    if with_dlse:
        delta = delta - dlse * _common.LOG2E
    delta = delta / hf_flash.kernels._dropout.dropout_scale(p)
    want_lse = stats[:, :, 0].clone()
    want_lse[0, 0, 0] = float("inf")
    torch.testing.assert_close(rows[:, :, 0, :n_q], want_lse, rtol=0, atol=0)
    torch.testing.assert_close(rows[:, :, 1, :n_q], delta, rtol=1e-5, atol=1e-5)
    assert torch.all(rows[:, :, 0, n_q:] == float("inf"))
    assert torch.all(rows[:, :, 1, n_q:] == 0)
    assert torch.all(dq_acc == 0)


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_prepare_takes_a_one_key_rows_delta_from_that_key(layout):
    # With dropout and key padding (no causality), the rows of a batch entry with a single real
    # key are one-hot: their delta must be keep * (dO . V[key]) exactly, not rowsum(dO * O) of
    # the rounded O (its rounding would survive in dS and add up in that key's dK). Other
    # entries keep the usual form. Runs under the interpreter too.
    torch.manual_seed(5)
    B, H, H_KV, n_q, n_k, D, p = 3, 4, 2, 100, 90, 64, 0.3

    def tensor(h, n):
        t = torch.randn(B, n, h, D, device=DEVICE, dtype=torch.float16)
        return t.transpose(1, 2) if layout == "bnhd" else t.transpose(1, 2).contiguous()
    o, do, v = tensor(H, n_q), tensor(H, n_q), tensor(H_KV, n_k)
    stats = torch.randn(B, H, 3, n_q, device=DEVICE)
    dlse = torch.randn(B, H, n_q, device=DEVICE)
    kpm = torch.zeros(B, n_k, dtype=torch.bool, device=DEVICE)
    kpm[0, 37] = True  # one real key, not at a multiple of 32
    kpm[1, 3:50] = True
    kpm[2, 64] = True
    lo, hi = hf_flash.kernels._key_range.key_range(kpm.view(torch.uint8))
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=DEVICE)
    rows, _ = _backward_hopper.prepare(o, do, stats, dlse, dropout_p=p,
                                       one_key=(v, lo, hi, seed))
    scale = hf_flash.kernels._dropout.dropout_scale(p)
    keep = hf_flash.kernels._dropout.dropout_mask(seed, p, B, H, n_q, n_k)
    dlse_term = dlse * _common.LOG2E / scale
    want = ((o.float() * do.float()).sum(-1) - dlse * _common.LOG2E) / scale
    for b, key in ((0, 37), (2, 64)):
        v_key = v[b, :, key].float().repeat_interleave(H // H_KV, dim=0)  # (H, D)
        dp = (do[b].float() * v_key[:, None, :]).sum(-1)
        want[b] = torch.where(keep[b, :, :, key], dp, 0.0) - dlse_term[b]
    torch.testing.assert_close(rows[:, :, 1, :n_q], want, rtol=1e-5, atol=1e-5)
