"""The WeightNormalization callback: when it acts, on which data, and what survives a checkpoint."""

import copy
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import LearningRateFinder, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import FSDPStrategy

import lightning_wn
import lightning_wn.callback as callback_module
from lightning_wn import MeanOnlyBatchNorm, WeightNormalization, apply_weight_norm, data_dependent_init, is_weight_normalized
from lightning_wn import weight_norm, weight_normalized_modules

sys.path.insert(0, str(Path(__file__).parent))
from lit_models import ConvClassifier, DictBatches, LazyHead, LazyNormalizedHead, RandomImages, trainer  # noqa: E402

HERE = Path(__file__).parent


def standardized(model, x, names, atol=1e-3):
    """Per-unit mean and std of each named module's output on ``x``."""
    outputs = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: outputs.setdefault(n, o)) for n in names]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    for name, out in outputs.items():
        axes = [0, 2, 3] if out.dim() == 4 else [0]
        assert out.double().mean(axes).abs().max() < atol, name
        assert (out.double().std(axes, unbiased=False) - 1).abs().max() < atol, name


def test_normalizes_before_optimizers_and_inits_on_training_examples():
    seed_everything(0)
    model, data = ConvClassifier(), RandomImages()
    wn = WeightNormalization(init_samples=100)
    t = trainer(max_steps=0, callbacks=[wn])
    t.fit(model, data)
    assert wn.normalized == ["net.0", "net.2", "net.6"] and wn.initialized
    standardized(model, data.x[:100], wn.normalized)  # the first 100 training examples, unshuffled
    optimized = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}
    assert len(optimized) == 9  # g, v and bias of three layers


def test_a_loader_shorter_than_init_samples_is_warned_about_and_read_whole():
    seed_everything(0)
    model, data = ConvClassifier(), RandomImages(size=40, batch_size=16)
    with pytest.warns(UserWarning, match=r"holds 40 examples per rank, fewer than `init_samples`=500 asks for"):
        trainer(max_steps=0, callbacks=[wn := WeightNormalization(init_samples=500)]).fit(model, data)
    standardized(model, data.x, wn.normalized)


def test_batches_the_init_cannot_join_are_refused_with_the_fix_and_one_batch_initializes():
    batches = [(torch.randn(16, 3, size, size), torch.randint(0, 5, (16,))) for size in (8, 10)]  # sized per batch
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    with pytest.raises(ValueError, match=r"differ beyond the batch axis \(\(3, 8, 8\), then \(3, 10, 10\);.*cannot join "
                       r"them into 32 examples \(per process\)\. Set `init_samples` to at most one batch's size"):
        trainer(max_steps=1, callbacks=[WeightNormalization(init_samples=32)]).fit(ConvClassifier(), loader)
    model = ConvClassifier()
    trainer(max_steps=0, callbacks=[wn := WeightNormalization(init_samples=16)]).fit(model, loader)
    standardized(model, batches[0][0], wn.normalized)


def test_layers_built_in_configure_model_and_left_plain_are_refused_with_the_fix():
    with pytest.raises(RuntimeError, match=r"Layers `head` were built after .*call `lightning_wn.apply_weight_norm\(self, \['head'\]\)`"):
        trainer(max_steps=2, callbacks=[WeightNormalization(init_samples=64)]).fit(LazyHead(), RandomImages())


def test_layers_normalized_in_configure_model_train_and_are_initialized():
    model, data = LazyNormalizedHead(), RandomImages()
    wn = WeightNormalization(init_samples=64)
    t = trainer(max_steps=0, callbacks=[wn])
    t.fit(model, data)
    assert is_weight_normalized(model.head) and wn.normalized == ["net.0", "net.2", "net.6", "head"]
    standardized(model, data.x[:64], wn.normalized)  # the head the init found in configure_model's place
    optimized = {id(p) for p in t.optimizers[0].param_groups[0]["params"]}
    assert id(model.head.parametrizations.weight.original0) in optimized
    pickle.dumps(model)


class AllInConfigureModel(ConvClassifier):
    """Every layer built in ``configure_model``, as large (FSDP2) models do, and normalized there."""

    def __init__(self, include=None, **options):
        super().__init__()
        self.net, self.include, self.options = None, include, options

    def configure_model(self):
        if self.net is None:
            self.net = ConvClassifier().net
            apply_weight_norm(self, include=self.include, **self.options)


class HeadInSetup(ConvClassifier):
    """A head built in the LightningModule's own ``setup``, which runs after the callback's."""

    def __init__(self, normalize: bool = False):
        super().__init__()
        self.head, self.normalize = None, normalize

    def setup(self, stage):
        if self.head is None:
            self.head = nn.Linear(5, 5)
            if self.normalize:
                apply_weight_norm(self, ["head"])

    def forward(self, x):
        return self.head(self.net(x))


def test_layers_built_in_the_modules_setup_are_refused_with_the_fix_or_normalized_there_and_initialized():
    with pytest.raises(ValueError, match=r"`include` pattern 'head' matches no module\..*\(The LightningModule's own "
                       r"`setup` runs after this callback's: .*Build them in `__init__`, or build and normalize them in "
                       r"`configure_model`\.\)"):
        trainer(max_steps=1, callbacks=[WeightNormalization(include=["head"])]).fit(HeadInSetup(), RandomImages())
    with pytest.raises(ValueError, match=r"matches `net.1` \(ReLU\), which is not a supported layer") as refused:
        trainer(max_steps=1, callbacks=[WeightNormalization(include=["net.1"])]).fit(HeadInSetup(), RandomImages())
    assert "`setup` runs after" not in str(refused.value)  # a fault no layer built later mends
    with pytest.raises(RuntimeError, match=r"Layers `head` were built after WeightNormalization's `setup` \(in the "
                       r"module's `setup` or `configure_model`\) and are left plain: call "
                       r"`lightning_wn.apply_weight_norm\(self, \['head'\]\)` at the end of that hook"):
        trainer(max_steps=1, callbacks=[WeightNormalization(init_samples=64)]).fit(HeadInSetup(), RandomImages())
    model, data = HeadInSetup(normalize=True), RandomImages()
    trainer(max_steps=0, callbacks=[wn := WeightNormalization(init_samples=64)]).fit(model, data)
    assert wn.normalized == ["net.0", "net.2", "net.6", "head"]
    standardized(model, data.x[:64], wn.normalized)


def test_a_model_built_wholly_in_configure_model_is_normalized_there_and_initialized():
    model, data = AllInConfigureModel(), RandomImages()
    wn = WeightNormalization(init_samples=64)
    trainer(max_steps=0, callbacks=[wn]).fit(model, data)  # setup found no layer yet
    assert wn.normalized == ["net.0", "net.2", "net.6"]
    standardized(model, data.x[:64], wn.normalized)
    with pytest.raises(ValueError, match="`include` pattern 'nett' matches no module"):  # still an error, once built
        trainer(max_steps=0, callbacks=[WeightNormalization(include=["nett"])]).fit(AllInConfigureModel(), data)


