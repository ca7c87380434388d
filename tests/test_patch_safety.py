"""Patching as an operation on a live model: refusals leave it untouched, patching mid-training
keeps the optimizer's view of the parameters, patched models copy and pickle, two patched models
keep their own options (even when built on one config object), and every refusal names the
argument and what it accepts.
"""

import copy
import io
import pickle
import re
import warnings

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right
from transformers import BertForMaskedLM, PreTrainedConfig, PreTrainedModel

import hf_flash
from conftest import run_fresh
from hf_flash import _glue
from hf_flash._registry import Family
from patch_utils import FAMILIES, assert_ratio, batch, bert_config, build


def _logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def _paths(model):
    return [r["path"] for r in hf_flash.explain(model, file=io.StringIO())]


def _last_calls(model):
    return [r["last_call"][0] for r in hf_flash.explain(model, file=io.StringIO())]


# ---------------------------------------------------------------- refusals touch nothing

class _NoInterfaceConfig(PreTrainedConfig):
    model_type = "hf_flash_safety_no_interface"


class _NoInterfaceModel(PreTrainedModel):
    """A model whose attention transformers cannot redirect (its class says so)."""

    config_class = _NoInterfaceConfig
    _can_set_attn_implementation_cached_value = False

    def __init__(self, config):
        super().__init__(config)
        self.lin = torch.nn.Linear(2, 2)


class _NoInterfaceBert(BertForMaskedLM):
    # A BERT whose class cannot switch attention implementations: the bert family's check refuses.
    _can_set_attn_implementation_cached_value = False


def _fingerprint(model):
    """Everything a failed patch could have changed: module classes and attributes, parameter
    objects, the state dict's bytes, and every config's attributes (the attention implementation
    included)."""
    configs, seen = [], set()
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and id(m.config) not in seen:
            seen.add(id(m.config))
            configs.append(copy.deepcopy(m.config.__dict__))
    return {
        "modules": [(n, type(m), sorted(vars(m))) for n, m in model.named_modules()],
        "params": [(n, id(p)) for n, p in model.named_parameters()],
        "state": {k: (v.dtype, tuple(v.shape), v.detach().numpy().tobytes())
                  for k, v in model.state_dict().items()},
        "configs": configs,
    }


def _unknown_model_type():
    return _NoInterfaceModel(_NoInterfaceConfig()), {}


def _bert_without_interface():
    torch.manual_seed(0)
    return _NoInterfaceBert(bert_config()), {}


def _gpt_neo_foreign_layer():
    model = build("gpt_neo")
    layer = model.transformer.h[1].attn.attention
    layer.__class__ = type("OtherNeoAttention", (type(layer),), {})
    return model, {}


def _submodel_that_cannot_switch():
    # The BERT itself switches, then the nested model refuses: patch has already changed the
    # BERT's config when it raises, so this exercises the roll-back, not just the early checks.
    model = build("bert")
    model.extra = _NoInterfaceModel(_NoInterfaceConfig())
    return model, {}


def _bad_option_on_patched_model():
    # Already patched with fallback="raise": a bad re-patch must keep those options.
    return hf_flash.patch(build("gpt2"), fallback="raise"), {"fallback": "sometimes"}


@pytest.mark.parametrize("make,exc,words", [
    (_unknown_model_type, hf_flash.UnsupportedModelError, "hf_flash_safety_no_interface"),
    (_bert_without_interface, hf_flash.UnsupportedModelError, "AttentionInterface"),
    (_gpt_neo_foreign_layer, hf_flash.UnsupportedModelError, "OtherNeoAttention"),
    (_submodel_that_cannot_switch, hf_flash.UnsupportedModelError, "_NoInterfaceModel"),
    (_bad_option_on_patched_model, ValueError, "fallback"),
], ids=["unknown-type", "bert-no-interface", "gpt-neo-foreign-layer", "submodel-cannot-switch",
        "bad-option-when-patched"])
