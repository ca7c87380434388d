"""What the tests of the Gluon kernels for Hopper share (test_hopper_forward.py,
test_hopper_backward.py): their skip marks, and compiling a kernel for sm_90 on any machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_flash.kernels import _hopper

ROOT = Path(__file__).resolve().parents[1]

needs_gluon = pytest.mark.skipif(not _hopper.AVAILABLE, reason="Triton without Gluon")
on_sm90 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="needs an sm_90 GPU (H100/H200)")

_COMPILE = r"""
import json, sys
sys.path.insert(0, "scripts")
import compile_kernels as ck
builder, d, causal, dtype, kw = json.loads(sys.argv[1])
c = getattr(ck, builder)(d, causal, dtype, **kw)
ptx = c.asm["ptx"]
print(json.dumps({"setmaxnreg": "setmaxnreg" in ptx, "wgmma": "wgmma.mma_async" in ptx,
                  "tma": "cp.async.bulk.tensor" in ptx, "local": ".local" in ptx,
                  "regs": ck.registers(c)}))
"""


def check_compiles_for_sm90(builder: str, d: int, causal: bool, dtype: str, max_stack: int = 0,
                            **kw):
    """Compile with scripts/compile_kernels.py's `builder` for sm_90 and check the code: register
    resizing (setmaxnreg: the registers moved between partitions are what keeps the tiles in
    registers), wgmma and TMA present, no local memory in the PTX, and at most `max_stack` bytes
    of stack (spills) per thread where cuobjdump is there to tell. `kw` goes to the builder."""
    # In a process of its own without TRITON_INTERPRET: under the interpreter Triton's library
    # functions (gl.max, ...) are interpreted objects a compilation cannot reference.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = json.dumps([builder, d, causal, dtype, kw])
    res = subprocess.run([sys.executable, "-c", _COMPILE, args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["setmaxnreg"] and got["wgmma"] and got["tma"], got
    assert not got["local"], "the kernel spills to local memory"
    if got["regs"] is not None:  # cuobjdump present
        assert got["regs"][1] <= max_stack, f"{got['regs'][1]} bytes of stack (spills) per thread"


class Spy:
    """Counts the calls of `module.name` (a kernel's launcher) for the length of a test."""

    def __init__(self, monkeypatch, module, name):
        self.calls = 0
        real = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
