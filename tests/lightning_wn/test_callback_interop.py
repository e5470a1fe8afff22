"""WeightNormalization next to Lightning's weight averaging and pruning callbacks, and models with several inputs."""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, seed_everything
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, ModelPruning, StochasticWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_wn import WeightNormalization, is_weight_normalized

sys.path.insert(0, str(Path(__file__).parent))
from lit_models import ConvClassifier, LazyNormalizedHead, RandomImages, trainer  # noqa: E402


def parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


class Record(Callback):
    """The model's parameters after every optimizer step, and at the end of every epoch."""

    def __init__(self) -> None:
        self.steps, self.epochs = [], []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.steps.append(parameters(pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append(parameters(pl_module))


def assert_same_parameters(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=1e-6, msg=name)


NORMALIZED_KEYS = {
    ConvClassifier: [f"net.{i}.parametrizations.weight.original{j}" for i in (0, 2, 6) for j in (0, 1)],
    LazyNormalizedHead: [f"{m}.parametrizations.weight.original{j}" for m in ("net.0", "net.2", "net.6", "head") for j in (0, 1)],
}


# --- weight averaging ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("averaging", [EMAWeightAveraging, StochasticWeightAveraging])
def test_an_averaging_callback_listed_before_weight_normalization_is_refused_at_setup(averaging):
    class NoTraining(ConvClassifier):
        def training_step(self, batch, batch_idx):
            pytest.fail("training started although the average would be of plain layers")

    average = averaging(decay=0.6) if averaging is EMAWeightAveraging else averaging(swa_lrs=1e-2)
    with pytest.raises(RuntimeError, match=f"{averaging.__name__} is listed before WeightNormalization.*List WeightNormalization first"):
        trainer(max_steps=1, callbacks=[average, WeightNormalization(init_samples=32)]).fit(NoTraining(), RandomImages())


@pytest.mark.parametrize("model_class", [ConvClassifier, LazyNormalizedHead])
def test_ema_averages_the_normalized_model(model_class):
    seed_everything(0)
    decay = 0.6  # far from 1, so that the average is far from the last step's parameters
    model, ema, record = model_class(), EMAWeightAveraging(decay=decay), Record()
    wn = WeightNormalization(init_samples=32)
    callbacks = [wn, ema, record]
    trainer(max_steps=5, callbacks=callbacks).fit(model, RandomImages(size=80, batch_size=16))

    averaged = ema._average_model.module
    assert all(is_weight_normalized(averaged.get_submodule(name)) for name in wn.normalized)
    assert set(NORMALIZED_KEYS[model_class]) <= set(averaged.state_dict())
    # torch's EMA: the first update copies, each later one is decay * average + (1 - decay) * current
    expected = record.steps[0]
    for step in record.steps[1:]:
        expected = {name: decay * expected[name] + (1 - decay) * step[name] for name in step}
    assert len(record.steps) == 5 and ema._average_model.n_averaged.item() == 5
    assert_same_parameters(parameters(averaged), expected)
    assert_same_parameters(parameters(model), expected)  # Lightning puts the average into the model when fit ends
    assert any((record.steps[-1][n] - expected[n]).abs().max() > 1e-3 for n in expected)  # so this says something



@pytest.mark.parametrize("start", [None, 3])
def test_an_average_that_starts_after_the_first_step_is_warned_to_hold_the_layers_before_the_init(start):
    # EMA copies the model in its setup, before the init: it evaluates that copy until its first update, and puts it
    # into the model at the end of a fit that stops before one
    ema = EMAWeightAveraging(decay=0.6, update_starting_at_step=start)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=2, callbacks=[WeightNormalization(init_samples=32), ema]).fit(ConvClassifier(), RandomImages())
    warned = [str(w.message) for w in caught if "copied the model in its `setup`" in str(w.message)]
    assert warned == ([] if start is None else [(
        "WeightNormalization: EMAWeightAveraging copied the model in its `setup`, before the data-dependent init, and "
        "does not update its average at the first step: until its first update, a validation evaluates (and a fit that "
        "ends puts back) the layers as they were before the init. Where that matters, normalize and initialize before "
        "`fit`: `lightning_wn.apply_weight_norm(model, [...])`, then `lightning_wn.data_dependent_init(model, batch)`.")])


class DrawsAfterValidation(ConvClassifier):
    """Like a model that draws samples in ``on_validation_epoch_end``: a no-grad forward after the average is swapped out."""

    def validation_step(self, batch, batch_idx) -> None:
        self(batch[0])

    def on_validation_epoch_end(self) -> None:
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            self.drawn = (self(x), copy.deepcopy(self)(x))  # a copy caches nothing: w fresh from g and v


def test_no_cached_weight_outlives_the_averaging_callbacks_swaps():
    # EMAWeightAveraging swaps weights through `param.data`, unseen by version counters: no cache may span a swap
    seed_everything(0)
    model, ema, wn = DrawsAfterValidation(), EMAWeightAveraging(decay=0.6), WeightNormalization(init_samples=32)
    callbacks = [wn, ema]
    trainer(max_steps=6, val_check_interval=3, callbacks=callbacks).fit(
        model, train_dataloaders=RandomImages(size=48, batch_size=16).train_dataloader(),
        val_dataloaders=RandomImages(size=16, batch_size=16).train_dataloader(),
    )
    drawn, fresh = model.drawn
    torch.testing.assert_close(drawn, fresh, rtol=0, atol=0)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():  # after fit: the average, copied in through `.data` as well
        torch.testing.assert_close(model(x), copy.deepcopy(model)(x), rtol=0, atol=0)


@pytest.mark.parametrize("model_class", [ConvClassifier])  # SWA copies the model before configure_model builds layers
def test_swa_averages_the_normalized_model(model_class):
    seed_everything(0)
    # 4 epochs, SWA from the 2nd: it averages the parameters at the starts of epochs 1, 2 and 3 (0-based),
    # the ends of epochs 0, 1 and 2, and puts that average into the model at the end of the last epoch
    model, record = model_class(), Record()
    swa = StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=2)
    wn = WeightNormalization(init_samples=32)
    callbacks = [wn, swa, record]
    trainer(max_epochs=4, callbacks=callbacks).fit(model, RandomImages(size=32, batch_size=16))

    assert all(is_weight_normalized(swa._average_model.get_submodule(name)) for name in wn.normalized)
    assert set(NORMALIZED_KEYS[model_class]) <= set(swa._average_model.state_dict())
    assert len(record.epochs) == 4 and swa.n_averaged.item() == 3
    expected = {name: torch.stack([epoch[name] for epoch in record.epochs[:3]]).mean(0) for name in record.epochs[0]}
    assert_same_parameters(parameters(swa._average_model), expected)
    assert_same_parameters(parameters(model), expected)
    assert any((record.epochs[-1][n] - expected[n]).abs().max() > 1e-3 for n in expected)


