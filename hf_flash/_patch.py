"""patch / unpatch / patched / explain: putting the kernel into a transformers model instance."""

from __future__ import annotations

import contextlib
import copy
import sys
from typing import Optional

import torch

from . import _glue
from ._registry import Family, UnsupportedModelError, families, family_for

_STATE = "_hf_flash_state"


def _check_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(_glue.DEFAULT_OPTIONS))
    if unknown:
        raise TypeError(f"hf_flash.patch() got unknown option(s) {unknown}; valid options: "
                        f"{sorted(_glue.DEFAULT_OPTIONS)}")
    opts = {**_glue.DEFAULT_OPTIONS, **options}
    if opts["fallback"] not in _glue._FALLBACKS:
        raise ValueError(f"fallback must be one of {_glue._FALLBACKS}, got {opts['fallback']!r}")
    if not isinstance(opts["packed"], bool):
        raise TypeError(f"packed must be True or False, got {opts['packed']!r}")
    return opts


def find_pretrained(model) -> "torch.nn.Module":
    """The transformers model inside `model` (itself, or the one a peft/compile wrapper holds)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    if isinstance(model, torch.nn.Module):
        for m in model.modules():  # outermost first
            if isinstance(m, PreTrainedModel):
                return m
    # Also reached from unpatch/patched/explain/is_patched, so the message names no one function.
    raise TypeError(f"hf_flash: model must be a transformers PreTrainedModel (or a wrapper such "
                    f"as a peft model holding one), got {type(model).__name__}")


def _configs(hf) -> list:
    """Every config whose attention implementation transformers may read, nested ones included."""
    from transformers import PreTrainedModel

    seen, out = set(), []
    stack = [m.config for m in hf.modules() if isinstance(m, PreTrainedModel)]
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in seen:
            continue
        seen.add(id(cfg))
        out.append(cfg)
        for key in getattr(cfg, "sub_configs", {}) or {}:
            stack.append(getattr(cfg, key, None))
    return out


def _config_holders(root) -> list:
    """(module, attribute, config) for every config a module of `root` keeps as an attribute.

    transformers keeps the attention implementation on the config, and a config object may be
    shared with models outside `root`; patching must therefore switch a config of its own.
    """
    from transformers import PreTrainedConfig

    return [(mod, key, value) for mod in root.modules() for key, value in vars(mod).items()
            if isinstance(value, PreTrainedConfig)]


def _point_to(root, replacement: dict) -> None:
    """Make every module of `root` that holds a config in `replacement` (keyed by id) hold its
    replacement instead."""
    for mod, key, value in _config_holders(root):
        new = replacement.get(id(value))
        if new is not None:
            # Straight into __dict__: wrappers may override __setattr__, and nn.Module's keeps
            # plain attributes there anyway.
            mod.__dict__[key] = new


def _own_configs(root) -> list:
    """Give `root` private copies of its configs; returns (original, copy) pairs.

    One deepcopy memo for all of them keeps their structure: a submodel holding a parent's
    sub-config gets the parent copy's sub-config, and configs shared inside `root` stay shared.
    """
    memo, pairs = {}, {}
    for _, _, cfg in _config_holders(root):
        if id(cfg) not in pairs:
            pairs[id(cfg)] = (cfg, copy.deepcopy(cfg, memo))
    _point_to(root, {key: dup for key, (_, dup) in pairs.items()})
    return list(pairs.values())


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # values without a plain truth value (arrays): count as changed
        return False


_SWITCH_FIELDS = ("_attn_implementation_internal", "_attn_was_changed")


def _give_back_configs(root, pairs) -> None:
    """Hand the original configs back, keeping what was set on the copies meanwhile (a Trainer
    run sets fields such as problem_type): only the switch to hf_flash stays behind."""
    from transformers import PreTrainedConfig

    for original, dup in pairs:
        for key, value in vars(dup).items():
            # The switch itself stays behind: the implementation, and the mark transformers
            # (5.17) leaves on a submodel's config it switched or skipped, which would make a
            # later set_attn_implementation pass that submodel over.
            if key in _SWITCH_FIELDS or isinstance(value, PreTrainedConfig):
                continue  # sub-configs are pairs of their own
            if key not in vars(original) or not _same(vars(original)[key], value):
                original.__dict__[key] = value
    _point_to(root, {id(dup): original for original, dup in pairs})


def attention_layers(hf, family: Optional[Family] = None) -> list:
    """(qualified name, module) of each module that computes attention."""
    names = set(family.attention_classes) if family is not None else set()
    out = []
    for name, mod in hf.named_modules():
        cls = type(mod).__name__
        if names:
            # Subclasses count too: GPT-Neo's patched layers are a subclass of its attention.
            if any(c.__name__ in names for c in type(mod).__mro__):
                out.append((name, mod))
        elif "Attention" in cls and hasattr(mod, "is_causal"):
            out.append((name, mod))
    return out


def is_patched(model) -> bool:
    return getattr(find_pretrained(model), _STATE, None) is not None


def patch(model, **options):
    """Make `model` compute attention with hf_flash's kernel; returns `model` itself.

    Works on any transformers model whose family is registered (see `hf_flash.supported_models()`),
    and on wrappers holding one (peft, torch.compile). Nothing is changed if the model is not
    supported: the error lists what is. Patching twice only updates the options.

    The patched model works on its own copy of its config (every module that held the config
    holds the copy), so other models built on the same config object are not switched.

    Options:
        fallback: "eager" (default) runs a call the kernel cannot serve (output_attentions=True,
            a head mask, ...) with the model's eager attention and warns once, naming the reason;
            "raise" raises instead.
        packed: False (default). True runs the encoder of a padded batch on its real tokens only
            (BERT family): the padding is dropped once before the first layer and put back,
            as zeros, after the last, so every layer's cost follows the real token count. Outputs
            at padding positions are then zeros rather than the values eager gives there.
    """
    opts = _check_options(options)
    hf = find_pretrained(model)
    family = family_for(hf)
    if family.check is not None:
        family.check(hf)
    if opts["packed"] and family.pack is None:
        packable = sorted(f.name for f in families() if f.pack is not None)
        raise ValueError(f"packed=True is not available for the {family.name!r} family; it is for: "
                         f"{', '.join(packable)}")
    _glue.register()
    if getattr(hf, _STATE, None) is None:
        # Everything below changes only the copies, so other models built on the same config
        # object keep their attention implementation, and unpatch can hand the originals back.
        configs = _own_configs(model)
        try:
            if family.apply is not None:
                revert_data = family.apply(hf)
            else:
                revert_data = None
                _switch_to_hf_flash(hf)
        except BaseException:
            _give_back_configs(model, configs)
            raise
        # A plain attribute, not a buffer: it never reaches a state dict or a checkpoint.
        object.__setattr__(hf, _STATE, {"family": family, "configs": configs,
                                        "revert_data": revert_data, "packed": None})
    _set_packed(hf, family, opts["packed"])
    for _, mod in attention_layers(hf, family):
        mod._hf_flash_options = dict(opts)
    return model


def _set_packed(hf, family, want: bool) -> None:
    """Switch the family's packed-token mode of a patched model on or off (idempotent)."""
    state = getattr(hf, _STATE)
    if want and state["packed"] is None:
        state["packed"] = family.pack(hf)
    elif not want and state["packed"] is not None:
        family.unpack(hf, state["packed"])
        state["packed"] = None


