r"""Weight normalization, the reparameterization of Salimans & Kingma (2016).

Each output unit's weight vector is written as

.. math:: w = g \, \frac{v}{\lVert v \rVert}

so that its length ``g`` and its direction ``v`` are learned separately
(https://arxiv.org/abs/1602.07868). Parameters are stored where
``torch.nn.utils.parametrizations.weight_norm`` stores them
(``parametrizations.<name>.original0`` is ``g``, ``original1`` is ``v``), so state dicts move
freely between the two implementations.

What is faster here than in ``torch.nn.utils.parametrizations``:

* a step's first call takes ATen's fused op, whose backward runs without Python; a second
  call (or any call without gradients) caches ``w`` until ``g`` or ``v`` change, so a module
  called many times per step (an unrolled ``LSTMCell``) pays for two norms, not one per call;
  the cache follows autograd's version counters, which a write through ``param.data`` bypasses:
  write ``g`` and ``v`` with ``with torch.no_grad(): param.copy_(...)`` (the callback takes care of
  Lightning's ``WeightAveraging``, which swaps weights through ``.data``);
* a large ``Linear`` fed fewer rows than it has inputs scales its output by ``g / ||v||``
  instead of materializing ``w``, as the paper suggests.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as _TorchSpectralNorm
from torch.nn.utils.parametrizations import _WeightNorm as _TorchWeightNorm
from torch.nn.utils.spectral_norm import SpectralNorm as _LegacySpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as _LegacyWeightNorm

from lightning_wn._computed_weight import WRITTEN_WEIGHT, ComputedWeight
from lightning_wn._normalized_weight import NormalizedWeight, norm_except_dim
from lightning_wn._scaled_linear import ScaledLinear
from lightning_wn.state_dict import WHOLE_TENSOR, fold, norm_axis

_Conv = nn.modules.conv._ConvNd
_ConvTranspose = nn.modules.conv._ConvTransposeNd
RECURRENT_LAYERS: tuple[type[nn.Module], ...] = (nn.RNNBase, nn.RNNCellBase)
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, _Conv, *RECURRENT_LAYERS)
"""Layer types whose output-unit axis is known, so ``dim`` may be left out."""
_OUTPUT_SCALING_MIN_WEIGHTS = 1 << 18
"""Below this many weights, materializing ``w`` costs less than scaling the output (measured)."""
DEFAULT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, _Conv)
"""What :func:`apply_weight_norm` normalizes when ``include`` is not given."""
_is_tracing = torch._C._is_tracing  # torch.jit.is_tracing() outside TorchScript, without its two Python calls


class WeightNorm(nn.Module):
    r"""The parameters of one weight-normalized tensor, and ``w`` computed from them.

    ``original0`` is the magnitude ``g`` (or ``s`` with :math:`g = e^{c s}` when
    ``log_scale_factor`` ``c`` is set, kept in the buffer ``c``) and ``original1`` the direction
    ``v``; ``dim`` is the output-unit axis, the one axis the norm is not taken over, or None for
    one norm over the whole tensor (a 0-d ``g``), kept as ``dim == -1`` as torch keeps it.

    Example:
        >>> weight = torch.randn(4, 3)
        >>> wn = WeightNorm(weight, dim=0)
        >>> torch.allclose(wn(), weight, atol=1e-6)
        True
    """

    def __init__(self, weight: Tensor, dim: int | None, log_scale_factor: float | None = None) -> None:
        super().__init__()
        if dim is not None and not 0 <= dim < max(weight.dim(), 1):
            raise ValueError(f"`dim`={dim} must be an axis of the weight (0 to {weight.dim() - 1}), or None.")
        # torch._weight_norm reads -1 as "the whole tensor", so the op takes it as it is
        self.dim = WHOLE_TENSOR if dim is None else dim
        self.log_scale_factor = log_scale_factor
        v, magnitude = self._split(weight.detach())
        if log_scale_factor is None:
            self.original0 = nn.Parameter(magnitude)
        else:
            self.s = nn.Parameter(magnitude)
            self.register_buffer("c", torch.tensor(float(log_scale_factor)))  # lets a state dict be folded alone
        self.original1 = nn.Parameter(v)
        self._forget()

    def _split(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """``v`` and the magnitude parameter (``g``, or ``s``) that give ``weight``."""
        magnitude = self._norm(weight)
        zero = magnitude == 0
        if not weight.is_meta and zero.any():  # a zero unit (nn.init.zeros_) has no direction: give it one, g = 0
            weight = torch.where(zero, torch.randn_like(weight), weight)
            magnitude = torch.where(zero, 0.0, self._norm(weight))
        if self.log_scale_factor is not None:  # g = 0 is exp(-inf): the smallest normal number instead
            magnitude = magnitude.clamp_min(torch.finfo(magnitude.dtype).tiny).log() / self.log_scale_factor
        return weight, magnitude

    def _norm(self, weight: Tensor) -> Tensor:
        if self.dim == WHOLE_TENSOR:
            return torch.linalg.vector_norm(weight)  # 0-d, the shape torch gives g for dim=None
        return norm_except_dim(weight, self.dim)

    @torch.no_grad()
    def reset(self, weight: Tensor) -> None:
        """Set ``g`` and ``v`` in place so that they give ``weight``."""
        v, magnitude = self._split(weight.detach().to(self.v.dtype))
        self.v.copy_(v)
        self.magnitude_param.copy_(magnitude)
        self._forget()

    # parameters are read from ``_parameters`` directly: nn.Module's attribute fallback costs
    # about a microsecond per read, and these run several times in every forward
    @property
    def v(self) -> Tensor:
        return self._parameters["original1"]

    @property
    def magnitude_param(self) -> nn.Parameter:
        """The learned tensor behind ``g``: ``original0``, or ``s`` where ``g = exp(c * s)``."""
        return self._parameters["original0" if self.log_scale_factor is None else "s"]

    def g(self) -> Tensor:
        if self.log_scale_factor is None:
            return self._parameters["original0"]
        return torch.exp(self.log_scale_factor * self._parameters["s"])

    def forward(self) -> Tensor:
        """``w``; from a step's second call on, a cached one, until ``g``, ``v`` or the grad mode change."""
        v = self.v
        if torch.compiler.is_compiling() or _is_tracing():
            # ATen's op, as torch's own weight norm. dynamo detaches the create_graph backward of an
            # autograd.Function (second derivatives were silently dropped); torch.jit.trace (and so torch.onnx's
            # TorchScript exporter) would freeze a cached w into the graph as a constant
            return torch._weight_norm(v, self.g(), self.dim if v.dim() > 1 else -1)
        return self._weight_for(v, self._cache_key(v))

    def handed_out(self) -> Tensor:
        """``w`` for code outside the layer's forward (``nn.init.normal_(layer.weight)``, a penalty on it): cached.

        Kept in grad mode too, so that an in-place write into it is refused at the layer's next use
        instead of being lost with the uncached tensor; the cache is dropped when its backward runs.
        """
        if torch.compiler.is_compiling() or _is_tracing():
            return self.forward()
        v = self.v
        key = self._cache_key(v)
        if key[0] and (key != self._key or self._weight is None):  # grad mode, nothing cached for this key
            weight = NormalizedWeight.apply(v, self.g(), self.dim, self._forget).as_subclass(ComputedWeight)
            return self._remember(key, weight)
        weight = self._weight_for(v, key)
        # an alias: it shares the cache's version counter, so writes through its views are still seen
        return weight if isinstance(weight, ComputedWeight) else weight.as_subclass(ComputedWeight)

    def linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """``F.linear(x, w, bias)``, taking the paper's output-scaling path where it is cheaper.

        Scaling the output pays off on the first call after ``g`` or ``v`` changed (a training
        step, or acting between updates) when the weight is large and the batch has fewer rows
        than the layer has inputs; a second call caches ``w``.
        """
        v = self.v
        if not (self._output_scaling_pays(v, x) and self.dim == 0):  # the output is scaled per row: dim 0 only
            return nn.functional.linear(x, self.forward(), bias)
        key = self._cache_key(v)
        if key != self._key:
            self._remember(key, None)
            return ScaledLinear.apply(x, v, self.g(), bias)
        return nn.functional.linear(x, self._weight_for(v, key), bias)

    def _weight_for(self, v: Tensor, key: tuple) -> Tensor:
        weight = self._weight
        if weight is not None and key == self._key:
            version = self._weight_version
            if version is not None and weight._version != version:
                self._refuse_written_weight()
            return weight
        # ATen's op reads a 1-D v with dim 0 as one unit per entry; dim -1 is its whole-tensor norm
        aten_dim = self.dim if v.dim() > 1 else -1
        if not key[0]:  # no grad mode: no graph to guard, so ATen's op, cached
            return self._remember(key, torch._weight_norm(v, self.g(), aten_dim))
        if key != self._key:
            # the step's first call takes ATen's op, whose backward runs without Python; its
            # graph serves one use, so only a second call in the same step fills the cache
            self._remember(key, None)
            return torch._weight_norm(v, self.g(), aten_dim)
        # backward is where a training step ends: a stale cache must not outlive it
        return self._remember(key, NormalizedWeight.apply(v, self.g(), self.dim, self._forget))

    @staticmethod
    def _output_scaling_pays(v: Tensor, x: Tensor) -> bool:
        return (
            not _is_tracing()  # first: traced, v.numel() is a tensor, and ScaledLinear and the cache cannot be traced
            and v.numel() >= _OUTPUT_SCALING_MIN_WEIGHTS
            and x.dim() > 0
            and x.numel() < x.shape[-1] ** 2  # fewer rows than inputs
            and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled(x.device.type)
        )

    def _cache_key(self, v: Tensor) -> tuple:
        # which tensors (functional_call, load_state_dict(assign=True) swap them), their versions, the grad mode.
        # The tensors themselves come last: the key keeps them alive, so equal ids mean the same tensors, and
        # tuple equality stops at the first unequal id before it would compare tensors
        m = self.magnitude_param
        return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), id(v), id(m), v._version, m._version, v, m)

    def _remember(self, key: tuple | None, weight: Tensor | None) -> Tensor | None:
        self._refuse_written_weight()
        # straight into __dict__: nn.Module.__setattr__ costs about a microsecond per call
        # inference tensors keep no version counter (and cannot be written outside inference mode)
        version = None if weight is None or weight.is_inference() else weight._version
        self.__dict__.update(_key=key, _weight=weight, _weight_version=version)
        return weight

    def _refuse_written_weight(self) -> None:
        """An in-place write into a cached ``w`` (``with torch.no_grad(): layer.weight.normal_()``) would vanish.

        Every normalized layer caches each ``w`` read from outside its forward (:meth:`handed_out`), a
        :class:`ComputedWeight` that refuses writes as they happen; a write it cannot see, through an alias
        made another way, bumps the version counter it shares with the cache and is refused here.
        """
        weight, version = self._weight, self._weight_version
        if version is not None and weight is not None and weight._version != version:
            self._forget()
            raise RuntimeError(WRITTEN_WEIGHT)

    def _forget(self) -> None:
        self.__dict__.update(_key=None, _weight=None, _weight_version=None)

    def _apply(self, fn, recurse=True):
        self._forget()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_key"] = state["_weight"] = None  # a graph cannot be copied or pickled
        return state

    def extra_repr(self) -> str:
        extra = f", g=exp({self.log_scale_factor} * s)" if self.log_scale_factor else ""
        return f"dim={None if self.dim == WHOLE_TENSOR else self.dim}{extra}"


