"""The paper's data-dependent initialization, in one forward pass.

Forward hooks fire in execution order: each target module, on its first call, rescales its own
parameters and normalizes that output in place, so later layers see already-initialized inputs.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_wn.mean_only_bn import MeanOnlyBatchNorm
from lightning_wn.state_dict import WHOLE_TENSOR
from lightning_wn.torch_norms import TORCH_FIX, torch_reparametrizations
from lightning_wn.weight_norm import RECURRENT_LAYERS, SUPPORTED_LAYERS, default_dim, is_weight_normalized, weight_norms

_INITIALIZED = "_lightning_wn_data_initialized"  # set on each initialized module, so a second call can warn


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
        def span(t: Tensor) -> str:
            return f"[{t.min().item():+.3g}, {t.max().item():+.3g}]" if t.numel() else "-"

        lines = [f"{'module':<32} {'kind':<12} {'units':>5} {'mean range':>21} {'std range':>21} note"]
        for name, m in self.modules.items():
            notes = [f"{len(m.tiny_units)} units with ~0 std left alone"] if m.tiny_units else []
            notes += [] if m.bias_set else ["no bias: mean kept"]
            stats = f"{m.mean.numel():>5} {span(m.mean):>21} {span(m.std):>21}"
            lines.append(f"{name:<32} {m.kind:<12} {stats} {'; '.join(notes)}")
        return "\n".join(lines + [f"{name:<32} skipped: {why}" for name, why in self.skipped.items()])


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
    ``model(**inputs)`` for a dict); under ``torch.distributed`` the statistics are over all ranks.
    Per output unit with pre-init mean :math:`\mu` and std :math:`\sigma`, and :math:`s` = ``init_scale``:

    * weight-normalized layers: :math:`g \leftarrow g\,s/\sigma`, :math:`b \leftarrow (b - \mu)\,s/\sigma`;
    * plain layers (the paper notes it works without weight norm): the unit's weights times :math:`s/\sigma`;
    * :class:`~lightning_wn.MeanOnlyBatchNorm`: its running mean is set to the batch mean.

    Args:
        model: the network, in the mode (train/eval) it should be initialized in.
        inputs: one batch of model inputs; the paper used a few hundred examples.
        modules: names or glob patterns of the modules to initialize; default every weight-normalized
            module, else every ``Linear``/``Conv*``. Recurrent layers are skipped (no recursion in the method).
        init_scale: the standard deviation each output unit starts with.
        min_std: units whose output varies less than this on the batch are left alone.

    Returns an :class:`InitReport`: the statistics measured, the scales set, and what was skipped and why.

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
    if again := [f"`{name}`" for name, m in targets.items() if getattr(m, _INITIALIZED, False)]:
        more = f" and {len(again) - 5} more" if len(again) > 5 else ""
        warnings.warn(
            f"data_dependent_init: {', '.join(again[:5])}{more} were initialized by an earlier call; this one rescales "
            "them again, to statistics that the first init already set. Call it once per model (a resumed model must "
            "not be initialized again), or pass `modules` to pick the others.",
            stacklevel=2,
        )
    # FSDP2: the forward runs on gathered copies of the parameters and frees them afterwards, so the shards are
    # what the init must write; resharded (FSDPModule.reshard frees the gathered copies), a module exposes its shards
    sharded = [m for m in model.modules() if _is_sharded(m)]
    for m in sharded:
        m.reshard()
    writes: list[tuple[nn.Module, Tensor, Tensor]] = []  # (module, scale, shift) of each rescaling
    hook = functools.partial(_init_module, report, writes, init_scale, min_std)
    # prepended: a layer's own hooks (an attached mean-only batch norm) must see the initialized output
    handles = [m.register_forward_hook(functools.partial(hook, name), prepend=True) for name, m in targets.items()]
    # what the hooks rescale (the shards, under FSDP2), kept to put back if the forward fails halfway
    positional = isinstance(inputs, (tuple, list))
    before = {id(t): (t, t.clone()) for m in targets.values() for t in (*m.parameters(), *m.buffers())}
    try:
        model(**inputs) if isinstance(inputs, dict) else model(*inputs) if positional else model(inputs)
    except BaseException:
        for tensor, saved in before.values():
            tensor.copy_(saved)
        raise
    finally:
        for handle in handles:
            handle.remove()
        for m in sharded:
            m.reshard()
    for module, scale, shift in writes if sharded else ():  # the hooks rescaled gathered copies; now the shards
        _rescale(module, scale, shift)
    for name, module in targets.items():
        if name in report.modules:
            setattr(module, _INITIALIZED, True)
        else:
            report.skipped[name] = "not called by the forward pass"
    return report


def _init_module(report: InitReport, writes: list, init_scale: float, min_std: float, name: str,
                 module: nn.Module, args: tuple, output: Tensor) -> None:  # fmt: skip
    """A forward hook: initializes ``module`` on its first call and normalizes that call's output in place."""
    if name in report.modules:  # called again in the same forward: the first call counts
        return
    if not isinstance(output, Tensor):
        raise TypeError(f"Module `{name}` returned {type(output).__name__}, not a tensor.")
    # inside its forward, an FSDP2 layer holds gathered plain tensors: a DTensor there is split across ranks by
    # tensor parallelism, and so is the layer's output, whose per-unit statistics this rank cannot measure alone
    if any(_is_sharded(p) for p in module.parameters()):
        raise RuntimeError(
            f"Module `{name}` has parameters split across ranks by tensor parallelism (DTensors in its forward): "
            "data-dependent init measures each unit's statistics on the whole output, so it supports data "
            "parallelism (DDP, FSDP2's `fully_shard`) only. Leave the tensor-parallel layers out of `modules`."
        )
    if isinstance(module, MeanOnlyBatchNorm):
        mean, var = _unit_moments(args[0], 1, name)
        shift = mean.to(module.running_mean.dtype) - module.running_mean
        module.running_mean.add_(shift)
        if not module.training:  # eval subtracted the old running mean; a fresh pass uses the new one
            output.sub_(shift.view(1, -1, *([1] * (output.dim() - 2))).to(output.dtype))
        ones = torch.ones_like(mean)
        report.modules[name] = ModuleInit("mean_only_bn", mean.cpu(), var.sqrt().cpu(), ones.cpu(), True)
        return
    axis = output.dim() - 1 if isinstance(module, nn.Linear) else 1
    mean, var = _unit_moments(output, axis, name)
    std = var.sqrt()
    tiny = std < min_std
    has_bias = isinstance(getattr(module, "bias", None), Tensor)
    scale = torch.where(tiny, 1.0, init_scale / std)
    shift = torch.where(tiny | (not has_bias), 0.0, mean)
    writes.append((module, scale, shift))
    _rescale(module, scale, shift)
    shape = [-1 if d == axis else 1 for d in range(output.dim())]
    output.sub_(shift.view(shape).to(output.dtype)).mul_(scale.view(shape).to(output.dtype))
    kind, tiny_units = "weight_norm" if is_weight_normalized(module) else "plain", tiny.nonzero().flatten().tolist()
    report.modules[name] = ModuleInit(kind, mean.cpu(), std.cpu(), scale.cpu(), has_bias, tiny_units)


