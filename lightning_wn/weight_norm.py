r"""Weight normalization (Salimans & Kingma, 2016, https://arxiv.org/abs/1602.07868) of one layer.

Each output unit's weight is :math:`w = g \, v / \lVert v \rVert`; ``g`` and ``v`` are stored where torch's
``parametrizations.weight_norm`` keeps them (``parametrizations.<name>.original0``, ``original1``), so state dicts
move between the two. ``layer.weight = W`` sets ``g`` and ``v``; in-place writes into ``layer.weight`` are refused.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_wn._computed_weight import ComputedWeight
from lightning_wn._normalized_weight import NormalizedWeight, g_from, norm_axes
from lightning_wn._scaled_linear import ScaledLinear
from lightning_wn.cache import active_cache, cached
from lightning_wn.state_dict import WHOLE_TENSOR, adopt_other_spellings
from lightning_wn.torch_norms import TORCH_FIX, has_torch_weight_norm, torch_reparametrizations

_ConvTranspose = nn.modules.conv._ConvTransposeNd
RECURRENT_LAYERS: tuple[type[nn.Module], ...] = (nn.RNNBase, nn.RNNCellBase)
#: Layer types whose output-unit axis is known, so ``dim`` may be left out.
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd, *RECURRENT_LAYERS)
#: What :func:`apply_weight_norm` normalizes when ``include`` is not given.
DEFAULT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


class WeightNorm(nn.Module):
    r"""The parameters of one weight-normalized tensor, and ``w`` computed from them.

    ``original0`` is ``g`` (or ``s``, with :math:`g = e^{c s}` and ``c = log_scale_factor`` kept in
    the buffer ``c``), ``original1`` is ``v``; ``dim`` is the output-unit axis, or ``-1`` (given
    None) for one norm over the whole tensor and a 0-d ``g``, as torch keeps it.

    Example:
        >>> weight = torch.randn(4, 3)
        >>> torch.allclose(WeightNorm(weight, dim=0)(), weight, atol=1e-6)
        True
    """

    paper_init = False  # whether v was re-drawn as in the paper (weight_norm's paper_init)
    converted_on_load: str | None = None  # how the last state dict loaded saved g and v, where they changed form

    def __init__(self, weight: Tensor, dim: int | None, log_scale_factor: float | None = None) -> None:
        super().__init__()
        if dim is not None and not 0 <= dim < max(weight.dim(), 1):
            raise ValueError(f"`dim`={dim} must be an axis of the weight (0 to {weight.dim() - 1}), or None.")
        self.dim = WHOLE_TENSOR if dim is None else dim
        self.log_scale_factor = log_scale_factor
        v, magnitude = self.split(weight.detach())
        if log_scale_factor is None:
            self.original0 = nn.Parameter(magnitude)
        else:
            self.s = nn.Parameter(magnitude)
            self.register_buffer("c", torch.tensor(float(log_scale_factor)))  # lets a state dict be folded alone
        self.original1 = nn.Parameter(v)

    def split(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """``v`` and the magnitude parameter (``g``, or ``s``) that give ``weight``."""
        axes, keep = norm_axes(weight, self.dim), self.dim != WHOLE_TENSOR  # torch's dim=None keeps a 0-d g
        magnitude = torch.linalg.vector_norm(weight, dim=axes, keepdim=keep)
        zero = magnitude == 0
        if not weight.is_meta and zero.any():  # a zero unit (nn.init.zeros_) has no direction: give it one, g = 0
            weight = torch.where(zero, torch.randn_like(weight), weight)
            magnitude = torch.where(zero, 0.0, torch.linalg.vector_norm(weight, dim=axes, keepdim=keep))
        if self.log_scale_factor is not None:  # g = 0 is exp(-inf): the smallest normal number instead
            magnitude = magnitude.clamp_min(torch.finfo(magnitude.dtype).tiny).log() / self.log_scale_factor
        return weight, magnitude

    @torch.no_grad()
    def reset(self, weight: Tensor) -> None:
        """Set ``g`` and ``v`` in place so that they give ``weight``."""
        if weight.shape != self.v.shape:  # copy_ would broadcast a (1, in) weight into every row
            raise ValueError(f"Cannot set a weight of shape {tuple(weight.shape)} where the layer's has shape "
                             f"{tuple(self.v.shape)}.")
        v, magnitude = self.split(weight.detach().to(self.v.dtype))
        self.v.copy_(v)
        self.magnitude_param.copy_(magnitude)

    v = property(lambda self: self.original1, doc="The direction ``v``: ``original1``.")
    magnitude_param = property(lambda self: self.original0 if self.log_scale_factor is None else self.s)

    def g(self) -> Tensor:
        return g_from(self.magnitude_param, self.log_scale_factor)

    def _key(self) -> tuple | None:
        """What a ``w`` reused inside :func:`lightning_wn.cached` must be computed from; None where none may be."""
        v, m = self.original1, self.magnitude_param
        if v.is_inference() or m.is_inference():
            return None  # inference tensors (made in inference mode) keep no version counter to key on
        try:
            storage = v.data_ptr(), m.data_ptr()  # Module.to() swaps it under the same tensor and version
        except RuntimeError:  # no storage of their own: torch.func's wrappers, a DTensor
            return None
        # these very g and v (functional_call, load_state_dict(assign=True) swap them) at their versions, in this
        # mode: w built without grad (or from frozen g and v) has no graph. Entries hold the tensors and views of their
        # storage, so that no other tensor or storage takes the ids or addresses (`.half()`, then `.float()`)
        return (id(v), id(m), *storage, v._version, m._version,
                v.requires_grad, m.requires_grad, torch.is_grad_enabled(), torch.is_inference_mode_enabled())

    def forward(self) -> Tensor:
        """``w``: computed, or inside :func:`lightning_wn.cached` the one computed from these same ``g`` and ``v``."""
        # _tracing() first: a compiled graph that read the cache's context variable would be guarded on it; the cache
        # read once: a thread running a context copied inside the block may see the block close between two reads
        if _tracing() or (cache := active_cache()) is None or (key := self._key()) is None:
            return self.compute()
        entry = cache.get(self)
        if entry is None or entry[0] != key:
            v, m = self.original1, self.magnitude_param
            entry = cache[self] = key, self.compute(), (v, m, v.detach(), m.detach())
        return entry[1]

    def linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """``F.linear(x, w, bias)``; for a large weight fed fewer rows than it has inputs, the paper's output scaling.

        Chosen at every call, cached or not: a forward recomputed by activation checkpointing takes the first's path.
        """
        v, device = self.original1, x.device.type
        large = not _tracing() and v.numel() >= 1 << 18 and self.dim == 0  # traced: shapes are no Python numbers
        pays = large and x.dim() > 0 and x.numel() < x.shape[-1] ** 2
        autocast = pays and torch.is_autocast_enabled(device) and torch.float64 not in (x.dtype, v.dtype)  # as F.linear
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        # x @ v.T takes ||v|| into its range, which float16 may not hold (float32's range: bfloat16's too). Outside
        # autocast, an x of another dtype than v's is F.linear's to refuse, as for a plain layer
        if not pays or dtype == torch.float16 or v.is_inference() or not (autocast or x.dtype == v.dtype):
            return F.linear(x, self(), bias)
        with torch.autocast(device, enabled=False):  # its dtypes are ScaledLinear's own: the matmul's, the norm's
            try:
                return ScaledLinear.apply(x, v, self.g(), bias, dtype)
            except RuntimeError as error:
                _raise_unless_refused_by_torch_func(error)
        return F.linear(x, self(), bias)

    def compute(self) -> Tensor:
        v = self.original1
        if not _tracing():
            if not torch.is_grad_enabled():  # no graph to build: ATen's op as it is (its dim -1 is the whole tensor)
                return torch._weight_norm(v, self.g(), self.dim if v.dim() > 1 else WHOLE_TENSOR)
            try:
                return NormalizedWeight.apply(v, self.magnitude_param, self.dim, self.log_scale_factor)
            except RuntimeError as error:
                _raise_unless_refused_by_torch_func(error)
        # plain ops: traced and compiled graphs keep their second derivatives, the fusion is the compiler's, and
        # torch.func transforms differentiate and batch them on their own
        return v * (self.g() / torch.linalg.vector_norm(v, dim=norm_axes(v, self.dim), keepdim=True))

    def extra_repr(self) -> str:
        extra = f", g=exp({self.log_scale_factor} * s)" if self.log_scale_factor else ""
        return f"dim={None if self.dim == WHOLE_TENSOR else self.dim}{extra}"


def _raise_unless_refused_by_torch_func(error: RuntimeError) -> None:
    # torch.func transforms (grad, vmap, jvp) refuse autograd nodes whose forward takes ctx; the form they accept
    # (setup_context) costs tens of microseconds per layer and step, so under them w is built from plain ops instead
    if "functorch transforms" not in str(error):
        raise error


def default_dim(module: nn.Module) -> int:
    """The output-unit axis of a supported layer's weights.

    Example:
        >>> default_dim(nn.Linear(2, 3)), default_dim(nn.ConvTranspose2d(2, 3, 3))
        (0, 1)
    """
    if isinstance(module, SUPPORTED_LAYERS):
        return 1 if isinstance(module, _ConvTranspose) else 0
    raise ValueError(f"Cannot tell the output-unit axis of `{type(module).__name__}`; supported layers are "
                     f"{_names(SUPPORTED_LAYERS)}. Pass `dim=` to say which axis holds the output units.")


def default_names(module: nn.Module) -> list[str]:
    """The tensors weight norm applies to: ``weight``, or every input and hidden weight of an RNN.

    Example:
        >>> default_names(nn.LSTMCell(2, 3))
        ['weight_ih', 'weight_hh']
    """
    if isinstance(module, nn.RNNBase):
        parts = ("ih", "hh", "hr") if module.proj_size else ("ih", "hh")
        directions = ("", "_reverse") if module.bidirectional else ("",)
        return [f"weight_{p}_l{k}{d}" for k in range(module.num_layers) for d in directions for p in parts]
    return ["weight_ih", "weight_hh"] if isinstance(module, nn.RNNCellBase) else ["weight"]


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


class _Parametrizations(nn.Module):
    """One :class:`WeightNorm` per normalized tensor name: torch's state-dict layout, not its ModuleDict."""