class _Parametrizations(nn.Module):
    """Holds one :class:`WeightNorm` per normalized tensor name (state-dict layout as torch's)."""


def default_dim(module: nn.Module) -> int:
    """The output-unit axis of a supported layer's weights.

    Example:
        >>> default_dim(nn.Linear(2, 3)), default_dim(nn.ConvTranspose2d(2, 3, 3))
        (0, 1)
    """
    if isinstance(module, _ConvTranspose):
        return 1
    if isinstance(module, SUPPORTED_LAYERS):
        return 0
    raise ValueError(
        f"Cannot tell the output-unit axis of `{type(module).__name__}`; supported layers are "
        f"{_names(SUPPORTED_LAYERS)}. Pass `dim=` to say which axis holds the output units."
    )


def default_names(module: nn.Module) -> list[str]:
    """The tensors weight norm applies to: ``weight``, or every input and hidden weight of an RNN.

    Example:
        >>> default_names(nn.LSTMCell(2, 3))
        ['weight_ih', 'weight_hh']
    """
    if isinstance(module, nn.RNNBase):
        return [name for name in module._flat_weights_names if name.startswith("weight")]
    if isinstance(module, nn.RNNCellBase):
        return ["weight_ih", "weight_hh"]
    return ["weight"]


def is_weight_normalized(module: nn.Module, name: str | None = None) -> bool:
    """Whether ``module`` (or its tensor ``name``) is weight-normalized by this library.

    Example:
        >>> is_weight_normalized(weight_norm(nn.Linear(2, 3)))
        True
    """
    names = getattr(type(module), "_wn_names", ())
    return bool(names) if name is None else name in names


