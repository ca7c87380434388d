"""Compile the forward/backward kernel variants for Hopper (sm_90), no GPU needed.

    python scripts/compile_kernels.py            # about 5 minutes on 2 cores
    python scripts/compile_kernels.py --configs  # every tuning candidate instead (~4 minutes)
    python scripts/compile_kernels.py --lengths  # lengths divisible by 16 against not (~2 minutes)
    python scripts/compile_kernels.py --short    # the forward's config for <= 16 query rows (~1 minute)
    python scripts/compile_kernels.py --hopper   # the Gluon kernels for sm_90 (~60 seconds)

Triton's whole pipeline (front end, MLIR passes, LLVM, ptxas) runs on the host, so a machine
without a GPU can check that a kernel change still compiles for the GPU, which the CPU test
suite (Triton's interpreter) cannot. It checks compilation only: results need a GPU run.

The default mode compiles every combination of causal masking, key padding, an additive float
mask, dropout and packed rows, in bf16 at head dims 64 and 128 (plus the most loaded one in fp32
and at head dim 256), each with the config it runs with when not tuning (`default_config`), and
fails if one needs more shared memory than an H100/H200 block may have. Not compiled: the dense
bool mask (the float mask's code path with another element type) and dq's lse-gradient input.
`--configs` compiles every tuning candidate on three variants (plain; key padding and dropout, as
in BERT training; causal, key padding and dropout) at head dims 64 and 128 and prints each one's
registers, local-memory spills and shared memory (registers and spills need the cuobjdump that
ships with Triton's NVIDIA backend), and lists those over the shared-memory limit (the tuner
skips them at run time). `--lengths` compiles each kernel's untuned config (head dim 64, key
padding with dropout, and causal with key padding) with the lengths N_Q, N_K and STATS_N
specialised as multiples of 16 and without, and prints registers, spills and SASS instructions
of both: what `do_not_specialize` on the lengths would change in the code. `--hopper` compiles the
Gluon forward of kernels/_forward_hopper.py and the Gluon dK/dV of kernels/_backward_hopper.py
(head dims 64 and 128, causal or not, bf16 and fp16)
and prints each variant's registers, spills and whether its partitions resize their registers.

Each variant is compiled as Triton specialises it at run time for a common case: base pointers
16-byte aligned; strides, the head count and the lengths multiples of 16 (BERT-large's and
GPT-2-medium's 16 heads, lengths such as 512 or 1024); ints equal to 1 as constants (the unit
strides of contiguous masks, and one query head per key/value head). That matters: without the
divisibility Triton cannot prove 16-byte loads, does not software-pipeline the K/V (or Q/dO)
loads, and reports a fraction of the shared memory the GPU run needs.

Do not set TRITON_INTERPRET for this. To check another Triton release than the installed one,
put it first on the path:

    python -m pip install --no-deps --target DIR triton==X
    PYTHONPATH=DIR python scripts/compile_kernels.py
"""

import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hf_flash.kernels import _backward, _common, _forward

_POINTER_TYPES = {"STATS": "*fp32", "DELTA": "*fp32", "DLSE": "*fp32", "MASK": "*u8", "KPM": "*u8",
                  "KV_LO": "*i32", "KV_HI": "*i32", "CU_SEQLENS": "*i32", "SEED": "*i64"}
_FLOATS = ("qk_scale", "sm_scale", "drop_threshold", "dropout_scale")
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def signature(kernel, constexprs, dtype):
    """Triton type of each parameter: tensors by name, scales fp32, every other int i32."""
    out = {}
    for name in kernel.arg_names:
        if name in constexprs:
            out[name] = "constexpr"
        elif name == "MASK" and constexprs.get("MASK_KIND") == 2:
            out[name] = "*fp32"  # an additive float mask, at its widest
        elif name in _POINTER_TYPES:
            out[name] = _POINTER_TYPES[name]
        elif name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            out[name] = "*" + dtype
        else:
            out[name] = "fp32" if name in _FLOATS else "i32"
    return out


KERNELS = ((_forward._fwd_kernel, {}, "fwd"), (_backward._bwd_dq_kernel, {"HAS_DLSE": False}, "bwd"),
           (_backward._bwd_dkdv_kernel, {}, "bwd"))
SMEM_LIMIT = 232448  # bytes of shared memory one block may opt into on sm_90 (227 KiB)
_LENGTHS = ("N_Q", "N_K", "STATS_N")


