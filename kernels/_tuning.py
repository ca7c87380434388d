"""Config choice for the kernels: time the candidates once per shape class, then launch directly.

Triton's own autotuner spends ~100 us of Python per launch looking up its cache (measured on an
H100 host, Triton 3.6), which small attention calls cannot hide: a BERT-sized fwd+bwd launched
for 0.7 ms of host time against 0.45 ms of GPU time. This keeps one dict lookup per launch.
"""

import triton
import triton.testing

from . import _common

_CHOSEN: dict = {}


def launch(kernel, name, key, candidates, grid, args, constexprs):
    """Launch `kernel` with the best of `candidates` (dicts of BLOCK_M/BLOCK_N/num_warps/
    num_stages) for `key`; `grid(cfg)` gives the launch grid. Every output must be fully
    rewritten by each launch (true of all hf_flash kernels), so timing runs are harmless."""
    full_key = (name, key)
    cfg = _CHOSEN.get(full_key)
    if cfg is None:
        cfg = _pick(kernel, candidates, grid, args, constexprs) if _common.AUTOTUNE \
            else candidates[0]
        _CHOSEN[full_key] = cfg
    kernel[grid(cfg)](*args, **constexprs, **cfg)


def _pick(kernel, candidates, grid, args, constexprs):
    if len(candidates) == 1:
        return candidates[0]
    best, best_ms = None, float("inf")
    for cfg in candidates:
        try:
            ms = triton.testing.do_bench(lambda: kernel[grid(cfg)](*args, **constexprs, **cfg),
                                         warmup=5, rep=20, return_mode="median")
        except Exception as e:  # a config that does not fit this GPU (registers, shared memory)
            if "OutOfResources" in type(e).__name__ or "out of resource" in str(e).lower():
                continue
            raise
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"hf_flash: no launch config fits this GPU for {constexprs}")
    return best


def chosen_configs() -> dict:
    """What was picked so far, for benchmarks and debugging."""
    return dict(_CHOSEN)