# --- pruning ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pruning_first", [True, False], ids=["pruning-first", "weight-norm-first"])
@pytest.mark.parametrize("targets", ["every-weight", "a-normalized-layer", "an-excluded-layer"])
def test_pruning_beside_weight_norm_is_refused_at_setup(pruning_first, targets):
    """Which layers ModelPruning prunes is its private state: beside a normalizing WeightNormalization it is
    refused outright, rather than let it skip the normalized layers silently or fail after an epoch."""

    class NoTraining(ConvClassifier):
        def training_step(self, batch, batch_idx):
            pytest.fail("training started although pruning cannot work")

    model = NoTraining()
    chosen = {"every-weight": None, "a-normalized-layer": [(model.net[2], "weight")], "an-excluded-layer": [(model.net[6], "weight")]}
    pruning = ModelPruning("l1_unstructured", parameters_to_prune=chosen[targets], amount=0.5)
    wn = WeightNormalization(init_samples=32, exclude=["net.6"])
    with pytest.raises(RuntimeError, match=r"ModelPruning cannot prune weight-normalized layers.*fold_on_fit_end=True"):
        trainer(max_epochs=1, callbacks=[pruning, wn] if pruning_first else [wn, pruning]).fit(model, RandomImages())


def test_pruning_works_beside_a_weight_normalization_that_only_initializes():
    seed_everything(0)
    model = ConvClassifier()
    pruning = ModelPruning("l1_unstructured", parameters_to_prune=[(model.net[6], "weight")], amount=0.5,
                           apply_pruning=lambda epoch: epoch == 0, use_lottery_ticket_hypothesis=False)  # fmt: skip
    wn = WeightNormalization(weight_norm=False, init_samples=32)
    trainer(max_epochs=2, limit_train_batches=3, callbacks=[wn, pruning]).fit(model, RandomImages())
    weight = model.net[6].weight
    assert int((weight == 0).sum()) == weight.numel() // 2 == 80  # l1_unstructured, amount=0.5 of 5x32 weights


