"""patch / unpatch / patched / explain, the registry, the mask forms, fallbacks, checkpoints."""

import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
from transformers.masking_utils import (bidirectional_mask_function, causal_mask_function,
                                        sliding_window_causal_mask_function)

import hf_flash
from hf_flash import _glue
from patch_utils import batch, build


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# ---------------------------------------------------------------- patch / unpatch / patched

def test_patch_unpatch_restore_exactly_and_patch_is_idempotent():
    model = build("gpt2").eval()
    before = model.config._attn_implementation
    classes = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert hf_flash.patch(model) is model
    assert hf_flash.patch(model) is model  # twice is harmless
    assert model.config._attn_implementation == hf_flash.ATTN_NAME and hf_flash.is_patched(model)
    hf_flash.unpatch(model)
    assert model.config._attn_implementation == before and not hf_flash.is_patched(model)
    assert [type(m) for m in model.modules()] == classes
    assert not any(hasattr(m, "_hf_flash_options") for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    hf_flash.unpatch(model)  # unpatching an unpatched model changes nothing
    assert model.config._attn_implementation == before


def test_gpt_neo_unpatch_restores_layer_classes():
    from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention
    model = build("gpt_neo")
    hf_flash.patch(model)
    assert all(type(m) is not GPTNeoSelfAttention for m in model.modules()
               if isinstance(m, GPTNeoSelfAttention))
    hf_flash.unpatch(model)
    layers = [m for m in model.modules() if isinstance(m, GPTNeoSelfAttention)]
    assert layers and all(type(m) is GPTNeoSelfAttention for m in layers)
    assert model.config._attn_implementation == "eager"


def test_patched_context_manager():
    model = build("bert")
    with hf_flash.patched(model, fallback="raise") as m:
        assert m is model and model.config._attn_implementation == hf_flash.ATTN_NAME
        assert model.bert.encoder.layer[0].attention.self._hf_flash_options["fallback"] == "raise"
    assert model.config._attn_implementation == "eager"
    # Inside an already patched model the context only swaps options, and leaves it patched.
    hf_flash.patch(model)
    with hf_flash.patched(model, fallback="raise"):
        pass
    assert hf_flash.is_patched(model)
    assert model.bert.encoder.layer[0].attention.self._hf_flash_options["fallback"] == "eager"


def test_bad_options_and_inputs_raise_clearly():
    model = build("bert")
    with pytest.raises(TypeError, match="unknown option.*'speed'"):
        hf_flash.patch(model, speed=3)
    with pytest.raises(ValueError, match="fallback must be one of"):
        hf_flash.patch(model, fallback="ignore")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf_flash.patch(torch.nn.Linear(2, 2))
    assert model.config._attn_implementation == "eager"  # untouched


def test_unsupported_layer_class_raises_before_touching_the_model():
    # GPT-Neo loaded with another implementation's layer class (e.g. flash-attn's) cannot be
    # patched: the error names the class, and nothing was changed.
    model = build("gpt_neo")
    layer = model.transformer.h[0].attn.attention
    layer.__class__ = type("OtherNeoAttention", (type(layer),), {})
    with pytest.raises(hf_flash.UnsupportedModelError, match="OtherNeoAttention"):
        hf_flash.patch(model)
    assert model.config._attn_implementation == "eager"
    assert type(layer).__name__ == "OtherNeoAttention"


def test_unknown_model_type_lists_supported():
    from transformers import PreTrainedConfig, PreTrainedModel

    class OddConfig(PreTrainedConfig):
        model_type = "odd_model"

    class OddModel(PreTrainedModel):
        config_class = OddConfig
        _can_set_attn_implementation_cached_value = False  # attention not via the interface

        def __init__(self, config):
            super().__init__(config)
            self.lin = torch.nn.Linear(2, 2)

    with pytest.raises(hf_flash.UnsupportedModelError) as err:
        hf_flash.patch(OddModel(OddConfig()))
    for t in ("bert", "roberta", "electra", "gpt2", "gpt_neo", "llama", "odd_model"):
        assert t in str(err.value)


def test_generic_family_serves_other_interface_models():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, initializer_range=0.2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    ids, mask, _ = batch("llama", "right")
    want = _logits(model, ids, mask)
    hf_flash.patch(model)
    rows = hf_flash.explain(model, file=open("/dev/null", "w"))
    assert rows and all(r["path"] == "hf_flash kernel" for r in rows)
    torch.testing.assert_close(_logits(model, ids, mask)[mask.bool()], want[mask.bool()],
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- checkpoints / from_pretrained

def test_save_pretrained_after_patch_loads_in_plain_transformers(tmp_path):
    model = hf_flash.patch(build("gpt2")).eval()
    ids, mask, _ = batch("gpt2", "right")
    want = _logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_flash.ATTN_NAME not in json.dumps(cfg)
    assert model.config._attn_implementation == hf_flash.ATTN_NAME  # saving did not unpatch
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert plain.config._attn_implementation == "eager"
    m = mask.bool()
    torch.testing.assert_close(_logits(plain, ids, mask)[m], want[m], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "gpt_neo"])
def test_from_pretrained_with_hf_flash_backend(tmp_path, name):
    model = build(name).eval()
    model.save_pretrained(tmp_path)
    auto = AutoModelForMaskedLM if name == "bert" else AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path, attn_implementation=hf_flash.ATTN_NAME).eval()
    assert loaded.config._attn_implementation == hf_flash.ATTN_NAME
    ids, mask, _ = batch(name, "right")
    got, want = _logits(loaded, ids, mask), _logits(model, ids, mask)
    assert all(r["path"] == "hf_flash kernel" for r in
               hf_flash.explain(loaded, file=open("/dev/null", "w")))
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)
    hf_flash.unpatch(loaded)
    assert loaded.config._attn_implementation != hf_flash.ATTN_NAME


