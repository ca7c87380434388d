"""BERT-style encoders: BERT, RoBERTa, ELECTRA.

Their self-attention goes through AttentionInterface with `scaling = head_size ** -0.5` and
`dropout = attention_probs_dropout_prob` in train mode, so the generic glue serves them as is. The
encoder mask is bidirectional: no mask at all without padding, key-padding lengths with it (the
kernel's fast path). As decoders (is_decoder=True) they are causal; cross-attention is
bidirectional over the encoder states, with the encoder's padding as key padding.

With `patch(model, packed=True)` the encoder runs on the real tokens of a padded batch only: the
padding is dropped once before the first layer, every layer works on the packed rows (attention
through the kernel's packed-sequence mode), and the padding comes back, as zeros, after the
last layer. The dense layers then cost what the real tokens cost.
"""

import torch

from hf_flash import _glue
from hf_flash._registry import Family, register_family

from ._common import require_attention_interface

_ENCODERS = ("BertEncoder", "RobertaEncoder", "ElectraEncoder")


@torch._dynamo.assume_constant_result
def _untraceable_packing() -> bool:
    """Warns, once, that a compiled model runs its encoder padded. Called while dynamo traces
    (assume_constant_result: run then, outside the graph, with no graph break)."""
    _glue.warn_once_text(
        "patch(packed=True) under torch.compile: the encoder runs padded, because dynamo traces "
        "the packing (the real tokens' rows, a data-dependent count) only with "
        "torch._dynamo.config.capture_dynamic_output_shape_ops = True; set it before compiling "
        "to run packed")
    return True


def _packed_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    """The encoder's forward over packed real tokens; falls back to the padded forward for calls
    packing cannot serve."""
    unpacked = type(self).forward
    # hf_flash's mask function hands encoders their padding as a (B, 1, 1, N) view of the 2-D
    # mask; anything else (a dense mask, cross-attention, a cache, captured hidden states or
    # attentions, whose shapes would come out packed) runs padded.
    if (attention_mask is None
            or not _glue.bidirectional_padding(attention_mask, *hidden_states.shape[:2])
            or args or kwargs.get("encoder_hidden_states") is not None
            or kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None
            or self.config.is_decoder or _glue.capturing_outputs()):
        return unpacked(self, hidden_states, attention_mask, *args, **kwargs)
    if torch.compiler.is_compiling() and not torch._dynamo.config.capture_dynamic_output_shape_ops:
        # Packing keeps the rows of real tokens, a count only the mask's values tell: dynamo
        # traces that (nonzero) only with this option, and a graph break here would also split
        # the model's forward around it. So the compiled model stays one graph, padded.
        _untraceable_packing()
        return unpacked(self, hidden_states, attention_mask, *args, **kwargs)
    B, N, C = hidden_states.shape
    if B == 0:
        return unpacked(self, hidden_states, attention_mask, *args, **kwargs)
    keep = attention_mask[:, 0, 0, :]
    lengths = keep.sum(1, dtype=torch.int32)
    cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    compiling = torch.compiler.is_compiling()
    # The longest length sizes the kernels' grids. Compiled, the padded length bounds it instead
    # (reading it would break the graph): the kernels' programs past a sequence's end return at
    # once, so only a batch padded far past its longest sample launches many of them.
    longest = N if compiling else lengths.max()  # queued before nonzero's wait, read after it
    # The rows to keep (compiled, an unbacked count): the host waits for the GPU here, once per
    # forward.
    rows = keep.reshape(-1).nonzero().squeeze(1)
    if not compiling:
        if rows.numel() == 0:  # nothing but padding: nothing to pack
            return unpacked(self, hidden_states, attention_mask, *args, **kwargs)
        longest = int(longest)
    packed = hidden_states.reshape(B * N, C).index_select(0, rows).unsqueeze(0)
    # Valid by construction (lengths of a bool mask, at most N and summing to the rows kept), so
    # the attention calls need not check them: the keyword says so.
    out = unpacked(self, packed, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                   max_length_k=longest, **{_glue.BUILT_CU_SEQ_LENS: _glue.BUILT}, **kwargs)
    real = out[0].squeeze(0)  # a view in backward too ([0] would allocate and copy)
    full = real.new_zeros(B * N, C).index_copy(0, rows, real).view(B, N, C)
    if isinstance(out, tuple):
        return (full, *out[1:])
    out.last_hidden_state = full
    return out


def _encoders(model) -> list:
    return [m for m in model.modules() if type(m).__name__ in _ENCODERS]


def _pack(model) -> list:
    encoders = _encoders(model)
    for enc in encoders:
        # An instance attribute shadows the class's forward; deleting it restores the class's.
        enc.forward = _packed_forward.__get__(enc)
    return encoders


def _unpack(model, encoders) -> None:
    for enc in encoders:
        enc.__dict__.pop("forward", None)

FAMILY = register_family(Family(
    name="bert",
    model_types=("bert", "roberta", "electra"),
    attention_classes=("BertSelfAttention", "BertCrossAttention", "RobertaSelfAttention",
                       "RobertaCrossAttention", "ElectraSelfAttention", "ElectraCrossAttention"),
    quirks={
        "attention_probs_dropout_prob": "attention dropout inside the kernel in train mode",
        "is_decoder / add_cross_attention": "causal self-attention; cross-attention uses the "
                                            "encoder padding as key padding",
    },
    check=require_attention_interface,
    pack=_pack,
    unpack=_unpack,
))
