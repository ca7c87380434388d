"""Llama-style decoders: grouped-query attention, rotary embeddings applied before attention.

The kernel reads the key/value heads directly (enable_gqa), without repeating them. Mistral's
sliding window arrives as a windowed mask function, so those layers get a dense boolean mask
(exact, not the fast path).
"""

from hf_flash._registry import Family, register_family

from ._common import require_attention_interface


def _describe(mod) -> dict:
    groups = getattr(mod, "num_key_value_groups", 1)
    notes = []
    if groups > 1:
        notes.append(f"GQA: {groups} query heads per key/value head, read in place")
    window = getattr(getattr(mod, "config", None), "sliding_window", None)
    if window:
        notes.append(f"sliding window {window}: dense boolean mask")
    return {"reason": "; ".join(["served by the kernel"] + notes)}


FAMILY = register_family(Family(
    name="llama",
    model_types=("llama", "mistral"),
    attention_classes=("LlamaAttention", "MistralAttention"),
    quirks={
        "num_key_value_heads": "grouped-query attention in the kernel (enable_gqa)",
        "attention_dropout": "attention dropout inside the kernel in train mode",
        "sliding_window": "dense boolean mask from transformers' mask function",
    },
    check=require_attention_interface,
    describe_layer=_describe,
))
