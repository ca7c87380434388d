"""scripts/compile_kernels.py compiles for sm_90 on the host, as Triton specialises at run time.

One check ties it to the GPU: on an H200, the forward's 128 x 128, 8-warp, 3-stage candidate at
head dim 128 with key padding and dropout failed to launch asking for 245,760 bytes of shared
memory (test_every_tuning_candidate_is_exact, Triton 3.6). Compiled here with the run-time
specialisation, the same variant must ask for the same; compiled without it, Triton reports far
less (it cannot prove 16-byte loads and does not pipeline them), which is what the script fixed.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_CODE = r"""
import json, sys
sys.path.insert(0, "scripts")
import compile_kernels as ck
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from hf_flash.kernels import _forward
target = GPUTarget("cuda", 90, 32)
cx = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=128, BLOCK_N=128, IS_CAUSAL=False, HAS_KPM=True,
          MASK_KIND=0, HAS_DROPOUT=True, DOT_PRECISION="tf32", VARLEN=False)
shared, regs = ck.build(_forward._fwd_kernel, cx, "bf16", target, 8, 3)
sig = ck.signature(_forward._fwd_kernel, cx, "bf16")
plain = triton.compile(ASTSource(fn=_forward._fwd_kernel, signature=sig, constexprs=cx), target=target,
                       options={"num_warps": 8, "num_stages": 3}).metadata.shared
print(json.dumps({"shared": shared, "regs": regs, "unspecialised_shared": plain,
                  "triton": triton.__version__}))
"""


def test_runtime_specialisation_reproduces_the_h200s_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for the GPU
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("Triton without its NVIDIA backend cannot compile for sm_90")
    res = subprocess.run([sys.executable, "-c", _CODE], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["shared"] == 245760, got
    assert got["unspecialised_shared"] < got["shared"] // 2, got
    if got["regs"] is not None:  # cuobjdump ships with the NVIDIA backend
        regs, stack = got["regs"]
        assert 0 < regs <= 255 and stack >= 0


def _run_mode(flag):
    """scripts/compile_kernels.py FLAG's stdout (compiling for the GPU, not interpreting)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("Triton without its NVIDIA backend cannot compile for sm_90")
    res = subprocess.run([sys.executable, "scripts/compile_kernels.py", flag], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_lengths_mode_compiles_both_specialisations_of_each_kernel():
    # --lengths: every kernel's untuned config with the lengths as multiples of 16 and without.
    # With cuobjdump (shipped with Triton's NVIDIA backend) the rows carry SASS counts.
    out = _run_mode("--lengths")
    rows = [line for line in out.splitlines() if "multiples of 16:" in line]
    assert len(rows) == 6, out
    kernels = {row.split()[0] for row in rows}
    assert kernels == {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"}
    for row in rows:
        counts = [int(c) for c in re.findall(r"B / (\d+|None)", row) if c != "None"]
        assert all(n > 100 for n in counts), row  # a real kernel body, both ways


def test_short_mode_compiles_the_decode_config_against_the_long_one():
    # --short: the forward's untuned config for at most 16 query rows (decode) against the long
    # one. The comment in _fwd_candidates cites the bf16 D64 row: no spills with 16 rows.
    out = _run_mode("--short")
    rows = [line for line in out.splitlines() if "  long: " in line]
    assert len(rows) == 6, out
    for row in rows:
        short = row.split("short:")[1]
        assert short.split()[0] == "16", row  # 16 query rows per block
    d64 = next(r for r in rows if r.startswith("bf16 D64 "))
    if "?" not in d64:  # cuobjdump present: registers and spills known
        assert re.search(r"short:\s+16 x 64\s+warps 4: \d+ / 0 B /", d64), d64
