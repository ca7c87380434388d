"""LoRA with peft on a GPT-style decoder whose attention runs in hf_flash: train the adapter, save it,
load it again onto a fresh copy of the base model, check that nothing changed, and generate.

No pretrained GPT weights are available offline, so by default the base model is built from a config
(Llama-style or GPT-2) with random weights and the adapter learns what it can of the corpus text on
its own; --base takes any causal LM folder instead (for instance the teacher that
onpolicy_distillation.py saves). Text is byte-level (no tokenizer files), from the repo's corpus sample
or any text file given with --train_text / --eval_text (.xz is read too).

One GPU:

    python examples/lora_generate.py --out runs/lora

    python examples/lora_generate.py --base runs/distill/teacher --out runs/lora-on-teacher

CPU smoke run (2 layers, hidden 32, 3 steps; what tests/test_examples.py runs):

    python examples/lora_generate.py --tiny --out runs/lora-tiny

What it prints: the held-out loss (nats per byte) before and after training, the training losses,
whether the reloaded model gives bit-identical logits and the same greedy text, and the generated text.
"""

import argparse
import json
import lzma
import math
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import hf_flash

HERE = Path(__file__).resolve().parent

# ---- settings (the CLI overrides each) -------------------------------------------------------------
ARCH = "llama"
TRAIN_TEXT = HERE / "mlperf_bert" / "sample" / "train.txt"
EVAL_TEXT = HERE / "mlperf_bert" / "sample" / "eval.txt"
MODEL = dict(hidden=512, layers=8, heads=8)
SEQ = 256                   # bytes per training window
BATCH = 32
STEPS = 300
LR = 2e-3                   # LoRA trains few parameters, from B = 0: a larger rate than full fine-tuning
RANK = 16
ALPHA = 32
PROMPT = "And it came to pass"
NEW_TOKENS = 120
SEED = 0

TINY = dict(hidden=32, layers=2, heads=2, seq=32, batch=4, steps=3, rank=4, new_tokens=8, lr=1e-2)

# Byte-level tokens: 0-255 are bytes.
PAD, BOS, EOS, VOCAB = 256, 257, 258, 259
LORA_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "gpt2": ["c_attn", "c_proj", "c_fc"]}


def read_bytes(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise SystemExit(f"text file {path} not found")
    raw = lzma.open(path).read() if path.suffix == ".xz" else path.read_bytes()
    if len(raw) < 2:
        raise SystemExit(f"{path} holds no text")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def windows(data, seq, n, g):
    """n random windows of seq bytes, each after a BOS token."""
    if len(data) <= seq:
        raise SystemExit(f"text of {len(data)} bytes is shorter than a window of {seq}")
    starts = torch.randint(0, len(data) - seq, (n,), generator=g)
    body = torch.stack([data[s:s + seq - 1] for s in starts.tolist()])
    return torch.cat([torch.full((n, 1), BOS), body], dim=1)


def build_base(arch, hidden, layers, heads, max_len, seed):
    if hidden % heads:
        raise SystemExit(f"--hidden {hidden} must divide by --heads {heads}")
    common = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=heads, intermediate_size=hidden * 8 // 3,
                          max_position_embeddings=max_len, **common)
    else:
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_len,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


@torch.no_grad()
def mean_loss(model, batches):
    model.eval()
    return sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)


@torch.no_grad()
def greedy(model, prompt_ids, new_tokens):
    model.eval()
    out = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                         max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD)
    return out[:, prompt_ids.shape[1]:]


