"""The public function: a drop-in for torch.nn.functional.scaled_dot_product_attention."""

import math
import warnings
import weakref
from typing import Optional, Union

import torch

from ._common import (CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT, INTERPRET, LN2,
                      dropout_seed)
from ._op import attention as _attention
from ._reference import reference_attention

try:  # PyTorch's lazy causal masks; absent in very old releases
    from torch.nn.attention.bias import CausalBias, CausalVariant
except ImportError:  # pragma: no cover
    CausalBias = CausalVariant = None

MAX_HEAD_DIM = 256
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned_fallback = False


@torch._dynamo.assume_constant_result
def _notice_cpu_fallback() -> bool:
    """Warns once. Compiled, it runs while dynamo traces, outside the graph (dynamo cannot trace
    warnings.warn: a graph break, and with fullgraph=True an error)."""
    global _warned_fallback
    if not _warned_fallback:
        warnings.warn("hf_flash: CPU tensors without TRITON_INTERPRET=1 use the plain PyTorch "
                      "fallback (same results, O(N^2) memory, its own dropout RNG)", stacklevel=4)
        _warned_fallback = True
    return True


def flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[Union[torch.Tensor, "CausalBias"]] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    causal_alignment: str = "top_left",
    return_lse: bool = False,
):
    """Exact attention with FlashAttention's tiling: memory linear in sequence length.

    Arguments mean what they mean in ``torch.nn.functional.scaled_dot_product_attention``:
    tensors are (batch, heads, seq, head_dim); a boolean ``attn_mask`` is True where a key takes
    part, a float one is added to the scores; ``is_causal`` is top-left aligned. Beyond SDPA:

    - ``attn_mask`` may be ``torch.nn.attention.bias.causal_lower_right(q_len, k_len)`` (what
      decoding with a KV cache needs) or ``causal_upper_left(...)``; no dense mask is built.
    - ``key_padding_mask``: bool (batch, k_len), True for real tokens (HF's 2D attention_mask).
      Key tiles outside the real tokens are skipped, not computed and masked.
    - ``causal_alignment="bottom_right"`` aligns ``is_causal`` to the end instead (the last query
      sees every key), as ``causal_lower_right`` does, without building one: PyTorch's
      ``CausalBias`` allocates a dense (2, q_len, k_len) float tensor each time it is made.
    - Masks combine: ``is_causal`` together with ``attn_mask`` and ``key_padding_mask`` is allowed.
    - A query row whose keys are all masked returns zeros and gets zero gradients, where PyTorch
      returns NaN. (An additive mask of large finite negatives is not "masked": it gives what
      softmax gives.)
    - ``return_lse=True`` also returns the log-sum-exp of the scaled, masked scores, fp32
      (batch, heads, q_len); -inf for rows with no visible key. It is differentiable.

    Dropout is drawn inside the kernel from a seed taken from torch's generator (so
    ``torch.manual_seed`` makes runs repeatable) and regenerated in backward, never stored.

    CUDA tensors run the Triton kernels. CPU tensors run the same kernels under Triton's
    interpreter when ``TRITON_INTERPRET=1`` was set before import; otherwise they fall back, with
    a one-time warning, to a plain PyTorch implementation with the same semantics (its dropout
    draws a different mask than the kernel would).

    Under ``torch.autocast`` the inputs are cast to autocast's dtype first, as autocast does for
    SDPA.
    """
    query, key, value = _autocast_inputs(query, key, value)
    _check_tensors(query, key, value, enable_gqa)
    B, H, n_q, D = query.shape
    n_k = key.shape[2]
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1], got {dropout_p!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif not isinstance(scale, (int, float)) or not _finite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")

    if causal_alignment not in ("top_left", "bottom_right"):
        raise ValueError(f"causal_alignment must be 'top_left' or 'bottom_right', got "
                         f"{causal_alignment!r}")
    if causal_alignment == "bottom_right" and not is_causal:
        raise ValueError("causal_alignment='bottom_right' aligns is_causal, which is False: pass "
                         "is_causal=True, or leave causal_alignment out")
    causal = CAUSAL_NONE
    if is_causal:
        causal = CAUSAL_TOP_LEFT if causal_alignment == "top_left" else CAUSAL_BOTTOM_RIGHT
    mask, kpm = None, None
    if CausalBias is not None and isinstance(attn_mask, CausalBias):
        if is_causal:
            raise ValueError("is_causal=True cannot be combined with a CausalBias attn_mask: "
                             "the CausalBias already says which causal alignment to use (pass "
                             "is_causal=False)")
        if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (n_q, n_k):
            raise ValueError(
                f"attn_mask: CausalBias is for q_len={attn_mask.seq_len_q}, "
                f"k_len={attn_mask.seq_len_kv} but query has q_len={n_q} and key has k_len={n_k}; "
                f"they must match")
        causal = (CAUSAL_BOTTOM_RIGHT if attn_mask.variant == CausalVariant.LOWER_RIGHT
                  else CAUSAL_TOP_LEFT)
    elif attn_mask is not None:
        mask, kpm = _normalize_mask(attn_mask, query, B, H, n_q, n_k)
    if key_padding_mask is not None:
        kpm_user = _check_key_padding_mask(key_padding_mask, query, B, n_k)
        kpm = kpm_user if kpm is None else (kpm & kpm_user)

    if dropout_p == 1.0:
        # Every probability dropped: the output is exactly zero (as F.dropout(p=1) gives), with
        # zero gradients; running the kernel would divide by 1 - p = 0.
        out, lse = _dispatch(query, key, value, mask, kpm, causal, scale, 0.0, return_lse)
        out = out * 0.0
    else:
        out, lse = _dispatch(query, key, value, mask, kpm, causal, scale, float(dropout_p),
                             return_lse)
    if return_lse:
        return out, lse
    return out


def flash_attention_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: Optional[int] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    return_lse: bool = False,
    _cu_seqlens_checked: bool = False,
):
    """Attention over sequences packed back to back, with no padding anywhere.

    ``query`` is (total, heads, head_dim), ``key`` and ``value`` (total, kv_heads, head_dim): the
    rows of n sequences one after another. ``cu_seqlens`` is int32 (n + 1,), their cumulative
    lengths ``[0, len_0, len_0 + len_1, ..., total]``. Each sequence attends only within itself;
    ``is_causal`` lets each token see the tokens of its own sequence up to itself. Returns
    (total, heads, head_dim), and with ``return_lse`` also the fp32 log-sum-exp (heads, total).

    The same rows as (1, heads, total, head_dim), the layout of a batch of one (what
    transformers' attention interface passes for packed sequences), are taken as they are and
    give the output in that layout too. The kernels read that layout; the 3-D form costs the
    views to it and back, eight autograd nodes a call.

    ``max_seqlen`` must be at least the longest length (as in FlashAttention's varlen API); when
    None it is read from ``cu_seqlens``, which costs a device-to-host copy. When given, on a GPU
    ``cu_seqlens`` is checked on the device, without waiting for it: lengths that fall, do not
    run from 0 to total or exceed ``max_seqlen`` stop the call with a device-side assertion
    (which, as any, ends the CUDA context) before the kernels run, never a silent wrong answer or
    a read past the rows; on the CPU they raise ``ValueError``. The kernels see the
    same tiles as for one sequence of that length, so a batch of mixed lengths costs what its real
    tokens cost: this is what running a model on unpadded tokens needs.

    (``_cu_seqlens_checked`` is for callers that build ``cu_seqlens`` and ``max_seqlen`` valid by
    construction, hf_flash's packed encoder: it skips the check, a dozen small launches a call.)
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not (t.dim() == 3 or (t.dim() == 4 and t.shape[0] == 1)):
            raise ValueError(f"{name} must be 3-D (total, heads, head_dim), or 4-D (1, heads, "
                             f"total, head_dim), for packed sequences, got shape {tuple(t.shape)}")
    rows_first = query.dim() == 3
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(f"query, key and value must all be 3-D (total, heads, head_dim) or all "
                         f"4-D (1, heads, total, head_dim), got {query.dim()}-D, {key.dim()}-D "
                         f"and {value.dim()}-D")
    row_dim = 0 if rows_first else 2
    total = query.shape[row_dim]
    if key.shape[row_dim] != total or value.shape[row_dim] != total:
        raise ValueError(f"query, key and value must hold the same packed rows (total tokens): "
                         f"got {total}, {key.shape[row_dim]}, {value.shape[row_dim]}")
    query, key, value = _autocast_inputs(query, key, value)
    if rows_first:
        q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    else:
        q4, k4, v4 = query, key, value
    _check_tensors(q4, k4, v4, enable_gqa)
    cu = _check_cu_seqlens(cu_seqlens, query, total)
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool)
                                   or max_seqlen < 0 or (max_seqlen == 0 and total > 0)):
        raise ValueError(f"max_seqlen must be a non-negative int, at least the longest sequence "
                         f"({total} rows hold tokens), got {max_seqlen!r}")
    if not (_cu_seqlens_checked and max_seqlen is not None):
        max_seqlen = _check_lengths(cu, total, max_seqlen)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1], got {dropout_p!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    elif not isinstance(scale, (int, float)) or not _finite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    causal = CAUSAL_TOP_LEFT if is_causal else CAUSAL_NONE
    p = 0.0 if dropout_p == 1.0 else float(dropout_p)  # p = 1 drops everything, as below
    if total == 0:
        out4 = _NoWork.apply(q4, k4, v4)  # zeros, with a graph as any other call's
        lse = torch.full(q4.shape[:3], float("-inf"), device=query.device)
    elif query.device.type == "cpu" and not INTERPRET:
        fallback = _varlen_fallback_traced if torch.compiler.is_compiling() else _varlen_fallback
        out4, lse = fallback(q4, k4, v4, cu, causal, scale, p)
    else:
        out4, lse = _dispatch(q4, k4, v4, None, None, causal, scale, p, return_lse, cu,
                              max_seqlen)
    out = out4.squeeze(0).transpose(0, 1) if rows_first else out4  # views, also in backward
    if dropout_p == 1.0:
        out = out * 0.0
    if return_lse:
        return out, lse.squeeze(0)
    return out


def _finite(x) -> bool:
    # math.isfinite, in a form dynamo traces when x is symbolic (compiled with dynamic=True, a
    # model's float attributes such as its attention scaling become symbols).
    return x == x and abs(x) != math.inf


def _autocast_inputs(*tensors):
    """Under torch.autocast, query, key and value in autocast's dtype, as autocast's policy for
    SDPA casts them. HF models lean on this: with rotary embeddings in fp32 (Llama, Mistral),
    query and key arrive in fp32 beside a bf16 value."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or first.device.type not in ("cuda", "cpu"):
        return tensors
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _SUPPORTED_DTYPES
                 else t for t in tensors)


