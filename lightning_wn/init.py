"""The paper's data-dependent initialization, in one forward pass."""

from __future__ import annotations

import fnmatch
import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_wn.init_inputs import named_leaves
from lightning_wn.mean_only_bn import MeanOnlyBatchNorm
from lightning_wn.models import parameter_owners
from lightning_wn.state_dict import WHOLE_TENSOR
from lightning_wn.torch_norms import TORCH_FIX, torch_reparametrizations
from lightning_wn.weight_norm import RECURRENT_LAYERS, SUPPORTED_LAYERS, default_dim, is_weight_normalized, weight_norms
from lightning_wn.weight_norm import positive_number

INITIALIZED = "_lightning_wn_data_initialized"  # set on each initialized module: a second call warns, a fit skips it


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
            mean, std = (f"[{t.min().item():+.3g}, {t.max().item():+.3g}]" for t in (m.mean, m.std))
            notes = [f"{len(m.tiny_units)} units with ~0 std left alone"] if m.tiny_units else []
            notes += [] if m.bias_set else ["no bias: mean scaled, not removed"]
            lines.append(f"{name:<32} {m.kind:<12} {m.mean.numel():>5} {mean:>21} {std:>21} {'; '.join(notes)}")
        return "\n".join(lines + [f"{name:<32} skipped: {why}" for name, why in self.skipped.items()])