def weight_norm(module: nn.Module, name: str | Sequence[str] | None = None, dim: int | None | _OutputAxis = OUTPUT_AXIS,
                *, log_scale_factor: float | None = None, paper_init: bool = False) -> nn.Module:  # fmt: skip
    r"""Reparameterize ``module``'s weight as :math:`w = g \, v / \lVert v \rVert` in place; it computes the same.

    Args:
        module: a ``Linear``, ``Conv*``, ``ConvTranspose*``, ``RNN``/``LSTM``/``GRU`` or cell, or any
            module whose forward reads ``module.<name>`` if ``dim`` is given.
        name: the tensor(s) to normalize; default ``weight``, or every ``weight_ih*`` and ``weight_hh*``
            of a recurrent layer (each row, i.e. each gate unit, its own ``g``).
        dim: the output-unit axis, which the norm does not run over; left out, the layer's own: 0, or 1 for
            transposed convolutions (laid out in, out, ...), where torch always takes 0. ``None``: one norm over
            the whole tensor, as in torch; ``-1`` is refused (torch reads it as ``None``, Python as the last axis).
        log_scale_factor: ``c`` in the paper's :math:`g = e^{c s}`; ``s`` is learned instead of ``g``.
        paper_init: re-draw ``v`` from N(0, 0.05) as in the paper, with ``g = ||v||`` (the function then
            changes); meant to be followed by :func:`~lightning_wn.data_dependent_init`.

    ``v`` keeps the weight's storage (no copy): layers with tied weights, normalized one by one, keep their
    ``v`` on one storage; :func:`~lightning_wn.apply_weight_norm` refuses tied weights.

    Example:
        >>> layer, x = nn.Linear(20, 40), torch.randn(8, 20)
        >>> before = layer(x)
        >>> layer = weight_norm(layer)
        >>> sorted(name for name, _ in layer.named_parameters())
        ['bias', 'parametrizations.weight.original0', 'parametrizations.weight.original1']
        >>> torch.allclose(layer(x), before, atol=1e-6)
        True
        >>> weight_norm(nn.Linear(20, 40), dim=None).parametrizations.weight.original0.shape  # as torch's
        torch.Size([])
    """
    refuse_wrapped(module)
    names, dim = checked_targets(module, name, dim)
    if log_scale_factor is not None:
        log_scale_factor = positive_number("log_scale_factor", log_scale_factor)
    if "parametrizations" not in module._modules:
        module.parametrizations = _Parametrizations()
    for tensor_name in names:
        param = module._parameters.pop(tensor_name)
        if paper_init:
            param.detach().normal_(0.0, 0.05)
        normalized = WeightNorm(param, None if dim is None else dim % max(param.dim(), 1), log_scale_factor)
        normalized.paper_init = paper_init  # how v was drawn: the callback checks layers built after its setup
        setattr(module.parametrizations, tensor_name, normalized.requires_grad_(param.requires_grad))
    base = getattr(type(module), "_wn_base", type(module))
    module.__class__ = _normalized_class(base, (*getattr(type(module), "_wn_names", ()), *names))
    return module