def _check_cu_seqlens(cu, query, total):
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32 tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32 (cumulative sequence lengths), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with n + 1 >= 2 entries [0, ..., total], got "
                         f"shape {tuple(cu.shape)}")
    if cu.device != query.device:
        raise ValueError(f"cu_seqlens is on {cu.device} but must be on query's device, "
                         f"{query.device}")
    return cu.contiguous()


def _check_lengths(cu, total, max_seqlen):
    """Checks cu_seqlens (and max_seqlen, when given) against the rows; returns max_seqlen, read
    from cu_seqlens when not given. On the CPU at once; on a GPU, with max_seqlen given, on the
    device without waiting for it (as under torch.compile, which cannot read the values)."""
    if max_seqlen is not None and (cu.device.type != "cpu" or torch.compiler.is_compiling()):
        if torch.compiler.is_compiling() or not LAST_CHECKED.seen((cu,), (total, max_seqlen)):
            _assert_cu_seqlens_async(cu, total, max_seqlen)
        return max_seqlen
    lengths = (cu[1:] - cu[:-1]).tolist()
    if any(n < 0 for n in lengths) or int(cu[0]) != 0 or int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens must rise from 0 to total ({total}) without falling, "
                         f"got {cu.tolist()}")
    if max_seqlen is not None and max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen ({max_seqlen}) is shorter than the longest sequence "
                         f"({max(lengths)})")
    return max(lengths) if max_seqlen is None else max_seqlen