@pytest.mark.parametrize(("option", "value"), [("mean_only_bn", True), ("log_scale_factor", 3.0), ("paper_init", True)])
def test_options_that_missed_layers_normalized_in_configure_model_are_refused(option, value):
    wn = WeightNormalization(**{option: value})
    with pytest.raises(RuntimeError, match=rf"in `configure_model`\) lack its options: `{option}` \(head\)"):
        trainer(max_steps=0, callbacks=[wn]).fit(LazyNormalizedHead(), RandomImages())
    if option != "mean_only_bn":  # given there, they hold
        model = AllInConfigureModel(**{option: value})
        trainer(max_steps=0, callbacks=[WeightNormalization(**{option: value})]).fit(model, RandomImages())
        wn_0 = model.net[0].parametrizations.weight
        assert wn_0.log_scale_factor == 3.0 if option == "log_scale_factor" else wn_0.paper_init


def test_a_log_scale_factor_that_layers_normalized_by_hand_lack_is_refused_with_the_call_that_gives_it():
    # the callback keeps a layer normalized by hand as it is: an option it would not apply is an error, not ignored
    model = ConvClassifier()
    apply_weight_norm(model)
    fix = re.escape("`lightning_wn.apply_weight_norm(model, ['net.0', 'net.2', 'net.6'], log_scale_factor=3.0)`")
    steps, training_step = [], model.training_step
    model.training_step = lambda *args: steps.append(1) or training_step(*args)
    callbacks = [WeightNormalization(log_scale_factor=3.0), LearningRateFinder(num_training_steps=5)]
    with pytest.raises(RuntimeError, match=rf"lack its options: `log_scale_factor` \(net.0, net.2, net.6\).* {fix}"):
        trainer(max_steps=0, callbacks=callbacks).fit(model, RandomImages())
    assert not steps  # refused in setup: before a tuner, which Lightning runs first at fit start, trains
    model = ConvClassifier()
    apply_weight_norm(model, ["net.0", "net.2", "net.6"], log_scale_factor=3.0)  # the fix
    trainer(max_steps=0, callbacks=[WeightNormalization(log_scale_factor=3.0)]).fit(model, RandomImages())
    assert model.net[0].parametrizations.weight.log_scale_factor == 3.0


@pytest.mark.parametrize("before", ["by hand", "validate"])
def test_paper_init_draws_v_in_a_fit_of_layers_normalized_before_and_never_initialized(before):
    model, data = Evaluated(), RandomImages(size=64)
    wn = WeightNormalization(init_samples=64, paper_init=True)
    if before == "by hand":
        apply_weight_norm(model)
    else:  # the callback normalized them there, without the draw: an evaluation is not a fit
        trainer(callbacks=[wn]).validate(model, data.train_dataloader())
    trainer(max_steps=0, callbacks=[wn]).fit(model, data)
    for name in wn.normalized:
        norm = model.get_submodule(name).parametrizations.weight
        assert norm.paper_init and abs(norm.original1.std().item() - 0.05) < 0.01, name  # N(0, 0.05), not the layer's
    standardized(model, data.x[:64], wn.normalized)


def test_paper_init_through_the_callback_draws_as_by_hand_bit_for_bit():
    base, data = ConvClassifier(), RandomImages(size=64)
    torch.nn.init.zeros_(base.net[6].weight)  # zero units: splitting them draws a direction from the same generator
    by_hand, fitted = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(1)
    apply_weight_norm(by_hand, paper_init=True)
    data_dependent_init(by_hand, data.x[:64])
    torch.manual_seed(1)
    trainer(max_steps=0, callbacks=[WeightNormalization(init_samples=64, paper_init=True)]).fit(fitted, data)
    for (name, expected), value in zip(by_hand.state_dict().items(), fitted.state_dict().values(), strict=True):
        assert torch.equal(value, expected), name


def test_a_run_of_layers_normalized_and_initialized_by_hand_resumes_with_paper_init(tmp_path):
    # the resumed model is normalized by hand again, not initialized (its checkpoint's weights are): no refusal
    data, saver = RandomImages(size=64), ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = ConvClassifier()
    apply_weight_norm(model)
    data_dependent_init(model, data.x[:64])
    callbacks = [WeightNormalization(paper_init=True), saver]
    trainer(max_steps=2, callbacks=callbacks, enable_checkpointing=True).fit(model, data)
    resumed = ConvClassifier()
    apply_weight_norm(resumed)
    trainer(max_steps=3, callbacks=[WeightNormalization(paper_init=True)]).fit(resumed, data, ckpt_path=tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    v = resumed.net[0].parametrizations.weight.original1
    assert not torch.equal(v, saved["net.0.parametrizations.weight.original1"])  # a step trained on from there
    torch.testing.assert_close(v, saved["net.0.parametrizations.weight.original1"], rtol=0, atol=0.05)


def test_patterns_may_name_layers_that_configure_model_builds():
    model = LazyHead()  # head: built plain in configure_model, after setup
    trainer(max_steps=0, callbacks=[WeightNormalization(exclude=["head"])]).fit(model, RandomImages())
    assert is_weight_normalized(model.net[0]) and not is_weight_normalized(model.head)
    model, wn = LazyNormalizedHead(), WeightNormalization(include=["head"])  # normalized there
    trainer(max_steps=0, callbacks=[wn]).fit(model, RandomImages())
    assert wn.normalized == ["head"] and not is_weight_normalized(model.net[0])
    with pytest.raises(ValueError, match="`include` pattern 'hed' matches no module"):  # once built, still checked
        trainer(max_steps=0, callbacks=[WeightNormalization(include=["hed"])]).fit(LazyNormalizedHead(), RandomImages())


def test_a_pattern_that_matches_nothing_is_reported_before_an_evaluation_loads_weights(tmp_path):
    class Validated(LazyNormalizedHead):
        def validation_step(self, batch, batch_idx):
            self.log("val/loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))

    data, saver = RandomImages(size=32), ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_steps=1, callbacks=[WeightNormalization(), saver], enable_checkpointing=True).fit(Validated(), data)
    wn, loader = WeightNormalization(include=["net.0", "hed"]), data.train_dataloader()
    with pytest.raises(ValueError, match="`include` pattern 'hed' matches no module"):  # not torch's missing keys
        trainer(callbacks=[wn]).validate(Validated(), loader, ckpt_path=tmp_path / "last.ckpt")

    class SpectralHead(LazyHead):  # a layer under torch's spectral norm, built after setup
        def configure_model(self):
            if self.head is None:
                self.head = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(5, 5))

    with pytest.warns(UserWarning, match="leaves 1 layers alone that torch already reparametrizes: `head`"):
        trainer(max_steps=0, callbacks=[WeightNormalization(init_samples=32)]).fit(SpectralHead(), RandomImages())


