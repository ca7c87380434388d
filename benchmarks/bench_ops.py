"""Op-level benchmark: hf_flash against every PyTorch SDPA backend and FlexAttention.

Same process, same inputs, `triton.testing.do_bench` medians; forward, backward and both;
ms, TFLOP/s and the extra peak memory of one forward+backward. Each case also gets a correctness
spot check of hf_flash (output and gradients against an fp64 reference) so a fast wrong kernel
cannot pass unnoticed.

On a CUDA machine, from the repository root (one call each fits in 10 minutes):

    python -m pip install -q --no-deps --no-build-isolation -e .
    python benchmarks/bench_ops.py --suite bar    --out benchmarks/results
    python benchmarks/bench_ops.py --suite sweep  --head-dims 64  --out benchmarks/results
    python benchmarks/bench_ops.py --suite sweep  --head-dims 128 --out benchmarks/results
    python benchmarks/bench_ops.py --suite memory --out benchmarks/results

On any machine, to test the plumbing (the smallest cases, hf_flash under Triton's interpreter
against SDPA math on the CPU; the timings mean nothing):

    python benchmarks/bench_ops.py --dry-run
"""

import argparse
import gc
import math
import os
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (add_hopper_floors_arg, hopper_floors, output_dir, parse_hopper_floors,  # noqa: E402
                      run_metadata, set_hopper_floors, short_reason, table, write_results)

# ---------------------------------------------------------------------------------------------
# Settings
# hf_flash_packed: padded cases only, their real tokens packed back to back
# (flash_attention_varlen), as patch(model, packed=True) hands them to every layer.
BACKENDS = ("hf_flash", "hf_flash_packed", "flash", "efficient", "cudnn", "math", "flex")
MODES = ("fwd", "bwd", "fwd+bwd")
# FLOPs relative to the forward pass: backward does 2.5x the forward's matrix work (dV, dP, dS->dQ,
# dS->dK plus the recomputed QK^T, against QK^T and PV), the convention of the FlashAttention papers.
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
# The sweep follows the FlashAttention paper's layout: 16k tokens per batch, hidden size 2048.
SWEEP_SEQS = (512, 1024, 2048, 4096, 8192, 16384)
SWEEP_HEAD_DIMS = (64, 128)
SWEEP_TOKENS, SWEEP_HIDDEN = 16384, 2048
# causal_dropout is how a GPT-2 layer trains (attn_pdrop 0.1), which the bar's GPT-2 row leaves out.
SWEEP_VARIANTS = ("plain", "causal", "padded", "dropout", "causal_dropout")
MEMORY_SEQS = (1024, 2048, 4096, 8192)
DROPOUT = 0.1
# Time budget (s) for one run: it fits a 10-minute batch job with room
# for start-up, install and writing results: what does not fit is recorded as skipped.
DEFAULT_BUDGET_S = 500
# The fp64 reference of the spot check materialises (b, h, n_q, n_k) scores a few times over.
CHECK_MAX_SCORES = 2 ** 26
# An error ratio above this against PyTorch's own same-dtype error marks the check FAIL
# (the project's test criterion: kernel error <= 2 x PyTorch's error, both against fp64).
CHECK_RATIO = 2.0
# Relative difference between hf_flash's full-size output and SDPA's above which the case is
# flagged: two correct bf16 kernels differ by a few 1e-3.
FULL_CHECK_LIMIT = 2e-2


@dataclass(frozen=True)
class Case:
    suite: str
    name: str
    B: int
    H: int
    N: int
    D: int
    causal: bool = False
    padded: bool = False  # key padding, lengths uniform in [N/2, N], right-padded as HF pads
    dropout: float = 0.0
    backends: tuple = BACKENDS
    modes: tuple = MODES

    def floor_ms(self, mode: str, mm_tflops: float, bw_tbs: float, key_frac: float = 1.0):
        """The larger of FLOPs over the matrix rate and bytes over bandwidth (each of q, k, v, o,
        dO, dq, dk, dv read or written once per pass, plus the fp32 lse). With key padding only
        the real keys' work and K/V reads count: that is what a kernel skipping padded tiles
        must do."""
        t = self.B * self.H * self.N * self.D * 2  # one bf16/fp16 tensor, bytes
        lse = self.B * self.H * self.N * 4
        fwd_bytes = (2 + 2 * key_frac) * t + lse           # read q, k, v; write o, lse
        bwd_bytes = (6 + 2 * key_frac) * t + lse           # read q, k, v, o, dO, lse; write dq, dk, dv
        nbytes = {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes}[mode]
        return max(self.flops(mode) * key_frac / (mm_tflops * 1e12),
                   nbytes / (bw_tbs * 1e12)) * 1e3

    def flops(self, mode: str) -> float:
        # Nominal dense FLOPs, as the bar table counts them: padded keys are counted too,
        # so a kernel that skips padded tiles shows a rate above what it physically computes.
        f = 4.0 * self.B * self.H * self.N * self.N * self.D
        if self.causal:
            f *= 0.5
        return f * MODE_FLOP_FACTOR[mode]