class CheckedOnce:
    """The tensors (and values) a device-side check was last queued for, so that calls repeating
    them skip it. A model hands the same cu_seqlens to every layer: one assertion queued before
    the first layer's kernels guards all the layers after it (a failed device-side assertion
    stops every kernel queued behind it on its stream), and the other layers save its dozen
    small launches. A tensor changed in place (its version counter moves), another tensor, other
    values or another stream are checked again. Eager calls only: compiled, the check is in the
    graph, where inductor emits one assertion for the repeats anyway."""

    def __init__(self):
        self._last = None

    def seen(self, tensors, values) -> bool:
        try:
            key = tuple((weakref.ref(t), t._version) for t in tensors), values
        except RuntimeError:  # inference-mode tensors keep no version counter: always check
            return False
        if tensors and tensors[0].is_cuda:  # an assertion guards only its own stream
            key = key[0], (values, torch.cuda.current_stream(tensors[0].device).cuda_stream)
        last, self._last = self._last, key
        return (last is not None and last[1] == key[1] and len(last[0]) == len(tensors)
                and all(ref() is t and version == t._version
                        for (ref, version), t in zip(last[0], tensors)))


LAST_CHECKED = CheckedOnce()


def _assert_cu_seqlens_async(cu, total, max_seqlen):
    """What the CPU checks at once, checked on the device (no host sync): a few small ops and
    one device-side assertion, queued before the kernels that trust `cu`."""
    lengths = cu[1:] - cu[:-1]
    ok = ((cu[0] == 0) & (cu[-1] == total) & (lengths.min() >= 0)
          & (lengths.max() <= max_seqlen))
    if torch.compiler.is_compiling():
        # Compiled, total and max_seqlen may be symbolic: formatted into the message they would
        # specialise the graph on their values (a recompile for every padded length).
        torch._assert_async(ok, "hf_flash: cu_seqlens must rise from 0 to total (the packed "
                                "rows) without falling, each length at most max_seqlen")
    else:
        torch._assert_async(ok, f"hf_flash: cu_seqlens must rise from 0 to total ({total}) "
                                f"without falling, each length at most max_seqlen ({max_seqlen})")


