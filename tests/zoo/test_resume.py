"""The README's resume commands through the CLI: `fit`, `fit --ckpt_path last`, `test --ckpt_path last`.

Each config keeps its checkpoints in `<default_root_dir>/checkpoints`, so `last` finds the previous
run's; a resumed run continues its counters and optimizer and never re-runs the data-dependent init.
"""

import logging
import shlex
import warnings
from pathlib import Path

import pytest
import torch

import lightning_wn
from lightning_wn import WeightNormalization
from zoo.cli import main

ROOT = Path(__file__).resolve().parents[2]
FASHION_MNIST = ROOT / "configs/fashion_mnist/wn.yaml"
needs_fashion_mnist = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").exists(), reason="apt-get install dataset-fashion-mnist"
)
STEPS_PER_EPOCH = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")  # Fashion-MNIST unpacked once for the module


def small(root: Path, data_dir: Path) -> list[str]:
    """Overrides that shrink configs/fashion_mnist/wn.yaml to seconds; the commands are the README's otherwise."""
    return [
        f"--trainer.default_root_dir={root}", f"--data.init_args.data_dir={data_dir}", "--trainer.accelerator=cpu",
        "--data.init_args.train_size=400", f"--trainer.limit_train_batches={STEPS_PER_EPOCH}",
        "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=3", "--model.init_args.width=8",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
    ]  # fmt: skip


def state(cli) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in cli.model.state_dict().items()}


def initialized(cli) -> bool:
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, WeightNormalization)]
    return callback.state_dict()["initialized"]


def readme_resume_commands() -> list[list[str]]:
    """The README's three commands under "Checkpoints and resuming", as argument lists after `python -m zoo`."""
    section = (ROOT / "README.md").read_text().split("### Checkpoints and resuming", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert all(command[:3] == ["python", "-m", "zoo"] for command in commands), commands
    return [command[3:] for command in commands]


@needs_fashion_mnist
def test_the_readme_commands_fit_then_resume_then_test_the_trained_model(tmp_path, data_dir, caplog, monkeypatch):
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the repository
    caplog.set_level(logging.INFO)
    fit, resume, test = (command + small(tmp_path, data_dir) for command in readme_resume_commands())
    assert [fit[0], resume[0], test[0]] == ["fit", "fit", "test"]
    assert "--ckpt_path" not in fit and [c[c.index("--ckpt_path") + 1] for c in (resume, test)] == ["last", "last"]
    first = main(fit)
    assert "data-dependent init on" in caplog.text
    caplog.clear()
    checkpoint = tmp_path / "checkpoints/last.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["global_step"] == STEPS_PER_EPOCH and saved["epoch"] == 0
    trained = state(first)

    # nothing left to train: the restored weights come through untouched (no second init)
    same = main([*fit, "--ckpt_path", "last"])
    assert "data-dependent init" not in caplog.text and initialized(same)
    assert same.trainer.global_step == STEPS_PER_EPOCH
    for name, value in state(same).items():
        assert torch.equal(value, trained[name]), name

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = main(resume)
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]  # resuming is no surprise
    assert "data-dependent init" not in caplog.text
    assert resumed.trainer.global_step == 2 * STEPS_PER_EPOCH and resumed.trainer.current_epoch == 2
    adam = resumed.trainer.optimizers[0].state_dict()["state"]
    assert {int(s["step"]) for s in adam.values()} == {2 * STEPS_PER_EPOCH}  # the optimizer went on, not anew
    assert any(not torch.equal(value, trained[name]) for name, value in state(resumed).items())
    (expected,) = resumed.trainer.test(resumed.model, resumed.datamodule, verbose=False)

    tested = main(test)
    assert tested.trainer.callback_metrics["test/error"].item() == pytest.approx(expected["test/error"], abs=1e-6)
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 2 * STEPS_PER_EPOCH


@needs_fashion_mnist
def test_a_new_run_in_the_same_folder_writes_beside_the_old_checkpoints(tmp_path, data_dir):
    args = ["--config", str(FASHION_MNIST), *small(tmp_path, data_dir), "--trainer.max_epochs=1"]
    with pytest.warns(UserWarning, match="`--ckpt_path last`: no checkpoint in .* yet, so this fit starts a new run"):
        main(["fit", *args, "--ckpt_path", "last"])
    old = (tmp_path / "checkpoints/last.ckpt").read_bytes()
    with pytest.warns(UserWarning, match="Checkpoint directory .* exists and is not empty"):  # a new run still hears
        fresh = main(["fit", *args, "--seed_everything=1"])
    assert (tmp_path / "checkpoints/last.ckpt").read_bytes() == old
    assert (tmp_path / "checkpoints/last-v1.ckpt").is_file()
    tested = main(["test", "--config", str(FASHION_MNIST), *small(tmp_path, data_dir), "--ckpt_path", "last"])
    for name, value in state(tested).items():  # the newest run's weights
        assert torch.equal(value, fresh.model.state_dict()[name]), name


