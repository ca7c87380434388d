"""Host (Python) cost of one attention call, with GPU work made negligible.

    python benchmarks/profile_host.py

Prints microseconds per call for the public function and for a bare kernel launch, then the top
host functions of fwd+bwd by own time (cProfile, after warm-up so compilation is excluded).
"""

import cProfile
import pstats
import time

import torch

import hf_flash


def per_call_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def main():
    q, k, v = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            hf_flash.flash_attention(q, k, v)

    def fwd_bwd():
        hf_flash.flash_attention(q, k, v).backward(do)

    def sdpa_fwd_bwd():
        torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(do)

    print(f"flash_attention fwd:      {per_call_us(fwd):8.1f} us/call (host)")
    print(f"flash_attention fwd+bwd:  {per_call_us(fwd_bwd):8.1f} us/call (host)")
    print(f"SDPA fwd+bwd:             {per_call_us(sdpa_fwd_bwd):8.1f} us/call (host)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        fwd_bwd()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
