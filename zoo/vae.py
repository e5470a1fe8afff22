"""A ResNet-style convolutional VAE (the family of the IAF paper's models) for MNIST and CIFAR-10.

Residual conv blocks with ELU, stride-2 convs down to a latent feature map with a diagonal
Gaussian posterior, optionally followed by one inverse autoregressive flow step (``posterior:
iaf``, the paper's choice), transposed convs back up. Binarized MNIST gets a Bernoulli likelihood
(reported in nats), CIFAR-10 a discretized logistic (reported in bits per dimension). Adamax,
as in the paper. Weight norm comes from the ``WeightNormalization`` callback in the config, and
the average of the weights that the authors evaluate from Lightning's ``EMAWeightAveraging``.

Example:
    >>> vae = ConvVAE(channels=8, latent_channels=4)
    >>> terms = vae.elbo_terms(torch.rand(2, 1, 28, 28).round())
    >>> torch.allclose(terms["elbo"], terms["log_likelihood"] - terms["kl"])
    True
    >>> ConvVAE(channels=8, latent_channels=4, posterior="iaf").flow.hidden.mask.shape
    torch.Size([8, 4, 3, 3])
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from zoo.autoregressive import InverseAutoregressiveFlow
from zoo.likelihoods import bernoulli_log_prob, bits_per_dim, discretized_logistic_log_prob, gaussian_kl
from zoo.likelihoods import standard_normal_log_prob
from zoo.stage_metrics import log_stage_metrics
from zoo.visuals import log_image_grid


class ResidualBlock(nn.Sequential):
    """x + scale * conv(elu(conv(elu(x)))); the authors scale the residual branch by 0.1.

    Example:
        >>> block = ResidualBlock(4, scale=0.1)
        >>> x = torch.randn(2, 4, 8, 8)
        >>> torch.allclose(block(x), x + 0.1 * nn.Sequential(*block)(x))
        True
    """

    def __init__(self, channels: int, scale: float = 1.0) -> None:
        super().__init__(nn.ELU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ELU(),
                         nn.Conv2d(channels, channels, 3, padding=1))  # fmt: skip
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.scale * super().forward(x)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class ConvVAE(LightningModule):
    """Convolutional VAE with a posterior over a (latent_channels, H/4, W/4) map.

    Args:
        in_channels: 1 for MNIST, 3 for CIFAR-10.
        likelihood: ``bernoulli`` (binarized images, nats) or ``logistic`` (8-bit images, bits/dim).
        channels: width of the residual blocks.
        latent_channels: channels of the latent map.
        posterior: ``diagonal`` (a diagonal Gaussian, its KL in closed form) or ``iaf`` (that
            Gaussian's sample moved by one :class:`~zoo.autoregressive.InverseAutoregressiveFlow`
            step conditioned on ``channels`` more encoder outputs; the KL is then the one-sample
            estimate log q(z|x) - log p(z)).
        free_bits: KL floor per latent channel in nats (the IAF paper's free bits); 0 disables.
        residual_scale: the residual branch's weight in every block (0.1 in the authors' code,
            openai/iaf models.py: ``input + .1 * conv(...)``).
        iw_samples: importance samples for the bound reported by ``test``.
        lr: Adamax learning rate.
    """

    def __init__(
        self,
        in_channels: int = 1,
        likelihood: Literal["bernoulli", "logistic"] = "bernoulli",
        channels: int = 64,
        latent_channels: int = 32,
        posterior: Literal["diagonal", "iaf"] = "diagonal",
        free_bits: float = 0.0,
        residual_scale: float = 1.0,
        iw_samples: int = 100,
        lr: float = 2e-3,
    ) -> None:
        super().__init__()
        if likelihood not in ("bernoulli", "logistic"):
            raise ValueError(f"`likelihood` must be 'bernoulli' or 'logistic', got {likelihood!r}.")
        if posterior not in ("diagonal", "iaf"):
            raise ValueError(f"`posterior` must be 'diagonal' or 'iaf', got {posterior!r}.")
        if not (residual_scale > 0 and math.isfinite(residual_scale)):
            raise ValueError(f"`residual_scale` must be a positive number, got {residual_scale!r}.")
        self.save_hyperparameters()
        c, z, r = channels, latent_channels, residual_scale
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, padding=1), ResidualBlock(c, r),
            nn.Conv2d(c, c, 4, stride=2, padding=1), ResidualBlock(c, r),
            nn.Conv2d(c, c, 4, stride=2, padding=1), ResidualBlock(c, r),
            nn.ELU(), nn.Conv2d(c, 2 * z + (c if posterior == "iaf" else 0), 3, padding=1),
        )  # fmt: skip
        self.flow = InverseAutoregressiveFlow(z, c) if posterior == "iaf" else None
        outputs = in_channels if likelihood == "bernoulli" else 2 * in_channels
        self.decoder = nn.Sequential(
            nn.Conv2d(z, c, 3, padding=1), ResidualBlock(c, r),
            nn.ConvTranspose2d(c, c, 4, stride=2, padding=1), ResidualBlock(c, r),
            nn.ConvTranspose2d(c, c, 4, stride=2, padding=1), ResidualBlock(c, r),
            nn.ELU(), nn.Conv2d(c, outputs, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder output for a posterior sample, and that sample's KL term per latent element."""
        z, _, kl_per_dim = self.posterior_sample(x)
        return self.decoder(z), kl_per_dim

    def posterior_sample(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z ~ q(z|x), and per latent element log q(z|x) and the KL term of the ELBO.

        The KL term is the closed form for the diagonal Gaussian, log q(z|x) - log p(z) with IAF.
        """
        return self._sample(self.encoder(x))

    def _sample(self, encoded: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`posterior_sample` from the encoder's output, which several samples can share."""
        k = self.hparams.latent_channels
        mean, log_std, context = encoded[:, :k], encoded[:, k : 2 * k], encoded[:, 2 * k :]
        noise = torch.randn_like(mean)
        z = mean + noise * log_std.exp()
        log_q = standard_normal_log_prob(noise) - log_std
        if self.flow is None:
            return z, log_q, gaussian_kl(mean, log_std)
        z, log_scale = self.flow(z, context)
        log_q = log_q + log_scale
        return z, log_q, log_q - standard_normal_log_prob(z)

    def log_likelihood(self, decoded: Tensor, x: Tensor) -> Tensor:
        if self.hparams.likelihood == "bernoulli":
            return bernoulli_log_prob(decoded, x)
        mean, log_scale = decoded.chunk(2, dim=1)
        return discretized_logistic_log_prob(mean, log_scale.clamp(min=-7.0), x)

    def elbo_terms(self, x: Tensor) -> dict[str, Tensor]:
        """Per example: log p(x|z), KL(q(z|x) || p(z)), the ELBO, and the training objective."""
        decoded, kl_per_dim = self(x)
        log_likelihood = self.log_likelihood(decoded, x)
        kl = kl_per_dim.flatten(1).sum(1)
        objective = -log_likelihood + kl
        if self.hparams.free_bits > 0:  # floor each channel's batch-mean KL, as the IAF code does
            per_channel = kl_per_dim.sum(dim=(2, 3)).mean(0)
            floored = per_channel.clamp(min=self.hparams.free_bits).sum()
            objective = -log_likelihood + floored
        return {"log_likelihood": log_likelihood, "kl": kl, "elbo": log_likelihood - kl, "objective": objective}

    def prepare(self, images: Tensor) -> Tensor:
        """Binarize for the Bernoulli likelihood: sampled in training, thresholded in evaluation.

        Images that are binary already (``MNISTData(binarize=...)``: one fixed draw) pass unchanged.
        """
        if self.hparams.likelihood != "bernoulli":
            return images
        return torch.bernoulli(images) if self.training else (images > 0.5).float()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        terms = self.elbo_terms(self.prepare(batch[0]))
        self._log_terms("train", terms, batch[0])
        return terms["objective"].mean()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x = self.prepare(batch[0])
        self._log_terms("val", self.elbo_terms(x), x)
        if batch_idx == 0:
            self._first_val_batch = x[:32]

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x = self.prepare(batch[0])
        self._log_terms("test", self.elbo_terms(x), x)
        self.log(f"test/{self._unit}_iw", self._report(-self.importance_weighted_bound(x), x).mean(), sync_dist=True)

    @torch.no_grad()
    def importance_weighted_bound(self, x: Tensor, samples: int | None = None) -> Tensor:
        """log (1/k) sum_i p(x, z_i) / q(z_i | x), per example (Burda et al., 2016)."""
        samples = samples or self.hparams.iw_samples
        encoded, weights = self.encoder(x), []  # once: every sample is drawn from the same q(z|x)
        for _ in range(samples):
            z, log_q, _ = self._sample(encoded)
            log_prior = standard_normal_log_prob(z)
            weights.append(self.log_likelihood(self.decoder(z), x) + (log_prior - log_q).flatten(1).sum(1))
        return torch.logsumexp(torch.stack(weights), 0) - math.log(samples)

    @property
    def _unit(self) -> str:
        return "nats" if self.hparams.likelihood == "bernoulli" else "bits_per_dim"

    def _report(self, nats: Tensor, x: Tensor) -> Tensor:
        return nats if self.hparams.likelihood == "bernoulli" else bits_per_dim(nats, x[0].numel())

    def _log_terms(self, stage: str, terms: dict[str, Tensor], x: Tensor) -> None:
        metrics = {
            self._unit: self._report(-terms["elbo"], x).mean(),
            "elbo": terms["elbo"].mean(),
            "reconstruction": -terms["log_likelihood"].mean(),  # -log p(x | z) in nats, as DRAW's: nats = it + kl
            "kl": terms["kl"].mean(),
        }
        log_stage_metrics(self, stage, metrics, prog_bar=self._unit)

    @torch.no_grad()
    def on_validation_epoch_end(self) -> None:
        batch = getattr(self, "_first_val_batch", None)
        if batch is None:
            return
        latent_shape = (self.hparams.latent_channels, *self.encoder(batch[:1]).shape[2:])
        samples = self.mean_image(self.decoder(torch.randn(64, *latent_shape, device=batch.device)))
        reconstructions = self.mean_image(self(batch)[0])
        log_image_grid(self, "samples", samples)
        log_image_grid(self, "reconstructions", torch.cat([batch, reconstructions]), nrow=len(batch))

    def mean_image(self, decoded: Tensor) -> Tensor:
        if self.hparams.likelihood == "bernoulli":
            return torch.sigmoid(decoded)
        return decoded.chunk(2, dim=1)[0].clamp(0, 1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adamax(self.parameters(), lr=self.hparams.lr)
