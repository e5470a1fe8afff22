"""One LightningCLI for the whole zoo: ``python -m zoo fit --config configs/cifar10/wn.yaml``.

``--model`` and ``--data`` take any LightningModule / LightningDataModule class path (the
configs name the zoo's); ``fit``, ``validate``, ``test`` and ``predict`` work as in Lightning.
Every run keeps checkpoints with ``last.ckpt`` (``--checkpoint.*`` configures them).
"""

from __future__ import annotations

from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


class ZooCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})


def main(args: list[str] | None = None, run: bool = True) -> ZooCLI:
    return ZooCLI(
        LightningModule,
        None,  # any DataModule, and optional: DQN's data is its own play
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
