"""Weight norm over a whole model: choosing its layers, limiting ``||v||``, folding it away."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lightning_wn import torch_norms
from lightning_wn._normalized_weight import norm_axes
from lightning_wn.weight_norm import (
    DEFAULT_LAYERS,
    OUTPUT_AXIS,
    SUPPORTED_LAYERS,
    _names,
    checked_targets,
    is_weight_normalized,
    positive_number,
    refuse_wrapped,
    weight_norm,
    weight_norms,
)

Selection = Sequence[type[nn.Module] | str] | type[nn.Module] | str  # layer types and name patterns, or one


def apply_weight_norm(
    model: nn.Module, include: Selection | None = None, exclude: Selection = (), **options
) -> list[str]:
    """Weight-normalize every submodule of ``model`` selected by ``include`` and not by ``exclude``.

    Entries are layer types (``nn.Conv2d`` or ``"Conv2d"``) or globs over module names (``"decoder.*"``), which
    select the supported layers inside the modules they match; ``include`` defaults to every ``Linear``, ``Conv*``
    and ``ConvTranspose*`` (recurrent layers only when asked for). ``options`` go to :func:`weight_norm`.
    Returns the qualified names of the modules normalized.

    Raises:
        ValueError: a pattern matches no module, a selected module is unsupported, normalized, tied or refused
            by :func:`weight_norm`, or nothing is selected; then no module is normalized.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Linear(8, 2))
        >>> apply_weight_norm(model, exclude=[nn.Linear])
        ['0', '2']
    """
    refuse_wrapped(model)
    names = select_layers(model, include, exclude)
    modules = dict(model.named_modules())
    owners = parameter_owners(modules)  # a tied weight (embeddings) would be untied: two g, and v stepped twice
    for name in names:  # all checked before any is normalized
        if is_weight_normalized(module := modules[name]):
            raise ValueError(f"Module `{name}` ({type(module).__name__}) is already weight-normalized. "
                             "Leave it out with `exclude`, or call `remove_weight_norm` first.")
        try:
            tensors, _ = checked_targets(module, options.get("name"), options.get("dim", OUTPUT_AXIS))
        except ValueError as error:
            raise ValueError(f"Module `{name}`: {error} Nothing was normalized; leave it out with `exclude`="
                             f"{[name]!r}.") from error
        for tensor_name in tensors:
            if len(shared := owners.get(id(getattr(module, tensor_name, None)), [])) > 1:
                layers = sorted({owner.rpartition(".")[0] for owner in shared} - {""})  # "" would match the model
                raise ValueError(f"{' and '.join(f'`{s}`' for s in shared)} are one tensor (tied weights), which "
                                 f"weight norm would untie. Leave them out: `exclude`={layers!r}.")
    for name in names:
        weight_norm(modules[name], **options)
    return names


def select_layers(
    model: nn.Module, include: Selection | None = None, exclude: Selection = (), *, missing_ok: bool = False
) -> list[str]:
    """The qualified names :func:`apply_weight_norm` would normalize, in module order.

    Layers torch already reparametrizes are left out with a warning; naming one in ``include`` is an error.
    ``missing_ok``: a pattern that matches no module, or nothing selected, is no error (layers built later).

    Example:
        >>> select_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)), exclude="2")
        ['0']
    """
    include = DEFAULT_LAYERS if include is None else include
    modules = dict(model.named_modules())
    chosen = _select(modules, include, "include", missing_ok) - _select(modules, exclude, "exclude", missing_ok)
    found = {n: torch_norms.torch_reparametrizations(modules[n]) for n in modules if n in chosen}
    by_torch = {n: f"`{n}` ({', '.join(kinds)})" for n, kinds in found.items() if kinds}  # as the messages show them
    if named := [shown for n, shown in by_torch.items() if n in _entries(include)]:  # named exactly, not matched
        raise ValueError(f"`include` names {', '.join(named)}, already reparametrized by torch: weight norm on top "
                         f"would stack two reparametrizations. {torch_norms.TORCH_FIX}")
    chosen -= by_torch.keys()
    if not chosen and not missing_ok:
        skipped = f" {len(by_torch)} selected are under torch's norms: {torch_norms.TORCH_FIX}" if by_torch else ""
        raise ValueError(f"No module of {type(model).__name__} is selected by `include`={include!r} and "
                         f"`exclude`={exclude!r}. Modules: {_preview(modules)}.{skipped}")
    if by_torch:
        warnings.warn(f"Weight norm leaves {len(by_torch)} layers alone that torch already reparametrizes: "
                      f"{', '.join(by_torch.values())}. {torch_norms.TORCH_FIX} Leave them out with `exclude` to "
                      "silence this.", stacklevel=2)
    return [name for name in modules if name in chosen]


def weight_normalized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``model`` that carry weight norm.

    Example:
        >>> model = nn.Sequential(weight_norm(nn.Linear(2, 3)), nn.Linear(3, 1))
        >>> [name for name, _ in weight_normalized_modules(model)]
        ['0']
    """
    return ((name, m) for name, m in model.named_modules() if is_weight_normalized(m))


