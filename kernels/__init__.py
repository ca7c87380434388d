"""Triton FlashAttention kernels. Imports torch and triton only, never transformers."""

from ._common import INTERPRET, dropout_seed
from ._dropout import dropout_mask
from ._reference import reference_attention
from .attention import MAX_HEAD_DIM, flash_attention

__all__ = ["flash_attention", "dropout_mask", "reference_attention", "MAX_HEAD_DIM", "INTERPRET", "dropout_seed"]
