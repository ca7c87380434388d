"""Host (Python) cost of one attention call, with GPU work made negligible.

    python benchmarks/profile_host.py                    # on a GPU: small fwd and fwd+bwd calls
    python benchmarks/profile_host.py --decode           # on a GPU: a decode step's layer call
    python benchmarks/profile_host.py [--decode] --stub-launch   # any machine, no GPU needed
    python benchmarks/profile_host.py --gluon            # on an H100/H200: a call the Gluon kernels serve

The small case prints microseconds per call for the public function, for a bare
autograd.Function that launches nothing (the floor of any Python autograd op) and for SDPA, then
the top host functions of fwd+bwd by own time (cProfile, after warm-up so compilation is excluded).

--decode times the call a decode step makes in every layer, entered where transformers enters it
(the attention-interface function, hf_flash_attention): one query row per sequence as a
transposed view, 16 query heads on 4 KV heads, a 603-key cache with a 2-D key padding mask,
bottom-right causal, under no_grad; the shape of examples/generation_speed.py's decode.

--gluon times a fwd+bwd long enough for the Gluon kernels (B1 H1 N4096 D64, bf16: the Gluon
forward, and the fused or dkdv backward by the installed Triton), whose GPU work (~40 us) stays
under its host time; with and without plans, as the small case.

--stub-launch runs either case on the CPU under Triton's interpreter with the kernel launch replaced by
what the direct launch path does before it hands the arguments to Triton's compiled launcher
(config look-up, grid, specialisation key, cache look-up): the Python of the call path alone,
without the launcher's own C cost (~10-20 us on a GPU host). Figures are min and median of 7
rounds of 2000 calls, so a busy machine shows as a spread, not a slower min.
"""

import argparse
import cProfile
import os
import pstats
import statistics
import time


def rounds_us(fn, sync, n=2000, reps=7):
    for _ in range(50):
        fn()
    sync()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t) / n * 1e6)
        sync()
    return min(out), statistics.median(out)


def stub_launch(tuning):
    def launch(kernel, name, key, candidates, grid, tensors, scalars, constexprs, outputs=()):
        cfg = tuning._CHOSEN.get((name, key))
        if cfg is None:
            cfg = tuning._CHOSEN[(name, key)] = candidates()[0]
        grid(cfg)
        spec = tuning._spec_key(tensors, scalars)
        tuning._COMPILED.get((name, key, 0, spec, *constexprs.values()))
        return lambda tensors: None  # what a plan repeats: a launcher (here launching nothing)
    return launch


def bare_function(torch):
    """The floor of a Python autograd op: an autograd.Function shaped like hf_flash's (saves
    q, k, v, out and stats; returns out and an lse view) that allocates its outputs and
    launches nothing. What a fwd+bwd costs above it is hf_flash's own host path."""
    class Bare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            o = torch.empty_like(q)
            stats = q.new_empty((*q.shape[:2], 3, q.shape[2]), dtype=torch.float32)
            ctx.save_for_backward(q, k, v, o, stats)
            return o, stats[:, :, 0]

        @staticmethod
        def backward(ctx, do, dlse):
            q, k, v, _, _ = ctx.saved_tensors
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    return Bare


def decode_case(torch, device):
    from hf_flash import _glue

    class Layer(torch.nn.Module):
        is_causal = True

    B, H, H_KV, N_K, D = 16, 16, 4, 603, 64
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(B, 1, H, D, device=device, dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(B, H_KV, N_K, D, device=device, dtype=dtype) for _ in range(2))
    mask = torch.ones(B, N_K, dtype=torch.bool, device=device)
    mask[: B // 2, : N_K // 3] = False  # left padding
    layer = Layer()

    def call():
        with torch.no_grad():
            _glue.hf_flash_attention(layer, q, k, v, mask, dropout=0.0, scaling=D ** -0.5)

    def sdpa():
        with torch.no_grad():
            kk, vv = (t.repeat_interleave(H // H_KV, dim=1) for t in (k, v))
            torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask[:, None, None])

    return call, sdpa


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decode", action="store_true", help="a decode step's per-layer call")
    p.add_argument("--stub-launch", action="store_true",
                   help="CPU, Triton's interpreter, kernel launch stubbed: the Python path only")
    p.add_argument("--gluon", action="store_true",
                   help="on an sm_90 GPU: a fwd+bwd the Gluon kernels serve (B1 H1 N4096 D64)")
    p.add_argument("--profile", action="store_true", help="also print the top functions (cProfile)")
    args = p.parse_args()
    if args.stub_launch:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton defines the kernels
    import torch

    import hf_flash
    from hf_flash.kernels import _tuning

    device = "cpu" if args.stub_launch else "cuda"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if args.stub_launch:
        _tuning.launch = stub_launch(_tuning)
    if args.decode:
        call, sdpa = decode_case(torch, device)
        lo, med = rounds_us(call, sync)
        print(f"hf_flash decode layer call: {lo:8.1f} us min, {med:8.1f} median (host)")
        if not args.stub_launch:
            lo, med = rounds_us(sdpa, sync)
            print(f"SDPA, K/V repeated, bool mask: {lo:5.1f} us min, {med:8.1f} median (host)")
        hot = call
    else:
        dtype = torch.float32 if args.stub_launch else torch.bfloat16
        n = 4096 if args.gluon else 128
        q, k, v = (torch.randn(1, 1, n, 64, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        do = torch.randn_like(q)
        if args.gluon:
            from hf_flash.kernels import _backward_hopper, _forward_hopper
            fwd_gluon = _forward_hopper.eligible(q, k, v, None, None, 0.0, False, False, 0, 0.125)
            bwd = _backward_hopper.route(q, k, v, q, do, k, v, None, None, 0.0, False, False, 0,
                                         0.125)
            print(f"Gluon forward: {'yes' if fwd_gluon else 'no'}; backward route: "
                  f"{bwd or 'Triton kernels'}")

        def fwd():
            with torch.no_grad():
                hf_flash.flash_attention(q, k, v)

        def fwd_bwd():
            hf_flash.flash_attention(q, k, v).backward(do)

        def sdpa_fwd_bwd():
            torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(do)

        bare = bare_function(torch)

        def bare_fwd_bwd():
            bare.apply(q, k, v)[0].backward(do)

        def without_plans(fn):
            def call():
                _tuning.USE_PLANS = False
                try:
                    fn()
                finally:
                    _tuning.USE_PLANS = True
            return call

        cases = [("flash_attention fwd", fwd), ("flash_attention fwd+bwd", fwd_bwd),
                 ("  the same without plans", without_plans(fwd_bwd)),
                 ("bare Function fwd+bwd", bare_fwd_bwd)]
        if not args.stub_launch:  # on the CPU SDPA would compute for real
            cases.append(("SDPA fwd+bwd", sdpa_fwd_bwd))
        for name, fn in cases:
            lo, med = rounds_us(fn, sync, n=300)
            print(f"{name + ':':28s}{lo:8.1f} us min, {med:8.1f} median (host)")
        hot = fwd_bwd
    if args.profile or not args.decode:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            hot()
        prof.disable()
        sync()
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(22)
        # hf_flash's own frames, whatever their share: the call path the repeated calls took.
        stats.sort_stats("cumulative").print_stats(r"hf_flash|kernels[/\\]|patches[/\\]", 25)


if __name__ == "__main__":
    main()