def bar_cases():
    s = "bar"
    return [
        Case(s, "bert_b32_n512_d64", 32, 16, 512, 64),
        Case(s, "bert_b32_n512_d64_pad_drop", 32, 16, 512, 64, padded=True, dropout=DROPOUT),
        Case(s, "gpt2_b16_n1024_d64_causal", 16, 16, 1024, 64, causal=True),
        Case(s, "b4_h32_n4096_d128", 4, 32, 4096, 128),
        Case(s, "b1_h16_n16384_d64", 1, 16, 16384, 64),
    ]


def sweep_cases(seqs, head_dims, variants):
    cases = []
    for d in head_dims:
        for v in variants:
            for n in seqs:
                b, h = max(1, SWEEP_TOKENS // n), SWEEP_HIDDEN // d
                cases.append(Case("sweep", f"d{d}_{v}_n{n}", b, h, n, d,
                                  causal=v in ("causal", "causal_dropout"), padded=v == "padded",
                                  dropout=DROPOUT if v in ("dropout", "causal_dropout") else 0.0))
    return cases


def memory_cases(seqs):
    cases = [Case("memory", f"mem_b4_h16_d64_n{n}", 4, 16, n, 64, modes=("fwd+bwd",))
             for n in seqs]
    # Only the linear-memory kernels are tried at 64k: the math path would need ~1 TB.
    cases.append(Case("memory", "mem_b1_h16_d64_n65536", 1, 16, 65536, 64,
                      backends=("hf_flash", "flash"), modes=("fwd+bwd",)))
    return cases


def dry_run_cases():
    s = "dry-run"
    return [Case(s, "tiny", 2, 2, 64, 32, backends=("hf_flash", "math")),
            Case(s, "tiny_causal", 2, 2, 64, 32, causal=True, backends=("hf_flash", "math")),
            Case(s, "tiny_pad_drop", 2, 2, 64, 32, padded=True, dropout=DROPOUT,
                 backends=("hf_flash", "hf_flash_packed", "math"))]


# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="hf_flash vs PyTorch SDPA backends and FlexAttention, op level.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", choices=("bar", "sweep", "memory", "all"), default="bar",
                   help="bar: the issue's bar table; sweep: head dim x seq len x variant; "
                        "memory: peak memory vs seq len")
    p.add_argument("--quick", action="store_true",
                   help="shorter timing windows, and for the sweep fewer lengths and variants")
    p.add_argument("--out", default="benchmarks/results", help="folder for CSV and JSON")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated subset of " + ",".join(BACKENDS))
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of fwd,bwd,fwd+bwd")
    p.add_argument("--cases", default="", help="only cases whose name contains one of these "
                                               "comma-separated substrings")
    p.add_argument("--seqs", default="", help="sweep/memory sequence lengths, comma-separated")
    p.add_argument("--head-dims", default="", help="sweep head dims, comma-separated")
    p.add_argument("--variants", default="", help="sweep variants: " + ",".join(SWEEP_VARIANTS))
    p.add_argument("--warmup", type=int, default=None, help="do_bench warm-up, ms (default 25; 10 with --quick)")
    p.add_argument("--rep", type=int, default=None, help="do_bench timing window, ms (default 100; 40 with --quick)")
    p.add_argument("--time-budget", type=float, default=DEFAULT_BUDGET_S,
                   help="seconds; cases past it are recorded as skipped, results stay written")
    p.add_argument("--no-check", action="store_true", help="skip the correctness spot checks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--host-profile", type=int, default=0, metavar="N",
                   help="print where hf_flash's fwd+bwd host time goes (cProfile over N calls)")
    add_hopper_floors_arg(p, "e.g. fused=1024 to time the fused backward on GPT-2's row")
    p.add_argument("--tag", default="", help="appended to the output file names, e.g. a kernel version")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU plumbing test: smallest cases, hf_flash under TRITON_INTERPRET=1 vs "
                        "SDPA math; timings are meaningless")
    args = p.parse_args(argv)
    args.floors = parse_hopper_floors(p, args.hopper_floors)
    unknown = [v for v in _csv_list(args.variants) if v not in SWEEP_VARIANTS]
    if unknown:  # it would otherwise run as a plain case under the unknown name
        p.error(f"unknown sweep variant(s) {', '.join(unknown)}; known: {', '.join(SWEEP_VARIANTS)}")
    return args


