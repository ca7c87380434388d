"""The two functions transformers calls once hf_flash's backend is the attention implementation.

`hf_flash_mask` is registered with transformers' AttentionMaskInterface: masking_utils calls it
instead of building a dense (batch, 1, q_len, k_len) mask. It answers with the cheapest form the
kernel can use, and falls back to transformers' own dense boolean mask for anything else:

    None                    no padding, plain causal (bottom-right aligned) or plain bidirectional
    bool (batch, k_len)     only key padding (left or right) on a plain causal mask: the kernel's
                            fast path
    bool (batch,1,1,k_len)  only key padding on a plain bidirectional mask: the same fast path (a
                            view of the 2-D mask)
    bool (batch,1,q,k)      anything else: sliding windows, packed sequences, custom mask functions,
                            static caches, models that ask for a materialised mask

`hf_flash_attention` is registered with AttentionInterface and reads those forms back. A None or
2-D mask carries no causal information of its own: causality comes from the module (or the
`is_causal` keyword transformers passes down), bottom-right aligned, which is what a KV cache needs
and equals top-left when q_len == k_len. A 4-D mask is complete, as with SDPA: that is why key
padding on a bidirectional mask travels as (batch, 1, 1, k_len), since some encoders' modules say
is_causal=True (Phi-4-multimodal's vision encoder), and SDPA, handed a 4-D mask, ignores that flag.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from typing import Any, Optional

import torch

from .kernels import MAX_HEAD_DIM, flash_attention, flash_attention_varlen
from .kernels.attention import CheckedOnce

# The name models use for this backend. It must not contain "flash": transformers treats every
# attn_implementation containing that word as a flash-attn kernel (it tries to import one at load
# time, and GPT-Neo and generate() switch code paths on it), checked in 5.17 and 5.23.
ATTN_NAME = "hf_triton"

# Keyword arguments transformers passes down to attention functions that change nothing for us:
# the mask already encodes sliding windows and packing, the cache was applied before the call.
_IGNORED_KWARGS = frozenset({
    "position_ids", "cache_position", "use_cache", "past_key_values", "past_key_value",
    "output_hidden_states", "return_dict", "sliding_window", "layer_idx", "labels",
    "token_type_ids",
    "position_embeddings", "logits_to_keep", "output_router_logits", "encoder_hidden_states",
    "encoder_attention_mask", "kwargs", "num_items_in_batch",
})

# Keyword arguments whose presence (with a value that is not None/False) the kernel cannot honour.
_UNSERVABLE_KWARGS = {
    "output_attentions": "output_attentions=True (the kernel never materialises attention weights)",
    "head_mask": "a head_mask",
    "softcap": "logit soft-capping (softcap)",
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks",
    "position_bias": "an additive position bias (position_bias)",
}

DEFAULT_OPTIONS = {"fallback": "eager", "packed": False}
_FALLBACKS = ("eager", "raise")
_warned: set = set()


class UnsupportedCallError(RuntimeError):
    """Raised (with fallback="raise") when the kernel cannot serve an attention call."""


# ----------------------------------------------------------------------------------------------
# Mask interface
# ----------------------------------------------------------------------------------------------

def _is_tracing(tensor) -> bool:
    """True under torch.compile/export/jit, where reading a mask's values would break the graph."""
    if torch.compiler.is_compiling():
        return True
    try:
        from transformers.utils.import_utils import is_tracing
    except ImportError:  # pragma: no cover
        return False
    return bool(is_tracing(tensor))


def hf_flash_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                  mask_function=None, attention_mask: Optional[torch.Tensor] = None,
                  local_size: Optional[int] = None, allow_is_causal_skip: bool = True,
                  allow_is_bidirectional_skip: bool = False, **kwargs):
    """AttentionMaskInterface entry: see the module docstring for what it returns."""
    _refuse_bypassing_models(kwargs.get("config"))
    form = _cheap_form(q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                       local_size, allow_is_causal_skip, allow_is_bidirectional_skip)
    if form is not False:
        return form
    from transformers.masking_utils import sdpa_mask

    # Dense: transformers builds the exact boolean mask from whatever mask function it chose.
    kwargs.pop("dtype", None)
    kwargs.pop("config", None)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)


# Per config class: the name of the model class it builds when that model's attention never calls
# AttentionInterface, else None.
_bypassing: dict = {}