def decode(ids) -> str:
    return bytes(t for t in ids.tolist() if t < 256).decode("utf-8", errors="replace")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default=ARCH, choices=sorted(LORA_TARGETS))
    p.add_argument("--base", type=Path, help="causal LM folder with a byte-level vocabulary "
                   f"(>= {VOCAB} tokens); default: a random model from --arch's config")
    p.add_argument("--train_text", type=Path, default=TRAIN_TEXT)
    p.add_argument("--eval_text", type=Path, default=EVAL_TEXT)
    for key in ("hidden", "layers", "heads", "seq", "batch", "steps", "rank", "new_tokens"):
        p.add_argument(f"--{key}", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--out", type=Path, required=True, help="folder for base/, adapter/ and result.json")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: 2 layers, hidden 32, 3 steps")
    args = p.parse_args(argv)
    base_settings = {**MODEL, "seq": SEQ, "batch": BATCH, "steps": STEPS, "rank": RANK,
                     "new_tokens": NEW_TOKENS, "lr": LR, **(TINY if args.tiny else {})}
    for key, value in base_settings.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
        if getattr(args, key) <= 0:
            raise SystemExit(f"--{key} must be positive, got {getattr(args, key)}")
    if not args.prompt:
        raise SystemExit("--prompt must not be empty")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(args.seed)
    train_data, eval_data = read_bytes(args.train_text), read_bytes(args.eval_text)
    eval_batches = [windows(eval_data, args.seq, args.batch, g).to(device)
                    for _ in range(1 if args.tiny else 8)]

    # 1. The base model, patched, saved as a normal checkpoint (patching leaves no trace in it).
    if args.base:
        base = AutoModelForCausalLM.from_pretrained(args.base, attn_implementation="eager")
        if base.config.vocab_size < VOCAB:
            raise SystemExit(f"--base has {base.config.vocab_size} tokens; this example's byte-level "
                             f"text needs {VOCAB}")
    else:
        base = build_base(args.arch, args.hidden, args.layers, args.heads,
                          max(args.seq, len(args.prompt.encode()) + args.new_tokens + 1), args.seed)
    base.save_pretrained(args.out / "base")
    hf_flash.patch(base, fallback="raise")
    targets = [t for t in LORA_TARGETS.get(base.config.model_type, [])
               if any(n.endswith(t) for n, _ in base.named_modules())]
    if not targets:
        raise SystemExit(f"no LoRA target modules known for model type {base.config.model_type!r}; "
                         f"known: {sorted(LORA_TARGETS)}")

    # 2. LoRA on the patched model; only the adapter trains.
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                      target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora).to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = mean_loss(model, eval_batches)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=0.0)
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        model.train()
        batch = windows(train_data, args.seq, args.batch, g).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"loss became {losses[-1]} at step {step}")
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}: loss {losses[-1]:.3f}", flush=True)
    train_s = time.perf_counter() - t0
    after = mean_loss(model, eval_batches)

    # 3. Save the adapter only, load it onto a fresh copy of the base (patched again), compare.
    model.save_pretrained(args.out / "adapter")
    prompt_ids = torch.tensor([[BOS] + list(args.prompt.encode("utf-8"))], device=device)
    probe = eval_batches[0]
    with torch.no_grad():
        model.eval()
        logits = model(input_ids=probe).logits
    text_ids = greedy(model, prompt_ids, args.new_tokens)

    fresh = AutoModelForCausalLM.from_pretrained(args.out / "base", attn_implementation="eager")
    hf_flash.patch(fresh, fallback="raise")
    reloaded = PeftModel.from_pretrained(fresh, args.out / "adapter").to(device).eval()
    with torch.no_grad():
        logits2 = reloaded(input_ids=probe).logits
    text_ids2 = greedy(reloaded, prompt_ids, args.new_tokens)

    result = {"arch": base.config.model_type, "base": str(args.base) if args.base else "random init",
              "trainable_parameters": trainable,
              "parameters": sum(p.numel() for p in model.parameters()),
              "eval_loss_before": before, "eval_loss_after": after, "train_losses": losses,
              "train_s": train_s, "steps": args.steps,
              "reload_logits_max_abs_diff": (logits - logits2).abs().max().item(),
              "reload_same_text": torch.equal(text_ids, text_ids2),
              "prompt": args.prompt, "generated": decode(text_ids[0]),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    print(json.dumps(result), flush=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
