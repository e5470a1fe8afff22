"""The paper's data-dependent initialization, done in one forward pass.

Forward hooks fire in execution order. Each target module, on its first call, measures the
per-unit mean and standard deviation of its output, rescales its own parameters so that output
becomes zero-mean with standard deviation ``init_scale``, and hands the normalized output on:
later layers see already-initialized inputs, exactly as a fresh forward pass would give them.
Under ``torch.distributed`` the per-unit sums are all-reduced, so every rank sets the same values.
A model sharded with FSDP2 (``fully_shard``) runs the pass on gathered parameters, which are freed
after it: the same rescaling is then written into each rank's shard of the sharded parameters.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_wn.mean_only_bn import MeanOnlyBatchNorm
from lightning_wn.state_dict import WHOLE_TENSOR
from lightning_wn.torch_norms import TORCH_FIX, torch_reparametrizations
from lightning_wn.weight_norm import (
    DEFAULT_LAYERS,
    RECURRENT_LAYERS,
    SUPPORTED_LAYERS,
    default_dim,
    is_weight_normalized,
    weight_norms,
)

@dataclass
class ModuleInit:
    """What :func:`data_dependent_init` measured on one module's output and what it set."""

    kind: str  # "weight_norm", "plain" (weight rows rescaled) or "mean_only_bn"
    mean: Tensor  # per-unit mean of the output before init
    std: Tensor  # per-unit standard deviation of the output before init
    scale: Tensor  # the factor applied to each unit (1 where left alone)
    bias_set: bool  # False when the layer has no bias, so its mean could not be removed
    tiny_units: list[int] = field(default_factory=list)  # units left alone: no variance to normalize