def test_training_lowers_loss_with_mean_only_bn_and_max_norm():
    seed_everything(0)
    model, data = ConvClassifier(), RandomImages(size=64)
    wn = WeightNormalization(init_samples=64, mean_only_bn=True, max_norm=2.0)
    trainer(max_epochs=1, callbacks=[wn]).fit(model, data)
    modules = dict(model.named_modules())
    for name in wn.normalized:
        assert isinstance(modules[name].mean_only_bn, MeanOnlyBatchNorm)
        v = modules[name].parametrizations.weight.original1
        assert v.flatten(1).norm(dim=1).max() <= 2.0 + 1e-5


def test_max_norm_keeps_gradient_accumulation_equal_to_the_larger_batch():
    # v is limited before the first batch too: else the first step summed gradients taken at two scales of v
    seed_everything(0)
    start, trained = ConvClassifier(), []
    apply_weight_norm(start)
    for batch_size, accumulate in ((32, 1), (16, 2)):
        model, wn = copy.deepcopy(start), WeightNormalization(data_init=False, max_norm=0.3)  # rows start at ~0.6
        trainer(max_steps=2, accumulate_grad_batches=accumulate, callbacks=[wn]).fit(model, RandomImages(batch_size=batch_size))
        trained.append(dict(model.named_parameters()))
    for name, param in trained[0].items():
        torch.testing.assert_close(param, trained[1][name], msg=name)


class CellModel(ConvClassifier):
    def __init__(self):
        super().__init__()
        self.cell, self.head = torch.nn.LSTMCell(5, 6), torch.nn.Linear(6, 5)

    def forward(self, x):
        return self.head(self.cell(self.net(x))[0])


def test_an_init_that_could_reach_only_recurrent_layers_is_refused_with_the_fix():
    wn = WeightNormalization(include=["LSTMCell"])  # the init is for networks without recursion
    with pytest.raises(ValueError, match=r"selects only recurrent layers \(cell\).*Set `data_init=False`"):
        trainer(max_steps=1, callbacks=[wn]).fit(CellModel(), RandomImages())
    model = CellModel()
    trainer(max_steps=1, callbacks=[WeightNormalization(include=["LSTMCell"], data_init=False)]).fit(model, RandomImages())
    assert is_weight_normalized(model.cell) and not is_weight_normalized(model.head)
    model, wn = CellModel(), WeightNormalization(include=["LSTMCell", "Linear"])  # the cell is left alone, the rest done
    for _ in range(2):  # a second fit finds the rest initialized, the cell as it was
        trainer(max_steps=1, callbacks=[wn]).fit(model, RandomImages())


def test_a_fit_that_trains_nothing_runs_no_init(monkeypatch):
    monkeypatch.setattr(callback_module, "data_dependent_init", lambda *a, **k: pytest.fail("no training data to read"))
    model, wn = ConvClassifier(), WeightNormalization()
    trainer(max_steps=2, limit_train_batches=0, callbacks=[wn]).fit(model, RandomImages())  # as Lightning does alone
    assert not wn.initialized and is_weight_normalized(model.net[0])


def test_mean_only_bn_output_is_standardized_after_init():
    seed_everything(0)
    model, data = ConvClassifier(), RandomImages()
    trainer(max_steps=0, callbacks=[WeightNormalization(init_samples=256, mean_only_bn=True)]).fit(model, data)
    standardized(model, data.x, ["net.0", "net.2", "net.6"], atol=2e-3)


def test_fold_on_fit_end_leaves_plain_layers_with_the_same_function():
    model, data = ConvClassifier(), RandomImages()
    seen = {}

    class Capture(Callback):
        def on_train_end(self, trainer, pl_module):
            with torch.no_grad():
                seen["out"] = pl_module(data.x[:8])

    trainer(max_steps=3, callbacks=[WeightNormalization(fold_on_fit_end=True), Capture()]).fit(model, data)
    assert not list(weight_normalized_modules(model))
    with torch.no_grad():
        torch.testing.assert_close(model(data.x[:8]), seen["out"])


def test_resume_continues_without_a_second_init(tmp_path, monkeypatch):
    calls = []
    real_init = callback_module.data_dependent_init
    monkeypatch.setattr(callback_module, "data_dependent_init", lambda *a, **k: calls.append(1) or real_init(*a, **k))

    def run(max_steps, ckpt_path=None, dirpath=None):
        seed_everything(0)
        model = ConvClassifier()
        callbacks = [WeightNormalization(init_samples=64)]
        if dirpath:
            callbacks.append(ModelCheckpoint(dirpath=dirpath, save_last=True, every_n_train_steps=1))
        trainer(max_steps=max_steps, callbacks=callbacks, enable_checkpointing=bool(dirpath)).fit(
            model, RandomImages(size=64, batch_size=16), ckpt_path=ckpt_path
        )
        return model

    straight = run(8)
    assert len(calls) == 1
    run(4, dirpath=tmp_path)  # one epoch is 4 steps: the resume starts on an epoch boundary
    resumed = run(8, ckpt_path="last", dirpath=tmp_path)
    assert len(calls) == 2  # the straight run and the first half; never the resumed half
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_a_run_fitted_without_the_init_resumes_without_it_where_the_init_is_then_asked_for(tmp_path, monkeypatch):
    data, saver = RandomImages(size=64, batch_size=16), ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_steps=2, callbacks=[WeightNormalization(data_init=False), saver], enable_checkpointing=True).fit(
        ConvClassifier(), data
    )
    monkeypatch.setattr(callback_module, "data_dependent_init", lambda *a, **k: pytest.fail("trained weights re-initialized"))
    wn = WeightNormalization(init_samples=64)  # data_init left at its default, True
    trainer(max_steps=3, callbacks=[wn]).fit(ConvClassifier(), data, ckpt_path=tmp_path / "last.ckpt")
    assert wn.initialized


def test_no_cache_outlives_a_fit_that_a_batch_start_hook_stopped():
    class Stops(ConvClassifier):
        def on_train_batch_start(self, batch, batch_idx):
            return -1 if batch_idx == 1 else None  # ends the epoch without that batch's end hooks

    model, x = Stops(), torch.randn(4, 3, 8, 8)
    trainer(max_epochs=1, callbacks=[WeightNormalization(init_samples=64)]).fit(model, RandomImages())
    layer = model.net[0]
    layer(x)
    g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
    g.data.mul_(2)  # a write only a cached() block misses: outside one, the next call sees it
    norm = torch.linalg.vector_norm(v, dim=(1, 2, 3), keepdim=True)
    expected = torch.nn.functional.conv2d(x, g * v / norm, layer.bias, padding=1)
    torch.testing.assert_close(layer(x), expected)