def test_refused_patch_leaves_the_model_byte_identical(make, exc, words):
    model, options = make()
    was_patched = hf_flash.is_patched(model)
    before = _fingerprint(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc, match=re.escape(words)):
            hf_flash.patch(model, **options)
    after = _fingerprint(model)
    assert after["modules"] == before["modules"]
    assert after["params"] == before["params"]
    assert after["state"].keys() == before["state"].keys()
    for k in before["state"]:
        assert after["state"][k] == before["state"][k], k
    assert after["configs"] == before["configs"]
    assert hf_flash.is_patched(model) == was_patched
    if was_patched:
        assert all(m._hf_flash_options == {"fallback": "raise", "packed": False}
                   for m in model.modules() if hasattr(m, "_hf_flash_options"))


# Tiny configs of models whose attention never calls AttentionInterface but whose masks come
# from transformers' mask interface (so from hf_flash's, under attn_implementation=ATTN_NAME).
_BYPASSING = {
    "bloom": dict(hidden_size=32, n_layer=1, n_head=2, vocab_size=64),
    "xglm": dict(d_model=32, num_layers=1, attention_heads=2, ffn_dim=64, vocab_size=64),
    "mpt": dict(d_model=32, n_layers=1, n_heads=2, expansion_ratio=2, vocab_size=64),
    # Not in transformers' MODEL_MAPPING: found through its config class's package.
    "trocr": dict(d_model=32, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
                  vocab_size=64),
}


@pytest.mark.parametrize("model_type", sorted(_BYPASSING))
def test_loading_by_name_refuses_models_that_run_their_own_attention(model_type):
    # They accept any registered attn_implementation and then read hf_flash's cheap masks as
    # their own (BLOOM at batch 1 lost causality; MPT failed with an AttributeError): refused,
    # naming the model, at the first forward.
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **_BYPASSING[model_type])
    model = AutoModelForCausalLM.from_config(config, attn_implementation=hf_flash.ATTN_NAME)
    with pytest.raises(hf_flash.UnsupportedModelError, match=r"\w+'s attention does not go "
                       r"through transformers' AttentionInterface"):
        model(torch.randint(0, 64, (1, 6)))


def test_loading_by_name_trusts_models_whose_source_cannot_be_read():
    # transformers decides whether a class can switch implementation by reading its module's
    # source, so a model defined in a notebook fails that test whatever its attention does. This
    # one is Llama's, defined in a module without source: served, and equal to eager.
    import sys
    import types

    from transformers import LlamaConfig, LlamaModel

    module = types.ModuleType("hf_flash_test_no_source.modeling")
    config_cls = type("NoSourceConfig", (LlamaConfig,), {"model_type": "hf_flash_no_source",
                                                         "__module__": "hf_flash_test_no_source.config"})
    model_cls = type("NoSourceModel", (LlamaModel,), {"config_class": config_cls,
                                                     "__module__": module.__name__})
    module.NoSourceModel = model_cls
    sys.modules[module.__name__] = module
    try:
        config = config_cls(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
        assert not model_cls._can_set_attn_implementation()
        torch.manual_seed(0)
        want_model = model_cls(config).eval()
        config = copy.deepcopy(config)
        config._attn_implementation = hf_flash.ATTN_NAME
        model = model_cls(config).eval()
        model.load_state_dict(want_model.state_dict())
        ids = torch.randint(0, 64, (2, 6))
        mask = torch.ones(2, 6, dtype=torch.long)
        mask[0, :2] = 0
        with torch.no_grad():
            want = want_model(input_ids=ids, attention_mask=mask).last_hidden_state
            got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)
    finally:
        del sys.modules[module.__name__]


# ---------------------------------------------------------------- patching mid-training

def _step(model, opt, ids, mask, labels):
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    opt.step()
    return loss.detach()


