"""Torch's own weight and spectral norms on a layer, each shipped twice: as a parametrization
(``torch.nn.utils.parametrizations.weight_norm``) and as a legacy forward pre-hook (``torch.nn.utils.weight_norm``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm, _WeightNorm
from torch.nn.utils.spectral_norm import SpectralNorm as LegacySpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as LegacyWeightNorm

TORCH_FIX = ("Convert torch's weight norm with `lightning_wn.from_torch(model)` (it keeps g and v; to keep trained "
             "ones, skip the data-dependent init: `data_init=False`), or fold it with "
             "`lightning_wn.remove_weight_norm(model)`; keep torch's spectral norm by leaving the layer out.")
_KINDS = {
    _WeightNorm: "torch.nn.utils.parametrizations.weight_norm",
    _SpectralNorm: "torch.nn.utils.parametrizations.spectral_norm",
    LegacyWeightNorm: "torch.nn.utils.weight_norm",
    LegacySpectralNorm: "torch.nn.utils.spectral_norm",
}


def _kind(p: object) -> str:
    return next((how for cls, how in _KINDS.items() if isinstance(p, cls)), type(p).__name__)


def _chains(module: nn.Module) -> list[tuple[str, Sequence]]:
    """Each tensor of ``module`` torch reparametrizes, with its chain of parametrizations, or ``[legacy hook]``."""
    chains = list(module.parametrizations.items()) if parametrize.is_parametrized(module) else []
    # the legacy functions register their objects as forward pre-hooks and return no handle to find them by
    hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, (LegacyWeightNorm, LegacySpectralNorm))]
    return chains + [(hook.name, [hook]) for hook in hooks]


def torch_reparametrizations(module: nn.Module) -> list[str]:
    """What torch reparametrizes in ``module``, as ``"<tensor>: <how>"``; empty if nothing.

    Example:
        >>> layer = nn.utils.parametrizations.weight_norm(nn.Linear(2, 3))
        >>> torch_reparametrizations(layer)
        ['weight: torch.nn.utils.parametrizations.weight_norm']
        >>> remove_torch_weight_norm(layer), torch_reparametrizations(layer)
        (True, [])
    """
    return [f"{name}: {' + '.join(map(_kind, chain))}" for name, chain in _chains(module)]


def has_torch_weight_norm(module: nn.Module) -> bool:
    return any(isinstance(p, (_WeightNorm, LegacyWeightNorm)) for _, chain in _chains(module) for p in chain)


def refuse_chained_weight_norm(module_name: str, module: nn.Module) -> None:
    """Folding a chain that holds torch's weight norm would fold the other parametrizations with it."""
    for name, chain in _chains(module):
        if len(chain) > 1 and any(isinstance(p, _WeightNorm) for p in chain):
            chained = [type(p).__name__ for p in chain]
            raise ValueError(f"`{module_name}.{name}` chains torch's weight norm with {chained}: all would be folded. "
                             "Remove them in your order with `torch.nn.utils.parametrize.remove_parametrizations`.")


def torch_weight_norms(module: nn.Module) -> list[tuple[str, _WeightNorm | LegacyWeightNorm, Tensor, Tensor]]:
    """``(tensor name, torch's weight norm, g, v)`` of each tensor of ``module`` whose chain starts with it."""
    found = []
    for name, chain in _chains(module):
        if isinstance(chain[0], _WeightNorm):
            found.append((name, chain[0], chain.original0, chain.original1))
        elif isinstance(chain[0], LegacyWeightNorm):
            found.append((name, chain[0], module._parameters[f"{name}_g"], module._parameters[f"{name}_v"]))
    return found


def remove_torch_weight_norm(module: nn.Module) -> bool:
    """Fold torch's weight norms of ``module`` into plain weights; whether there was one.

    Each weight is a parameter, trainable as ``w`` was: frozen if ``g`` and ``v`` were, as this library folds.
    """
    found = torch_weight_norms(module)
    if any(isinstance(norm, _WeightNorm) for _, norm, _, _ in found):
        # torch deletes each tensor's property from the module's class, which copies made under its parametrization
        # (an EMA, a target network) share: this module gets a class of its own first
        cls = type(module)
        module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    for name, norm, g, v in found:
        trainable = g.requires_grad or v.requires_grad
        if isinstance(norm, _WeightNorm):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        else:
            nn.utils.remove_weight_norm(module, name)
        if name in module._buffers:  # torch's parametrization folds a frozen weight into a buffer
            module.register_parameter(name, nn.Parameter(module._buffers.pop(name)))
        module._parameters[name].requires_grad_(trainable)  # and the legacy hook into a trainable one, even frozen
    if found:  # torch's weight norm leaves a state-dict hook (renaming legacy `weight_g`/`weight_v` keys),
        # with no handle to remove it by; it is a local function, so nothing holding it pickles
        pre_hooks = module._load_state_dict_pre_hooks
        for key, hook in list(pre_hooks.items()):
            if getattr(getattr(hook, "hook", hook), "__name__", "") == "_weight_norm_compat_hook":
                del pre_hooks[key]
    return bool(found)
