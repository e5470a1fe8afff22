"""The ``WeightNormalization`` Lightning callback: *when* things happen; the library says *how*.

* ``setup``: apply weight norm (and mean-only batch norm), before optimizers are built and DDP
  wraps the model, so the optimizer holds ``g`` and ``v`` and DDP all-reduces their gradients.
  Layers built in ``configure_model`` are normalized right after that hook returns.
* ``on_fit_start``: the data-dependent init, once per training run, on training examples.
* ``on_train_batch_end``: the hard limit on ``||v||``, if asked for.
* ``on_fit_end``: fold weight norm away, if asked for.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_wn.checkpoint import read_checkpoint
from lightning_wn.init import data_dependent_init
from lightning_wn.mean_only_bn import attach_mean_only_bn
from lightning_wn.state_dict import fold_state_dict
from lightning_wn.weight_norm import (
    apply_weight_norm,
    is_weight_normalized,
    limit_direction_norm,
    remove_weight_norm,
    select_layers,
)

_REFUSED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)  # and their subclasses


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
            element. The LightningModule's ``forward`` is called with it.
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
        input_key: int | str | None = None,
        mean_only_bn: bool = False,
        max_norm: float | None = None,
        fold_on_fit_end: bool = False,
        log_scale_factor: float | None = None,
        paper_init: bool = False,
    ) -> None:
        if isinstance(init_samples, bool) or not isinstance(init_samples, int) or init_samples < 1:
            raise ValueError(f"`init_samples` must be a positive integer, got {init_samples!r}.")
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"`init_scale` must be a positive number, got {init_scale!r}.")
        if max_norm is not None and not (max_norm > 0 and math.isfinite(max_norm)):
            raise ValueError(f"`max_norm` must be a positive number or None, got {max_norm!r}.")
        if log_scale_factor is not None and not (log_scale_factor > 0 and math.isfinite(log_scale_factor)):
            raise ValueError(f"`log_scale_factor` must be a positive number or None, got {log_scale_factor!r}.")
        if not weight_norm:  # each of these acts on g or v, which a plain layer does not have
            ignored = {"mean_only_bn": mean_only_bn, "max_norm": max_norm, "log_scale_factor": log_scale_factor,
                       "paper_init": paper_init}  # fmt: skip
            for argument, value in ignored.items():
                if value not in (None, False):
                    raise ValueError(
                        f"`{argument}`={value!r} needs weight norm, but `weight_norm`=False leaves the layers "
                        f"plain: set `weight_norm=True`, or leave `{argument}` out."
                    )
        for argument, value in (("include", include), ("exclude", exclude)):
            if isinstance(value, str):
                raise TypeError(f"`{argument}` must be a list of names or patterns, got the string {value!r}.")
        self.include = None if include is None else list(include)
        self.exclude = list(exclude)
        self.weight_norm = weight_norm
        self.data_init = data_init
        self.init_samples = init_samples
        self.init_scale = init_scale
        self.input_key = input_key
        self.mean_only_bn = mean_only_bn
        self.max_norm = max_norm
        self.fold_on_fit_end = fold_on_fit_end
        self.log_scale_factor = log_scale_factor
        self.paper_init = paper_init
        self.normalized: list[str] = []
        self.initialized = False
        self._restored: dict[str, Any] | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, _REFUSED_STRATEGIES):
            strategy = type(trainer.strategy).__name__
            raise RuntimeError(
                f"WeightNormalization does not support `{strategy}`: it shards or restores parameters "
                "in ways the reparameterization cannot follow. Use a single device or `strategy='ddp'`."
            )
        if _overrides_configure_model(pl_module):
            _run_after_configure_model(pl_module, self._normalize)
        else:
            self._normalize(pl_module)

    def _normalize(self, pl_module: pl.LightningModule) -> None:
        selected = select_layers(pl_module, self.include, self.exclude)
        self.normalized = selected
        if not self.weight_norm:
            return  # only initialized
        modules = dict(pl_module.named_modules())
        # a second fit finds its layers normalized; a layer the user normalized by hand stays as it is
        plain = [name for name in selected if not is_weight_normalized(modules[name])]
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
        inputs = self._init_inputs(trainer, pl_module)
        with trainer.precision_plugin.train_step_context():
            report = data_dependent_init(pl_module, inputs, modules=self._init_targets(), init_scale=self.init_scale)
        self.initialized = True
        stds = torch.cat([m.std for m in report.modules.values()])
        rank_zero_info(
            f"WeightNormalization: data-dependent init on {len(inputs)} examples per rank; pre-init "
            f"std per unit from {stds.min().item():.3g} to {stds.max().item():.3g}.\n{report}"
        )

    def _init_targets(self) -> list[str] | None:
        return self.normalized or None  # a run resumed without our state: every normalized layer

    def _init_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        trainer.fit_loop.setup_data()  # the processed loader: DistributedSampler, each rank its shard
        loader = trainer.train_dataloader
        if loader is None or isinstance(loader, (list, tuple, dict)):
            raise ValueError(
                "WeightNormalization's data-dependent init reads one training dataloader; got "
                f"{type(loader).__name__}. Return a single DataLoader, or set `data_init=False`."
            )
        wanted = math.ceil(self.init_samples / trainer.world_size)
        chunks, count = [], 0
        for batch in loader:
            x = self._model_input(trainer.strategy.batch_to_device(batch))
            chunks.append(x)
            count += len(x)
            if count >= wanted:
                break
        if not chunks:
            raise ValueError("The training dataloader is empty: no examples for the data-dependent init.")
        return torch.cat(chunks)[:wanted]

    def _model_input(self, batch: Any) -> Tensor:
        key = self.input_key
        try:
            if key is None:
                x = batch if isinstance(batch, Tensor) else batch[0]
            else:
                x = batch[key]
        except (KeyError, IndexError, TypeError) as error:
            raise ValueError(
                f"WeightNormalization cannot find the model input at `input_key`={key!r} in a batch "
                f"of type {type(batch).__name__}{_describe(batch)}. Set `input_key` to the index or "
                "key of the input tensor."
            ) from error
        if not isinstance(x, Tensor):
            raise ValueError(
                f"The model input at `input_key`={key!r} is a {type(x).__name__}, not a tensor. "
                f"Set `input_key` to the index or key of the input tensor{_describe(batch)}."
            )
        return x

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
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


class FoldWeightNormOnLoad:
    """LightningModule mixin: checkpoints trained with weight norm load into the plain model.

    ``Model.load_from_checkpoint(path)`` then folds every ``g`` and ``v`` the model does not
    itself have into plain weights; a model that is weight-normalized loads them as they are.
    Put it before ``LightningModule`` in the bases: ``class Model(FoldWeightNormOnLoad, LightningModule)``.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
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


def _overrides_configure_model(pl_module: pl.LightningModule) -> bool:
    return type(pl_module).configure_model is not pl.LightningModule.configure_model


def _run_after_configure_model(pl_module: pl.LightningModule, then) -> None:
    """Call ``then(pl_module)`` right after the module's own ``configure_model`` returns, once."""
    original = pl_module.configure_model

    @functools.wraps(original)
    def configure_model() -> None:
        del pl_module.configure_model  # back to the class's method: the module stays picklable
        original()
        then(pl_module)

    pl_module.configure_model = configure_model  # type: ignore[method-assign]


def _describe(batch: Any) -> str:
    if isinstance(batch, dict):
        return f" (keys: {sorted(map(str, batch))})"
    if isinstance(batch, (tuple, list)):
        return f" (length {len(batch)})"
    return ""
