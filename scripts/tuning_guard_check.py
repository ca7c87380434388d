"""On a CUDA machine: does the tuner's output check skip the backward config that once computed
wrong dQ, (64 x 64, 8 warps, 3 stages)?

    python3 scripts/tuning_guard_check.py

Three fwd+bwd runs of B4 H16 N1024 D64 bf16 (the shape class the tuner had picked that config
for), each with tuning on and errors against SDPA in fp32: the shipped candidate list; that
config appended and ranked first (the guard must skip it, with a warning, if it is wrong); that
config forced past the guard. The last line says whether the guard was shown to work, which
needs the config to be wrong on this machine (docs/reliability.md).
"""
import warnings
import torch
import torch.nn.functional as F
from hf_flash import flash_attention
from hf_flash.kernels import _tuning, _backward
from hf_flash.kernels._common import cfg

torch.manual_seed(0)
B, H, N, D = 4, 16, 1024, 64
q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
do = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
ref = F.scaled_dot_product_attention(*(t.float() for t in (q, k, v)))
ref_g = torch.autograd.grad(ref, (q, k, v), do.float())

def run(label):
    _tuning._CHOSEN.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        o = flash_attention(q, k, v)
        g = torch.autograd.grad(o, (q, k, v), do)
    errs = [((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip((o,) + g, (ref,) + ref_g)]
    dq_cfg = [v_ for (n, _), v_ in _tuning.chosen_configs().items() if n == "dq"]
    print(f"{label}: rel err o/dq/dk/dv = " + " ".join(f"{e:.2e}" for e in errs)
          + f" | dq cfg {dq_cfg} | warnings {len([x for x in w if 'hf_flash: launch config' in str(x.message)])}")
    return errs

run("shipped list, tuning on")
bad = cfg(64, 64, 8, 3)
_backward._BWD_CONFIGS.append(bad)
orig = _tuning._first_that_agrees
def bad_first(kernel, reference, ranked, *a):
    if bad in ranked:
        ranked = [c for c in ranked if c == bad] + [c for c in ranked if c != bad]
    return orig(kernel, reference, ranked, *a)
_tuning._first_that_agrees = bad_first
errs = run("bad candidate ranked first, guard on")
print("rejected:", _tuning.rejected_configs())
_tuning._first_that_agrees = lambda kernel, reference, ranked, *a: bad if bad in ranked else ranked[0]
errs_forced = run("bad candidate forced, no guard")
print("GUARD", "OK" if errs[1] < 0.02 and errs_forced[1] > 0.1 and _tuning.rejected_configs() else "NOT SHOWN")