def test_second_fit_keeps_the_first_init(monkeypatch):
    model, data = ConvClassifier(), RandomImages()
    wn = WeightNormalization(init_samples=64)
    trainer(max_steps=2, callbacks=[wn]).fit(model, data)
    g = model.net[0].parametrizations.weight.original0.detach().clone()
    monkeypatch.setattr(callback_module, "data_dependent_init", lambda *a, **k: pytest.fail("init ran twice"))
    trainer(max_steps=2, callbacks=[wn]).fit(model, data)
    assert not torch.equal(g, model.net[0].parametrizations.weight.original0)  # trained on, not re-initialized


@pytest.mark.parametrize("before", ["fit", "by_hand"])
def test_a_new_callback_keeps_the_init_a_model_already_has(monkeypatch, before):
    model, data = ConvClassifier(), RandomImages()
    if before == "fit":  # a notebook's second Trainer, or a second stage, on the same model object
        trainer(max_steps=2, callbacks=[WeightNormalization(init_samples=64)]).fit(model, data)
    else:
        apply_weight_norm(model)
        data_dependent_init(model, data.x[:64])
    g = model.net[0].parametrizations.weight.original0.detach().clone()
    monkeypatch.setattr(callback_module, "data_dependent_init", lambda *a, **k: pytest.fail("init ran again"))
    wn = WeightNormalization(init_samples=64)
    trainer(max_steps=2, callbacks=[wn]).fit(model, data)
    assert wn.initialized and wn.state_dict()["initialized"]  # a checkpoint of this run resumes without an init
    assert not torch.equal(g, model.net[0].parametrizations.weight.original0)  # trained on, not re-initialized


@pytest.mark.parametrize("tuner", [None, "BatchSizeFinder"])
def test_a_callback_used_again_for_a_new_model_initializes_it(tuner):
    # one callback object for several runs (a sweep, a notebook loop): each new model gets its own init, also where a
    # tuner saves and restores the callback's state before the init
    from lightning.pytorch import callbacks

    wn, data = WeightNormalization(init_samples=100), RandomImages()
    for seed in (0, 1):
        seed_everything(seed)
        model = ConvClassifier(lr=0.0)  # a step leaves the init as it was
        tuners = [getattr(callbacks, tuner)(max_trials=2, steps_per_trial=1)] if tuner else []
        trainer(max_steps=0 if tuner is None else 1, callbacks=[wn, *tuners]).fit(model, data)
        assert wn.initialized
        if seed == 1:
            standardized(model, data.x[:100], wn.normalized)


@pytest.mark.parametrize("where", ["model", "datamodule"])
def test_the_init_sees_the_batches_as_training_steps_do(where):
    # pixels stored 0-255, scaled in `on_before_batch_transfer` (the datamodule's, where it has one, is Lightning's)
    class Scaled(ConvClassifier):
        def on_before_batch_transfer(self, batch, dataloader_idx):
            return batch[0] / 255, batch[1]

    class ScaledImages(RandomImages):
        on_before_batch_transfer = Scaled.on_before_batch_transfer

    model, data = (Scaled(), RandomImages()) if where == "model" else (ConvClassifier(), ScaledImages())
    data.x = data.x * 255
    wn = WeightNormalization(init_samples=100)
    trainer(max_steps=0, callbacks=[wn]).fit(model, data)
    standardized(model, data.x[:100] / 255, wn.normalized)


@pytest.mark.parametrize("frozen", [False, True])
def test_decaying_other_weights_and_no_g_or_v_is_a_choice_not_warned_about(frozen):
    model = DecayByName()  # net.6 left plain: its weight alone decayed, on purpose; or the normalized layers frozen
    model.decayed, model.rest = ("net.6.weight",), ("bias", "original0", "original1")
    if frozen:
        model.net[:6].requires_grad_(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wn = WeightNormalization(init_samples=32, exclude=["net.6"])
        trainer(max_steps=1, callbacks=[wn]).fit(model, RandomImages())
    assert not [w for w in caught if "replaced each layer's `weight`" in str(w.message)]


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):  # each worker its share
        info = torch.utils.data.get_worker_info()
        return iter(list(zip(self.x, self.y))[info.id :: info.num_workers])


def test_a_persistent_iterable_loader_warns_that_its_first_batch_is_trained_on_twice():
    # Lightning fetches a loader without a length one batch ahead, before the init reads and rewinds it
    data = RandomImages(size=64)
    loader = torch.utils.data.DataLoader(Stream(data.x, data.y), batch_size=8, num_workers=2, persistent_workers=True)
    with pytest.warns(UserWarning, match="first epoch trains on its first batch twice"):
        trainer(max_steps=1, callbacks=[WeightNormalization(init_samples=16)]).fit(ConvClassifier(), loader)


class DecayByName(ConvClassifier):
    decayed, rest = ("weight",), ("bias",)  # a weight-decay split by name: it misses g and v, which replaced `weight`

    def configure_optimizers(self):
        decay = [p for name, p in self.named_parameters() if name.endswith(self.decayed)]
        rest = [p for name, p in self.named_parameters() if name.endswith(self.rest)]
        return torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}])


@pytest.mark.parametrize(("decayed", "rest", "frozen", "warning"), [
    (("weight",), ("bias",), (), "no optimizer holds g or v of `net.0`, `net.2`, `net.6`, so they do not train"),
    (("weight",), ("bias",), ("net.0",), "no optimizer holds g or v of `net.2`, `net.6`,"),  # frozen: meant to stay out
    (("weight",), ("bias", "original0", "original1"), (), "a group has weight decay but holds no weight: g and v are in none"),
    (("weight", "original0", "original1"), ("bias",), (), None),
    (("original1",), ("bias", "original0"), (), None),  # v decayed, g not: a choice
])  # fmt: skip
def test_g_and_v_that_no_optimizer_holds_or_decays_where_others_are_are_warned_about(decayed, rest, frozen, warning):
    model = DecayByName()
    model.decayed, model.rest = decayed, rest
    for name in frozen:
        model.get_submodule(name).requires_grad_(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=1, callbacks=[WeightNormalization(init_samples=32)]).fit(model, RandomImages())
    warned = [str(w.message) for w in caught if "replaced each layer's `weight`" in str(w.message)]
    assert len(warned) == (warning is not None)
    assert warning is None or warning in warned[0]


