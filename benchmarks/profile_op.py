"""Where one attention call's time goes: GPU time per kernel and host time per call.

    python benchmarks/profile_op.py --case bert     # B32 H16 N512 D64, fwd+bwd, bf16
    python benchmarks/profile_op.py --case gpt2 --padded --dropout 0.1
    HF_FLASH_HOPPER_KPM=1 python benchmarks/profile_op.py --padded --dropout 0.1 --hopper-floors fused=512

When the host time per call exceeds the summed GPU time, the op is launch-bound at that size.
"""

import argparse
import time

import torch

import hf_flash
from benchlib import add_hopper_floors_arg, parse_hopper_floors, set_hopper_floors

CASES = {"bert": (32, 16, 512, 64, False), "gpt2": (16, 16, 1024, 64, True),
         "long": (4, 32, 4096, 128, False), "n16k": (1, 16, 16384, 64, False)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="bert", choices=sorted(CASES))
    ap.add_argument("--padded", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--iters", type=int, default=20)
    add_hopper_floors_arg(ap, "e.g. fused=512 to put BERT's row on the fused backward")
    a = ap.parse_args()
    set_hopper_floors(parse_hopper_floors(ap, a.hopper_floors))
    B, H, N, D, causal = CASES[a.case]
    q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               .requires_grad_() for _ in range(3))
    kpm = None
    if a.padded:
        lens = torch.randint(N // 2, N + 1, (B,), device="cuda")
        kpm = torch.arange(N, device="cuda")[None, :] < lens[:, None]
    do = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)

    def step():
        o = hf_flash.flash_attention(q, k, v, is_causal=causal, key_padding_mask=kpm,
                                     dropout_p=a.dropout)
        o.backward(do)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.iters):
        step()
    host_ms = (time.perf_counter() - t) * 1e3 / a.iters  # includes queueing; sync at end only
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t) * 1e3 / a.iters
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(a.iters):
            step()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.key_averages():
        if getattr(e, "is_user_annotation", False):
            continue  # a record_function range on the GPU timeline, not a kernel (benchlib)
        if e.device_type == torch.autograd.DeviceType.CUDA or getattr(e, "device_time_total", 0):
            t_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t_us:
                rows[e.key] = t_us / a.iters
    gpu_ms = sum(rows.values()) / 1e3
    print(f"case={a.case} padded={a.padded} dropout={a.dropout}: wall {wall_ms:.3f} ms/call, "
          f"host {host_ms:.3f} ms/call, GPU {gpu_ms:.3f} ms/call")
    for name, us in sorted(rows.items(), key=lambda x: -x[1])[:8]:
        print(f"  {us / 1e3:8.3f} ms  {name[:90]}")


if __name__ == "__main__":
    main()
