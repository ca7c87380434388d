"""Triton FlashAttention kernels. Imports torch and triton only, never transformers."""

if __name__ == "hf_flash.kernels":
    from ._common import INTERPRET, dropout_seed
    from ._dropout import dropout_mask, effective_dropout_p
    from ._reference import reference_attention
    from .attention import MAX_HEAD_DIM, flash_attention, flash_attention_varlen

    __all__ = ["flash_attention", "flash_attention_varlen", "dropout_mask", "effective_dropout_p",
               "reference_attention", "MAX_HEAD_DIM",
               "INTERPRET", "dropout_seed"]
else:
    # Imported as a top-level "kernels": Python was started in a checkout of this repository, whose
    # root is then on sys.path, and transformers probes for the unrelated Hub package of that name.
    # Defining nothing here keeps the kernels and their torch custom ops from being loaded a second
    # time under another module name (two registrations of one op crash torch.compile's tracing).
    # Without a __version__, transformers treats this module as no usable `kernels` install.
    __all__ = []