# --- several model inputs -----------------------------------------------------------------------------------------


class Conditional(LightningModule):
    """A conditional model in the manner of vocoders: a mel spectrogram and noise, joined inside."""

    def __init__(self) -> None:
        super().__init__()
        self.mel = nn.Conv1d(4, 8, 3, padding=1)
        self.noise = nn.Conv1d(2, 8, 1)
        self.out = nn.Conv1d(8, 1, 3, padding=1)

    def forward(self, mel: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mel(mel) + self.noise(noise)))

    def training_step(self, batch, batch_idx):
        mel, noise, target = (batch["mel"], batch["noise"], batch["target"]) if isinstance(batch, dict) else batch
        return nn.functional.mse_loss(self(mel, noise), target)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class ConditionalByHook(Conditional):
    def data_init_inputs(self, batch):
        return {"noise": batch["noise"], "mel": batch["mel"]}  # keywords, in an order of their own


def conditional_data(as_dict: bool, size: int = 96) -> tuple[DataLoader, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "mel": torch.randn(size, 4, 16, generator=generator) * 3 + 1,
        "noise": torch.rand(size, 2, 16, generator=generator) * 5,  # another scale and mean than mel
        "target": torch.randn(size, 1, 16, generator=generator),
    }
    if as_dict:
        return DataLoader([{k: t[i] for k, t in tensors.items()} for i in range(size)], batch_size=32), tensors
    return DataLoader(TensorDataset(*tensors.values()), batch_size=32), tensors


def assert_standardized(model: nn.Module, names: list[str], *inputs: torch.Tensor) -> None:
    """Each unit's output (the pre-activation) of each named layer has mean 0 and std 1 on ``inputs``."""
    outputs = {}
    modules = [model.get_submodule(name) for name in names]
    handles = [m.register_forward_hook(lambda m, a, o, n=n: outputs.setdefault(n, o)) for m, n in zip(modules, names)]
    with torch.no_grad():
        model(*inputs)
    for handle in handles:
        handle.remove()
    assert sorted(outputs) == sorted(names)
    for name, out in outputs.items():
        mean, std = out.double().mean((0, 2)), out.double().std((0, 2), unbiased=False)
        assert mean.abs().max() < 1e-3 and (std - 1).abs().max() < 1e-3, (name, mean, std)


@pytest.mark.parametrize(
    "model_class, as_dict, input_key",
    [(Conditional, True, ["mel", "noise"]), (Conditional, False, [0, 1]), (ConditionalByHook, True, None)],
    ids=["dict-keys", "tuple-indices", "module-hook"],
)
def test_several_inputs_reach_forward_and_every_unit_starts_standardized(model_class, as_dict, input_key):
    seed_everything(0)
    model = model_class()
    loader, tensors = conditional_data(as_dict)
    wn = WeightNormalization(init_samples=64, input_key=input_key)  # two batches of 32
    trainer(max_steps=0, callbacks=[wn]).fit(model, loader)
    assert wn.normalized == ["mel", "noise", "out"] and wn.initialized
    assert_standardized(model, wn.normalized, tensors["mel"][:64], tensors["noise"][:64])


class WholeBatch(Conditional):
    """A forward that takes the whole dict batch, as many models do: ``data_init_inputs`` passes it on."""

    def forward(self, batch: dict) -> torch.Tensor:
        return super().forward(batch["mel"], batch["noise"])

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self(batch), batch["target"])

    def data_init_inputs(self, batch):
        return (batch,)  # forward(batch): a tuple of one dict


def test_a_forward_that_takes_the_whole_dict_batch_is_initialized_on_it():
    seed_everything(0)
    model, (loader, tensors) = WholeBatch(), conditional_data(True)
    wn = WeightNormalization(init_samples=64)  # two batches of 32, joined key by key
    trainer(max_steps=0, callbacks=[wn]).fit(model, loader)
    assert wn.initialized and wn.normalized == ["mel", "noise", "out"]
    assert_standardized(model, wn.normalized, {"mel": tensors["mel"][:64], "noise": tensors["noise"][:64]})


