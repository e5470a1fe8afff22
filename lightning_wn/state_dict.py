"""State-dict spellings of weight norm: folding them into plain weights, and reading them into this library's layout."""

from __future__ import annotations

from collections.abc import Container, Mapping

import torch
from torch import Tensor

WHOLE_TENSOR = -1
"""The axis of a ``g`` taken over the whole tensor: torch's own encoding of ``dim=None``."""


def fold_state_dict(state_dict: Mapping[str, Tensor], keep: Container[str] = ()) -> dict[str, Tensor]:
    """A copy of ``state_dict`` with every weight-normalized tensor folded into a plain one, ``g * v / ||v||``.

    So a checkpoint trained with weight norm loads into the plain model with ``strict=True``. Reads this
    library's and torch's ``<layer>.parametrizations.<name>.original0`` (``g``; or ``s`` and ``c``, ``g = exp(c * s)``)
    and ``original1`` (``v``), and legacy ``<layer>.<name>_g`` and ``_v``; the axis of ``g`` from its shape.
    Keys in ``keep`` (a model's own) stay as they are, with the rest of their weight norm. A Lightning checkpoint
    gives its folded ``'state_dict'``.

    Example:
        >>> from torch import nn
        >>> from lightning_wn import weight_norm
        >>> layer = weight_norm(nn.Linear(3, 2))
        >>> folded = fold_state_dict(layer.state_dict())
        >>> sorted(folded), torch.allclose(folded["weight"], layer.weight)
        (['bias', 'weight'], True)
        >>> legacy = {"weight_g": torch.tensor(2.0), "weight_v": torch.ones(3, 2, 1), "bias": torch.zeros(3)}
        >>> folded = fold_state_dict({"epoch": 3, "state_dict": legacy})  # torch.nn.utils.weight_norm, dim=None
        >>> sorted(folded), round(float(folded["weight"].norm()), 4)
        (['bias', 'weight'], 2.0)
    """
    if isinstance(state_dict, Mapping) and isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]  # a whole Lightning checkpoint
    if not isinstance(state_dict, Mapping):
        hint = " Pass `model.state_dict()`." if isinstance(state_dict, torch.nn.Module) else ""
        raise TypeError(f"`state_dict` must be a state dict or a Lightning checkpoint, got "
                        f"{type(state_dict).__name__}.{hint}")
    if isinstance(keep, str):  # `in` would match substrings of it
        raise TypeError(f"`keep` must be a collection of state-dict keys, got the string {keep!r}: pass [{keep!r}].")
    keep = keep if isinstance(keep, Container) else set(keep)  # a generator: each `in` would consume it
    folded, groups = {}, {}  # groups: "<layer>.parametrizations.<name>" -> {"original0": g, "original1": v, ...}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor) and not str(key).endswith("_extra_state"):
            raise TypeError(f"`state_dict` must map names to tensors, but entry {key!r} is a {type(value).__name__}. "
                            "Pass a model's `state_dict()`, or a Lightning checkpoint with a 'state_dict' entry.")
        stem = key[:-2]
        g, v = state_dict.get(f"{stem}_g"), state_dict.get(f"{stem}_v")
        if ".parametrizations." in f".{key}":
            prefix, _, part = key.rpartition(".")
            groups.setdefault(prefix, {})[part] = value
        # a legacy pair, folded once, at its g, unless kept whole; spectral norm also keeps a `weight_v`, no `weight_g`
        elif (key.endswith(("_g", "_v")) and f"{stem}_g" not in keep and f"{stem}_v" not in keep
              and stem not in state_dict and _norm_axis(g, v) is not None):
            if key.endswith("_g"):
                folded[stem] = _fold(g, v)
        else:
            folded[key] = value
    for prefix, parts in groups.items():
        entries = {f"{prefix}.{part}": value for part, value in parts.items()}
        # kept whole: the model's own weight norm (which loads it in any form), or another parametrization
        if any(key in keep for key in entries) or not {"original0", "original1", "s"} & parts.keys():
            folded.update(entries)
            continue
        g, v = parts.get("original0"), parts.get("original1")
        if g is None and {"s", "c"} <= parts.keys():
            g = torch.exp(parts["c"] * parts["s"])
        if g is None or v is None:
            raise ValueError(f"State dict entries under `{prefix}` are not a weight norm's g and v: {sorted(parts)}.")
        if _norm_axis(g, v) is None:
            raise ValueError(f"Cannot tell the axis `{prefix}`'s g (shape {tuple(g.shape)}) was taken along for v of "
                             f"shape {tuple(v.shape)}: g must keep one axis of v and be 1 on the others, or be 0-d.")
        owner, _, name = f".{prefix}".rpartition(".parametrizations.")
        folded[f"{owner}.{name}"[1:]] = _fold(g, v)  # owner is "" or ".<layer>"
    return folded


def _norm_axis(g: object, v: object) -> int | None:
    """The axis of ``v`` that ``g`` keeps (1 on the others): :data:`WHOLE_TENSOR` if it keeps none; None if no norm."""
    if not (isinstance(g, Tensor) and isinstance(v, Tensor)) or g.dim() not in (0, v.dim()):
        return None
    if any(size not in (1, full) for size, full in zip(g.shape, v.shape)):
        return None
    wide = [axis for axis, size in enumerate(g.shape) if size > 1]
    return WHOLE_TENSOR if not wide else wide[0] if len(wide) == 1 else None