def _csv_list(text, cast=str):
    return [cast(x) for x in text.split(",") if x.strip()] if text else []


# ---------------------------------------------------------------------------------------------
# Everything below imports torch/triton lazily: the dry run must set TRITON_INTERPRET first.

class Unsupported(Exception):
    """A backend has no kernel for the case by its own documentation (not a failure)."""


class Runner:
    def __init__(self, args):
        import torch
        self.torch = torch
        self.args = args
        self.device = "cpu" if args.dry_run else "cuda"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        if args.dry_run and self.dtype == torch.bfloat16:
            # Triton's CPU interpreter computes bf16 wrongly (numpy has no bfloat16; seen with
            # Triton 3.9, 2026-11: errors ~1e9 where fp16 and fp32 agree with fp64), so the
            # plumbing test runs fp16, the other half-precision path.
            print("dry run: bf16 is wrong under Triton's interpreter; using fp16")
            self.dtype = torch.float16
        self.warmup = args.warmup if args.warmup is not None else (10 if args.quick else 25)
        self.rep = args.rep if args.rep is not None else (40 if args.quick else 100)
        self.deadline = time.perf_counter() + args.time_budget
        self._flex = None
        self.ceil = {}

    # -- helpers -------------------------------------------------------------------------------
    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def free(self):
        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()

    def timed(self, fn, grads=None) -> float:
        """Median ms. do_bench flushes the L2 cache (a 256 MB write) before every timed call, so
        inputs never start warm in L2 and rotating copies of them would change nothing."""
        if self.device == "cuda":
            import triton.testing
            return float(triton.testing.do_bench(fn, warmup=self.warmup, rep=self.rep,
                                                 grad_to_none=grads, return_mode="median"))
        times = []  # CPU dry run: plumbing only, one call is enough
        for _ in range(1):
            for g in grads or ():
                g.grad = None
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def make_inputs(self, case):
        torch = self.torch
        gen = torch.Generator(device=self.device).manual_seed(self.args.seed)
        shape = (case.B, case.H, case.N, case.D)
        q, k, v, do = (torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype)
                       for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)
        kpm = lengths = None
        if case.padded:
            # Lengths on a CPU generator: the same lengths on every machine for a given seed.
            cpu_gen = torch.Generator().manual_seed(self.args.seed + 1)
            lengths = torch.randint(case.N // 2, case.N + 1, (case.B,), generator=cpu_gen)
            lengths = lengths.to(self.device)
            kpm = torch.arange(case.N, device=self.device)[None, :] < lengths[:, None]
        key_frac = float(lengths.float().mean()) / case.N if lengths is not None else 1.0
        return dict(q=q, k=k, v=v, do=do, kpm=kpm, lengths=lengths, key_frac=key_frac)

    def packed_inputs(self, case, inp):
        """The padded case's real tokens packed back to back: q, k, v and dO as (1, H, tokens, D)
        leaves over (tokens, H, D) memory, with cu_seqlens: what patch(model, packed=True) hands
        every layer (it unpads once per model forward, so the packing is not timed). Nominal
        FLOPs stay the padded case's (as for every backend), so its TF/s compare with the
        padded rows'."""
        if inp["lengths"] is None:
            raise Unsupported("packed inputs come from a padded case")
        torch = self.torch
        real = inp["kpm"].reshape(-1)  # right padding: each row's tokens in order, rows in order

        def pack(t):
            rows = t.detach().transpose(1, 2).reshape(-1, case.H, case.D)[real].contiguous()
            return rows.transpose(0, 1)[None]

        lengths = inp["lengths"].to(torch.int32)
        cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        q, k, v = (pack(inp[n]).requires_grad_(True) for n in ("q", "k", "v"))
        return dict(inp, q=q, k=k, v=v, do=pack(inp["do"]), cu=cu, max_len=int(lengths.max()))

    def flex(self):
        if self._flex is None:
            import torch._dynamo
            from torch.nn.attention.flex_attention import flex_attention
            # Every (shape, mask) pair is its own static compile; the default limit of 8 would
            # fall back to dynamic shapes (slower kernels) part-way through a sweep.
            cfg = torch._dynamo.config
            for name in ("cache_size_limit", "recompile_limit",
                         "accumulated_cache_size_limit", "accumulated_recompile_limit"):
                if hasattr(cfg, name):
                    setattr(cfg, name, max(getattr(cfg, name), 1024))
            self._flex = torch.compile(flex_attention, dynamic=False)
        return self._flex

    def ceilings(self) -> dict:
        """The two rates the floors use, measured here rather than taken from a datasheet: a
        bf16 8192^3 matrix product and a 1 GiB device-to-device copy (bytes read + written)."""
        if self.device != "cuda":
            return {}
        torch = self.torch
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        ms = self.timed(lambda: a @ b)
        src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        ms_copy = self.timed(lambda: dst.copy_(src))
        res = {"matmul_bf16_tflops": 2 * n**3 / (ms * 1e-3) / 1e12,
               "copy_tbs": 2 * src.numel() * 2 / (ms_copy * 1e-3) / 1e12}
        del a, b, src, dst
        self.free()
        return res

    # -- the functions under test ----------------------------------------------------------------
    def build(self, backend, case, inp):
        """Returns (forward function, context to run it in)."""
        torch = self.torch
        q, k, v, kpm = inp["q"], inp["k"], inp["v"], inp["kpm"]
        p, causal = case.dropout, case.causal
        if backend == "hf_flash":
            from hf_flash import flash_attention
            return (lambda: flash_attention(q, k, v, dropout_p=p, is_causal=causal,
                                            key_padding_mask=kpm)), nullcontext()
        if backend == "hf_flash_packed":
            from hf_flash import flash_attention_varlen
            cu, longest = inp["cu"], inp["max_len"]
            # As the packed encoder calls it: lengths built here from the padding, valid by
            # construction, so not checked again in every call (a dozen small launches).
            return (lambda: flash_attention_varlen(q, k, v, cu, longest, dropout_p=p,
                                                   is_causal=causal, _cu_seqlens_checked=True)
                    ), nullcontext()
        if backend == "flex":
            if self.device != "cuda":
                raise Unsupported("flex is benchmarked on CUDA only")
            if p > 0:
                raise Unsupported("FlexAttention has no dropout")
            from torch.nn.attention.flex_attention import create_block_mask
            block_mask = None
            if case.padded:
                lengths = inp["lengths"]
                block_mask = create_block_mask(lambda b, h, qi, ki: ki < lengths[b],
                                               case.B, None, case.N, case.N, device=self.device)
            elif causal:
                block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki,
                                               None, None, case.N, case.N, device=self.device)
            flex = self.flex()
            return (lambda: flex(q, k, v, block_mask=block_mask)), nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch.nn.functional as F
        enum = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                "cudnn": "CUDNN_ATTENTION", "math": "MATH"}[backend]
        # SDPA's key padding: a boolean (B, 1, 1, N) mask, True where a key takes part; each
        # backend that cannot take it says so and is recorded as n/a.
        mask = kpm[:, None, None, :] if kpm is not None else None
        return (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                       is_causal=causal)), \
            sdpa_kernel([getattr(SDPBackend, enum)])

    # -- measurement ---------------------------------------------------------------------------
    def base_row(self, case, backend, mode):
        return dict(suite=case.suite, case=case.name, backend=backend, mode=mode, B=case.B,
                    H=case.H, N=case.N, D=case.D, causal=case.causal, padded=case.padded,
                    dropout=case.dropout, dtype="bf16" if self.dtype == self.torch.bfloat16 else "fp16",
                    status="n/a", ms=None,
                    tflops=None, floor_ms=None, pct_of_floor=None, peak_mib=None,
                    host_ms=None, setup_s=None, reason="")

    def peak_memory_mib(self, fn, inp):
        """Extra peak of one forward+backward over what was allocated before it (the inputs,
        dout and mask): output, gradients, saved state and the backend's workspace."""
        if self.device != "cuda":
            return None
        torch = self.torch
        for t in (inp["q"], inp["k"], inp["v"]):
            t.grad = None
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        out.backward(inp["do"])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        for t in (inp["q"], inp["k"], inp["v"]):
            t.grad = None
        return peak / 2**20

    def host_ms(self, fn, grads):
        """Host ms to queue one call: 30 calls back to back, one sync after them. Where it nears
        the timed ms, do_bench's figure measures the host (Python, launches), not the GPU. (The
        CPU dry run makes one call: plumbing only.)"""
        n = 30 if self.device == "cuda" else 1
        self.sync()
        t = time.perf_counter()
        for _ in range(n):
            for g in grads or ():
                g.grad = None
            fn()
        host = (time.perf_counter() - t) * 1e3 / n
        self.sync()
        return host

    def host_profile(self, case, fn, grads):
        """--host-profile: where the host time of hf_flash's fwd+bwd goes (cProfile, own time)."""
        import cProfile
        import io
        import pstats
        prof = cProfile.Profile()
        self.sync()
        prof.enable()
        for _ in range(self.args.host_profile):
            for g in grads:
                g.grad = None
            fn()
        prof.disable()
        self.sync()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(10)
        lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()][-11:]
        print(f"host profile, {case.name}, hf_flash fwd+bwd x{self.args.host_profile}:\n"
              + "\n".join(lines), flush=True)

    def measure(self, case, backend, inp):
        modes = [m for m in case.modes if m in self.args.modes_list]
        rows = {m: self.base_row(case, backend, m) for m in modes}

        def na(ms, reason):
            for m in ms:
                rows[m].update(status="n/a", reason=reason)

        if time.perf_counter() > self.deadline:
            na(modes, "skipped: time budget")
            return list(rows.values())
        try:
            if backend == "hf_flash_packed":
                inp = self.packed_inputs(case, inp)
            fn, ctx = self.build(backend, case, inp)
        except Unsupported as e:
            na(modes, f"no kernel: {e}")
            return list(rows.values())
        except Exception as e:
            na(modes, short_reason(e))
            return list(rows.values())
        grads = [inp["q"], inp["k"], inp["v"]]

        t0 = time.perf_counter()
        with ctx:
            # Probe: the first call compiles/autotunes and tells whether the backend takes the
            # case at all (SDPA's refusals come with warnings that say why).
            out, err = None, None
            with warnings.catch_warnings(record=True) as ws:
                warnings.simplefilter("always")
                try:
                    out = fn()
                    self.sync()
                except Exception as e:
                    err = short_reason(e, ws)
            if err:
                del out
                self.free()
                na(modes, err)
                return list(rows.values())
            bwd_err = None
            try:
                out.backward(inp["do"])
                self.sync()
            except Exception as e:
                bwd_err = short_reason(e)
            del out
            for g in grads:
                g.grad = None
            if bwd_err:
                self.free()
            setup_s = time.perf_counter() - t0
            for r in rows.values():
                r["setup_s"] = round(setup_s, 2)

            def record(mode, ms, reason=""):
                r = rows[mode]
                r.update(status="ok", ms=ms, tflops=case.flops(mode) / (ms * 1e-3) / 1e12,
                         reason=reason)
                if self.ceil:
                    floor = case.floor_ms(mode, self.ceil["matmul_bf16_tflops"],
                                          self.ceil["copy_tbs"], inp["key_frac"])
                    r.update(floor_ms=floor, pct_of_floor=100 * floor / ms)

            def attempt(mode, thunk):
                try:
                    thunk()
                except Exception as e:
                    na([mode], short_reason(e))
                    self.free()

            def fwd():
                record("fwd", self.timed(fn))
                rows["fwd"]["host_ms"] = self.host_ms(fn, None)

            if "fwd" in rows:
                attempt("fwd", fwd)
            if bwd_err:
                na([m for m in modes if m != "fwd"], f"backward: {bwd_err}")
                return list(rows.values())

            def step():
                o = fn()
                o.backward(inp["do"])

            if "fwd+bwd" in rows:
                def fwd_bwd():
                    rows["fwd+bwd"]["peak_mib"] = self.peak_memory_mib(fn, inp)
                    record("fwd+bwd", self.timed(step, grads))
                    rows["fwd+bwd"]["host_ms"] = self.host_ms(step, grads)
                    if backend == "hf_flash" and self.args.host_profile:
                        self.host_profile(case, step, grads)
                attempt("fwd+bwd", fwd_bwd)
            if "bwd" in rows:
                attempt("bwd", lambda: self.time_backward(fn, inp, grads, rows, record))
        for g in grads:
            g.grad = None
        return list(rows.values())

    def time_backward(self, fn, inp, grads, rows, record):
        out = fn()
        try:
            ms = self.timed(lambda: out.backward(inp["do"], retain_graph=True), grads)
            record("bwd", ms)
        except self.torch.OutOfMemoryError:
            raise
        except Exception as e:
            # A backend whose graph cannot be replayed (retain_graph) still gets a backward time:
            # the difference of the two measured ones, marked as such.
            f, fb = rows.get("fwd", {}).get("ms"), rows.get("fwd+bwd", {}).get("ms")
            if f is None or fb is None:
                raise
            record("bwd", fb - f, reason=f"derived as fwd+bwd - fwd ({short_reason(e, limit=120)})")
        finally:
            del out

    # -- correctness ---------------------------------------------------------------------------
    def check(self, case, inp):
        """hf_flash on a slice of the case (at most 2 batches, 2 heads, and as many leading
        queries as fit CHECK_MAX_SCORES with every key) against SDPA math in fp64, output and
        gradients; PyTorch's own SDPA in the same dtype sets the error scale. Dropout is off
        here (its RNG differs between implementations); masks and causality are kept. Then
        hf_flash's full-size output against SDPA's, same dtype, no dropout."""
        torch = self.torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from hf_flash import flash_attention

        b, h = min(case.B, 2), min(case.H, 2)
        nq = case.N
        while b * h * nq * case.N > CHECK_MAX_SCORES and nq > 64:
            nq //= 2
        # Top-left causal alignment (both PyTorch's is_causal and hf_flash's) keeps the leading
        # queries' visible keys the same when later queries are cut off.
        sl = lambda t: t[:b, :h].detach().contiguous()
        q = sl(inp["q"])[:, :, :nq].contiguous()
        k, v = sl(inp["k"]), sl(inp["v"])
        do = sl(inp["do"])[:, :, :nq].contiguous()
        kpm = inp["kpm"][:b] if inp["kpm"] is not None else None
        mask = kpm[:, None, None, :] if kpm is not None else None

        def grads_of(fn, dtype):
            # Fresh leaves each time: .to() of the same dtype would hand back the same tensor
            # and its .grad would accumulate across the three runs.
            xs = [t.detach().to(dtype).clone().requires_grad_(True) for t in (q, k, v)]
            o = fn(*xs)
            o.backward(do.to(dtype))
            return [o.detach()] + [x.grad for x in xs]

        def sdpa(q_, k_, v_):
            return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, is_causal=case.causal)

        with sdpa_kernel([SDPBackend.MATH]):
            ref = grads_of(sdpa, torch.float64)
        base = grads_of(sdpa, q.dtype)  # PyTorch's default choice of backend, same dtype
        mine = grads_of(lambda q_, k_, v_: flash_attention(q_, k_, v_, is_causal=case.causal,
                                                            key_padding_mask=kpm), q.dtype)

        def rel(x, r):
            return (x.double() - r).norm().item() / max(r.norm().item(), 1e-30)

        names = ("out", "dq", "dk", "dv")
        res = {"case": case.name, "slice": f"b{b} h{h} nq{nq} nk{case.N}"}
        ok = True
        for name, x, y, r in zip(names, mine, base, ref):
            e_mine, e_base = rel(x, r), rel(y, r)
            ratio = e_mine / max(e_base, 1e-12)
            res[f"err_{name}"], res[f"torch_err_{name}"], res[f"ratio_{name}"] = e_mine, e_base, ratio
            if not math.isfinite(e_mine) or ratio > CHECK_RATIO:
                ok = False
        del ref, base, mine
        # Full size, forward only: catches errors in query tiles past the slice.
        with torch.no_grad():
            full_mask = inp["kpm"][:, None, None, :] if inp["kpm"] is not None else None
            o_ref = F.scaled_dot_product_attention(inp["q"], inp["k"], inp["v"],
                                                   attn_mask=full_mask, is_causal=case.causal)
            o_mine = flash_attention(inp["q"], inp["k"], inp["v"], is_causal=case.causal,
                                     key_padding_mask=inp["kpm"])
            d = (o_mine.float() - o_ref.float()).norm().item() / max(o_ref.float().norm().item(), 1e-30)
        res["full_out_vs_sdpa"] = d
        if not math.isfinite(d) or d > FULL_CHECK_LIMIT:
            ok = False
        if case.padded and "hf_flash_packed" in self.args.backends_list:
            # The packed rows run other launches (flash_attention_varlen): their real tokens'
            # output must be the padded call's.
            from hf_flash import flash_attention_varlen
            pk = self.packed_inputs(case, inp)
            with torch.no_grad():
                o_packed = flash_attention_varlen(pk["q"], pk["k"], pk["v"], pk["cu"],
                                                  pk["max_len"], is_causal=case.causal)
                real = inp["kpm"].reshape(-1)
                o_packed = o_packed[0].transpose(0, 1)
                o_real = o_mine.transpose(1, 2).reshape(-1, case.H, case.D)[real]
                d = ((o_packed.float() - o_real.float()).norm().item()
                     / max(o_real.float().norm().item(), 1e-30))
            res["packed_out_vs_padded"] = d
            if not math.isfinite(d) or d > FULL_CHECK_LIMIT:
                ok = False
        res["max_ratio"] = max(res[f"ratio_{n}"] for n in names)
        res["status"] = "ok" if ok else "FAIL"
        return res