def _refuse_bypassing_models(config) -> None:
    """Raise when the model asking for a mask would run attention of its own with it.

    Such models (BLOOM, XGLM, MPT, TrOCR, BLIP's text model, ... in transformers 5.x) accept any
    registered attn_implementation, ask this function for their masks, then add them to their
    own scores: the cheap forms would be read as something else (BLOOM at batch 1 lost
    causality), and hf_flash's kernel never runs. transformers' own test for a model class that
    can switch implementation (`_can_set_attn_implementation`) decides, for the classes built on
    the config's class; model types hf_flash patches layer by layer (GPT-Neo) read these masks
    themselves.
    """
    if config is None:
        return
    name = _bypassing_model_of(type(config), getattr(config, "model_type", None))
    if name is not None:
        from ._registry import UnsupportedModelError
        raise UnsupportedModelError(
            f"hf_flash: {name}'s attention does not go through transformers' AttentionInterface, "
            f"so with attn_implementation='{ATTN_NAME}' it would apply hf_flash's masks in its own "
            f"attention and never reach hf_flash's kernel; load it with 'sdpa' or 'eager' "
            f"(hf_flash.supported_models() lists what hf_flash serves)")


@torch._dynamo.assume_constant_result
def _bypassing_model_of(config_class: type, model_type: Optional[str]) -> Optional[str]:
    """_bypassing_model, once per config class. Compiled, run while dynamo traces, outside the
    graph: filling the cache inside it would make the graph guard on the cache, and recompile
    on the next call, once the cache holds what the first call put there. Its arguments are
    constants (a class, a string): torch 2.11's dynamo passes no other objects to such a call."""
    key = (config_class, model_type)
    if key not in _bypassing:
        _bypassing[key] = _bypassing_model(config_class, model_type)
    return _bypassing[key]


def _bypassing_model(config_class: type, model_type: Optional[str]) -> Optional[str]:
    """The name of a model class built on this config class (found among the loaded modules of
    the config's own package) whose attention never calls AttentionInterface, else None."""
    from transformers import PreTrainedModel

    from ._registry import supported_model_types

    if model_type in supported_model_types():
        return None
    package = config_class.__module__.rpartition(".")[0] + "."
    found = [obj for name, module in list(sys.modules.items())
             if name.startswith(package) and module is not None
             for obj in list(vars(module).values())
             if isinstance(obj, type) and issubclass(obj, PreTrainedModel)
             and obj.__module__ == name and obj.config_class is config_class
             and _runs_its_own_attention(obj)]
    # Named by a model class users build (BloomModel), not the shared base (BloomPreTrainedModel).
    found.sort(key=lambda cls: cls.__name__.endswith("PreTrainedModel"))
    return found[0].__name__ if found else None


def _runs_its_own_attention(cls) -> bool:
    # transformers' own test reads the class's module source; a model whose source cannot be read
    # (defined in a notebook or on stdin) fails that test whatever it does, so it is trusted.
    try:
        inspect.getsource(sys.modules[cls.__module__])
    except (KeyError, OSError, TypeError):
        return False
    can_set = getattr(cls, "_can_set_attn_implementation", None)
    return can_set is not None and not can_set()


def _cheap_form(q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                local_size, allow_is_causal_skip, allow_is_bidirectional_skip):
    """None / key padding when exact, False when a dense mask is needed."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    # Identity checks on purpose: sliding windows, packed sequences, chunking and or/and overlays
    # all arrive as other (wrapped) functions, and any of them needs the dense mask.
    if mask_function is causal_mask_function:
        if not allow_is_causal_skip:  # e.g. a model that concatenates masks, or compiled decoding
            return False
        # The kernel's bottom-right causal is kv_idx <= q_idx + (kv_len - q_len); the mask asked
        # for is kv_idx + kv_offset <= q_idx + q_offset. Tensor offsets (static caches) go dense.
        if not (isinstance(q_offset, int) and isinstance(kv_offset, int)):
            return False
        if q_offset - kv_offset != kv_length - q_length:
            return False
    elif mask_function is bidirectional_mask_function:
        # allow_is_bidirectional_skip=False means the caller wants a materialised mask.
        if not allow_is_bidirectional_skip:
            return False
        if not isinstance(kv_offset, int):
            return False
    else:
        return False
    if local_size is not None:
        return False
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.dtype != torch.bool:
        return False
    end = kv_offset + kv_length
    if attention_mask.shape[-1] < end:
        # Same convention as transformers: keys beyond the 2-D mask are not real tokens.
        attention_mask = torch.nn.functional.pad(attention_mask, (0, end - attention_mask.shape[-1]))
    # Handed over even when it holds no padding: testing for that would cost a host sync every
    # forward pass (it stalls the launch queue), while an all-True mask costs the kernel one byte
    # load per key tile.
    if mask_function is bidirectional_mask_function:
        return attention_mask[:, None, None, kv_offset:end]  # complete: never causal
    return attention_mask[:, kv_offset:end]


# ----------------------------------------------------------------------------------------------
# Attention interface
# ----------------------------------------------------------------------------------------------

def _capturing_attentions() -> bool:
    """True when transformers' output capture wants attention weights (output_attentions=True).

    Some models (GPT-2, GPT-Neo) consume `output_attentions` themselves and never pass it down,
    so the capture context is the reliable signal.
    """
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - older layouts
        return False
    collected = _active_collector.get()
    return bool(collected) and any("attentions" in k for k in collected)


def capturing_outputs() -> bool:
    """True when transformers' output capture collects anything (hidden states, attentions)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - older layouts
        return False
    return bool(_active_collector.get())


