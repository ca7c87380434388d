"""hf_flash: a Triton FlashAttention backend for HuggingFace transformers models.

    import hf_flash
    model = hf_flash.patch(model)          # or from_pretrained(..., attn_implementation=hf_flash.ATTN_NAME)
    hf_flash.explain(model)                # which path each attention layer takes, and why
    hf_flash.unpatch(model)                # back to exactly what it was

Importing hf_flash registers its backend, named ATTN_NAME ("hf_triton"), with transformers' AttentionInterface and
AttentionMaskInterface (when transformers is installed).
"""

import importlib.metadata as _metadata
import importlib.util as _util
from pathlib import Path as _Path

from .kernels import flash_attention, flash_attention_varlen


def _check_kernels_not_shadowed():
    """transformers >= 5.25 imports the `kernels` distribution. With the repository root on
    sys.path (`python -m ...` run from it puts it first), the repository's kernels/ folder, which
    is hf_flash.kernels, is found under that name instead, and transformers fails with an
    ImportError that does not say why: say why here."""
    try:
        _metadata.distribution("kernels")
        found = _util.find_spec("kernels")
    except (_metadata.PackageNotFoundError, ImportError, ValueError):
        return
    ours = _util.find_spec(__name__ + ".kernels")
    if found is not None and ours is not None and found.origin == ours.origin:
        root = _Path(found.origin).parents[1]
        raise ImportError(
            f"{root} is on sys.path ahead of site-packages, so its kernels/ folder (hf_flash's "
            f"kernels) hides the 'kernels' package that transformers imports: run Python with -P "
            f"(or PYTHONSAFEPATH=1), or from another folder")


_check_kernels_not_shadowed()

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
