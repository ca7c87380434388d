"""The host side of the kernels' launches, on any machine: compiled for sm_90 and handed to a
stand-in driver (scripts/fake_sm90.py) that records what each launch gives the launcher. (The
rest of the CPU suite runs the kernels under Triton's interpreter, whose plans repeat Triton's
own launch: the direct launches every GPU call makes are checked here.)

A plan's later calls launch through kernels/_hopper.Launches: straight to the compiled kernel,
with descriptors copied from the first call's. They must hand the launcher exactly what Triton's
own dispatch would for the same tensors: grid, scalars, constexprs, every tensor and every
descriptor's fields. On an sm_90 GPU, a plan's call must also compute what the same call without
plans does.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import hf_flash
from hf_flash.kernels import _backward_hopper, _forward_hopper, _tuning
from hopper_utils import ROOT, needs_gluon, on_sm90

def _on_the_stand_in(script: str) -> dict:
    """Run `script` in a process of its own, compiling for sm_90 (no interpreter; autotuning off,
    its timing runs need a GPU), and return the JSON its last line prints."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["HF_FLASH_AUTOTUNE"] = "0"
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


_SCRIPT = r"""
import gc, json, sys, warnings, weakref
sys.path.insert(0, "scripts")
import fake_sm90 as f
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    f.install()
    from hf_flash.kernels import _hopper
    out = {}
    for name, call in f.calls().items():
        first, second = f.inputs(seed=1, d=64), f.inputs(seed=2, d=64)
        names = {t.data_ptr(): k for k, t in second.items()}
        plan = _hopper.Launches()
        f.Recorder.log = []
        call(first, plan)
        jit_first = len(f.Recorder.log)
        # Which launches the plan's second call makes through it (not through Triton).
        direct = {}
        for key, go in list(plan.direct.items()):
            def counted(args, go=go, name=key[0]):
                direct[name] = direct.get(name, 0) + 1
                go(args)
            plan.direct[key] = counted
        f.Recorder.log = []
        call(second, plan)
        planned = f.normalised(f.Recorder.log, names)
        f.Recorder.log = []
        call(second, _hopper.ONCE)
        dispatched = f.normalised(f.Recorder.log, names)
        # The plan keeps no tensor of its first call.
        alive = weakref.ref(first["q"])
        del first
        gc.collect()
        out[name] = {"launches": jit_first, "direct": direct, "same": planned == dispatched,
                     "planned": repr(planned)[:3000], "dispatched": repr(dispatched)[:3000],
                     "kept_a_tensor": alive() is not None}
    # A kernel's config changed between two calls of one plan (as experiments do) is another
    # kernel: the plan must not launch the first one's.
    calls = f.calls()
    if "fused backward, atomics" in calls:
        t = f.inputs(seed=3, d=64)
        names = {x.data_ptr(): k for k, x in t.items()}
        plan = _hopper.Launches()
        calls["fused backward"](t, plan)
        f.Recorder.log = []
        calls["fused backward, atomics"](t, plan)
        planned = f.normalised(f.Recorder.log, names)
        f.Recorder.log = []
        calls["fused backward, atomics"](t, _hopper.ONCE)
        out["config changed"] = planned == f.normalised(f.Recorder.log, names)
out["warnings"] = [str(w.message) for w in caught if "FP_FUSION" in str(w.message)]
print(json.dumps(out))
"""


@needs_gluon
def test_a_plans_gluon_launches_hand_the_launcher_what_tritons_dispatch_does():
    got = _on_the_stand_in(_SCRIPT)
    # Every launch names its multiply-add fusion: Triton 3.9 warns where one leaves it to the
    # default, which 3.10 changes.
    assert got.pop("warnings") == []
    assert got.pop("config changed", True)
    expected = {"forward": {"main"}, "dkdv backward": {"main"},
                "fused backward": {"prep", "main"}, "fused backward, atomics": {"prep", "main"}}
    assert set(got) <= set(expected) and {"forward", "dkdv backward", "fused backward"} <= set(got)
    for name, r in got.items():
        assert r["launches"] == len(expected[name]), (name, r["launches"])
        assert r["direct"] == dict.fromkeys(expected[name], 1), (name, r["direct"])
        assert r["same"], (name, r["planned"], r["dispatched"])
        assert not r["kept_a_tensor"], name