def _unit_moments(y: Tensor, axis: int, name: str) -> tuple[Tensor, Tensor]:
    """Per-unit mean and variance along ``axis``, over all ranks, in float64 (squares of 1e20 fit)."""
    y = y.double()
    var, mean = torch.var_mean(y, dim=[d for d in range(y.dim()) if d != axis], correction=0)
    count = torch.full((1,), y.numel() // y.shape[axis], dtype=torch.float64, device=y.device)
    if dist.is_available() and dist.is_initialized():
        sums = torch.cat([count, mean * count, (var + mean.square()) * count])
        dist.all_reduce(sums)
        count, total, total_sq = sums.split([1, mean.numel(), mean.numel()])
        mean = total / count
        var = (total_sq / count - mean.square()).clamp_min(0.0)
    if count.item() < 2:
        raise ValueError(
            f"Module `{name}` gives one value per output unit on the init batch: no variance to measure. "
            "Pass a batch of several examples (the paper used a few hundred)."
        )
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
        raise ValueError(f"Module `{name}`'s outputs on the init batch overflow (not finite): scale the inputs down.")
    return mean, var


def _rescale(module: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """Per output unit: ``g`` (or the weight's rows) times ``scale``, the bias ``(b - shift) * scale``."""
    if is_weight_normalized(module):
        (wn,) = weight_norms(module).values()  # one per layer: checked when the targets were chosen
        magnitude, (factor,) = _shards(wn.magnitude_param, scale.reshape(wn.magnitude_param.shape))
        if wn.log_scale_factor is None:
            magnitude.mul_(factor)
        else:  # g = exp(c * s)
            magnitude.add_(factor.log() / wn.log_scale_factor)
    else:
        weight = module.weight
        if isinstance(module, nn.modules.conv._ConvTransposeNd):  # weight: (in, out / groups, *kernel)
            factor = scale.view(module.groups, -1).repeat_interleave(weight.shape[0] // module.groups, dim=0)
        else:  # weight: (out, in / groups, *kernel)
            factor = scale.view(-1, 1)
        weight, (factor,) = _shards(weight, factor.reshape(*factor.shape, *[1] * (weight.dim() - 2)))
        weight.mul_(factor)
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        bias, (shift, scale) = _shards(bias, shift, scale)
        bias.sub_(shift).mul_(scale)


def _shards(param: Tensor, *full: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``param`` and each of ``full`` (broadcast to its shape) as an in-place write must reach them: this rank's shard
    of an FSDP2 ``DTensor``."""
    full = [t.to(param.dtype) for t in full]
    if not _is_sharded(param):
        return param, full
    from torch.distributed.tensor import distribute_tensor

    # each rank holds the same full tensor (all-reduced statistics): cut locally, no communication
    mesh, placements = param.device_mesh, param.placements
    cut = [distribute_tensor(t.expand(param.shape), mesh, placements, src_data_rank=None) for t in full]
    return param.to_local(), [t.to_local() for t in cut]


def _is_sharded(obj: object) -> bool:
    """Whether ``obj`` is a ``DTensor`` or a module ``fully_shard`` (FSDP2) manages (imported here: slow to import)."""
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    return isinstance(obj, (DTensor, FSDPModule))


def _targets(model: nn.Module, patterns: Sequence[str] | None) -> tuple[dict[str, nn.Module], InitReport]:
    report = InitReport()
    named = dict(model.named_modules())
    if patterns is None:
        chosen = [name for name, m in named.items() if is_weight_normalized(m)]
        chosen = chosen or [name for name, m in named.items() if isinstance(m, SUPPORTED_LAYERS)]
    else:
        chosen = []
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            matched = [name for name in named if fnmatch.fnmatchcase(name, pattern)]
            if not matched:
                raise ValueError(f"`modules` pattern {pattern!r} matches no module of {type(model).__name__}.")
            chosen += [name for name in matched if name not in chosen]
    targets = {}
    for name in chosen:
        module = named[name]
        if isinstance(module, RECURRENT_LAYERS):
            report.skipped[name] = "recurrent: the data-dependent init is for networks without recursion"
        elif not isinstance(module, SUPPORTED_LAYERS):
            raise ValueError(
                f"Module `{name}` ({type(module).__name__}) is not a layer data-dependent init can "
                "rescale; name Linear, Conv* or ConvTranspose* layers in `modules`."
            )
        elif reparametrized := torch_reparametrizations(module):
            # its weight is recomputed from torch's parameters at each call: scaling it in place would be lost
            why = f"reparametrized by torch ({', '.join(reparametrized)}): its weight cannot be rescaled in place"
            if patterns is not None:
                raise ValueError(
                    f"Module `{name}` is {why}. Fold torch's weight norm first (`lightning_wn.remove_weight_norm`), "
                    "or leave the module out of `modules`."
                )
            report.skipped[name] = why
        else:
            normalized = weight_norms(module)
            if len(normalized) > 1:
                raise ValueError(
                    f"Data-dependent init needs one normalized weight per layer, got {sorted(normalized)}."
                )
            for wn in normalized.values():  # the init sets one g per output unit: g must be along that axis
                if wn.dim != default_dim(module):
                    axis = "one g for the whole tensor (dim=None)" if wn.dim == WHOLE_TENSOR else f"dim={wn.dim}"
                    raise ValueError(
                        f"Module `{name}` is weight-normalized with {axis}, but data-dependent init sets one g per "
                        f"output unit (dim={default_dim(module)} for {type(module)._wn_base.__name__}). Normalize it "
                        "with `dim` left out, or leave it out of `modules`."
                    )
            targets[name] = module
    if not targets:
        under_torch = sum(why.startswith("reparametrized by torch") for why in report.skipped.values())
        why = f" {under_torch} layers are under torch's weight or spectral norm. {TORCH_FIX}" if under_torch else ""
        raise ValueError(
            f"No module of {type(model).__name__} to initialize: it has no weight-normalized, "
            f"Linear or Conv* layer matching `modules` (recurrent layers are skipped).{why}"
        )
    targets.update({name: m for name, m in named.items() if isinstance(m, MeanOnlyBatchNorm)})
    return targets, report


def _check_batch(inputs: object) -> None:
    def tensors(x: object) -> list[Tensor]:
        if isinstance(x, Tensor):
            return [x]
        values = x.values() if isinstance(x, dict) else x if isinstance(x, (tuple, list)) else ()
        return [t for value in values for t in tensors(value)]

    found = tensors(inputs)
    if not found:
        raise TypeError(f"`inputs` holds no tensor (got {type(inputs).__name__}); pass a batch of model inputs.")
    for tensor in found:
        if tensor.dim() and tensor.shape[0] == 0:
            raise ValueError(f"`inputs` is an empty batch (a tensor of shape {tuple(tensor.shape)}).")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError("`inputs` contains NaN or infinite values; the init statistics would be NaN.")
