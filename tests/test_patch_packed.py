"""patch(model, packed=True): BERT-family encoders run on the real tokens of a padded batch.

At real tokens the logits, the loss and every gradient follow the same ratio rule against an fp64
eager copy as the padded path (patch_utils.compare_to_eager); padding positions come out as
zeros of the encoder. Calls packing cannot serve run padded, with the same results as without it.
"""

import copy

import pytest
import torch

import hf_flash
from conftest import DEVICE, run_fresh
from patch_utils import batch, build, compare_to_eager, run

ENCODERS = ["bert", "roberta", "electra"]


def _holey_batch(name):
    # Right padding, left padding and a hole in one batch: any boolean mask packs exactly.
    ids, mask, labels = batch(name, "right", batch_size=3)
    mask[1, :3] = 0
    mask[2, 5] = 0
    pad = build(name).config.pad_token_id
    return ids.masked_fill(mask == 0, pad), mask, labels.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("train", [False, True])
def test_packed_encoder_matches_eager_at_real_tokens(name, train):
    model = build(name)
    ids, mask, labels = _holey_batch(name)
    patched = compare_to_eager(name, model, ids, mask, labels, train=train, where=mask.bool(),
                               packed=True)
    layer = next(m for m in patched.modules() if hasattr(m, "_hf_flash_last_call"))
    assert layer._hf_flash_last_call == ("kernel", "packed sequences")


def test_packed_encoder_gives_zeros_at_padding():
    model = hf_flash.patch(build("bert").eval(), packed=True)
    ids, mask, _ = _holey_batch("bert")
    hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert hidden.shape == (*ids.shape, model.config.hidden_size)
    assert torch.all(hidden[mask == 0] == 0) and torch.all(hidden[mask == 1].abs().sum(-1) > 0)


def test_packed_backward_copies_no_activations():
    # The packed encoder's autograd graph, from the loss down to the weights, is made of views
    # where layouts change: an indexing node ([0] on a tensor) in it would mean its backward
    # allocates a zero tensor and copies the gradient in, per layer. Only the one unpad/pad
    # index of the whole encoder may appear.
    # On the device the kernels serve: CPU tensors on a CUDA machine take the plain fallback.
    model = hf_flash.patch(build("bert").train(), packed=True).to(DEVICE)
    ids, mask, labels = (t.to(DEVICE) for t in _holey_batch("bert"))
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    names, seen, todo = [], set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    assert "SelectBackward0" not in names, sorted(set(names))
    assert sum(n.startswith("Index") for n in names) <= 2, sorted(n for n in names if "Index" in n)
    # Nor a layout round trip per layer: the kernel takes the model's (1, H, T, D) packed rows
    # as they are. Only the encoder's own unsqueeze/squeeze of the packed batch may appear.
    assert sum("queeze" in n for n in names) <= 2, sorted(n for n in names if "queeze" in n)
    assert any("Flash" in n or "hf_flash" in n for n in names), sorted(set(names))


def test_packed_with_dropout_trains_like_eager_in_distribution():
    # Dropout draws differ from the padded path (other shapes), so compare statistics: with the
    # same seed the packed loss is finite, changes with the seed, and is repeatable.
    model = hf_flash.patch(build("bert", attention_probs_dropout_prob=0.3).train(), packed=True)
    ids, mask, labels = _holey_batch("bert")
    losses = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        losses.append(run(model, ids, mask, labels)[1].item())
    assert losses[0] == losses[1] != losses[2]