_TRITON_SCRIPT = r"""
import json, sys
sys.path.insert(0, "scripts")
import fake_sm90 as f
f.install()
import torch
torch.cuda.current_device = lambda: 0  # what _tuning asks; the stand-in's device
from hf_flash.kernels import _backward, _forward, _op, _tuning

def make(seed, case):
    g = torch.Generator().manual_seed(seed)
    b, h, h_kv, n_q, n_k, d = case["shape"]
    r = lambda *s, dt=torch.float16: torch.randn(*s, generator=g).to(dt)
    t = dict(q=r(b, h, n_q, d), k=r(b, h_kv, n_k, d), v=r(b, h_kv, n_k, d), do=r(b, h, n_q, d),
             o=r(b, h, n_q, d), stats=r(b, h, 3, n_q, dt=torch.float32))
    if case.get("kpm"):
        t["kpm"] = torch.rand(b, n_k, generator=g) > 0.3
    if case.get("mask"):
        t["mask"] = r(1, h, n_q, n_k, dt=torch.float32)
    if case.get("dropout"):
        t["seed"] = torch.randint(0, 2**62, (1,), generator=g, dtype=torch.int64)
    if case.get("packed"):
        t["cu"] = torch.tensor(case["packed"], dtype=torch.int32)
    return t

def run(t, case):
    cu = case.get("packed")
    args = (t.get("mask"), t.get("kpm"), case.get("causal", 0), 0.125, case.get("dropout", 0.0),
            t.get("seed"), t.get("cu"), max(b - a for a, b in zip(cu, cu[1:])) if cu else 0)
    _op._attention_forward_op(t["q"], t["k"], t["v"], *args)
    _op._attention_backward_op(t["do"], t["q"], t["k"], t["v"], t["o"], t["stats"], None, *args)

# Triton's dispatch of each kernel, counted.
dispatched = []
for kernel in (_forward._fwd_kernel, _backward._bwd_dq_kernel, _backward._bwd_dkdv_kernel):
    def counted(*a, _real=kernel.run, **kw):
        dispatched.append(1)
        return _real(*a, **kw)
    kernel.run = counted

CASES = {"key padding + dropout": dict(shape=(2, 4, 4, 70, 70, 64), kpm=True, dropout=0.1),
         "causal bottom-right, grouped": dict(shape=(2, 4, 2, 33, 70, 64), causal=2),
         "float mask": dict(shape=(1, 2, 2, 40, 50, 32), mask=True),
         "packed, causal, dropout": dict(shape=(1, 4, 4, 90, 90, 64), packed=[0, 30, 90],
                                         causal=1, dropout=0.1)}
out = {}
for name, case in CASES.items():
    first, second = make(1, case), make(2, case)
    names = {x.data_ptr(): k for k, x in second.items()}
    run(first, case)  # compiles; makes the plans
    dispatched.clear()
    f.Recorder.log = []
    run(second, case)
    planned, n_dispatched = f.normalised(f.Recorder.log, names), len(dispatched)
    # The same call by Triton's dispatch: no plan, no compiled kernel kept.
    _tuning._PLANS.clear()
    _tuning._COMPILED.clear()
    f.Recorder.log = []
    run(second, case)
    dispatched_log = f.normalised(f.Recorder.log, names)
    kernels = [launch[0] for launch in planned]
    out[name] = {"launches": len(kernels) - kernels.count("_key_range_kernel"),
                 "key ranges": kernels.count("_key_range_kernel"), "dispatched": n_dispatched,
                 "same": planned == dispatched_log, "planned": repr(planned)[:3000],
                 "by dispatch": repr(dispatched_log)[:3000]}
print(json.dumps(out))
"""


