"""Run by test_fsdp under `ModelParallelStrategy` (FSDP2, `fully_shard`) on 2 CPU processes.

    python fsdp_fit.py OUT_DIR [--no-sync]

Fits 4 steps and saves a sharded and a full checkpoint, then resumes from each for 2 more steps.
Every rank saves the full (gathered) state dict when training starts (after the init or the
restore) and ends: `{init,trained}_rank{r}.pt`, `resumed_{sharded,full}_{init,trained}_rank{r}.pt`.
"""

import sys
import types
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]  # this checkout's lightning_wn, not an installed one
import lightning_wn.init  # noqa: E402
from lightning_wn import WeightNormalization  # noqa: E402
from lit_models import ConvClassifier, RandomImages  # noqa: E402

INIT_SAMPLES = 128


class ShardedClassifier(ConvClassifier):
    """Shards each layer and the network with FSDP2, as ModelParallelStrategy asks, in `configure_model`."""

    def configure_model(self) -> None:
        if isinstance(self.net, FSDPModule):  # a second fit: already sharded
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class SaveFullState(Callback):
    def __init__(self, out: Path, tag: str) -> None:
        self.out, self.tag = out, tag

    def on_train_start(self, trainer, pl_module):  # after WeightNormalization's init and any restore
        self._save(trainer, pl_module, self.tag)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer, pl_module, self.tag.replace("init", "trained"))

    def _save(self, trainer, pl_module, tag):
        state = get_model_state_dict(pl_module, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        seen = list(trainer.train_dataloader.sampler)[:INIT_SAMPLES // 2]  # this rank's share of the init's examples
        saved = {"state_dict": state, "step": trainer.global_step, "init_examples": seen}
        torch.save(saved, self.out / f"{tag}_rank{trainer.global_rank}.pt")


def trainer(out: Path, callbacks: list, max_steps: int, save_distributed_checkpoint: bool = True) -> Trainer:
    strategy = ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint
    )
    return Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=callbacks,
    )


if __name__ == "__main__":
    out = Path(sys.argv[1])
    if "--no-sync" in sys.argv:  # what each rank would get without the all-reduce of the statistics
        lightning_wn.init.dist = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: False)
    seed_everything(0)
    data = RandomImages(size=256, batch_size=32)
    fit = trainer(out, [WeightNormalization(init_samples=INIT_SAMPLES), SaveFullState(out, "init")], 4)
    fit.fit(ShardedClassifier(), data)
    fit.save_checkpoint(out / "sharded.ckpt")
    fit.strategy._save_distributed_checkpoint = False  # the same run, saved as one full file on rank 0
    fit.save_checkpoint(out / "full.ckpt")
    if "--no-sync" not in sys.argv:
        for kind in ("sharded", "full"):
            seed_everything(1)
            callbacks = [WeightNormalization(init_samples=INIT_SAMPLES), SaveFullState(out, f"resumed_{kind}_init")]
            trainer(out, callbacks, 6).fit(ShardedClassifier(), data, ckpt_path=out / f"{kind}.ckpt")
    torch.distributed.destroy_process_group()  # gloo left to interpreter shutdown can abort it
