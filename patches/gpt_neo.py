"""GPT-Neo: its attention does not go through AttentionInterface, so its layers are patched.

GPT-Neo differs from GPT-2 in ways that matter here:
- no score scaling at all (the kernel runs with scale 1.0);
- scores in fp32 (the kernel always accumulates them in fp32);
- "local" layers see only the previous `window_size` positions: a dense boolean window mask,
  bottom-right aligned like its causal mask; "global" layers are plain causal (fast path).

Patching swaps each GPTNeoSelfAttention's class for a subclass that computes `_attn` with the
kernel, and sets the config's attention implementation to hf_flash's so masks come from hf_flash's
mask function. `from_pretrained(..., attn_implementation=hf_flash.ATTN_NAME)` builds the same subclass.
"""

import torch

from hf_flash import _glue
from hf_flash._registry import Family, UnsupportedModelError, register_family
from hf_flash.kernels import flash_attention

try:
    from transformers.models.gpt_neo import modeling_gpt_neo as _neo
except ImportError:  # pragma: no cover - transformers without GPT-Neo
    _neo = None


def _window_mask(q_len, k_len, window, device):
    rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    cols = torch.arange(k_len, device=device)[None, :]
    return ((cols <= rows) & (cols > rows - window))[None, None]


if _neo is not None:
    class GPTNeoFlashSelfAttention(_neo.GPTNeoSelfAttention):
        """GPTNeoSelfAttention whose `_attn` runs hf_flash's kernel (same weights, same buffers)."""

        def forward(self, hidden_states, attention_mask=None, layer_past=None, use_cache=False,
                    output_attentions=False, **kwargs):
            # `_attn` cannot see output_attentions; GPT-Neo collects the weights it returns.
            self._hf_flash_need_weights = bool(output_attentions)
            return super().forward(hidden_states, attention_mask=attention_mask,
                                   layer_past=layer_past, use_cache=use_cache,
                                   output_attentions=output_attentions, **kwargs)

        def _attn(self, query, key, value, attention_mask=None):
            q_len, k_len = query.shape[2], key.shape[2]
            reason = None
            if getattr(self, "_hf_flash_need_weights", False):
                reason = _glue._UNSERVABLE_KWARGS["output_attentions"]
            else:
                reason = _glue.unservable_reason(self, query, key, value, {})
            if reason is not None:
                if _glue.options_of(self)["fallback"] == "raise":
                    raise _glue.UnsupportedCallError(
                        f"hf_flash cannot serve GPTNeoSelfAttention with {reason} "
                        f"(patched with fallback='raise')")
                _glue.warn_once(reason, "GPTNeoSelfAttention")
                _glue._record(self, "eager", reason)
                # GPT-Neo's eager `_attn` applies its own causal/window mask from self.bias, so
                # only the padding part (or a dense mask) is handed over, in additive form.
                mask = _glue.eager_mask(attention_mask, False, q_len, k_len, torch.float32,
                                        query.device)
                return _neo.GPTNeoSelfAttention._attn(self, query, key, value, mask)

            dropout_p = self.attn_dropout.p if self.training else 0.0
            if self.attention_type == "local":
                allowed = _window_mask(q_len, k_len, self.config.window_size, query.device)
                if attention_mask is None:
                    dense = allowed
                elif attention_mask.dim() == 2:
                    dense = allowed & attention_mask[:, None, None, :]
                elif attention_mask.dtype == torch.bool:
                    dense = allowed & attention_mask
                else:
                    dense = attention_mask.masked_fill(~allowed, float("-inf"))
                _glue._record(self, "kernel", f"dense window {self.config.window_size}")
                out = flash_attention(query, key, value, attn_mask=dense, dropout_p=dropout_p,
                                      scale=1.0)
            else:
                mask_args, detail = _glue.kernel_mask_args(attention_mask, True, q_len, k_len,
                                                           query.shape[0])
                _glue._record(self, "kernel", detail)
                out = flash_attention(query, key, value, dropout_p=dropout_p, scale=1.0,
                                      **mask_args)
            return out, None

    # Lets from_pretrained(..., attn_implementation=ATTN_NAME) build GPT-Neo: its attention
    # wrapper picks the layer class from this table by config._attn_implementation.
    _neo.GPT_NEO_ATTENTION_CLASSES.setdefault(_glue.ATTN_NAME, GPTNeoFlashSelfAttention)


def _layers(model):
    return [m for m in model.modules() if isinstance(m, _neo.GPTNeoSelfAttention)]


def _check(model) -> None:
    others = sorted({type(m).__name__ for m in _layers(model)
                     if type(m) not in (_neo.GPTNeoSelfAttention, GPTNeoFlashSelfAttention)})
    if others:
        raise UnsupportedModelError(
            f"GPT-Neo layers of class {others} cannot be patched; load the model with "
            f"attn_implementation='eager' (or '{_glue.ATTN_NAME}')")


def _apply(model):
    swapped = []
    for m in _layers(model):
        if type(m) is _neo.GPTNeoSelfAttention:
            m.__class__ = GPTNeoFlashSelfAttention
            swapped.append(m)
    model.config._attn_implementation_internal = _glue.ATTN_NAME
    return swapped


def _revert(model, swapped):
    # `swapped` is None for a model built with attn_implementation=ATTN_NAME: every layer goes
    # back to the plain eager class then.
    for m in (swapped if swapped is not None else _layers(model)):
        m.__class__ = _neo.GPTNeoSelfAttention
        m.__dict__.pop("_hf_flash_need_weights", None)
    if swapped is None:
        model.config._attn_implementation_internal = "eager"


def _describe(mod) -> dict:
    if mod.attention_type == "local":
        mask = f"dense boolean sliding window of {mod.config.window_size} (bottom-right aligned)"
    else:
        mask = "causal (bottom-right with a KV cache); padding as key-padding lengths"
    return {"mask": mask, "scale": 1.0,
            "reason": "served by the kernel; GPT-Neo does not scale scores (scale 1.0)"}


FAMILY = register_family(Family(
    name="gpt_neo",
    model_types=("gpt_neo",),
    attention_classes=("GPTNeoSelfAttention",),
    quirks={
        "(no scaling)": "scale 1.0",
        "attention_layers / window_size": "local layers get a dense sliding-window mask",
        "attention_dropout": "attention dropout inside the kernel in train mode",
    },
    check=_check,
    apply=_apply,
    revert=_revert,
    describe_layer=_describe,
)) if _neo is not None else None
