"""hf_flash: a Triton FlashAttention backend for HuggingFace transformers models.

    import hf_flash
    model = hf_flash.patch(model)          # or from_pretrained(..., attn_implementation=hf_flash.ATTN_NAME)
    hf_flash.explain(model)                # which path each attention layer takes, and why
    hf_flash.unpatch(model)                # back to exactly what it was

Importing hf_flash registers its backend, named ATTN_NAME ("hf_triton"), with transformers' AttentionInterface and
AttentionMaskInterface (when transformers is installed).
"""

from .kernels import flash_attention, flash_attention_varlen

__version__ = "0.1.0"
__all__ = ["flash_attention", "flash_attention_varlen", "__version__"]

try:
    import transformers  # noqa: F401
except ImportError:  # the kernel alone works without transformers
    pass
else:
    from ._glue import ATTN_NAME, UnsupportedCallError, register as _register
    from ._patch import explain, is_patched, patch, patched, supported_models, unpatch
    from ._registry import Family, UnsupportedModelError, register_family

    _register()
    from . import patches as _patches  # noqa: F401,E402  (registers the families)

    __all__ += ["patch", "unpatch", "patched", "is_patched", "explain", "supported_models",
                "ATTN_NAME", "UnsupportedModelError", "UnsupportedCallError", "Family",
                "register_family"]
