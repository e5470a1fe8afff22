"""The main job: the paper's CIFAR-10 comparison, small enough for a 2-core CPU, on real offline data.

    python -m zoo.compare                 # Fashion-MNIST from Debian's dataset-fashion-mnist
    python -m zoo.compare --epochs 20 --width 32 --train-size 0   # closer to the configs

Trains the paper's network four ways through the zoo's LightningCLI (the YAML files in
``configs/fashion_mnist/``, narrowed and shortened by command-line overrides), then prints test
error, seconds per epoch and step time relative to the un-normalized network, and draws training
loss and test error per epoch, as in the paper's CIFAR-10 figure.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from zoo.cli import main as zoo_cli  # noqa: E402

VARIANTS = {  # config file -> label in the paper's terms
    "none": "no normalization (data init)",
    "wn": "weight norm",
    "bn": "batch norm",
    "wn_mobn": "weight norm + mean-only BN",
}


class Recorder(Callback):
    """Per epoch: mean training loss, validation (here: test) error, seconds; per step: seconds."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.epochs: list[dict[str, float]] = []
        self.step_seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_seconds.append(time.perf_counter() - self._step_start)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        seconds = time.perf_counter() - self._epoch_start
        metrics = trainer.callback_metrics
        self.epochs.append(
            {"loss": float(metrics["train/loss_epoch"]), "error": float(metrics["val/error"]), "seconds": seconds}
        )
        epoch = self.epochs[-1]
        print(f"  {self.label:<28} epoch {len(self.epochs):>2}: loss {epoch['loss']:.4f}, "
              f"test error {epoch['error']:.2%}, {seconds:.1f} s", flush=True)  # fmt: skip


def run_variant(config: str, label: str, args: argparse.Namespace) -> tuple[Recorder, float]:
    overrides = [
        f"--trainer.max_epochs={args.epochs}",
        f"--trainer.default_root_dir={args.out / config}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--model.init_args.width={args.width}",
        f"--data.init_args.train_size={args.train_size or 'null'}",
        f"--data.init_args.data_dir={args.data_dir}",
    ]
    cli = zoo_cli(["--config", str(args.configs / f"{config}.yaml"), *overrides], run=False)
    recorder = Recorder(label)
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule)
    (result,) = cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    return recorder, result["test/error"]


def plot(records: dict[str, Recorder], path: Path) -> None:
    figure, (loss_axis, error_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for label, recorder in records.items():
        epochs = range(1, len(recorder.epochs) + 1)
        loss_axis.plot(epochs, [e["loss"] for e in recorder.epochs], marker="o", label=label)
        error_axis.plot(epochs, [100 * e["error"] for e in recorder.epochs], marker="o", label=label)
    loss_axis.set(xlabel="epoch", ylabel="training loss", yscale="log", title="Training loss")
    error_axis.set(xlabel="epoch", ylabel="test error (%)", title="Test error")
    for axis in (loss_axis, error_axis):
        axis.grid(alpha=0.3)
    error_axis.legend()
    figure.suptitle("The paper's CIFAR-10 network on Fashion-MNIST (2-core CPU run)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--width", type=int, default=16, help="channels of the first block (96 in the paper)")
    parser.add_argument("--train-size", type=int, default=24000, help="training examples; 0 for all 60,000")
    parser.add_argument("--configs", type=Path, default=Path("configs/fashion_mnist"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # our own arguments are in argv

    records, test_errors = {}, {}
    for config, label in VARIANTS.items():
        print(f"\n{label}: python -m zoo fit --config {args.configs / config}.yaml (narrowed)", flush=True)
        records[label], test_errors[label] = run_variant(config, label, args)
    baseline = statistics.median(records[VARIANTS["none"]].step_seconds)
    print(f"\n{'variant':<30} {'test error':>10} {'s / epoch':>10} {'step time':>10}")
    for label, recorder in records.items():
        per_epoch = statistics.mean(e["seconds"] for e in recorder.epochs)
        relative = statistics.median(recorder.step_seconds) / baseline
        print(f"{label:<30} {test_errors[label]:>10.2%} {per_epoch:>10.1f} {relative:>9.2f}x")
    figure = args.out / "fashion_mnist.png"
    plot(records, figure)
    print(f"\nLearning curves: {figure}")


if __name__ == "__main__":
    main()
