"""Launching the kernels: pick a config once per shape class, then launch the compiled kernel
directly, and repeat a whole call's launches from a plan.

Why not `kernel[grid](...)` on every call: Triton's launch path binds and specialises every
argument on each call (its binder, the cache-key build, the options), and its autotuner adds a
cache look-up of its own. With ~40 arguments that is ~100-150 us of Python per launch on an H100
host (Triton 3.6), more than the GPU time of a BERT-sized attention call. Here the first call with
a given specialisation goes through Triton (which compiles), and later calls hand the arguments
straight to the compiled kernel's launcher.

The specialisation key repeats what Triton itself specialises on, so a compiled kernel is only
reused where Triton would reuse it: for an int, whether it is 1 (then a constant), divisible by 16
and whether it fits 32 bits; for a tensor, its dtype and whether its address is 16-byte aligned.
Floats are never specialised. Any other argument type takes Triton's own path.

Plans go one step further. A model calls attention with the same shapes, strides and flags in
every layer and step, so everything but the tensors' addresses repeats: the scalars, the grid,
the config, the compiled kernel. `launch` returns a launcher holding them (a callable taking
the tensors: `_Direct`, or `_Interpreted` on the CPU); the caller stores its call's launchers
under a signature of everything they were derived from (`remember`), and a later call with that
signature and 16-byte-aligned tensors only gathers its tensors and launches (`planned`). The
signature is the caller's to get right (_common.call_signature): a field left out of it would
hand one call another call's strides, so the CPU suite runs plans too (through Triton's
interpreter).
"""

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
import triton.testing

from . import _common

try:  # Triton 3.6 to 3.9 have it (private, hence the guard): compiles handed to an executor
    from triton.runtime import _async_compile
except ImportError:  # pragma: no cover - another Triton: candidates compile one by one
    _async_compile = None

# Threads that compile a shape class's tuning candidates at once, before they are timed. Most of
# Triton's compile (MLIR passes, LLVM, ptxas) runs without the GIL: on 2 CPU cores, 4 forward
# candidates for sm_90 took 7.8 s one by one and 5.1 s on 2 threads (Triton 3.6; 10.4 and 5.7 s
# with 3.9). HF_FLASH_COMPILE_THREADS=1 compiles them one by one, inside the timing loop.
def _compile_threads() -> int:
    raw = os.environ.get("HF_FLASH_COMPILE_THREADS", "").strip()
    if not raw:
        return min(16, os.cpu_count() or 1)
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"HF_FLASH_COMPILE_THREADS must be a whole number >= 1 (1: one compile at a "
                         f"time), got {raw!r}")
    return int(raw)


COMPILE_THREADS = _compile_threads()


# Tuning times every candidate in a 20 ms window. Split into rounds, the candidates take turns
# (A B C, A B C, ...) and each is ranked by its median round, so a clock or host change during
# one candidate's window does not decide the pick on its own; HF_FLASH_TUNE_ROUNDS=1 times each
# candidate once, in one window. benchmarks/tuner_repeat.py measures how often each way picks
# the same config again.
def _tune_rounds() -> int:
    raw = os.environ.get("HF_FLASH_TUNE_ROUNDS", "").strip() or "1"
    if not raw.isdigit() or not 1 <= int(raw) <= 20:
        raise ValueError(f"HF_FLASH_TUNE_ROUNDS must be a whole number from 1 to 20, got {raw!r}")
    return int(raw)


TUNE_ROUNDS = _tune_rounds()
TUNE_WINDOW_MS = 20
# Each round runs a candidate at least this many times (its window grows to fit them): a 20 ms
# window holds 8 runs of a 2.3 ms forward at head dim 128 and 4k, split into rounds fewer. Eight
# moved no fwd+bwd time beyond the trials' spread on an H200 (docs/perf-notes.md), so 1; kept
# for benchmarks/tuner_repeat.py.
TUNE_MIN_RUNS = 1
# What each tuning timed, for benchmarks: dicts of kernel name and (config, rounds' ms) pairs.
_TIMINGS: list = []

_CHOSEN: dict = {}    # (name, shape key) -> config
# (name, shape key, device, specialisation, constexprs) -> (compiled kernel, constexpr values)
_COMPILED: dict = {}

_INT32 = range(-2**31, 2**31)


def _scalar_spec(scalars):
    key = []
    for a in scalars:
        t = type(a)
        if t is int:
            key.append(3 if a == 1 else (a % 16 == 0) + 4 * (a not in _INT32))
        elif t is float:
            key.append(0)
        else:
            return None
    return tuple(key)


