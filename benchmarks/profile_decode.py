"""Where a decode step's time goes: one attention call of decode shape, then whole decode steps of
examples/generation_speed.py's model, for sdpa and hf_flash (and hf_flash_unfolded: hf_flash
without folding a decode step's grouped query heads into one program's rows, to measure the fold).

    python benchmarks/profile_decode.py --out benchmarks/results/h200

1. Op level: the call each layer makes in a decode step, as each backend receives it from
   transformers: one query row per sequence (the query a transposed view, as HF's layout gives)
   against a left-padded KV cache as long as the example's longest (its prompts plus 128 new
   tokens), 16 query heads on 4 KV heads, D64, bf16. sdpa gets what transformers' SDPA path
   passes with a padding mask (K/V repeated to every query head, a (batch, 1, 1, k_len) bool
   mask); hf_flash what its patch passes (causal, bottom-right aligned, the key padding mask,
   grouped heads). Host time is the mean time to queue a call; GPU kernel time and kernels per
   call come from torch.profiler's device events (copies and fills excluded).
2. Model level: the example's Llama-style model (bf16) prefills its left-padded prompts, then
   takes decode steps through forward() with the cache and position ids from the mask, as
   generate() does, without generate()'s own per-step work (logits processors, stopping checks).
   Each backend does this twice: first at cache lengths it has not met in this process, then
   again at the same lengths (cuDNN, which sdpa picks here, presumably builds and keeps a plan per
   new shape; hf_flash's kernels specialise only on lengths' divisibility by 16).
   Per step: host time to queue it (which includes any wait for the GPU inside it), time with a
   synchronise, GPU kernel time and kernels launched. The top host operators of each backend go
   to the JSON, and every GPU kernel of each profiled stretch by name (its calls and GPU time).

--dry-run: a tiny model on the CPU under Triton's interpreter (plumbing only; nothing is timed
that means anything, and there is no GPU time).
"""

import argparse
import contextlib
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
import benchlib  # noqa: E402
import generation_speed as gen  # noqa: E402

import hf_flash  # noqa: E402
from hf_flash.kernels import attention as hf_attention  # noqa: E402

FULL = dict(batch=gen.BATCH, prompt_len=gen.PROMPT_LEN, new_tokens=gen.NEW_TOKENS, steps=32,
            calls=200, **gen.MODEL)
TINY = dict(batch=2, prompt_len=12, new_tokens=4, steps=3, calls=3, hidden=32, layers=2, heads=4,
            kv_heads=2)
# hf_flash_unfolded: hf_flash with the grouped-head decode fold switched off, to measure the fold.
BACKENDS = ("sdpa", "hf_flash", "hf_flash_unfolded")


