"""The body of `python -m hf_flash demo` (see __main__.py)."""

import copy
import time

import torch

import hf_flash


def _configs(model: str, gpu: bool):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, GPT2Config
    if model == "bert":
        if gpu:  # BERT-large
            cfg = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             intermediate_size=4096)
            shape = (8, 512)
        else:
            cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=128)
            shape = (2, 24)
        return "BERT-large" if gpu else "tiny BERT", cfg, AutoModelForMaskedLM, shape
    if model == "gpt2":
        if gpu:  # GPT-2 medium
            cfg = GPT2Config(n_embd=1024, n_layer=24, n_head=16, n_positions=1024)
            shape = (8, 1024)
        else:
            cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                             bos_token_id=0, eos_token_id=0)
            shape = (2, 24)
        return "GPT-2 medium" if gpu else "tiny GPT-2", cfg, AutoModelForCausalLM, shape
    raise SystemExit(f"unknown demo model {model!r}; choose from bert, gpt2")


def _batch(cfg, shape, device):
    g = torch.Generator().manual_seed(0)
    b, n = shape
    ids = torch.randint(5, cfg.vocab_size, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    for i in range(b):  # a padded batch: every other sequence is shorter
        if i % 2:
            mask[i, n - n // 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


def _step(model, ids, mask, labels):
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out


def _time(model, ids, mask, labels, steps, device):
    model.train()
    for _ in range(2 if device == "cuda" else 1):  # warm-up (autotuning, first launches)
        _step(model, ids, mask, labels)
        model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        _step(model, ids, mask, labels)
        model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def run_demo(models, steps=None) -> int:
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    steps = steps or (10 if gpu else 1)
    print(f"hf_flash {hf_flash.__version__} demo on {torch.cuda.get_device_name() if gpu else 'CPU'}"
          f" ({dtype}; {'CUDA' if gpu else 'Triton interpreter: timings only show it runs'})")
    for name in models:
        title, cfg, auto, shape = _configs(name.strip(), gpu)
        # Dropout off for the parity check, so eager and hf_flash see the same computation.
        for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop",
                     "embd_pdrop", "attn_pdrop"):
            if hasattr(cfg, attr):
                setattr(cfg, attr, 0.0)
        torch.manual_seed(0)
        eager = auto.from_config(cfg, attn_implementation="eager").to(device, dtype)
        ids, mask, labels = _batch(cfg, shape, device)
        flash = hf_flash.patch(copy.deepcopy(eager))
        sdpa = copy.deepcopy(eager)
        sdpa.set_attn_implementation("sdpa")
        eager.eval()
        flash.eval()
        with torch.no_grad():
            a = eager(input_ids=ids, attention_mask=mask, labels=labels)
            b = flash(input_ids=ids, attention_mask=mask, labels=labels)
        real = mask.bool()
        diff = (a.logits.float() - b.logits.float())[real].abs().max().item()
        print(f"\n{title}: batch {shape[0]} x {shape[1]} tokens (padded), "
              f"{sum(p.numel() for p in eager.parameters()) / 1e6:.1f}M parameters")
        print(f"  parity vs eager: max |logits diff| {diff:.2e} at real tokens; "
              f"loss eager {a.loss.item():.5f}, hf_flash {b.loss.item():.5f}")
        times = {}
        for label, model in (("eager", eager), ("sdpa", sdpa), ("hf_flash", flash)):
            times[label] = _time(model, ids, mask, labels, steps, device)
        line = ", ".join(f"{k} {v:.1f} ms" for k, v in times.items())
        print(f"  train step (forward + backward), mean of {steps}: {line}")
        del eager, sdpa, flash
        if gpu:
            torch.cuda.empty_cache()
    return 0
