"""Model-level benchmark: HF training steps with eager, sdpa and hf_flash attention.

- train: BERT-large masked-LM (B32, N512, padded lengths uniform in [N/2, N]) and GPT-2-medium
  causal LM (B16, N1024); bf16 autocast, fused AdamW.
- long: GPT-2-small at context 4096, 8192 and 16384, batch 1 (n_positions raised in the config):
  how far each attention implementation gets on one GPU.

Models are built from configs (no downloads), with the same seed, so every implementation starts
from the same weights. Reported: median ms per step over the timed steps (CUDA events, after
warm-up), tokens/s, peak memory (max_memory_allocated over the timed steps: weights, gradients,
optimizer state and activations), the eval-mode loss on one batch (the implementations should
agree) and how many times each attention kernel ran in one forward pass (profiler), so an
hf_flash row whose kernel never ran cannot pass for a result. A run out of memory is recorded
as OOM. `host ms` is the median time the step's Python took to queue its work: near the step
time, the host is the bound. `--profile` adds the step's summed GPU kernel time, its top
kernels and the GPU's idle time between kernels with its longest waits (`gpu_idle` in the
JSON's profiles: a long wait after one kernel is a sync); `--compile` runs every model under
torch.compile.

On a CUDA machine, from the repository root (each fits in one 10-minute call):

    python -m pip install -q --no-deps --no-build-isolation -e .
    python benchmarks/bench_models.py --suite train --out benchmarks/results
    python benchmarks/bench_models.py --suite long  --out benchmarks/results

Anywhere, to test the plumbing with tiny models on the CPU (kernels under Triton's interpreter):

    python benchmarks/bench_models.py --dry-run
"""

import argparse
import gc
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (add_hopper_floors_arg, device_kernels, hopper_floors, idle_gaps,  # noqa: E402
                      output_dir, parse_hopper_floors, run_metadata, set_hopper_floors,
                      short_reason, table, write_results)

# ---------------------------------------------------------------------------------------------
# Settings
IMPLS = ("sdpa", "hf_flash", "eager")  # eager last: an OOM there must not fragment the others
BERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, max_position_embeddings=512)
GPT2_MEDIUM = dict(n_embd=1024, n_layer=24, n_head=16, n_positions=1024)
GPT2_SMALL = dict(n_embd=768, n_layer=12, n_head=12)
LONG_CONTEXTS = (4096, 8192, 16384)
MLM_PROB = 0.15
LR = 1e-4
WARMUP_STEPS, TIMED_STEPS = 3, 10
QUICK_WARMUP_STEPS, QUICK_TIMED_STEPS = 2, 5
DEFAULT_BUDGET_S = 520


class NotAvailable(Exception):
    """A run that cannot exist (not a failure): recorded as n/a with the reason."""


