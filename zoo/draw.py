"""DRAW (Gregor et al., 2015) with Gaussian filterbank attention, for binarized MNIST.

An LSTM encoder reads glimpses of the image and of the error image, a latent sample per glimpse
drives an LSTM decoder, and the decoder writes patches onto a canvas; after ``glimpses`` steps
the canvas gives Bernoulli logits. Loss = reconstruction + sum over glimpses of the KL, in nats.

The LSTM cells are called once per glimpse: with weight norm on them (``include: [LSTMCell,
Linear]`` in the callback) their normalized weights are computed once per step, not 64 times.
The configs turn the data-dependent init off for DRAW: the paper gives it for networks without
recursion, and here every layer sits inside the loop, where the first glimpse's statistics
(what the init would normalize) say little about the later ones.

Example:
    >>> draw = DRAW(glimpses=3, hidden=16, latent=4)
    >>> terms = draw.loss_terms(torch.rand(2, 1, 28, 28).round())
    >>> torch.allclose(terms["loss"], terms["reconstruction"] + terms["kl"])
    True
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from zoo.likelihoods import bernoulli_log_prob, gaussian_kl
from zoo.stage_metrics import log_stage_metrics
from zoo.visuals import log_image_grid


def filterbank(center: Tensor, delta: Tensor, variance: Tensor, n: int, size: int) -> Tensor:
    """``n`` Gaussian filters over ``size`` pixels along one axis, each row summing to 1 (about 0 for a filter
    centred far outside the image, as in the authors' code).

    ``center``, ``delta`` and ``variance`` have shape (B,); pixel coordinates run from 1 to
    ``size`` and filter ``i`` (1-based) is centred at ``center + (i - n/2 - 0.5) * delta``.

    Example:
        >>> F_ = filterbank(torch.tensor([14.5]), torch.tensor([4.0]), torch.tensor([1.0]), n=2, size=28)
        >>> F_.shape, torch.allclose(F_.sum(-1), torch.ones(1, 2))
        (torch.Size([1, 2, 28]), True)
    """
    offsets = torch.arange(1, n + 1, device=center.device, dtype=center.dtype) - n / 2 - 0.5
    means = center[:, None] + offsets * delta[:, None]  # (B, n)
    pixels = torch.arange(1, size + 1, device=center.device, dtype=center.dtype)
    weights = torch.exp(-((pixels - means[..., None]) ** 2) / (2 * variance[:, None, None]))
    return weights / weights.sum(-1, keepdim=True).clamp_min(1e-8)


def read(images: Tensor, fy: Tensor, fx: Tensor, gamma: Tensor) -> Tensor:
    """The (B, n, n) glimpse ``gamma * Fy @ image @ Fx^T`` of (B, H, W) images."""
    return gamma[:, None, None] * (fy @ images @ fx.transpose(1, 2))


def write(patch: Tensor, fy: Tensor, fx: Tensor, gamma: Tensor) -> Tensor:
    """The (B, H, W) canvas update ``Fy^T @ patch @ Fx / gamma`` of a (B, m, m) patch."""
    return (fy.transpose(1, 2) @ patch @ fx) / gamma[:, None, None]


def attention(params: Tensor, n: int, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Filterbanks (Fy, Fx) and intensity gamma from the 5 raw outputs of a linear layer."""
    gx_raw, gy_raw, log_variance, log_delta, log_gamma = params.unbind(-1)
    gx = (width + 1) / 2 * (gx_raw + 1)
    gy = (height + 1) / 2 * (gy_raw + 1)
    delta = (max(height, width) - 1) / max(n - 1, 1) * torch.exp(log_delta)
    variance = torch.exp(log_variance)
    return filterbank(gy, delta, variance, n, height), filterbank(gx, delta, variance, n, width), torch.exp(log_gamma)


class DRAW(LightningModule):
    """DRAW on (B, 1, H, W) images in [0, 1], binarized like the VAE's.

    Args:
        glimpses: steps of reading and writing (64 in the paper's MNIST model).
        hidden: units of the encoder and decoder LSTMs.
        latent: dimensions of each step's latent sample.
        read_size: N of the read attention's N x N grid.
        write_size: size of the written patch.
        attention: False reads whole images and writes whole canvases (DRAW without attention).
        lr: Adam learning rate.
        init_std: every weight drawn from N(0, init_std) and every bias zero, as jbornschein/draw
            initializes (0.01); None keeps PyTorch's default init.
    """

    def __init__(
        self,
        image_size: int = 28,
        glimpses: int = 64,
        hidden: int = 256,
        latent: int = 100,
        read_size: int = 2,
        write_size: int = 5,
        attention: bool = True,
        lr: float = 1e-3,
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        pixels = image_size * image_size
        read_dim = 2 * (read_size**2 if attention else pixels)
        self.encoder = nn.LSTMCell(read_dim + hidden, hidden)
        self.decoder = nn.LSTMCell(latent, hidden)
        self.posterior = nn.Linear(hidden, 2 * latent)
        self.write_patch = nn.Linear(hidden, write_size**2 if attention else pixels)
        if attention:
            self.read_attention = nn.Linear(hidden, 5)
            self.write_attention = nn.Linear(hidden, 5)
        if init_std is not None:
            with torch.no_grad():
                for name, parameter in self.named_parameters():  # weight, weight_ih, weight_hh; bias, bias_ih, bias_hh
                    if "weight" in name.rsplit(".", 1)[-1]:
                        parameter.normal_(0.0, init_std)
                    else:
                        parameter.zero_()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Final canvas logits (B, 1, H, W), per-glimpse KL (B, T), and the canvases drawn."""
        hp = self.hparams
        images = x.squeeze(1)  # (B, H, W)
        batch, size = images.shape[0], hp.image_size
        h_enc = c_enc = h_dec = c_dec = images.new_zeros(batch, hp.hidden)
        canvas = images.new_zeros(batch, size, size)
        kls, canvases = [], []
        for _ in range(hp.glimpses):
            error = images - torch.sigmoid(canvas)
            glimpse = self._read(images, error, h_dec)
            h_enc, c_enc = self.encoder(torch.cat([glimpse, h_dec], 1), (h_enc, c_enc))
            mean, log_std = self.posterior(h_enc).chunk(2, dim=1)
            z = mean + torch.randn_like(mean) * log_std.exp()
            h_dec, c_dec = self.decoder(z, (h_dec, c_dec))
            canvas = canvas + self._write(h_dec)
            kls.append(gaussian_kl(mean, log_std).sum(1))
            canvases.append(canvas)
        return canvas.unsqueeze(1), torch.stack(kls, 1), canvases

    def _read(self, images: Tensor, error: Tensor, h_dec: Tensor) -> Tensor:
        if not self.hparams.attention:
            return torch.cat([images.flatten(1), error.flatten(1)], 1)
        fy, fx, gamma = attention(self.read_attention(h_dec), self.hparams.read_size, *images.shape[1:])
        return torch.cat([read(images, fy, fx, gamma).flatten(1), read(error, fy, fx, gamma).flatten(1)], 1)

    def _write(self, h_dec: Tensor) -> Tensor:
        size, m = self.hparams.image_size, self.hparams.write_size
        patch = self.write_patch(h_dec)
        if not self.hparams.attention:
            return patch.view(-1, size, size)
        fy, fx, gamma = attention(self.write_attention(h_dec), m, size, size)
        return write(patch.view(-1, m, m), fy, fx, gamma)

    def loss_terms(self, x: Tensor) -> dict[str, Tensor]:
        """Per example: reconstruction -log p(x | canvas), total KL, and their sum (nats)."""
        logits, kls, _ = self(x)
        reconstruction = -bernoulli_log_prob(logits, x)
        kl = kls.sum(1)
        return {"reconstruction": reconstruction, "kl": kl, "loss": reconstruction + kl}

    def prepare(self, images: Tensor) -> Tensor:
        return torch.bernoulli(images) if self.training else (images > 0.5).float()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        terms = self.loss_terms(self.prepare(batch[0]))
        self._log_terms("train", terms)
        return terms["loss"].mean()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x = self.prepare(batch[0])
        self._log_terms("val", self.loss_terms(x))
        if batch_idx == 0:
            self._first_val_batch = x[:8]

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._log_terms("test", self.loss_terms(self.prepare(batch[0])))

    def _log_terms(self, stage: str, terms: dict[str, Tensor]) -> None:
        metrics = {"nats": terms["loss"].mean(), "reconstruction": terms["reconstruction"].mean(), "kl": terms["kl"].mean()}
        log_stage_metrics(self, stage, metrics, prog_bar="nats")

    @torch.no_grad()
    def on_validation_epoch_end(self) -> None:
        batch = getattr(self, "_first_val_batch", None)
        if batch is None:
            return
        _, _, canvases = self(batch)
        steps = torch.linspace(0, len(canvases) - 1, min(8, len(canvases))).round().long().tolist()
        frames = torch.stack([torch.sigmoid(canvases[t]) for t in steps], 1)  # (B, steps, H, W)
        log_image_grid(self, "canvas_per_glimpse", frames.flatten(0, 1).unsqueeze(1), nrow=len(steps))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