@pytest.mark.parametrize("persistent_workers", [False, True])
def test_the_first_epoch_trains_on_every_example_the_init_read_too(persistent_workers):
    # persistent workers keep one iterator per loader, which the training loop holds too: the init must not use it up
    class Seen(ConvClassifier):
        def training_step(self, batch, batch_idx):
            self.ids.setdefault(self.current_epoch, []).extend(batch[2].tolist())
            return super().training_step(batch[:2], batch_idx)

    seed_everything(0)
    data, model = RandomImages(size=64), Seen()
    model.ids = {}
    dataset = torch.utils.data.TensorDataset(data.x, data.y, torch.arange(64))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2, persistent_workers=persistent_workers)
    trainer(max_epochs=2, callbacks=[WeightNormalization(init_samples=24)]).fit(model, loader)
    assert [sorted(ids) for ids in model.ids.values()] == [list(range(64))] * 2


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_the_init_runs_under_a_true_precision(precision):
    # the parameters are cast, and so must the init's inputs be, as the training loop casts each batch
    model, data, wn = ConvClassifier(), RandomImages(), WeightNormalization(init_samples=100)
    trainer(max_steps=0, callbacks=[wn], precision=precision).fit(model, data)
    assert model.net[0].parametrizations.weight.original1.dtype == {"64-true": torch.float64}.get(precision, torch.bfloat16)
    atol = 1e-3 if precision == "64-true" else 5e-2  # bf16 rounds g and the biases
    standardized(model.double(), data.x[:100].double(), wn.normalized, atol=atol)


def test_only_the_layers_without_an_init_are_initialized(monkeypatch):
    model, data = ConvClassifier(), RandomImages()
    apply_weight_norm(model)
    data_dependent_init(model, data.x[:64], modules=["net.0", "net.2"])
    kept = {n: p.detach().clone() for n, p in model.net[:3].named_parameters()}
    calls = []
    init = callback_module.data_dependent_init
    monkeypatch.setattr(callback_module, "data_dependent_init", lambda *a, **k: calls.append(k["modules"]) or init(*a, **k))
    trainer(max_steps=0, callbacks=[WeightNormalization(init_samples=64)]).fit(model, data)
    assert calls == [["net.6"]]
    for name, p in model.net[:3].named_parameters():
        torch.testing.assert_close(p, kept[name], msg=name)


def test_checkpoint_loads_into_the_plain_model_without_the_callback(tmp_path):
    seed_everything(0)
    model, data = ConvClassifier(), RandomImages()
    t = trainer(max_steps=5, callbacks=[WeightNormalization(init_samples=64)])
    t.fit(model, data)
    path = tmp_path / "wn.ckpt"
    t.save_checkpoint(path)
    model.eval()
    with torch.no_grad():
        expected = model(data.x)
    for loaded in (ConvClassifier.load_from_checkpoint(path), lightning_wn.load_from_checkpoint(ConvClassifier, path)):
        assert not list(weight_normalized_modules(loaded))
        assert sorted(loaded.state_dict()) == sorted(ConvClassifier().state_dict())
        with torch.no_grad():
            assert torch.equal(loaded.eval()(data.x), expected)


def test_fitting_a_model_from_load_from_checkpoint_keeps_the_trained_layers_and_initializes_new_ones(tmp_path):
    class NewHead(ConvClassifier):  # fine-tuning: layers the checkpoint does not hold (`strict=False`)
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.head = nn.Linear(5, 5)

        def forward(self, x):
            return self.head(super().forward(x))

        def on_load_checkpoint(self, checkpoint):  # and one it holds, but which is dropped to be trained anew
            super().on_load_checkpoint(checkpoint)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("net.6.")}

    seed_everything(0)
    t = trainer(max_steps=5, callbacks=[WeightNormalization(init_samples=64)])
    t.fit(ConvClassifier(), data := RandomImages())
    t.save_checkpoint(path := tmp_path / "wn.ckpt")
    loaded = lightning_wn.load_from_checkpoint(NewHead, path, strict=False)
    trained, record = copy.deepcopy(loaded.state_dict()), StateAtTrainStart()
    trainer(max_steps=1, callbacks=[wn := WeightNormalization(init_samples=64), record]).fit(loaded, data)
    for name, value in trained.items():  # the loaded weights, not ones initialized again
        if not name.startswith(("head.", "net.6.")):
            torch.testing.assert_close(lightning_wn.fold_state_dict(record.state)[name], value, msg=name)
    for new in ("head", "net.6"):
        assert new in wn.normalized and not torch.equal(record.state[f"{new}.bias"], trained[f"{new}.bias"]), new


class StateAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.state = copy.deepcopy(pl_module.state_dict())


def test_lightning_cli_configures_the_callback_from_yaml(tmp_path):
    config = tmp_path / "wn.yaml"
    config.write_text(
        """
trainer:
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_wn.WeightNormalization
      init_args:
        include: [Conv2d]
        init_samples: 64
        init_scale: 0.5
"""
    )
    cli = LightningCLI(
        ConvClassifier, RandomImages, args=["fit", "--config", str(config), "--trainer.fast_dev_run=true"]
    )
    wn = next(c for c in cli.trainer.callbacks if isinstance(c, WeightNormalization))
    assert wn.normalized == ["net.0", "net.2"] and wn.init_scale == 0.5 and wn.initialized