def runs_for(args):
    """(suite, label, family, config overrides, batch, seq len, padded) per model run."""
    if args.dry_run:
        tiny_bert = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=128, vocab_size=1000)
        tiny_gpt2 = dict(n_embd=64, n_layer=2, n_head=2, n_positions=128, vocab_size=1000,
                         bos_token_id=0, eos_token_id=0)
        runs = [("dry-run", "bert_tiny_mlm", "bert", tiny_bert, 2, 64, True),
                ("dry-run", "gpt2_tiny_lm", "gpt2", tiny_gpt2, 2, 64, False)]
    else:
        runs = []
        if args.suite in ("train", "all"):
            runs += [("train", "bert_large_mlm_b32_n512_padded", "bert", BERT_LARGE, 32, 512, True),
                     ("train", "gpt2_medium_lm_b16_n1024", "gpt2", GPT2_MEDIUM, 16, 1024, False)]
        if args.suite in ("long", "all"):
            for n in (args.contexts or LONG_CONTEXTS):
                runs.append(("long", f"gpt2_small_lm_b1_n{n}", "gpt2",
                             dict(GPT2_SMALL, n_positions=n), 1, n, False))
    wanted = [m for m in args.models.split(",") if m.strip()]
    if wanted:
        runs = [r for r in runs if any(m in r[1] for m in wanted)]
    return runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="HF training steps: eager vs sdpa vs hf_flash attention.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", choices=("train", "long", "all"), default="train",
                   help="train: BERT-large MLM and GPT-2-medium; long: GPT-2-small at 4k-16k")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--contexts", default="", help="long-context lengths, comma-separated")
    p.add_argument("--models", default="",
                   help="only runs whose model name contains one of these comma-separated strings")
    p.add_argument("--quick", action="store_true", help="fewer warm-up and timed steps")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 5 with --quick)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default 3; 2 with --quick")
    p.add_argument("--patch-kwargs", default="",
                   help="JSON options for hf_flash.patch(); adds an 'hf_flash+opts' run, e.g. "
                        "for a packed-token (unpadded) mode")
    p.add_argument("--out", default="benchmarks/results", help="folder for CSV and JSON")
    p.add_argument("--time-budget", type=float, default=DEFAULT_BUDGET_S,
                   help="seconds; runs past it are recorded as skipped, results stay written")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="appended to the output file names")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every model (inductor; aot_eager in a dry run): fewer "
                        "host launches and fused element-wise work, the usual answer to a "
                        "host-bound step; the first warm-up step pays the compilation")
    p.add_argument("--profile", action="store_true",
                   help="also profile one step: GPU kernel time against the step's time (is it "
                        "bound by the GPU or by the host?), the kernels that take the most, and "
                        "where the GPU waited between kernels")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny models on the CPU, kernels under TRITON_INTERPRET=1, fp32; "
                        "tests the plumbing, timings are meaningless")
    p.add_argument("--flattened", action="store_true",
                   help="adds an 'hf_flash+flat' run of BERT: the padded batch's real tokens "
                        "flattened into one row, as transformers' DataCollatorWithFlattening("
                        "return_flash_attn_kwargs=True) hands them over (position_ids, "
                        "cu_seq_lens_q/k, max_length_q/k); the padding never reaches the model")
    add_hopper_floors_arg(p, "e.g. fused=1024 for GPT-2-medium's step on the fused backward")
    args = p.parse_args(argv)
    args.floors = parse_hopper_floors(p, args.hopper_floors)
    args.contexts = [int(x) for x in args.contexts.split(",") if x.strip()]
    args.impl_list = [x for x in args.impls.split(",") if x.strip()]
    unknown = set(args.impl_list) - set(IMPLS)
    if unknown:
        p.error(f"unknown impls {sorted(unknown)}; choose from {IMPLS}")
    args.patch_opts = json.loads(args.patch_kwargs) if args.patch_kwargs else None
    return args


def flatten(batch, max_length):
    """A padded BERT batch's real tokens as one row of a batch of one, in the form transformers'
    DataCollatorWithFlattening(return_flash_attn_kwargs=True) gives a padding-free batch:
    positions restart at 0 for every sequence, cu_seq_lens_q/k hold the sequences' boundaries and
    no attention mask is passed. The labels are kept as they are (the collator would also blank
    each sequence's first label, a causal LM's separator; BERT's MLM labels need no separator).
    max_length_q/k is the padded length, a bound, rather than the batch's longest: the kernels'
    grids are sized by it, and a constant keeps the compiled graph the same from batch to batch."""
    import torch
    keep = batch["attention_mask"].bool()
    lengths = keep.sum(1)
    positions = torch.arange(keep.shape[1]).expand_as(keep)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    out = {k: batch[k][keep][None] for k in ("input_ids", "token_type_ids", "labels")}
    out.update(position_ids=positions[keep][None], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
               max_length_q=max_length, max_length_k=max_length)
    return out


