"""Run by test_dqn under `strategy="ddp"` on 2 CPU processes; each rank saves its networks and its games.

    python dqn_ddp.py OUT_DIR
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_wn import WeightNormalization
from zoo.dqn import DQN


class SaveState(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module):  # after the data-dependent init
        self.start = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer, pl_module):
        state = {
            "start": self.start,
            "end": pl_module.state_dict(),
            "frames": torch.from_numpy(pl_module.buffer.frames[:, :100].copy()),
            "env_steps": pl_module.env_steps,
        }
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    seed_everything(0)
    agent = DQN(env_id="CartPole-v1", num_envs=2, buffer_size=1000, batch_size=32, learning_starts=200,
                train_frequency=2, target_sync_every=5, updates_per_epoch=100, eval_episodes=2)  # fmt: skip
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=12,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[WeightNormalization(init_samples=64), SaveState(out)],
    )
    trainer.fit(agent)
    torch.distributed.destroy_process_group()  # gloo left to interpreter shutdown can abort it
