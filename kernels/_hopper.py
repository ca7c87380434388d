"""What the Gluon kernels for Hopper (_forward_hopper.py, _backward_hopper.py) share: Gluon's
imports, the TMA descriptors they read and write through, and the calls they may serve.

Gluon is Triton's lower-level language: the kernel states its warp roles, shared buffers and
barriers itself, which is how these kernels overlap the softmax with the tensor cores where
Triton's own schedule does not (docs/perf-notes.md, "v10"). Gluon has no interpreter: the CPU
tests compile these kernels for sm_90, the GPU tests run them.
"""

import functools
import json
import os

import torch
import triton

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                                  tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    AVAILABLE = True
    # Gluon renames things between releases: Triton 3.9 calls the TMA copies async_load /
    # async_store, earlier releases async_copy_global_to_shared / _shared_to_global.
    tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    tma_store = tma.async_store if hasattr(tma, "async_store") else tma.async_copy_shared_to_global
    # TMA reductions (a bulk add of a shared-memory tile into global memory) came with 3.9. The
    # stand-in keeps a kernel that names it in a branch it never compiles valid under older
    # releases, whose JIT resolves every name a kernel mentions.
    HAS_TMA_ADD = hasattr(tma, "async_atomic_add")
    if HAS_TMA_ADD:
        tma_add = tma.async_atomic_add
    else:
        @gluon.jit
        def tma_add(desc, coord, src):
            gl.static_assert(False, "this Triton's Gluon has no TMA reductions (3.9 has)")
except ImportError:  # a Triton without Gluon (before 3.5): the Triton kernels serve every call
    AVAILABLE = HAS_TMA_ADD = False

from . import _common, _tuning


def config_from_env(defaults: dict, variable: str) -> dict:
    """`defaults` with the entries of the JSON object in environment variable `variable` put over
    them (lists become tuples), for experiments with a kernel's launch config."""
    given = json.loads(os.environ.get(variable, "{}"))
    return {**defaults, **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}}


def tma_ok(t: torch.Tensor) -> bool:
    """TMA reads a (B, H, N, D) tensor whose rows are contiguous, with its base and every other
    stride a positive multiple of 16 bytes (a broadcast, stride-0 dimension is not one)."""
    es = t.element_size()
    return (t.stride(3) == 1 and t.data_ptr() % 16 == 0
            and all(s > 0 and (s * es) % 16 == 0 for s in t.stride()[:3]))


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(driver, index: int) -> int:
    return driver.utils.get_device_properties(index)["multiprocessor_count"]


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on `device` (a persistent kernel's grid), as Triton's driver
    reports them."""
    driver = triton.runtime.driver.active
    return _sm_count(driver, driver.get_current_device() if device.index is None else device.index)


def on_sm90(t: torch.Tensor) -> bool:
    """Whether `t` is on an sm_90 GPU (H100/H200). (Tests that launch into a stand-in driver on
    the CPU, scripts/fake_sm90.py, replace it.)"""
    return t.is_cuda and _capability(t.get_device()) == (9, 0)


def plain_call(q, k, v, mask, kpm, dropout_p, varlen, causal, causal_offset, scale) -> bool:
    """Whether a call is one the Gluon kernels are built for, lengths aside: an sm_90 GPU,
    fp16/bf16 at head dim 64 or 128, no mask, key padding, dropout or packing, causal only where
    every query row sees a key, a positive scale, and inputs TMA can read."""
    if not AVAILABLE or _common.INTERPRET:
        return False
    if mask is not None or kpm is not None or dropout_p > 0 or varlen:
        return False
    # Both kernels scale the scores inside one FMA (exp2(s * c - m)) against a row max or lse
    # taken of scaled scores, which needs c > 0; and a masked -inf score times a negative c would
    # be +inf.
    if not scale > 0:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[3] not in (64, 128):
        return False
    # Rows with no key to see would need the empty-row handling of the Triton kernels.
    if q.shape[2] == 0 or k.shape[2] == 0 or (causal and causal_offset < 0):
        return False
    return on_sm90(q) and tma_ok(q) and tma_ok(k) and tma_ok(v)


@functools.lru_cache(maxsize=None)
def _smem_layout(block: tuple, dtype: torch.dtype):
    # Computing the swizzled layout takes ~7 us of Python, the descriptor itself ~3: a backward
    # on the fused route builds seven descriptors a call, and the layouts never change.
    gl_dtype = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16,
                torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for(list(block), gl_dtype)


def descriptor(t: torch.Tensor, rows: int, cols: int = 0) -> "TensorDescriptor":
    """A TMA descriptor over the whole (B, H, N, D) tensor, one (1, 1, rows, cols or D) box per
    copy: its bounds are per head, so a tile past a head's last row reads zeros (or, storing, is
    cut)."""
    block = (1, 1, rows, cols or t.shape[3])
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block),
                            _smem_layout(block, t.dtype))


class Launches:
    """The launches of one call signature, kept after its first call: a plan (_tuning.planned)
    holds one, so that its later calls skip what only the first needs to do.
    - Triton's dispatch: binding and specialising every argument, a cache key built from the
      descriptors' types. Later launches go straight to the compiled kernel's launcher
      (_tuning._Direct), as the Triton kernels' plans do.
    - The descriptors' checks (Triton 3.9 validates each TensorDescriptor as it is made): what
      they read is the same for every call of a signature, the base's alignment aside, which a
      plan checks. Later descriptors copy the first's fields with the new tensor as their base.
    Together 28 us of host time off a Gluon forward and 50-57 off a fused backward on the CPU
    machine (docs/perf-notes.md, "Gluon launches in plans").

    A Launches is only reused for calls of one signature (everything the grid, scalars and
    specialisation derive from), so each launch differs from the first only in its tensors'
    addresses; a kernel's CONFIG, which experiments change at run time, is not in the signature,
    so launches are kept per set of constexprs and descriptors per box. It keeps no tensor.
    `ONCE` keeps nothing: every launch goes through Triton."""

    __slots__ = ("direct", "fields", "keep")

    def __init__(self, keep: bool = True):
        self.direct, self.fields, self.keep = {}, {}, keep

    def descriptor(self, slot, t, rows, cols=0):
        """descriptor(t, rows, cols) for the kernel argument `slot`."""
        # The box is part of the key: a kernel's CONFIG (its tiles) may change between calls
        # of one signature, in experiments.
        key = (slot, rows, cols)
        fields = self.fields.get(key)
        if fields is None:
            d = descriptor(t, rows, cols)
            if self.keep:
                self.fields[key] = {**vars(d), "base": None}
            return d
        d = TensorDescriptor.__new__(TensorDescriptor)
        d.__dict__.update(fields)
        d.base = t
        return d

    def __call__(self, name, kernel, grid, args, constexprs):
        """kernel[grid](*args, **constexprs): `args` (tensors, descriptors, scalars) in the
        kernel's parameter order, then its constexprs (and compile options) by name."""
        # The constexprs are part of the key for the same reason: each set is its own kernel.
        key = (name, *constexprs.values())
        direct = self.direct.get(key)
        if direct is not None:
            direct(args)
            return
        compiled = kernel[grid](*args, **constexprs)
        if (not self.keep or _common.INTERPRET or compiled is None or _tuning._hooks_active()
                or torch.compiler.is_compiling()):
            return
        tail = _tuning.constexpr_tail(kernel, len(args), constexprs)
        device = triton.runtime.driver.active.get_current_device()
        self.direct[key] = _tuning._Direct((compiled, tail), grid, device, ())


ONCE = Launches(keep=False)