@dataclass
class InitReport:
    """Per module: the pre-init statistics and what was set; plus what was skipped and why."""

    modules: dict[str, ModuleInit] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{'module':<32} {'kind':<12} {'units':>5} {'mean range':>21} {'std range':>21} note"]
        for name, m in self.modules.items():
            notes = []
            if m.tiny_units:
                notes.append(f"{len(m.tiny_units)} units with ~0 std left alone")
            if not m.bias_set and m.kind != "mean_only_bn":
                notes.append("no bias: mean kept")
            lines.append(
                f"{name:<32} {m.kind:<12} {m.mean.numel():>5} {_range(m.mean):>21} {_range(m.std):>21} "
                + "; ".join(notes)
            )
        lines += [f"{name:<32} skipped: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


@torch.no_grad()
def data_dependent_init(
    model: nn.Module,
    inputs: object,
    modules: Sequence[str] | None = None,
    init_scale: float = 1.0,
    *,
    min_std: float = 1e-6,
) -> InitReport:
    r"""Initialize ``model`` so each target module's output starts zero-mean with std ``init_scale``.

    One forward pass of ``inputs`` (``model(inputs)``, ``model(*inputs)`` for a tuple or list,
    ``model(**inputs)`` for a dict). Per output unit with pre-init mean :math:`\mu` and standard
    deviation :math:`\sigma`, and :math:`s` = ``init_scale``:

    * weight-normalized layers: :math:`g \leftarrow g\,s/\sigma`, :math:`b \leftarrow (b - \mu)\,s/\sigma`;
    * plain layers (the paper notes the method works without weight norm): the unit's weights
      are multiplied by :math:`s/\sigma` instead of ``g``;
    * :class:`~lightning_wn.MeanOnlyBatchNorm`: its running mean is set to the batch mean.

    Args:
        model: the network, in the mode (train/eval) it should be initialized in.
        inputs: one batch of model inputs; the paper used a few hundred examples.
        modules: qualified names or glob patterns of the modules to initialize; default every
            weight-normalized module, or every ``Linear``/``Conv*`` if none is normalized.
            Recurrent layers are skipped: the method is for networks without recursion.
        init_scale: the standard deviation each output unit starts with.
        min_std: units whose output varies less than this on the batch are left alone.

    Returns:
        An :class:`InitReport`.

    Example:
        >>> from lightning_wn import weight_norm
        >>> model = nn.Sequential(weight_norm(nn.Linear(10, 20)), nn.ReLU(), weight_norm(nn.Linear(20, 5)))
        >>> x = torch.randn(256, 10) * 3 + 1
        >>> report = data_dependent_init(model, x)
        >>> out = model(x)
        >>> bool(out.mean(0).abs().max() < 1e-4), bool((out.std(0, unbiased=False) - 1).abs().max() < 1e-4)
        (True, True)
    """
    if not (init_scale > 0 and math.isfinite(init_scale)):
        raise ValueError(f"`init_scale` must be a positive number, got {init_scale!r}.")
    _check_batch(inputs)
    targets, report = _targets(model, modules)
    again = [name for name, module in targets.items() if getattr(module, _INITIALIZED, False)]
    if again:
        warnings.warn(
            f"data_dependent_init: {_preview_names(again)} were initialized by an earlier call; this one rescales "
            "them again, to statistics that the first init already set. Call it once per model (a resumed model "
            "must not be initialized again), or pass `modules` to pick the others.",
            UserWarning,
            stacklevel=2,
        )
    # FSDP2: the forward runs on gathered copies of the parameters and frees them afterwards, so the shards are
    # what the init must write; resharded first, the model's parameters are those shards
    sharded = _fsdp_modules(model)
    _reshard(sharded)
    writes: list[tuple[nn.Module, Tensor, Tensor]] = []
    # prepended: a layer's own hooks (an attached mean-only batch norm) must see the initialized output
    handles = [
        m.register_forward_hook(_InitHook(name, init_scale, min_std, report, writes), prepend=True)
        for name, m in targets.items()
    ]
    # what the hooks rescale, kept to put back if the forward fails halfway: the model is then as it was
    touched = {id(t): t for m in targets.values() for t in (*m.parameters(), *m.buffers())}
    before = {key: t.clone() for key, t in touched.items()}
    try:
        if isinstance(inputs, dict):
            model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            model(*inputs)
        else:
            model(inputs)
    except BaseException:
        _reshard(sharded)
        for key, tensor in touched.items():
            tensor.copy_(before[key])
        raise
    finally:
        for handle in handles:
            handle.remove()
    if sharded:
        # the hooks rescaled the gathered copies, which the rest of the pass read; now the shards themselves
        _reshard(sharded)
        for module, scale, shift in writes:
            _rescale(module, scale, shift)
    for name, module in targets.items():
        if name in report.modules:
            setattr(module, _INITIALIZED, True)  # read by a second call, to warn
        else:
            report.skipped[name] = "not called by the forward pass"
    return report


_INITIALIZED = "_lightning_wn_data_initialized"


def _reshard(modules: list[nn.Module]) -> None:
    for module in modules:
        module.reshard()  # FSDPModule.reshard: frees the gathered parameters, the module exposes its shards


def _preview_names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"`{name}`" for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class _InitHook:
    """Initializes one module on its first call and normalizes that call's output in place."""

    def __init__(self, name: str, init_scale: float, min_std: float, report: InitReport, writes: list) -> None:
        self.name, self.init_scale, self.min_std, self.report = name, init_scale, min_std, report
        self.writes = writes  # (module, scale, shift) of each rescaled module, made again on the shards

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self.name in self.report.modules:  # called again in the same forward: first call counts
            return
        if not isinstance(output, Tensor):
            raise TypeError(f"Module `{self.name}` returned {type(output).__name__}, not a tensor.")
        _refuse_tensor_parallel(module, self.name)
        if isinstance(module, MeanOnlyBatchNorm):
            self._init_mean_only_bn(module, args[0], output)
            return
        axis = -1 if isinstance(module, nn.Linear) else 1
        mean, var = _unit_moments(output, axis, self.name)
        std = var.sqrt()
        tiny = std < self.min_std
        scale = torch.where(tiny, 1.0, self.init_scale / std)
        shift = torch.where(tiny, 0.0, mean)
        bias = getattr(module, "bias", None)
        if not isinstance(bias, Tensor):
            shift = torch.zeros_like(shift)
        kind = "weight_norm" if is_weight_normalized(module) else "plain"
        self.writes.append((module, scale, shift))
        _rescale(module, scale, shift)
        shape = [1] * output.dim()
        shape[axis] = -1
        output.sub_(shift.view(shape).to(output.dtype)).mul_(scale.view(shape).to(output.dtype))
        self.report.modules[self.name] = ModuleInit(
            kind, mean.cpu(), std.cpu(), scale.cpu(), isinstance(bias, Tensor), tiny.nonzero().flatten().tolist()
        )

    def _init_mean_only_bn(self, module: MeanOnlyBatchNorm, x: Tensor, output: Tensor) -> None:
        mean, var = _unit_moments(x, 1, self.name)
        shift = mean.to(module.running_mean.dtype) - module.running_mean
        module.running_mean.add_(shift)
        if not module.training:  # eval subtracted the old running mean; a fresh pass uses the new one
            output.sub_(shift.view(1, -1, *([1] * (output.dim() - 2))).to(output.dtype))
        self.report.modules[self.name] = ModuleInit(
            "mean_only_bn", mean.cpu(), var.sqrt().cpu(), torch.ones_like(mean).cpu(), True
        )


def _unit_moments(y: Tensor, axis: int, name: str) -> tuple[Tensor, Tensor]:
    """Per-unit mean and variance along ``axis``, over all ranks, in float64 (squares of 1e20 fit)."""
    axis = axis % y.dim()
    y = y.double()
    var, mean = torch.var_mean(y, dim=[d for d in range(y.dim()) if d != axis], correction=0)
    count = torch.full((1,), y.numel() // y.shape[axis], dtype=torch.float64, device=y.device)
    if dist.is_available() and dist.is_initialized():
        sums = torch.cat([count, mean * count, (var + mean.square()) * count])
        dist.all_reduce(sums)
        count, total, total_sq = sums[:1], sums[1 : 1 + mean.numel()], sums[1 + mean.numel() :]
        mean = total / count
        var = (total_sq / count - mean.square()).clamp_min(0.0)
    if count.item() < 2:
        raise ValueError(
            f"Module `{name}` gives one value per output unit on the init batch: no variance to measure. "
            "Pass a batch of several examples (the paper used a few hundred)."
        )
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
        raise ValueError(f"Module `{name}`'s outputs on the init batch are not finite (overflow): scale the inputs down.")
    return mean, var


def _rescale(module: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """Per output unit: ``g`` (or the weight's rows) times ``scale``, the bias ``(b - shift) * scale``."""
    if is_weight_normalized(module):
        _scale_magnitude(module, scale)
    else:
        _scale_weight_rows(module, scale)
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        local, (local_shift, local_scale) = _shards(bias, shift, scale)
        local.sub_(local_shift).mul_(local_scale)


def _scale_magnitude(module: nn.Module, scale: Tensor) -> None:
    normalized = weight_norms(module)
    if len(normalized) != 1:
        raise ValueError(f"Data-dependent init needs one normalized weight per layer, got {sorted(normalized)}.")
    (wn,) = normalized.values()
    param = wn.magnitude_param
    local, (scale,) = _shards(param, scale.reshape(param.shape))
    if wn.log_scale_factor is None:
        local.mul_(scale)
    else:
        local.add_(scale.log() / wn.log_scale_factor)


def _scale_weight_rows(module: nn.Module, scale: Tensor) -> None:
    weight = module.weight
    ones = [1] * (weight.dim() - 2)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # weight: (in, out / groups, *kernel)
        groups = module.groups
        per_group = scale.view(groups, 1, -1, *ones).expand(groups, weight.shape[0] // groups, -1, *ones)
        factor = per_group.reshape(weight.shape[0], weight.shape[1], *ones)
    else:
        factor = scale.view(-1, 1, *ones)
    local, (factor,) = _shards(weight, factor)
    local.mul_(factor)


def _shards(param: Tensor, *full: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``param``'s own values and each of ``full`` (broadcast to its shape) cut as ``param`` is.

    A plain parameter is its own values; a sharded one (an FSDP2 ``DTensor``) this rank's shard,
    which is what an in-place write must reach.
    """
    full = [t.to(param.dtype) for t in full]
    if not _is_dtensor(param):
        return param, full
    from torch.distributed.tensor import distribute_tensor

    # each rank holds the same full tensor (all-reduced statistics): cut locally, no communication
    cut = [distribute_tensor(t.expand(param.shape), param.device_mesh, param.placements, src_data_rank=None) for t in full]
    return param.to_local(), [t.to_local() for t in cut]


def _is_dtensor(tensor: Tensor) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` (FSDP2) manages."""
    if not dist.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _refuse_tensor_parallel(module: nn.Module, name: str) -> None:
    # inside its forward, an FSDP2 layer holds gathered plain tensors: a DTensor there is split across ranks by
    # tensor parallelism, and so is the layer's output, whose per-unit statistics this rank cannot measure alone
    if any(_is_dtensor(p) for p in module.parameters()):
        raise RuntimeError(
            f"Module `{name}` has parameters split across ranks by tensor parallelism (DTensors in its forward): "
            "data-dependent init measures each unit's statistics on the whole output, so it supports data "
            "parallelism (DDP, FSDP2's `fully_shard`) only. Leave the tensor-parallel layers out of `modules`."
        )


def _targets(model: nn.Module, patterns: Sequence[str] | None) -> tuple[dict[str, nn.Module], InitReport]:
    report = InitReport()
    named = dict(model.named_modules())
    if patterns is None:
        chosen = [name for name, m in named.items() if is_weight_normalized(m)]
        if not chosen:
            chosen = [name for name, m in named.items() if isinstance(m, (*DEFAULT_LAYERS, *RECURRENT_LAYERS))]
    else:
        if isinstance(patterns, str):
            patterns = [patterns]
        chosen = []
        for pattern in patterns:
            matched = [name for name, m in named.items() if fnmatch.fnmatchcase(name, pattern)]
            if not matched:
                raise ValueError(f"`modules` pattern {pattern!r} matches no module of {type(model).__name__}.")
            chosen += [name for name in matched if name not in chosen]
    targets = {}
    for name in chosen:
        module = named[name]
        reparametrized = torch_reparametrizations(module)
        if isinstance(module, RECURRENT_LAYERS):
            report.skipped[name] = "recurrent: the data-dependent init is for networks without recursion"
        elif not isinstance(module, SUPPORTED_LAYERS):
            raise ValueError(
                f"Module `{name}` ({type(module).__name__}) is not a layer data-dependent init can "
                "rescale; name Linear, Conv* or ConvTranspose* layers in `modules`."
            )
        elif reparametrized:
            # its weight is recomputed from torch's parameters at each call: scaling it in place would be lost
            why = f"reparametrized by torch ({', '.join(reparametrized)}): its weight cannot be rescaled in place"
            if patterns is not None:
                raise ValueError(
                    f"Module `{name}` is {why}. Fold torch's weight norm first (`lightning_wn.remove_weight_norm`), "
                    "or leave the module out of `modules`."
                )
            report.skipped[name] = why
        else:
            _check_output_axis(name, module)
            targets[name] = module
    if not targets:
        under_torch = [name for name, why in report.skipped.items() if why.startswith("reparametrized by torch")]
        why = f" {len(under_torch)} layers are under torch's weight or spectral norm. {TORCH_FIX}" if under_torch else ""
        raise ValueError(
            f"No module of {type(model).__name__} to initialize: it has no weight-normalized, "
            f"Linear or Conv* layer matching `modules` (recurrent layers are skipped).{why}"
        )
    targets.update({name: m for name, m in named.items() if isinstance(m, MeanOnlyBatchNorm)})
    return targets, report


def _check_output_axis(name: str, module: nn.Module) -> None:
    """The init sets one ``g`` per output unit, so ``g`` must be taken along the output-unit axis."""
    for normalized in weight_norms(module).values():
        if normalized.dim != default_dim(module):
            whole = normalized.dim == WHOLE_TENSOR
            axis = "one g for the whole tensor (dim=None)" if whole else f"dim={normalized.dim}"
            raise ValueError(
                f"Module `{name}` is weight-normalized with {axis}, but data-dependent init sets one g per output "
                f"unit (dim={default_dim(module)} for {type(module)._wn_base.__name__}). Normalize it with `dim` left "
                "out, or leave it out of `modules`."
            )


def _check_batch(inputs: object) -> None:
    tensors = list(_tensors(inputs))
    if not tensors:
        raise TypeError(f"`inputs` holds no tensor (got {type(inputs).__name__}); pass a batch of model inputs.")
    for tensor in tensors:
        if tensor.dim() and tensor.shape[0] == 0:
            raise ValueError(f"`inputs` is an empty batch (a tensor of shape {tuple(tensor.shape)}).")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError("`inputs` contains NaN or infinite values; the init statistics would be NaN.")


def _tensors(inputs: object) -> Iterator[Tensor]:
    if isinstance(inputs, Tensor):
        yield inputs
    elif isinstance(inputs, dict):
        for value in inputs.values():
            yield from _tensors(value)
    elif isinstance(inputs, (tuple, list)):
        for value in inputs:
            yield from _tensors(value)


def _range(values: Tensor) -> str:
    return f"[{values.min().item():+.3g}, {values.max().item():+.3g}]" if values.numel() else "-"