@pytest.mark.parametrize(
    "precision, dtype",
    [
        ("bf16-mixed", torch.bfloat16),
        # Lightning turns 16-mixed into bf16-mixed on CPU
        pytest.param("16-mixed", torch.float16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU")),
    ],
)
def test_mixed_precision_inits_under_autocast_and_keeps_float32_norms(precision, dtype):
    seed_everything(0)
    device = "cuda" if precision == "16-mixed" else "cpu"
    model, data = ConvClassifier(), RandomImages()
    seen = {}
    real = callback_module.data_dependent_init

    def spy(module, inputs, **kwargs):
        seen["autocast"] = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == dtype
        return real(module, inputs, **kwargs)

    callback_module.data_dependent_init, saved = spy, callback_module.data_dependent_init
    try:
        t = trainer(max_steps=3, precision=precision, accelerator=device, callbacks=[WeightNormalization(init_samples=64)])
        t.fit(model, data)
    finally:
        callback_module.data_dependent_init = saved
    assert seen["autocast"]
    for _, module in weight_normalized_modules(model):
        assert module.parametrizations.weight.original0.dtype == torch.float32
        with torch.autocast(device, dtype=dtype):
            assert module.weight.dtype == torch.float32  # w is cast at use, its norm is float32
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.xfail(
    torch.__version__ < "2.14", reason="torch 2.13's dynamo fails on Lightning's compiled training_step (self.log)"
)
def test_compiled_module_trains_and_matches_eager():
    seed_everything(0)
    model, data = ConvClassifier(), RandomImages()
    compiled = torch.compile(model, backend="aot_eager")
    trainer(max_steps=3, callbacks=[WeightNormalization(init_samples=64)]).fit(compiled, data)
    assert is_weight_normalized(model.net[0])
    x = data.x[:16]
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_deepcopy_and_pickle_of_a_normalized_lightning_module():
    model, data = ConvClassifier(), RandomImages()
    trainer(max_steps=2, callbacks=[WeightNormalization(init_samples=64)]).fit(model, data)
    x = data.x[:4]
    with torch.no_grad():
        expected = model(x)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(clone(x), expected)


def test_dict_batches_with_input_key():
    model, data = DictBatches(), RandomImages(as_dict=True)
    wn = WeightNormalization(init_samples=64, input_key="image")
    trainer(max_steps=0, callbacks=[wn]).fit(model, data)
    standardized(model, data.x[:64], wn.normalized)


def test_bad_arguments_fail_before_training():
    with pytest.raises(ValueError, match="`init_samples` must be a positive integer, got 0"):
        WeightNormalization(init_samples=0)
    with pytest.raises(ValueError, match="`init_scale` must be a positive number, got -1"):
        WeightNormalization(init_scale=-1)
    with pytest.raises(ValueError, match="`max_norm` must be a positive number, got 0"):
        WeightNormalization(max_norm=0)
    for option in ("max_norm", "init_scale", "log_scale_factor"):  # a number written as a string, as in Python code
        with pytest.raises(TypeError, match=f"`{option}` must be a number, got '1' \\(str\\)"):
            WeightNormalization(**{option: "1"})
    with pytest.raises(TypeError, match=r"`init_samples` must be an integer, got '500' \(str\)"):
        WeightNormalization(init_samples="500")
    with pytest.raises(ValueError, match="`paper_init`=True draws v from N.0, 0.05. for the data-dependent init"):
        WeightNormalization(paper_init=True, data_init=False)
    numpy_scalars = WeightNormalization(init_samples=np.int64(64), init_scale=np.float32(0.5), max_norm=np.float32(2))
    assert (numpy_scalars.init_samples, numpy_scalars.init_scale, numpy_scalars.max_norm) == (64, 0.5, 2.0)
    with pytest.raises(TypeError, match="`include` must be a list of names or patterns, got the string 'net.0'"):
        WeightNormalization(include="net.0")
    for option in ({"mean_only_bn": True}, {"max_norm": 2.0}, {"log_scale_factor": 3.0}, {"paper_init": True}):
        (name, value), = option.items()
        with pytest.raises(ValueError, match=f"`{name}`={value!r} needs weight norm, but `weight_norm`=False"):
            WeightNormalization(weight_norm=False, **option)

    class NoTraining(ConvClassifier):
        def training_step(self, batch, batch_idx):
            pytest.fail("training started despite a bad configuration")

    cases = [
        (WeightNormalization(include=["decoder.*"]), RandomImages(), "pattern 'decoder.*' matches no module"),
        (WeightNormalization(include=["Embedding"]), RandomImages(), "names `Embedding`, which weight norm does not"),
        (WeightNormalization(exclude=["Conv2d", "Linear"]), RandomImages(), "No module of NoTraining is selected"),
        (WeightNormalization(input_key="image"), RandomImages(), r"cannot find the model input at `input_key`='image'"),
        (WeightNormalization(), RandomImages(as_dict=True), r"cannot find the model input .* \(keys: \['image', 'label'\]\)"
         r".*or define `data_init_inputs\(batch\)` on the LightningModule"),
    ]
    for wn, data, message in cases:
        with pytest.raises(ValueError, match=message):
            trainer(max_steps=2, callbacks=[wn]).fit(NoTraining(), data)


def test_sharding_strategies_are_refused():
    class MyFSDP(FSDPStrategy):
        pass

    for strategy in (FSDPStrategy(), MyFSDP()):
        with pytest.raises(RuntimeError, match=f"does not support `{type(strategy).__name__}`.*strategy='ddp'"):
            WeightNormalization().setup(SimpleNamespace(strategy=strategy), ConvClassifier(), "fit")


def test_a_layer_normalized_by_hand_keeps_its_parameters_and_the_rest_are_normalized_too():
    model = ConvClassifier()
    lightning_wn.weight_norm(model.net[0])
    g = model.net[0].parametrizations.weight.original0
    wn = WeightNormalization(include=["Conv2d", "Linear"], mean_only_bn=True, init_samples=64)
    trainer(max_steps=0, callbacks=[wn]).fit(model, RandomImages())
    assert [name for name, _ in weight_normalized_modules(model)] == wn.normalized == ["net.0", "net.2", "net.6"]
    assert model.net[0].parametrizations.weight.original0 is g
    assert all(isinstance(model.net[i].mean_only_bn, MeanOnlyBatchNorm) for i in (0, 2, 6))


@pytest.mark.parametrize("tuner", ["BatchSizeFinder", "LearningRateFinder"])
@pytest.mark.parametrize("tuner_first", [True, False], ids=["tuner-first", "tuner-last"])
def test_the_init_runs_with_a_tuner_in_either_order(tuner, tuner_first):
    from lightning.pytorch import callbacks

    seed_everything(0)
    options = {"max_trials": 2, "steps_per_trial": 1} if tuner == "BatchSizeFinder" else {"num_training_steps": 3}
    model, data, wn = ConvClassifier(), RandomImages(), WeightNormalization(init_samples=64)
    found = getattr(callbacks, tuner)(**options)
    t = trainer(max_steps=1, callbacks=[found, wn] if tuner_first else [wn, found])
    t.fit(model, data)
    assert wn.initialized
    with torch.no_grad():  # the init's statistics, before the one training step
        first = model.net[0](data.x[:64])
    assert first.mean((0, 2, 3)).abs().max() < 0.3 and (first.std((0, 2, 3)) - 1).abs().max() < 0.3


def test_a_checkpoint_without_the_callbacks_state_keeps_its_weights(tmp_path, monkeypatch):
    model, data = ConvClassifier(), RandomImages()
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_steps=2, callbacks=[WeightNormalization(init_samples=64), saver], enable_checkpointing=True).fit(model, data)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    del saved["callbacks"]["WeightNormalization"]  # as if written by a run without the callback
    torch.save(saved, tmp_path / "last.ckpt")

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    monkeypatch.setattr(callback_module, "data_dependent_init", lambda *a, **k: pytest.fail("trained weights re-initialized"))
    probe, resumed = Probe(), ConvClassifier()
    trainer(max_steps=3, callbacks=[WeightNormalization(init_samples=64), probe]).fit(resumed, data, ckpt_path=tmp_path / "last.ckpt")
    for name, value in saved["state_dict"].items():
        assert torch.equal(probe.state[name], value), name


class NamedAdam(ConvClassifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.named_parameters(), lr=self.hparams.lr)  # param groups keep "param_names"


