"""Launch the Gluon kernels for Hopper on a machine without a GPU: Triton compiles them for sm_90
as on an H100, and a stand-in driver takes the launches instead of the GPU.

    python scripts/fake_sm90.py             # host time of each Gluon route's call: Triton's
                                            # dispatch against a plan's (~1 minute, 2 cores)
    python scripts/fake_sm90.py --launcher  # the same through Triton's own launcher, C included,
                                            # against a libcuda whose functions do nothing

What it is for: the host path of a launch (argument binding, specialisation, the cache key,
the launcher's arguments) is Python and runs here exactly as on a GPU host; only the launch
itself is replaced. tests/test_hopper_launches.py records the arguments each launch hands the
launcher, through Triton's dispatch and through a plan (kernels/_hopper.Launches), and checks
that they agree. The timings leave out what both paths share (by default the whole launcher;
with --launcher only the driver's own work), and are this machine's, not a GPU host's.
--launcher needs a C compiler and Python's headers (Triton builds its launcher with them).

Do not set TRITON_INTERPRET: the interpreter replaces the kernels this needs compiled. CPU
tensors stand in for the GPU's; nothing reads or writes them.
"""

import argparse
import ctypes
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget

SM90 = GPUTarget("cuda", 90, 32)


class _Utils:
    """What Triton asks of the driver's C utilities when it loads a compiled kernel."""

    def load_binary(self, name, kernel, shared, device):
        # (module, function, registers, spills, max threads); a module that is not None
        # marks the kernel as loaded, as a real one does.
        return (1, 1, 0, 0, 1024)

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                "mem_bus_width": 5120}


class Recorder:
    """The launcher: keeps each launch's grid and arguments in `Recorder.log` (or, with
    `Recorder.log = None`, drops them)."""
    log = []

    def __init__(self, src, metadata):
        self.name = src.fn.__name__

    def __call__(self, g0, g1, g2, stream, function, metadata, launch_metadata, enter, exit_,
                 *args):
        if Recorder.log is not None:
            Recorder.log.append((self.name, (g0, g1, g2), args))


class FakeSM90Driver:
    """Triton's driver interface, as far as compiling for and launching on an sm_90 goes."""

    def __init__(self):
        self.utils = _Utils()
        self.launcher_cls = Recorder

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return SM90

    def get_device_capability(self, device=0):
        return (9, 0)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        return None

    def map_python_to_cpp_type(self, ty):
        return ty


def stub_libcuda(folder):
    """Build, in `folder`, a libcuda.so.1 whose every function that Triton's NVIDIA driver code
    names does nothing and returns success, and point Triton at it."""
    from triton.backends.nvidia import driver
    here = os.path.dirname(driver.__file__)
    text = "".join(open(os.path.join(here, n)).read() for n in ("driver.c", "driver.py"))
    names = sorted(set(re.findall(r"\b(cu[A-Z][A-Za-z0-9]*)\b", text)) - {"cuGetErrorString"})
    src = ['int cuGetErrorString(int e, const char **s) { *s = "stub"; return 0; }']
    src += [f"int {n}(void) {{ return 0; }}" for n in names if not n.endswith("_t")]
    with open(os.path.join(folder, "stub.c"), "w") as f:
        f.write("\n".join(src) + "\n")
    lib = os.path.join(folder, "libcuda.so.1")
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", lib,
                    os.path.join(folder, "stub.c")], check=True)
    os.environ["TRITON_LIBCUDA_PATH"] = folder  # where Triton links its launcher against
    ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)  # and what the loader finds when it loads it


class _WithTritonsLauncher(_Utils):
    """Triton's own C utilities (launch, TMA descriptor fill), built against stub_libcuda."""

    def __init__(self):
        from triton.backends.nvidia import driver
        self.real = driver.CudaUtils()

    def __getattr__(self, name):
        return getattr(self.real, name)


def install(launcher=False):
    """Make the stand-in Triton's active driver, and the stream a plan's launcher asks for a
    constant (a CPU build of torch has no CUDA streams). With `launcher`, launches go through
    Triton's own launcher, into a libcuda that does nothing (stub_libcuda)."""
    from hf_flash.kernels import _common, _tuning
    assert not _common.INTERPRET, "unset TRITON_INTERPRET: the kernels must compile for sm_90"
    fake = FakeSM90Driver()
    if launcher:
        from triton.backends.nvidia import driver
        stub_libcuda(tempfile.mkdtemp())
        fake.utils, fake.launcher_cls = _WithTritonsLauncher(), driver.CudaLauncher
    triton.runtime.driver.set_active(fake)
    _tuning._current_stream = lambda device: 0