# ---------------------------------------------------------------------------------------------
def select_cases(args):
    seqs = _csv_list(args.seqs, int)
    if args.dry_run:
        cases = dry_run_cases()
    else:
        cases = []
        if args.suite in ("bar", "all"):
            cases += bar_cases()
        if args.suite in ("sweep", "all"):
            head_dims = _csv_list(args.head_dims, int) or list(SWEEP_HEAD_DIMS)
            variants = _csv_list(args.variants) or (
                ["plain", "causal"] if args.quick else list(SWEEP_VARIANTS))
            sw_seqs = seqs or ([1024, 4096, 16384] if args.quick else list(SWEEP_SEQS))
            cases += sweep_cases(sw_seqs, head_dims, variants)
        if args.suite in ("memory", "all"):
            cases += memory_cases(seqs or list(MEMORY_SEQS))
    if args.cases:
        keys = _csv_list(args.cases)
        cases = [c for c in cases if any(s in c.name for s in keys)]
    return cases


def summary(rows, checks, backends) -> str:
    """The closing table: ms and TFLOP/s per case and backend, hf_flash over the fastest other
    backend, peak memory, and the spot checks."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    out = []
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    if len(cases) > 12:  # long sweeps: only forward+backward in the printed table
        modes = [m for m in modes if m == "fwd+bwd"] or modes
    idx = {(r["case"], r["backend"], r["mode"]): r for r in rows}
    for mode in modes:
        body = []
        for c in cases:
            cells, others = [], []
            for b in backends:
                r = idx.get((c, b, mode))
                if r is None:
                    cells.append("")
                elif r["status"] == "ok":
                    cells.append(f"{r['ms']:.3f}/{r['tflops']:.0f}")
                    if not b.startswith("hf_flash"):  # the packed rows are hf_flash too
                        others.append(r["ms"])
                else:
                    cells.append("skip" if "time budget" in r["reason"] else "n/a")
            hf = idx.get((c, "hf_flash", mode))
            ratio = (f"{hf['ms'] / min(others):.2f}" if hf and hf["status"] == "ok" and others
                     else "")
            pct = (f"{hf['pct_of_floor']:.0f}%" if hf and hf.get("pct_of_floor") is not None
                   else "")
            body.append([c] + cells + [ratio, pct])
        out.append(f"{mode}: ms/TFLOP/s (median); hf/best = hf_flash ms over the fastest "
                   f"PyTorch backend; floor% = floor ms / hf_flash ms")
        out.append(table(["case"] + list(backends) + ["hf/best", "floor%"], body))
        out.append("")
    mem = [r for r in rows if r["mode"] == "fwd+bwd" and r.get("peak_mib") is not None]
    if mem:
        body = []
        for c in cases:
            cells = []
            for b in backends:
                r = idx.get((c, b, "fwd+bwd"))
                cells.append(f"{r['peak_mib']:.0f}" if r and r.get("peak_mib") is not None
                             else ("" if r is None else "n/a"))
            body.append([c] + cells)
        out.append("fwd+bwd extra peak memory, MiB")
        out.append(table(["case"] + list(backends), body))
        out.append("")
    host = [r for r in rows if r.get("host_ms") is not None]
    if host:
        body = []
        for c in cases:
            cells = []
            for b in backends:
                f, fb = idx.get((c, b, "fwd")), idx.get((c, b, "fwd+bwd"))
                cells.append(" / ".join(f"{r['host_ms']:.3f}" if r and r.get("host_ms") is not None
                                        else "-" for r in (f, fb)))
            body.append([c] + cells)
        out.append("host ms to queue one call, fwd / fwd+bwd (near the timed ms: host-bound)")
        out.append(table(["case"] + list(backends), body))
        out.append("")
    reasons = {}
    for r in rows:
        if r["status"] != "ok" and r["reason"]:
            reasons.setdefault((r["backend"], r["reason"][:110]), []).append(r["case"])
    for (b, why), cs in reasons.items():
        out.append(f"n/a {b} ({len(cs)}x): {why}")
    if checks:
        bad = [c for c in checks if c["status"] != "ok"]
        worst = max((c.get("max_ratio", float("nan")) for c in checks), default=float("nan"))
        out.append(f"checks: {len(checks) - len(bad)} ok, {len(bad)} not ok; worst error ratio "
                   f"vs PyTorch {worst:.2f} (limit {CHECK_RATIO})")
        for c in bad:
            out.append(f"  CHECK {c['status']}: {c['case']}: "
                       + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in c.items() if k not in ("case", "status")))
    return "\n".join(out)


def _chosen_configs() -> list:
    """The launch config hf_flash picked for each kernel and shape class so far."""
    from hf_flash.kernels import _tuning
    return [{"kernel": name, "key": [str(x) for x in key], "config": cfg}
            for (name, key), cfg in _tuning.chosen_configs().items()]


def _rejected_configs() -> list:
    """Tuning candidates hf_flash skipped as wrong (their outputs disagreed with the default's)."""
    from hf_flash.kernels import _tuning
    return _tuning.rejected_configs()


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        # Triton decides interpreter or GPU when kernels are defined: before hf_flash's import.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("bench_ops: no CUDA device; use --dry-run for the CPU plumbing test")
    try:
        import hf_flash  # noqa: F401
    except ImportError as e:
        sys.exit(f"bench_ops: cannot import hf_flash ({e}); from the repository root run "
                 f"`python -m pip install --no-deps --no-build-isolation -e .` first")

    set_hopper_floors(args.floors)
    args.backends_list = [b for b in _csv_list(args.backends) if b in BACKENDS]
    args.modes_list = [m for m in _csv_list(args.modes) if m in MODES]
    if args.dry_run:
        args.backends_list = [b for b in args.backends_list
                              if b in ("hf_flash", "hf_flash_packed", "math")]
    cases = select_cases(args)
    if not cases:
        sys.exit("bench_ops: no case selected")
    runner = Runner(args)
    meta = run_metadata(args)
    meta["hopper_floors"] = hopper_floors()
    meta["timing"] = dict(warmup_ms=runner.warmup, rep_ms=runner.rep, statistic="median",
                          l2="flushed by do_bench before each timed call",
                          flops="4*B*H*N*N*D, x0.5 causal; bwd x2.5, fwd+bwd x3.5")
    suite = "dry-run" if args.dry_run else args.suite
    # Split runs (one call per head dim, say) write separate files; plot.py merges them.
    parts = [f"ops_{suite}"]
    if args.head_dims and suite in ("sweep", "all"):
        parts.append("d" + "-".join(_csv_list(args.head_dims)))
    if args.variants and suite in ("sweep", "all"):
        parts.append("-".join(_csv_list(args.variants)))
    if args.tag:
        parts.append(args.tag)
    stem = "_".join(parts)
    out_dir = output_dir(args.out, args.dry_run)

    runner.ceil = runner.ceilings()
    meta["ceilings"] = runner.ceil
    if runner.ceil:
        print("ceilings: bf16 matmul {matmul_bf16_tflops:.0f} TFLOP/s, copy {copy_tbs:.2f} TB/s "
              "(read + write)".format(**runner.ceil), flush=True)
    rows, checks = [], []
    t_start = time.perf_counter()
    for case in cases:
        t_case = time.perf_counter()
        backends = [b for b in case.backends if b in args.backends_list]
        try:
            inp = runner.make_inputs(case)
        except Exception as e:  # the inputs themselves may not fit
            for b in backends:
                for m in case.modes:
                    if m in args.modes_list:
                        r = runner.base_row(case, b, m)
                        r["reason"] = f"inputs: {short_reason(e)}"
                        rows.append(r)
            runner.free()
            continue
        if "hf_flash" in backends and not args.no_check and time.perf_counter() < runner.deadline:
            try:
                checks.append(runner.check(case, inp))
            except Exception as e:
                checks.append({"case": case.name, "status": f"error: {short_reason(e)}"})
            runner.free()
        chk = next((c for c in checks if c["case"] == case.name), None)
        for b in backends:
            for r in runner.measure(case, b, inp):
                if b == "hf_flash" and chk is not None:
                    r["check"] = chk["status"]
                    r["check_max_ratio"] = chk.get("max_ratio")
                rows.append(r)
            runner.free()
        del inp
        runner.free()
        meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        meta["hf_flash_configs"] = _chosen_configs()
        meta["hf_flash_rejected_configs"] = _rejected_configs()
        write_results(out_dir, stem, meta, rows, {"checks": checks,
                                                  "cases": [asdict(c) for c in cases]})
        print(f"[{meta['elapsed_s']:7.1f}s] {case.name}: {time.perf_counter() - t_case:.1f}s",
              flush=True)
    print(f"\nresults: {out_dir / (stem + '.csv')} and .json; {meta.get('gpu')}, torch "
          f"{meta['torch']}, triton {meta['triton']}, git {meta['git_sha'][:12]}")
    print(summary(rows, checks, args.backends_list))
    for r in meta.get("hf_flash_rejected_configs", []):
        print(f"tuning skipped {r['kernel']} {r['config']}: its outputs disagreed with the default "
              f"config's ({r['constexprs']})")
    if any(c["status"] != "ok" for c in checks):
        sys.exit(1)  # a wrong kernel must not look like a successful run


if __name__ == "__main__":
    main()