# ---------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        import torch
        self.torch = torch
        self.args = args
        self.device = "cpu" if args.dry_run else "cuda"
        self.warmup = args.warmup_steps if args.warmup_steps is not None else (
            1 if args.dry_run else QUICK_WARMUP_STEPS if args.quick else WARMUP_STEPS)
        self.steps = args.steps if args.steps is not None else (
            2 if args.dry_run else QUICK_TIMED_STEPS if args.quick else TIMED_STEPS)
        self.deadline = time.perf_counter() + args.time_budget
        self.profiles = {}  # "model impl" -> top kernels and GPU waits of one profiled step

    def free(self):
        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def autocast(self):
        # The CPU dry run stays in fp32: Triton's interpreter computes bf16 wrongly.
        if self.device == "cpu":
            return nullcontext()
        return self.torch.autocast("cuda", dtype=self.torch.bfloat16)

    # -- models and batches ----------------------------------------------------------------------
    def build(self, family, overrides, impl, patch_opts):
        """Returns (model, how hf_flash was put in or '')."""
        from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig,
                                  GPT2Config)
        cfg = (BertConfig if family == "bert" else GPT2Config)(**overrides)
        auto = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
        how = ""
        load_impl = impl if impl in ("eager", "sdpa") else "sdpa"
        if impl.startswith("hf_flash") and (patch_opts or {}).get("packed"):
            import hf_flash
            packable = {t for f in hf_flash.supported_models() if f.get("packed")
                        for t in f["model_types"]}
            if cfg.model_type not in packable:
                raise NotAvailable(f"packed=True is not available for {cfg.model_type} models "
                                   f"(hf_flash.supported_models(): {', '.join(sorted(packable))})")
        model = self.from_config(auto, cfg, load_impl)
        if impl.startswith("hf_flash"):
            import hf_flash
            opts = dict(patch_opts or {})
            if hasattr(hf_flash, "patch"):
                # fallback="raise": a call the kernel cannot serve must fail here, not quietly
                # run eager attention under the hf_flash label.
                try:
                    hf_flash.patch(model, fallback="raise", **opts)
                    how = "patch(" + ", ".join(f"{k}={v!r}" for k, v in
                                               dict(fallback="raise", **opts).items()) + ")"
                except TypeError:
                    if "fallback" in opts:
                        raise
                    hf_flash.patch(model, **opts)
                    how = f"patch({opts})"
            else:
                name = getattr(hf_flash, "ATTN_NAME", "hf_flash")
                model = self.from_config(auto, cfg, name)
                how = f"attn_implementation={name!r}"
        model.train()
        return model, how

    def from_config(self, auto, cfg, attn_implementation):
        torch = self.torch
        torch.manual_seed(self.args.seed)  # same initial weights for every implementation
        try:
            # Built on the device: initialising BERT-large on the CPU takes seconds per run.
            with torch.device(self.device):
                return auto.from_config(cfg, attn_implementation=attn_implementation)
        except torch.OutOfMemoryError:
            raise
        except Exception:
            torch.manual_seed(self.args.seed)
            return auto.from_config(cfg, attn_implementation=attn_implementation).to(self.device)

    def batch(self, family, cfg_vocab, B, N, padded, flat=False):
        torch = self.torch
        g = torch.Generator().manual_seed(self.args.seed + 1)
        ids = torch.randint(1000 if cfg_vocab > 2000 else 5, cfg_vocab, (B, N), generator=g)
        if family == "gpt2":
            ids = ids.to(self.device)
            return dict(input_ids=ids, labels=ids), B * N
        mask = torch.ones(B, N, dtype=torch.long)
        if padded:
            lengths = torch.randint(N // 2, N + 1, (B,), generator=g)
            mask = (torch.arange(N)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)  # BERT's [PAD] is id 0
        pick = (torch.rand(B, N, generator=g) < MLM_PROB) & (mask == 1)
        labels = torch.where(pick, ids, torch.full_like(ids, -100))
        ids = ids.masked_fill(pick, 103 if cfg_vocab > 103 else 1)  # [MASK]
        batch = dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                     labels=labels)
        if flat:
            batch = flatten(batch, N)
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        if flat and self.args.compile:
            # The row's length is the batch's count of real tokens: a dynamic size, as in
            # training, where every batch has its own count (not one graph per count).
            for k in ("input_ids", "token_type_ids", "position_ids", "labels"):
                torch._dynamo.mark_dynamic(batch[k], 1)
        return batch, int(mask.sum())

    # -- measurement ---------------------------------------------------------------------------
    def kernel_calls(self, model, batch) -> dict:
        """How many attention kernels one eval forward pass launches, by op name: proves which
        implementation actually ran."""
        torch = self.torch
        with torch.no_grad(), self.autocast():
            return self.count_calls(lambda: model(**batch))

    def count_calls(self, fn) -> dict:
        """Attention calls, by implementation, in what fn() runs (CPU-side profiler events)."""
        from torch.profiler import ProfilerActivity, profile

        from hf_flash.kernels._op import NO_GRAD_EVENT
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
            self.sync()
        counts = {"hf_flash_calls": 0, "hf_flash_op_calls": 0, "sdpa_calls": 0,
                  "nonzero_calls": 0}
        backends = 0  # SDPA's backend ops: what a compiled graph calls instead of the front op
        for evt in prof.key_averages():
            # Eager calls go through the autograd Function (or, with no gradient to track, carry
            # the no-grad event), compiled ones through the custom op.
            if evt.key in ("hf_flash::attention_forward", "_FlashAttention", NO_GRAD_EVENT):
                counts["hf_flash_calls"] += evt.count
            if evt.key == "hf_flash::attention_forward":
                counts["hf_flash_op_calls"] += evt.count
            elif evt.key == "aten::nonzero":  # the packed encoder's rows to keep
                counts["nonzero_calls"] += evt.count
            elif evt.key == "aten::scaled_dot_product_attention":
                counts["sdpa_calls"] += evt.count
            elif (evt.key.startswith("aten::_scaled_dot_product_")
                  and not evt.key.endswith("_backward")):
                backends += evt.count
        counts["sdpa_calls"] = counts["sdpa_calls"] or backends
        return counts

    def profile_step(self, step, top_n=15):
        """(summed GPU kernel ms of one step, top kernels, the GPU's waits: benchlib.idle_gaps).

        If the kernel time is well under the step time the step is bound by the host (Python and
        launches), and making kernels faster or the batch smaller will not show."""
        from torch.profiler import ProfilerActivity, profile
        self.sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
        with profile(activities=acts) as prof:
            step()
            self.sync()
        kernels = []
        for evt in device_kernels(prof.key_averages()):
            us = getattr(evt, "self_device_time_total", None)
            if us is None:  # older torch
                us = evt.self_cuda_time_total
            kernels.append((us / 1e3, evt.count, evt.key[:120]))
        kernels.sort(reverse=True)
        total = sum(k[0] for k in kernels)
        top = [dict(ms=round(ms, 3), calls=n, kernel=name) for ms, n, name in kernels[:top_n]]
        # And the GPU's waits between kernels: a step whose kernels sum to less than its time
        # either waits on the host throughout or stalls at a few points (a sync).
        timeline = [(e.time_range.start, e.time_range.end, e.name)
                    for e in device_kernels(prof.events())]
        return (total if self.device == "cuda" else None), top, idle_gaps(timeline)

    def run_one(self, suite, label, family, overrides, B, N, padded, impl, patch_opts):
        torch = self.torch
        row = dict(suite=suite, model=label, impl=impl, how="", B=B, N=N, padded=padded,
                   status="n/a", ms_step=None, ms_step_min=None, tokens_s=None,
                   real_tokens_s=None, peak_gib=None, eval_loss=None, hf_flash_calls=None,
                   sdpa_calls=None, params_m=None, host_ms=None, gpu_kernel_ms=None,
                   gpu_idle_ms=None, compiled=bool(self.args.compile), reason="")
        if time.perf_counter() > self.deadline:
            row["reason"] = "skipped: time budget"
            return row
        model = opt = None
        try:
            model, row["how"] = self.build(family, overrides, impl, patch_opts)
            row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
            vocab = model.config.vocab_size
            flat = impl == "hf_flash+flat"
            if flat and family != "bert":
                raise NotAvailable("--flattened is a BERT (masked-LM) run")
            batch, real_tokens = self.batch(family, vocab, B, N, padded, flat)
            # Eval mode (no dropout): the implementations should give the same loss.
            model.eval()
            with torch.no_grad(), self.autocast():
                row["eval_loss"] = float(model(**batch).loss)
            row.update(self.kernel_calls(model, batch))
            model.train()
            try:
                opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
            except (RuntimeError, TypeError):  # fused not built for this device
                opt = torch.optim.AdamW(model.parameters(), lr=LR)

            # The eval-mode checks above ran uncompiled (eval mode would be a graph of its own).
            run = model
            if self.args.compile:
                run = torch.compile(model, backend="aot_eager" if self.args.dry_run else "inductor")

            def step():
                opt.zero_grad(set_to_none=True)
                with self.autocast():
                    loss = run(**batch).loss
                loss.backward()
                opt.step()

            t = time.perf_counter()
            for _ in range(self.warmup):
                step()
            self.sync()
            row["warmup_s"] = round(time.perf_counter() - t, 2)  # compilation included
            if self.args.compile:
                # The compiled training step must run the same kernels (calls by the custom op).
                # Only the custom op counts: a graph break around attention would run the eager
                # autograd Function inside a "compiled" step.
                compiled = self.count_calls(step)
                row["compiled_hf_flash_calls"] = compiled["hf_flash_op_calls"]
                row["compiled_eager_hf_flash_calls"] = (compiled["hf_flash_calls"]
                                                        - compiled["hf_flash_op_calls"])
                row["compiled_sdpa_calls"] = compiled["sdpa_calls"]
                row["compiled_packings"] = compiled["nonzero_calls"]
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times, host = [], []
            for _ in range(self.steps):
                if self.device == "cuda":
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    t = time.perf_counter()
                    step()
                    host.append((time.perf_counter() - t) * 1e3)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    t = time.perf_counter()
                    step()
                    times.append((time.perf_counter() - t) * 1e3)
                    host.append(times[-1])
            ms = statistics.median(times)
            # host_ms: how long step() took to return, i.e. to queue the step's work. Near the
            # step time, the host is the bound (or the launch queue was full: the GPU kernel sum
            # of --profile tells the two apart); well under it, the GPU is.
            row.update(status="ok", ms_step=ms, ms_step_min=min(times),
                       host_ms=statistics.median(host),
                       tokens_s=B * N / (ms * 1e-3), real_tokens_s=real_tokens / (ms * 1e-3))
            if self.device == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if self.args.profile:
                row["gpu_kernel_ms"], top, idle = self.profile_step(step)
                row["gpu_idle_ms"] = idle["idle_ms"] if self.device == "cuda" else None
                self.profiles[f"{label} {impl}"] = {"top_kernels": top, "gpu_idle": idle}
            if impl.startswith("hf_flash") and not row["hf_flash_calls"]:
                row.update(status="FAIL", reason="hf_flash's kernel did not run in the forward pass")
            if impl.startswith("hf_flash") and self.args.compile and (
                    not row["compiled_hf_flash_calls"] or row["compiled_eager_hf_flash_calls"]):
                row.update(status="FAIL", reason="the compiled step did not run hf_flash's kernel "
                                                 "as its custom op in every layer (graph break?)")
            if (self.args.compile and (patch_opts or {}).get("packed")
                    and not row["compiled_packings"]):
                row.update(status="FAIL", reason="the compiled step did not pack its tokens")
        except NotAvailable as e:  # an option of --patch-kwargs this model's family lacks
            row["reason"] = str(e)
        except Exception as e:
            oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
            # SDPA may have no kernel for a case; hf_flash failing on one is a failure.
            failed = "FAIL" if impl.startswith("hf_flash") else "n/a"
            row.update(status="OOM" if oom else failed, reason=short_reason(e))
        finally:
            # step() holds the model (and run, its compiled wrapper): all must go to free memory.
            model = opt = run = step = None
            if self.args.compile:
                torch._dynamo.reset()  # a fresh cache per run: no recompile limits carried over
            self.free()
        return row