class _OutputAxis:
    """``dim`` left out: the layer's output-unit axis. Not None, which means the whole tensor, as in torch."""

    def __repr__(self) -> str:
        return "<output-unit axis>"


OUTPUT_AXIS = _OutputAxis()


def weight_norm(
    module: nn.Module,
    name: str | Sequence[str] | None = None,
    dim: int | None | _OutputAxis = OUTPUT_AXIS,
    *,
    log_scale_factor: float | None = None,
    paper_init: bool = False,
) -> nn.Module:
    r"""Reparameterize ``module``'s weight as :math:`w = g \, v / \lVert v \rVert`, in place.

    Args:
        module: a ``Linear``, ``Conv*``, ``ConvTranspose*``, ``RNN``/``LSTM``/``GRU`` or cell, or
            any module whose forward reads ``module.<name>`` if ``dim`` is given.
        name: the tensor(s) to normalize; default ``weight``, or every ``weight_ih*`` and
            ``weight_hh*`` of a recurrent layer (each row, i.e. each gate unit, its own ``g``).
        dim: the output-unit axis (the norm runs over all others); left out, 0, or 1 for
            transposed convolutions, whose weights are laid out (in, out, ...). ``None`` takes
            one norm over the whole tensor (one ``g``), as in torch. Unlike torch's functions,
            whose ``dim`` is 0 for every layer, leaving it out normalizes each output unit;
            ``dim=-1`` is refused, since torch reads it as the whole tensor and Python as the last axis.
        log_scale_factor: ``c`` in the paper's :math:`g = e^{c s}`; ``s`` is learned instead of ``g``.
        paper_init: re-draw ``v`` from N(0, 0.05) as in the paper, with ``g = ||v||``; meant to
            be followed by :func:`~lightning_wn.data_dependent_init`.

    The layer computes the same function as before unless ``paper_init`` is set.

    Example:
        >>> layer = nn.Linear(20, 40)
        >>> x = torch.randn(8, 20)
        >>> before = layer(x)
        >>> layer = weight_norm(layer)
        >>> sorted(name for name, _ in layer.named_parameters())
        ['bias', 'parametrizations.weight.original0', 'parametrizations.weight.original1']
        >>> torch.allclose(layer(x), before, atol=1e-6)
        True
        >>> weight_norm(nn.Linear(20, 40), dim=None).parametrizations.weight.original0.shape  # as torch's
        torch.Size([])
    """
    names = default_names(module) if name is None else [name] if isinstance(name, str) else list(name)
    if dim is OUTPUT_AXIS:
        dim = default_dim(module)
    if dim == -1:
        raise ValueError(
            "`dim`=-1 is ambiguous: torch's weight norm reads it as one norm over the whole tensor, Python as the "
            "last axis. Pass `dim=None` for the whole tensor, or the last axis's positive index."
        )
    reparametrized = _torch_reparametrizations(module)
    if reparametrized:
        raise ValueError(
            f"This {type(module).__name__} is already reparametrized by torch ({', '.join(reparametrized)}); weight "
            f"norm on top would stack two reparametrizations. {_TORCH_FIX}"
        )
    if log_scale_factor is not None and not (math.isfinite(log_scale_factor) and log_scale_factor > 0):
        raise ValueError(f"`log_scale_factor` must be a positive number, got {log_scale_factor!r}.")
    if isinstance(module, _ConvTranspose) and module.groups > 1 and dim == 1:
        raise ValueError(
            f"`{type(module).__name__}` with groups={module.groups} shares each weight column "
            "between groups, so a per-output-channel `g` does not exist. Use groups=1."
        )
    for tensor_name in names:
        if is_weight_normalized(module, tensor_name):
            raise ValueError(
                f"`{tensor_name}` of this {type(module).__name__} is already weight-normalized. "
                "Call `remove_weight_norm` first to apply it again."
            )
        param = module._parameters.get(tensor_name)
        if not isinstance(param, nn.Parameter):
            raise ValueError(
                f"{type(module).__name__} has no parameter `{tensor_name}`; "
                f"its parameters are {sorted(module._parameters)}."
            )
        if dim is not None and not -param.dim() <= dim < max(param.dim(), 1):
            raise ValueError(f"`dim`={dim} is out of range for `{tensor_name}` of shape {tuple(param.shape)}.")

    if "parametrizations" not in module._modules:
        module.parametrizations = _Parametrizations()
    for tensor_name in names:
        param = module._parameters.pop(tensor_name)
        if paper_init:
            with torch.no_grad():
                param.normal_(0.0, 0.05)
        normalized = WeightNorm(param, None if dim is None else dim % max(param.dim(), 1), log_scale_factor)
        normalized.original1.requires_grad_(param.requires_grad)
        normalized.magnitude_param.requires_grad_(param.requires_grad)
        setattr(module.parametrizations, tensor_name, normalized)
    base = getattr(type(module), "_wn_base", type(module))
    module.__class__ = _normalized_class(base, (*_normalized_names(module), *names))
    if isinstance(module, nn.RNNBase):
        module.__dict__.pop("_flat_weights", None)  # the class computes it now
    return module