@contextlib.contextmanager
def _fold(backend):
    """The fold switch as `backend` wants it, restored afterwards."""
    before = hf_attention.FOLD_GROUPED_DECODE
    hf_attention.FOLD_GROUPED_DECODE = backend != "hf_flash_unfolded"
    try:
        yield
    finally:
        hf_attention.FOLD_GROUPED_DECODE = before


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def op_level(s, device, dtype, n_k):
    """Host and GPU microseconds per decode-shaped attention call, per backend."""
    B, H, KV, D = s["batch"], s["heads"], s["kv_heads"], s["hidden"] // s["heads"]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 1, H, D, generator=g).to(device, dtype).transpose(1, 2)
    k, v = (torch.randn(B, KV, n_k, D, generator=g).to(device, dtype) for _ in range(2))
    keep = torch.ones(B, n_k, dtype=torch.bool)
    for b in range(0, B, 2):  # every other sequence left-padded by a third of the keys
        keep[b, : n_k // 3] = False
    keep = keep.to(device)
    k_rep, v_rep = (t.repeat_interleave(H // KV, dim=1) for t in (k, v))
    calls = {
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k_rep, v_rep, attn_mask=keep[:, None, None, :]),
        "hf_flash": lambda: hf_flash.flash_attention(
            q, k, v, is_causal=True, causal_alignment="bottom_right", key_padding_mask=keep,
            enable_gqa=True),
    }
    calls["hf_flash_unfolded"] = calls["hf_flash"]
    rows, kernel_tops = [], {}
    for name, fn in calls.items():
        with torch.no_grad(), _fold(name):
            for _ in range(3):
                fn()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(s["calls"]):
                fn()
            host_us = (time.perf_counter() - t0) / s["calls"] * 1e6
            _sync(device)
            gpu_us, kernels, _, kernel_tops[f"{name}, op"] = _profile(
                lambda: [fn() for _ in range(s["calls"])], device)
            rows.append({"level": "op", "backend": name, "B": B, "H": H, "KV": KV, "n_k": n_k,
                         "D": D, "host_us_per_call": round(host_us, 1),
                         "gpu_kernel_us_per_call": None if gpu_us is None else round(gpu_us / s["calls"], 1),
                         "kernels_per_call": kernels / s["calls"]})
    return rows, kernel_tops


def _profile(step, device):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        _sync(device)
    events = prof.key_averages()
    # Device-side kernels only: copies and fills are not launches of either backend's attention.
    kernels = [e for e in benchlib.device_kernels(events)
               if not e.key.startswith(("Memcpy", "Memset"))]
    gpu_us = sum(e.self_device_time_total for e in kernels) if device.type == "cuda" else None
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    # Every kernel by name, so a change in the count or the GPU time can be traced to one.
    by_gpu = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)
    return gpu_us, sum(e.count for e in kernels), [
        {"op": e.key[:80], "calls": e.count, "self_cpu_us": round(e.self_cpu_time_total, 1)}
        for e in top], [
        {"kernel": e.key[:120], "calls": e.count, "gpu_us": round(e.self_device_time_total, 1)}
        for e in by_gpu]


def prompts(s, device):
    ids, mask = gen.make_prompts(gen.PROMPTS, s["batch"], s["prompt_len"], 0)
    return ids.to(device), mask.to(device)


def model_level(s, device, dtype, ids, mask):
    model = gen.build_model("llama", s["hidden"], s["layers"], s["heads"], s["kv_heads"],
                            max_len=ids.shape[1] + s["steps"] + 8, seed=0).to(device, dtype).eval()
    # The cache's keyword: `cache` in newer transformers, `past_key_values` (deprecated there) before.
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    rows, tops, kernel_tops = [], {}, {}
    # Two passes over the same prompts and steps: the first meets every cache length for the first
    # time in the process, the second again. If cuDNN builds an execution plan per new shape and
    # keeps it (as sdpa's host time suggests), sdpa's step depends on which pass it is;
    # generation_speed's repeats time the second kind.
    for name, visit in [(b, v) for b in BACKENDS for v in ("first", "again")]:
        gen.switch(model, "hf_flash" if name == "hf_flash_unfolded" else name)
        with torch.no_grad(), _fold(name):
            # Position ids from the mask, as generate() derives them (padding positions get 1).
            pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            cache, am = getattr(out, "cache", None) or out.past_key_values, mask
            nxt = out.logits[:, -1:].argmax(-1)
            host, synced = [], []

            def step():
                nonlocal out, am, pos, nxt
                am = torch.cat([am, am.new_ones(am.shape[0], 1)], dim=1)
                pos = pos[:, -1:] + 1
                out = model(input_ids=nxt, attention_mask=am, position_ids=pos, use_cache=True,
                            **{cache_kw: cache})
                nxt = out.logits[:, -1:].argmax(-1)

            for i in range(s["steps"]):
                _sync(device)
                t0 = time.perf_counter()
                step()
                t1 = time.perf_counter()
                _sync(device)
                if i >= 2:  # the first steps pay compiles and CUDA's first-use costs
                    host.append((t1 - t0) * 1e3)
                    synced.append((time.perf_counter() - t0) * 1e3)
            # One more step, profiled: a new length in the first pass, in the second the length
            # the first pass profiled.
            label = f"{name}, {visit} visit"
            gpu_us, kernels, tops[label], kernel_tops[label] = _profile(step, device)
        rows.append({"level": "model", "backend": name, "lengths": f"{visit} visit",
                     "batch": s["batch"], "layers": s["layers"],
                     "prompt_tokens_max": ids.shape[1], "host_ms_per_step": round(statistics.median(host), 3),
                     "ms_per_step": round(statistics.median(synced), 3),
                     "gpu_kernel_ms_per_step": None if gpu_us is None else round(gpu_us / 1e3, 3),
                     "kernels_per_step": kernels})
    gen.switch(model, "sdpa")  # leaves the model unpatched
    return rows, tops, kernel_tops


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: plumbing only")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("profile_decode.py needs a CUDA GPU (or --dry-run)")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    s = TINY if args.dry_run else FULL
    ids, mask = prompts(s, device)
    rows, kernel_tops = op_level(s, device, dtype, n_k=ids.shape[1] + s["new_tokens"])
    model_rows, tops, model_kernels = model_level(s, device, dtype, ids, mask)
    rows += model_rows
    kernel_tops.update(model_kernels)
    out = benchlib.output_dir(args.out, args.dry_run)
    stem = "decode_dry-run" if args.dry_run else "decode_profile"
    benchlib.write_results(out, stem, benchlib.run_metadata(args), rows,
                         {"top_host_ops": tops, "gpu_kernels": kernel_tops})
    print(benchlib.table(["backend", "host us/call", "GPU kernel us/call", "kernels/call"],
                         [[r["backend"], r["host_us_per_call"], r["gpu_kernel_us_per_call"],
                           r["kernels_per_call"]] for r in rows if r["level"] == "op"]))
    print()
    print(benchlib.table(["backend", "cache lengths", "host ms/step", "ms/step", "GPU kernel ms/step",
                          "kernels/step"],
                         [[r["backend"], r["lengths"], r["host_ms_per_step"], r["ms_per_step"],
                           r["gpu_kernel_ms_per_step"], r["kernels_per_step"]]
                          for r in rows if r["level"] == "model"]))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