def test_hidden_states_output_runs_padded():
    # Captured hidden states must keep (batch, seq, hidden): such calls skip packing.
    eager = build("bert").eval()
    model = hf_flash.patch(copy.deepcopy(eager), packed=True)
    ids, mask, _ = batch("bert", "right")
    got = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    want = eager(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert (g - w)[mask.bool()].abs().max() < 1e-5


def test_packed_option_is_reversible():
    model = build("bert").eval()
    ids, mask, _ = _holey_batch("bert")
    hf_flash.patch(model)
    plain = model(input_ids=ids, attention_mask=mask).logits
    with hf_flash.patched(model, packed=True):
        assert "forward" in vars(model.bert.encoder)
        packed = model(input_ids=ids, attention_mask=mask).logits
    assert "forward" not in vars(model.bert.encoder)
    assert (packed - plain)[mask.bool()].abs().max() < 1e-5
    hf_flash.patch(model, packed=True)
    hf_flash.unpatch(model)
    assert "forward" not in vars(model.bert.encoder) and not hf_flash.is_patched(model)


def test_packed_is_refused_where_no_family_packs():
    model = build("gpt2")
    with pytest.raises(ValueError, match="packed=True is not available for the 'gpt2' family"):
        hf_flash.patch(model, packed=True)
    assert not hf_flash.is_patched(model)
    with pytest.raises(TypeError, match="packed must be True or False"):
        hf_flash.patch(build("bert"), packed="yes")


def _count_length_checks(monkeypatch) -> list:
    """A list that each check of cu_seqlens (kernels.attention._check_lengths) appends to."""
    from hf_flash.kernels import attention
    checks = []
    real = attention._check_lengths
    monkeypatch.setattr(attention, "_check_lengths", lambda *a: checks.append(a) or real(*a))
    return checks


def test_only_cu_seq_lens_the_encoder_built_skip_their_check(monkeypatch):
    # The packed encoder builds cu_seq_lens valid by construction and says so, with a value of
    # hf_flash's own: its layers skip the check (on a GPU a dozen small launches each).
    # cu_seq_lens from anyone else are checked in every call, whatever keyword comes with them:
    # transformers hands a model's keyword arguments down to every attention call.
    from hf_flash import _glue
    checks = _count_length_checks(monkeypatch)
    model = hf_flash.patch(build("bert").eval(), packed=True)
    ids, mask, _ = _holey_batch("bert")
    model(input_ids=ids, attention_mask=mask)
    layer = model.bert.encoder.layer[0].attention.self
    assert layer._hf_flash_last_call == ("kernel", "packed sequences")
    assert checks == []
    x = torch.randn(1, 13, model.config.hidden_size)
    cu = torch.tensor([0, 6, 13], dtype=torch.int32)
    for claim in (None, True, "hf_flash", _glue.BUILT):
        extra = {} if claim is None else {_glue.BUILT_CU_SEQ_LENS: claim}
        before = len(checks)
        # Another tensor for k (equal values), or no max length: checked even with the claim.
        layer(x, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=7,
              max_length_k=7, **extra)
        layer(x, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, **extra)
        assert len(checks) == before + 2, claim
        if claim is not _glue.BUILT:
            layer(x, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7,
                  **extra)
            assert len(checks) == before + 3, claim
    bad = torch.tensor([0, 6, 14], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to total"):
        model(input_ids=ids[:1, :13], cu_seq_lens_q=bad, cu_seq_lens_k=bad, max_length_q=8,
              max_length_k=8, **{_glue.BUILT_CU_SEQ_LENS: True})


def test_varlen_skips_its_check_only_for_lengths_said_to_be_checked(monkeypatch):
    checks = _count_length_checks(monkeypatch)
    q = torch.randn(13, 2, 8)
    cu = torch.tensor([0, 6, 13], dtype=torch.int32)
    hf_flash.flash_attention_varlen(q, q, q, cu, 7, _cu_seqlens_checked=True)
    assert checks == []
    hf_flash.flash_attention_varlen(q, q, q, cu, 7)
    hf_flash.flash_attention_varlen(q, q, q, cu, _cu_seqlens_checked=True)  # no max: read, checked
    assert len(checks) == 2


def test_packed_batch_of_padding_only_runs_padded():
    model = hf_flash.patch(build("bert").eval(), packed=True)
    ids, mask, _ = _holey_batch("bert")
    mask[:] = 0
    hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert hidden.shape == (*ids.shape, model.config.hidden_size)
    layer = model.bert.encoder.layer[0].attention.self
    assert layer._hf_flash_last_call[0] == "kernel"
    assert layer._hf_flash_last_call != ("kernel", "packed sequences")


def test_cu_seq_lens_from_the_caller_pack_attention():
    # transformers' own packed-sequence arguments (as FlashAttention-2 users pass them) reach the
    # varlen kernel: two sequences in one row must not see each other.
    model = hf_flash.patch(build("bert").eval())
    layer = model.bert.encoder.layer[0].attention.self
    torch.manual_seed(0)
    x = torch.randn(1, 13, model.config.hidden_size)
    cu = torch.tensor([0, 6, 13], dtype=torch.int32)
    together = layer(x, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7,
                     max_length_k=7)[0]
    apart = torch.cat([layer(x[:, :6], None)[0], layer(x[:, 6:], None)[0]], dim=1)
    assert (together - apart).abs().max() < 1e-5


def _flattened(lengths, seed=0):
    """(padded ids, mask, labels) and the same sequences as transformers' padding-free collator
    hands them over: one row, positions restarting per sequence, cu_seq_lens_q/k (two tensors
    of equal values), no mask. Labels blank each sequence's first token, the collator's
    separator, in both forms."""
    from transformers import DataCollatorWithFlattening
    from patch_utils import VOCAB
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    features = [{"input_ids": ids[i, :n].tolist(), "labels": labels[i, :n].tolist()}
                for i, n in enumerate(lengths)]
    flat = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    assert flat["cu_seq_lens_k"] is not flat["cu_seq_lens_q"]
    return (ids, mask, labels), flat


def test_a_padding_free_batch_matches_the_padded_one():
    # The whole model on DataCollatorWithFlattening's batch: the real tokens' logits, the loss
    # and every gradient as the padded batch gives them in eager attention.
    model = build("bert").train()  # dropout is 0 in these configs; train mode runs autograd
    (ids, mask, labels), flat = _flattened([11, 6, 9])
    want_logits, want_loss, want_grads = run(model, ids, mask, labels)
    patched = hf_flash.patch(copy.deepcopy(model))
    patched.zero_grad(set_to_none=True)
    out = patched(**flat)
    out.loss.backward()
    assert (out.logits[0] - want_logits[mask.bool()]).abs().max() < 1e-4
    assert (out.loss - want_loss).abs() < 1e-5
    top = max(g.abs().max().item() for g in want_grads.values())
    for name, p in patched.named_parameters():
        assert (p.grad - want_grads[name]).abs().max() < 1e-4 * top, name


def test_cu_seq_lens_k_must_hold_q_s_values():
    # Two tensors of equal values (what the collator gives) are served; other values, or other
    # shapes, raise rather than attend across the wrong boundaries.
    model = hf_flash.patch(build("bert").eval())
    layer = model.bert.encoder.layer[0].attention.self
    x = torch.randn(1, 13, model.config.hidden_size)
    cu = torch.tensor([0, 6, 13], dtype=torch.int32)
    same = layer(x, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=7,
                 max_length_k=7)[0]
    assert torch.equal(same, layer(x, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                   max_length_q=7, max_length_k=7)[0])
    for other in (torch.tensor([0, 7, 13], dtype=torch.int32),
                  torch.tensor([0, 6, 9, 13], dtype=torch.int32)):
        with pytest.raises(ValueError, match="cu_seq_lens_k differs from cu_seq_lens_q"):
            layer(x, None, cu_seq_lens_q=cu, cu_seq_lens_k=other, max_length_q=7,
                  max_length_k=7)


def test_checked_once_remembers_the_last_tensors_and_values():
    # The memo behind the GPU's once-per-model checks of cu_seqlens (kernels/attention.py).
    from hf_flash.kernels.attention import CheckedOnce
    memo, cu = CheckedOnce(), torch.tensor([0, 6, 13], dtype=torch.int32)
    assert not memo.seen((cu,), (13, 7))
    assert memo.seen((cu,), (13, 7))  # the next layer, same tensor: skipped
    assert not memo.seen((cu,), (13, 8))  # other values
    cu[1] = 5  # changed in place: its version counter moves
    assert not memo.seen((cu,), (13, 8))
    assert memo.seen((cu,), (13, 8))
    assert not memo.seen((cu.clone(),), (13, 8))  # another tensor of the same values
    with torch.inference_mode():
        frozen = torch.tensor([0, 13], dtype=torch.int32)
    assert not memo.seen((frozen,), (13, 13)) and not memo.seen((frozen,), (13, 13))


# ---- torch.compile --------------------------------------------------------------------------
# Packing keeps the rows of real tokens, whose count only the mask's values tell. Dynamo traces
# that with capture_dynamic_output_shape_ops (the count becomes an unbacked size); without it the
# compiled encoder runs padded, with a warning, rather than breaking the model's graph. Either way
# fullgraph=True must hold. A fresh process each (conftest.run_fresh); aot_eager runs the captured
# graphs without generating code, the kernels under Triton's interpreter on the CPU.
_COMPILED_PACKED = """
import warnings
import conftest, torch, hf_flash
from torch._dynamo.backends.registry import lookup_backend
from patch_utils import build, run
conftest.strict_constant_results()
torch._dynamo.config.capture_dynamic_output_shape_ops = {option}
graphs = []
def backend(gm, example_inputs):  # aot_eager, keeping each captured graph's code
    graphs.append(gm.code)
    return lookup_backend("aot_eager")(gm, example_inputs)
model = hf_flash.patch(build("bert").train(), packed=True)
compiled = torch.compile(model, backend=backend, fullgraph=True)
g = torch.Generator().manual_seed(0)
# Batches with other counts of real tokens, then padded to other lengths.
for lengths in ([11, 6, 9], [4, 11, 8], [13, 2, 7], [5, 9, 15]):
    width = max(lengths)
    ids = torch.randint(3, 96, (3, width), generator=g)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        logits, loss, grads = run(compiled, ids, mask, labels)
    grads = {{n.removeprefix("_orig_mod."): t for n, t in grads.items()}}
    want_logits, want_loss, want_grads = run(model, ids, mask, labels)
    real = mask.bool()
    print("logits", (logits - want_logits)[real].abs().max().item())
    print("loss", (loss - want_loss).abs().item())
    # Against the largest gradient of all: some are zero but for rounding (key biases).
    top = max(w.abs().max().item() for w in want_grads.values())
    print("grads", max((grads[n] - w).abs().max().item() for n, w in want_grads.items()) / top,
          len(grads) == len(want_grads))
    print("warned", sum("runs padded" in str(w.message) for w in seen))
print("graphs", len(graphs), "packed", sum("nonzero" in c for c in graphs))
"""


def _compiled_packed(option: bool) -> dict:
    out = run_fresh(_COMPILED_PACKED.format(option=option))
    found = {}
    for line in out.splitlines():
        key, *values = line.split()
        found.setdefault(key, []).append(values)
    return found


def _assert_compiled_matches(found):
    assert len(found["logits"]) == 4
    for (logits,), (loss,), (grads, all_grads) in zip(found["logits"], found["loss"],
                                                      found["grads"]):
        assert float(logits) < 1e-5 and float(loss) < 1e-5
        assert float(grads) < 1e-4 and all_grads == "True"


def test_packed_encoder_compiles_to_one_graph_with_unbacked_row_counts():
    found = _compiled_packed(True)
    _assert_compiled_matches(found)
    # Packed forward graphs: the count of real tokens is symbolic, so a new count is no
    # recompile; a new padded length is one, once (dynamo's automatic dynamic shapes, as for any
    # model), not one for each length.
    assert found["graphs"] == [["2", "packed", "2"]]
    assert found["warned"] == [["0"]] * 4


def test_packed_encoder_compiled_without_the_option_runs_padded_in_one_graph():
    found = _compiled_packed(False)
    _assert_compiled_matches(found)
    assert found["graphs"] == [["2", "packed", "0"]]  # as above; no packing traced
    assert found["warned"] == [["1"], ["0"], ["0"], ["0"]]


# A padding-free batch compiled: the row's length is an ordinary (backed) dynamic size, so
# inductor fuses around it as for a padded batch, and the collator's two cu_seq_lens tensors are
# compared on the device, inside the graph (a host-side comparison broke it: a graph break in
# every layer, an error under fullgraph=True).
_COMPILED_FLAT = """
import conftest, torch, hf_flash
from torch._dynamo.backends.registry import lookup_backend
from patch_utils import build
from test_patch_packed import _flattened
conftest.strict_constant_results()
graphs = []
def backend(gm, example_inputs):
    graphs.append(gm.code)
    return lookup_backend("aot_eager")(gm, example_inputs)
model = hf_flash.patch(build("bert").train())
compiled = torch.compile(model, backend=backend, fullgraph=True)
# Every batch its own count of tokens, and most their own longest sequence.
for seed, lengths in enumerate(([11, 6, 9], [4, 11, 8], [13, 2, 7], [3, 5, 10], [9, 9, 8],
                                [2, 3, 4])):
    _, flat = _flattened(lengths, seed)
    out = compiled(**flat)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    want = model(**flat)
    want.loss.backward()
    top = max(p.grad.abs().max().item() for p in model.parameters())
    print("loss", (out.loss - want.loss).abs().item(), "logits",
          (out.logits - want.logits).abs().max().item(), "grads",
          max((got[n] - p.grad).abs().max().item() for n, p in model.named_parameters()) / top,
          "graphs", len(graphs))
    model.zero_grad(set_to_none=True)
"""


def test_a_padding_free_batch_compiles_whole_and_stops_recompiling():
    results = [line.split() for line in run_fresh(_COMPILED_FLAT).splitlines()]
    assert len(results) == 6
    for _, loss, _, logits, _, grads, _, _ in results:
        assert float(loss) < 1e-5 and float(logits) < 1e-5 and float(grads) < 1e-4
    # dynamo's automatic dynamic shapes: a size or int that changes recompiles once, symbolic
    # (the row length at the second batch; the collator's max_length_q/k, a Python int, at the
    # first batch whose longest sequence is new). After that no batch compiles again: a length
    # specialised in the graph would cost a graph per batch.
    graphs = [int(r[-1]) for r in results]
    assert graphs[2] <= 3 and graphs[-1] == graphs[2], graphs
