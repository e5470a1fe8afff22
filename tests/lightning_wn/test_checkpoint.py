"""A file that is not a Lightning checkpoint gets one error naming the file and its fault."""

import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

import lightning_wn
from lightning_wn import read_checkpoint
from lightning_wn.init import INITIALIZED

sys.path.insert(0, str(Path(__file__).parent))
from lit_models import ConvClassifier  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "model.ckpt"
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(ConvClassifier())
    trainer.save_checkpoint(path)
    return path


def bad_files(directory, good):
    """name -> (path, what the error must say)"""
    data = good.read_bytes()
    files = {
        "empty": (b"", "is empty \\(0 bytes\\)"),
        "truncated": (data[: len(data) // 2], "cannot be read as a checkpoint: .* It may be truncated"),
        "git-lfs pointer": (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n", "git-lfs pointer.*git lfs pull"),
        "text": (b"hello\n", "cannot be read as a checkpoint"),
    }
    paths = {}
    for name, (content, message) in files.items():
        (directory / f"{name}.ckpt").write_bytes(content)
        paths[name] = (directory / f"{name}.ckpt", message)
    torch.save(ConvClassifier().state_dict(), directory / "state_dict.pt")
    paths["bare state dict"] = (directory / "state_dict.pt", "bare state dict .*model.load_state_dict.*fold_state_dict")
    torch.save({"epoch": 3}, directory / "other.pt")
    paths["other dict"] = (directory / "other.pt", "not a Lightning checkpoint .*keys \\['epoch'\\]")
    torch.save([1, 2], directory / "list.pt")
    paths["list"] = (directory / "list.pt", "not a Lightning checkpoint .*a list")
    return paths


def test_a_good_checkpoint_reads_as_lightning_wrote_it(checkpoint):
    assert torch.equal(read_checkpoint(checkpoint)["state_dict"]["net.0.weight"], torch.load(checkpoint)["state_dict"]["net.0.weight"])


@pytest.mark.parametrize("kind", ["empty", "truncated", "git-lfs pointer", "text", "bare state dict", "other dict", "list"])
def test_bad_files_get_an_error_naming_the_file_and_the_fault(kind, checkpoint, tmp_path):
    path, message = bad_files(tmp_path, checkpoint)[kind]
    for read in (read_checkpoint, lambda p: lightning_wn.load_from_checkpoint(ConvClassifier, p)):
        with pytest.raises(ValueError, match=f"^`{path}` .*{message}"):
            read(path)


def test_a_missing_file_or_a_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.ckpt` does not exist"):
        read_checkpoint(tmp_path / "nothing.ckpt")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        read_checkpoint(tmp_path)


class Recurrent(LightningModule):
    def __init__(self):
        super().__init__()
        self.rnn, self.cell, self.head = nn.LSTM(3, 4), nn.GRUCell(4, 4), nn.Linear(4, 2)


def test_load_from_checkpoint_marks_the_layers_it_loaded_beside_recurrent_ones(tmp_path):
    # recurrent layers have no `weight` (and the init skips them): only the layers with one are marked
    trained = Recurrent()
    lightning_wn.apply_weight_norm(trained, include=["rnn", "cell", "head"])
    torch.save({"state_dict": trained.state_dict(), "pytorch-lightning_version": "2.6.6"}, path := tmp_path / "r.ckpt")
    loaded = lightning_wn.load_from_checkpoint(Recurrent, path)
    marks = {name: getattr(m, INITIALIZED, False) for name, m in loaded.named_children()}
    assert marks == {"rnn": False, "cell": False, "head": True}
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded.head(x), trained.head(x))
