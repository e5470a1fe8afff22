"""Torch's own weight and spectral norms on a layer, each shipped twice: as a parametrization
(``torch.nn.utils.parametrizations.weight_norm``) and as a legacy forward pre-hook (``torch.nn.utils.weight_norm``)."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm, _WeightNorm
from torch.nn.utils.spectral_norm import SpectralNorm as LegacySpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as LegacyWeightNorm

TORCH_FIX = (
    "Convert torch's weight norm with `lightning_wn.from_torch(model)` (it keeps g and v), or fold it with "
    "`lightning_wn.remove_weight_norm(model)`; keep torch's spectral norm by leaving the layer out."
)
_KINDS = {
    _WeightNorm: "torch.nn.utils.parametrizations.weight_norm",
    _SpectralNorm: "torch.nn.utils.parametrizations.spectral_norm",
    LegacyWeightNorm: "torch.nn.utils.weight_norm",
    LegacySpectralNorm: "torch.nn.utils.spectral_norm",
}


def _kind(reparametrization: object) -> str:
    return next((how for cls, how in _KINDS.items() if isinstance(reparametrization, cls)), type(reparametrization).__name__)


def parametrization_chains(module: nn.Module) -> dict[str, nn.ModuleList]:
    """Each tensor of ``module`` that ``torch.nn.utils.parametrize`` reparametrizes, with its chain."""
    return dict(module.parametrizations.items()) if parametrize.is_parametrized(module) else {}


def legacy_hooks(module: nn.Module) -> list[LegacyWeightNorm | LegacySpectralNorm]:
    # the legacy functions register their objects as forward pre-hooks and return no handle to find them by
    return [hook for hook in module._forward_pre_hooks.values() if isinstance(hook, (LegacyWeightNorm, LegacySpectralNorm))]


def torch_reparametrizations(module: nn.Module) -> list[str]:
    """What torch reparametrizes in ``module``, as ``"<tensor>: <how>"``; empty if nothing.

    Example:
        >>> layer = nn.utils.parametrizations.weight_norm(nn.Linear(2, 3))
        >>> torch_reparametrizations(layer)
        ['weight: torch.nn.utils.parametrizations.weight_norm']
        >>> remove_torch_weight_norm(layer), torch_reparametrizations(layer)
        (True, [])
    """
    found = [f"{name}: {' + '.join(map(_kind, chain))}" for name, chain in parametrization_chains(module).items()]
    return found + [f"{hook.name}: {_kind(hook)}" for hook in legacy_hooks(module)]


def has_torch_weight_norm(module: nn.Module) -> bool:
    found = [p for chain in parametrization_chains(module).values() for p in chain] + legacy_hooks(module)
    return any(isinstance(p, (_WeightNorm, LegacyWeightNorm)) for p in found)


def refuse_chained_weight_norm(module_name: str, module: nn.Module) -> None:
    """Folding a chain that holds torch's weight norm would fold the other parametrizations with it."""
    for name, chain in parametrization_chains(module).items():
        if len(chain) > 1 and any(isinstance(p, _WeightNorm) for p in chain):
            raise ValueError(
                f"`{module_name}.{name}` chains torch's weight norm with {[type(p).__name__ for p in chain]}: folding "
                "would fold them all. Remove them with `torch.nn.utils.parametrize.remove_parametrizations` in the "
                "order you mean."
            )


def remove_torch_weight_norm(module: nn.Module) -> bool:
    """Fold torch's weight norms of ``module`` into plain weights; whether there was one."""
    chains = [name for name, chain in parametrization_chains(module).items() if isinstance(chain[0], _WeightNorm)]
    hooks = [hook.name for hook in legacy_hooks(module) if isinstance(hook, LegacyWeightNorm)]
    for name in chains:
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    for name in hooks:
        nn.utils.remove_weight_norm(module, name)
    if chains or hooks:  # torch's weight norm leaves a state-dict hook (renaming legacy `weight_g`/`weight_v` keys),
        # with no handle to remove it by; it is a local function, so nothing holding it pickles
        pre_hooks = module._load_state_dict_pre_hooks
        for key, hook in list(pre_hooks.items()):
            if getattr(getattr(hook, "hook", hook), "__name__", "") == "_weight_norm_compat_hook":
                del pre_hooks[key]
    return bool(chains or hooks)