# The scalar arguments of a launch (strides, lengths, scale...) -> their specialisation. A model's
# calls repeat the same few scalar tuples, and a dict hit costs a fraction of classifying ~30
# values one by one. Bounded: a decode loop meets a new key length every step.
_SCALAR_SPECS: dict = {}


def _spec_key(tensors, scalars):
    """What Triton specialises on, per argument; None when a scalar is of a kind not handled."""
    try:
        spec = _SCALAR_SPECS.get(scalars)
    except TypeError:  # an unhashable scalar: leave the launch to Triton
        return None
    if spec is None:
        spec = _scalar_spec(scalars)
        if spec is None:
            return None
        if len(_SCALAR_SPECS) >= 4096:
            _SCALAR_SPECS.clear()
        _SCALAR_SPECS[scalars] = spec
    return tuple([(t.dtype, t.data_ptr() % 16 == 0) for t in tensors]), spec


def _current_stream(device_index):
    return torch.cuda.current_stream(device_index).cuda_stream


try:
    _current_stream = torch._C._cuda_getCurrentRawStream  # noqa: F811  (the launcher's own call)
except AttributeError:  # CPU-only builds of torch
    pass


def _hooks_active() -> bool:
    # A profiler (e.g. Triton's proton) listens through these hooks: leave the launch to Triton.
    # Triton 3.6 and later keep them as HookChain objects, empty rather than None when unused.
    try:
        rt = triton.knobs.runtime
        hooks = (rt.launch_enter_hook, rt.launch_exit_hook)
    except AttributeError:  # pragma: no cover - Triton without knobs
        return True
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


def launch(kernel, name, key, candidates, grid, tensors, scalars, constexprs, outputs=()):
    """Launch `kernel` with the best config for `key` (`candidates()` lists dicts of
    BLOCK_M/BLOCK_N/num_warps/num_stages, best guess first); `grid(cfg)` gives the launch grid.
    The kernel's arguments are `tensors` then `scalars` (ints and floats), in signature order;
    `constexprs` holds its constexpr arguments and any compile option (`enable_fp_fusion`).
    `key` starts with the bucketed query and key lengths. `outputs` are the positions in
    `tensors` of what the kernel writes; tuning only takes a candidate whose outputs agree with
    the first candidate's. Every output must be fully rewritten by each launch (true of all
    hf_flash kernels), so the timing runs of a first call are harmless.

    Returns a launcher that repeats this launch for other tensors of the same dtypes and
    alignment (for a plan), or None where there is nothing safe to repeat."""
    args = tensors + scalars
    full_key = (name, key)
    cfg = _CHOSEN.get(full_key)
    if cfg is None:
        cands = candidates()
        cfg = (_pick(kernel, cands, grid, args, constexprs, outputs)
               if worth_tuning(key) and len(cands) > 1 else cands[0])
        _CHOSEN[full_key] = cfg
    g = grid(cfg)
    if torch.compiler.is_compiling():
        kernel[g](*args, **constexprs, **cfg)
        return None
    if _common.INTERPRET:
        kwargs = {**constexprs, **cfg}
        kernel[g](*args, **kwargs)
        return _Interpreted(kernel, g, scalars, kwargs)
    spec = _spec_key(tensors, scalars)
    device = torch.cuda.current_device()  # Triton launches on the current device, as here
    # The shape key already holds the constexprs the config depends on; they are repeated here
    # because a caller may add one that does not change the config (but does change the code).
    cache_key = (name, key, device, spec, *constexprs.values())
    hit = _COMPILED.get(cache_key) if spec is not None else None
    if hit is None or _hooks_active():
        compiled = kernel[g](*args, **constexprs, **cfg)
        if spec is None:
            return None
        hit = _COMPILED[cache_key] = (compiled, constexpr_tail(kernel, len(args),
                                                                {**constexprs, **cfg}))
        return None if _hooks_active() else _Direct(hit, g, device, scalars)
    direct = _Direct(hit, g, device, scalars)
    direct(tensors)
    return direct


def constexpr_tail(kernel, n_args: int, constexprs: dict) -> tuple:
    """What a compiled launcher takes after a launch's `n_args` arguments: it takes every
    parameter in signature order, constexprs included (it skips them), so their values follow
    in the kernel's own parameter order. (Compile options in `constexprs` are not parameters.)"""
    return tuple(constexprs[n] for n in kernel.arg_names[n_args:])