def test_joined_init_inputs_keep_their_containers():
    from collections import OrderedDict, defaultdict, namedtuple

    from lightning_wn.init_inputs import first_examples

    Pair = namedtuple("Pair", "x context")
    batch = (Pair(torch.ones(4, 2), [torch.zeros(4), torch.zeros(4, 3)]), OrderedDict(y=torch.ones(4)))
    (pair, extra), count = first_examples([batch] * 3, 10, "the loader")
    assert count == 10 and type(pair) is Pair and type(pair.context) is list and type(extra) is OrderedDict
    assert pair.x.shape == (10, 2) and pair.context[1].shape == (10, 3) and extra["y"].shape == (10,)
    (joined, _) = first_examples([defaultdict(list, x=torch.ones(4, 2))] * 3, 10, "the loader")
    assert type(joined) is defaultdict and joined.default_factory is list and joined["x"].shape == (10, 2)
    first, later = {"x": torch.ones(4, 2)}, {"x": torch.ones(4, 2), "mask": torch.ones(4, 7)}
    (joined, _) = first_examples([first, later, later], 10, "the loader")  # the first batch's entries are joined
    assert list(joined) == ["x"] and joined["x"].shape == (10, 2)
    with pytest.raises(ValueError, match="the loader gave a batch without entry 'mask', which the first batch had"):
        first_examples([later, first], 10, "the loader")


def test_bad_model_inputs_are_clear_errors():
    for bad in ([], True, 1.5, ["mel", None]):
        with pytest.raises(TypeError, match="`input_key` must be an index, a key, or a non-empty list of them"):
            WeightNormalization(input_key=bad)

    class Unequal(Conditional):
        def data_init_inputs(self, batch):
            return batch["mel"], batch["noise"][:-1]

    class NotATensor(Conditional):
        def data_init_inputs(self, batch):
            return batch["mel"], 0.5

    cases = [
        (Unequal(), None, "different batch sizes \\{0: 32, 1: 31\\}"),
        (NotATensor(), None, "`NotATensor.data_init_inputs\\(batch\\)` gave entry 1 a float"),
        (ConditionalByHook(), ["mel"], "`input_key`=\\['mel'\\] and `ConditionalByHook.data_init_inputs` both"),
        (Conditional(), ["mel", "spectrogram"], "cannot find the model input at `input_key`='spectrogram'"),
    ]
    for model, input_key, message in cases:
        with pytest.raises(ValueError, match=message):
            wn = WeightNormalization(input_key=input_key)
            trainer(max_steps=1, callbacks=[wn]).fit(model, conditional_data(True)[0])


@pytest.mark.parametrize("averaging", ["EMA", "SWA"])
def test_a_resumed_run_with_an_averaging_callback_ends_as_the_straight_one(averaging, tmp_path):
    def run(max_epochs, dirpath, ckpt_path=None):
        seed_everything(0)
        model = ConvClassifier()
        if averaging == "EMA":
            average = EMAWeightAveraging(decay=0.6)
        else:
            average = StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=2)
        saver = ModelCheckpoint(dirpath=dirpath, save_last=True)
        callbacks = [WeightNormalization(init_samples=32), average, saver]
        trainer(max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=True).fit(
            model, RandomImages(size=32, batch_size=16), ckpt_path=ckpt_path
        )
        return parameters(model)

    straight = run(4, tmp_path / "straight")
    run(2, tmp_path / "halves")
    assert_same_parameters(run(4, tmp_path / "halves", ckpt_path="last"), straight)


class FusedManualSteps(ConvClassifier):
    """Manual optimization as in a GAN: a fused optimizer steps, then the same step runs the model again."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gaps: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizer = self.optimizers()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        optimizer.step()  # fused: g and v change without a version bump
        optimizer.zero_grad()
        head = self.net[6]
        fresh = nn.functional.linear(self.net[:6](x), head.parametrizations.weight.compute(), head.bias)
        self.gaps.append((self(x) - fresh).abs().max().item())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.1, fused=True)


def test_a_forward_after_a_fused_optimizer_step_in_the_same_training_step_sees_the_step():
    model = FusedManualSteps()
    trainer(max_steps=3, callbacks=[WeightNormalization(init_samples=64)]).fit(model, RandomImages(size=96))
    assert len(model.gaps) == 3 and max(model.gaps) < 1e-6, model.gaps
