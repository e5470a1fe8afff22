"""Torch's weight norm to this library's in one call, and back, keeping ``g`` and ``v`` bit for bit.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.ReLU(), nn.Linear(4, 1))
    >>> v = model[0].parametrizations.weight.original1.clone()
    >>> from_torch(model), type(model[0]).__name__, torch.equal(model[0].parametrizations.weight.original1, v)
    (['0'], 'WeightNormedLinear', True)
    >>> to_torch(model), type(model[0]).__name__, torch.equal(model[0].parametrizations.weight.original1, v)
    (['0'], 'ParametrizedLinear', True)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.weight_norm import WeightNorm as LegacyWeightNorm

from lightning_wn import torch_norms
from lightning_wn.models import _remove_own_weight_norm, weight_normalized_modules
from lightning_wn.state_dict import WHOLE_TENSOR
from lightning_wn.weight_norm import refuse_shared_columns, refuse_wrapped, weight_norm, weight_norms


def from_torch(model: nn.Module) -> list[str]:
    """Replace torch's weight norm (parametrization or legacy hook) with this library's, in place, keeping ``dim``.

    ``g`` and ``v`` are torch's very parameters: an optimizer built on them trains on. Returns the names of the
    modules converted; a ``ValueError`` before anything changes if torch's weight norm shares a layer with another
    reparametrization, or is on a layer :func:`~lightning_wn.weight_norm` refuses.
    """
    refuse_wrapped(model)
    found = {}
    for module_name, module in model.named_modules():  # all checked first: an error leaves torch's norms in place
        torch_norms.refuse_chained_weight_norm(module_name, module)
        if norms := torch_norms.torch_weight_norms(module):
            if len(others := torch_norms.torch_reparametrizations(module)) > len(norms):
                raise ValueError(f"`{module_name}` mixes torch's weight norm with other reparametrizations "
                                 f"({', '.join(others)}). Remove the others from that layer first.")
            layer = f"model.get_submodule({module_name!r})" if module_name else "model"
            for name, norm, g, _ in norms:
                try:
                    if g.dim() == 1 and g.numel() > 1:  # a 1-D v is one unit here
                        raise ValueError(f"torch normalizes each entry of its 1-D `{name}` on its own.")
                    refuse_shared_columns(module, None if norm.dim == WHOLE_TENSOR else norm.dim)
                except ValueError as error:
                    raise ValueError(f"`{module_name or type(module).__name__}` cannot be converted: {error} "
                                     "Nothing was converted; fold it first with "
                                     f"`lightning_wn.remove_weight_norm({layer})`.") from error
            found[module_name] = (module, norms)
    for module, norms in found.values():
        torch_norms.remove_torch_weight_norm(module)  # folds into a plain weight parameter; drops torch's hook
        for name, norm, g, v in norms:
            weight_norm(module, name, dim=None if norm.dim == WHOLE_TENSOR else norm.dim)  # other negative dims: axes
            _take(weight_norms(module)[name], ("original0", "original1"), (g, v))  # not our split: ||v|| = g there
    return list(found)


def to_torch(model: nn.Module, legacy: bool = False) -> list[str]:
    """Put every layer weight-normalized by this library under torch's weight norm instead, in place.

    ``torch.nn.utils.parametrizations.weight_norm``, or ``torch.nn.utils.weight_norm`` with ``legacy=True``.
    ``g`` and ``v`` are this library's very parameters. Returns the names of the modules converted; a
    ``ValueError`` before anything changes if a layer learns ``g = exp(c * s)`` (``log_scale_factor``).
    """
    refuse_wrapped(model)
    normalized = list(weight_normalized_modules(model))
    for module_name, module in normalized:
        if any(wn.log_scale_factor is not None for wn in weight_norms(module).values()):
            raise ValueError(f"`{module_name}` learns g = exp(c * s) (`log_scale_factor`), which torch's weight norm "
                             "has no form for. Fold it with `lightning_wn.remove_weight_norm`, or train without it.")
    apply = nn.utils.weight_norm if legacy else nn.utils.parametrizations.weight_norm
    for _, module in normalized:
        ours = weight_norms(module)
        _remove_own_weight_norm(module)
        for name, wn in ours.items():  # a 1-D v is one unit, which torch spells dim=None (WHOLE_TENSOR is its -1)
            apply(module, name, dim=WHOLE_TENSOR if wn.v.dim() == 1 else wn.dim)
        for name, norm, _, _ in torch_norms.torch_weight_norms(module):  # torch's split of the fold: ours instead
            mine = ours[name].original0, ours[name].original1
            if isinstance(norm, LegacyWeightNorm):
                _take(module, (f"{name}_g", f"{name}_v"), mine)
                norm(module, ())  # it computed `module.<name>` from torch's split: again, from ours
            else:
                _take(module.parametrizations[name], ("original0", "original1"), mine)
    return [name for name, _ in normalized]


@torch.no_grad()
def _take(holder: nn.Module, names: tuple[str, str], tensors: tuple[Tensor, Tensor]) -> None:
    """Put ``g`` and ``v`` under ``names`` of ``holder``: the very parameters, so that an optimizer built on them
    trains on, or their values where the shapes differ (the one ``g`` of a 1-D ``v``: (1,) here, 0-d in torch)."""
    for name, tensor in zip(names, tensors):
        if (target := getattr(holder, name)).shape == tensor.shape:
            setattr(holder, name, tensor)
        else:
            target.copy_(tensor.reshape(target.shape)).requires_grad_(tensor.requires_grad)
