"""One LightningCLI for the whole zoo: ``python -m zoo fit --config configs/cifar10/wn.yaml``.

``--model`` and ``--data`` take any LightningModule / LightningDataModule class path (the
configs name the zoo's); ``fit``, ``validate``, ``test`` and ``predict`` work as in Lightning.

Checkpoints: every run keeps ``last.ckpt`` (``--checkpoint.*`` configures them) in one folder per
config, ``<trainer.default_root_dir>/checkpoints``, not in the logger's new ``version_N``. So
``--ckpt_path last`` finds the newest ``last*.ckpt`` an earlier run of the same config wrote: ``fit``
resumes it, ``validate``/``test``/``predict`` evaluate it (and refuse to run without one). A fresh run
into a folder that has checkpoints writes ``last-v1.ckpt`` and so on beside them, never over them.

Errors the user fixes (a bad option, a ``--ckpt_path`` that is no checkpoint, a :class:`zoo.errors.UserError`
such as missing data) print one ``error:`` line naming the fix and exit with status 2; others keep their traceback.
"""

from __future__ import annotations

import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from lightning_wn import read_checkpoint
from zoo.errors import UserError

PROG = "python -m zoo"


class ZooParser(LightningArgumentParser):
    """Errors state their reason first and alone (jsonargparse prints ~70 lines of usage before it)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # a caller that catches parse errors gets jsonargparse's exception
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        command = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {message}\n`{command} --help` lists every option.\n")
        sys.exit(2)


class ZooCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config  # no subcommand: `run=False`
        if config.checkpoint.dirpath is None:  # one folder per config, the same on every DDP rank
            config.checkpoint.dirpath = str(Path(config.trainer.default_root_dir or ".") / "checkpoints")
        if subcommand is None:
            return
        if config.ckpt_path == "last":
            config.ckpt_path = self._last_checkpoint(Path(config.checkpoint.dirpath), subcommand)
        if config.ckpt_path and not Path(config.ckpt_path).is_dir():  # a folder is a sharded checkpoint
            self._check_checkpoint(config.ckpt_path, config.model)

    def _last_checkpoint(self, folder: Path, subcommand: str) -> str | None:
        found = last_checkpoint(folder)
        if found is not None:
            return str(found)
        if subcommand != "fit":
            self._parser(subcommand).error(
                f"`--ckpt_path last`: there is no last*.ckpt in `{folder}`. Run `{PROG} fit` with the same config "
                "first (its `trainer.default_root_dir` decides the folder), or pass a checkpoint file."
            )
        rank_zero_warn(f"`--ckpt_path last`: no checkpoint in `{folder}` yet, so this fit starts a new run.")
        return None

    def _check_checkpoint(self, path: str, model: Any) -> None:
        try:
            checkpoint = read_checkpoint(path)
        except (ValueError, OSError) as error:  # OSError: a file it cannot open, or none there
            self._parser(self.config.subcommand).error(f"`--ckpt_path`: {error}")
        trained = checkpoint.get("hyper_parameters", {}).get("_class_path")
        wanted = model.get("class_path") if model is not None else None
        if trained and wanted and trained != wanted:
            self._parser(self.config.subcommand).error(
                f"`--ckpt_path`: `{path}` is a checkpoint of `{trained}`, but the config's model is `{wanted}`: "
                "pass the config it was trained with (its run folder keeps a copy, config.yaml)."
            )

    def _run_subcommand(self, subcommand: str) -> None:
        with warnings.catch_warnings():
            if subcommand == "fit" and self.config[subcommand].ckpt_path:
                # a resumed run writes on into the folder it resumed from: Lightning's warning is for new runs
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            try:
                super()._run_subcommand(subcommand)
            except UserError as error:  # missing data and the like: the message names the fix, a traceback adds noise
                self._stop(error)

    def _stop(self, error: UserError) -> NoReturn:
        """Print ``error`` alone, as the parser prints a bad option, and stop the run's processes with status 2."""
        sys.stderr.write(f"error: {error}\n")  # one write: under DDP, lines of other processes cannot cut into it
        sys.stderr.flush()
        # DDP's other processes wait at a barrier for this one: killed first, they print no traceback of a lost peer
        if self.trainer.strategy.launcher is not None:
            self.trainer.strategy.launcher.kill(signal.SIGKILL)
        sys.exit(2)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Trainer:
        # Lightning refuses a ModelCheckpoint without checkpointing, and its `on_train_end` would still write
        # last.ckpt after a fast_dev_run: drop ours in both cases
        if config.get("enable_checkpointing") is False or config.get("fast_dev_run"):
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)


def last_checkpoint(folder: Path) -> Path | None:
    """The newest ``last.ckpt`` / ``last-vN.ckpt`` in ``folder``: the latest state of its most recent run."""
    candidates = [path for path in folder.glob("last*.ckpt") if re.fullmatch(r"last(-v\d+)?", path.stem)]
    return max(candidates, key=lambda path: path.stat().st_mtime_ns, default=None)


def main(args: list[str] | None = None, run: bool = True) -> ZooCLI:
    # Lightning 2.6's own use of a torch API that torch 2.14 deprecates: nothing a user of the zoo can act on
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    return ZooCLI(
        LightningModule,
        None,  # any DataModule, and optional: DQN's data is its own play
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": PROG},
        parser_class=ZooParser,
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
