"""Run by test_callback under `strategy="ddp"` on 2 CPU processes; each rank saves its weights.

    python ddp_fit.py OUT_DIR [--no-sync]
"""

import sys
import types
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).parent))
import lightning_wn.init  # noqa: E402
from lightning_wn import WeightNormalization  # noqa: E402
from lit_models import ConvClassifier, RandomImages  # noqa: E402


class SaveWeights(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_start(self, trainer, pl_module):  # runs after WeightNormalization's init
        self._save(trainer, pl_module, "init")

    def on_train_end(self, trainer, pl_module):
        self._save(trainer, pl_module, "trained")

    def _save(self, trainer, pl_module, tag):
        torch.save(pl_module.state_dict(), self.out / f"{tag}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    if "--no-sync" in sys.argv:  # what each rank would get without the all-reduce of the statistics
        lightning_wn.init.dist = types.SimpleNamespace(is_available=lambda: False, is_initialized=lambda: False)
    seed_everything(0)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[WeightNormalization(init_samples=128), SaveWeights(out)],
    )
    trainer.fit(ConvClassifier(), RandomImages(size=256, batch_size=32))
    torch.distributed.destroy_process_group()  # gloo left to interpreter shutdown can abort it
