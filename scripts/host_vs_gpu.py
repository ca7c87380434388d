"""On a CUDA machine: is an op-level timing the GPU's or the host's?

    python3 scripts/host_vs_gpu.py

The bar's two short cases (BERT-large B32 H16 N512 D64; GPT-2 B16 H16 N1024 D64 causal),
bf16, hf_flash and SDPA's cudnn backend, forward and forward+backward, each timed three ways:
- do_bench: triton.testing.do_bench median, as benchmarks/bench_ops.py times (gradients reset
  each call); "again x3": the median of three more do_bench runs without the reset, so the
  gradients accumulate (one add per input more);
- host: microseconds to queue one call, calls back to back with a sync after every 60
  (min/median of 5 rounds; gradients accumulate);
- graph replay: do_bench of the call captured in a CUDA graph, i.e. GPU time with no host work
  (gradients accumulate).
When host exceeds graph replay plus do_bench's ~60 us L2 flush, do_bench times the host.
(Where the host time goes: benchmarks/profile_host.py, which also times a bare
autograd.Function for comparison.)
"""
import statistics
import time

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import hf_flash


def host_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n // 5):
            fn()
        out.append((time.perf_counter() - t) / (n // 5) * 1e6)
        torch.cuda.synchronize()
    return min(out), statistics.median(out)


def graph_ms(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=10, rep=40, return_mode="median")


def main():
    for name, (B, H, N, D, causal) in {"bert": (32, 16, 512, 64, False),
                                       "gpt2": (16, 16, 1024, 64, True)}.items():
        torch.manual_seed(0)
        q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
                       for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        impls = {"hf_flash": lambda: hf_flash.flash_attention(q, k, v, is_causal=causal),
                 "cudnn": cudnn}
        for impl, f in impls.items():
            f().backward(do)  # tunes / compiles
            for mode, fn in (("fwd", f), ("fwd+bwd", lambda: f().backward(do))):
                for t in (q, k, v):
                    t.grad = None
                db = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median",
                                             grad_to_none=[q, k, v])
                again = statistics.median(triton.testing.do_bench(fn, warmup=10, rep=40,
                                                                  return_mode="median")
                                          for _ in range(3))
                lo, med = host_us(fn)
                gm = graph_ms(fn)
                print(f"{name:5s} {impl:9s} {mode:8s} do_bench {db:.3f} ms (again x3 median "
                      f"{again:.3f}) | host {lo:.0f}/{med:.0f} us per call (min/median) | "
                      f"graph replay {gm:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