# The keyword hf_flash's packed encoder (patches/bert.py) passes beside the cu_seq_lens it built
# itself, valid by construction, and its value: the kernels then skip checking them in every
# layer. The value is an object of hf_flash's own, so no caller's keyword can pass for it
# (transformers hands a model's keyword arguments down to every attention call).
BUILT_CU_SEQ_LENS = "hf_flash_cu_seq_lens_built"
BUILT = object()


def packed_rows(attention_mask, query, key, kwargs):
    """(cu_seqlens, max_len, built) when the call is over packed sequences, else None; `built`
    when hf_flash's packed encoder made them.

    transformers passes cumulative lengths (cu_seq_lens_q/k) for sequences packed into one row
    of a batch of one, as FlashAttention's varlen API takes them. With no mask beside them, they
    are the whole mask; a 4-D mask, when given, is complete by itself and wins.
    """
    cu_q, cu_k = kwargs.pop("cu_seq_lens_q", None), kwargs.pop("cu_seq_lens_k", None)
    max_q, max_k = kwargs.pop("max_length_q", None), kwargs.pop("max_length_k", None)
    built = kwargs.pop(BUILT_CU_SEQ_LENS, None) is BUILT
    if cu_q is None or attention_mask is not None:
        return None
    if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise ValueError(f"hf_flash: cu_seq_lens_q describes sequences packed into one row, but "
                         f"query has batch {query.shape[0]} and {query.shape[2]} rows against "
                         f"{key.shape[2]} key rows; packed self-attention needs batch 1 and equal "
                         f"rows")
    if cu_k is not None and cu_k is not cu_q:
        _check_same_cu_seq_lens(cu_q, cu_k)
    max_len = max_q if max_q is not None else max_k
    return (cu_q.to(torch.int32), (int(max_len) if max_len is not None else None),
            built and cu_k is cu_q and max_len is not None)


_DIFFERENT_CU_SEQ_LENS = ("hf_flash: cu_seq_lens_k differs from cu_seq_lens_q; packed attention "
                          "is served for self-attention, where both are the same")
_CU_PAIR_CHECKED = CheckedOnce()


def _check_same_cu_seq_lens(cu_q, cu_k) -> None:
    """cu_seq_lens_k must hold cu_seq_lens_q's values. transformers' padding-free collator
    (DataCollatorWithFlattening) gives two tensors of the same values, moved to the device one
    by one, so identity cannot tell. Comparing values on the host would make the host wait for
    the GPU in every layer, and break a compiled graph; so, as for the lengths themselves
    (kernels/attention.py), a GPU or a compiled call queues a device-side assertion instead,
    once for the pair a model hands every layer. The CPU raises at once."""
    if cu_k.shape != cu_q.shape or cu_k.device != cu_q.device:
        raise ValueError(f"{_DIFFERENT_CU_SEQ_LENS} (shape {tuple(cu_k.shape)} on {cu_k.device} "
                         f"against {tuple(cu_q.shape)} on {cu_q.device})")
    if cu_q.device.type == "cpu" and not torch.compiler.is_compiling():
        if not torch.equal(cu_k, cu_q):
            raise ValueError(_DIFFERENT_CU_SEQ_LENS)
    elif torch.compiler.is_compiling() or not _CU_PAIR_CHECKED.seen((cu_q, cu_k), ()):
        torch._assert_async((cu_k == cu_q).all(), _DIFFERENT_CU_SEQ_LENS)


