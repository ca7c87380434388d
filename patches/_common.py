"""Checks shared by the family modules."""

from hf_flash._registry import UnsupportedModelError


def require_attention_interface(model) -> None:
    """Refuse, before anything changes, a model whose attention transformers cannot redirect."""
    if not type(model)._can_set_attn_implementation():
        raise UnsupportedModelError(
            f"{type(model).__name__} does not route its attention through transformers' "
            f"AttentionInterface in this transformers version, so hf_flash cannot patch it")
