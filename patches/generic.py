"""Any other model whose attention goes through transformers' AttentionInterface.

Calls carrying something the kernel cannot express (soft-capping, attention sinks, position
biases, unknown arguments) run eager attention for that call with a warning naming the reason.
"""

from hf_flash._registry import Family, register_family


def _matches(model) -> bool:
    try:
        return bool(type(model)._can_set_attn_implementation())
    except AttributeError:  # not a transformers model
        return False


FAMILY = register_family(Family(
    name="generic",
    model_types=(),
    quirks={"anything unusual": "eager for that call, with a warning naming the reason"},
    matches=_matches,
))