def unit_constants(cx):
    """The int arguments that are 1 at run time in the common case, which Triton turns into
    constants: a present mask's (or key padding's) unit column stride, and the query heads per
    key/value head. (An absent mask's strides are passed as 0.)"""
    ones = {"GROUP": 1}
    if cx.get("MASK_KIND"):
        ones["stride_mn"] = 1
    if cx.get("HAS_KPM"):
        ones["stride_kpmn"] = 1
    return ones


def runtime_attrs(kernel, sig, lengths=_LENGTHS):
    """The divisibility Triton's launcher would find: 16 for every pointer, every stride that is
    not a constant 1 (0 included), the head count and the `lengths`."""
    attrs = {}
    for i, name in enumerate(kernel.arg_names):
        t = sig[name]
        if t != "constexpr" and (t.startswith("*") or name in lengths or name == "H"
                                 or name.startswith("stride_")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def build(kernel, cx, dtype, target, warps, stages, lengths=_LENGTHS, want_compiled=False):
    """Compile one variant; returns (shared memory bytes per block, registers() or None), and the
    compiled kernel too with `want_compiled`. `lengths`: those compiled as multiples of 16."""
    cx = {**cx, **{n: v for n, v in unit_constants(cx).items() if n in kernel.arg_names}}
    sig = signature(kernel, cx, dtype)
    src = ASTSource(fn=kernel, signature=sig, constexprs=cx, attrs=runtime_attrs(kernel, sig, lengths))
    # Multiply-add fusion as the launch sets it (off for fp32).
    fusion = _common.fp_fusion(_TORCH_DTYPES[dtype])
    compiled = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages,
                                                           "enable_fp_fusion": fusion})
    out = (compiled.metadata.shared, registers(compiled))
    return (*out, compiled) if want_compiled else out


_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _cuobjdump(compiled, flag):
    """What the cuobjdump Triton ships prints for `flag` on the compiled kernel's cubin; None
    where there is no cuobjdump."""
    if not os.access(_CUOBJDUMP, os.X_OK):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([_CUOBJDUMP, flag, path], capture_output=True, text=True).stdout


def registers(compiled):
    """(registers per thread, stack bytes per thread) from the cubin; a stack means local-memory
    spills. None where there is no cuobjdump."""
    out = _cuobjdump(compiled, "--dump-resource-usage")
    if out is None:
        return None
    reg, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (int(reg.group(1)), int(stack.group(1))) if reg and stack else None


def sass_instructions(compiled):
    """The number of SASS instructions in the cubin; None where there is no cuobjdump."""
    sass = _cuobjdump(compiled, "-sass")
    if sass is None:
        return None
    return sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line))


def usage(regs, compiled):
    """'registers / spill B / SASS instructions' of a compiled kernel ('?' where unknown)."""
    return (f"{regs[0] if regs else '?'} / {regs[1] if regs else '?'} B / "
            f"{sass_instructions(compiled)}")


def compile_lengths(target):
    """Each kernel's untuned config with the lengths compiled as multiples of 16, and without."""
    print("untuned configs, bf16, head dim 64: registers / spill (stack bytes per thread) / SASS "
          "instructions, with the lengths (N_Q, N_K, STATS_N) multiples of 16 and without")
    for (kernel, extra, kind), (variant, (causal, kpm, dropout)) in itertools.product(
            KERNELS, {"pad+drop": (False, True, True), "causal+pad": (True, True, False)}.items()):
        c = _common.default_config(kind, 64, 2)
        cx = dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
                  IS_CAUSAL=causal, HAS_KPM=kpm, MASK_KIND=0, HAS_DROPOUT=dropout,
                  DOT_PRECISION="tf32", VARLEN=False, **extra)
        cells = []
        for lengths in (_LENGTHS, ()):
            _, regs, compiled = build(kernel, cx, "bf16", target, c["num_warps"], c["num_stages"],
                                      lengths, want_compiled=True)
            cells.append(usage(regs, compiled))
        print(f"{kernel.__name__:16s} {variant:10s}  multiples of 16: {cells[0]:18s}  not: {cells[1]}")
    print(f"(triton {triton.__version__})")


