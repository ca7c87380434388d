"""On-policy distillation against off-policy distillation, both models' attention in hf_flash
(or, with --attn, in transformers' eager or sdpa, to compare).

On-policy: the student samples completions of training prompts itself (generate, KV cache); the teacher
scores every token of them; the student minimises the per-token reverse KL to the teacher,
KL(student || teacher) summed over the vocabulary at each position it actually visited. Off-policy: the
teacher samples the completions and the student is trained on them by cross-entropy (supervised
fine-tuning on teacher samples). Both start from the same student weights and get the same compute in
the sense that matters for the comparison: the same number of optimizer steps, prompts per step and
sampled tokens per step. Their wall-clock times differ (who samples, whether the teacher also scores)
and are reported. The figure of merit is the student's per-token reverse KL to the teacher on held-out
prompts, measured on the student's own samples (the states it will visit when used).

No pretrained GPT weights exist offline, so the teacher is first trained on corpus text (byte-level
tokens) unless --teacher gives a causal LM folder with a byte vocabulary (>= 259 tokens, such as the
<out>/teacher folder this script saves). The student is smaller and gets a short
warm-up on the same text, so its first samples are text-like.

One GPU:

    python examples/onpolicy_distillation.py --out runs/distill

    python examples/onpolicy_distillation.py --teacher runs/distill/teacher --out runs/distill-2
    python examples/onpolicy_distillation.py --teacher runs/distill/teacher --attn sdpa --out runs/distill-sdpa

CPU smoke run (2-layer teacher, 1-layer student, hidden 32, 2 steps each; what tests/test_examples.py runs):

    python examples/onpolicy_distillation.py --tiny --out runs/distill-tiny
"""

import argparse
import copy
import json
import lzma
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_flash

HERE = Path(__file__).resolve().parent

# ---- settings (the CLI overrides each) -------------------------------------------------------------
TRAIN_TEXT = HERE / "mlperf_bert" / "sample" / "train.txt"
EVAL_TEXT = HERE / "mlperf_bert" / "sample" / "eval.txt"
TEACHER = dict(hidden=512, layers=8, heads=8)
STUDENT = dict(hidden=256, layers=4, heads=4)
TEACHER_STEPS = 2000        # next-byte training of the teacher on the text (skipped with --teacher)
WARMUP_STEPS = 200          # the same for the student, before the two methods branch
SEQ = 256                   # bytes per window when training on text
DISTILL_STEPS = 300         # per method
BATCH = 32                  # prompts per distillation step
PROMPT_LEN = 32             # bytes of text each completion continues
COMPLETION = 64             # sampled tokens per prompt
EVAL_PROMPTS = 128
ATTN = "hf_flash"           # both models' attention: hf_flash, sdpa or eager
LR = 1e-3
TEMPERATURE = 1.0           # sampling temperature of both methods (1: the models' own distributions)
SEED = 0

TINY = dict(t_hidden=32, t_layers=2, t_heads=2, s_hidden=32, s_layers=1, s_heads=2,
            teacher_steps=2, warmup_steps=1, seq=32, distill_steps=2, batch=2, prompt_len=4,
            completion=6, eval_prompts=2, lr=1e-2)

# Byte-level tokens: 0-255 are bytes.
PAD, BOS, EOS, VOCAB = 256, 257, 258, 259


def read_bytes(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise SystemExit(f"text file {path} not found")
    raw = lzma.open(path).read() if path.suffix == ".xz" else path.read_bytes()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def windows(data, length, n, g):
    """n random windows of `length` tokens from the text, each starting with BOS."""
    if len(data) <= length:
        raise SystemExit(f"text of {len(data)} bytes is shorter than a window of {length}")
    starts = torch.randint(0, len(data) - length, (n,), generator=g).tolist()
    body = torch.stack([data[s:s + length - 1] for s in starts])
    return torch.cat([torch.full((n, 1), BOS), body], dim=1)


def build(hidden, layers, heads, max_len, seed):
    if hidden % heads:
        raise SystemExit(f"hidden {hidden} must divide by heads {heads}")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads,
                      intermediate_size=hidden * 8 // 3, max_position_embeddings=max_len,
                      pad_token_id=PAD, bos_token_id=BOS, eos_token_id=None)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