# ---------------------------------------------------------------- fallback and explain

@pytest.mark.parametrize("name", ["bert", "gpt2", "gpt_neo"])
def test_output_attentions_falls_back_to_eager_with_one_warning(name):
    model = build(name).eval()
    ids, mask, _ = batch(name, "right")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    hf_flash.patch(model)
    _glue._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask, output_attentions=True)
            model(input_ids=ids, attention_mask=mask, output_attentions=True)
    msgs = [str(w.message) for w in caught if "hf_flash" in str(w.message)]
    assert len(msgs) == 1 and "output_attentions" in msgs[0], msgs
    assert len(got.attentions) == 2 and all(a is not None for a in got.attentions)
    for a, b in zip(got.attentions, want.attentions):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    rows = hf_flash.explain(model, file=open("/dev/null", "w"))
    assert all(r["last_call"][0] == "eager" for r in rows)
    # The next ordinary call is served by the kernel again.
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert all(r["last_call"][0] == "kernel" for r in
               hf_flash.explain(model, file=open("/dev/null", "w")))


def test_fallback_raise_option():
    model = hf_flash.patch(build("bert"), fallback="raise").eval()
    ids, mask, _ = batch("bert", "none")
    with pytest.raises(hf_flash.UnsupportedCallError, match="output_attentions"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)


def test_explain_reports_each_layer(capsys):
    model = build("gpt2")
    rows = hf_flash.explain(model)
    assert [r["path"] for r in rows] == ["not patched"] * 2
    hf_flash.patch(model)
    rows = hf_flash.explain(model)
    text = capsys.readouterr().out
    assert [r["layer"] for r in rows] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert all(r["path"] == "hf_flash kernel" and r["last_call"] is None for r in rows)
    assert "transformer.h.1.attn" in text and "scale" in text
    neo = hf_flash.explain(hf_flash.patch(build("gpt_neo")), file=open("/dev/null", "w"))
    assert "sliding window of 5" in neo[1]["mask"] and neo[0]["scale"] == 1.0


# Models whose configuration puts into every attention call something the kernel cannot serve,
# and one without (tiny configs; the generic family).
_CONFIGURED = {
    "gemma2": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, intermediate_size=64, vocab_size=64),
    "gpt_oss": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16, intermediate_size=32, vocab_size=64,
                    num_local_experts=2, num_experts_per_tok=1),
    "t5": dict(d_model=32, d_kv=16, num_layers=1, num_heads=2, d_ff=64, vocab_size=64),
    "qwen2": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=64, vocab_size=64),
    "mimo_v2_flash": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, v_head_dim=8,
                          intermediate_size=64, vocab_size=64),
}


@pytest.mark.parametrize("model_type", sorted(_CONFIGURED))
def test_explain_predicts_what_the_calls_then_take(model_type):
    # Soft-capping (Gemma 2), attention sinks (GPT-OSS), T5's position bias and a value head dim
    # of its own (MiMo-V2-Flash) are set by the configuration and reach every call: explain()
    # says eager before the model runs, as the calls then report; Qwen2 is served.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    seq2seq = model_type == "t5"
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    hf = auto.from_config(AutoConfig.for_model(model_type, **_CONFIGURED[model_type]))
    try:
        model = hf_flash.patch(hf)
    except hf_flash.UnsupportedModelError as e:
        # transformers releases whose T5 stacks cannot switch implementation (5.17): refused,
        # by name, rather than run with attention hf_flash does not serve.
        assert seq2seq and "could not switch T5Stack" in str(e), e
        return
    predicted = [r["path"] for r in hf_flash.explain(model.eval(), file=open("/dev/null", "w"))]
    ids = torch.randint(0, 64, (1, 6))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        model(input_ids=ids, **({"decoder_input_ids": ids} if seq2seq else {}))
    rows = hf_flash.explain(model, file=open("/dev/null", "w"))
    took = ["eager fallback" if r["last_call"][0] == "eager" else "hf_flash kernel" for r in rows]
    assert predicted == took
    assert set(took) == {"hf_flash kernel" if model_type == "qwen2" else "eager fallback"}