def remove_weight_norm(model: nn.Module) -> list[str]:
    """Fold ``g`` and ``v`` back into plain weights everywhere in ``model``, for inference or export.

    Folds this library's weight norm and torch's (parametrization or legacy hook); spectral norm stays.
    Returns the qualified names of the modules folded; a ``ValueError``, before anything changes, if a
    torch parametrization chains weight norm with another one.

    Example:
        >>> model = nn.Sequential(weight_norm(nn.Linear(2, 3)), nn.ReLU())
        >>> model.append(nn.utils.parametrizations.weight_norm(nn.Linear(3, 1)))  # doctest: +ELLIPSIS
        Sequential(...)
        >>> remove_weight_norm(model)
        ['0', '2']
        >>> sorted(name for name, _ in model.named_parameters())
        ['0.bias', '0.weight', '2.bias', '2.weight']
    """
    refuse_wrapped(model)
    modules = list(model.named_modules())
    for module_name, module in modules:  # checked before anything is folded: an error leaves the model as it was
        torch_norms.refuse_chained_weight_norm(module_name, module)
    folded = []
    for module_name, module in modules:
        if is_weight_normalized(module):
            _remove_own_weight_norm(module)
            folded.append(module_name)
        elif torch_norms.remove_torch_weight_norm(module):
            folded.append(module_name)
    return folded


def _remove_own_weight_norm(module: nn.Module) -> None:
    with torch.no_grad():
        # trainable if g or v was (g alone: DoRA-style), as torch folds
        weights = {n: nn.Parameter(wn.compute().clone(), any(p.requires_grad for p in wn.parameters()))
                   for n, wn in weight_norms(module).items()}
    module.__class__ = type(module)._wn_base
    del module.parametrizations
    vars(module).pop("_wn_in_forward", None)
    for name, weight in weights.items():
        setattr(module, name, weight)  # RNNBase's __setattr__ keeps its flat weights in step