def _assert_same_tree(a, b, where=""):
    """Optimizer state dicts: same structure, tensors equal in dtype, shape and value."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, where


def _assert_optimizer_holds(model, opt):
    params = list(model.parameters())
    held = [p for g in opt.param_groups for p in g["params"]]
    assert len(held) == len(params) and all(a is b for a, b in zip(held, params))
    # The per-parameter state (exp_avg, ...) is keyed by the Parameter objects themselves.
    assert set(map(id, opt.state)) == set(map(id, params))


@pytest.mark.parametrize("name", ["bert", "gpt2", "gpt_neo"])
def test_patch_mid_training_keeps_parameters_and_optimizer_state(name):
    model = build(name).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, mask, labels = batch(name, "right")
    for _ in range(3):
        _step(model, opt, ids, mask, labels)

    # Unpatched twins trained from this exact state: fp32 (same arithmetic as before the patch)
    # and fp64 (the reference the ratio rule measures both against).
    ref32, opt32 = copy.deepcopy((model, opt))
    ref64 = copy.deepcopy(model).double()
    if ref64._supports_sdpa:
        ref64.set_attn_implementation("sdpa")
    opt64 = torch.optim.AdamW(ref64.parameters(), lr=1e-2)
    opt64.load_state_dict(opt.state_dict())  # casts the moments to fp64

    params = [(n, p, p.detach().clone()) for n, p in model.named_parameters()]
    opt_state = copy.deepcopy(opt.state_dict())
    hf_flash.patch(model)
    assert _paths(model) == ["hf_flash kernel"] * 2
    now = list(model.named_parameters())
    assert len(now) == len(params)
    assert all(n == n0 and p is p0 for (n, p), (n0, p0, _) in zip(now, params))
    assert all(torch.equal(p, v) for _, p, v in params)
    _assert_optimizer_holds(model, opt)
    _assert_same_tree(opt.state_dict(), opt_state)

    losses = {"patched": [], "ref32": [], "ref64": []}
    runs = {"patched": (model, opt), "ref32": (ref32, opt32), "ref64": (ref64, opt64)}

    def steps(n):
        for _ in range(n):
            for key, (m, o) in runs.items():
                losses[key].append(_step(m, o, ids, mask, labels))

    steps(2)
    assert _last_calls(model) == ["kernel"] * 2
    values = [p.detach().clone() for p in model.parameters()]
    opt_state = copy.deepcopy(opt.state_dict())
    hf_flash.unpatch(model)
    assert _paths(model) == ["not patched"] * 2
    _assert_optimizer_holds(model, opt)
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), values))
    _assert_same_tree(opt.state_dict(), opt_state)
    # Two more steps unpatched: the second loss shows whether the optimizer's update reached the
    # parameters the model computes with.
    steps(2)
    for i in range(len(losses["ref64"])):
        assert_ratio(f"{name} loss at step {i}", losses["patched"][i], losses["ref32"][i],
                     losses["ref64"][i])
    assert losses["patched"][-1] < losses["patched"][0]  # it trained


# ---------------------------------------------------------------- copies and pickles

def _via_torch_save(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "torch.save": _via_torch_save,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
}


@pytest.mark.parametrize("name", ["bert", "gpt2", "gpt_neo"])
def test_copies_of_a_patched_model_stay_patched_and_independent(name):
    model = build(name).eval()
    ids, mask, _ = batch(name, "right")
    eager = _logits(model, ids, mask)
    layer_types = [type(m) for m in model.modules()]
    hf_flash.patch(model, fallback="raise")
    want = _logits(model, ids, mask)
    m = mask.bool()
    torch.testing.assert_close(want[m], eager[m], rtol=1e-5, atol=1e-5)
    for how, make_copy in COPIES.items():
        dup = make_copy(model)
        assert dup is not model and dup.config is not model.config, how
        assert hf_flash.is_patched(dup) and dup.config._attn_implementation == hf_flash.ATTN_NAME
        opts = [mod._hf_flash_options for mod in dup.modules() if hasattr(mod, "_hf_flash_options")]
        assert opts == [{"fallback": "raise", "packed": False}] * 2, how
        got = _logits(dup, ids, mask)
        assert torch.equal(got, want), how  # same weights, same deterministic kernel
        assert _last_calls(dup) == ["kernel"] * 2
        with pytest.raises(hf_flash.UnsupportedCallError):  # the copy kept fallback="raise"
            _logits(dup, ids, mask, output_attentions=True)
        # The copy's saved state refers to the copy's own config: unpatching it must restore the
        # copy exactly and leave the original patched.
        hf_flash.unpatch(dup)
        assert [type(mod) for mod in dup.modules()] == layer_types, how
        assert dup.config._attn_implementation == "eager"
        assert _logits(dup, ids, mask)[m].equal(eager[m]), how
        assert hf_flash.is_patched(model) and model.config._attn_implementation == \
            hf_flash.ATTN_NAME
        assert _paths(model) == ["hf_flash kernel"] * 2
    assert torch.equal(_logits(model, ids, mask), want)


def test_patched_model_loads_in_a_process_that_never_imported_hf_flash(tmp_path):
    # The pickle itself must bring hf_flash in (and so register the backend) on load.
    ids, mask, _ = batch("gpt_neo", "right")
    for name in ("bert", "gpt_neo"):
        model = hf_flash.patch(build(name), fallback="raise").eval()
        torch.save({"model": model, "want": _logits(model, ids, mask), "ids": ids, "mask": mask},
                   tmp_path / f"{name}.pt")
    out = run_fresh(f"""
