"""scripts/compile_kernels.py compiles for sm_90 on the host, as Triton specialises at run time.

One check ties it to the GPU: on an H200, the forward's 128 x 128, 8-warp, 3-stage candidate at
head dim 128 with key padding and dropout failed to launch asking for 245,760 bytes of shared
memory (test_every_tuning_candidate_is_exact, Triton 3.6): the Q tile and three stages of K and
V tiles (224 KiB), plus 16 KiB that the dropout tile's layout conversions of that time took.
Compiled here with the run-time specialisation, the variant must ask for its pipelined buffers,
Q + 3 x (K + V) (the dropout tile is now drawn in the accumulator's layout and needs no scratch);
compiled without it, Triton reports far less (it cannot prove 16-byte loads and does not
pipeline them), which is what the script fixed.
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
    tile = 128 * 128 * 2  # bytes of one bf16 128 x 128 tile (head dim 128)
    assert got["shared"] == tile + 3 * 2 * tile, got  # Q, and three stages of K and V
    assert got["unspecialised_shared"] < got["shared"] // 2, got
    if got["regs"] is not None:  # cuobjdump ships with the NVIDIA backend
        regs, stack = got["regs"]
        assert 0 < regs <= 255 and stack >= 0


_ROUNDING_CODE = r"""
import json, re, sys
sys.path.insert(0, "scripts")
import compile_kernels as ck
from triton.backends.compiler import GPUTarget
out = {}
for dtype in ("fp32", "bf16"):
    for kernel, extra, kind in ck.KERNELS:
        # The specialisation of the call that failed on an H200: head dim 1, a key length of 1
        # and unit strides as constants (Triton makes ints equal to 1 constexprs).
        cx = dict(HEAD_DIM=1, BLOCK_D=16, BLOCK_M=32, BLOCK_N=32, IS_CAUSAL=False, HAS_KPM=False,
                  MASK_KIND=2, HAS_DROPOUT=False, VARLEN=False, N_K=1,
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", **extra)
        cx.update({n: 1 for n in kernel.arg_names if n.startswith("stride_") and n[-1] in "mn"})
        _, _, comp = ck.build(kernel, cx, dtype, GPUTarget("cuda", 90, 32), 4, 2, (),
                              want_compiled=True)
        ptx = comp.asm["ptx"]
        # How the mask is scaled to base 2 (by log2(e), 0f3FB8AA3B), and how many multiplies
        # and adds the compiler may still fuse (PTX without a rounding mode).
        uses = {ln.split()[0] for ln in ptx.splitlines()
                if "0f3FB8AA3B" in ln and not ln.split()[0].startswith("mov")}
        fusable = len(re.findall(r"^\s*(?:mul|add|sub)\.f32\b", ptx, re.M))
        out[f"{dtype} {kernel.__name__}"] = [sorted(uses), fusable]
print(json.dumps(out))
"""


def test_every_kernel_adds_the_mask_in_one_fma_and_fp32_fuses_nothing_else():
    # The backward recomputes P from scores it computes again, exact only if every kernel rounds
    # them as the forward did. For this specialisation the dK/dV kernel once multiplied the mask
    # by log2(e) and added it apart (mul.f32, fusable by ptxas or not) where the forward and dQ
    # used one FMA: on an H200 a single-key row under a -1e4 mask got P = 1.000677 instead of 1.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("Triton without its NVIDIA backend cannot compile for sm_90")
    res = subprocess.run([sys.executable, "-c", _ROUNDING_CODE], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(got) == 6
    for name, (uses, fusable) in got.items():
        assert uses == ["fma.rn.f32"], (name, uses)
        if name.startswith("fp32"):
            assert fusable == 0, (name, fusable)  # fp32 compiles with fusion off


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
