"""`pip install lightning-wn` holds what the library imports, and the library works with nothing more.

The zoo's stack is the `zoo` extra. A fresh environment would mean another torch (5.5 GB), so the
install without the zoo is this environment seen through a folder of links to its site-packages, less
the zoo's distributions (their modules and their metadata both: Lightning and torchmetrics decide from
the metadata whether to import an optional package). A subprocess on that folder alone normalizes,
initializes and fits a model.
"""

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
# distribution: its module. torchmetrics is the zoo's too, but Lightning itself requires and imports it
ZOO_ONLY = {"torchvision": "torchvision", "jsonargparse": "jsonargparse", "tensorboard": "tensorboard",
            "matplotlib": "matplotlib", "gymnasium": "gymnasium", "ale-py": "ale_py", "mlxtend": "mlxtend"}  # fmt: skip
# typing_extensions: callback.py's `override`; torch and Lightning both require it
CORE_IMPORTS = {"torch", "lightning", "typing_extensions"}


def site_packages_without(distributions: list[str], folder: Path) -> Path:
    """``folder`` filled with links to this environment's site-packages, except ``distributions``' files."""
    left_out = set()
    for name in distributions:
        try:
            files = importlib.metadata.distribution(name).files
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here: absent already
        assert files, f"{name} lists no files: cannot leave it out"
        left_out |= {Path(f).parts[0] for f in files} - {"..", "__pycache__"}  # scripts in bin/; shared caches
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name not in left_out:
            (folder / entry.name).symlink_to(entry)
    return folder


WITHOUT_THE_ZOO = """
import importlib.metadata, importlib.util, json, site, sys

site_packages, *hidden = sys.argv[1:]
site.addsitedir(site_packages)  # run under -S: this folder is the only site-packages, its .pth files read
for name in hidden:  # the simulation holds: not importable, not installed
    assert importlib.util.find_spec(name) is None, name
    try:
        importlib.metadata.version(name)
        raise AssertionError(f"{name} still has metadata")
    except importlib.metadata.PackageNotFoundError:
        pass

import torch
from torch import nn

import lightning_wn
from lightning.pytorch import LightningModule, Trainer, seed_everything

seed_everything(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
normalized = lightning_wn.apply_weight_norm(model)
x = torch.randn(256, 3, 8, 8) * 3 + 1
lightning_wn.data_dependent_init(model, x)
with torch.no_grad():
    conv, out = model[0](x), model(x)  # (256, 8, 6, 6), (256, 4)
init = {
    "conv_mean": conv.mean(dim=(0, 2, 3)).abs().max().item(),
    "conv_std": (conv.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max().item(),
    "out_mean": out.mean(0).abs().max().item(),
    "out_std": (out.std(0, unbiased=False) - 1).abs().max().item(),
}


class Tiny(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
        self.losses = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


data = torch.utils.data.TensorDataset(torch.randn(64, 10), torch.randint(0, 3, (64,)))
callback = lightning_wn.WeightNormalization(init_samples=32)
trainer = Trainer(accelerator="cpu", deterministic=True, max_steps=3, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
tiny = Tiny()
trainer.fit(tiny, torch.utils.data.DataLoader(data, batch_size=16))
print(json.dumps({
    "normalized": normalized,
    "init": init,
    "fit_normalized": callback.normalized,
    "fit_steps": trainer.global_step,
    "fit_losses": tiny.losses,
    "imported": sorted({name.partition(".")[0] for name in sys.modules} & {*hidden, "zoo"}),
}))
"""


def test_the_core_dependencies_are_torch_and_lightning_and_the_zoo_is_an_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda requirements: {Requirement(r).name for r in requirements}  # noqa: E731
    assert names(project["dependencies"]) == {"torch", "lightning"}
    extras = project["optional-dependencies"]
    zoo = {"torchvision", "torchmetrics", "jsonargparse", "tensorboard", "matplotlib", "gymnasium"}
    assert names(extras["zoo"]) == zoo
    assert "lightning-wn" in names(extras["test"]) and "zoo" in Requirement(extras["test"][0]).extras
    assert names(extras["offline-data"]) == {"mlxtend"}
    shown = re.findall(r'pip install "?lightning-wn(?:\[([\w,-]+)\])?', (ROOT / "README.md").read_text())
    assert {extra for group in shown for extra in group.split(",") if extra} == {"zoo", "offline-data"}  # all exist


def test_the_library_imports_nothing_beyond_its_core_dependencies():
    imported = set()
    for path in (ROOT / "lightning_wn").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.partition(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"__future__", "lightning_wn"}
    assert third_party <= CORE_IMPORTS, f"lightning_wn/ imports {sorted(third_party - CORE_IMPORTS)}: not core"
    assert {"torch", "lightning"} <= third_party


def test_the_library_normalizes_initializes_and_fits_without_the_zoos_packages(tmp_path):
    site_packages = site_packages_without(list(ZOO_ONLY), tmp_path)
    command = [sys.executable, "-S", "-c", WITHOUT_THE_ZOO, str(site_packages), *ZOO_ONLY.values()]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["normalized"] == ["0", "3"]
    init = result["init"]  # every unit standardized on the init batch
    assert init["conv_mean"] < 1e-4 and init["conv_std"] < 1e-4, init
    assert init["out_mean"] < 1e-4 and init["out_std"] < 1e-4, init
    assert result["fit_normalized"] == ["net.0", "net.2"] and result["fit_steps"] == 3
    losses = result["fit_losses"]
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses), losses  # 3 classes: ln 3 = 1.1 at chance
    assert result["imported"] == []  # neither the hidden packages nor the zoo came in another way
