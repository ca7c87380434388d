"""The host side of the Gluon kernels' launches, on any machine: compiled for sm_90 and handed to
a stand-in driver (scripts/fake_sm90.py) that records what each launch gives the launcher.

A plan's later calls launch through kernels/_hopper.Launches: straight to the compiled kernel,
with descriptors copied from the first call's. They must hand the launcher exactly what Triton's
own dispatch would for the same tensors: grid, scalars, constexprs, every tensor and every
descriptor's fields. The GPU tests check the results those launches compute.
"""

import json
import os
import subprocess
import sys

import pytest

from hopper_utils import ROOT, needs_gluon

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
            def counted(args, go=go, key=key):
                direct[key] = direct.get(key, 0) + 1
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
out["warnings"] = [str(w.message) for w in caught if "FP_FUSION" in str(w.message)]
print(json.dumps(out))
"""


@needs_gluon
def test_a_plans_gluon_launches_hand_the_launcher_what_tritons_dispatch_does():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    # Every launch names its multiply-add fusion: Triton 3.9 warns where one leaves it to the
    # default, which 3.10 changes.
    assert got.pop("warnings") == []
    expected = {"forward": {"main"}, "dkdv backward": {"main"},
                "fused backward": {"prep", "main"}, "fused backward, atomics": {"prep", "main"}}
    assert set(got) <= set(expected) and {"forward", "dkdv backward", "fused backward"} <= set(got)
    for name, r in got.items():
        assert r["launches"] == len(expected[name]), (name, r["launches"])
        assert r["direct"] == dict.fromkeys(expected[name], 1), (name, r["direct"])
        assert r["same"], (name, r["planned"], r["dispatched"])
        assert not r["kept_a_tensor"], name
