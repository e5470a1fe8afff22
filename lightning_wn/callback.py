"""The ``WeightNormalization`` Lightning callback: *when* things happen; the library says *how*.

* ``setup``: apply weight norm (and mean-only batch norm), before optimizers are built and DDP
  wraps the model, so the optimizer holds ``g`` and ``v`` and DDP all-reduces their gradients.
  What cannot work is refused here: a weight-averaging callback listed first (it copies the model
  in its own ``setup``), pruning beside weight norm.
* ``on_fit_start``: the data-dependent init, once per training run, on training examples
  (``on_train_start`` under ``ModelParallelStrategy``, which restores a checkpoint after ``on_fit_start``).
  Layers that ``configure_model`` built and left plain are refused here, the first moment they exist.
* ``on_*_batch_start`` / ``on_*_batch_end``: every step runs inside :func:`lightning_wn.cached`.
* ``on_train_batch_end``: the hard limit on ``||v||``, if asked for.
* ``on_fit_end``: fold weight norm away, if asked for.
* ``on_load_checkpoint``: a run trained without weight norm resumes with it; its optimizer states,
  saved for plain weights, restart at ``on_fit_start``, before the trainer restores them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning, StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_wn.cache import cached
from lightning_wn.checkpoint import read_checkpoint
from lightning_wn.init import data_dependent_init
from lightning_wn.init_inputs import Inputs, concatenate, example_count, model_inputs
from lightning_wn.mean_only_bn import attach_mean_only_bn
from lightning_wn.models import (
    apply_weight_norm,
    limit_direction_norm,
    remove_weight_norm,
    select_layers,
    weight_normalized_modules,
)
from lightning_wn.state_dict import fold_state_dict
from lightning_wn.weight_norm import is_weight_normalized, positive_number, weight_norms

# and their subclasses: why each cannot carry weight norm; both point to FSDP2 or DDP instead
_REFUSED_STRATEGIES = {
    FSDPStrategy: "FSDP1's FlatParameter holds gathered copies of g and v, so the init's writes into them are lost",
    DeepSpeedStrategy: "DeepSpeed re-creates parameters inside its engine (ZeRO), which weight norm cannot follow",
}
_SHARD_INSTEAD = (
    "Use `ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)` with `fully_shard` (FSDP2) in "
    "`configure_model`, or `strategy='ddp'`."
)
# options that act on g, v or buffers per rank, which a sharded model does not keep in step across ranks
_UNSHARDED_ONLY = {
    "mean_only_bn": "its running mean is a buffer FSDP2 does not synchronize, so the ranks' copies would drift apart",
    "max_norm": "it rescales each rank's shard of v by norms taken on that shard only",
    "fold_on_fit_end": "it folds sharded g and v in place; fold the full checkpoint instead (`lightning_wn.load_from_checkpoint`)",
}


class WeightNormalization(Callback):
    r"""Weight normalization for any LightningModule, with the paper's data-dependent init.

    Args:
        include: the layers to normalize: ``torch.nn`` layer names (``"Conv2d"``) or glob
            patterns over module names (``"encoder.*"``); default every ``Linear``, ``Conv*`` and
            ``ConvTranspose*``. Recurrent layers (``"LSTMCell"``) only when named.
        exclude: layers to leave plain, in the same form.
        weight_norm: False leaves the layers plain and only runs the data-dependent init, like
            the paper's un-normalized baseline (the init rescales weight rows instead of ``g``).
        data_init: run the data-dependent init when fit starts (once per run, never on resume).
        init_samples: training examples for the init, split across ranks (500 in the paper).
        init_scale: the standard deviation each pre-activation starts with.
        input_key: where the model input sits in a batch: an index into a tuple or list batch,
            a key of a dict batch; default the batch itself if it is a tensor, else its first
            element. The LightningModule's ``forward`` is called with it. A list of indices or
            keys (``["mel", "noise"]``) passes those entries as positional arguments, in order.
            For anything else, the LightningModule may define ``data_init_inputs(batch)``,
            returning a tensor, a tuple (``forward(*inputs)``) or a dict (``forward(**inputs)``)
            of tensors that share their first (batch) axis; ``input_key`` is then left out.
        mean_only_bn: put the paper's mean-only batch norm after every normalized layer.
        max_norm: after each training batch, rescale any ``||v||`` above this (the paper's hard
            limit; the network's function is unchanged).
        fold_on_fit_end: fold ``g`` and ``v`` into plain weights when fit ends.
        log_scale_factor: learn ``s`` with ``g = exp(c * s)``, ``c`` being this value.
        paper_init: re-draw every ``v`` from N(0, 0.05) before the init, as in the paper.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[WeightNormalization(init_samples=500)], logger=False)
    """

    def __init__(
        self,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        weight_norm: bool = True,
        data_init: bool = True,
        init_samples: int = 500,
        init_scale: float = 1.0,
        input_key: int | str | Sequence[int | str] | None = None,
        mean_only_bn: bool = False,
        max_norm: float | None = None,
        fold_on_fit_end: bool = False,
        log_scale_factor: float | None = None,
        paper_init: bool = False,
    ) -> None:
        if isinstance(init_samples, bool) or not isinstance(init_samples, int):
            raise TypeError(f"`init_samples` must be an integer, got {init_samples!r} ({type(init_samples).__name__}).")
        if init_samples < 1:
            raise ValueError(f"`init_samples` must be a positive integer, got {init_samples!r}.")
        init_scale = positive_number("init_scale", init_scale)
        max_norm = None if max_norm is None else positive_number("max_norm", max_norm)
        log_scale_factor = None if log_scale_factor is None else positive_number("log_scale_factor", log_scale_factor)
        if not weight_norm:  # each of these acts on g or v, which a plain layer does not have
            ignored = {"mean_only_bn": mean_only_bn, "max_norm": max_norm, "log_scale_factor": log_scale_factor,
                       "paper_init": paper_init}  # fmt: skip
            for argument, value in ignored.items():
                if value not in (None, False):
                    raise ValueError(
                        f"`{argument}`={value!r} needs weight norm, but `weight_norm`=False leaves the layers "
                        f"plain: set `weight_norm=True`, or leave `{argument}` out."
                    )
        keys = list(input_key) if isinstance(input_key, (list, tuple)) else [input_key]
        valid = all(isinstance(key, (int, str)) and not isinstance(key, bool) for key in keys)
        if input_key is not None and not (keys and valid):
            raise TypeError(f"`input_key` must be an index, a key, or a non-empty list of them, got {input_key!r}.")
        for argument, value in (("include", include), ("exclude", exclude)):
            if isinstance(value, str):
                raise TypeError(f"`{argument}` must be a list of names or patterns, got the string {value!r}.")
        self.include = None if include is None else list(include)
        self.exclude = list(exclude)
        self.weight_norm = weight_norm
        self.data_init = data_init
        self.init_samples = init_samples
        self.init_scale = init_scale
        self.input_key = list(input_key) if isinstance(input_key, (list, tuple)) else input_key
        self.mean_only_bn = mean_only_bn
        self.max_norm = max_norm
        self.fold_on_fit_end = fold_on_fit_end
        self.log_scale_factor = log_scale_factor
        self.paper_init = paper_init
        self.normalized: list[str] = []
        self.initialized = False
        self._restored: dict[str, Any] | None = None
        self._plain_checkpoint: dict[str, Any] | None = None  # its optimizer states are for plain weights
        self._cache = ExitStack()  # the open cached() scope of the current step, if any

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        for refused, why in _REFUSED_STRATEGIES.items():
            if isinstance(strategy, refused):
                raise RuntimeError(f"WeightNormalization does not support `{type(strategy).__name__}`: {why}. {_SHARD_INSTEAD}")
        sharded = isinstance(strategy, ModelParallelStrategy)
        if sharded:
            self._check_model_parallel(strategy)
        if self.input_key is not None and _init_inputs_hook(pl_module) is not None:
            raise ValueError(
                f"`input_key`={self.input_key!r} and `{type(pl_module).__name__}.data_init_inputs` both say what "
                "the data-dependent init passes to `forward`: keep one (leave `input_key` out to use the method)."
            )
        selected = select_layers(pl_module, self.include, self.exclude)
        _refuse_callbacks_that_cannot_work(trainer, self, selected if self.weight_norm else [])
        self._normalize_layers(pl_module, selected)

    def _check_model_parallel(self, strategy: ModelParallelStrategy) -> None:
        mesh = strategy.device_mesh
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise RuntimeError(
                f"WeightNormalization supports `ModelParallelStrategy` for data parallelism only (FSDP2's "
                f"`fully_shard`), but its `tensor_parallel_size` is {mesh['tensor_parallel'].size()}: tensor "
                "parallelism splits a layer's `weight` parameter, which weight norm computes from g and v, and its "
                "output, whose per-unit statistics the init needs whole. Set `tensor_parallel_size=1` and "
                "`data_parallel_size` to the number of devices."
            )
        for argument, why in _UNSHARDED_ONLY.items():
            value = getattr(self, argument)
            if value not in (None, False):
                raise ValueError(
                    f"`{argument}`={value!r} is not supported under `ModelParallelStrategy`: {why}. Leave "
                    f"`{argument}` out, or train with `strategy='ddp'`."
                )

    def _normalize_layers(self, pl_module: pl.LightningModule, selected: list[str]) -> None:
        self.normalized = selected
        if not self.weight_norm:
            return  # only initialized
        modules = dict(pl_module.named_modules())
        # a second fit finds its layers normalized; a layer the user normalized by hand stays as it is
        plain = [name for name in selected if not is_weight_normalized(modules[name])]
        _refuse_sharded_plain_layers(modules, plain)
        if plain:
            apply_weight_norm(pl_module, plain, log_scale_factor=self.log_scale_factor, paper_init=self.paper_init)
        attached = [name for name in selected if self.mean_only_bn and "mean_only_bn" not in modules[name]._modules]
        for name in attached:
            attach_mean_only_bn(modules[name])
        if plain or attached:
            kept = f" ({len(selected) - len(plain)} of them already were)" if len(plain) < len(selected) else ""
            extra = f", {len(attached)} with mean-only batch norm" if attached else ""
            rank_zero_info(f"WeightNormalization: normalized {len(selected)} layers{kept}{extra}: {', '.join(selected)}")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._refuse_plain_layers_from_configure_model(pl_module)
        self._restart_optimizer_states(trainer)
        if not trainer.strategy.restore_checkpoint_after_setup:
            self._data_init(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ModelParallelStrategy restores a checkpoint after on_fit_start: only here is it known to be a resume
        if trainer.strategy.restore_checkpoint_after_setup:
            self._data_init(trainer, pl_module)

    def _refuse_plain_layers_from_configure_model(self, pl_module: pl.LightningModule) -> None:
        selected = select_layers(pl_module, self.include, self.exclude)
        modules = dict(pl_module.named_modules())
        plain = [name for name in selected if self.weight_norm and not is_weight_normalized(modules[name])]
        if plain:
            raise RuntimeError(
                f"Layers {', '.join(f'`{name}`' for name in plain)} were built after WeightNormalization's `setup` "
                "(in `configure_model`) and are left plain. Normalize them where they are built: call "
                "`lightning_wn.apply_weight_norm(self, ...)` at the end of `configure_model` (before `fully_shard`)."
            )
        self.normalized = selected  # the init's targets, with the layers configure_model built

    # every step runs inside one cache scope: a module called many times per step computes its weight once
    def _open_cache(self, *args: Any) -> None:
        self._cache.close()  # a step that ended without its batch-end hook (a skipped batch) leaves no scope open
        self._cache.enter_context(cached())

    def _close_cache(self, *args: Any) -> None:
        self._cache.close()

    on_train_batch_start = on_validation_batch_start = on_test_batch_start = on_predict_batch_start = _open_cache
    on_validation_batch_end = on_test_batch_end = on_predict_batch_end = on_exception = _close_cache

    def _data_init(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Whether the init ran is our own state, restored or not: a tuner (BatchSizeFinder, LearningRateFinder)
        # also restores a checkpoint, one saved before the init
        if self._restored is not None:  # restored state is applied here, not in load_state_dict
            self.initialized = self.initialized or bool(self._restored.get("initialized"))
            self._restored = None
        elif trainer.ckpt_path is not None and not self.initialized:
            rank_zero_info(
                f"WeightNormalization: {trainer.ckpt_path} holds no state of this callback; its weights were "
                "trained without it, so they are kept and the data-dependent init does not run."
            )
            self.initialized = True
        if not self.data_init or self.initialized:
            return
        inputs, count = self._init_inputs(trainer, pl_module)
        with trainer.precision_plugin.train_step_context():
            # a run resumed without our state has no list of its own: every normalized layer
            report = data_dependent_init(pl_module, inputs, modules=self.normalized or None, init_scale=self.init_scale)
        self.initialized = True
        stds = torch.cat([m.std for m in report.modules.values()])
        rank_zero_info(
            f"WeightNormalization: data-dependent init on {count} examples per rank; pre-init "
            f"std per unit from {stds.min().item():.3g} to {stds.max().item():.3g}.\n{report}"
        )

    def _init_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Inputs, int]:
        """The first ``init_samples / world_size`` examples of this rank's shard, as ``forward`` takes them."""
        trainer.fit_loop.setup_data()  # the processed loader: DistributedSampler, each rank its shard
        loader = trainer.train_dataloader
        if loader is None or isinstance(loader, (list, tuple, dict)):
            raise ValueError(
                "WeightNormalization's data-dependent init reads one training dataloader; got "
                f"{type(loader).__name__}. Return a single DataLoader, or set `data_init=False`."
            )
        wanted = math.ceil(self.init_samples / trainer.world_size)
        hook = _init_inputs_hook(pl_module)
        chunks, count = [], 0
        for batch in loader:
            batch = trainer.strategy.batch_to_device(batch)
            if hook is not None:
                x = hook(batch)
                where = f"`{type(pl_module).__name__}.data_init_inputs(batch)`"
            else:
                x = model_inputs(batch, self.input_key)
                where = f"the batch at `input_key`={self.input_key!r}"
            chunks.append(x)
            count += example_count(x, where)
            if count >= wanted:
                break
        if not chunks:
            raise ValueError("The training dataloader is empty: no examples for the data-dependent init.")
        return concatenate(chunks, wanted), min(count, wanted)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._close_cache()
        if self.max_norm is not None:
            limit_direction_norm(pl_module, self.max_norm)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fold_on_fit_end:
            folded = remove_weight_norm(pl_module)
            rank_zero_info(f"WeightNormalization: folded weight norm into plain weights in {len(folded)} layers.")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "normalized": list(self.normalized),
            "initialized": self.initialized,
            "mean_only_bn": self.mean_only_bn,
            "log_scale_factor": self.log_scale_factor,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Weights trained without weight norm (a plain layer's `weight`) have just loaded into g and v; the
        # optimizers, built later, get theirs after on_fit_start, which is where they are rewritten
        if trainer.state.fn != TrainerFn.FITTING or "optimizer_states" not in checkpoint:
            return  # only fit restores optimizer states
        if self.state_key in checkpoint.get("callbacks", {}):
            return
        tensors = [f"{n}.{t}" for n, m in weight_normalized_modules(pl_module) for t in weight_norms(m)]
        if any(tensor in checkpoint["state_dict"] for tensor in tensors):
            self._plain_checkpoint = checkpoint

    def _restart_optimizer_states(self, trainer: pl.Trainer) -> None:
        """The saved optimizer states hold moments of plain weights, which are now g and v: restart them.

        Each group keeps its saved hyperparameters (a learning rate a scheduler lowered); the
        per-parameter state (Adam's moments, momentum buffers) starts empty, as for a new parameter.
        """
        checkpoint, self._plain_checkpoint = self._plain_checkpoint, None
        if checkpoint is None:
            return
        restarted = []
        for saved, optimizer in zip(checkpoint["optimizer_states"], trainer.optimizers):
            fresh = optimizer.state_dict()
            groups = saved["param_groups"]
            if len(groups) == len(fresh["param_groups"]):
                fresh["param_groups"] = [_with_params_of(new, old) for old, new in zip(groups, fresh["param_groups"])]
            restarted.append(fresh)
        checkpoint["optimizer_states"] = restarted
        rank_zero_warn(
            f"WeightNormalization: {trainer.ckpt_path} was trained without weight norm; its plain weights now "
            "load as g and v, so the optimizer state saved for them (momentum, Adam's moments) cannot apply "
            "and restarts from zero. Learning rates and the loop's progress are restored."
        )


def _with_params_of(group: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """``saved``'s hyperparameters for ``group``'s parameters (and their names: the saved ones are plain weights')."""
    hyperparameters = {key: value for key, value in saved.items() if key not in ("params", "param_names")}
    return {**hyperparameters, **{key: group[key] for key in ("params", "param_names") if key in group}}


class FoldWeightNormOnLoad:
    """LightningModule mixin: checkpoints trained with weight norm load into the plain model.

    ``Model.load_from_checkpoint(path)`` then folds every ``g`` and ``v`` the model does not
    itself have into plain weights; a model that is weight-normalized loads them as they are.
    Put it before ``LightningModule`` in the bases: ``class Model(FoldWeightNormOnLoad, LightningModule)``.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        if "state_dict" not in checkpoint:  # ModelParallelStrategy loaded the weights into the model itself
            return
        own = self.state_dict().keys()  # type: ignore[attr-defined]
        checkpoint["state_dict"] = fold_state_dict(checkpoint["state_dict"], keep=own)


def load_from_checkpoint(model_class: type[pl.LightningModule], path: str, **kwargs: Any) -> pl.LightningModule:
    """``model_class.load_from_checkpoint(path)`` for a checkpoint trained with weight norm.

    The weight-normalized entries are folded into plain weights first, so the plain model class
    loads it strictly and computes exactly the trained function.
    """
    checkpoint = read_checkpoint(path, weights_only=False)
    checkpoint["state_dict"] = fold_state_dict(checkpoint["state_dict"])
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return model_class.load_from_checkpoint(buffer, **kwargs)


def _init_inputs_hook(pl_module: pl.LightningModule):
    hook = getattr(pl_module, "data_init_inputs", None)
    return hook if callable(hook) else None


def _refuse_sharded_plain_layers(modules: dict[str, torch.nn.Module], plain: list[str]) -> None:
    """A layer sharded by ``fully_shard`` before weight norm reached it cannot be normalized any more."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    sharded = [name for name in plain if any(isinstance(p, DTensor) for p in modules[name].parameters())]
    if sharded:
        raise RuntimeError(
            f"Layers {', '.join(f'`{name}`' for name in sharded)} were sharded (`fully_shard`) before weight norm "
            "was applied: their parameters are now shards, and g and v must be made from the whole weight, then "
            "sharded. Build such layers in `__init__`, or call `lightning_wn.apply_weight_norm(self, ...)` in "
            "`configure_model` before `fully_shard`."
        )


def _refuse_callbacks_that_cannot_work(trainer: pl.Trainer, ours: Callback, normalized: list[str]) -> None:
    callbacks = list(trainer.callbacks)
    # a weight-averaging callback copies the model in its own setup: before ours, it copies plain layers
    first = [c for c in callbacks[: callbacks.index(ours)] if isinstance(c, (StochasticWeightAveraging, WeightAveraging))]
    if first:
        raise RuntimeError(
            f"{type(first[0]).__name__} is listed before WeightNormalization, so it copies the model before its "
            "layers are weight-normalized, and cannot average g and v into that copy. List WeightNormalization "
            "first: `callbacks=[WeightNormalization(...), ...]`."
        )
    if normalized and any(isinstance(c, ModelPruning) for c in callbacks):
        raise RuntimeError(
            "ModelPruning cannot prune weight-normalized layers (their weight is computed from g and v, not a "
            "parameter), and which layers it prunes is its own private state. Prune without weight norm: fit with "
            "`WeightNormalization(fold_on_fit_end=True)`, then prune the plain layers in a run of their own."
        )
