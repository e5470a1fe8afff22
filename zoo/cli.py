"""One LightningCLI for the whole zoo: ``python -m zoo fit --config configs/cifar10/wn.yaml``.

``--model`` and ``--data`` take any LightningModule / LightningDataModule class path (the
configs name the zoo's); ``fit``, ``validate`` and ``test`` work as in Lightning.

Checkpoints: every run keeps ``last.ckpt`` (``--checkpoint.*`` configures them) in one folder per
config, ``<trainer.default_root_dir>/checkpoints``, not in the logger's new ``version_N``. So
``--ckpt_path last`` finds the newest ``last*.ckpt`` an earlier run of the same config wrote: ``fit``
resumes it, ``validate``/``test`` evaluate it (and refuse to run without one). A fresh run
into a folder that has checkpoints writes ``last-v1.ckpt`` and so on beside them, never over them.

Errors the user fixes (a bad option, a value a class's constructor rejects, a ``--ckpt_path`` that is no checkpoint,
a :class:`zoo.errors.UserError` such as missing data) print one ``error:`` line naming the fix and exit with status 2;
others keep their traceback.
"""

from __future__ import annotations

import re
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

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
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # only the classifier predicts, and from the command line its predictions would go nowhere (no writer)
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name != "predict"}

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
        if subcommand != "fit" and not config.ckpt_path:  # Lightning's default, but the zoo builds a fresh model
            rank_zero_warn(f"`{subcommand}` without `--ckpt_path` evaluates the untrained model the config builds: pass "
                           "`--ckpt_path last` for the last checkpoint of this config's `fit`, or a checkpoint file.")
        if config.ckpt_path and not Path(config.ckpt_path).is_dir():  # a folder is a sharded checkpoint
            self._check_checkpoint(config.ckpt_path, config.model, config.data if subcommand == "fit" else None)
        self._model_asked = config.model.clone() if config.model is not None else None

    def before_instantiate_classes(self) -> None:
        # Lightning rebuilds the model with the hyperparameters a checkpoint was trained with, over the config's
        # and the command line's: say which of those it overrode
        subcommand, asked = self.config.get("subcommand"), getattr(self, "_model_asked", None)
        if subcommand is None or asked is None or not self.config[subcommand].ckpt_path:
            return
        used = self.config[subcommand].model.get("init_args") or {}
        changed = {key: value for key, value in (asked.get("init_args") or {}).items() if used.get(key, value) != value}
        if changed:
            shown = ", ".join(f"{key}={used[key]!r} (asked: {value!r})" for key, value in changed.items())
            rank_zero_warn(f"`--ckpt_path`: the model is rebuilt with the options its checkpoint was trained with, "
                           f"not the config's: {shown}. Train a new run to change them; one that only changes "
                           "evaluation can be given in Python: "
                           "`lightning_wn.load_from_checkpoint(Model, path, option=value)`.")

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

    def _check_checkpoint(self, path: str, model: Any, data: Any) -> None:
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
        # a resumed fit on other examples: Lightning takes the data options as given, unlike the model's
        trained_on, given = checkpoint.get("datamodule_hyper_parameters") or {}, (data or {}).get("init_args") or {}
        if changed := {key: value for key, value in given.items() if key in SPLIT_OPTIONS and key in trained_on
                       and trained_on[key] != value}:  # fmt: skip
            shown = ", ".join(f"{key}={value!r} (trained: {trained_on[key]!r})" for key, value in changed.items())
            rank_zero_warn(f"`--ckpt_path`: the data options differ from the ones the checkpoint was trained with: "
                           f"{shown}, so the resumed run trains and validates on other examples.")

    def instantiate_classes(self) -> None:
        # A constructor that rejects a value of the config or command line (DQN's `batch_size: -1`) raises a
        # ValueError or TypeError that names the argument: the user's mistake, like a bad option, so one error line.
        # Only here, while the config's classes are built: the same exceptions later in a run keep their traceback.
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException, UserError) as error:
            if (rejected := rejected_by_constructor(error)) is None:
                raise
            self._stop(UserError(rejected))

    def _run_subcommand(self, subcommand: str) -> None:
        with warnings.catch_warnings():
            if subcommand == "fit" and self.config[subcommand].ckpt_path:
                # a resumed run writes on into the folder it resumed from: Lightning's warning is for new runs
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            try:
                super()._run_subcommand(subcommand)
            except UserError as error:  # missing data and the like: the message names the fix, a traceback adds noise
                self._stop(error)
            except RuntimeError as error:  # a checkpoint of another form of the model: other layers, or weight norm
                frames = traceback.extract_tb(error.__traceback__)
                restoring = any(frame.filename.endswith("checkpoint_connector.py") for frame in frames)
                if not (restoring and str(error).startswith("Error(s) in loading state_dict")):
                    raise
                keys = " ".join(line.strip() for line in str(error).splitlines()[1:])
                self._stop(UserError(f"`--ckpt_path`: the checkpoint's weights do not fit the model this config builds "
                                     f"({keys[:300]}{'...' if len(keys) > 300 else ''}). Pass the config it was trained "
                                     "with, callbacks included (its run folder keeps a copy, config.yaml)."))

    def _stop(self, error: UserError) -> NoReturn:
        """Print ``error`` alone, as the parser prints a bad option, and stop the run's processes with status 2."""
        sys.stderr.write(f"error: {error}\n")  # one write: under DDP, lines of other processes cannot cut into it
        sys.stderr.flush()
        # DDP's other processes wait at a barrier for this one: killed first, they print no traceback of a lost peer
        trainer = getattr(self, "trainer", None)  # none yet when a constructor rejected a value: no peers either
        if trainer is not None and trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signal.SIGKILL)
        sys.exit(2)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Trainer:
        # Lightning refuses a ModelCheckpoint without checkpointing, and its `on_train_end` would still write
        # last.ckpt after a fast_dev_run: drop ours in both cases
        if config.get("enable_checkpointing") is False or config.get("fast_dev_run"):
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)


# data options that choose the examples a run trains and validates on, or how they are transformed
SPLIT_OPTIONS = {"source", "train_size", "val_size", "seed", "zca", "zca_eps", "binarize", "binarize_seed"}


def rejected_by_constructor(error: BaseException) -> str | None:
    """``"<Class>: <message>"`` when ``error``, or an exception in its chain of causes, is a ValueError, TypeError,
    Lightning's MisconfigurationException (no GPU for `accelerator: gpu`) or UserError that a class's ``__init__``
    raised; else None.

    jsonargparse wraps what a constructor raises in its own ValueError ("Does not validate against any of the Union
    subtypes"), caused by it; the Trainer's own are not wrapped. The class named is that of the outermost ``__init__``
    in the traceback: the one the config names, even when a layer it builds raised.
    """
    cause: BaseException | None = error
    while cause is not None:
        for frame, _ in traceback.walk_tb(cause.__traceback__):
            if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
                if not isinstance(cause, (ValueError, TypeError, MisconfigurationException, UserError)):
                    return None  # any other exception out of a constructor is a bug
                return f"{type(frame.f_locals['self']).__name__}: {cause}"
        cause = cause.__cause__
    return None


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
        auto_configure_optimizers=False,  # the zoo's models build their own: --optimizer would be ignored
        parser_class=ZooParser,
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