@pytest.mark.parametrize("model_class", [ConvClassifier, NamedAdam])
def test_a_run_trained_without_weight_norm_resumes_with_it(tmp_path, monkeypatch, model_class):
    seed_everything(0)
    plain, data = model_class(), RandomImages(size=64, batch_size=16)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_steps=4, callbacks=[saver], enable_checkpointing=True).fit(plain, data)  # one epoch, no weight norm
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert "net.0.weight" in saved["state_dict"] and "WeightNormalization" not in saved["callbacks"]

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            self.step = trainer.global_step
            (optimizer,) = trainer.optimizers
            self.optimizer_state, self.lr = dict(optimizer.state), optimizer.param_groups[0]["lr"]
            self.param_names = optimizer.param_groups[0].get("param_names")
            with torch.no_grad():
                self.out = pl_module(data.x)

    monkeypatch.setattr(callback_module, "data_dependent_init", lambda *a, **k: pytest.fail("trained weights re-initialized"))
    probe, resumed = Probe(), model_class(lr=0.5)  # a wrong lr: the saved one must be restored
    with pytest.warns(UserWarning, match="trained without weight norm.*restarts from zero"):
        trainer(max_steps=6, callbacks=[WeightNormalization(init_samples=64), probe]).fit(
            resumed, data, ckpt_path=tmp_path / "last.ckpt"
        )
    assert [name for name, _ in weight_normalized_modules(resumed)] == ["net.0", "net.2", "net.6"]
    with torch.no_grad():
        torch.testing.assert_close(probe.out, plain(data.x), rtol=0, atol=1e-5)  # the plain run's function
    assert probe.step == 4 and probe.optimizer_state == {}  # the loop resumed, Adam's moments restarted
    assert probe.lr == saved["optimizer_states"][0]["param_groups"][0]["lr"] == 1e-2
    if model_class is NamedAdam:  # the names of g and v, not the saved plain weights'
        assert probe.param_names == [name for name, _ in resumed.named_parameters()]
        assert "net.0.parametrizations.weight.original1" in probe.param_names
    assert not torch.equal(resumed.net[0].weight, plain.net[0].weight)  # and it trained on, two steps


@pytest.mark.parametrize(("saved_c", "resumed_c"), [(None, 3.0), (2.0, None), (2.0, 5.0)])
def test_a_run_resumed_with_another_log_scale_factor_restarts_the_optimizer_state(tmp_path, saved_c, resumed_c):
    # Adam's moments of g (or of s under another c) are not moments of this run's parameter
    seed_everything(0)
    data, saver = RandomImages(size=64, batch_size=16), ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = ConvClassifier()
    fit = trainer(max_steps=2, callbacks=[WeightNormalization(log_scale_factor=saved_c), saver], enable_checkpointing=True)
    fit.fit(model, data)
    with torch.no_grad():
        expected = model(data.x)

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = dict(trainer.optimizers[0].state)
            with torch.no_grad():
                self.out = pl_module(data.x)

    probe, resumed = Probe(), ConvClassifier()
    form = {None: "g", 2.0: "s with c = 2", 3.0: "s with c = 3", 5.0: "s with c = 5"}
    learns = f"saved `net.0.parametrizations.weight` as {form[saved_c]}, which this run learns as {form[resumed_c]}"
    with pytest.warns(UserWarning, match=f"{learns}.*restarts"):
        trainer(max_steps=3, callbacks=[WeightNormalization(log_scale_factor=resumed_c), probe]).fit(
            resumed, data, ckpt_path=tmp_path / "last.ckpt"
        )
    assert probe.state == {}
    torch.testing.assert_close(probe.out, expected, rtol=0, atol=1e-5)  # the saved function, in the new form


class HandNormalized(ConvClassifier):
    def __init__(self, c=None):
        super().__init__()
        apply_weight_norm(self, log_scale_factor=c)  # by hand: the callback keeps these layers as they are


def fit_then_resume(tmp_path, first, second):
    """Fit ``first`` (model, callback, precision) two steps, then resume ``second`` from its last checkpoint: the
    optimizer state the resumed run starts with, and the warnings that it restarted."""
    seed_everything(0)
    data, saver = RandomImages(size=64, batch_size=16), ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model, callback, precision = first
    trainer(max_steps=2, precision=precision, callbacks=[callback, saver], enable_checkpointing=True).fit(model, data)

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = dict(trainer.optimizers[0].state)

    probe, (model, callback, precision) = Probe(), second
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resume = trainer(max_steps=3, precision=precision, callbacks=[callback, probe])
        resume.fit(model, data, ckpt_path=tmp_path / "last.ckpt")
    return probe.state, [str(w.message) for w in caught if "optimizer state restarts from zero" in str(w.message)]


@pytest.mark.parametrize(("saved", "resumed", "restarts"), [
    ((2.0, None), (3.0, None), True),  # the layers' own c changed, the callback's option never was set
    ((2.0, None), (2.0, None), False),  # the same form
    ((None, False), (None, True), True),  # a run of init only (plain weights), resumed with weight norm
])  # fmt: skip
def test_the_optimizer_state_restarts_exactly_where_a_layer_learns_in_another_form(tmp_path, saved, resumed, restarts):
    def run(c, option):  # the callback's weight_norm as a bool, or its log_scale_factor
        model = ConvClassifier() if isinstance(option, bool) else HandNormalized(c)
        callback = WeightNormalization(**{"weight_norm" if isinstance(option, bool) else "log_scale_factor": option})
        return model, callback, "32-true"

    state, warned = fit_then_resume(tmp_path, run(*saved), run(*resumed))
    assert len(warned) == restarts and (state == {}) == restarts


class WholeTensorNorm(ConvClassifier):  # one g for the whole first weight, as torch's dim=None
    def __init__(self, c=None):
        super().__init__()
        weight_norm(self.net[0], dim=None)


@pytest.mark.parametrize(("saved", "resumed", "restarts"), [
    (("bf16-true", HandNormalized, 0.1), ("bf16-true", HandNormalized, 0.1), False),  # c = 0.1 held in bfloat16
    (("64-true", HandNormalized, 0.1), ("64-true", HandNormalized, 0.1), False),  # float32's 0.1, widened
    (("32-true", WholeTensorNorm, None), ("32-true", HandNormalized, None), True),  # g along another axis
])  # fmt: skip
def test_the_optimizer_state_restarts_where_g_changed_form_and_only_there(tmp_path, saved, resumed, restarts):
    def run(precision, model_class, c):
        return model_class(c), WeightNormalization(data_init=False), precision

    state, warned = fit_then_resume(tmp_path, run(*saved), run(*resumed))
    assert len(warned) == restarts and (state == {}) == restarts
    assert not restarts or "with g of shape (), which this run keeps as (8, 1, 1, 1)" in warned[0]