def _varlen_fallback_traced(q4, k4, v4, cu, causal, scale, dropout_p):
    """The same under torch.compile, which cannot loop over lengths it does not know: one call
    over all the rows, with a mask that keeps each row to its own sequence ((total x total)
    scores: the CPU fallback is for small shapes anyway)."""
    rows = torch.arange(q4.shape[2], dtype=cu.dtype, device=q4.device)
    seq = torch.searchsorted(cu, rows, right=True)  # 1 + the sequence each row belongs to
    return _dispatch(q4, k4, v4, seq[:, None] == seq[None, :], None, causal, scale, dropout_p,
                     True)


def _varlen_fallback(q4, k4, v4, cu, causal, scale, dropout_p):
    """Plain PyTorch, one sequence at a time (the CPU without Triton's interpreter)."""
    out, lse = torch.zeros_like(q4), torch.full(q4.shape[:3], float("-inf"), device=q4.device)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            o, l_ = _dispatch(q4[:, :, a:b], k4[:, :, a:b], v4[:, :, a:b], None, None, causal,
                              scale, dropout_p, True)
            out[:, :, a:b], lse[:, :, a:b] = o, l_
    return out, lse


# Whether decode steps with grouped K/V heads fold each group into one program's rows (below).
# A switch for measuring it: benchmarks/profile_decode.py times hf_flash with and without.
FOLD_GROUPED_DECODE = True


def _dispatch(q, k, v, mask, kpm, causal, scale, dropout_p, want_lse, cu_seqlens=None,
              max_seqlen=0):
    """Returns (out, natural-log lse or None when not wanted)."""
    if q.numel() == 0 or k.numel() == 0:
        # A zero-size dimension (no batch, heads, queries or keys): nothing reaches a kernel, whose
        # grids would be empty or whose head ratio undefined. With no keys every row sees none.
        out = _NoWork.apply(q, k, v)
        return out, (torch.full(q.shape[:3], float("-inf"), device=q.device) if want_lse else None)
    if q.device.type == "cpu" and not INTERPRET:
        _notice_cpu_fallback()
        float_mask = mask if mask is not None and mask.is_floating_point() else None
        bool_mask = mask if mask is not None and not mask.is_floating_point() else None
        return reference_attention(q, k, v, float_mask=float_mask, bool_mask=bool_mask, kpm=kpm,
                                   causal=causal, scale=scale, dropout_p=dropout_p)
    group = q.shape[1] // k.shape[1]
    # (Packed rows first: compiled, their count may be unbacked, which q.shape[2] == 1 cannot
    # be asked of.)
    if (FOLD_GROUPED_DECODE and cu_seqlens is None and q.shape[2] == 1 and group > 1
            and mask is None and dropout_p == 0.0 and causal != CAUSAL_TOP_LEFT):
        # A decode step with grouped K/V heads: a group's query heads become that K/V head's
        # query rows, so each K/V head is read by one program instead of one per query head.
        # Exact: a single query row's bottom-right causal limit admits every key, key padding is
        # per batch entry, and each row's arithmetic is unchanged. (Dense masks and dropout, both
        # addressed by query head, keep the plain layout; top-left causal would limit the folded
        # rows by their new index.) The reshapes are views for the layouts HF passes.
        B, H, _, D = q.shape
        out, lse = _dispatch(q.reshape(B, k.shape[1], group, D), k, v, None, kpm, CAUSAL_NONE,
                             scale, 0.0, want_lse)
        return out.reshape(B, H, 1, D), (lse.reshape(B, H, 1) if want_lse else None)
    seed = dropout_seed(q.device) if dropout_p > 0.0 else None
    # The kernels take unit strides along head_dim for granted (16-byte vector loads).
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    out, lse2 = _attention(q, k, v, mask, kpm, causal, float(scale), dropout_p, seed, cu_seqlens,
                           max_seqlen)
    # The kernels keep the lse in base 2; converting costs a launch, so only when asked.
    return out, (lse2 * LN2 if want_lse else None)