def unservable_reason(module, query, key, value, kwargs) -> Optional[str]:
    """Why the kernel cannot serve this call, or None when it can."""
    if _capturing_attentions():
        return _UNSERVABLE_KWARGS["output_attentions"]
    for name, value_ in kwargs.items():
        if name in _UNSERVABLE_KWARGS:
            if value_ is not None and value_ is not False:
                return _UNSERVABLE_KWARGS[name]
        elif name not in _IGNORED_KWARGS and value_ is not None and value_ is not False:
            # Unknown arguments may change the maths; never ignore them silently.
            return f"an argument the kernel does not understand ({name}={type(value_).__name__})"
    for t in (query, key, value):
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"dtype {t.dtype} (the kernel supports float16, bfloat16 and float32)"
        if t.device.type not in ("cuda", "cpu"):
            return f"device {t.device} (the kernel runs on CUDA, or the CPU for testing)"
    d = query.shape[-1]
    if key.shape[-1] != d or value.shape[-1] != d:
        return f"different head dims for query/key/value ({d}, {key.shape[-1]}, {value.shape[-1]})"
    if d > MAX_HEAD_DIM:
        return f"head dim {d} > {MAX_HEAD_DIM}"
    h_q, h_kv = query.shape[1], key.shape[1]
    if (h_kv == 0 and h_q != 0) or (h_kv != 0 and h_q % h_kv != 0):
        return f"{h_q} query heads are not a multiple of {h_kv} key heads"
    return None


def _module_is_causal(module, is_causal: Optional[bool]) -> bool:
    # transformers passes is_causal down when the config overrides it (decoders used
    # bidirectionally); otherwise the module's own flag decides, exactly as for SDPA.
    return bool(is_causal) if is_causal is not None else bool(getattr(module, "is_causal", False))


def kernel_mask_args(attention_mask, causal: bool, q_len: int, k_len: int, batch: int):
    """Map the mask interface's output (plus module causality) to flash_attention arguments.

    Returns (keyword arguments for flash_attention: attn_mask, is_causal, causal_alignment and
    key_padding_mask; a description of the path for explain()).
    """
    def args(attn_mask=None, is_causal=False, alignment="top_left", kpm=None):
        return dict(attn_mask=attn_mask, is_causal=is_causal, causal_alignment=alignment,
                    key_padding_mask=kpm)

    if attention_mask is None or attention_mask.dim() == 2:
        kpm = attention_mask
        if kpm is not None:
            if kpm.dtype != torch.bool:
                raise TypeError(f"hf_flash: a 2-D attention mask must be bool, got {kpm.dtype}")
            if tuple(kpm.shape) != (batch, k_len):
                raise ValueError(f"hf_flash: 2-D attention mask has shape {tuple(kpm.shape)}, "
                                 f"expected (batch, k_len) = {(batch, k_len)}")
        pad = "key padding" if kpm is not None else "no mask"
        if not causal:
            return args(kpm=kpm), pad
        if q_len == k_len:
            return args(is_causal=True, kpm=kpm), f"causal, {pad}"
        # q_len != k_len: a KV cache; the last query sees every key. (Said with the keyword, not
        # a CausalBias: each of those allocates a dense (2, q_len, k_len) tensor.)
        return (args(is_causal=True, alignment="bottom_right", kpm=kpm),
                f"causal bottom-right, {pad}")
    if attention_mask.dim() == 4 and bidirectional_padding(attention_mask, batch, k_len):
        return args(kpm=attention_mask[:, 0, 0, :]), "key padding"
    if attention_mask.dim() == 4:
        # Complete as given (causality included), as SDPA treats it.
        kind = "dense bool" if attention_mask.dtype == torch.bool else "dense additive"
        return args(attn_mask=attention_mask), kind
    raise ValueError(f"hf_flash: attention mask of shape {tuple(attention_mask.shape)} is neither "
                     f"2-D key padding nor a 4-D mask")


def bidirectional_padding(attention_mask, batch: int, k_len: int) -> bool:
    """True for the (batch, 1, 1, k_len) bool form: key padding, nothing else, never causal."""
    return (attention_mask.dtype == torch.bool
            and tuple(attention_mask.shape) == (batch, 1, 1, k_len))


def eager_mask(attention_mask, causal: bool, q_len: int, k_len: int, dtype, device):
    """The additive float mask eager attention expects, from any of hf_flash's mask forms."""
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool:
            return attention_mask
        allowed = attention_mask
    else:
        allowed = None
        if causal:
            rows = torch.arange(q_len, device=device)[:, None]
            cols = torch.arange(k_len, device=device)[None, :]
            allowed = (cols <= rows + (k_len - q_len))[None, None]
        if attention_mask is not None:
            kp = attention_mask[:, None, None, :]
            allowed = kp if allowed is None else (allowed & kp)
        if allowed is None:
            return None
    return torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def options_of(module) -> dict:
    return getattr(module, "_hf_flash_options", None) or DEFAULT_OPTIONS


