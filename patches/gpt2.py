"""GPT-2.

Config quirks and how each is honoured:
- scale_attn_weights / scale_attn_by_inverse_layer_idx: GPT2Attention folds both into the
  `scaling` it passes to the attention function (1, 1/sqrt(d), divided by layer_idx + 1); the
  kernel uses that scale as given.
- reorder_and_upcast_attn: asks for q.k and the softmax in fp32 whatever the input dtype; the
  kernel always accumulates scores and runs the softmax in fp32, so every call honours it. When a
  call falls back to eager, it takes GPT-2's own upcast-and-reorder path, as unpatched eager does.
- attn_pdrop: attention dropout inside the kernel in train mode.
"""

from hf_flash._registry import Family, register_family

from ._common import require_attention_interface


def _describe(mod) -> dict:
    notes = [f"scale {mod.scaling:.4g} (scale_attn_weights={mod.scale_attn_weights}, "
             f"scale_attn_by_inverse_layer_idx={mod.scale_attn_by_inverse_layer_idx})"]
    if mod.reorder_and_upcast_attn:
        notes.append("reorder_and_upcast_attn: the kernel computes scores and softmax in fp32")
    if getattr(mod, "is_cross_attention", False):
        notes.append("cross-attention: encoder padding as key padding")
    return {"reason": "served by the kernel; " + "; ".join(notes)}


FAMILY = register_family(Family(
    name="gpt2",
    model_types=("gpt2",),
    attention_classes=("GPT2Attention",),
    quirks={
        "scale_attn_weights": "scale from the module (1/sqrt(head_dim) or 1)",
        "scale_attn_by_inverse_layer_idx": "scale divided by layer_idx + 1, from the module",
        "reorder_and_upcast_attn": "scores and softmax always fp32 in the kernel",
        "attn_pdrop": "attention dropout inside the kernel in train mode",
    },
    check=require_attention_interface,
    describe_layer=_describe,
))