def compile_short(target):
    """The forward's untuned config for long query blocks against the one for at most 16 query
    rows (decode steps), key padding on, lengths not multiples of 16 (a decode step's key length
    is any number), at head dims 64, 128 and 256 in bf16 and fp32."""
    print("forward, key padding, lengths not multiples of 16: registers / spill (stack bytes per "
          "thread) / SASS instructions of the untuned config for long queries and for <= 16")
    for (dtype, es), d in itertools.product((("bf16", 2), ("fp32", 4)), (64, 128, 256)):
        cells = []
        for n_q in (17, 16):
            c = _forward._fwd_candidates(d, es, n_q)[0]  # the untuned config comes first
            cx = dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
                      IS_CAUSAL=False, HAS_KPM=True, MASK_KIND=0, HAS_DROPOUT=False,
                      DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", VARLEN=False)
            _, regs, compiled = build(_forward._fwd_kernel, cx, dtype, target, c["num_warps"],
                                      c["num_stages"], (), want_compiled=True)
            cells.append(f"{c['BLOCK_M']:3d} x {c['BLOCK_N']:<3d} warps {c['num_warps']}: "
                         f"{usage(regs, compiled)}")
        print(f"{dtype} D{d:<3d}  long: {cells[0]:34s}  short: {cells[1]}")
    print(f"(triton {triton.__version__})")


# --configs variants: name -> (causal, key padding, dropout)
_CONFIG_VARIANTS = {"plain": (False, False, False), "pad+drop": (False, True, True),
                    "causal+pad+drop": (True, True, True)}


def compile_configs(target):
    """Each tuning candidate of each kernel (the tuner may pick any of them) on each of
    _CONFIG_VARIANTS, at head dims 64 and 128."""
    lists = {"fwd": _forward._FWD_CONFIGS, "bwd": _backward._BWD_CONFIGS}
    n, over, rows, t0 = 0, [], [], time.time()
    for (kernel, extra, kind), d, variant in itertools.product(KERNELS, [64, 128], _CONFIG_VARIANTS):
        causal, kpm, dropout = _CONFIG_VARIANTS[variant]
        first = _common.default_config(kind, d, 2)  # heads every candidate list, untuned too
        for c in [first] + [c for c in lists[kind] if c != first]:
            if c is not first and not _common.smem_ok(c, d, 2, 1 if kind == "fwd" else 2, 2):
                continue  # the candidate lists drop it for this head dim too
            cx = dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
                      IS_CAUSAL=causal, HAS_KPM=kpm, MASK_KIND=0, HAS_DROPOUT=dropout,
                      DOT_PRECISION="tf32", VARLEN=False, **extra)
            shared, regs = build(kernel, cx, "bf16", target, c["num_warps"], c["num_stages"])
            what = (f"{kernel.__name__:16s} D{d:<3d} {variant:15s} "
                    f"{c['BLOCK_M']:3d} x {c['BLOCK_N']:<3d} warps {c['num_warps']} "
                    f"stages {c['num_stages']}")
            rows.append(f"{what}  registers {regs[0] if regs else '?':>3}  spill "
                        f"{regs[1] if regs else '?':>4} B  shared {shared:6d} B")
            if shared > SMEM_LIMIT:
                over.append(f"  {what}: {shared} bytes")
            n += 1
    print("each tuning candidate, bf16 (pad = key padding, drop = dropout); spill = stack bytes "
          "per thread (local memory)")
    print("\n".join(rows))
    print(f"compiled {n} tuning-candidate variants (bf16) for sm_90 in {time.time() - t0:.0f} s "
          f"(triton {triton.__version__}); {len(over)} need more than {SMEM_LIMIT} bytes of "
          f"shared memory (skipped by the tuner on the GPU):")
    print("\n".join(over))