def remove_weight_norm(model: nn.Module) -> list[str]:
    """Fold ``g`` and ``v`` back into plain weights everywhere in ``model``, for inference or export.

    Folds weight norm whatever applied it: this library, ``torch.nn.utils.parametrizations.weight_norm``
    or the legacy ``torch.nn.utils.weight_norm`` hook; other reparametrizations (spectral norm)
    stay. Returns the qualified names of the modules folded.

    Raises:
        ValueError: a tensor's torch parametrization chains weight norm with another one.

    Example:
        >>> model = nn.Sequential(weight_norm(nn.Linear(2, 3)), nn.ReLU())
        >>> model.append(nn.utils.parametrizations.weight_norm(nn.Linear(3, 1)))  # doctest: +ELLIPSIS
        Sequential(...)
        >>> remove_weight_norm(model)
        ['0', '2']
        >>> sorted(name for name, _ in model.named_parameters())
        ['0.bias', '0.weight', '2.bias', '2.weight']
    """
    modules = list(model.named_modules())
    for module_name, module in modules:  # checked before anything is folded: an error leaves the model as it was
        for tensor_name, chain in _torch_parametrizations(module).items():
            if len(chain) > 1 and any(isinstance(p, _TorchWeightNorm) for p in chain):
                raise ValueError(
                    f"`{module_name}.{tensor_name}` chains torch's weight norm with "
                    f"{[type(p).__name__ for p in chain]}: folding would fold them all. Remove them with "
                    "`torch.nn.utils.parametrize.remove_parametrizations` in the order you mean."
                )
    folded = []
    for module_name, module in modules:
        if is_weight_normalized(module):
            _remove_own_weight_norm(module)
        elif not _remove_torch_weight_norm(module):
            continue
        folded.append(module_name)
    return folded


def _remove_own_weight_norm(module: nn.Module) -> None:
    normalized = weight_norms(module)
    with torch.no_grad():
        weights = {name: nn.Parameter(wn().clone(), wn.v.requires_grad) for name, wn in normalized.items()}
    module.__class__ = type(module)._wn_base
    module.__dict__.pop("_wn_in_forward", None)
    del module.parametrizations
    for name, weight in weights.items():
        module.register_parameter(name, weight)
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


def _remove_torch_weight_norm(module: nn.Module) -> bool:
    """Fold torch's weight norms of ``module``, parametrized or legacy hooks; whether there was one."""
    found = False
    for tensor_name, chain in _torch_parametrizations(module).items():
        if isinstance(chain[0], _TorchWeightNorm):
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
            found = True
    for hook in list(module._forward_pre_hooks.values()):
        if isinstance(hook, _LegacyWeightNorm):
            nn.utils.remove_weight_norm(module, hook.name)
            found = True
    return found