import io, sys, torch
assert "hf_flash" not in sys.modules
for name in ("bert", "gpt_neo"):
    d = torch.load({str(tmp_path)!r} + f"/{{name}}.pt", weights_only=False)
    with torch.no_grad():
        got = d["model"](input_ids=d["ids"], attention_mask=d["mask"]).logits
    assert torch.equal(got, d["want"]), name
    import hf_flash
    assert hf_flash.is_patched(d["model"])
    rows = hf_flash.explain(d["model"], file=io.StringIO())
    print(name, [r["last_call"][0] for r in rows], d["model"].config._attn_implementation)
""", timeout=120)
    lines = [line for line in out.splitlines() if line.startswith(("bert ", "gpt_neo "))]
    assert lines == ["bert ['kernel', 'kernel'] hf_triton",
                     "gpt_neo ['kernel', 'kernel'] hf_triton"], out


# ---------------------------------------------------------------- two patched models

@pytest.mark.parametrize("name", ["bert", "gpt_neo"])
def test_two_models_patched_with_different_options_do_not_interfere(name):
    strict, lenient = build(name, seed=0).eval(), build(name, seed=1).eval()
    ids, mask, _ = batch(name, "right")
    m = mask.bool()
    refs = {}
    for key, model in (("strict", strict), ("lenient", lenient)):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        refs[key] = (out.logits, out.attentions)
    assert not torch.allclose(refs["strict"][0], refs["lenient"][0])  # distinguishable models
    hf_flash.patch(strict, fallback="raise")
    hf_flash.patch(lenient, fallback="eager")
    _glue._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # interleaved, twice: neither call leaves state for the other
            torch.testing.assert_close(_logits(strict, ids, mask)[m], refs["strict"][0][m],
                                       rtol=1e-5, atol=1e-5)
            with torch.no_grad():
                out = lenient(input_ids=ids, attention_mask=mask, output_attentions=True)
            torch.testing.assert_close(out.logits, refs["lenient"][0], rtol=1e-5, atol=1e-5)
            for a, b in zip(out.attentions, refs["lenient"][1]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            with pytest.raises(hf_flash.UnsupportedCallError, match="fallback='raise'"):
                _logits(strict, ids, mask, output_attentions=True)
            torch.testing.assert_close(_logits(lenient, ids, mask)[m], refs["lenient"][0][m],
                                       rtol=1e-5, atol=1e-5)
    for model, fallback in ((strict, " raise"), (lenient, " run eager")):
        rows = hf_flash.explain(model, file=io.StringIO())
        assert all(r["reason"].endswith(fallback) for r in rows)
        assert all(r["last_call"][0] == "kernel" for r in rows)

    hf_flash.unpatch(strict)
    assert not hf_flash.is_patched(strict) and _paths(strict) == ["not patched"] * 2
    assert hf_flash.is_patched(lenient) and _paths(lenient) == ["hf_flash kernel"] * 2
    assert all(mod._hf_flash_options == {"fallback": "eager", "packed": False}
               for mod in lenient.modules() if hasattr(mod, "_hf_flash_options"))
    torch.testing.assert_close(_logits(strict, ids, mask), refs["strict"][0], rtol=0, atol=0)
    torch.testing.assert_close(_logits(lenient, ids, mask)[m], refs["lenient"][0][m],
                               rtol=1e-5, atol=1e-5)
    assert _last_calls(lenient) == ["kernel"] * 2


def _config_refs(model):
    """id of the config each module holds, by module name and attribute."""
    return {(n, k): id(v) for n, m in model.named_modules() for k, v in vars(m).items()
            if isinstance(v, PreTrainedConfig)}


@pytest.mark.parametrize("name", ["bert", "gpt_neo"])
def test_models_sharing_one_config_object(name):
    make_config, auto, _ = FAMILIES[name]
    cfg = make_config()
    torch.manual_seed(0)
    first = auto.from_config(cfg, attn_implementation="eager").eval()
    torch.manual_seed(1)
    second = auto.from_config(cfg, attn_implementation="eager").eval()
    assert first.config is cfg and second.config is cfg
    # Padded: GPT-Neo's eager layers cannot read the mask hf_flash's mask function builds.
    ids, mask, _ = batch(name, "right")
    m = mask.bool()
    want_first, want_second = _logits(first, ids, mask), _logits(second, ids, mask)
    cfg_before = copy.deepcopy(cfg.__dict__)
    second_refs = _config_refs(second)
    assert set(second_refs.values()) == {id(cfg)}

    hf_flash.patch(first, fallback="raise")
    assert first.config is not cfg and first.config._attn_implementation == hf_flash.ATTN_NAME
    assert set(_config_refs(first).values()) == {id(first.config)}  # every holder got the copy
    assert cfg._attn_implementation == "eager" and cfg.__dict__ == cfg_before
    assert _config_refs(second) == second_refs
    assert not hf_flash.is_patched(second) and _paths(second) == ["not patched"] * 2
    torch.testing.assert_close(_logits(second, ids, mask), want_second, rtol=0, atol=0)
    torch.testing.assert_close(_logits(first, ids, mask)[m], want_first[m], rtol=1e-5, atol=1e-5)
    assert _last_calls(first) == ["kernel"] * 2

    # Both patched, then unpatched in the order they were patched: each gets the shared object
    # back, still on eager.
    hf_flash.patch(second)
    assert first.config is not second.config
    hf_flash.unpatch(first)
    assert first.config is cfg and cfg._attn_implementation == "eager"
    assert hf_flash.is_patched(second) and _paths(second) == ["hf_flash kernel"] * 2
    torch.testing.assert_close(_logits(first, ids, mask), want_first, rtol=0, atol=0)
    torch.testing.assert_close(_logits(second, ids, mask)[m], want_second[m], rtol=1e-5,
                               atol=1e-5)
    hf_flash.unpatch(second)
    assert second.config is cfg and _config_refs(second) == second_refs
    assert cfg.__dict__ == cfg_before
    torch.testing.assert_close(_logits(second, ids, mask), want_second, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["bert", "gpt2", "gpt_neo", "llama"])
def test_unpatch_gives_back_the_original_config_unchanged(name):
    model = build(name).eval()
    cfg = model.config
    refs = _config_refs(model)
    assert set(refs.values()) == {id(cfg)} and len(refs) > 1  # submodules hold it too
    cfg_before = copy.deepcopy(cfg.__dict__)
    json_before = cfg.to_json_string()
    ids, mask, _ = batch(name, "right")
    hf_flash.patch(model)
    assert model.config is not cfg and cfg.__dict__ == cfg_before  # only the copy was switched
    _logits(model, ids, mask)
    hf_flash.unpatch(model)
    assert model.config is cfg and _config_refs(model) == refs
    assert cfg.__dict__ == cfg_before and cfg.to_json_string() == json_before
    assert cfg._attn_implementation == "eager"


def test_fields_set_while_patched_stay_after_unpatch():
    # A Trainer run sets config fields (problem_type, ...) while the model is patched; unpatching
    # must not lose them, only the attention implementation goes back.
    model = build("bert").eval()
    cfg = model.config
    hf_flash.patch(model)
    model.config.problem_type = "single_label_classification"
    model.config.hidden_dropout_prob = 0.25
    hf_flash.unpatch(model)
    assert model.config is cfg
    assert cfg.problem_type == "single_label_classification"
    assert cfg.hidden_dropout_prob == 0.25
    assert cfg._attn_implementation == "eager"


def test_nested_configs_stay_nested_in_the_copy():
    # An encoder-decoder's submodels hold the sub-configs of its top config: after patching they
    # must hold the copy's sub-configs, not copies of their own that the top copy does not see.
    from transformers import EncoderDecoderConfig, EncoderDecoderModel
    cfg = EncoderDecoderConfig.from_encoder_decoder_configs(
        bert_config(), bert_config(is_decoder=True, add_cross_attention=True))
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = EncoderDecoderModel(config=cfg).eval()
    refs = _config_refs(model)
    cfg_before = copy.deepcopy(cfg.__dict__)
    ids, mask, _ = batch("bert", "right")
    kw = dict(decoder_input_ids=ids, decoder_attention_mask=mask)
    want = _logits(model, ids, mask, **kw)
    hf_flash.patch(model, fallback="raise")
    new = model.config
    assert new is not cfg
    assert model.encoder.config is new.encoder and model.decoder.config is new.decoder
    assert {new.encoder._attn_implementation, new.decoder._attn_implementation} == \
        {hf_flash.ATTN_NAME}
    assert cfg.__dict__ == cfg_before and cfg.encoder._attn_implementation == "eager"
    m = mask.bool()
    torch.testing.assert_close(_logits(model, ids, mask, **kw)[m], want[m], rtol=1e-5, atol=1e-5)
    assert set(_last_calls(model)) == {"kernel"}
    hf_flash.unpatch(model)
    assert model.config is cfg and _config_refs(model) == refs
    assert cfg.__dict__ == cfg_before


# ---------------------------------------------------------------- every refusal explains itself

def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


def _qkv(q_len=4, k_len=5, **kw):
    return _t(1, 2, q_len, 8, **kw), _t(1, 2, k_len, 8, **kw), _t(1, 2, k_len, 8, **kw)


def _attn(*qkv, **kw):
    return lambda: hf_flash.flash_attention(*qkv, **kw)


def _register_twice():
    # Raises before appending, so the registry is left as it was.
    return hf_flash.register_family(Family(name="bert"))


def _register_clash():
    return hf_flash.register_family(Family(name="hf_flash_safety_clash", model_types=("gpt2",)))


# (call, exception type, words every message must contain: the argument and what it accepts)
ERRORS = {
    # flash_attention: tensors
    "query-not-tensor": (_attn([[1.0]], *_qkv()[1:]), TypeError,
                         ["query must be a torch.Tensor", "list"]),
    "dtype-unsupported": (_attn(*_qkv(dtype=torch.float64)), TypeError,
                          ["query", "torch.float64", "float16, bfloat16 and float32"]),
    "not-4d": (_attn(_t(2, 4, 8), _t(2, 4, 8), _t(2, 4, 8)), ValueError,
               ["query must be 4-D", "(batch, heads, seq, head_dim)", "(2, 4, 8)"]),
    "dtypes-differ": (_attn(_t(1, 2, 4, 8), _t(1, 2, 5, 8, dtype=torch.float16),
                            _t(1, 2, 5, 8)), TypeError,
                      ["query, key and value must share a dtype", "torch.float16"]),
    "devices-differ": (_attn(_t(1, 2, 4, 8), _t(1, 2, 5, 8, device="meta"), _t(1, 2, 5, 8)),
                       ValueError, ["query, key and value must be on one device", "meta"]),
    "device-unsupported": (_attn(*_qkv(device="meta")), ValueError,
                           ["query, key and value", "meta", "cuda", "cpu"]),
    "batch-differs": (_attn(_t(2, 2, 4, 8), _t(1, 2, 5, 8), _t(1, 2, 5, 8)), ValueError,
                      ["query 2, key 1, value 1", "same batch size"]),
    "key-value-differ": (_attn(_t(1, 2, 4, 8), _t(1, 2, 5, 8), _t(1, 2, 6, 8)), ValueError,
                         ["key (1, 2, 5, 8) and value (1, 2, 6, 8)",
                          "same heads and sequence length"]),
    "head-dims-differ": (_attn(_t(1, 2, 4, 8), _t(1, 2, 5, 16), _t(1, 2, 5, 16)), ValueError,
                         ["query 8, key 16, value 16", "one head dim"]),
    "head-dim-too-big": (_attn(*[_t(1, 2, 4, 257)] * 3), ValueError,
                         ["head dim 257", "query", "1 to 256"]),
    "head-dim-zero": (_attn(*[_t(1, 2, 4, 0)] * 3), ValueError, ["head dim 0", "1 to 256"]),
    "gqa-not-multiple": (_attn(_t(1, 6, 4, 8), _t(1, 4, 5, 8), _t(1, 4, 5, 8), enable_gqa=True),
                         ValueError, ["query heads (6)", "multiple of key/value heads (4)"]),
    "gqa-not-enabled": (_attn(_t(1, 4, 4, 8), _t(1, 2, 5, 8), _t(1, 2, 5, 8)), ValueError,
                        ["query has 4 heads", "key/value have 2", "enable_gqa=True"]),
    # flash_attention: scalars
    "dropout-range": (_attn(*_qkv(), dropout_p=1.5), ValueError, ["dropout_p", "[0, 1]", "1.5"]),
    "dropout-type": (_attn(*_qkv(), dropout_p="0.1"), ValueError, ["dropout_p", "[0, 1]"]),
    "scale-inf": (_attn(*_qkv(), scale=float("inf")), ValueError,
                  ["scale must be a finite float or None", "inf"]),
    # flash_attention: masks
    "causal-twice": (_attn(*_qkv(), attn_mask=causal_lower_right(4, 5), is_causal=True),
                     ValueError, ["is_causal=True", "CausalBias attn_mask", "is_causal=False"]),
    "causal-bias-shape": (_attn(*_qkv(), attn_mask=causal_lower_right(3, 5)), ValueError,
                          ["attn_mask", "q_len=3", "q_len=4", "must match"]),
    "causal-alignment-value": (_attn(*_qkv(), is_causal=True, causal_alignment="bottom-right"),
                               ValueError, ["causal_alignment", "'top_left' or 'bottom_right'",
                                            "'bottom-right'"]),
    "causal-alignment-alone": (_attn(*_qkv(), causal_alignment="bottom_right"), ValueError,
                               ["causal_alignment='bottom_right'", "is_causal=True"]),
    "mask-type": (_attn(*_qkv(), attn_mask=[[True]]), TypeError,
                  ["attn_mask", "bool or float tensor or a CausalBias", "list"]),
    "mask-device": (_attn(*_qkv(), attn_mask=_t(4, 5, dtype=torch.bool, device="meta")),
                    ValueError, ["attn_mask is on meta", "query's device", "cpu"]),
    "mask-dtype": (_attn(*_qkv(), attn_mask=_t(4, 5, dtype=torch.int32)), TypeError,
                   ["attn_mask has dtype torch.int32", "bool", "float"]),
    "mask-grad": (_attn(*_qkv(), attn_mask=_t(4, 5).requires_grad_()), ValueError,
                  ["attn_mask requires grad", "detach"]),
    "mask-rank": (_attn(*_qkv(), attn_mask=_t(1, 1, 1, 4, 5)), ValueError,
                  ["attn_mask has 5 dims", "at most 4"]),
    "mask-broadcast": (_attn(*_qkv(), attn_mask=_t(3, 5, dtype=torch.bool)), ValueError,
                       ["attn_mask of shape (3, 5)",
                        "(batch, heads, q_len, k_len) = (1, 2, 4, 5)"]),
    "kpm-type": (_attn(*_qkv(), key_padding_mask=[[True] * 5]), TypeError,
                 ["key_padding_mask must be a bool tensor", "list"]),
    "kpm-dtype": (_attn(*_qkv(), key_padding_mask=_t(1, 5)), TypeError,
                  ["key_padding_mask must be bool", "torch.float32"]),
    "kpm-device": (_attn(*_qkv(), key_padding_mask=_t(1, 5, dtype=torch.bool, device="meta")),
                   ValueError, ["key_padding_mask is on meta", "query's device", "cpu"]),
    "kpm-shape": (_attn(*_qkv(), key_padding_mask=_t(1, 4, dtype=torch.bool)), ValueError,
                  ["key_padding_mask must have shape (batch, k_len) = (1, 5)", "(1, 4)"]),
    # patch / unpatch
    "patch-option": (lambda: hf_flash.patch(build("bert"), speed=3), TypeError,
                     ["unknown option(s) ['speed']", "valid options: ['fallback', 'packed']"]),
    "patch-fallback": (lambda: hf_flash.patch(build("bert"), fallback="ignore"), ValueError,
                       ["fallback must be one of ('eager', 'raise')", "'ignore'"]),
    "patch-not-a-model": (lambda: hf_flash.patch(torch.nn.Linear(2, 2)), TypeError,
                          ["model must be a transformers PreTrainedModel", "Linear"]),
    "unpatch-not-a-model": (lambda: hf_flash.unpatch(torch.nn.Linear(2, 2)), TypeError,
                            ["model must be a transformers PreTrainedModel", "Linear"]),
    "patch-unknown-type": (lambda: hf_flash.patch(_unknown_model_type()[0]),
                           hf_flash.UnsupportedModelError,
                           ["'hf_flash_safety_no_interface'", "Supported model types: bert",
                            "gpt2", "AttentionInterface"]),
    "patch-no-interface": (lambda: hf_flash.patch(_bert_without_interface()[0]),
                           hf_flash.UnsupportedModelError,
                           ["_NoInterfaceBert", "AttentionInterface"]),
    "patch-submodel": (lambda: hf_flash.patch(_submodel_that_cannot_switch()[0]),
                       hf_flash.UnsupportedModelError,
                       ["_NoInterfaceModel", "attn_implementation='hf_triton'",
                        "AttentionInterface"]),
    "patch-gpt-neo-layer": (lambda: hf_flash.patch(_gpt_neo_foreign_layer()[0]),
                            hf_flash.UnsupportedModelError,
                            ["OtherNeoAttention", "attn_implementation='eager'", "'hf_triton'"]),
    "register-name": (_register_twice, ValueError, ["'bert' is already registered", "Family.name",
                                                    "'gpt2'", "'generic'"]),
    "register-types": (_register_clash, ValueError, ["Family.model_types ['gpt2']", "'gpt2'",
                                                     "one family"]),
    # the attention glue, fed a mask form it does not read
    "glue-2d-dtype": (lambda: _glue.kernel_mask_args(torch.ones(2, 5, dtype=torch.long), False,
                                                     5, 5, 2),
                      TypeError, ["2-D attention mask must be bool", "torch.int64"]),
    "glue-2d-shape": (lambda: _glue.kernel_mask_args(torch.ones(2, 4, dtype=torch.bool), False,
                                                     5, 5, 2),
                      ValueError, ["2-D attention mask has shape (2, 4)",
                                   "(batch, k_len) = (2, 5)"]),
    "glue-rank": (lambda: _glue.kernel_mask_args(torch.ones(2, 5, 5, dtype=torch.bool), False,
                                                 5, 5, 2),
                  ValueError, ["attention mask of shape (2, 5, 5)", "2-D key padding",
                               "4-D mask"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_every_refusal_names_the_argument_and_what_it_accepts(case):
    call, exc, words = ERRORS[case]
    n_families = len(hf_flash.supported_models())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc) as err:
            call()
    assert type(err.value) is exc
    for w in words:
        assert w in str(err.value), f"{w!r} not in {str(err.value)!r}"
    assert len(hf_flash.supported_models()) == n_families  # a refused registration adds nothing