def build_hopper_forward(d: int, causal: bool, dtype: str, target=None, config=None):
    """Compile _forward_hopper's Gluon kernel as attention_forward launches it (TMA descriptors of
    (1, 1, rows, d) boxes) for sm_90, with `config` replacing entries of its CONFIG; returns the
    compiled kernel."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from hf_flash.kernels import _forward_hopper as hop
    g = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]
    cfg = {**hop.CONFIG, **(config or {})}

    def desc(rows):
        layout = gl.NVMMASharedLayout.get_default_for([1, 1, rows, d], g)
        return f"tensordesc<{dtype}[1,1,{rows},{d}],{layout!r}>"

    sig = {"q_desc": desc(hop.GROUP_M), "k_desc": desc(cfg["BLOCK_N"]), "v_desc": desc(cfg["BLOCK_N"]),
           "o_desc": desc(hop.GROUP_M), "STATS": "*fp32", "H": "i32", "GROUP": "i32", "BH": "i32", "N_Q": "i32",
           "N_K": "i32", "causal_offset": "i32", "qk_scale": "fp32"}
    cx = {"BLOCK_M": hop.BLOCK_M, "BLOCK_N": cfg["BLOCK_N"], "D": d, "IS_CAUSAL": causal,
          "NUM_BUF": cfg["NUM_BUF"], "O_IN_Q": d > 64, "PAIRED": causal and cfg["PAIRED"],
          "CARRY": cfg["CARRY"] and d == 64, "LEAN_TILE0": cfg["LEAN_TILE0"] and d == 64,
          "WORKER_REGS": cfg["WORKER_REGS"],
          "num_warps": 4}
    sig.update({k: "constexpr" for k in cx})
    names = list(sig)
    # STATS is a fresh allocation, 16-byte aligned, which the launch specialises on.
    src = GluonASTSource(hop._fwd_hopper_kernel, signature=sig,
                         constexprs={(names.index(k),): v for k, v in cx.items()},
                         attrs={(names.index("STATS"),): [["tt.divisibility", 16]]})
    options = {"num_warps": 4, "enable_fp_fusion": True}  # as the launch names it (16-bit)
    if cfg["maxnreg"] is not None:
        options["maxnreg"] = cfg["maxnreg"]
    return triton.compile(src, target=target or GPUTarget("cuda", 90, 32), options=options)


def build_hopper_backward(d: int, causal: bool, dtype: str, target=None, config=None,
                          dq: int = 0, dropout: bool = False, kpm: bool = False):
    """Compile _backward_hopper's Gluon kernel as its dkdv() (dq 0) or backward() (dq: DQ_TMA or
    DQ_ATOMIC; with `dropout`, as a call with dropout; with `kpm`, with key padding) launches it,
    for sm_90, with `config` replacing entries of its CONFIG; returns the compiled kernel."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from hf_flash.kernels import _backward_hopper as hop
    g = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]
    cfg = {**hop.CONFIG, **(config or {})}

    def desc(rows, cols=d, el=g, ty=dtype):
        layout = gl.NVMMASharedLayout.get_default_for([1, 1, rows, cols], el)
        return f"tensordesc<{ty}[1,1,{rows},{cols}],{layout!r}>"

    dq_desc = (desc(hop.BLOCK_M, d // 2 if d == 128 else d, gl.float32, "fp32")
               if dq == hop.DQ_TMA else "*fp32")
    sig = {"q_desc": desc(hop.BLOCK_M), "k_desc": desc(hop.GROUP_N), "v_desc": desc(hop.GROUP_N),
           "do_desc": desc(hop.BLOCK_M), "dk_desc": desc(hop.GROUP_N),
           "dv_desc": desc(hop.GROUP_N), "dq_desc": dq_desc, "DQ_ACC": "*fp32", "ROWS": "*fp32",
           "SEED": "*i64" if dropout else "*fp32", "KPM": "*u8" if kpm else "*fp32",
           "KV_LO": "*i32" if kpm else "*fp32", "KV_HI": "*i32" if kpm else "*fp32",
           "H": "i32", "GROUP": "i32", "N_Q": "i32", "N_PAD": "i32", "N_K": "i32",
           "causal_offset": "i32", "qk_scale": "fp32", "sm_scale": "fp32",
           "drop_threshold": "fp32", "drop_scale": "fp32", "stride_kpmb": "i32",
           "stride_kpmn": "i32"}
    cx = {"BLOCK_N": hop.BLOCK_N, "BLOCK_M": hop.BLOCK_M, "D": d, "IS_CAUSAL": causal, "DQ": dq,
          "DROPOUT": dropout, "HAS_KPM": kpm, "NUM_BUF": cfg["NUM_BUF"],
          "WORKER_REGS": cfg["WORKER_REGS"], "num_warps": 4}
    sig.update({k: "constexpr" for k in cx})
    names = list(sig)
    # The pointers are fresh allocations, 16-byte aligned, which the launch specialises on
    # (it decides whether dQ's atomics can be 16-byte ones).
    aligned = {(names.index(k),): [["tt.divisibility", 16]]
               for k in ("DQ_ACC", "ROWS", "SEED", "KPM", "KV_LO", "KV_HI")}
    src = GluonASTSource(hop._dkdv_hopper_kernel, signature=sig,
                         constexprs={(names.index(k),): v for k, v in cx.items()}, attrs=aligned)
    return triton.compile(src, target=target or GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "enable_fp_fusion": True})