@torch.no_grad()
def _fold(g: Tensor, v: Tensor) -> Tensor:
    # torch's and our weight norms run this op without grad: folded, a layer computes bitwise what it did in eval
    return torch._weight_norm(v, g, _norm_axis(g, v))


def same_scale_factor(c: Tensor | None, log_scale_factor: float | None) -> bool:
    """Whether a saved ``c`` (None where ``g`` was saved) is ``log_scale_factor``, rounded as ``c`` is stored:
    made in float32 (or the default dtype), then maybe cast (0.1 in bfloat16 is 0.10009765625).

    Example:
        >>> bf16, f64 = torch.tensor(0.1).bfloat16(), torch.tensor(0.1).double()
        >>> same_scale_factor(bf16, 0.1), same_scale_factor(f64, 0.1), same_scale_factor(None, 3.0)
        (True, True, False)
    """
    if c is None or log_scale_factor is None:
        return c is None and log_scale_factor is None
    made = (torch.tensor(log_scale_factor, dtype=dtype).to(c.dtype) for dtype in (torch.float32, c.dtype))
    return any(float(c) == float(value) for value in made)


def adopt_other_spellings(
    normalized, state_dict: dict[str, Tensor], prefix: str, name: str, error_msgs: list
) -> str | None:
    """Rewrite one normalized tensor's entries of ``state_dict`` into ``normalized``'s own layout, in place.

    Legacy ``<name>_g``/``_v`` are renamed; a ``g`` along another axis, or where ours is ``s``, is folded and
    split again, as is a plain ``<name>`` (trained without weight norm): each computes what it was saved with.
    Returns how the entries were saved where their values changed form (so an optimizer's state saved for
    them does not apply to the new ``g`` and ``v``), else None.
    """
    ours, plain = f"{prefix}parametrizations.{name}.", f"{prefix}{name}"
    if f"{plain}_g" in state_dict and f"{plain}_v" in state_dict and f"{ours}original1" not in state_dict:
        state_dict[f"{ours}original0"] = state_dict.pop(f"{plain}_g")
        state_dict[f"{ours}original1"] = state_dict.pop(f"{plain}_v")
    c, log_scale_factor, was = state_dict.get(f"{ours}c"), normalized.log_scale_factor, None
    learned = f"which this run learns as {'g' if log_scale_factor is None else f's with c = {log_scale_factor:g}'}"
    s = state_dict.get(f"{ours}s")
    if isinstance(s, Tensor) and isinstance(c, Tensor) and f"{ours}original0" not in state_dict:  # g = exp(c * s)
        if same_scale_factor(c, log_scale_factor):
            return None  # ours; g() reads c from the option, not from the buffer, so another c is converted
        state_dict[f"{ours}original0"] = torch.exp(c * s)
        del state_dict[f"{ours}s"], state_dict[f"{ours}c"]
        was = f"saved `{ours[:-1]}` as s with c = {float(c):g}, {learned}"
    g, v, weight = state_dict.get(f"{ours}original0"), state_dict.get(f"{ours}original1"), state_dict.get(plain)
    if isinstance(g, Tensor) and isinstance(v, Tensor):
        if v.shape != normalized.v.shape or _norm_axis(g, v) is None:
            return None  # not a weight norm of this tensor: load_state_dict reports what is wrong
        if log_scale_factor is None and g.shape == normalized.original0.shape:
            return was  # g in our layout: saved so, or converted from s
        if was is None and log_scale_factor is not None:
            was = f"saved `{ours[:-1]}` as g, {learned}"
        shape = tuple(normalized.magnitude_param.shape)
        was = was or f"saved `{ours[:-1]}` with g of shape {tuple(g.shape)}, which this run keeps as {shape}"
        weight = _fold(g, v)
        del state_dict[f"{ours}original0"]
    elif not isinstance(weight, Tensor) or {f"{ours}original0", f"{ours}original1", f"{ours}s"} & state_dict.keys():
        return None  # no plain weight, or part of a g and v: load_state_dict reports what is missing
    else:
        del state_dict[plain]  # its shape mismatch is reported by the name the source gave it
        if weight.shape != normalized.v.shape:
            error_msgs.append(f"size mismatch for {plain}: copying a plain weight of shape {tuple(weight.shape)} into "
                              f"a weight-normalized layer whose weight has shape {tuple(normalized.v.shape)}.")
            return None
        was = f"saved `{plain}` as a plain weight, trained without weight norm"
    v, magnitude = normalized.split(weight.to(normalized.v.dtype))
    state_dict[f"{ours}original1"] = v
    if log_scale_factor is None:
        state_dict[f"{ours}original0"] = magnitude
    else:
        state_dict[f"{ours}s"] = magnitude
        c = torch.tensor(log_scale_factor, device=magnitude.device)  # not a clone of the layer's c: it may be on meta
        state_dict.setdefault(f"{ours}c", c.to(normalized.c.dtype))
    return was