def test_a_plans_triton_launches_hand_the_launcher_what_tritons_dispatch_does():
    pytest.importorskip("triton.backends.nvidia", reason="compiling for sm_90 needs it")
    got = _on_the_stand_in(_TRITON_SCRIPT)
    assert len(got) == 4
    for name, r in got.items():
        assert r["launches"] == 3, (name, r["launches"])  # forward, dQ, dK/dV
        # With key padding, its span of real keys is drawn on the device in each op, from the
        # plan too (kernels/_key_range.py).
        assert r["key ranges"] == (2 if "key padding" in name else 0), (name, r["key ranges"])
        assert r["dispatched"] == 0, name  # the plan's call went by the direct launchers
        assert r["same"], (name, r["planned"], r["by dispatch"])


_ROUTES_SCRIPT = r"""
import json, sys
sys.path.insert(0, "scripts")
import fake_sm90 as f
f.install()
import torch
torch.cuda.current_device = lambda: 0
from hf_flash.kernels import (_backward, _backward_hopper as bh, _forward, _forward_hopper as fh,
                              _hopper, _op, _tuning)
_hopper.on_sm90 = lambda t: True  # the stand-in is an sm_90
for mod in (fh, bh):  # every length (the floors are speed choices)
    mod.MIN_LENGTH = dict.fromkeys(mod.MIN_LENGTH, 1)
bh.FUSED_MIN_LENGTH = dict.fromkeys(bh.MIN_LENGTH, 1)

def make(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, dt=torch.bfloat16: torch.randn(*s, generator=g).to(dt)
    return dict(q=r(2, 4, 200, 64), k=r(2, 2, 300, 64), v=r(2, 2, 300, 64), do=r(2, 4, 200, 64),
                seed=torch.randint(0, 2**62, (1,), generator=g, dtype=torch.int64),
                kpm=torch.rand(2, 300, generator=g) > 0.3)

def run(t, dropout_p=0.0, padded=False):
    # grouped heads; causal but with key padding and dropout (which take the fused route unmasked)
    args = (None, t["kpm"] if padded else None, 0 if padded and dropout_p else 1, 0.125, dropout_p,
            t["seed"] if dropout_p else None, None, 0)
    o, stats = _op._attention_forward_op(t["q"], t["k"], t["v"], *args)
    _op._attention_backward_op(t["do"], t["q"], t["k"], t["v"], o, stats, None, *args)

def kernels():
    return [name for name, _, _ in f.Recorder.log]

out = {}
for route, p in (("fused", 0.0), ("dkdv", 0.0), ("fused, dropout", 0.1),
                 ("fused, key padding", 0.1), ("fused, key padding, causal", 0.0)):
    bh.FUSED = route.startswith("fused")
    bh.DROPOUT = p > 0
    padded = "padding" in route
    bh.KEY_PADDING = padded
    _tuning._PLANS.clear()
    f.Recorder.log = []
    run(make(1), p, padded)
    made = kernels()
    second = make(2)
    names = {x.data_ptr(): k for k, x in second.items()}
    f.Recorder.log = []
    run(second, p, padded)
    planned = f.normalised(f.Recorder.log, names)
    _tuning._PLANS.clear()
    _tuning._COMPILED.clear()
    f.Recorder.log = []
    run(second, p, padded)
    out[route] = {"kernels": made, "same": planned == f.normalised(f.Recorder.log, names),
                  "planned": repr(planned)[-1500:]}
# Dropout with the fused route's dropout off: Triton's kernels.
bh.DROPOUT = False
f.Recorder.log = []
run(make(3), 0.1)
out["dropout, switched off"] = kernels()
bh.FUSED = False
# Switches flipped after the plans were made: the next calls must follow them.
f.Recorder.log = []
fh.ENABLED = False
run(make(3))
out["forward switched off"] = kernels()
bh.ENABLED = False
f.Recorder.log = []
run(make(3))
out["both switched off"] = kernels()
print(json.dumps(out))
"""


