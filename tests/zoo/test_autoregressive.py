"""The IAF posterior: autoregressive in raster-then-channel order, and its log q is its sample's density."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_wn import WeightNormalization, apply_weight_norm
from zoo.autoregressive import AutoregressiveConv2d, InverseAutoregressiveFlow
from zoo.likelihoods import gaussian_kl, standard_normal_log_prob
from zoo.vae import ConvVAE

LATENT, SIZE = 3, 4


def in_order(z):
    """(1, C, H, W) -> the flat vector in the flow's order: pixel by pixel, channel by channel within one."""
    return z[0].permute(1, 2, 0).reshape(-1)


def from_order(flat):
    return flat.reshape(SIZE, SIZE, LATENT).permute(2, 0, 1)[None]


def index(channel, row, col):
    return (row * SIZE + col) * LATENT + channel


@pytest.mark.parametrize("hidden", [6, 5], ids=["hidden_a_multiple", "hidden_not_a_multiple"])
@pytest.mark.parametrize("normalized", [False, True], ids=["plain", "weight_norm"])
def test_the_flow_jacobian_is_triangular_and_its_log_det_is_minus_the_sum_of_s(hidden, normalized):
    torch.manual_seed(0)
    flow = InverseAutoregressiveFlow(LATENT, hidden, output_scale=1.0).double()
    if normalized:
        apply_weight_norm(flow, paper_init=True)  # v re-drawn over the whole kernel, masked taps included
        assert all(type(m).__name__ == "WeightNormedAutoregressiveConv2d" for m in flow.children())
    context = torch.randn(1, hidden, SIZE, SIZE, dtype=torch.float64)
    z = torch.randn(1, LATENT, SIZE, SIZE, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda flat: in_order(flow(from_order(flat), context)[0]),
                                                  in_order(z))  # fmt: skip
    n = LATENT * SIZE * SIZE
    assert torch.equal(jacobian.triu(1), torch.zeros(n, n, dtype=torch.float64))  # nothing sees a later element
    _, log_scale = flow(z, context)
    torch.testing.assert_close(jacobian.diagonal(), in_order(torch.exp(-log_scale)))
    sign, log_det = torch.linalg.slogdet(jacobian)
    assert sign == 1
    torch.testing.assert_close(log_det, -log_scale.sum())
    # ...and the mask lets through what it should: the earlier channels of the same pixel, the pixels before it
    for later, earlier in [(index(1, 2, 2), index(0, 2, 2)), (index(2, 2, 2), index(1, 2, 2)),
                           (index(0, 2, 2), index(2, 2, 1)), (index(0, 2, 2), index(1, 1, 3))]:  # fmt: skip
        assert jacobian[later, earlier].abs() > 1e-6, (later, earlier)


def test_the_mask_zeroes_the_weights_the_layer_computes_with_not_only_the_stored_ones():
    conv = AutoregressiveConv2d(2, 4, latent_channels=2, strict=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
    x = torch.zeros(1, 2, 3, 3)
    x[0, 1, 1, 1] = 1.0  # channel 1 at the centre: units of degree 1 (the upper two) see it, degree 0 ones do not
    assert conv(x)[0, :, 1, 1].tolist() == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="`kernel_size` must be odd .* got 4"):
        AutoregressiveConv2d(2, 2, latent_channels=2, kernel_size=4, strict=True)


def test_the_iaf_vae_log_q_is_the_change_of_variables_density_of_its_sample():
    torch.manual_seed(0)
    vae = ConvVAE(channels=8, latent_channels=LATENT, posterior="iaf").double().eval()
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64).round()
    torch.manual_seed(5)
    z, log_q, kl = vae.posterior_sample(x)
    torch.manual_seed(5)  # the same noise: the encoder draws nothing
    out = vae.encoder(x)
    mean, log_std, context = out[:, :LATENT], out[:, LATENT : 2 * LATENT], out[:, 2 * LATENT :]
    noise = torch.randn_like(mean)
    base = mean + noise * log_std.exp()
    torch.testing.assert_close(z, vae.flow(base, context)[0])
    jacobian = torch.autograd.functional.jacobian(lambda b: vae.flow(b, context)[0], base).reshape(z.numel(), -1)
    expected = (standard_normal_log_prob(noise) - log_std).sum() - torch.linalg.slogdet(jacobian)[1]
    torch.testing.assert_close(log_q.sum(), expected)
    torch.testing.assert_close(kl, log_q - standard_normal_log_prob(z))


def test_with_the_flow_at_the_identity_the_kl_estimate_averages_to_the_closed_form():
    torch.manual_seed(0)
    iaf = ConvVAE(channels=8, latent_channels=4, posterior="iaf").double()
    for layer in (iaf.flow.shift, iaf.flow.log_scale):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64).round()
    estimates = torch.stack([iaf.posterior_sample(x)[2].sum() for _ in range(2000)])
    out = iaf.encoder(x)
    closed_form = gaussian_kl(out[:, :4], out[:, 4:8]).sum()
    standard_error = estimates.std() / 2000**0.5
    assert (estimates.mean() - closed_form).abs() < 4 * standard_error, (estimates.mean(), closed_form)


def test_the_callback_normalizes_and_initializes_the_flow_and_keeps_it_autoregressive():
    torch.manual_seed(0)
    vae = ConvVAE(channels=8, latent_channels=4, posterior="iaf")
    inputs = {}

    def keep_first_input(name):
        def hook(module, args):
            inputs.setdefault(name, args[0].clone())  # returns None: the input goes on unchanged

        return hook

    handles = [getattr(vae.flow, name).register_forward_pre_hook(keep_first_input(name))
               for name in ("hidden", "shift", "log_scale")]  # fmt: skip
    images = torch.rand(64, 1, 28, 28).round()
    trainer = Trainer(accelerator="cpu", max_steps=0, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, callbacks=[WeightNormalization(
                          init_samples=64, init_scale=0.1, log_scale_factor=3.0, paper_init=True)])  # fmt: skip
    trainer.fit(vae, DataLoader(TensorDataset(images), batch_size=64))
    for handle in handles:
        handle.remove()
    assert sorted(inputs) == ["hidden", "log_scale", "shift"]
    for name, x in inputs.items():  # what each layer saw in the init pass, run again through the layer
        layer = getattr(vae.flow, name)
        assert type(layer).__name__ == "WeightNormedAutoregressiveConv2d"
        with torch.no_grad():
            out = layer(x)
        std = out.std(dim=(0, 2, 3), unbiased=False)
        assert (std - 0.1).abs().max() < 1e-4, (name, std)
        assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-5, name
    with torch.no_grad():
        before = vae.flow(torch.zeros(1, 4, 7, 7), torch.zeros(1, 8, 7, 7))[0]
        moved = torch.zeros(1, 4, 7, 7)
        moved[0, 3, 6, 6] = 1.0  # the last element in the order
        after = vae.flow(moved, torch.zeros(1, 8, 7, 7))[0]
    assert (before != after).nonzero().tolist() == [[0, 3, 6, 6]]
