"""The fused backward's gradients under key padding and dropout (HF_FLASH_HOPPER_KPM), per batch
entry, against Triton's kernels and against the float64 reference.

    python benchmarks/kpm_dq_probe.py          # an H100 or H200 with Gluon; about a minute
    python benchmarks/kpm_dq_probe.py --shorts 1,65 --ps 0.1

For batches like tests/test_hopper_backward.py's key-padding tests, with the lone short entry at
several lengths (1, 2, 64, 65 real keys: one key, a few, half a 128-key block, just past it),
prints each entry's largest dQ, dK and dV difference of the fused route against Triton's kernels
and of each against the float64 reference (with the call's keep mask replayed), with dropout 0.1
and without. It is what showed that on the one-key entry with dropout Triton's kernels, not the
fused route, are the ones off (docs/perf-notes.md, "key padding's dQ failure explained").
"""

import argparse

import torch

import hf_flash
from benchlib import set_hopper_floors
from hf_flash.kernels import _backward_hopper, dropout_mask, dropout_seed, reference_attention


def grads(q, k, v, do, w, fa, call_seed):
    for t in (q, k, v):
        t.grad = None
    torch.manual_seed(call_seed)
    out, lse = hf_flash.flash_attention(q, k, v, enable_gqa=True, return_lse=True, **fa)
    ((out * do).sum() + (lse * w).sum()).backward()
    return [t.grad.float().clone() for t in (q, k, v)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shorts", default="1,2,64,65", help="real keys of the short entry")
    ap.add_argument("--ps", default="0.1,0.0", help="dropout probabilities")
    a = ap.parse_args()
    # Every length on the Gluon routes; the fused one with key padding and dropout.
    set_hopper_floors({"fwd": 1, "dkdv": 1, "fused": 1})
    _backward_hopper.KEY_PADDING = _backward_hopper.DROPOUT = _backward_hopper.FUSED = True
    B, H, H_KV, N_Q, N_K, D = 4, 8, 4, 1500, 1700, 64
    torch.manual_seed(13)
    q = torch.randn(B, H, N_Q, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, H_KV, N_K, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    do = torch.randn_like(q)
    w = torch.randn(B, H, N_Q, device="cuda")
    for short in (int(x) for x in a.shorts.split(",")):
        lengths = torch.tensor([N_K, 900, short, 1337])
        kpm = (torch.arange(N_K)[None, :] < lengths[:, None]).to("cuda")
        for p in (float(x) for x in a.ps.split(",")):
            fa = {"dropout_p": p, "key_padding_mask": kpm}
            got = {}
            for enabled in (True, False):
                _backward_hopper.ENABLED = enabled
                got["fused" if enabled else "triton"] = grads(q, k, v, do, w, fa, 2)
            torch.manual_seed(2)
            keep = dropout_mask(dropout_seed("cuda"), p, B, H, N_Q, N_K) if p > 0 else None
            leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
            o, lse = reference_attention(*leaves, kpm=kpm, dropout_p=p, keep_mask=keep)
            ((o * do.double()).sum() + (lse * w.double()).sum()).backward()
            ref = [t.grad for t in leaves]
            print(f"lengths {lengths.tolist()} p={p}", flush=True)
            for name, i in (("dq", 0), ("dk", 1), ("dv", 2)):
                cells = []
                for e in range(B):
                    f, t, r = got["fused"][i][e], got["triton"][i][e], ref[i][e].float()
                    cells.append(f"{(f - t).abs().max().item():.1e}/{(f - r).abs().max().item():.1e}"
                                 f"/{(t - r).abs().max().item():.1e}")
                print(f"  {name} per entry, |fused-triton|/|fused-ref|/|triton-ref|: "
                      + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