def apply_weight_norm(
    model: nn.Module,
    include: Sequence[type[nn.Module] | str] | type[nn.Module] | str | None = None,
    exclude: Sequence[type[nn.Module] | str] | type[nn.Module] | str = (),
    **options,
) -> list[str]:
    """Weight-normalize every submodule of ``model`` selected by ``include`` and not by ``exclude``.

    Entries are layer types (``nn.Conv2d``, or its name ``"Conv2d"`` in ``torch.nn``) or glob
    patterns over qualified module names (``"decoder.*"``); a pattern also selects the supported
    layers inside a matching module.
    ``include`` defaults to every ``Linear``, ``Conv*`` and ``ConvTranspose*``; recurrent layers
    are normalized only when asked for. ``options`` go to :func:`weight_norm`.

    Returns the qualified names of the modules normalized.

    Layers already reparametrized by torch (its weight norm or spectral norm, parametrized or as
    legacy hooks) are left alone with a warning naming them; naming one (its exact name in
    ``include``) is an error.

    Raises:
        ValueError: a pattern matches no module, a selected module is not a supported layer,
            is already normalized (by this library, or by torch and named), or nothing at all is selected.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Linear(8, 2))
        >>> apply_weight_norm(model, exclude=[nn.Linear])
        ['0', '2']
    """
    names = select_layers(model, include, exclude)
    modules = dict(model.named_modules())
    for name in names:
        if is_weight_normalized(modules[name]):
            raise ValueError(
                f"Module `{name}` ({type(modules[name]).__name__}) is already weight-normalized. "
                "Leave it out with `exclude`, or call `remove_weight_norm` first."
            )
    _refuse_tied_weights(modules, names)
    for name in names:
        weight_norm(modules[name], **options)
    return names


def select_layers(
    model: nn.Module,
    include: Sequence[type[nn.Module] | str] | type[nn.Module] | str | None = None,
    exclude: Sequence[type[nn.Module] | str] | type[nn.Module] | str = (),
) -> list[str]:
    """The qualified names :func:`apply_weight_norm` would normalize, in module order.

    Layers torch already reparametrizes are left out, with a warning naming them; naming one
    (its exact name in ``include``) is a ``ValueError``.

    Example:
        >>> select_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)), exclude="2")
        ['0']
    """
    include = DEFAULT_LAYERS if include is None else include
    modules = dict(model.named_modules())
    chosen = _select(modules, _as_list(include), "include")
    chosen -= _select(modules, _as_list(exclude), "exclude")
    reparametrized = {n: found for n in modules if n in chosen and (found := _torch_reparametrizations(modules[n]))}
    named = reparametrized.keys() & {e for e in _as_list(include) if isinstance(e, str) and not _is_glob(e)}
    if named:
        listed = ", ".join(f"`{name}` ({', '.join(reparametrized[name])})" for name in sorted(named))
        raise ValueError(
            f"`include` names {listed}, already reparametrized by torch: weight norm on top would stack two "
            f"reparametrizations. {_TORCH_FIX}"
        )
    chosen -= reparametrized.keys()
    if not chosen:
        skipped = f" ({len(reparametrized)} selected layers are reparametrized by torch)" if reparametrized else ""
        raise ValueError(
            f"No module of {type(model).__name__} is selected by `include`={include!r} and "
            f"`exclude`={exclude!r}{skipped}. Modules: {_preview(modules)}."
        )
    if reparametrized:
        listed = ", ".join(f"`{name}` ({', '.join(found)})" for name, found in reparametrized.items())
        warnings.warn(
            f"Weight norm leaves {len(reparametrized)} layers alone that torch already reparametrizes: {listed}. "
            f"{_TORCH_FIX} Leave them out with `exclude` to silence this.",
            UserWarning,
            stacklevel=2,
        )
    return [name for name in modules if name in chosen]


