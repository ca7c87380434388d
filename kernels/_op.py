"""The kernels behind autograd, two ways.

- Under torch.compile: torch.library custom ops with fake (meta) implementations, so attention is
  one opaque node and a compiled model has no graph break there.
- In eager mode: a plain autograd.Function calling the same launchers. Custom-op dispatch costs
  tens of microseconds of Python per call, which small attention calls cannot hide, and the
  Function can keep the key range it computed in forward for backward.
"""

import contextlib
from typing import Optional

import torch
from torch.autograd import forward_ad as _forward_ad

from ._backward import attention_backward
from ._common import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, LOG2E, MASK_BOOL, MASK_FLOAT, MASK_NONE
from ._forward import attention_forward
from ._key_range import key_range


def _mask_kind(mask: Optional[torch.Tensor]) -> int:
    if mask is None:
        return MASK_NONE
    return MASK_BOOL if mask.dtype in (torch.bool, torch.uint8) else MASK_FLOAT


def _key_range(kpm: Optional[torch.Tensor]):
    """Per-batch [lo, hi) holding every real key, computed on the device for this call
    (_key_range.py): tiles outside it are skipped; holes inside it are masked from `kpm`
    itself, so any boolean key padding mask is exact."""
    if kpm is None:
        return None, None
    return key_range(_as_u8(kpm))


def _causal_offset(causal: int, n_q: int, n_k: int) -> int:
    return n_k - n_q if causal == CAUSAL_BOTTOM_RIGHT else 0


def _as_u8(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # Triton loads bytes; a bool tensor viewed as uint8 keeps its strides (broadcast ones too).
    return t.view(torch.uint8) if t is not None and t.dtype == torch.bool else t


@torch.library.custom_op("hf_flash::attention_forward", mutates_args=())
def _attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: Optional[torch.Tensor], kpm: Optional[torch.Tensor], causal: int,
                          scale: float, dropout_p: float, seed: Optional[torch.Tensor],
                          cu_seqlens: Optional[torch.Tensor], max_seqlen: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = _key_range(kpm)
    return attention_forward(
        q, k, v, _as_u8(mask), _mask_kind(mask), _as_u8(kpm), lo, hi, causal != CAUSAL_NONE,
        _causal_offset(causal, q.shape[2], k.shape[2]), scale, dropout_p, seed, cu_seqlens,
        max_seqlen)


@_attention_forward_op.register_fake
def _(q, k, v, mask, kpm, causal, scale, dropout_p, seed, cu_seqlens, max_seqlen):
    B, H, n_q, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, 3, n_q), dtype=torch.float32)


@torch.library.custom_op("hf_flash::attention_backward", mutates_args=())
def _attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           o: torch.Tensor, stats: torch.Tensor, dlse: Optional[torch.Tensor],
                           mask: Optional[torch.Tensor], kpm: Optional[torch.Tensor], causal: int,
                           scale: float, dropout_p: float, seed: Optional[torch.Tensor],
                           cu_seqlens: Optional[torch.Tensor], max_seqlen: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lo, hi = _key_range(kpm)
    if do.stride(-1) != 1:  # e.g. the all-zero-stride gradient of out.sum()
        do = do.contiguous()
    return attention_backward(
        do, q, k, v, o, stats, dlse, _as_u8(mask), _mask_kind(mask), _as_u8(kpm), lo, hi,
        causal != CAUSAL_NONE, _causal_offset(causal, q.shape[2], k.shape[2]), scale,
        dropout_p, seed, cu_seqlens, max_seqlen)


@_attention_backward_op.register_fake
def _(do, q, k, v, o, stats, dlse, mask, kpm, causal, scale, dropout_p, seed, cu_seqlens,
      max_seqlen):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, kpm, causal, scale, dropout_p, seed, cu_seqlens, max_seqlen = inputs
    o, stats = output
    ctx.save_for_backward(q, k, v, o, stats, mask, kpm, seed, cu_seqlens)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.max_seqlen = causal, scale, dropout_p, max_seqlen


def _backward(ctx, do, dstats):
    q, k, v, o, stats, mask, kpm, seed, cu_seqlens = ctx.saved_tensors
    # Only the lse plane of stats reaches the user (see attention()); its terms get no gradient.
    dlse = dstats[:, :, 0] if dstats is not None else None
    dq, dk, dv = _attention_backward_op(do, q, k, v, o, stats, dlse, mask, kpm, ctx.causal,
                                        ctx.scale, ctx.dropout_p, seed, cu_seqlens,
                                        ctx.max_seqlen)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