def _switch_to_hf_flash(hf) -> None:
    hf.set_attn_implementation(_glue.ATTN_NAME)
    from transformers import PreTrainedModel

    # set_attn_implementation only warns when a (sub)model cannot switch; we refuse instead.
    stuck = sorted({type(m).__name__ for m in hf.modules() if isinstance(m, PreTrainedModel)
                    and m.config._attn_implementation != _glue.ATTN_NAME})
    if stuck:
        raise UnsupportedModelError(
            f"transformers could not switch {', '.join(stuck)} to attn_implementation="
            f"'{_glue.ATTN_NAME}' (its attention does not go through AttentionInterface)")


def unpatch(model):
    """Undo `patch`: the attention implementation and modules are restored exactly.

    The modules get back the config object they held before `patch`; fields set on the model's
    config while patched are carried over to it, the attention implementation is restored.
    A model loaded with attn_implementation=hf_flash.ATTN_NAME is switched to transformers' default
    (sdpa, or eager where the model has no sdpa). Returns `model`.
    """
    hf = find_pretrained(model)
    state = getattr(hf, _STATE, None)
    if state is None:
        if hf.config._attn_implementation == _glue.ATTN_NAME:
            family = family_for(hf)
            if family.revert is not None:
                family.revert(hf, None)
            for cfg in _configs(hf):
                if cfg._attn_implementation == _glue.ATTN_NAME:
                    cfg._attn_implementation_internal = "sdpa" if hf._supports_sdpa else "eager"
            _forget_layers(hf, family)
        return model
    family = state["family"]
    if state.get("packed") is not None:
        family.unpack(hf, state["packed"])
    if family.revert is not None:
        family.revert(hf, state["revert_data"])
    # `model`, not just `hf`: a wrapper added after patching (peft) may hold the copy too.
    _give_back_configs(model, state["configs"])
    _forget_layers(hf, family)
    object.__delattr__(hf, _STATE)
    return model


