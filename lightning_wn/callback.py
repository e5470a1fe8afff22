"""The ``WeightNormalization`` Lightning callback: *when* things happen; the library says *how*.

Weight norm is applied in ``setup``, before optimizers are built and DDP wraps the model, so the optimizer
holds ``g`` and ``v`` and DDP all-reduces their gradients; the data-dependent init runs once per training run.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning, StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_wn.cache import cached
from lightning_wn.init import INITIALIZED, _is_sharded, _shown, data_dependent_init
from lightning_wn.init_inputs import first_examples, model_inputs
from lightning_wn.mean_only_bn import attach_mean_only_bn
from lightning_wn.models import apply_weight_norm, limit_direction_norm, remove_weight_norm, select_layers
from lightning_wn.weight_norm import RECURRENT_LAYERS, is_weight_normalized, positive_number, weight_norms

# and their subclasses: why each cannot carry weight norm
_REFUSED_STRATEGIES = {
    FSDPStrategy: "FSDP1's FlatParameter holds gathered copies of g and v, so the init's writes into them are lost",
    DeepSpeedStrategy: "DeepSpeed re-creates parameters inside its engine (ZeRO), which weight norm cannot follow",
}
# options that act on g, v or buffers per rank, which a sharded model does not keep in step across ranks
_UNSHARDED_ONLY = {
    "mean_only_bn": "its running mean is a buffer FSDP2 does not synchronize, so the ranks' copies would drift apart",
    "max_norm": "it rescales each rank's shard of v by norms taken on that shard only",
    "fold_on_fit_end": "it would fold shards in place; fold the full checkpoint instead (`load_from_checkpoint`)",
}
# the launcher loads the trained state dict back into the main process's model with strict=False
_STARTED_PROCESS = ("WeightNormalization runs in a process Lightning started (strategy `ddp_spawn`, `ddp_fork` or "
                    "`ddp_notebook`), which hands back only the weights the main process's model has names for: "
                    "{what} there would be silently lost. Normalize and initialize the model before `fit`: "
                    "{by_hand}, then `lightning_wn.data_dependent_init(model, batch)`; or use `strategy='ddp'`.")


class WeightNormalization(Callback):
    r"""Weight normalization for any LightningModule, with the paper's data-dependent init.

    Args:
        include: layers to normalize: ``torch.nn`` layer names (``"Conv2d"``) or glob patterns over module names
            (``"encoder.*"``); default every ``Linear``, ``Conv*`` and ``ConvTranspose*`` (recurrent only when named).
        exclude: layers to leave plain, in the same form.
        weight_norm: False leaves the layers plain and only runs the init (which then rescales weight rows).
        data_init: run the data-dependent init when fit starts (once per run, never on resume).
        init_samples: training examples for the init (500 in the paper); each rank takes its share, rounded up.
        init_scale: the standard deviation each pre-activation starts with.
        input_key: the index or dict key of ``forward``'s input in a batch (default the batch, or its first element);
            a list (``["mel", "noise"]``) passes several as positional arguments. Or define ``data_init_inputs(batch)``
            on the module, returning a tensor, a tuple (``forward(*inputs)``) or a dict (``forward(**inputs)``).
        mean_only_bn: put the paper's mean-only batch norm after every normalized layer.
        max_norm: rescale any ``||v||`` above this before the first and after each training batch (``w`` is unchanged).
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
        if isinstance(init_samples, bool) or not isinstance(init_samples, numbers.Integral):
            raise TypeError(f"`init_samples` must be an integer, got {init_samples!r} ({type(init_samples).__name__}).")
        if init_samples < 1:
            raise ValueError(f"`init_samples` must be a positive integer, got {init_samples!r}.")
        keys = list(input_key) if isinstance(input_key, (list, tuple)) else [input_key]
        valid = keys and all(isinstance(key, (int, str)) and not isinstance(key, bool) for key in keys)
        if input_key is not None and not valid:
            raise TypeError(f"`input_key` must be an index, a key, or a non-empty list of them, got {input_key!r}.")
        for argument, value in (("include", include), ("exclude", exclude)):
            if isinstance(value, str):
                raise TypeError(f"`{argument}` must be a list of names or patterns, got the string {value!r}.")
        self.include = None if include is None else list(include)
        self.exclude = list(exclude)
        self.weight_norm, self.data_init, self.init_samples = weight_norm, data_init, int(init_samples)
        self.init_scale = positive_number("init_scale", init_scale)
        self.input_key = keys if isinstance(input_key, (list, tuple)) else input_key
        self.mean_only_bn, self.fold_on_fit_end, self.paper_init = mean_only_bn, fold_on_fit_end, paper_init
        self.max_norm = None if max_norm is None else positive_number("max_norm", max_norm)
        self.log_scale_factor = (None if log_scale_factor is None
                                 else positive_number("log_scale_factor", log_scale_factor))
        if paper_init and not data_init:  # v ~ N(0, 0.05) is for the init to scale; it would also redraw loaded weights
            raise ValueError("`paper_init`=True draws v from N(0, 0.05) for the data-dependent init to scale, but "
                             "`data_init`=False skips the init. Set `data_init=True`, or leave `paper_init` out.")
        # each of these acts on g or v, which a plain layer does not have
        for argument in () if weight_norm else ("mean_only_bn", "max_norm", "log_scale_factor", "paper_init"):
            if (value := getattr(self, argument)) not in (None, False):
                raise ValueError(f"`{argument}`={value!r} needs weight norm, but `weight_norm`=False leaves the layers "
                                 f"plain: set `weight_norm=True`, or leave `{argument}` out.")
        self.normalized: list[str] = []
        self.initialized = False
        self._restored: bool | None = None  # whether a restored state was past its init; applied at the init
        self._other_parameters: tuple[dict, str] | None = None  # a checkpoint whose optimizer states don't apply, why
        self._plain_to_evaluate: dict[str, dict[str, torch.nn.Parameter]] = {}  # by layer: its weights, as they came
        self._cache = ExitStack()  # the open cached() scope of the current step, if any
        self._pid = os.getpid()  # the process that built the callback: a launcher hands the fitted weights back to it

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # what the callback knew of another run's model (a tuner's, restored or saved) is not this one's
        self._restored, self.initialized, self._other_parameters = None, False, None
        strategy = trainer.strategy
        for refused, why in _REFUSED_STRATEGIES.items():
            if isinstance(strategy, refused):
                raise RuntimeError(f"WeightNormalization does not support `{type(strategy).__name__}`: {why}. Use "
                                   "`strategy='ddp'`, or `ModelParallelStrategy(data_parallel_size=N, "
                                   "tensor_parallel_size=1)` with `fully_shard` (FSDP2) in `configure_model`.")
        if isinstance(strategy, ModelParallelStrategy):
            mesh = strategy.device_mesh
            if "tensor_parallel" in (mesh.mesh_dim_names or ()) and (size := mesh["tensor_parallel"].size()) > 1:
                raise RuntimeError(f"WeightNormalization cannot run under tensor parallelism (`tensor_parallel_size` "
                                   f"is {size}): it splits layers that weight norm and its init need whole. Set "
                                   "`tensor_parallel_size=1` and `data_parallel_size` to the number of devices.")
            for argument, why in _UNSHARDED_ONLY.items():
                if (value := getattr(self, argument)) not in (None, False):
                    raise ValueError(f"`{argument}`={value!r} is not supported under `ModelParallelStrategy`: {why}. "
                                     f"Leave `{argument}` out, or train with `strategy='ddp'`.")
        if self.input_key is not None and callable(getattr(pl_module, "data_init_inputs", None)):
            raise ValueError(f"`input_key`={self.input_key!r} and `{type(pl_module).__name__}.data_init_inputs` both "
                             "say what the data-dependent init passes to `forward`: keep one.")
        # what configure_model builds does not exist yet: patterns for it match nothing (on_fit_start selects again)
        later = is_overridden("configure_model", pl_module)
        with warnings.catch_warnings():
            if later and stage == TrainerFn.FITTING:  # about layers under torch's norms: on_fit_start sees them all
                warnings.simplefilter("ignore")
            try:
                selected = select_layers(pl_module, self.include, self.exclude, missing_ok=later)
            except ValueError as error:  # names that may yet exist: the module's own setup runs after this one
                if not is_overridden("setup", pl_module):
                    raise
                try:
                    select_layers(pl_module, self.include, self.exclude, missing_ok=True)
                except ValueError:  # a fault that no layer built later mends
                    raise error from None
                raise ValueError(f"{error} (The LightningModule's own `setup` runs after this callback's: layers it "
                                 "builds do not exist yet. Build them in `__init__`, or build and normalize them in "
                                 "`configure_model`.)") from error
        callbacks = list(trainer.callbacks)
        averaging = (StochasticWeightAveraging, WeightAveraging)  # each copies the model in its own setup
        if first := [c for c in callbacks[: callbacks.index(self)] if isinstance(c, averaging)]:
            raise RuntimeError(f"{type(first[0]).__name__} is listed before WeightNormalization, so it copies the "
                               "layers before they are weight-normalized. List WeightNormalization first: "
                               "`callbacks=[WeightNormalization(...), ...]`.")
        if self.weight_norm and selected and any(isinstance(c, ModelPruning) for c in callbacks):
            raise RuntimeError("ModelPruning cannot prune weight-normalized layers (their weight is computed from g "
                               "and v). Fit with `WeightNormalization(fold_on_fit_end=True)`, then prune the plain "
                               "layers in a run of their own.")
        self._normalize_layers(trainer, pl_module, selected, fitting=stage == TrainerFn.FITTING)

    def _normalize_layers(self, trainer: pl.Trainer, pl_module: pl.LightningModule, selected: list[str],
                          fitting: bool) -> None:
        self.normalized = selected
        if not self.weight_norm:
            return  # only initialized
        modules = dict(pl_module.named_modules())
        # a second fit finds its layers normalized; a layer the user normalized by hand stays as it is
        plain = [name for name in selected if not is_weight_normalized(modules[name])]
        attached = [name for name in selected if self.mean_only_bn and "mean_only_bn" not in modules[name]._modules]
        if (plain or attached) and self._in_started_process(trainer):
            what = "weight norm on plain layers" if plain else "the mean-only batch norms attached"
            raise RuntimeError(_STARTED_PROCESS.format(what=what, by_hand=self._by_hand("model")))
        if self.fold_on_fit_end and self._in_started_process(trainer):
            raise RuntimeError("`fold_on_fit_end` would fold the layers in a process Lightning started (strategy "
                               "`ddp_spawn`, `ddp_fork` or `ddp_notebook`), whose main process gets g and v back, not "
                               "plain weights. Leave it out and fold after `fit`: `lightning_wn.remove_weight_norm("
                               "model)`; or use `strategy='ddp'`.")
        if sharded := [name for name in plain if any(map(_is_sharded, modules[name].parameters()))]:
            raise RuntimeError(f"Layers {', '.join(f'`{name}`' for name in sharded)} were sharded (`fully_shard`) "
                               "before weight norm, which needs the whole weight. Build them in `__init__`, or call "
                               "`lightning_wn.apply_weight_norm(self, ...)` in `configure_model` before `fully_shard`.")
        if not fitting and self.fold_on_fit_end:  # normalized so that a checkpoint of g and v loads: plain again
            self._plain_to_evaluate = {name: dict(modules[name].named_parameters(recurse=False)) for name in plain}
        # the paper's draw of v is for a fit's layers never initialized, plain or not; trained ones keep theirs
        fresh = {n for n in selected if fitting and self.paper_init and not getattr(modules[n], INITIALIZED, False)}
        for paper_init in (True, False):  # by weight_norm, as by hand: the same draws from the same random state
            if names := [name for name in plain if (name in fresh) == paper_init]:
                apply_weight_norm(pl_module, names, log_scale_factor=self.log_scale_factor, paper_init=paper_init)
        for wn in (wn for name in fresh for wn in weight_norms(modules[name]).values() if not wn.paper_init):
            wn.reset(torch.empty_like(wn.v).normal_(0.0, 0.05))  # v ~ N(0, 0.05), g = ||v||
            wn.paper_init = True
        for name in attached:
            attach_mean_only_bn(modules[name])
        if fitting:  # here, not at fit start: tuners (LearningRateFinder) train before that
            self._refuse_missing_options(pl_module, [name for name in selected if name not in plain])
        if plain or attached:
            notes = f" ({len(selected) - len(plain)} of them already were)" if len(plain) < len(selected) else ""
            notes += f", {len(attached)} with mean-only batch norm" if attached else ""
            rank_zero_info(f"WeightNormalization: normalized {len(selected)} layers{notes}: {', '.join(selected)}")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # configure_model has run since setup: the layers it built exist only now
        with warnings.catch_warnings():
            if not is_overridden("configure_model", pl_module):
                warnings.simplefilter("ignore")  # about layers under torch's norms: setup warned already
            selected = select_layers(pl_module, self.include, self.exclude)
        if plain := [n for n in selected if self.weight_norm and not is_weight_normalized(pl_module.get_submodule(n))]:
            raise RuntimeError(f"Layers {', '.join(f'`{name}`' for name in plain)} were built after "
                               "WeightNormalization's `setup` (in the module's `setup` or `configure_model`) and are "
                               f"left plain: call {self._by_hand('self', plain)} at the end of that hook (before "
                               "`fully_shard`).")
        self._refuse_missing_options(pl_module, [name for name in selected if name not in self.normalized])
        self.normalized = selected  # the init's targets, with the layers configure_model built
        self._restart_optimizer_states(trainer)
        if not trainer.strategy.restore_checkpoint_after_setup:
            self._data_init(trainer, pl_module)

    def _refuse_missing_options(self, pl_module: pl.LightningModule, names: list[str]) -> None:
        """Refuse layers normalized without this callback (by hand, or in ``configure_model``) that lack its options."""
        wrong: dict[str, list[str]] = {}
        for name in names if self.weight_norm else ():
            layer = pl_module.get_submodule(name)
            norms = weight_norms(layer).values()
            lacks = {
                "mean_only_bn": self.mean_only_bn and "mean_only_bn" not in layer._modules,
                "log_scale_factor": self.log_scale_factor is not None
                and any(n.log_scale_factor != self.log_scale_factor for n in norms),
                "paper_init": self.paper_init and not getattr(layer, INITIALIZED, False)
                and not all(n.paper_init for n in norms),
            }
            for option in (option for option, lacking in lacks.items() if lacking):
                wrong.setdefault(option, []).append(name)
        if wrong:
            lacking = "; ".join(f"`{option}` ({', '.join(names)})" for option, names in wrong.items())
            layers = sorted({name for names in wrong.values() for name in names})
            raise RuntimeError(f"Layers normalized without WeightNormalization (by hand, or in `configure_model`) "
                               f"lack its options: {lacking}. Give them those options where they are normalized: "
                               f"{self._by_hand('model', layers)}; or leave the options out.")

    def _by_hand(self, model: str, layers: Sequence[str] | None = None) -> str:
        """The calls that give ``layers`` of ``model`` this callback's weight norm, for messages that ask for them."""
        options = "".join(f", {option}={getattr(self, option)!r}" for option in ("log_scale_factor", "paper_init")
                          if getattr(self, option) not in (None, False))
        names = "[...]" if layers is None else repr(list(layers))
        attach = " and `lightning_wn.attach_mean_only_bn(layer)` on each" if self.mean_only_bn else ""
        return f"`lightning_wn.apply_weight_norm({model}, {names}{options})`{attach}"

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ModelParallelStrategy restores a checkpoint after on_fit_start: only here is it known to be a resume
        if trainer.strategy.restore_checkpoint_after_setup:
            self._data_init(trainer, pl_module)
        if self.max_norm is not None:  # before the first batch too: the batches of an accumulated step see one v
            limit_direction_norm(pl_module, self.max_norm)
        self._warn_misplaced(trainer, pl_module)

    def _warn_misplaced(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # parameters picked by name (`.endswith("weight")`) miss g and v, which replaced `weight` in setup
        groups = [group for optimizer in trainer.optimizers for group in optimizer.param_groups]
        held = {id(p) for group in groups for p in group["params"]}
        if not (self.weight_norm and held):
            return  # plain layers; or no optimizer at all, which Lightning warns about
        params = {name: pl_module.get_submodule(name).parametrizations.parameters() for name in self.normalized}
        trained = {name: [p for p in layer if p.requires_grad] for name, layer in params.items()}
        decaying = [group["params"] for group in groups if group.get("weight_decay", 0) > 0]
        if untrained := [name for name, layer in trained.items() if any(id(p) not in held for p in layer)]:
            why = f"no optimizer holds g or v of {_shown(untrained)}, so they do not train (to freeze them instead: "
            why += "`requires_grad_(False)`)"
        elif any(trained.values()) and decaying and not any(p.dim() > 1 for group in decaying for p in group):
            why = "a group has weight decay but holds no weight: g and v are in none"
        else:
            return
        rank_zero_warn(f"WeightNormalization: {why}. Weight norm replaced each layer's `weight` with "
                       "`parametrizations.weight.original0` (g) and `original1` (v) in `setup`: pick parameters by "
                       "those names, or by module, in `configure_optimizers`.")

    # every step runs inside one cache scope: a module called many times per step computes its weight once
    def _open_cache(self, *args: Any) -> None:
        self._cache.close()  # a step that ended without its batch-end hook (a skipped batch) leaves no scope open
        self._cache.enter_context(cached())

    def _close_cache(self, *args: Any) -> None:
        self._cache.close()

    on_train_batch_start = on_validation_batch_start = on_test_batch_start = on_predict_batch_start = _open_cache
    on_validation_batch_end = on_test_batch_end = on_predict_batch_end = on_exception = _close_cache

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_cache()  # a LightningModule's on_train_batch_start returning -1 skips the batch-end hooks
        # fold_on_fit_end: layers normalized to evaluate go plain again (the checkpoint's weights folded, or their own)
        plain, self._plain_to_evaluate = self._plain_to_evaluate, {}
        for name, params in plain.items():
            remove_weight_norm(layer := pl_module.get_submodule(name))
            for tensor_name, param in params.items() if trainer.ckpt_path is None else ():
                setattr(layer, tensor_name, param)

    def _data_init(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Each layer's mark of its init guards it, not a flag of this callback (which may have served another model).
        # A restored state says whether the checkpoint's weights had their init: a tuner's was saved before it.
        restored, self._restored = self._restored, None
        resumed = restored if restored is not None else trainer.ckpt_path is not None
        if resumed:
            if restored is None:
                rank_zero_info(f"WeightNormalization: {trainer.ckpt_path} holds no state of this callback (trained "
                               "without it, or saved with `save_weights_only`), so its weights are kept and the "
                               "data-dependent init does not run.")
            self._mark_initialized(pl_module)
        layers = {name: pl_module.get_submodule(name) for name in self.normalized}
        recurrent = [name for name, layer in layers.items() if isinstance(layer, RECURRENT_LAYERS)]  # never initialized
        if self.data_init and layers and len(recurrent) == len(layers):
            raise ValueError(f"WeightNormalization selects only recurrent layers ({', '.join(recurrent)}), which the "
                             "data-dependent init leaves alone: it is for networks without recursion. Set "
                             "`data_init=False`, or include non-recurrent layers too.")
        targets = [n for n, layer in layers.items() if n not in recurrent and not getattr(layer, INITIALIZED, False)]
        if not self.data_init or not targets:
            if self.data_init and self.normalized and not resumed:
                rank_zero_info("WeightNormalization: every layer was data-initialized before (an earlier fit, "
                               "`data_dependent_init`, or `load_from_checkpoint`), so its weights are kept and the "
                               "init does not run.")
            self.initialized = True  # past the init, run or not: a checkpoint of this run resumes without one
            return
        if trainer.limit_train_batches == 0:  # Lightning then builds no training dataloader
            return rank_zero_info("WeightNormalization: `limit_train_batches=0` trains nothing, so the data-dependent "
                                  "init does not run.")
        if self._in_started_process(trainer):
            raise RuntimeError(_STARTED_PROCESS.format(what="the record of the data-dependent init",
                                                       by_hand=self._by_hand("model")))
        trainer.fit_loop.setup_data()  # the processed loader: DistributedSampler, each rank its shard
        loader = trainer.train_dataloader
        if loader is None or isinstance(loader, (list, tuple, dict)):
            raise ValueError(f"WeightNormalization's data-dependent init reads one training dataloader, got "
                             f"{type(loader).__name__}. Return a single DataLoader, or set `data_init=False`.")
        read = getattr(pl_module, "data_init_inputs", None)
        where = f"`{type(pl_module).__name__}.data_init_inputs(batch)`"
        if not callable(read):
            where = f"the batch at `input_key`={self.input_key!r}"
            read = functools.partial(model_inputs, input_key=self.input_key)
        wanted = math.ceil(self.init_samples / trainer.world_size)  # the first examples of this rank's shard
        batches = (read(_as_trained_on(trainer, pl_module, batch)) for batch in loader)
        inputs, count = first_examples(batches, wanted, where)
        if count < wanted:
            rank_zero_warn(f"WeightNormalization: the training dataloader holds {count} examples per rank, fewer than "
                           f"`init_samples`={self.init_samples} asks for: the init runs on those.")
        if getattr(loader, "persistent_workers", False) and loader.num_workers > 0:
            iter(loader)  # rewinds the workers' one iterator, which the training loop holds too
            if isinstance(loader.dataset, torch.utils.data.IterableDataset):
                rank_zero_warn("WeightNormalization: the first epoch trains on its first batch twice: Lightning "
                               "fetched it before the init rewound the loader (an IterableDataset with "
                               "`persistent_workers`). Set `persistent_workers=False` to train on it once.")
        with trainer.precision_plugin.train_step_context():
            report = data_dependent_init(pl_module, inputs, modules=targets, init_scale=self.init_scale)
        # weight averaging copied the model in its setup, before this init, and holds that copy until its first update
        if late := [type(c).__name__ for c in trainer.callbacks
                    if isinstance(c, WeightAveraging) and not c.should_update(step_idx=0)]:
            rank_zero_warn(f"WeightNormalization: {late[0]} copied the model in its `setup`, before the data-dependent "
                           "init, and does not update its average at the first step: until its first update, a "
                           "validation evaluates (and a fit that ends puts back) the layers as they were before the "
                           "init. Where that matters, normalize and initialize before `fit`: "
                           f"{self._by_hand('model')}, then `lightning_wn.data_dependent_init(model, batch)`.")
        self.initialized = True
        rank_zero_info(f"WeightNormalization: data-dependent init on {count} examples per rank.\n{report}")

    def _in_started_process(self, trainer: pl.Trainer) -> bool:
        # started by the strategy's launcher, not (say) a sweep's worker that runs a whole fit of its own
        return os.getpid() != self._pid and trainer.strategy.launcher is not None

    def _mark_initialized(self, pl_module: pl.LightningModule) -> None:
        """Record on each layer that its weights are past their init (restored or loaded, not fresh)."""
        for name in self.normalized:
            setattr(pl_module.get_submodule(name), INITIALIZED, True)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._close_cache()
        if self.max_norm is not None:
            limit_direction_norm(pl_module, self.max_norm)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fold_on_fit_end:  # the layers this callback selects: an excluded one stays as the user made it
            folded = [name for name in self.normalized if remove_weight_norm(pl_module.get_submodule(name))]
            rank_zero_info(f"WeightNormalization: folded weight norm into plain weights in {len(folded)} layers.")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"normalized": list(self.normalized), "initialized": self.initialized,
                "mean_only_bn": self.mean_only_bn, "log_scale_factor": self.log_scale_factor}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = bool(state_dict.get("initialized"))

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != TrainerFn.FITTING:  # trained weights, loaded to evaluate: a later fit keeps them
            with warnings.catch_warnings():  # patterns for layers configure_model built: checked before weights load
                warnings.simplefilter("ignore")  # about layers under torch's norms: setup warned already
                select_layers(pl_module, self.include, self.exclude)
            return self._mark_initialized(pl_module)
        # The optimizer states, restored after on_fit_start and rewritten there, hold moments of other parameters where
        # a layer's weights just loaded into g and v from another form (plain, another g = exp(c * s), another axis)
        forms = (wn.converted_on_load for module in pl_module.modules() for wn in weight_norms(module).values())
        if "optimizer_states" in checkpoint and (why := next(filter(None, forms), None)):
            self._other_parameters = checkpoint, why

    def _restart_optimizer_states(self, trainer: pl.Trainer) -> None:
        # each group keeps its saved hyperparameters (a learning rate a scheduler lowered); Adam's moments start empty
        if self._other_parameters is None:
            return
        (checkpoint, why), self._other_parameters = self._other_parameters, None
        restarted = []
        for saved, optimizer in zip(checkpoint["optimizer_states"], trainer.optimizers):
            fresh = optimizer.state_dict()
            if len(saved["param_groups"]) == len(fresh["param_groups"]):
                for old, new in zip(saved["param_groups"], fresh["param_groups"]):
                    new |= {k: v for k, v in old.items() if k not in ("params", "param_names")}  # hyperparameters
            restarted.append(fresh)
        checkpoint["optimizer_states"] = restarted
        rank_zero_warn(f"WeightNormalization: {trainer.ckpt_path} {why}. What an optimizer saved for it (momentum, "
                       "Adam's moments) cannot apply to this run's g and v, so the optimizer state restarts from zero. "
                       "Learning rates and the loop's progress are restored.")


def _as_trained_on(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
    """``batch`` as the training loop hands it to ``training_step``: cast by the precision plugin (``64-true``,
    ``bf16-true``), through ``on_before_batch_transfer``, then moved (with ``on_after_batch_transfer``)."""
    batch = trainer.precision_plugin.convert_input(batch)
    owner = trainer.datamodule if is_overridden("on_before_batch_transfer", trainer.datamodule) else pl_module
    return trainer.strategy.batch_to_device(owner.on_before_batch_transfer(batch, 0))