def weight_normalized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``model`` that carry weight norm.

    Example:
        >>> model = nn.Sequential(weight_norm(nn.Linear(2, 3)), nn.Linear(3, 1))
        >>> [name for name, _ in weight_normalized_modules(model)]
        ['0']
    """
    return ((name, m) for name, m in model.named_modules() if is_weight_normalized(m))


def weight_norms(module: nn.Module) -> dict[str, WeightNorm]:
    """The :class:`WeightNorm` of each normalized tensor of one module, by tensor name.

    Example:
        >>> list(weight_norms(weight_norm(nn.LSTMCell(2, 3))))
        ['weight_ih', 'weight_hh']
    """
    return {name: getattr(module.parametrizations, name) for name in _normalized_names(module)}


@torch.no_grad()
def limit_direction_norm(model: nn.Module, max_norm: float) -> int:
    """Rescale every direction ``v`` whose norm exceeds ``max_norm`` down to ``max_norm``.

    The paper's hard limit on ``||v||``: since ``w`` depends on ``v`` only through
    ``v / ||v||``, the network computes exactly the same function afterwards, while the
    effective learning rate, which shrinks as ``||v||`` grows, is kept from decaying.
    Call it after each optimizer step. Returns how many units were rescaled.

    Example:
        >>> layer = weight_norm(nn.Linear(4, 2))
        >>> with torch.no_grad():
        ...     _ = layer.parametrizations.weight.original1.mul_(100)
        >>> limit_direction_norm(layer, max_norm=1.0)
        2
        >>> layer.parametrizations.weight.original1.norm(dim=1).allclose(torch.ones(2))
        True
    """
    if not (max_norm > 0 and math.isfinite(max_norm)):
        raise ValueError(f"`max_norm` must be a positive number, got {max_norm!r}.")
    rescaled = 0
    for _, module in weight_normalized_modules(model):
        for normalized in weight_norms(module).values():
            norm = norm_except_dim(normalized.v, normalized.dim)
            too_long = norm > max_norm
            normalized.v.mul_(torch.where(too_long, max_norm / norm, 1.0))
            rescaled += int(too_long.sum())
    return rescaled


def _refuse_tied_weights(modules: dict[str, nn.Module], names: list[str]) -> None:
    """A weight shared by two modules (tied embeddings) would be untied: two ``g``, and ``v`` stepped twice."""
    owners: dict[int, list[str]] = {}
    for module_name, module in modules.items():
        for param_name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append(f"{module_name}.{param_name}".lstrip("."))
    for name in names:
        for tensor_name in default_names(modules[name]):
            param = modules[name]._parameters.get(tensor_name)
            shared = owners.get(id(param), []) if param is not None else []
            if len(shared) > 1:
                layers = sorted({owner.rpartition(".")[0] for owner in shared})
                raise ValueError(
                    f"{' and '.join(f'`{s}`' for s in shared)} are one tensor (tied weights): weight norm would untie "
                    f"it into two g and v. Leave the tied layers out: `exclude`={layers!r}."
                )


# --- torch's own reparametrizations ---------------------------------------------------------------

_TORCH_FIX = (
    "Fold torch's weight norm first with `lightning_wn.remove_weight_norm(model)` to normalize the layer here; "
    "keep torch's spectral norm by leaving the layer out."
)
_TORCH_KINDS = {
    _TorchWeightNorm: "torch.nn.utils.parametrizations.weight_norm",
    _TorchSpectralNorm: "torch.nn.utils.parametrizations.spectral_norm",
    _LegacyWeightNorm: "torch.nn.utils.weight_norm",
    _LegacySpectralNorm: "torch.nn.utils.spectral_norm",
}


def _kind(reparametrization: object) -> str:
    kind = type(reparametrization)
    return next((how for cls, how in _TORCH_KINDS.items() if issubclass(kind, cls)), kind.__name__)


def _torch_parametrizations(module: nn.Module) -> dict[str, nn.ModuleList]:
    """Each tensor of ``module`` that ``torch.nn.utils.parametrize`` reparametrizes, with its chain."""
    if not parametrize.is_parametrized(module):
        return {}
    return dict(module.parametrizations.items())


def _torch_reparametrizations(module: nn.Module) -> list[str]:
    """What torch reparametrizes in ``module``, as ``"<tensor>: <how>"``; empty if nothing."""
    found = [
        f"{name}: {' + '.join(_kind(p) for p in chain)}"
        for name, chain in _torch_parametrizations(module).items()
    ]
    found += [
        f"{hook.name}: {_kind(hook)}"
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, (_LegacyWeightNorm, _LegacySpectralNorm))
    ]
    return found


def _is_glob(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


# --- the per-class machinery -------------------------------------------------------------------


@functools.cache
def _normalized_class(base: type[nn.Module], names: tuple[str, ...]) -> type[nn.Module]:
    """A subclass of ``base`` whose ``names`` are computed from their :class:`WeightNorm`."""
    attrs: dict[str, object] = {
        "_wn_base": base,
        "_wn_names": names,
        "__reduce_ex__": _reduce_ex,
        "__module__": __name__,
        "qconfig": _QCONFIG,
    }
    if names == ("weight",) and base.forward is nn.Linear.forward:
        attrs["forward"] = _linear_forward
    elif names == ("weight",) and base.forward in _STOCK_CONV_FORWARDS:
        attrs["forward"] = _normalized_conv_forward
    elif issubclass(base, nn.RNNBase):
        attrs["_flat_weights"] = property(_flat_weights, _ignore_assignment)
        attrs["_update_flat_weights"] = _flat_weights_are_computed
    else:  # ConvTranspose, the RNN cells, any other layer: their own forward reads the properties
        attrs["forward"] = _forward_reading_the_properties
    # the forward computes w itself (or says when it reads the property): whoever else reads it is outside
    marked = attrs.get("forward") is _forward_reading_the_properties
    read = _internal_tensor_or_handed_out if marked else _handed_out_tensor
    for name in names:
        attrs[name] = property(functools.partial(read, name=name), doc=f"``{name}`` = g * v / ||v||")
    if hasattr(base, "reset_parameters"):
        attrs["reset_parameters"] = _reset_parameters
    attrs["_load_from_state_dict"] = _load_from_state_dict
    return type(f"WeightNormed{base.__name__}", (base,), attrs)


def _normalized_tensor(module: nn.Module, name: str) -> Tensor:
    # .forward() skips nn.Module's hook dispatch; _modules skips its attribute fallback
    return module._modules["parametrizations"]._modules[name].forward()


def _handed_out_tensor(module: nn.Module, name: str) -> Tensor:
    return module._modules["parametrizations"]._modules[name].handed_out()


def _internal_tensor_or_handed_out(module: nn.Module, name: str) -> Tensor:
    if module.__dict__.get("_wn_in_forward"):
        return _normalized_tensor(module, name)
    return _handed_out_tensor(module, name)


def _forward_reading_the_properties(self: nn.Module, *args, **kwargs):
    """The base layer's forward, marked as running: its reads of ``weight`` are its own, not handed out."""
    if torch.compiler.is_compiling():  # dynamo would trace the flag; compiled, the property takes ATen's op anyway
        return type(self)._wn_base.forward(self, *args, **kwargs)
    outer = self.__dict__.get("_wn_in_forward", False)
    self.__dict__["_wn_in_forward"] = True
    try:
        return type(self)._wn_base.forward(self, *args, **kwargs)
    finally:
        self.__dict__["_wn_in_forward"] = outer


