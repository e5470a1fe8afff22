"""Cost of weight norm against plain layers, torch's own weight norm and batch norm.

    python benchmarks/weight_norm_speed.py            # everything, paper-sized CIFAR net
    python benchmarks/weight_norm_speed.py --only dqn lstm --steps 50

Prints medians and ratios measured side by side in one run; exits 1 if a goal is missed.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import compare, keep_freed_memory, pin_threads, report, train_step  # noqa: E402
from lightning_wn import apply_weight_norm, data_dependent_init, remove_weight_norm, weight_norm  # noqa: E402
from zoo.nets import CifarNet, NatureDQN  # noqa: E402


def torch_weight_norm(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.utils.parametrizations.weight_norm(module)
    return model


def normalized(model: nn.Module) -> nn.Module:
    apply_weight_norm(model)
    return model


def bench_cifar(args) -> list[str]:
    x, y = torch.randn(100, 3, 32, 32), torch.randint(0, 10, (100,))
    plain = CifarNet(width=args.width)
    cases = {
        "plain": train_step(plain, x, y),
        "weight norm (ours)": train_step(normalized(copy.deepcopy(plain)), x, y),
        "weight norm (torch)": train_step(torch_weight_norm(copy.deepcopy(plain)), x, y),
        "batch norm": train_step(CifarNet(width=args.width, norm="batch_norm"), x, y),
    }
    medians = compare(cases, steps=max(args.steps // 5, 5), warmup=2)
    return report(
        f"CIFAR-10 CNN train step (batch 100, width {args.width})",
        medians,
        {
            "ours / plain": ("weight norm (ours)", "plain", 1.03),
            "torch / plain": ("weight norm (torch)", "plain", None),
            "batch norm / ours": ("batch norm", "weight norm (ours)", None),
        },
    )


def bench_dqn(args) -> list[str]:
    x, y = torch.randint(0, 256, (32, 4, 84, 84), dtype=torch.uint8), torch.randint(0, 6, (32,))
    plain = NatureDQN(num_actions=6)
    cases = {
        "plain": train_step(plain, x, y),
        "weight norm (ours)": train_step(normalized(copy.deepcopy(plain)), x, y),
        "weight norm (torch)": train_step(torch_weight_norm(copy.deepcopy(plain)), x, y),
    }
    medians = compare(cases, steps=3 * args.steps)  # a 16 ms step against a 5% goal: more samples
    return report(
        "Nature DQN train step (batch 32, 4x84x84)",
        medians,
        {"ours / plain": ("weight norm (ours)", "plain", 1.05), "torch / plain": ("weight norm (torch)", "plain", None)},
    )


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


def bench_lstm(args) -> list[str]:
    x, y = torch.randn(100, 256), torch.randint(0, 256, (100,))
    plain = Unrolled(nn.LSTMCell(256, 256), steps=64)
    ours = copy.deepcopy(plain)
    weight_norm(ours.cell)
    theirs = copy.deepcopy(plain)
    for name in ("weight_ih", "weight_hh"):
        nn.utils.parametrizations.weight_norm(theirs.cell, name)
    cases = {
        "plain": train_step(plain, x, y),
        "weight norm (ours)": train_step(ours, x, y),
        "weight norm (torch)": train_step(theirs, x, y),
    }
    medians = compare(cases, steps=max(args.steps // 2, 5))
    return report(
        "LSTMCell(256, 256) unrolled 64 steps, train step (batch 100)",
        medians,
        {"ours / plain": ("weight norm (ours)", "plain", 1.10), "torch / plain": ("weight norm (torch)", "plain", None)},
    )


def bench_init(args) -> list[str]:
    x = torch.randn(500, 3, 32, 32)
    model = normalized(CifarNet(width=args.width))

    def forward() -> None:
        with torch.no_grad():
            model(x)

    medians = compare({"no-grad forward": forward, "data-dependent init": lambda: data_dependent_init(model, x)}, 5, 1)
    return report(
        f"data-dependent init, CIFAR-10 CNN, 500 examples (width {args.width})",
        medians,
        {"init / forward": ("data-dependent init", "no-grad forward", 1.5)},
    )


def bench_fold(args) -> list[str]:
    x = torch.randn(100, 3, 32, 32)
    plain = CifarNet(width=args.width).eval()
    folded = normalized(copy.deepcopy(plain))
    remove_weight_norm(folded)

    def infer(model: nn.Module):
        def run() -> None:
            with torch.inference_mode():
                model(x)

        return run

    medians = compare({"plain": infer(plain), "folded": infer(folded)}, steps=max(args.steps // 2, 5))
    return report("inference after folding (batch 100)", medians, {"folded / plain": ("folded", "plain", 1.01)})


BENCHES = {"cifar": bench_cifar, "dqn": bench_dqn, "lstm": bench_lstm, "init": bench_init, "fold": bench_fold}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), default=list(BENCHES))
    parser.add_argument("--steps", type=int, default=40, help="timed steps per case (CIFAR: a fifth, DQN: three times)")
    parser.add_argument("--width", type=int, default=96, help="CIFAR net width (96 in the paper)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    pin_threads(args.threads)
    keep_freed_memory()
    torch.manual_seed(0)
    missed = [line for name in args.only for line in BENCHES[name](args)]
    if missed:
        print("\nMissed goals:\n  " + "\n  ".join(missed))
        sys.exit(1)


if __name__ == "__main__":
    main()
