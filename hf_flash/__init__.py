"""hf_flash: a Triton FlashAttention backend for HuggingFace transformers models."""

from .kernels import flash_attention

__version__ = "0.1.0"
__all__ = ["flash_attention", "__version__"]