@needs_fashion_mnist
def test_model_options_a_checkpoint_overrides_are_named(tmp_path, data_dir):
    # Lightning rebuilds the model with the checkpoint's hyperparameters, over the config and the command line
    args = ["--config", str(FASHION_MNIST), *small(tmp_path, data_dir), "--trainer.max_epochs=1"]
    main(["fit", *args])
    with pytest.warns(UserWarning, match=r"checkpoint was trained with, not the config's: lr=0.001 \(asked: 0.05\)\. "
                      r".*in Python: `lightning_wn.load_from_checkpoint\(Model, path, option=value\)`"):
        resumed = main(["fit", *args, "--trainer.max_epochs=2", "--ckpt_path", "last", "--model.init_args.lr=0.05"])
    assert resumed.model.hparams.lr == 0.001
    loaded = lightning_wn.load_from_checkpoint(type(resumed.model), tmp_path / "checkpoints/last.ckpt", lr=0.05)
    assert loaded.hparams.lr == 0.05  # the call the warning names loads the weight-normalized checkpoint
    with pytest.warns(UserWarning, match=r"data options differ .*: train_size=300 \(trained: 400\), so the resumed"):
        main(["fit", *args, "--trainer.max_epochs=3", "--ckpt_path", "last", "--data.init_args.train_size=300"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the config it was trained with: nothing to name
        main(["test", "--config", str(FASHION_MNIST), *small(tmp_path, data_dir), "--ckpt_path", "last"])


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_evaluating_ckpt_path_last_without_a_checkpoint_is_an_error(subcommand, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([subcommand, "--config", str(FASHION_MNIST), f"--trainer.default_root_dir={tmp_path}", "--ckpt_path", "last"])
    error = capsys.readouterr().err
    assert f"error: `--ckpt_path last`: there is no last*.ckpt in `{tmp_path / 'checkpoints'}`" in error
    assert f"`python -m zoo {subcommand} --help`" in error


@needs_fashion_mnist
def test_fast_dev_run_and_disabled_checkpointing_write_no_checkpoints(tmp_path, data_dir):
    args = ["fit", "--config", str(FASHION_MNIST), *small(tmp_path, data_dir)]
    main([*args, "--trainer.fast_dev_run=true"])
    cli = main([*args, "--trainer.max_steps=2", "--trainer.enable_checkpointing=false"])
    assert cli.trainer.global_step == 2 and cli.trainer.checkpoint_callback is None
    assert list(tmp_path.rglob("*.ckpt")) == []


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("classifier")
    main(["fit", "--config", str(FASHION_MNIST), *small(root, data_dir), "--trainer.max_steps=2"])
    return root / "checkpoints/last.ckpt"


@needs_fashion_mnist
def test_a_checkpoint_of_another_model_class_is_refused_naming_both(classifier_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["test", f"--config={ROOT / 'configs/dqn/cartpole_plain.yaml'}", f"--ckpt_path={classifier_checkpoint}",
              f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    error = capsys.readouterr().err
    assert "is a checkpoint of `zoo.classifier.PaperClassifier`, but the config's model is `zoo.dqn.DQN`" in error


@needs_fashion_mnist
@pytest.mark.parametrize("args", [
    ["test", f"--config={ROOT / 'configs/fashion_mnist/none.yaml'}"],  # trained with weight norm, tested without
    ["fit", f"--config={FASHION_MNIST}", "--trainer.callbacks.init_args.exclude=[net.25]", "--trainer.max_steps=3"],
])  # fmt: skip
def test_a_checkpoint_of_another_form_of_the_model_is_one_error_line_naming_the_fix(args, classifier_checkpoint,
                                                                                     tmp_path, data_dir, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*args, *small(tmp_path, data_dir), f"--ckpt_path={classifier_checkpoint}"])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in error
    assert "error: `--ckpt_path`: the checkpoint's weights do not fit the model this config builds (" in error
    assert "key(s) in state_dict: " in error and "its run folder keeps a copy, config.yaml" in error


@needs_fashion_mnist
def test_a_state_dict_error_outside_the_checkpoint_restore_keeps_its_traceback(tmp_path, data_dir, monkeypatch):
    from zoo.classifier import PaperClassifier

    def load_wrong(self):  # a bug of the model's own, not a checkpoint that does not fit
        torch.nn.Linear(4, 8).load_state_dict(torch.nn.Linear(4, 16).state_dict())

    monkeypatch.setattr(PaperClassifier, "on_fit_start", load_wrong, raising=False)
    with pytest.raises(RuntimeError, match="Error.s. in loading state_dict for Linear"):
        main(["fit", f"--config={FASHION_MNIST}", *small(tmp_path, data_dir), "--trainer.max_steps=1"])


@pytest.mark.parametrize("content, fault", [(b"", "is empty"), (b"version https://git-lfs.github.com/spec/v1\n", "is a git-lfs pointer")])
def test_a_bad_ckpt_path_is_one_clear_error(content, fault, tmp_path, capsys):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(content)
    with pytest.raises(SystemExit):
        main(["test", "--config", str(FASHION_MNIST), f"--ckpt_path={bad}", f"--trainer.default_root_dir={tmp_path}"])
    assert f"error: `--ckpt_path`: `{bad}` {fault}" in capsys.readouterr().err