@torch.no_grad()
def data_dependent_init(model: nn.Module, inputs: object, modules: Sequence[str] | None = None, init_scale: float = 1.0,
                        *, min_std: float = 1e-6) -> InitReport:  # fmt: skip
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

    A module called several times in the pass is initialized on its first call. A target the pass never calls
    through its own forward (``MultiheadAttention`` reads its ``out_proj``'s weight itself) keeps its weights,
    with a warning.

    Example:
        >>> from lightning_wn import weight_norm
        >>> model = nn.Sequential(weight_norm(nn.Linear(10, 20)), nn.ReLU(), weight_norm(nn.Linear(20, 5)))
        >>> x = torch.randn(256, 10) * 3 + 1
        >>> report = data_dependent_init(model, x)
        >>> out = model(x)
        >>> bool(out.mean(0).abs().max() < 1e-4), bool((out.std(0, unbiased=False) - 1).abs().max() < 1e-4)
        (True, True)
    """
    init_scale, min_std = positive_number("init_scale", init_scale), positive_number("min_std", min_std)
    if not (tensors := [x for _, x in named_leaves(inputs) if isinstance(x, Tensor)]):
        raise TypeError(f"`inputs` holds no tensor (got {type(inputs).__name__}); pass a batch of model inputs.")
    for x in tensors:
        if x.dim() and x.shape[0] == 0:
            raise ValueError(f"`inputs` is an empty batch (a tensor of shape {tuple(x.shape)}).")
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError("`inputs` contains NaN or infinite values; the init statistics would be NaN.")
    targets, report = _targets(model, modules)
    if lazy := [name for name, m in targets.items() if any(map(nn.parameter.is_lazy, m.parameters()))]:
        raise ValueError(f"{_shown(lazy)} are lazy (`nn.LazyLinear`, ...): their weights have no shape yet. Run one "
                         "forward pass first, then the data-dependent init.")
    if again := [name for name, m in targets.items() if getattr(m, INITIALIZED, False)]:
        warnings.warn(f"data_dependent_init: {_shown(again)} were initialized by an earlier call; this one rescales "
                      "them again. Call it once per model (not again after resuming), or pass `modules` to pick the "
                      "others.", stacklevel=3)  # past torch.no_grad's wrapper
    # FSDP2 runs the forward on gathered copies of the parameters and frees them: the init must write the shards
    sharded = [m for m in model.modules() if _is_sharded(m)]
    for m in sharded:
        m.reshard()
    writes: list[tuple[nn.Module, Tensor, Tensor]] = []  # (module, scale, shift) of each rescaling
    hook = functools.partial(_init_module, report, writes, init_scale, min_std)
    # prepended: the layer's own hooks (an attached mean-only batch norm) see the normalized output, as later layers do
    buffers = [b for b in model.buffers() if not nn.parameter.is_lazy(b)]  # a lazy batch norm's: the pass sets them
    before = {id(t): (t, t.clone()) for t in (*(p for m in targets.values() for p in m.parameters()), *buffers)}
    handles = [m.register_forward_hook(functools.partial(hook, name), prepend=True) for name, m in targets.items()]
    positional = isinstance(inputs, (tuple, list))
    try:
        with torch.compiler.set_stance("force_eager"):  # a graph compiled before would run without the hooks
            model(**inputs) if isinstance(inputs, dict) else model(*inputs) if positional else model(inputs)
    except BaseException as error:  # put back what the hooks rescaled, and the running statistics the pass moved
        for tensor, saved in before.values():
            tensor.copy_(saved)
        if positional and isinstance(error, TypeError):  # a whole (x, y) batch passed as `inputs`?
            raise TypeError(f"{error} (`inputs`, a {type(inputs).__name__}, was passed as `model(*inputs)`: for a "
                            "batch `(x, y)`, pass its model inputs alone, `batch[0]`)") from error
        raise
    finally:
        torch.clear_autocast_cache()  # its low-precision copies of the parameters the hooks rescaled in place
        for handle in handles:
            handle.remove()
        for m in sharded:
            m.reshard()
    for module, scale, shift in writes if sharded else ():  # the hooks rescaled gathered copies; now the shards
        _rescale(module, scale, shift)
    for name in report.modules:
        setattr(targets[name], INITIALIZED, True)
    if missed := [name for name in targets if name not in report.modules]:
        report.skipped.update(dict.fromkeys(missed, "not called by the forward pass"))
        warnings.warn(f"data_dependent_init: {_shown(missed)} were not called through their own forward in the "
                      "pass (another module reads their weight, as MultiheadAttention does its out_proj's, or forward "
                      "never reaches them), so they keep their weights.", stacklevel=3)
    return report


def _shown(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(f"`{name}`" for name in names[:limit]) + more


def _init_module(report: InitReport, writes: list, init_scale: float, min_std: float, name: str,
                 module: nn.Module, args: tuple, output: Tensor) -> None:  # fmt: skip
    """A forward hook: initializes ``module`` on its first call and normalizes that call's output in place."""
    if name in report.modules:  # called again in the same forward: the first call counts
        return
    if not isinstance(output, Tensor):
        raise TypeError(f"Module `{name}` returned {type(output).__name__}, not a tensor.")
    # in its forward an FSDP2 layer holds plain tensors, so a DTensor here is split by tensor parallelism
    if any(_is_sharded(p) for p in module.parameters()):
        raise RuntimeError(f"Module `{name}` has parameters split across ranks by tensor parallelism; data-dependent "
                           "init needs each unit's whole output. Leave tensor-parallel layers out of `modules`.")
    if isinstance(module, MeanOnlyBatchNorm):
        mean, var = _unit_moments(args[0], 1, name)
        shift = mean.to(module.running_mean.dtype) - module.running_mean
        module.running_mean.add_(shift)
        if not module.training:  # eval subtracted the old running mean; a fresh pass uses the new one
            output.sub_(shift.view(1, -1, *[1] * (output.dim() - 2)).to(output.dtype))
        ones = torch.ones_like(mean)
        report.modules[name] = ModuleInit("mean_only_bn", mean.cpu(), var.sqrt().cpu(), ones.cpu(), True)
        return
    # units: a Linear's last axis; a convolution's channels, before its spatial axes (axis 1, or 0 unbatched)
    axis = output.dim() - 1 if isinstance(module, nn.Linear) else output.dim() - len(module.kernel_size) - 1
    mean, var = _unit_moments(output, axis, name)
    std = var.sqrt()
    tiny = std < min_std
    has_bias = isinstance(getattr(module, "bias", None), Tensor)
    scale = torch.where(tiny, 1.0, init_scale / std)
    shift = torch.where(tiny | (not has_bias), 0.0, mean)
    writes.append((module, scale, shift))
    _rescale(module, scale, shift)
    torch.clear_autocast_cache()  # its copies of the parameters rescaled: a module called again must see them
    shape = [-1 if d == axis else 1 for d in range(output.dim())]
    output.sub_(shift.view(shape).to(output.dtype)).mul_(scale.view(shape).to(output.dtype))
    kind, tiny_units = "weight_norm" if is_weight_normalized(module) else "plain", tiny.nonzero().flatten().tolist()
    report.modules[name] = ModuleInit(kind, mean.cpu(), std.cpu(), scale.cpu(), has_bias, tiny_units)


def _unit_moments(y: Tensor, axis: int, name: str) -> tuple[Tensor, Tensor]:
    """Per-unit mean and variance along ``axis``, over all ranks, in float64 (squares of 1e20 fit)."""
    y = y.double()
    var, mean = torch.var_mean(y, dim=[d for d in range(y.dim()) if d != axis], correction=0)
    count = y.new_full((1,), y.numel() // y.shape[axis])
    if dist.is_available() and dist.is_initialized():  # the whole batch's mean, then the spread around it
        local_mean, local_count = mean, count
        sums = torch.cat([count, mean * count])
        dist.all_reduce(sums)
        count, mean = sums[:1], sums[1:] / sums[:1]
        var = (var + (local_mean - mean).square()) * local_count  # not E[y^2] - mean^2: it cancels where mean >> std
        dist.all_reduce(var)
        var /= count
    if count.item() < 2:
        raise ValueError(f"Module `{name}` gives one value per output unit on the init batch: no variance to measure. "
                         "Pass a batch of several examples (the paper used a few hundred).")
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
    else:  # the weight's rows: (out, in / groups, *kernel)
        weight, factor = module.weight, scale.view(-1, 1)
        if isinstance(module, nn.modules.conv._ConvTransposeNd):  # weight: (in, out / groups, *kernel)
            factor = scale.view(module.groups, -1).repeat_interleave(weight.shape[0] // module.groups, dim=0)
        weight, (factor,) = _shards(weight, factor.reshape(*factor.shape, *[1] * (weight.dim() - 2)))
        weight.mul_(factor)
    if isinstance(getattr(module, "bias", None), Tensor):
        bias, (shift, scale) = _shards(module.bias, shift, scale)
        bias.sub_(shift).mul_(scale)


def _shards(param: Tensor, *full: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``param`` and ``full`` (broadcast to its shape) where an in-place write must go: the local FSDP2 shard."""
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
    """The modules to initialize, the mean-only batch norms last, and a report of those skipped."""
    report, named = InitReport(), dict(model.named_modules())
    if patterns is None:
        chosen = [name for name, m in named.items() if is_weight_normalized(m)]
        chosen = chosen or [name for name, m in named.items() if isinstance(m, SUPPORTED_LAYERS)]
    else:
        chosen = {}
        entries = [patterns] if isinstance(patterns, str) else patterns
        if not isinstance(entries, Sequence) or not all(isinstance(entry, str) for entry in entries):
            raise TypeError(f"`modules` must be module names or glob patterns (`['encoder.*']`), got {patterns!r}.")
        for pattern in entries:
            if not (matched := [name for name in named if fnmatch.fnmatchcase(name, pattern)]):
                raise ValueError(f"`modules` pattern {pattern!r} matches no module of {type(model).__name__}.")
            chosen.update(dict.fromkeys(matched))
    targets, owners = {}, parameter_owners(named)
    layers_of_g: dict[int, list[str]] = {}  # by id of each g (or s) the init would rescale: several layers if shared
    for name, module in named.items():
        for wn in weight_norms(module).values():
            layers_of_g.setdefault(id(wn.magnitude_param), []).append(name)
    leave_out = "leave it out of `modules` (the callback's `exclude`)."
    for name in chosen:
        module = named[name]
        if isinstance(module, MeanOnlyBatchNorm):
            continue  # added below
        if isinstance(module, RECURRENT_LAYERS):
            report.skipped[name] = "recurrent: the data-dependent init is for networks without recursion"
        elif not isinstance(module, SUPPORTED_LAYERS):
            raise ValueError(f"Module `{name}` ({type(module).__name__}) is not a layer data-dependent init can "
                             "rescale; name Linear, Conv* or ConvTranspose* layers in `modules`.")
        elif reparametrized := torch_reparametrizations(module):  # torch recomputes its weight at each call
            why = f"reparametrized by torch ({', '.join(reparametrized)}): its weight cannot be rescaled in place"
            if patterns is not None:
                raise ValueError(f"Module `{name}` is {why}. {TORCH_FIX}")
            report.skipped[name] = why
        elif not (normalized := weight_norms(module)) and len(tied := owners[id(module.weight)]) > 1:
            raise ValueError(f"Module `{name}`'s weight is tied: {' and '.join(f'`{t}`' for t in tied)} are one "
                             f"tensor, whose rows the init would rescale once for each: {leave_out}")
        elif len(normalized) > 1:
            raise ValueError(f"Module `{name}` normalizes {sorted(normalized)}, but data-dependent init needs one "
                             f"normalized weight per layer: normalize only `weight`, or {leave_out}")
        elif normalized and len(tied := layers_of_g[id(next(iter(normalized.values())).magnitude_param)]) > 1:
            raise ValueError(f"Modules {' and '.join(f'`{t}`' for t in tied)} share one g: the init of one would "
                             "rescale the others' outputs too. Leave them all out of `modules` (the callback's "
                             "`exclude`).")
        elif dims := [wn.dim for wn in normalized.values() if wn.dim != default_dim(module)]:
            axis = "one g for the whole tensor (dim=None)" if dims[0] == WHOLE_TENSOR else f"dim={dims[0]}"
            raise ValueError(f"Module `{name}` is weight-normalized with {axis}, but data-dependent init sets one g "
                             f"per output unit (dim={default_dim(module)} for {type(module)._wn_base.__name__}). "
                             f"Normalize it with `dim` left out, or {leave_out} (A layer `from_torch` converted keeps "
                             "torch's axis: to keep its trained g, skip the init, the callback's `data_init=False`.)")
        else:
            targets[name] = module
    if not targets:
        under_torch = sum(why.startswith("reparametrized by torch") for why in report.skipped.values())
        why = f" {under_torch} layers are under torch's weight or spectral norm. {TORCH_FIX}" if under_torch else ""
        raise ValueError(f"No module of {type(model).__name__} to initialize: it has no weight-normalized, Linear or "
                         f"Conv* layer matching `modules` (recurrent layers are skipped).{why}")
    # mean-only batch norms: all, or those named and those attached to the chosen layers (not to others, done before)
    norms = {name: m for name, m in named.items() if isinstance(m, MeanOnlyBatchNorm)}
    if patterns is not None:
        norms = {name: m for name, m in norms.items() if name in chosen or name.rpartition(".")[0] in targets}
    return targets | norms, report
