"""Cost of weight norm against plain layers, torch's own weight norm and batch norm.

    python benchmarks/weight_norm_speed.py            # everything, paper-sized CIFAR net
    python benchmarks/weight_norm_speed.py --only dqn lstm --steps 50

Each benchmark runs in fresh processes of its own (3 by default), its cases side by side in each;
prints medians and the median ratio over processes with its range; exits 1 if a goal is missed.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import compare, in_fresh_processes, keep_freed_memory, pin_threads, report, train_step  # noqa: E402
from lightning_wn import apply_weight_norm, data_dependent_init, remove_weight_norm, weight_norm  # noqa: E402
from zoo.nets import CifarNet, NatureDQN  # noqa: E402

OURS, PLAIN, THEIRS = "weight norm (ours)", "plain", "weight norm (torch)"  # the cases' names


def torch_weight_norm(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.utils.parametrizations.weight_norm(module)
    return model


def normalized(model: nn.Module) -> nn.Module:
    apply_weight_norm(model)
    return model


def bench_cifar(args) -> dict[str, float]:
    x, y = torch.randn(100, 3, 32, 32), torch.randint(0, 10, (100,))
    plain = CifarNet(width=args.width)
    cases = {
        PLAIN: train_step(plain, x, y),
        OURS: train_step(normalized(copy.deepcopy(plain)), x, y),
        THEIRS: train_step(torch_weight_norm(copy.deepcopy(plain)), x, y),
        "batch norm": train_step(CifarNet(width=args.width, norm="batch_norm"), x, y),
    }
    return compare(cases, steps=max(args.steps // 5, 5), warmup=2)


def bench_dqn(args) -> dict[str, float]:
    x, y = torch.randint(0, 256, (32, 4, 84, 84), dtype=torch.uint8), torch.randint(0, 6, (32,))
    plain = NatureDQN(num_actions=6)
    cases = {
        PLAIN: train_step(plain, x, y),
        OURS: train_step(normalized(copy.deepcopy(plain)), x, y),
        THEIRS: train_step(torch_weight_norm(copy.deepcopy(plain)), x, y),
    }
    return compare(cases, steps=3 * args.steps)  # a 16 ms step against a 5% goal: more samples


class Unrolled(nn.Module):
    """An LSTMCell called ``steps`` times per forward, as DRAW's encoder and decoder are."""

    def __init__(self, cell: nn.LSTMCell, steps: int) -> None:
        super().__init__()
        self.cell, self.steps = cell, steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = c = x.new_zeros(x.shape[0], self.cell.hidden_size)
        outputs = []
        for _ in range(self.steps):
            h, c = self.cell(x, (h, c))
            outputs.append(h)
        return torch.stack(outputs).mean(0)


def bench_lstm(args) -> dict[str, float]:
    x, y = torch.randn(100, 256), torch.randint(0, 256, (100,))
    plain = Unrolled(nn.LSTMCell(256, 256), steps=64)
    ours = copy.deepcopy(plain)
    weight_norm(ours.cell)
    theirs = copy.deepcopy(plain)
    for name in ("weight_ih", "weight_hh"):
        nn.utils.parametrizations.weight_norm(theirs.cell, name)
    cases = {
        PLAIN: train_step(plain, x, y),
        OURS: train_step(ours, x, y),
        THEIRS: train_step(theirs, x, y),
    }
    return compare(cases, steps=max(args.steps // 2, 5))


def bench_init(args) -> dict[str, float]:
    x = torch.randn(500, 3, 32, 32)
    model = normalized(CifarNet(width=args.width))

    def forward() -> None:
        with torch.no_grad():
            model(x)

    return compare({"no-grad forward": forward, "data-dependent init": lambda: data_dependent_init(model, x)}, 5, 1)


def bench_fold(args) -> dict[str, float]:
    x = torch.randn(100, 3, 32, 32)
    plain = CifarNet(width=args.width).eval()
    folded = normalized(copy.deepcopy(plain))
    remove_weight_norm(folded)

    def infer(model: nn.Module):
        def run() -> None:
            with torch.inference_mode():
                model(x)

        return run

    return compare({PLAIN: infer(plain), "folded": infer(folded)}, steps=max(args.steps // 2, 5))


BENCHES = {"cifar": bench_cifar, "dqn": bench_dqn, "lstm": bench_lstm, "init": bench_init, "fold": bench_fold}
REPORTS = {  # title, and ratios (numerator, denominator, goal or None) of each benchmark's cases
    "cifar": ("CIFAR-10 CNN train step (batch 100, width {width})", {
        "ours / plain": (OURS, PLAIN, 1.03), "torch / plain": (THEIRS, PLAIN, None),
        "batch norm / ours": ("batch norm", OURS, None)}),
    "dqn": ("Nature DQN train step (batch 32, 4x84x84)", {
        "ours / plain": (OURS, PLAIN, 1.05), "torch / plain": (THEIRS, PLAIN, None)}),
    "lstm": ("LSTMCell(256, 256) unrolled 64 steps, train step (batch 100)", {
        "ours / plain": (OURS, PLAIN, 1.10), "torch / plain": (THEIRS, PLAIN, None)}),
    "init": ("data-dependent init, CIFAR-10 CNN, 500 examples (width {width})", {
        "init / forward": ("data-dependent init", "no-grad forward", 1.5)}),
    "fold": ("inference after folding (batch 100)", {"folded / plain": ("folded", PLAIN, 1.01)}),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), default=list(BENCHES))
    parser.add_argument("--steps", type=int, default=40, help="timed steps per case (CIFAR: a fifth, DQN: three times)")
    parser.add_argument("--width", type=int, default=96, help="CIFAR net width (96 in the paper)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per benchmark (median ratio)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one benchmark, medians as JSON
    args = parser.parse_args()
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")
    if args.worker:
        pin_threads(args.threads)
        keep_freed_memory()
        torch.manual_seed(0)
        print(json.dumps(BENCHES[args.only[0]](args)))
        return
    missed = []
    for name in args.only:
        argv = [__file__, "--worker", "--only", name, "--steps", str(args.steps), "--width", str(args.width),
                "--threads", str(args.threads)]  # fmt: skip
        title, ratios = REPORTS[name]
        missed += report(title.format(width=args.width), in_fresh_processes(argv, args.processes), ratios)
    if missed:
        print("\nMissed goals:\n  " + "\n  ".join(missed))
        sys.exit(1)


if __name__ == "__main__":
    main()
