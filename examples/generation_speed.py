"""Generation with the KV cache: prefill and decode time of eager, sdpa and hf_flash attention for a
batch of left-padded prompts, and a check that greedy decoding gives identical tokens in fp32.

One GPU (a Llama-style decoder built from its config, random weights: speed does not depend on what
the weights say; prompts are sentences of the repo's corpus sample, byte-level tokens):

    python examples/generation_speed.py --out runs/generation_speed

    python examples/generation_speed.py --arch gpt2 --batch 32 --prompt_len 1024 --new_tokens 256

CPU smoke run (2 layers, hidden 32, a few bytes of prompt; what tests/test_examples.py runs):

    python examples/generation_speed.py --tiny

What is timed: `model.generate(..., do_sample=False)` with transformers' default dynamic KV cache.
A logits processor stamps the clock (after a device synchronisation) each time generate hands it the
next-token scores: the first stamp closes the prefill (the forward over all prompts, with the cache
filled), the rest are decode steps (one token per sequence, reading the cache). Each backend gets one
untimed warm-up call (Triton compiles its kernels there), then the median of --repeats timed calls.
The fp32 check runs first, all backends on the same weights, and fails the run on any differing token.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, LogitsProcessor,
                          LogitsProcessorList)

import hf_flash

HERE = Path(__file__).resolve().parent

# ---- settings (the CLI overrides each) -------------------------------------------------------------
ARCH = "llama"
BACKENDS = ("eager", "sdpa", "hf_flash")
BATCH = 16
PROMPT_LEN = 512            # longest prompt in bytes; the others are shorter, hence left padding
NEW_TOKENS = 128
REPEATS = 5
DTYPE = "bf16"              # of the timed runs; the identity check is always fp32
PROMPTS = HERE / "mlperf_bert" / "sample" / "train.txt"
SEED = 0
# A model of a size people decode with on one GPU (~200M parameters at hidden 1024, 16 layers).
MODEL = dict(hidden=1024, layers=16, heads=16, kv_heads=4)
# An untrained model at the usual init (0.02) has near-uniform next-token scores, where rounding
# differences between correct backends could flip a greedy choice; wider weights make the arg-max
# margins large enough that identical tokens are the right expectation.
INIT_RANGE = 0.1

TINY = dict(hidden=32, layers=2, heads=2, kv_heads=2, batch=3, prompt_len=16, new_tokens=6, repeats=1)

# Byte-level tokens: 0-255 are bytes; no tokenizer files are needed.
PAD, BOS, EOS, VOCAB = 256, 257, 258, 259


def build_model(arch, hidden, layers, heads, kv_heads, max_len, seed):
    if hidden % heads or heads % kv_heads:
        raise SystemExit(f"hidden {hidden} must divide by heads {heads}, heads by kv_heads {kv_heads}")
    common = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=None,
                  initializer_range=INIT_RANGE)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, intermediate_size=hidden * 8 // 3,
                          max_position_embeddings=max_len, **common)
    elif arch == "gpt2":
        if kv_heads != heads:
            raise SystemExit("gpt2 has no grouped-query attention: --kv_heads must equal --heads")
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_len,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    else:
        raise SystemExit(f"unknown --arch {arch!r}; choose llama or gpt2")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def make_prompts(path, batch, prompt_len, seed):
    """Left-padded byte prompts of different lengths (prompt_len/4 .. prompt_len) from corpus lines."""
    if not path.is_file():
        raise SystemExit(f"prompt text {path} not found")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise SystemExit(f"{path} holds no text")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(batch):
        text = lines[i % len(lines)].encode("utf-8")
        while len(text) < prompt_len:  # short lines: continue with the next ones
            text += b" " + lines[(i + len(text)) % len(lines)].encode("utf-8")
        n = int(torch.randint(max(1, prompt_len // 4), prompt_len + 1, (), generator=g))
        rows.append([BOS] + list(text[:n - 1]))
    width = max(len(r) for r in rows)
    ids = torch.full((batch, width), PAD, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def switch(model, backend):
    """Put `backend` into `model` (hf_flash only through its public patch/unpatch)."""
    if hf_flash.is_patched(model):
        hf_flash.unpatch(model)
    if backend == "hf_flash":
        model.set_attn_implementation("eager")
        hf_flash.patch(model, fallback="raise")
    else:
        model.set_attn_implementation(backend)


class _Clock(LogitsProcessor):
    """Stamps the time whenever generate asks for next-token scores (after the forward made them)."""

    def __init__(self, device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def generate(model, ids, mask, new_tokens):
    clock = _Clock(ids.device)
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=PAD, logits_processor=LogitsProcessorList([clock]))
    prefill = clock.stamps[0] - start
    decode = clock.stamps[-1] - clock.stamps[0]
    return out[:, ids.shape[1]:], prefill, decode


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default=ARCH, choices=["llama", "gpt2"])
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated, from eager, sdpa, hf_flash; the first is the reference")
    p.add_argument("--batch", type=int)
    p.add_argument("--prompt_len", type=int)
    p.add_argument("--new_tokens", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv_heads", type=int)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help=f"of the timed runs (default {DTYPE} on a GPU, fp32 on the CPU)")
    p.add_argument("--prompts", type=Path, default=PROMPTS, help="text file, one sentence a line")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--out", type=Path, help="folder for result.json")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: 2 layers, hidden 32, short prompts")
    args = p.parse_args(argv)
    base = {**MODEL, "batch": BATCH, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
            "repeats": REPEATS, **(TINY if args.tiny else {})}
    for key in base:
        if getattr(args, key) is None:
            setattr(args, key, base[key])
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key} must be >= 1, got {getattr(args, key)}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = sorted(set(backends) - set(BACKENDS))
    if bad or not backends:
        raise SystemExit(f"unknown backend(s) {bad}; choose from {', '.join(BACKENDS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or (DTYPE if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]

    ids, mask = make_prompts(args.prompts, args.batch, args.prompt_len, args.seed)
    ids, mask = ids.to(device), mask.to(device)
    model = build_model(args.arch, args.hidden, args.layers, args.heads, args.kv_heads,
                        max_len=ids.shape[1] + args.new_tokens, seed=args.seed).to(device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 check means fp32, not TF32

    # 1. fp32: every backend must choose the same tokens as the first.
    tokens = {}
    for b in backends:
        switch(model, b)
        tokens[b] = generate(model, ids, mask, args.new_tokens)[0].cpu()
    ref = backends[0]
    for b in backends[1:]:
        diff = (tokens[b] != tokens[ref]).nonzero()
        if len(diff):
            row, col = diff[0].tolist()
            raise AssertionError(f"greedy tokens differ in fp32: {b} vs {ref}, sequence {row}, new token "
                                 f"{col}, at {len(diff)} positions in all")

    # 2. timing in the chosen dtype.
    model.to(dtype)
    timings = {}
    for b in backends:
        switch(model, b)
        generate(model, ids, mask, min(4, args.new_tokens))  # warm-up: compilation, allocator
        runs = [generate(model, ids, mask, args.new_tokens)[1:] for _ in range(args.repeats)]
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        steps = max(1, args.new_tokens - 1)
        timings[b] = {"prefill_ms": 1e3 * prefill, "decode_ms_per_step": 1e3 * decode / steps,
                      "decode_tokens_per_s": args.batch * steps / decode if decode > 0 else None}

    result = {"arch": args.arch, "dtype": dtype_name, "batch": args.batch,
              "prompt_tokens_max": int(ids.shape[1]), "prompt_tokens_min": int(mask.sum(1).min()),
              "new_tokens": args.new_tokens, "repeats": args.repeats,
              "parameters": sum(p.numel() for p in model.parameters()),
              "greedy_fp32_identical": True, "timings": timings,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__}
    print(f"{'backend':<10}{'prefill ms':>12}{'decode ms/step':>16}{'decode tok/s':>14}")
    for b, t in timings.items():
        tps = f"{t['decode_tokens_per_s']:.0f}" if t["decode_tokens_per_s"] else "-"
        print(f"{b:<10}{t['prefill_ms']:>12.2f}{t['decode_ms_per_step']:>16.3f}{tps:>14}")
    print(json.dumps(result), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