def checked_targets(module: nn.Module, name: str | Sequence[str] | None = None,
                    dim: int | None | _OutputAxis = OUTPUT_AXIS) -> tuple[list[str], int | None]:  # fmt: skip
    """The tensors of ``module`` that :func:`weight_norm` would normalize and their axis; a ``ValueError`` if it
    cannot take one of them.

    Example:
        >>> checked_targets(nn.LSTMCell(2, 3))
        (['weight_ih', 'weight_hh'], 0)
    """
    names = default_names(module) if name is None else [name] if isinstance(name, str) else list(name)
    dim = default_dim(module) if dim is OUTPUT_AXIS else dim
    kind = type(module).__name__
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, numbers.Integral)):
        raise TypeError(f"`dim` must be an axis (an int) or None, got {dim!r} ({type(dim).__name__}).")
    dim = None if dim is None else int(dim)  # numpy's integers too
    if dim == -1:
        raise ValueError("`dim`=-1 is ambiguous: torch reads it as the whole tensor, Python as the last axis. "
                         "Pass `dim=None` for the whole tensor, or the last axis's positive index.")
    if reparametrized := torch_reparametrizations(module):
        fix = TORCH_FIX if has_torch_weight_norm(module) else ("Remove them first (`torch.nn.utils.parametrize."
                                                               "remove_parametrizations`; a legacy spectral norm: "
                                                               "`remove_spectral_norm`), or leave the layer out.")
        raise ValueError(f"This {kind} is already reparametrized by torch ({', '.join(reparametrized)}), which this "
                         f"library's weight norm cannot share a layer with. {fix}")
    refuse_shared_columns(module, dim)
    for tensor_name in names:
        param = module._parameters.get(tensor_name)
        if is_weight_normalized(module, tensor_name):
            raise ValueError(f"`{tensor_name}` of this {kind} is already weight-normalized. "
                             "Call `remove_weight_norm` first to apply it again.")
        if not isinstance(param, nn.Parameter):
            raise ValueError(f"{kind} has no parameter `{tensor_name}`; its parameters are "
                             f"{sorted(module._parameters)}.")
        if isinstance(param, nn.parameter.UninitializedParameter):
            raise ValueError(f"`{tensor_name}` of this {kind} has no shape yet (a lazy module): run one forward pass "
                             "first, e.g. in the LightningModule's `__init__`, then apply weight norm.")
        if param.numel() == 0:  # ATen's kernels divide by its size
            raise ValueError(f"`{tensor_name}` of this {kind} is empty (shape {tuple(param.shape)}): there is nothing "
                             "to normalize. Leave the layer out.")
        if dim is not None and not -param.dim() <= dim < max(param.dim(), 1):
            raise ValueError(f"`dim`={dim} is out of range for `{tensor_name}` of shape {tuple(param.shape)}.")
    return names, dim


