"""BERT-style encoders: BERT, RoBERTa, ELECTRA.

Their self-attention goes through AttentionInterface with `scaling = head_size ** -0.5` and
`dropout = attention_probs_dropout_prob` in train mode, so the generic glue serves them as is. The
encoder mask is bidirectional: no mask at all without padding, key-padding lengths with it (the
kernel's fast path). As decoders (is_decoder=True) they are causal; cross-attention is
bidirectional over the encoder states, with the encoder's padding as key padding.
"""

from hf_flash._registry import Family, register_family

from ._common import require_attention_interface

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
))