def warn_once(reason: str, where: str) -> None:
    warn_once_text(f"{where} falls back to eager attention for calls with {reason}", stacklevel=5)


@torch._dynamo.assume_constant_result
def warn_once_text(text: str, stacklevel: int = 4) -> bool:
    """Warns once per text. Compiled, it runs while dynamo traces, outside the graph (dynamo
    cannot trace warnings.warn: a graph break, and with fullgraph=True an error); so its
    arguments must be constants (torch 2.11's rule for such functions)."""
    if text not in _warned:
        _warned.add(text)
        warnings.warn(f"hf_flash: {text}", stacklevel=stacklevel)
    return True


def _eager_function(module):
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise UnsupportedCallError(
            f"hf_flash cannot fall back to eager for {type(module).__name__}: its modeling file "
            f"has no eager_attention_forward")
    return fn


def _record(module, path: str, detail: str) -> None:
    # Read back by explain(); skipped while compiling so the graph has no side effects. (Writing
    # it while dynamo traces, through assume_constant_result, would take the module as an
    # argument, which torch 2.11's dynamo refuses: only constants and tensors pass.)
    if not torch.compiler.is_compiling():
        try:
            object.__setattr__(module, "_hf_flash_last_call", (path, detail))
        except Exception:  # pragma: no cover - exotic modules with __slots__
            pass


def hf_flash_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                       dropout: float = 0.0, scaling: Optional[float] = None,
                       is_causal: Optional[bool] = None, **kwargs: Any):
    """AttentionInterface entry: (batch, heads, seq, dim) in, ((batch, seq, heads, dim), None) out."""
    causal = _module_is_causal(module, is_causal)
    q_len, k_len = query.shape[2], key.shape[2]
    packed = packed_rows(attention_mask, query, key, kwargs)
    reason = unservable_reason(module, query, key, value, kwargs)
    if reason is not None and packed is not None:
        raise UnsupportedCallError(f"hf_flash cannot serve {type(module).__name__} with {reason}, "
                                   f"and eager attention cannot serve packed sequences")
    if reason is not None:
        where = type(module).__name__
        if options_of(module)["fallback"] == "raise":
            raise UnsupportedCallError(f"hf_flash cannot serve {where} with {reason} "
                                       f"(patched with fallback='raise')")
        warn_once(reason, where)
        _record(module, "eager", reason)
        mask = eager_mask(attention_mask, causal, q_len, k_len, query.dtype, query.device)
        if getattr(module, "reorder_and_upcast_attn", False) and hasattr(
                module, "_upcast_and_reordered_attn"):
            # GPT-2's eager path with reorder_and_upcast_attn=True takes this route, not the
            # module file's eager function; match it so a fallback changes nothing.
            return module._upcast_and_reordered_attn(query, key, value, mask)
        return _eager_function(module)(module, query, key, value, mask, dropout=dropout,
                                       scaling=scaling, **kwargs)

    if packed is not None:
        cu, max_len, built = packed
        _record(module, "kernel", f"packed sequences{', causal' if causal else ''}")
        # The (1, H, T, D) layout as it comes: no view to (T, H, D) and back, whose autograd
        # nodes cost host time in every layer's forward and backward.
        out = flash_attention_varlen(query, key, value, cu, max_len,
                                     dropout_p=float(dropout), is_causal=causal, scale=scaling,
                                     enable_gqa=query.shape[1] != key.shape[1],
                                     _cu_seqlens_checked=built)
        return out.transpose(1, 2), None
    mask_args, detail = kernel_mask_args(attention_mask, causal, q_len, k_len, query.shape[0])
    _record(module, "kernel", detail)
    out = flash_attention(query, key, value, dropout_p=float(dropout), scale=scaling,
                          enable_gqa=query.shape[1] != key.shape[1], **mask_args)
    # The kernel keeps the query's layout: for HF's transposed query this is already contiguous.
    return out.transpose(1, 2).contiguous(), None


_registered = False


def register() -> None:
    """Make ATTN_NAME a valid attn_implementation everywhere in transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers.modeling_utils import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, hf_flash_attention)
    AttentionMaskInterface.register(ATTN_NAME, hf_flash_mask)
    _registered = True