class _NoWork(torch.autograd.Function):
    """Zeros shaped like the query, and zero gradients: attention with nothing to attend to."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.inputs = [(t.shape, t.dtype, t.device) for t in (q, k, v)]
        return torch.zeros_like(q)

    @staticmethod
    def backward(ctx, do):
        return tuple(torch.zeros(shape, dtype=dtype, device=device)
                     for shape, dtype, device in ctx.inputs)


def _check_tensors(q, k, v, enable_gqa):
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; hf_flash supports float16, bfloat16 "
                            f"and float32")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape "
                             f"{tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"query, key and value must share a dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"query, key and value must be on one device, got {q.device}, "
                         f"{k.device}, {v.device}")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"query, key and value are on device {q.device}, which is not supported: "
                         f"hf_flash runs on cuda (and on cpu through Triton's interpreter or the "
                         f"PyTorch fallback)")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: query {q.shape[0]}, key {k.shape[0]}, value "
                         f"{v.shape[0]}; query, key and value must have the same batch size")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"key {tuple(k.shape)} and value {tuple(v.shape)} must have the same "
                         f"heads and sequence length")
    D = q.shape[3]
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"head dims differ: query {D}, key {k.shape[3]}, value {v.shape[3]}; "
                         f"hf_flash needs one head dim")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} (the last dim of query, key and value) is not supported: "
                         f"hf_flash supports 1 to {MAX_HEAD_DIM}")
    h_q, h_kv = q.shape[1], k.shape[1]
    # No heads at all (both 0) is valid: an empty result, as SDPA gives.
    if (h_kv == 0 and h_q != 0) or (h_kv != 0 and h_q % h_kv != 0):
        raise ValueError(f"query heads ({h_q}) must be a multiple of key/value heads ({h_kv})")
    if h_q != h_kv and not enable_gqa:
        raise ValueError(f"query has {h_q} heads but key/value have {h_kv}: pass "
                         f"enable_gqa=True for grouped-query attention")


def _normalize_mask(attn_mask, q, B, H, n_q, n_k):
    """Returns (dense mask view broadcast to (B, H, n_q, n_k) or None, key padding or None)."""
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a bool or float tensor or a CausalBias, got "
                        f"{type(attn_mask).__name__}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but must be on query's device, "
                         f"{q.device}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask has dtype {attn_mask.dtype}: use bool (True = attend) or a "
                        f"float additive mask")
    if attn_mask.requires_grad:
        raise ValueError("attn_mask requires grad: hf_flash does not compute gradients of the "
                         "mask; detach it or use SDPA")
    if attn_mask.dim() > 4:
        raise ValueError(f"attn_mask has {attn_mask.dim()} dims; at most 4 "
                         f"(batch, heads, q_len, k_len) are allowed")
    shape4 = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    # Broadcast to the call's shape, not with it: a mask dimension of 2 against a batch of 1
    # broadcasts both ways, but cannot be expanded to the call.
    if any(m not in (1, c) for m, c in zip(shape4, (B, H, n_q, n_k))):
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                         f"(batch, heads, q_len, k_len) = {(B, H, n_q, n_k)}")
    m = attn_mask.reshape(shape4)
    if m.dtype == torch.bool and shape4[1] == 1 and shape4[2] == 1 and shape4[3] == n_k:
        # A boolean mask that varies only along keys is key padding: take the fast path.
        return None, m.reshape(shape4[0], n_k).expand(B, n_k)
    return m.expand(B, H, n_q, n_k), None


def _check_key_padding_mask(kpm, q, B, n_k):
    if not isinstance(kpm, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor, got {type(kpm).__name__}")
    if kpm.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool (True = real token), got {kpm.dtype}")
    if kpm.device != q.device:
        raise ValueError(f"key_padding_mask is on {kpm.device} but must be on query's device, "
                         f"{q.device}")
    if tuple(kpm.shape) != (B, n_k):
        raise ValueError(f"key_padding_mask must have shape (batch, k_len) = {(B, n_k)}, got "
                         f"{tuple(kpm.shape)}")
    return kpm
