"""Patched vs eager: logits, loss and every parameter's gradient, for each registered family.

CPU, fp32, under Triton's interpreter. Tolerances follow the ratio rule (see
patch_utils.assert_ratio): hf_flash's error against an fp64 eager copy of the same model must be
at most twice eager fp32's own error, plus a small floor. At these sizes fp32 eager is nearly
exact, so the rule is tight; unlike a guessed atol it still scales on the GPU's bf16/fp16 runs.
"""

import pytest
import torch

import hf_flash
from patch_utils import FAMILIES, batch, build, compare_to_eager

ENCODERS = [n for n, (_, _, dec) in FAMILIES.items() if not dec]
DECODERS = [n for n, (_, _, dec) in FAMILIES.items() if dec]


def _cases():
    # Every family: no padding and padding (decoders pad left, as generation does). Train mode
    # (dropout 0, so comparable; dropout itself is tested by replay) once per distinct code path.
    for name in FAMILIES:
        pad = "left" if name in DECODERS else "right"
        yield name, "none", False
        yield name, pad, name in ("bert", "gpt2", "gpt_neo", "llama")
    yield "gpt2", "right", False


@pytest.mark.parametrize("name,padding,train", list(_cases()))
def test_family_parity(name, padding, train):
    model = build(name)
    ids, mask, labels = batch(name, padding)
    # Padded positions of a decoder have no keys at all with left padding: eager's output there
    # is meaningless, so logits are compared at real tokens only (the loss already skips them).
    compare_to_eager(name, model, ids, mask, labels, train=train, where=mask.bool())


@pytest.mark.parametrize("quirks", [
    dict(scale_attn_weights=False),
    dict(scale_attn_by_inverse_layer_idx=True),
    dict(reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True),
])
def test_gpt2_config_quirks(quirks):
    model = build("gpt2", **quirks)
    ids, mask, labels = batch("gpt2", "right")
    patched = compare_to_eager("gpt2", model, ids, mask, labels, where=mask.bool())
    # The quirk must reach the kernel: the scale each layer uses is what GPT-2 would use.
    head_dim = model.config.n_embd // model.config.n_head
    for i, block in enumerate(patched.transformer.h):
        expected = head_dim ** -0.5 if model.config.scale_attn_weights else 1.0
        if model.config.scale_attn_by_inverse_layer_idx:
            expected /= i + 1
        assert block.attn.scaling == pytest.approx(expected)


def test_gpt2_quirks_change_the_result():
    # Guards the quirk tests above against passing vacuously: each setting must change logits.
    ids, mask, _ = batch("gpt2", "none")
    outs = []
    for quirks in ({}, dict(scale_attn_weights=False), dict(scale_attn_by_inverse_layer_idx=True)):
        model = hf_flash.patch(build("gpt2", **quirks)).eval()
        with torch.no_grad():  # sharper attention, so the scale visibly matters
            for block in model.transformer.h:
                block.attn.c_attn.weight.mul_(3)
        with torch.no_grad():
            outs.append(model(input_ids=ids, attention_mask=mask).logits)
    assert (outs[0] - outs[1]).abs().max() > 1e-3
    assert (outs[0] - outs[2]).abs().max() > 1e-3


def test_gradient_checkpointing():
    for name, pad in (("bert", "right"), ("llama", "left")):
        model = build(name)
        model.gradient_checkpointing_enable()
        ids, mask, labels = batch(name, pad)
        compare_to_eager(name, model, ids, mask, labels, train=True, where=mask.bool())


def test_bert_decoder_with_cross_attention():
    # BERT as a decoder: causal self-attention, plus cross-attention over padded encoder states.
    model = build("bert", is_decoder=True, add_cross_attention=True)
    ids, mask, labels = batch("bert", "none")
    enc = torch.randn(2, 7, 32)
    enc_mask = torch.ones(2, 7, dtype=torch.long)
    enc_mask[1, 5:] = 0
    import copy
    ref = copy.deepcopy(model).eval()
    patched = hf_flash.patch(copy.deepcopy(model)).eval()
    kw = dict(input_ids=ids, attention_mask=mask, encoder_hidden_states=enc,
              encoder_attention_mask=enc_mask)
    with torch.no_grad():
        want = ref(**kw).logits
        got = patched(**kw).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    calls = {type(m).__name__: m._hf_flash_last_call for m in patched.modules()
             if hasattr(m, "_hf_flash_last_call")}
    # The all-ones mask is passed as key padding (no host sync to find out it has none).
    assert calls["BertSelfAttention"] == ("kernel", "causal, key padding")
    assert calls["BertCrossAttention"] == ("kernel", "key padding")