def _forget_layers(hf, family) -> None:
    for _, mod in attention_layers(hf, family):
        for attr in ("_hf_flash_options", "_hf_flash_last_call"):
            mod.__dict__.pop(attr, None)


@contextlib.contextmanager
def patched(model, **options):
    """`with hf_flash.patched(model):` patches for the block and restores the model afterwards."""
    hf = find_pretrained(model)
    was_patched = getattr(hf, _STATE, None) is not None
    family = family_for(hf)
    old_options = ({n: dict(m._hf_flash_options) for n, m in attention_layers(hf, family)
                    if hasattr(m, "_hf_flash_options")} if was_patched else None)
    patch(model, **options)
    try:
        yield model
    finally:
        if was_patched:
            _set_packed(hf, family, any(o.get("packed") for o in old_options.values()))
            for name, mod in attention_layers(hf, family):
                if name in old_options:
                    mod._hf_flash_options = old_options[name]
        else:
            unpatch(model)


def supported_models() -> list:
    """One dict per registered family: name, model types, quirks handled, and whether
    `patch(model, packed=True)` is available for it."""
    return [{"family": f.name, "model_types": list(f.model_types) or ["(any AttentionInterface "
                                                                        "model)"],
             "quirks": dict(f.quirks), "packed": f.pack is not None} for f in families()]