def weight_norms(module: nn.Module) -> dict[str, WeightNorm]:
    """The :class:`WeightNorm` of each normalized tensor of one module, by tensor name.

    Example:
        >>> list(weight_norms(weight_norm(nn.LSTMCell(2, 3))))
        ['weight_ih', 'weight_hh']
    """
    return {name: getattr(module.parametrizations, name) for name in getattr(type(module), "_wn_names", ())}


def refuse_shared_columns(module: nn.Module, dim: int | None) -> None:
    """A ``ValueError`` for ``dim`` along the columns of a grouped transposed convolution, which its groups share."""
    # its weight is (in, out / groups, *kernel): one g per column would mix the groups' output channels
    if isinstance(module, _ConvTranspose) and module.groups > 1 and dim is not None and dim % module.weight.dim() == 1:
        raise ValueError(f"`{type(module).__name__}` with groups={module.groups} shares each weight column between "
                         "groups, so a per-output-channel `g` does not exist. Use groups=1.")


def refuse_wrapped(model: nn.Module) -> None:
    """A ``ValueError`` for a model in DistributedDataParallel, whose reducer keeps the parameters it was built on."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("`model` is wrapped in DistributedDataParallel, which would go on all-reducing the parameters "
                         "it was built on, not the ones that replace them: pass `model.module`, then wrap it again.")


def positive_number(argument: str, value: object) -> float:
    """``value`` as a float if it is a finite positive number; a clear error naming ``argument`` otherwise."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's scalars too
        raise TypeError(f"`{argument}` must be a number, got {value!r} ({type(value).__name__}).")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{argument}` must be a positive number, got {value!r}.")
    return float(value)


@functools.cache
def _normalized_class(base: type[nn.Module], names: tuple[str, ...]) -> type[nn.Module]:
    """A subclass of ``base`` whose tensors ``names`` are computed from their :class:`WeightNorm`."""
    attrs = dict(_wn_base=base, _wn_names=names, _wn_in_forward=False, forward=_forward, __setattr__=_setattr,
                 __delattr__=_delattr, __reduce_ex__=_reduce_ex, _load_from_state_dict=_load_from_state_dict,
                 __module__=__name__)
    if names == ("weight",) and base.forward is nn.Linear.forward:  # the output-scaling path: w is never handed out
        attrs["forward"] = lambda self, input: self.parametrizations.weight.linear(input, self.bias)
    for name in names:
        attrs[name] = property(functools.partial(_read, name=name), doc=f"``{name}`` = g * v / ||v||")
    if hasattr(base, "reset_parameters"):
        attrs["reset_parameters"] = _reset_parameters
    return type(f"WeightNormed{base.__name__}", (base,), attrs)


def _read(module: nn.Module, name: str) -> Tensor:
    weight = getattr(module.parametrizations, name)()
    # handed out (read outside the layer's forward): refuses in-place writes, which would be lost
    return weight if module._wn_in_forward or _tracing() else weight.as_subclass(ComputedWeight)


def _forward(self: nn.Module, *args, **kwargs):
    """The base layer's forward, marked as running: its reads of the weights are its own, not handed out."""
    forward = type(self)._wn_base.forward
    if torch.compiler.is_compiling():  # the property hands out plain tensors there anyway
        return forward(self, *args, **kwargs)
    outer, self._wn_in_forward = self._wn_in_forward, True
    try:  # RNNBase reads each weight twice per call, to see whether one was swapped: once, in cached()
        with cached() if isinstance(self, nn.RNNBase) else contextlib.nullcontext():
            return forward(self, *args, **kwargs)
    finally:
        self._wn_in_forward = outer


def _setattr(self: nn.Module, name: str, value: object) -> None:
    if name in type(self)._wn_names:  # `layer.weight = W`: g and v that give W, as torch's right_inverse
        if not isinstance(value, Tensor):
            raise TypeError(f"`{name}` of a weight-normalized layer is computed; assign a tensor, got "
                            f"{type(value).__name__}.")
        return getattr(self.parametrizations, name).reset(value)
    if name == "qconfig":  # eager-mode quantization swaps only modules of exactly the types it maps
        warnings.warn(f"torch.ao.quantization matches module types exactly, so it leaves `{type(self).__name__}` "
                      f"unquantized, in float, even where it would quantize a `{type(self)._wn_base.__name__}`. Fold "
                      "weight norm first with `lightning_wn.remove_weight_norm(model)`, then quantize.", stacklevel=2)
    type(self)._wn_base.__setattr__(self, name, value)


def _delattr(self: nn.Module, name: str) -> None:
    # torch's register_parametrization deletes the tensor it takes over, then replaces `parametrizations` (g and v)
    if name in self._parameters or name in self._buffers:
        raise ValueError(f"`{name}` of a `{type(self).__name__}` cannot be deleted, nor can torch's parametrizations "
                         "(orthogonal, spectral norm, ...) take it over: they would replace g and v. Fold weight norm "
                         "first with `lightning_wn.remove_weight_norm(layer)`, or move it to torch's with "
                         "`lightning_wn.to_torch(model)`.")
    type(self)._wn_base.__delattr__(self, name)


def _reset_parameters(self: nn.Module) -> None:
    """The base layer's own init (the meta device -> ``to_empty`` -> ``reset_parameters`` path), drawn into
    plain tensors on a stand-in that shares every other parameter, then split into ``g`` and ``v``."""
    base, norms = type(self)._wn_base, weight_norms(self)
    plain = base.__new__(base)
    plain.__dict__.update(self.__dict__)
    plain._parameters = {**self._parameters, **{n: nn.Parameter(torch.empty_like(wn.v)) for n, wn in norms.items()}}
    base.reset_parameters(plain)
    for name, wn in norms.items():
        wn.reset(plain._parameters[name])
        if wn.log_scale_factor is not None:  # to_empty left the buffer c uninitialized too
            wn.c.fill_(wn.log_scale_factor)


def _load_from_state_dict(self, state_dict, prefix, *args):  # args: local_metadata, strict, ..., error_msgs
    """Loads torch's spellings of ``g`` and ``v``, and a plain layer's weight: ``strict=True`` takes them all."""
    for name, normalized in weight_norms(self).items():
        normalized.converted_on_load = adopt_other_spellings(normalized, state_dict, prefix, name, args[-1])
    type(self)._wn_base._load_from_state_dict(self, state_dict, prefix, *args)


def _reduce_ex(self: nn.Module, protocol: int):
    # the generated class cannot be pickled by name: rebuild it from the base class and names
    state = self.__getstate__()
    if "_flat_weights" in state:  # an RNN's references to the weights it last ran on: computed, not leaves
        state["_flat_weights"] = [w if w is None else w.detach() for w in state["_flat_weights"]]
    return _new_normalized, (type(self)._wn_base, type(self)._wn_names), state


def _new_normalized(base: type[nn.Module], names: tuple[str, ...]) -> nn.Module:
    cls = _normalized_class(base, names)
    return cls.__new__(cls)


def _names(types: tuple[type, ...]) -> str:
    return ", ".join(t.__name__.lstrip("_") for t in types)