def compile_hopper(target):
    from hf_flash.kernels import _backward_hopper as hop
    builds = [("_fwd_hopper_kernel", build_hopper_forward, {}),
              ("_dkdv_hopper_kernel", build_hopper_backward, {})]
    # The fused backward, with the dQ sum this Triton supports (both where it has TMA
    # reductions).
    for kind in ([hop.DQ_TMA] if hop.HAS_TMA_ADD else []) + [hop.DQ_ATOMIC]:
        name = f"_dkdv_hopper_kernel DQ={'tma' if kind == hop.DQ_TMA else 'atomic'}"
        builds.append((name, build_hopper_backward, {"dq": kind}))
        # With dropout (HF_FLASH_HOPPER_DROPOUT=1): the mask drawn in the kernel.
        builds.append((name + " dropout", build_hopper_backward, {"dq": kind, "dropout": True}))
        # With key padding (HF_FLASH_HOPPER_KPM=1), and with dropout too (unmasked only).
        builds.append((name + " kpm", build_hopper_backward, {"dq": kind, "kpm": True}))
        builds.append((name + " kpm dropout", build_hopper_backward,
                       {"dq": kind, "kpm": True, "dropout": True}))
    for name, build, kw in builds:
        for d, causal, dtype in itertools.product([64, 128], [False, True], ["bf16", "fp16"]):
            c = build(d, causal, dtype, target, **kw)
            ptx = c.asm["ptx"]
            print(f"{name} {dtype} D{d} causal={causal}: registers / spill / SASS "
                  f"{usage(registers(c), c)}, setmaxnreg={'setmaxnreg' in ptx}, "
                  f"shared {c.metadata.shared} bytes")


def main():
    if _common.INTERPRET:
        raise SystemExit("unset TRITON_INTERPRET: this compiles for the GPU")
    target = GPUTarget("cuda", 90, 32)
    if "--configs" in sys.argv[1:]:
        return compile_configs(target)
    if "--lengths" in sys.argv[1:]:
        return compile_lengths(target)
    if "--short" in sys.argv[1:]:
        return compile_short(target)
    if "--hopper" in sys.argv[1:]:
        return compile_hopper(target)
    n, worst, over, t0 = 0, (0, ""), [], time.time()

    def one(kernel, extra, kind, dtype, d, varlen, causal, kpm, mask_kind, dropout):
        nonlocal n, worst
        c = _common.default_config(kind, d, {"bf16": 2, "fp32": 4}[dtype])
        cx = dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
                  IS_CAUSAL=causal, HAS_KPM=kpm, MASK_KIND=mask_kind, HAS_DROPOUT=dropout,
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", VARLEN=varlen, **extra)
        shared, _ = build(kernel, cx, dtype, target, c["num_warps"], c["num_stages"])
        what = (f"{kernel.__name__} {dtype} D{d} varlen={varlen} causal={causal} kpm={kpm} "
                f"mask={mask_kind} dropout={dropout} {c}: {shared} bytes")
        worst = max(worst, (shared, what))
        if shared > SMEM_LIMIT:
            over.append("  " + what)
        n += 1

    for kernel, extra, kind in KERNELS:
        # Every bf16 combination at head dims 64 and 128 ...
        for varlen, causal, kpm, mask_kind, dropout, d in itertools.product(
                [False, True], [False, True], [False, True], [0, 2], [False, True], [64, 128]):
            if varlen and (kpm or mask_kind):
                continue  # packed sequences take no masks
            one(kernel, extra, kind, "bf16", d, varlen, causal, kpm, mask_kind, dropout)
        # ... and the most loaded one (causal, key padding, float mask, dropout) in fp32 and at
        # head dim 256, where tiles are widest.
        for dtype, d in (("fp32", 64), ("fp32", 128), ("fp32", 256), ("bf16", 256)):
            one(kernel, extra, kind, dtype, d, False, True, True, 2, True)
    print(f"compiled {n} kernel variants for sm_90 in {time.time() - t0:.0f} s "
          f"(triton {triton.__version__}), each with its untuned config; the most shared memory: "
          f"{worst[1]}")
    if over:
        print(f"{len(over)} need more than {SMEM_LIMIT} bytes of shared memory:\n" + "\n".join(over))
        sys.exit(1)


if __name__ == "__main__":
    main()