# The profiler event of a call made without autograd (what counts kernel calls in a profile looks
# for it beside "_FlashAttention" and the custom op's name).
NO_GRAD_EVENT = "hf_flash::attention (no grad)"
_profiler_enabled = getattr(torch._C._autograd, "_profiler_enabled", lambda: False)


def _forward(q, k, v, mask, kpm, causal, scale, dropout_p, seed, cu_seqlens, max_seqlen):
    """(out, stats, key range lo, hi, causal offset): the forward launch, shared by both paths."""
    lo, hi = _key_range(kpm)
    offset = _causal_offset(causal, q.shape[2], k.shape[2])
    o, stats = attention_forward(q, k, v, _as_u8(mask), _mask_kind(mask), _as_u8(kpm), lo, hi,
                                 causal != CAUSAL_NONE, offset, scale, dropout_p, seed,
                                 cu_seqlens, max_seqlen)
    return o, stats, lo, hi, offset


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, kpm, causal, scale, dropout_p, seed, cu_seqlens, max_seqlen):
        o, stats, lo, hi, offset = _forward(q, k, v, mask, kpm, causal, scale, dropout_p, seed,
                                            cu_seqlens, max_seqlen)
        ctx.save_for_backward(q, k, v, o, stats, mask, kpm, seed, lo, hi, cu_seqlens)
        ctx.causal, ctx.scale, ctx.dropout_p, ctx.offset = causal, scale, dropout_p, offset
        ctx.max_seqlen = max_seqlen
        ctx.set_materialize_grads(False)
        return o, stats[:, :, 0]

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, stats, mask, kpm, seed, lo, hi, cu_seqlens = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        elif do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv = attention_backward(
            do, q, k, v, o, stats, dlse, _as_u8(mask), _mask_kind(mask), _as_u8(kpm), lo, hi,
            ctx.causal != CAUSAL_NONE, ctx.offset, ctx.scale, ctx.dropout_p, seed, cu_seqlens,
            ctx.max_seqlen)
        if torch.is_grad_enabled():  # create_graph=True
            dq, dk, dv = _no_second_derivative(dq, dk, dv)
        return dq, dk, dv, None, None, None, None, None, None, None, None


_NO_SECOND = (b"hf_flash attention has no second derivative: its gradients, taken with "
              b"create_graph=True, cannot be differentiated again")


def _no_second_derivative(*grads):
    """`grads` as tensors whose own backward raises. The kernels' gradients depend on q, k and
    v through tensors autograd does not see, so under create_graph=True they would otherwise
    come back as constants and a second derivative as silent zeros. (once_differentiable only
    guards gradients whose incoming gradient itself requires grad.)"""
    try:
        err = torch._C._functions.DelayedError(_NO_SECOND, len(grads))
    except (AttributeError, TypeError):  # pragma: no cover - a torch without it: fail now
        raise RuntimeError(_NO_SECOND.decode()) from None
    return err(*[g.detach().requires_grad_() for g in grads])


def attention(q, k, v, mask, kpm, causal, scale, dropout_p, seed, cu_seqlens=None, max_seqlen=0):
    """(out, base-2 lse) with autograd; the custom op when compiling, the Function otherwise, and
    with no gradient to track (inference, decoding) the bare launch: autograd.Function.apply
    costs ~10 us of host time a call even under no_grad, which decode steps feel."""
    if torch.compiler.is_compiling():
        o, stats = _attention_forward_op(q, k, v, mask, kpm, causal, scale, dropout_p, seed,
                                         cu_seqlens, max_seqlen)
        return o, stats[:, :, 0]
    needs_autograd = (torch.is_grad_enabled()
                      and (q.requires_grad or k.requires_grad or v.requires_grad))
    # Forward-mode AD's dual tensors do not set requires_grad: inside a dual level the Function
    # runs, and refuses them (it has no jvp), rather than returning a result with no tangent.
    if not needs_autograd and _forward_ad._current_level < 0:
        # Named in profiles, as the Function is; record_function costs ~8 us, so only then.
        named = (torch.profiler.record_function(NO_GRAD_EVENT) if _profiler_enabled()
                 else contextlib.nullcontext())
        with named:
            o, stats = _forward(q, k, v, mask, kpm, causal, scale, dropout_p, seed, cu_seqlens,
                                max_seqlen)[:2]
        return o, stats[:, :, 0]
    return _FlashAttention.apply(q, k, v, mask, kpm, causal, scale, dropout_p, seed, cu_seqlens,
                                 max_seqlen)
