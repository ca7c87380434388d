"""Compile every forward/backward kernel variant for Hopper (sm_90), no GPU needed.

    python scripts/compile_kernels.py            # about 5 minutes on 2 cores
    python scripts/compile_kernels.py --configs  # every tuning candidate instead (~2.5 minutes)

Triton's whole pipeline (front end, MLIR passes, LLVM, ptxas) runs on the host, so a machine
without a GPU can check that a kernel change still compiles for the GPU, which the CPU test
suite (Triton's interpreter) cannot. It checks compilation only: results need a GPU run.
Do not set TRITON_INTERPRET for this. To check another Triton release than the installed one,
put it first on the path:

    python -m pip install --no-deps --target /tmp/triton-X triton==X
    PYTHONPATH=/tmp/triton-X python scripts/compile_kernels.py
"""

import itertools
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hf_flash.kernels import _backward, _common, _forward

_POINTER_TYPES = {"STATS": "*fp32", "DELTA": "*fp32", "DLSE": "*fp32", "MASK": "*u8", "KPM": "*u8",
                  "KV_LO": "*i32", "KV_HI": "*i32", "CU_SEQLENS": "*i32", "SEED": "*i64"}
_FLOATS = ("qk_scale", "sm_scale", "drop_threshold", "dropout_scale")


def signature(kernel, constexprs, dtype):
    """Triton type of each parameter: tensors by name, scales fp32, every other int i32."""
    out = {}
    for name in kernel.arg_names:
        if name in constexprs:
            out[name] = "constexpr"
        elif name in _POINTER_TYPES:
            out[name] = _POINTER_TYPES[name]
        elif name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            out[name] = "*" + dtype
        else:
            out[name] = "fp32" if name in _FLOATS else "i32"
    return out


KERNELS = ((_forward._fwd_kernel, {}, "fwd"), (_backward._bwd_dq_kernel, {"HAS_DLSE": False}, "bwd"),
           (_backward._bwd_dkdv_kernel, {}, "bwd"))


def compile_configs(target):
    """Each tuning candidate of each kernel (the tuner may pick any of them), on the plain and the
    most loaded variant (causal, key padding, dropout), at head dims 64 and 128."""
    lists = {"fwd": _forward._FWD_CONFIGS, "bwd": _backward._BWD_CONFIGS}
    n, t0 = 0, time.time()
    for (kernel, extra, kind), d, loaded in itertools.product(KERNELS, [64, 128], [False, True]):
        for c in lists[kind]:
            if not _common.smem_ok(c, d, 2, 1 if kind == "fwd" else 2, 2):
                continue  # the candidate lists drop it for this head dim too
            cx = dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
                      IS_CAUSAL=loaded, HAS_KPM=loaded, MASK_KIND=0, HAS_DROPOUT=loaded,
                      DOT_PRECISION="tf32", VARLEN=False, **extra)
            src = ASTSource(fn=kernel, signature=signature(kernel, cx, "bf16"), constexprs=cx)
            triton.compile(src, target=target,
                           options={"num_warps": c["num_warps"], "num_stages": c["num_stages"]})
            n += 1
    print(f"compiled {n} tuning-candidate variants for sm_90 in {time.time() - t0:.0f} s "
          f"(triton {triton.__version__})")


def main():
    if _common.INTERPRET:
        raise SystemExit("unset TRITON_INTERPRET: this compiles for the GPU")
    target = GPUTarget("cuda", 90, 32)
    if "--configs" in sys.argv[1:]:
        return compile_configs(target)
    kernels = [(k, extra) for k, extra, _ in KERNELS]
    n, t0 = 0, time.time()
    for kernel, extra in kernels:
        for varlen, causal, kpm, mask_kind, dropout, d in itertools.product(
                [False, True], [False, True], [False, True], [0, 2], [False, True], [64, 128]):
            if varlen and (kpm or mask_kind):
                continue  # packed sequences take no masks
            cx = dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_M=64, BLOCK_N=64, IS_CAUSAL=causal,
                      HAS_KPM=kpm, MASK_KIND=mask_kind, HAS_DROPOUT=dropout,
                      DOT_PRECISION="tf32", VARLEN=varlen, **extra)
            src = ASTSource(fn=kernel, signature=signature(kernel, cx, "bf16"), constexprs=cx)
            triton.compile(src, target=target, options={"num_warps": 4, "num_stages": 3})
            n += 1
    print(f"compiled {n} kernel variants for sm_90 in {time.time() - t0:.0f} s "
          f"(triton {triton.__version__})")


if __name__ == "__main__":
    main()