def with_attention(model, attn):
    """`model` with its attention in `attn`: hf_flash through its patch, else transformers' own."""
    if attn == "hf_flash":
        return hf_flash.patch(model, fallback="raise")
    model.set_attn_implementation(attn)
    return model


def reverse_kl(student_logits, teacher_logits):
    """Per-position KL(student || teacher) over the vocabulary, shape (...,)."""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    return (log_s.exp() * (log_s - log_t)).sum(-1)


def sample(model, prompts, n_new, temperature, amp):
    """Completions sampled with the KV cache; returns prompts + completions."""
    model.eval()
    with torch.no_grad(), amp():
        return model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                              do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                              max_new_tokens=n_new, min_new_tokens=n_new, use_cache=True,
                              pad_token_id=PAD)


def completion_logits(model, seqs, prompt_len):
    """Logits predicting each completion token (positions prompt_len-1 .. end-1)."""
    return model(input_ids=seqs).logits[:, prompt_len - 1:-1]


def train_on_text(model, data, steps, seq, batch, lr, g, amp, device, what):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        x = windows(data, seq, batch, g).to(device)
        with amp():
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{what}: loss became {loss.item()} at step {step}")
        if (step + 1) % 100 == 0:
            print(f"{what} step {step + 1}: loss {loss.item():.3f} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return loss.item()


def distill(student, teacher, method, prompts_of, args, amp):
    """`method` is "on_policy" or "off_policy"; returns per-step losses and wall-clock seconds."""
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    losses = []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for step in range(args.distill_steps):
        prompts = prompts_of(step)
        if method == "on_policy":
            seqs = sample(student, prompts, args.completion, args.temperature, amp)
            with torch.no_grad(), amp():
                t_logits = completion_logits(teacher, seqs, args.prompt_len)
            student.train()
            with amp():
                s_logits = completion_logits(student, seqs, args.prompt_len)
            loss = reverse_kl(s_logits, t_logits).mean()
        else:
            seqs = sample(teacher, prompts, args.completion, args.temperature, amp)
            student.train()
            with amp():
                s_logits = completion_logits(student, seqs, args.prompt_len)
            loss = F.cross_entropy(s_logits.float().flatten(0, 1), seqs[:, args.prompt_len:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{method}: loss became {losses[-1]} at step {step}")
        if (step + 1) % 50 == 0:
            print(f"{method} step {step + 1}: loss {losses[-1]:.4f} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    sync()
    return losses, time.perf_counter() - t0


def held_out_kl(student, teacher, prompts, args, amp, seed):
    """Mean per-token KL(student || teacher) on completions the student samples for held-out prompts."""
    torch.manual_seed(seed)  # the same sampling randomness for every student evaluated
    total, count = 0.0, 0
    for chunk in prompts.split(args.batch):
        seqs = sample(student, chunk, args.completion, args.temperature, amp)
        with torch.no_grad(), amp():
            kl = reverse_kl(completion_logits(student, seqs, args.prompt_len),
                            completion_logits(teacher, seqs, args.prompt_len))
        total, count = total + kl.sum().item(), count + kl.numel()
    return total / count


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", type=Path, help="causal LM folder with a byte vocabulary; "
                   "default: train one on --train_text")
    p.add_argument("--train_text", type=Path, default=TRAIN_TEXT)
    p.add_argument("--eval_text", type=Path, default=EVAL_TEXT)
    ints = dict(t_hidden=TEACHER["hidden"], t_layers=TEACHER["layers"], t_heads=TEACHER["heads"],
                s_hidden=STUDENT["hidden"], s_layers=STUDENT["layers"], s_heads=STUDENT["heads"],
                teacher_steps=TEACHER_STEPS, warmup_steps=WARMUP_STEPS, seq=SEQ,
                distill_steps=DISTILL_STEPS, batch=BATCH, prompt_len=PROMPT_LEN,
                completion=COMPLETION, eval_prompts=EVAL_PROMPTS)
    for key in ints:
        p.add_argument(f"--{key}", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--attn", default=ATTN, choices=["hf_flash", "sdpa", "eager"])
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--out", type=Path, required=True, help="folder for teacher/ and result.json")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny models, 2 steps each")
    args = p.parse_args(argv)
    defaults = {**ints, "lr": LR, **(TINY if args.tiny else {})}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
        # warm-up and teacher steps may be 0; sizes and distillation steps may not
        low = 0 if key in ("teacher_steps", "warmup_steps") else 1
        if key != "lr" and getattr(args, key) < low:
            raise SystemExit(f"--{key} must be >= {low}, got {getattr(args, key)}")
    if args.temperature <= 0 or args.lr <= 0:
        raise SystemExit(f"--temperature and --lr must be > 0, got {args.temperature}, {args.lr}")
    if args.prompt_len < 2:
        raise SystemExit("--prompt_len must be >= 2 (BOS and at least one byte)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    g = torch.Generator().manual_seed(args.seed)
    train_data, eval_data = read_bytes(args.train_text), read_bytes(args.eval_text)
    max_len = max(args.seq, args.prompt_len + args.completion)
    timings = {}

    # 1. The teacher: given, or trained on the text; in --attn either way.
    t0 = time.perf_counter()
    if args.teacher:
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher, attn_implementation="eager")
        if teacher.config.vocab_size < VOCAB:
            raise SystemExit(f"--teacher has {teacher.config.vocab_size} tokens; byte-level text "
                             f"needs {VOCAB}")
        teacher = with_attention(teacher.to(device), args.attn)
    else:
        teacher = with_attention(build(args.t_hidden, args.t_layers, args.t_heads, max_len,
                                       args.seed).to(device), args.attn)
        # Its windows come from a generator of its own, so that the student's warm-up and the
        # prompts below are the same whether the teacher is trained here or given (--teacher).
        train_on_text(teacher, train_data, args.teacher_steps, args.seq, args.batch, args.lr,
                      torch.Generator().manual_seed(args.seed + 3), amp, device, "teacher")
        teacher.save_pretrained(args.out / "teacher")  # a normal checkpoint: patching leaves no trace
    teacher.eval().requires_grad_(False)
    timings["teacher_s"] = time.perf_counter() - t0

    # 2. The student's common starting point.
    student0 = with_attention(build(args.s_hidden, args.s_layers, args.s_heads, max_len,
                                    args.seed + 1).to(device), args.attn)
    train_on_text(student0, train_data, args.warmup_steps, args.seq, args.batch, args.lr, g, amp,
                  device, "student warm-up")

    # The same training prompts, in the same order, for both methods; held-out prompts from eval text.
    train_prompts = windows(train_data, args.prompt_len, args.batch * args.distill_steps, g).to(device)
    eval_prompts = windows(eval_data, args.prompt_len, args.eval_prompts, g).to(device)

    def prompts_of(step):
        return train_prompts[step * args.batch:(step + 1) * args.batch]

    result = {"attn": args.attn, "attn_implementation": teacher.config._attn_implementation,
              "teacher": str(args.teacher) if args.teacher else "trained here",
              "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
              "student_parameters": sum(p.numel() for p in student0.parameters()),
              "distill_steps": args.distill_steps, "prompts_per_step": args.batch,
              "completion_tokens": args.completion, "eval_prompts": args.eval_prompts,
              "kl_start": held_out_kl(student0, teacher, eval_prompts, args, amp, args.seed)}
    for method in ("on_policy", "off_policy"):
        student = copy.deepcopy(student0)
        if args.attn == "hf_flash" and not hf_flash.is_patched(student):
            hf_flash.patch(student, fallback="raise")  # the copy must run the original's attention
        torch.manual_seed(args.seed + 2)   # the same sampling randomness for both methods
        losses, seconds = distill(student, teacher, method, prompts_of, args, amp)
        result[method] = {"kl": held_out_kl(student, teacher, eval_prompts, args, amp, args.seed),
                          "wall_s": seconds, "losses": losses}
    result["setup_s"] = timings["teacher_s"]
    result["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"held-out per-token KL(student || teacher): start {result['kl_start']:.4f}, "
          f"on-policy {result['on_policy']['kl']:.4f} ({result['on_policy']['wall_s']:.1f} s), "
          f"off-policy {result['off_policy']['kl']:.4f} ({result['off_policy']['wall_s']:.1f} s)")
    print(json.dumps(result), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