def test_validating_a_run_trained_without_weight_norm_then_fitting_leaves_the_fit_alone(tmp_path):
    class Validated(ConvClassifier):
        def validation_step(self, batch, batch_idx):
            self.log("val/loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))

    seed_everything(0)
    plain, data = Validated(), RandomImages(size=64, batch_size=16)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_steps=4, callbacks=[saver], enable_checkpointing=True).fit(plain, data)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(plain(data.x), data.y).item()
    wn, model, loader = WeightNormalization(init_samples=64), Validated(), data.train_dataloader()
    (metrics,) = trainer(callbacks=[wn]).validate(model, loader, ckpt_path=tmp_path / "last.ckpt")
    assert metrics["val/loss"] == pytest.approx(expected, abs=1e-5)  # the plain weights, loaded as g and v
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=1, callbacks=[wn]).fit(model, data)  # no checkpoint: no optimizer state to restart
    assert not [w for w in caught if "trained without weight norm" in str(w.message)]


class Evaluated(ConvClassifier):
    def validation_step(self, batch, batch_idx):
        self.log("val/loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))


def test_fold_on_fit_end_folds_only_the_layers_it_selects_and_the_checkpoint_evaluates(tmp_path):
    # an excluded layer normalized by hand stays so: the evaluation normalizes only the selected ones again
    model, data, saver = Evaluated(), RandomImages(size=64), ModelCheckpoint(dirpath=tmp_path, save_last=True)
    weight_norm(model.net[6])
    wn = WeightNormalization(exclude=["net.6"], fold_on_fit_end=True, init_samples=32)
    trainer(max_steps=2, callbacks=[wn, saver], enable_checkpointing=True).fit(model, data)
    assert [name for name, _ in weight_normalized_modules(model)] == ["net.6"]
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(data.x), data.y).item()
    wn, loader = WeightNormalization(exclude=["net.6"], fold_on_fit_end=True), data.train_dataloader()
    (metrics,) = trainer(callbacks=[wn]).validate(model, loader, ckpt_path=tmp_path / "last.ckpt")
    assert metrics["val/loss"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("builds", [False, True], ids=["init", "configure_model"])
def test_a_warning_about_layers_under_torchs_norms_is_given_once_per_fit(builds):
    class Built(ConvClassifier):
        def configure_model(self):  # builds a layer: setup and on_fit_start see different models
            self.extra = self.extra if hasattr(self, "extra") else torch.nn.Identity()

    model = Built() if builds else ConvClassifier()
    model.net[6] = torch.nn.utils.parametrizations.weight_norm(model.net[6])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=0, callbacks=[WeightNormalization(init_samples=32)]).fit(model, RandomImages())
    assert len([w for w in caught if "torch already reparametrizes: `net.6`" in str(w.message)]) == 1


def test_evaluating_or_fitting_again_a_folded_model_keeps_its_function_and_its_folding():
    # with the paper's re-draw of v: a later validate has nothing to load and must leave the model as fit left it,
    # and a second fit must neither re-draw nor re-initialize layers that were initialized and trained
    seed_everything(0)
    model, data = Evaluated(), RandomImages(size=64, batch_size=16)
    t = trainer(max_steps=4, callbacks=[WeightNormalization(init_samples=64, paper_init=True, fold_on_fit_end=True)])
    t.fit(model, data)
    with torch.no_grad():
        expected = model(data.x)
    params = {name: id(p) for name, p in model.named_parameters()}
    t.validate(model, data.train_dataloader())
    assert {name: id(p) for name, p in model.named_parameters()} == params  # still folded, the very tensors
    model.hparams.lr = 0.0  # a second fit that changes nothing
    trainer(max_steps=1, callbacks=[WeightNormalization(init_samples=64, paper_init=True, fold_on_fit_end=True)]).fit(
        model, data
    )
    with torch.no_grad():
        torch.testing.assert_close(model(data.x), expected, rtol=1e-5, atol=1e-5)


def test_weights_loaded_to_evaluate_are_kept_by_a_later_fit(tmp_path, monkeypatch):
    data, saver = RandomImages(size=64, batch_size=16), ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_steps=2, callbacks=[WeightNormalization(init_samples=64), saver], enable_checkpointing=True).fit(
        Evaluated(), data
    )
    model, wn = Evaluated(), WeightNormalization(init_samples=64)
    trainer(callbacks=[wn]).validate(model, data.train_dataloader(), ckpt_path=tmp_path / "last.ckpt")
    monkeypatch.setattr(callback_module, "data_dependent_init", lambda *a, **k: pytest.fail("loaded weights re-initialized"))
    trainer(max_steps=1, callbacks=[wn]).fit(model, data)


def test_a_whole_fit_in_a_process_of_its_own_is_not_refused():
    # a sweep's worker that got the callback pickled runs the whole fit there, on one device: nothing to hand back
    wn = WeightNormalization(init_samples=100)
    wn._pid = -1  # built in another process
    model, data = ConvClassifier(), RandomImages()
    trainer(max_steps=0, callbacks=[wn]).fit(model, data)
    standardized(model, data.x[:100], wn.normalized)


@pytest.mark.slow
def test_a_strategy_that_starts_processes_refuses_changes_it_cannot_hand_back():
    # ddp_spawn loads the trained state dict into the main process's model with strict=False: g and v of layers
    # normalized in the started processes would be dropped, and the model would come back untrained
    model, data = ConvClassifier(), RandomImages(size=64)
    spawned = dict(max_steps=2, devices=2, strategy="ddp_spawn")
    fix = re.escape("`lightning_wn.apply_weight_norm(model, [...], log_scale_factor=2.0)`, then")
    with pytest.raises(Exception, match=rf"runs in a process Lightning started .* weight norm on plain layers.*{fix}"):
        trainer(callbacks=[WeightNormalization(init_samples=64, log_scale_factor=2.0)], **spawned).fit(model, data)
    apply_weight_norm(model)  # the fix the error names: normalized and initialized in the main process
    data_dependent_init(model, data.x[:64])
    with pytest.raises(Exception, match="`fold_on_fit_end` would fold the layers in a process Lightning started"):
        trainer(callbacks=[WeightNormalization(fold_on_fit_end=True)], **spawned).fit(model, data)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer(callbacks=[WeightNormalization(init_samples=64)], **spawned).fit(model, data)
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())  # trained, handed back


@pytest.mark.slow
def test_ddp_ranks_end_bitwise_identical_and_the_all_reduce_is_why(tmp_path):
    results = {}
    for mode in ("sync", "no-sync"):
        out = tmp_path / mode
        out.mkdir()
        command = [sys.executable, str(HERE / "ddp_fit.py"), str(out)] + (["--no-sync"] if mode == "no-sync" else [])
        subprocess.run(command, check=True, cwd=tmp_path, timeout=300)
        results[mode] = {tag: [torch.load(out / f"{tag}_rank{r}.pt") for r in (0, 1)] for tag in ("init", "trained")}
    for tag in ("init", "trained"):
        rank0, rank1 = results["sync"][tag]
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), (tag, name)
    rank0, rank1 = results["no-sync"]["init"]
    assert any(not torch.equal(rank0[n], rank1[n]) for n in rank0)