def _reset_parameters(self: nn.Module) -> None:
    """The base layer's own init (the meta device -> ``to_empty`` -> ``reset_parameters`` path), drawn into
    plain tensors on a stand-in that shares every other parameter, then split into ``g`` and ``v``."""
    base, names = type(self)._wn_base, type(self)._wn_names
    norms = self._modules["parametrizations"]._modules
    plain = base.__new__(base)
    plain.__dict__.update(self.__dict__)
    plain._parameters = {**self._parameters, **{n: nn.Parameter(torch.empty_like(norms[n].v)) for n in names}}
    base.reset_parameters(plain)
    for name in names:
        norms[name].reset(plain._parameters[name])


def _load_from_state_dict(
    self: nn.Module,
    state_dict: dict[str, Tensor],
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Loads torch's spellings of ``g`` and ``v``, and a plain layer's weight: ``strict=True`` takes them all.

    ``state_dict`` is ``load_state_dict``'s own copy, read by this module's children after this returns.
    """
    for name, normalized in weight_norms(self).items():
        ours, plain = f"{prefix}parametrizations.{name}.", f"{prefix}{name}"
        _adopt_torch_spelling(normalized, state_dict, ours, plain)
        _adopt_plain_weight(normalized, state_dict, ours, plain, error_msgs)
    type(self)._wn_base._load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    )


def _adopt_plain_weight(
    normalized: WeightNorm, state_dict: dict[str, Tensor], ours: str, plain: str, error_msgs: list[str]
) -> None:
    """A plain layer's ``<name>`` (weights trained without weight norm) split into ``g`` and ``v``.

    The layer then computes exactly the plain layer's function. Only where the state dict holds no
    ``g`` or ``v`` of this tensor: with both, the plain entry stays an unexpected key.
    """
    weight = state_dict.get(plain)
    if not isinstance(weight, Tensor) or any(f"{ours}{part}" in state_dict for part in ("original0", "original1", "s")):
        return
    del state_dict[plain]  # a plain weight's shape mismatch is reported below, by the name the source gave it
    if weight.shape != normalized.v.shape:
        error_msgs.append(
            f"size mismatch for {plain}: copying a plain weight of shape {tuple(weight.shape)} from the checkpoint "
            f"into a weight-normalized layer whose weight has shape {tuple(normalized.v.shape)}."
        )
        return
    v, magnitude = normalized._split(weight.to(normalized.v.dtype))
    state_dict[f"{ours}original1"] = v
    if normalized.log_scale_factor is None:
        state_dict[f"{ours}original0"] = magnitude
    else:
        state_dict[f"{ours}s"] = magnitude
        state_dict[f"{ours}c"] = normalized.c.clone()


def _adopt_torch_spelling(normalized: WeightNorm, state_dict: dict[str, Tensor], ours: str, plain: str) -> None:
    """Rewrite one tensor's entries into ``normalized``'s layout, computing the source's weight exactly.

    The legacy ``<name>_g``/``<name>_v`` are renamed. Where the source's ``g`` is another shape than
    ours (torch's ``dim=0`` on a ``ConvTranspose``, ``dim=None``'s one ``g``) or ``g`` must become
    ``s`` (``log_scale_factor``), the source's ``w`` is folded along the source's axis and split
    along ours: the layer then computes the source's function.
    """
    legacy_g, legacy_v = f"{plain}_g", f"{plain}_v"
    if legacy_g in state_dict and legacy_v in state_dict and f"{ours}original1" not in state_dict:
        state_dict[f"{ours}original0"] = state_dict.pop(legacy_g)
        state_dict[f"{ours}original1"] = state_dict.pop(legacy_v)
    g, v = state_dict.get(f"{ours}original0"), state_dict.get(f"{ours}original1")
    if not (isinstance(g, Tensor) and isinstance(v, Tensor)) or v.shape != normalized.v.shape:
        return  # not a weight norm's g and v for this tensor: load_state_dict reports what is wrong
    if normalized.log_scale_factor is None and g.shape == normalized.original0.shape:
        return  # our own layout (the axes agree, or g is the same whole-tensor norm either way)
    if norm_axis(g, v) is None:
        return
    new_v, magnitude = normalized._split(fold(g, v).to(normalized.v.dtype))
    del state_dict[f"{ours}original0"]
    state_dict[f"{ours}original1"] = new_v
    if normalized.log_scale_factor is None:
        state_dict[f"{ours}original0"] = magnitude
    else:
        state_dict[f"{ours}s"] = magnitude
        state_dict.setdefault(f"{ours}c", normalized.c.clone())


def _get_qconfig(self: nn.Module):
    try:
        return self.__dict__["qconfig"]
    except KeyError:
        raise AttributeError("qconfig") from None  # unset: nn.Module's own "has no attribute" error follows


def _set_qconfig(self: nn.Module, qconfig) -> None:
    # eager-mode quantization (quantize_dynamic, prepare, prepare_qat) sets `qconfig` on every module it visits,
    # then swaps only modules of exactly the types it maps: this subclass is passed over, silently
    warnings.warn(
        f"torch.ao.quantization matches module types exactly, so it leaves `{type(self).__name__}` unquantized, "
        f"in float, even where it would quantize a `{type(self)._wn_base.__name__}`. Fold weight norm first with "
        "`lightning_wn.remove_weight_norm(model)`, then quantize.",
        UserWarning,
        stacklevel=3,  # past nn.Module.__setattr__: the line that set it
    )
    self.__dict__["qconfig"] = qconfig


def _del_qconfig(self: nn.Module) -> None:
    if "qconfig" not in self.__dict__:
        raise AttributeError("qconfig")
    del self.__dict__["qconfig"]


_QCONFIG = property(_get_qconfig, _set_qconfig, _del_qconfig, doc="Quantization config; setting it warns.")


def _linear_forward(self: nn.Linear, input: Tensor) -> Tensor:
    return self._modules["parametrizations"]._modules["weight"].linear(input, self._parameters["bias"])


def _normalized_conv_forward(self: _Conv, input: Tensor) -> Tensor:
    weight = self._modules["parametrizations"]._modules["weight"].forward()
    return self._conv_forward(input, weight, self._parameters["bias"])  # bias: None when the layer has none


_STOCK_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


def _flat_weights(self: nn.RNNBase) -> list[Tensor | None]:
    """What ``RNNBase.forward`` runs on: the normalized tensors computed internally, the rest as they are."""
    norms = self._modules["parametrizations"]._modules
    return [norms[name].forward() if name in norms else getattr(self, name, None) for name in self._flat_weights_names]


def _flat_weights_are_computed(self: nn.RNNBase) -> None:
    """``RNNBase`` re-reads every weight before each forward to see whether one was swapped; these are computed."""


def _ignore_assignment(self: nn.Module, value: object) -> None:
    """``RNNBase`` re-assigns ``_flat_weights`` after ``.to()``; here it is always computed."""


def _reduce_ex(self: nn.Module, protocol: int):
    # the generated class cannot be pickled by name: rebuild it from the base class and names
    return _new_normalized, (type(self)._wn_base, type(self)._wn_names), self.__getstate__()


def _new_normalized(base: type[nn.Module], names: tuple[str, ...]) -> nn.Module:
    cls = _normalized_class(base, names)
    return cls.__new__(cls)


def _normalized_names(module: nn.Module) -> tuple[str, ...]:
    return getattr(type(module), "_wn_names", ())


# --- selecting modules ---------------------------------------------------------------------------


def _select(modules: dict[str, nn.Module], entries: list, argument: str) -> set[str]:
    chosen: set[str] = set()
    for entry in entries:
        if isinstance(entry, str) and isinstance(getattr(nn, entry, None), type):
            entry = getattr(nn, entry)  # "Conv2d" from a YAML file means the layer type
        if isinstance(entry, type) and issubclass(entry, nn.Module):
            if not issubclass(entry, SUPPORTED_LAYERS) and argument == "include":
                raise ValueError(
                    f"`{argument}` names `{entry.__name__}`, which weight norm does not support; "
                    f"supported layers are {_names(SUPPORTED_LAYERS)}."
                )
            chosen |= {name for name, m in modules.items() if isinstance(m, entry)}
        elif isinstance(entry, str):
            chosen |= _select_pattern(modules, entry, argument)
        else:
            raise TypeError(
                f"`{argument}` entries must be layer types or name patterns, got {entry!r} "
                f"({type(entry).__name__})."
            )
    return chosen


def _select_pattern(modules: dict[str, nn.Module], pattern: str, argument: str) -> set[str]:
    matched = [name for name in modules if fnmatch.fnmatchcase(name, pattern)]
    if not matched:
        raise ValueError(
            f"`{argument}` pattern {pattern!r} matches no module. Module names: {_preview(modules)}."
        )
    chosen = set()
    for root in matched:
        inside = {
            name
            for name, m in modules.items()
            if (name == root or name.startswith(f"{root}.") or not root)
            and isinstance(m, SUPPORTED_LAYERS)
        }
        if not inside and argument == "include":
            raise ValueError(
                f"`{argument}` pattern {pattern!r} matches `{root}` ({type(modules[root]).__name__}), "
                f"which is not a supported layer and holds none; supported layers are "
                f"{_names(SUPPORTED_LAYERS)}."
            )
        chosen |= inside
    return chosen


def _as_list(entries) -> list:
    return [entries] if isinstance(entries, (str, type)) else list(entries)


def _names(types: tuple[type, ...]) -> str:
    return ", ".join(t.__name__.lstrip("_") for t in types)


def _preview(modules: dict[str, nn.Module], limit: int = 12) -> str:
    names = [repr(name) for name in modules if name][:limit]
    more = len(modules) - 1 - len(names)
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")