def summary(rows) -> str:
    body = []
    for r in rows:
        ok = r["status"] == "ok"
        body.append([r["model"], r["impl"], r["status"],
                     f"{r['ms_step']:.1f}" if ok else "",
                     f"{r['tokens_s']:.0f}" if ok else "",
                     f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "",
                     f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else "",
                     "" if r.get("hf_flash_calls") is None else
                     f"{r['hf_flash_calls']}/{r['sdpa_calls']}",
                     "" if r.get("host_ms") is None else f"{r['host_ms']:.1f}",
                     "" if r.get("gpu_kernel_ms") is None else f"{r['gpu_kernel_ms']:.1f}"])
    out = [table(["model", "impl" + (" (compiled)" if rows and rows[0].get("compiled") else ""),
                  "status", "ms/step", "tokens/s", "peak GiB", "eval loss", "hf/sdpa calls",
                  "host ms", "GPU kernel ms"], body)]
    for r in rows:
        if r["status"] != "ok" and r["reason"]:
            out.append(f"{r['status']} {r['model']} {r['impl']}: {r['reason'][:200]}")
    return "\n".join(out)


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before hf_flash defines its kernels
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("bench_models: no CUDA device; use --dry-run for the CPU plumbing test")
    bench = Bench(args)
    meta = run_metadata(args)
    if args.floors:
        set_hopper_floors(args.floors)
        meta["hopper_floors"] = hopper_floors()
    meta["timing"] = dict(warmup_steps=bench.warmup, timed_steps=bench.steps, statistic="median",
                          precision="fp32 (dry run)" if args.dry_run else "bf16 autocast",
                          optimizer="AdamW fused", lr=LR,
                          compiled=("torch.compile, " + ("aot_eager" if args.dry_run else "inductor"))
                          if args.compile else False)
    if args.compile and (args.patch_opts or {}).get("packed"):
        # Compiled, the packed encoder traces its packing (a data-dependent count of rows) only
        # with this option; without it the encoder would run padded (patches/bert.py).
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        meta["timing"]["capture_dynamic_output_shape_ops"] = True
    suite = "dry-run" if args.dry_run else args.suite
    stem = (f"models_{suite}" + ("_compiled" if args.compile else "")
            + (f"_{args.tag}" if args.tag else ""))
    out_dir = output_dir(args.out, args.dry_run)

    impls = [(i, None) for i in args.impl_list]
    if args.patch_opts is not None:
        impls.append(("hf_flash+opts", args.patch_opts))
    if args.flattened:
        impls.append(("hf_flash+flat", None))
    rows = []
    t0 = time.perf_counter()
    for suite_name, label, family, overrides, B, N, padded in runs_for(args):
        for impl, opts in impls:
            t = time.perf_counter()
            rows.append(bench.run_one(suite_name, label, family, overrides, B, N, padded, impl,
                                      opts))
            meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
            write_results(out_dir, stem, meta, rows,
                          {"profiles": bench.profiles} if bench.profiles else None)
            print(f"[{meta['elapsed_s']:7.1f}s] {label} {impl}: {rows[-1]['status']} "
                  f"({time.perf_counter() - t:.1f}s)", flush=True)
    print(f"\nresults: {out_dir / (stem + '.csv')} and .json; {meta.get('gpu')}, torch "
          f"{meta['torch']}, transformers {meta['transformers']}, git {meta['git_sha'][:12]}")
    print(summary(rows))
    if any(r["status"] == "FAIL" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