def test_a_bidirectional_mask_stays_bidirectional_under_a_causal_module():
    # Phi-4-multimodal's vision encoder asks for bidirectional masks from modules that say
    # is_causal=True; SDPA, handed the padded batch's 4-D mask, ignores the flag and so must we.
    # A BERT whose self-attention modules say the same stands in for it.
    model = build("bert").eval()
    for m in model.modules():
        if type(m).__name__ == "BertSelfAttention":
            m.is_causal = True
    ids, mask, _ = batch("bert", "right")
    want = _logits(model, ids, mask)
    got = _logits(hf_flash.patch(model), ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert all(r["last_call"] == ("kernel", "key padding")
               for r in hf_flash.explain(model, file=open("/dev/null", "w")))


# ---------------------------------------------------------------- the mask interface's choices

def _mask(**kw):
    base = dict(batch_size=2, q_length=5, kv_length=5, mask_function=causal_mask_function,
                attention_mask=None, device="cpu")
    return _glue.hf_flash_mask(**{**base, **kw})


def test_mask_forms():
    full = torch.ones(2, 5, dtype=torch.bool)
    right = full.clone()
    right[0, 3:] = False
    left = full.clone()
    left[1, :2] = False
    assert _mask() is None
    # An all-True mask is handed over as is: checking for "no padding" would cost a host sync.
    assert torch.equal(_mask(attention_mask=full), full)
    assert torch.equal(_mask(attention_mask=right), right)
    assert torch.equal(_mask(attention_mask=left), left)
    # KV cache: 1 new query after 4 cached keys, bottom-right aligned -> still cheap.
    cache_mask = torch.ones(2, 5, dtype=torch.bool)
    assert torch.equal(_mask(q_length=1, kv_length=5, q_offset=4, attention_mask=cache_mask),
                       cache_mask)
    # Bidirectional: cheap only when the caller allows skipping a materialised mask.
    # ... as a (batch, 1, 1, k_len) view: complete, so no module's is_causal can make it causal.
    bidi = _mask(mask_function=bidirectional_mask_function, allow_is_bidirectional_skip=True,
                 attention_mask=right)
    assert bidi.shape == (2, 1, 1, 5) and torch.equal(bidi[:, 0, 0], right)
    dense = _mask(mask_function=bidirectional_mask_function, attention_mask=right)
    assert dense.shape == (2, 1, 5, 5)
    # Anything unusual is dense and exact.
    for kw in (dict(mask_function=sliding_window_causal_mask_function(2), local_size=2),
               dict(allow_is_causal_skip=False),
               dict(q_length=3, kv_length=8, q_offset=0),  # static cache prefill: top-left
               dict(q_offset=torch.tensor(0))):
        m = _mask(**kw)
        assert m is not None and m.dim() == 4 and m.dtype == torch.bool, kw


def test_static_cache_prefill_mask_is_top_left():
    m = _mask(q_length=3, kv_length=8, q_offset=0)
    want = torch.arange(8)[None, :] <= torch.arange(3)[:, None]
    assert torch.equal(m[0, 0], want)


def test_kernel_mask_args_alignment():
    # A KV cache (q_len != k_len) is causal from the end; no CausalBias is built for it (one is a
    # dense (2, q_len, k_len) tensor).
    kw, detail = _glue.kernel_mask_args(None, True, 1, 6, 2)
    assert kw == dict(attn_mask=None, is_causal=True, causal_alignment="bottom_right",
                      key_padding_mask=None) and detail == "causal bottom-right, no mask"
    kw, _ = _glue.kernel_mask_args(None, True, 6, 6, 2)
    assert kw["is_causal"] is True and kw["causal_alignment"] == "top_left"
    kpm = torch.ones(2, 6, dtype=torch.bool)
    kw, _ = _glue.kernel_mask_args(kpm, False, 1, 6, 2)
    assert kw["is_causal"] is False and kw["key_padding_mask"] is kpm and kw["attn_mask"] is None
    with pytest.raises(ValueError, match="expected \\(batch, k_len\\)"):
        _glue.kernel_mask_args(torch.ones(2, 5, dtype=torch.bool), True, 6, 6, 2)