class _Direct:
    """A launcher for one compiled kernel, grid and scalars: hands tensors straight to Triton's
    compiled launcher, on the current stream of the device it was compiled for."""
    __slots__ = ("run", "g0", "g1", "g2", "device", "function", "metadata", "tail")

    def __init__(self, hit, grid, device, scalars):
        compiled, tail = hit
        self.run = compiled.run  # first: loads the kernel, which sets `function`
        self.function, self.metadata = compiled.function, compiled.packed_metadata
        self.g0, self.g1, self.g2 = (*grid, 1, 1)[:3]  # two dims written; the launcher takes 3
        self.device = device
        self.tail = (*scalars, *tail)

    def __call__(self, tensors):
        self.run(self.g0, self.g1, self.g2, _current_stream(self.device), self.function,
                 self.metadata, None, None, None, *tensors, *self.tail)


class _Interpreted:
    """The launcher of a plan under Triton's interpreter: Triton's own launch, with the config
    and scalars of the plan, so the CPU suite runs the plan path too."""
    __slots__ = ("kernel", "grid", "scalars", "kwargs")

    def __init__(self, kernel, grid, scalars, kwargs):
        self.kernel, self.grid, self.scalars, self.kwargs = kernel, grid, scalars, kwargs

    def __call__(self, tensors):
        self.kernel[self.grid](*tensors, *self.scalars, **self.kwargs)


# Plans: a call's signature -> its launchers, in order (see the module's docstring). Bounded: a
# decode loop meets a new key length, hence a new signature, every step.
_PLANS: dict = {}
# A switch for measuring them: benchmarks/profile_host.py times calls with and without.
USE_PLANS = True


def _aligned(tensors) -> bool:
    """Whether every tensor's address is 16-byte aligned, the specialisation plans are made for
    (fresh allocations always are; a view into a buffer may not be: that call goes the full
    way)."""
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    return bits % 16 == 0


def planned(sig, tensors):
    """The launchers remembered for `sig`, if they may launch `tensors`; else None."""
    plan = _PLANS.get(sig) if USE_PLANS else None
    if plan is None or not _aligned(tensors) or _hooks_active():
        return None
    return plan


def remember(sig, tensors, launchers):
    """Keep a call's launchers for later calls with signature `sig`: `sig` must hold everything
    the launches' scalars, grids, configs and specialisation were derived from, apart from
    `tensors`' addresses, and the device they run on (made current by the caller:
    _common.on_inputs_device). Nothing is kept if any launch had nothing to repeat."""
    if any(go is None for go in launchers) or not _aligned(tensors):
        return
    if len(_PLANS) >= 4096:
        _PLANS.clear()
    _PLANS[sig] = tuple(launchers)


def worth_tuning(key) -> bool:
    """Whether the shape class `key` (bucketed q and k lengths first) is timed over candidates."""
    return _common.AUTOTUNE and key[0] * key[1] >= _common.TUNE_MIN_SCORES


def _precompile(kernel, candidates, grid, args, constexprs):
    """Compile every candidate at once on a thread pool (Triton's async compile mode); each lands
    in the kernel's own cache, where the timing launches find it. Only a head start: a candidate
    that fails to compile here is compiled again by its timing launch, which reports the error as
    it would without this (ignore_errors)."""
    threads = min(COMPILE_THREADS, len(candidates))
    if _async_compile is None or threads < 2 or _async_compile.active_mode.get() is not None:
        return  # (the caller's own async compile mode cannot be nested)
    with ThreadPoolExecutor(threads) as pool, _async_compile.AsyncCompileMode(pool, ignore_errors=True):
        for cfg in candidates:
            try:
                kernel.warmup(*args, grid=grid(cfg), **constexprs, **cfg)
            except Exception:  # the candidate's timing launch meets it again and decides
                pass


def out_of_resources(e: BaseException) -> bool:
    """Whether a launch failed because the config does not fit this GPU (registers, shared
    memory): the tuner skips such a config."""
    return "OutOfResources" in type(e).__name__ or "out of resource" in str(e).lower()


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def _estimate_ms(run) -> float:
    """One launch's time, roughly: three after a first."""
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 3