@needs_gluon
def test_the_gluon_routes_plans_follow_their_switches_and_repeat_their_launches():
    """The Gluon routes end to end through hf_flash's launch functions, on the stand-in sm_90:
    which kernels each route launches, that a plan's call repeats them exactly, and that
    switching a route off after its plans were made takes effect (the signature holds it)."""
    got = _on_the_stand_in(_ROUTES_SCRIPT)
    gluon_fwd, gluon_bwd, prep = "_fwd_hopper_kernel", "_dkdv_hopper_kernel", "_prep_kernel"
    assert got["fused"]["kernels"] == [gluon_fwd, prep, gluon_bwd]
    assert got["dkdv"]["kernels"] == [gluon_fwd, "_bwd_dq_kernel", gluon_bwd]
    assert got["fused"]["same"] and got["dkdv"]["same"]
    # With dropout (HF_FLASH_HOPPER_DROPOUT=1) the Triton forward draws the mask and the fused
    # kernel draws it again, from the call's own seed (a plan that handed on its first call's
    # seed tensor would differ from the dispatch here).
    assert got["fused, dropout"]["kernels"] == ["_fwd_kernel", prep, gluon_bwd]
    assert got["fused, dropout"]["same"], got["fused, dropout"]["planned"]
    assert "'seed'" in got["fused, dropout"]["planned"]
    # With key padding (HF_FLASH_HOPPER_KPM=1; with dropout here, which hands the first pass V,
    # the spans and the seed too) each pass finds the span of real keys first; the plan hands
    # the kernels the call's own tensors (`same`: the same as a dispatch).
    padded = got["fused, key padding"]
    assert padded["kernels"] == ["_key_range_kernel", "_fwd_kernel", "_key_range_kernel", prep,
                                 gluon_bwd], padded["kernels"]
    assert padded["same"], padded["planned"]
    assert got["fused, key padding, causal"]["kernels"] == padded["kernels"]
    assert got["fused, key padding, causal"]["same"], got["fused, key padding, causal"]["planned"]
    assert got["dropout, switched off"] == ["_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"]
    assert got["forward switched off"] == ["_fwd_kernel", "_bwd_dq_kernel", gluon_bwd]
    assert got["both switched off"] == ["_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"]


@pytest.mark.gpu
@on_sm90
@needs_gluon
@pytest.mark.parametrize("route", ["fused", "dkdv"])
def test_a_plans_gluon_launches_compute_what_a_call_without_plans_does(monkeypatch, route):
    # The Gluon kernels at this length (their floors are speed choices), on the route asked for.
    for mod in (_forward_hopper, _backward_hopper):
        monkeypatch.setattr(mod, "MIN_LENGTH", dict.fromkeys(mod.MIN_LENGTH, 1))
    monkeypatch.setattr(_backward_hopper, "FUSED", route == "fused")
    monkeypatch.setattr(_backward_hopper, "FUSED_MIN_LENGTH",
                        dict.fromkeys(_backward_hopper.MIN_LENGTH, 1))
    # Triton's dispatch of each Gluon (and prepare) launch, counted.
    dispatched = []
    for kernel in (_forward_hopper._fwd_hopper_kernel, _backward_hopper._dkdv_hopper_kernel,
                   _backward_hopper._prep_kernel):
        def counted(*args, _real=kernel.run, **kwargs):
            dispatched.append(1)
            return _real(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", counted)

    monkeypatch.setattr(_tuning, "_PLANS", {})  # plans of this test's own making

    def call(seed):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        q, k, v, do = (torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16,
                                   generator=gen) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)
        out = hf_flash.flash_attention(q, k, v, is_causal=True)
        out.backward(do)
        return out, q.grad, k.grad, v.grad

    # Makes the plans. Its tensors stay alive, so that the next calls' cannot take their
    # addresses: a plan launching on its first call's tensors would then read the wrong ones.
    first = call(1)
    assert dispatched, "the Gluon kernels did not serve"
    dispatched.clear()
    planned = call(2)
    assert not dispatched, "a plan's call went through Triton's dispatch"
    monkeypatch.setattr(_tuning, "USE_PLANS", False)
    unplanned = call(2)
    assert dispatched
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(first, planned))
    for name, a, b in zip(("out", "dq", "dk", "dv"), planned, unplanned):
        if name == "dq" and route == "fused":
            # Its fp32 sum's adds land in any order: a rounding step of the largest entry.
            assert (a.float() - b.float()).abs().max() <= b.float().abs().max() * 2 ** -7, name
        else:
            assert torch.equal(a, b), name
