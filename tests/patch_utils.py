"""Tiny models and comparison helpers shared by the test_patch*.py files.

Models are built with from_config (no downloads), two layers, hidden sizes of a few dozen: the
kernels run under Triton's interpreter on the CPU, where every program instance is Python.
"""

import copy

import torch
from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, ElectraConfig,
                          GPT2Config, GPTNeoConfig, LlamaConfig, MistralConfig, RobertaConfig)

import hf_flash

VOCAB = 96
PAD = 0


def _common(cfg):
    # Wider initial weights than the default 0.02: near-uniform attention would hide a wrong
    # scale or mask behind tiny differences.
    cfg.initializer_range = 0.2
    cfg.pad_token_id = PAD
    cfg.bos_token_id = cfg.eos_token_id = 1
    return cfg


def bert_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    return _common(BertConfig(**{**base, **kw}))


def roberta_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=48, max_position_embeddings=70, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    cfg = _common(RobertaConfig(**{**base, **kw}))
    cfg.pad_token_id = 1  # RoBERTa offsets positions by its pad id
    return cfg


def electra_config(**kw):
    base = dict(vocab_size=VOCAB, embedding_size=24, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=48, max_position_embeddings=64,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _common(ElectraConfig(**{**base, **kw}))


def gpt2_config(**kw):
    base = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _common(GPT2Config(**{**base, **kw}))


def gpt_neo_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                attention_types=[[["global", "local"], 1]], window_size=5,
                max_position_embeddings=64, resid_dropout=0.0, embed_dropout=0.0,
                attention_dropout=0.0)
    return _common(GPTNeoConfig(**{**base, **kw}))


def llama_config(**kw):
    # 4 query heads over 2 key/value heads: grouped-query attention.
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    return _common(LlamaConfig(**{**base, **kw}))


def mistral_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                sliding_window=4)
    return _common(MistralConfig(**{**base, **kw}))


# name -> (config factory, auto class, is decoder)
FAMILIES = {
    "bert": (bert_config, AutoModelForMaskedLM, False),
    "roberta": (roberta_config, AutoModelForMaskedLM, False),
    "electra": (electra_config, AutoModelForMaskedLM, False),
    "gpt2": (gpt2_config, AutoModelForCausalLM, True),
    "gpt_neo": (gpt_neo_config, AutoModelForCausalLM, True),
    "llama": (llama_config, AutoModelForCausalLM, True),
    "mistral": (mistral_config, AutoModelForCausalLM, True),
}


def build(name, seed=0, **config_kw):
    """An eager fp32 model of family `name`, deterministic weights."""
    make_config, auto, _ = FAMILIES[name]
    torch.manual_seed(seed)
    model = auto.from_config(make_config(**config_kw), attn_implementation="eager")
    return model.float()


def batch(name, padding, seed=1, batch_size=2, seq=11):
    """input_ids, attention_mask (long, 1 = real) and labels (-100 at padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, seq), generator=g)
    mask = torch.ones(batch_size, seq, dtype=torch.long)
    if padding == "right":
        mask[0, seq - 4:] = 0
    elif padding == "left":
        mask[0, :4] = 0
    elif padding != "none":
        raise ValueError(padding)
    pad_id = FAMILIES[name][0]().pad_token_id
    ids = ids.masked_fill(mask == 0, pad_id)
    labels = ids.masked_fill(mask == 0, -100)
    if padding == "left":
        # A causal LM predicts the first real token from the last pad position, whose attention
        # row is empty: eager spreads it uniformly over masked keys, hf_flash returns zeros.
        # Neither means anything, so that label is left out of the loss.
        labels[0, 4] = -100
    return ids, mask, labels


def run(model, ids, mask, labels, backward=True):
    """(logits, loss, {param name: grad}) of one forward (and backward) pass."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    grads = {}
    if backward:
        out.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                 if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def assert_ratio(name, got, eager32, ref64, where=None, floor_rel=1e-5):
    """error(hf_flash fp32 vs fp64 reference) <= 2 * error(eager fp32 vs fp64 reference) + floor.

    Both errors are measured against the same fp64 model, so the bound adapts to how hard
    each tensor is to compute in fp32; the floor (relative to the tensor's size) covers tensors
    that eager fp32 happens to get almost exactly, where 2x a tiny number is no margin at all.
    """
    if where is not None:
        got, eager32, ref64 = got[where], eager32[where], ref64[where]
    ref = ref64.double()
    err = (got.double() - ref).abs().max().item()
    base = (eager32.double() - ref).abs().max().item()
    floor = floor_rel * max(ref.abs().max().item(), 1e-3)
    assert err <= 2 * base + floor, (f"{name}: hf_flash error {err:.3e} > 2 x eager fp32 error "
                                     f"{base:.3e} + floor {floor:.1e}")


def compare_to_eager(name, model, ids, mask, labels, train=False, where=None, **patch_kw):
    """Patch a copy of `model` and hold its logits, loss and every gradient to the ratio rule."""
    ref_model = copy.deepcopy(model).double()
    if ref_model._supports_sdpa:
        # The fp64 reference runs SDPA's math path, which gives fully masked query rows (left
        # padding) zeros. Eager in fp64 turns them into NaN that then leaks into real positions
        # (Llama's eager softmax runs in fp32, where fp64's most negative mask value is -inf).
        ref_model.set_attn_implementation("sdpa")
    patched = copy.deepcopy(model)
    hf_flash.patch(patched, **patch_kw)
    for m in (model, ref_model, patched):
        m.train(train)
    ref = run(ref_model, ids, mask, labels)
    eager = run(model, ids, mask, labels)
    got = run(patched, ids, mask, labels)
    assert_ratio(f"{name} logits", got[0], eager[0], ref[0], where=where)
    assert_ratio(f"{name} loss", got[1], eager[1], ref[1])
    assert set(got[2]) == set(ref[2]), "patched model has gradients for different parameters"
    for pname in ref[2]:
        assert_ratio(f"{name} grad {pname}", got[2][pname], eager[2][pname], ref[2][pname])
    return patched