def _pick(kernel, candidates, grid, args, constexprs, outputs=()):
    if len(candidates) == 1:
        return candidates[0]
    _precompile(kernel, candidates, grid, args, constexprs)
    rounds = {i: [] for i in range(len(candidates))}  # candidate -> its rounds' medians, ms
    windows = {i: max(2, TUNE_WINDOW_MS // TUNE_ROUNDS) for i in rounds}
    for _ in range(TUNE_ROUNDS):
        for i in list(rounds):
            cfg = candidates[i]
            run = lambda: kernel[grid(cfg)](*args, **constexprs, **cfg)  # noqa: E731
            try:
                if TUNE_MIN_RUNS > 1 and not rounds[i]:  # a window long enough for them
                    windows[i] = max(windows[i], TUNE_MIN_RUNS * _estimate_ms(run))
                ms = triton.testing.do_bench(run, warmup=5, rep=windows[i], return_mode="median")
            except Exception as e:
                if out_of_resources(e):
                    del rounds[i]  # does not fit: out of every round
                    continue
                raise
            rounds[i].append(ms)
    if not rounds:
        raise RuntimeError(f"hf_flash: no launch config fits this GPU for {constexprs}")
    if len(_TIMINGS) >= 256:
        _TIMINGS.clear()
    _TIMINGS.append(dict(kernel=kernel.__name__,
                         timed=[(candidates[i], list(ms)) for i, ms in rounds.items()]))
    # Sorted by median round, then list order: ties keep the best guess first.
    ranked = [candidates[i] for i in sorted(rounds, key=lambda i: (_median(rounds[i]), i))]
    return _first_that_agrees(kernel, candidates[0], ranked, grid, args, constexprs, outputs)


# Tuning checks what it takes, because timing alone would take a fast wrong kernel: on an H200
# with Triton 3.6 one backward candidate computed dQ wrongly at lengths divisible by 16, and a
# warp-specialised forward was wrong everywhere (docs/reliability.md). The reference is the
# first candidate, the config the GPU test suite runs (HF_FLASH_AUTOTUNE=0). Different tile
# sizes sum in another order, so 16-bit outputs may differ by a few units in the last place of
# their largest value; the faults seen were off by the whole value, or NaN.
_REJECTED: list = []  # what was skipped, each once (warned then): for benchmarks' records


def _agrees(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether `out` equals `ref` up to summation-order rounding: NaN and infinities in the same
    places, and the finite entries within 2^-5 (16-bit) or 1e-4 (fp32) of the largest one.
    Works in the outputs' own dtype, so it needs about three more outputs' worth of memory."""
    if ref.numel() == 0:
        return True
    nan, finite = ref.isnan(), ref.isfinite()
    inf = ~nan & ~finite
    if not (torch.equal(out.isnan(), nan) and torch.equal(out.isfinite(), finite)
            and torch.equal(out[inf], ref[inf])):
        return False
    # Equal infinities and NaN give NaN here, counted as 0: they were compared above.
    diff = torch.sub(out, ref).nan_to_num_(nan=0.0).abs_().max().float()
    top = ref.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs_().max().float()
    rtol = 1e-4 if ref.dtype == torch.float32 else 2 ** -5
    return bool(diff <= rtol * top)


def _first_that_agrees(kernel, reference, ranked, grid, args, constexprs, outputs):
    """The fastest of `ranked` whose outputs on this call agree with `reference`'s."""
    if not outputs or not any(c is reference for c in ranked):
        return ranked[0]  # nothing to compare, or the reference does not fit: as timed
    ref = None
    for cfg in ranked:
        if cfg is reference:
            return cfg
        try:
            if ref is None:
                kernel[grid(reference)](*args, **constexprs, **reference)
                ref = [args[i].clone() for i in outputs]
            kernel[grid(cfg)](*args, **constexprs, **cfg)
            if all(_agrees(args[i], r) for i, r in zip(outputs, ref)):
                return cfg
        except torch.OutOfMemoryError:
            return reference  # no room to compare on this call: the default, unchecked speed
        skipped = {"kernel": getattr(kernel, "__name__", str(kernel)), "config": dict(cfg),
                   "constexprs": {k: str(v) for k, v in constexprs.items()}}
        if skipped not in _REJECTED:
            _REJECTED.append(skipped)
            warnings.warn(f"hf_flash: launch config {cfg} of {skipped['kernel']} gave other "
                          f"results than the default config {reference} for {constexprs}; not "
                          f"used (its compiled code is suspect)", RuntimeWarning, stacklevel=2)
    return reference


def rejected_configs() -> list:
    """Candidates tuning skipped because their outputs disagreed with the default config's."""
    return list(_REJECTED)


def chosen_configs() -> dict:
    """What was picked so far, for benchmarks and debugging."""
    return dict(_CHOSEN)


def compiled_count() -> int:
    """How many (kernel, shape class, specialisation) entries launch directly: for tests."""
    return len(_COMPILED)