def explain(model, file=None) -> list:
    """Print, per attention layer, the path it takes and why; return the same as a list of dicts.

    Keys: layer, module, path ("hf_flash kernel", "eager fallback", or "not patched"), mask (how
    masks reach the kernel), scale, dropout, reason, last_call (path and mask form of the latest
    call, once the model has run).
    """
    file = sys.stdout if file is None else file
    hf = find_pretrained(model)
    try:
        family = family_for(hf)
    except UnsupportedModelError as e:
        print(f"{type(hf).__name__}: not supported by hf_flash ({e})", file=file)
        return []
    rows = []
    for name, mod in attention_layers(hf, family):
        impl = getattr(getattr(mod, "config", None), "_attn_implementation", None) or \
            hf.config._attn_implementation
        row = {"layer": name, "module": type(mod).__name__, "scale": _scale_of(mod),
               "dropout": _dropout_of(mod), "last_call": getattr(mod, "_hf_flash_last_call", None)}
        if impl != _glue.ATTN_NAME:
            row.update(path="not patched", mask="-",
                       reason=f"attn_implementation is {impl!r}; call hf_flash.patch(model)")
        else:
            row.update(path="hf_flash kernel", mask=_default_mask_text(mod),
                       reason="served by the kernel")
            head_dim = _head_dim(mod)
            every_call = _configured_fallback(mod)
            if head_dim is not None and head_dim > _glue.MAX_HEAD_DIM:
                row.update(path="eager fallback",
                           reason=f"head dim {head_dim} > {_glue.MAX_HEAD_DIM}")
            elif every_call is not None:
                row.update(path="eager fallback",
                           reason=f"its configuration gives every call {every_call}")
            if family.describe_layer is not None:
                row.update(family.describe_layer(mod))
            opts = _glue.options_of(mod)
            row["reason"] += (f"; calls the kernel cannot serve (output_attentions, head masks, "
                              f"...) {'raise' if opts['fallback'] == 'raise' else 'run eager'}")
        rows.append(row)
    _print_rows(hf, family, rows, file)
    return rows


def _default_mask_text(mod) -> str:
    if getattr(mod, "is_causal", False):
        return ("causal from is_causal (bottom-right with a KV cache); padding as key-padding "
                "lengths; other masks dense")
    return "none needed; padding as key-padding lengths; other masks dense"


def _configured_fallback(mod) -> Optional[str]:
    """What every call of this layer passes that the kernel cannot serve, known from the layer
    itself (set from its model's configuration), else None. The calls decide at run time
    (_glue.unservable_reason); this only keeps explain() from promising the kernel to them."""
    if getattr(mod, "attn_logit_softcapping", None) is not None:  # Gemma 2 and its kin
        return _glue._UNSERVABLE_KWARGS["softcap"]
    if isinstance(getattr(mod, "sinks", None), torch.Tensor):  # GPT-OSS
        return _glue._UNSERVABLE_KWARGS["sinks"]
    if hasattr(mod, "has_relative_attention_bias"):  # T5 and its kin pass a bias to every layer
        return _glue._UNSERVABLE_KWARGS["position_bias"]
    qk, v = _head_dim(mod), getattr(mod, "v_head_dim", None)
    if isinstance(qk, int) and isinstance(v, int) and v != qk:  # MiMo-V2-Flash and its kin
        return f"different head dims for query/key/value ({qk}, {qk}, {v})"
    return None


def _head_dim(mod) -> Optional[int]:
    for attr in ("head_dim", "attention_head_size"):
        v = getattr(mod, attr, None)
        if isinstance(v, int):
            return v
    return None


def _scale_of(mod):
    s = getattr(mod, "scaling", None)
    if isinstance(s, (int, float)):
        return float(s)
    return None


def _dropout_of(mod):
    for attr in ("attention_dropout", "attn_dropout", "dropout"):
        v = getattr(mod, attr, None)
        if isinstance(v, torch.nn.Dropout):
            return float(v.p)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def _print_rows(hf, family, rows, file) -> None:
    print(f"{type(hf).__name__} (model_type={hf.config.model_type!r}, family {family.name!r}): "
          f"{len(rows)} attention layers", file=file)
    for r in rows:
        scale = "-" if r["scale"] is None else f"{r['scale']:.4g}"
        drop = "-" if r["dropout"] is None else f"{r['dropout']:g}"
        print(f"  {r['layer'] or '(root)'} [{r['module']}]: {r['path']}", file=file)
        print(f"      mask: {r['mask']}; scale {scale}; attention dropout {drop} (train mode)",
              file=file)
        print(f"      why: {r['reason']}", file=file)
        if r["last_call"] is not None:
            print(f"      last call: {r['last_call'][0]} ({r['last_call'][1]})", file=file)
