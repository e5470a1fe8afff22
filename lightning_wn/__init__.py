"""Weight normalization (Salimans & Kingma, 2016) for PyTorch and PyTorch Lightning.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import lightning_wn as wn
    >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 30 * 30, 10))
    >>> wn.apply_weight_norm(model)
    ['0', '3']
    >>> report = wn.data_dependent_init(model, torch.randn(64, 3, 32, 32))
    >>> sorted(report.modules)
    ['0', '3']
"""

from lightning_wn._computed_weight import ComputedWeight
from lightning_wn.cache import cached
from lightning_wn.checkpoint import FoldWeightNormOnLoad, load_from_checkpoint, read_checkpoint
from lightning_wn.convert import from_torch, to_torch
from lightning_wn.init import InitReport, ModuleInit, data_dependent_init
from lightning_wn.mean_only_bn import MeanOnlyBatchNorm, attach_mean_only_bn
from lightning_wn.models import apply_weight_norm, limit_direction_norm, remove_weight_norm, select_layers
from lightning_wn.models import weight_normalized_modules
from lightning_wn.state_dict import fold_state_dict
from lightning_wn.weight_norm import DEFAULT_LAYERS, SUPPORTED_LAYERS, WeightNorm, is_weight_normalized, weight_norm
from lightning_wn.weight_norm import weight_norms


def __getattr__(name: str):
    # the callback loads on first use: plain PyTorch users never import Lightning
    if name == "WeightNormalization":
        from lightning_wn.callback import WeightNormalization

        return WeightNormalization
    raise AttributeError(f"module 'lightning_wn' has no attribute {name!r}")


__all__ = [
    "DEFAULT_LAYERS", "SUPPORTED_LAYERS", "ComputedWeight", "FoldWeightNormOnLoad", "InitReport", "MeanOnlyBatchNorm",
    "ModuleInit", "WeightNorm", "WeightNormalization", "apply_weight_norm", "attach_mean_only_bn", "cached",
    "data_dependent_init", "fold_state_dict", "from_torch", "is_weight_normalized", "limit_direction_norm",
    "load_from_checkpoint", "read_checkpoint", "remove_weight_norm", "select_layers", "to_torch", "weight_norm",
    "weight_normalized_modules", "weight_norms",
]  # fmt: skip