@torch.no_grad()
def limit_direction_norm(model: nn.Module, max_norm: float) -> int:
    """Rescale every direction ``v`` whose norm exceeds ``max_norm`` down to ``max_norm``; returns how many units.

    The paper's hard limit on ``||v||``, meant after each optimizer step: ``w`` depends on ``v`` only through
    ``v / ||v||``, so the function stays, while the effective learning rate is kept from decaying. A
    ``ValueError`` if ``model`` has no layer weight-normalized by this library.

    Example:
        >>> layer = weight_norm(nn.Linear(4, 2))
        >>> with torch.no_grad():
        ...     _ = layer.parametrizations.weight.original1.mul_(100)
        >>> limit_direction_norm(layer, max_norm=1.0)
        2
        >>> layer.parametrizations.weight.original1.norm(dim=1).allclose(torch.ones(2))
        True
    """
    max_norm = positive_number("max_norm", max_norm)
    normalized = [wn for module in model.modules() for wn in weight_norms(module).values()]
    if not normalized:
        torch_wn = [n or type(model).__name__ for n, m in model.named_modules() if torch_norms.has_torch_weight_norm(m)]
        why = (f"{len(torch_wn)} layers are under torch's weight norm ({', '.join(torch_wn[:5])}"
               f"{', ...' if len(torch_wn) > 5 else ''}): convert them with `lightning_wn.from_torch(model)`."
               if torch_wn else "Normalize its layers first with `lightning_wn.apply_weight_norm(model)`.")
        raise ValueError(f"`limit_direction_norm` found no weight-normalized layer in {type(model).__name__}. {why}")
    rescaled = 0
    for wn in normalized:
        norm = torch.linalg.vector_norm(wn.v, dim=norm_axes(wn.v, wn.dim), keepdim=True)
        too_long = norm > max_norm
        wn.v.mul_(torch.where(too_long, max_norm / norm, 1.0))
        rescaled += int(too_long.sum())
    return rescaled


def parameter_owners(modules: dict[str, nn.Module]) -> dict[int, list[str]]:
    """By parameter id, its qualified names in ``modules`` (``dict(model.named_modules())``): several if tied."""
    owners: dict[int, list[str]] = {}
    for module_name, module in modules.items():
        for param_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append(f"{module_name}.{param_name}".lstrip("."))
    return owners


def _entries(selection: Selection) -> list:
    return [selection] if isinstance(selection, (str, type)) else list(selection)


def _select(modules: dict[str, nn.Module], selection: Selection, argument: str, missing_ok: bool) -> set[str]:
    chosen: set[str] = set()
    supported = {name for name, m in modules.items() if isinstance(m, SUPPORTED_LAYERS)}
    for entry in _entries(selection):
        if isinstance(entry, str) and isinstance(getattr(nn, entry, None), type):
            entry = getattr(nn, entry)  # "Conv2d" from a YAML file means the layer type
        if isinstance(entry, type) and issubclass(entry, nn.Module):
            if argument == "include" and not issubclass(entry, SUPPORTED_LAYERS):
                raise ValueError(f"`include` names `{entry.__name__}`, which weight norm does not support; "
                                 f"supported layers are {_names(SUPPORTED_LAYERS)}.")
            chosen |= {name for name, m in modules.items() if isinstance(m, entry)}
            continue
        if not isinstance(entry, str):
            raise TypeError(f"`{argument}` entries must be layer types or name patterns, got {entry!r}.")
        if not (matched := [name for name in modules if fnmatch.fnmatchcase(name, entry)]) and not missing_ok:
            typed = entry.removeprefix("torch.").removeprefix("nn.")  # "conv2d", "nn.Conv2d" (not "decoder.linear")
            meant = [n for n in dir(nn) if n.lower() == typed.lower() and isinstance(getattr(nn, n), type)]
            hint = f" A layer type is named as in `torch.nn`: {meant[0]!r}." if meant and "." not in typed else ""
            raise ValueError(f"`{argument}` pattern {entry!r} matches no module.{hint} Module names: "
                             f"{_preview(modules)}.")
        # a pattern selects the supported layers inside the modules it matches ("decoder.*": its ReLUs hold none)
        inside = {name for name in supported for root in matched if not root or f"{name}.".startswith(f"{root}.")}
        if argument == "include" and matched and not inside:
            root = matched[0]
            raise ValueError(f"`include` pattern {entry!r} matches `{root}` ({type(modules[root]).__name__}), "
                             f"which is not a supported layer and holds none: {_names(SUPPORTED_LAYERS)}.")
        chosen |= inside
    return chosen


def _preview(modules: dict[str, nn.Module], limit: int = 12) -> str:
    names = [repr(name) for name in modules if name][:limit]
    more = len(modules) - 1 - len(names)
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")