def normalised(log, names):
    """The launches in `log` with every tensor (and each descriptor's tensor) named: by `names`
    (data pointer -> name) for the caller's tensors, and by order of first appearance for those
    a call made itself, so that two calls on different tensors compare equal where they hand
    their launchers the same things."""
    fresh = {}

    def name(t):
        p = t.data_ptr()
        return names.get(p) or fresh.setdefault(p, f"made{len(fresh)}")

    def one(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", name(a), a.dtype, tuple(a.shape), a.stride())
        if hasattr(a, "base") and hasattr(a, "block_shape"):  # a TensorDescriptor
            return ("descriptor", name(a.base), a.base.dtype, tuple(a.shape), tuple(a.strides),
                    tuple(a.block_shape), repr(a.layout), a.padding,
                    getattr(a, "round_f32_to_tf32", None))
        return a

    return [(kernel, grid, tuple(one(a) for a in args)) for kernel, grid, args in log]


def inputs(b=2, h=4, h_kv=2, n_q=300, n_k=300, d=64, dtype=torch.bfloat16, seed=0):
    """q, k, v, o, dO, stats, dlse as the backward takes them, and dq, dk, dv to write."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)
    q, o, do, dq = (rand(b, h, n_q, d) for _ in range(4))
    k, v, dk, dv = (rand(b, h_kv, n_k, d) for _ in range(4))
    stats = rand(b, h, 3, n_q, dt=torch.float32)
    dlse = rand(b, h, n_q, dt=torch.float32)
    return dict(q=q, k=k, v=v, o=o, do=do, dq=dq, dk=dk, dv=dv, stats=stats, dlse=dlse)


def calls():
    """name -> function(tensors, launches) making one call of each Gluon route."""
    from hf_flash.kernels import _backward_hopper as bh, _forward_hopper as fh
    scale = 64 ** -0.5

    def forward(t, launches):
        fh.attention_forward(t["q"], t["k"], t["v"], True, 0, scale, launches=launches)

    def fused(t, launches, dq_add=None):
        bh.backward(t["q"], t["k"], t["v"], t["o"], t["do"], t["dq"], t["dk"], t["dv"],
                    t["stats"], t["dlse"], True, 0, scale,
                    config=dq_add and {"DQ_ADD": dq_add}, launches=launches)

    def dkdv(t, launches):
        bh.dkdv(t["q"], t["k"], t["v"], t["do"], t["dk"], t["dv"], t["stats"], t["dlse"], False,
                0, scale, launches=launches)

    out = {"forward": forward, "fused backward": fused, "dkdv backward": dkdv}
    if bh.HAS_TMA_ADD:  # the element-atomic form too, which 3.6 takes
        out["fused backward, atomics"] = lambda t, launches: fused(t, launches, "atomic")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launcher", action="store_true",
                   help="through Triton's own launcher (C included), into a libcuda that does "
                        "nothing")
    args = p.parse_args()
    install(launcher=args.launcher)
    from hf_flash.kernels import _hopper
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
    from profile_host import rounds_us
    Recorder.log = None
    # Small tensors: the host path does not depend on their size, but the CPU would do the
    # PyTorch ops between launches (dQ's rounding copy, dkdv's row padding) itself.
    t = inputs(b=2, h=4, h_kv=4, n_q=256, n_k=256)
    print(f"host time of one call, us (min / median of 7 rounds of 300), Triton "
          f"{triton.__version__}, B2 H4 N256 D64 bf16, launches "
          + ("through Triton's launcher into a do-nothing libcuda" if args.launcher
             else "recorded by a stand-in launcher"))
    print(f"{'route':28s} {'dispatch':>15s} {'plan (direct)':>15s}")
    for name, call in calls().items():
        plan = _hopper.Launches()
        call(t, plan)  # compiles (or loads from Triton's cache)
        jit = rounds_us(lambda: call(t, _hopper.ONCE), sync=lambda: None, n=300)
        direct = rounds_us(lambda: call(t, plan), sync=lambda: None, n=300)
        print(f"{name:28s} {jit[0]:7.1f} / {jit[1]:5.1f} {direct[0]:7.1f} / {direct[1]:5.1f}")


if __name__ == "__main__":
    sys.exit(main())
