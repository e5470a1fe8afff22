"""Cost of weight norm against plain layers, torch's own weight norm and batch norm.

    python benchmarks/weight_norm_speed.py                                  # everything, fp32 on CPU
    python benchmarks/weight_norm_speed.py --only dqn lstm --steps 50
    python benchmarks/weight_norm_speed.py --precision bf16-mixed           # Lightning's precision names
    python benchmarks/weight_norm_speed.py --device cuda --precision 16-mixed

Train steps run as Lightning runs them: the forward and loss under autocast for the mixed
precisions, backward and the Adam step outside it (through a gradient scaler for 16-mixed). Ours
runs as the WeightNormalization callback runs it, each forward inside ``lightning_wn.cached()``;
torch's weight norm runs both bare and inside ``torch.nn.utils.parametrize.cached()``.
Each benchmark runs in fresh processes of its own (3 by default), its cases side by side in each;
prints medians and the median ratio over processes with its range; exits 1 if a goal is missed.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_wn  # noqa: E402
from benchmarks.common import (  # noqa: E402
    PRECISIONS,
    autocast,
    compare,
    in_fresh_processes,
    keep_freed_memory,
    pin_threads,
    report,
    train_step,
)
from lightning_wn import apply_weight_norm, data_dependent_init, remove_weight_norm, weight_norm  # noqa: E402
from zoo.nets import CifarNet, NatureDQN  # noqa: E402

PLAIN, OURS = "plain", "weight norm (ours + cached())"  # the cases' names
THEIRS, THEIRS_CACHED = "weight norm (torch)", "weight norm (torch + parametrize.cached())"

OURS_SCOPE = lightning_wn.cached  # the WeightNormalization callback enters it around every step


def torch_weight_norm(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.utils.parametrizations.weight_norm(module)
    return model


def normalized(model: nn.Module) -> nn.Module:
    apply_weight_norm(model)
    return model


def weight_norm_cases(args, plain: nn.Module, ours: nn.Module, theirs: nn.Module, x, y) -> dict[str, Callable]:
    """Train steps of a plain model, ours, and torch's weight norm bare and cached, on ``args.device``."""
    plain, ours, theirs = plain.to(args.device), ours.to(args.device), theirs.to(args.device)
    p = args.precision
    return {
        PLAIN: train_step(plain, x, y, precision=p),
        OURS: train_step(ours, x, y, precision=p, scope=OURS_SCOPE),
        THEIRS: train_step(theirs, x, y, precision=p),
        THEIRS_CACHED: train_step(copy.deepcopy(theirs), x, y, precision=p, scope=nn.utils.parametrize.cached),
    }


def bench_cifar(args) -> dict[str, float]:
    x, y = torch.randn(100, 3, 32, 32, device=args.device), torch.randint(0, 10, (100,), device=args.device)
    plain = CifarNet(width=args.width)
    ours, theirs = normalized(copy.deepcopy(plain)), torch_weight_norm(copy.deepcopy(plain))
    cases = weight_norm_cases(args, plain, ours, theirs, x, y)
    batch_norm = CifarNet(width=args.width, norm="batch_norm").to(args.device)
    cases["batch norm"] = train_step(batch_norm, x, y, precision=args.precision)
    return compare(cases, steps=max(args.steps // 5, 5), warmup=2, device=args.device)


def bench_dqn(args) -> dict[str, float]:
    x = torch.randint(0, 256, (32, 4, 84, 84), dtype=torch.uint8, device=args.device)
    y = torch.randint(0, 6, (32,), device=args.device)
    plain = NatureDQN(num_actions=6)
    ours, theirs = normalized(copy.deepcopy(plain)), torch_weight_norm(copy.deepcopy(plain))
    cases = weight_norm_cases(args, plain, ours, theirs, x, y)
    return compare(cases, steps=3 * args.steps, device=args.device)  # a 16 ms step against a 5% goal: more samples


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
    x, y = torch.randn(100, 256, device=args.device), torch.randint(0, 256, (100,), device=args.device)
    plain = Unrolled(nn.LSTMCell(256, 256), steps=64)
    ours = copy.deepcopy(plain)
    weight_norm(ours.cell)
    theirs = copy.deepcopy(plain)
    for name in ("weight_ih", "weight_hh"):
        nn.utils.parametrizations.weight_norm(theirs.cell, name)
    cases = weight_norm_cases(args, plain, ours, theirs, x, y)
    return compare(cases, steps=max(args.steps // 2, 5), device=args.device)


def bench_init(args) -> dict[str, float]:
    # the callback runs the init inside Lightning's train-step context, so under autocast when mixed
    x, forward_context = torch.randn(500, 3, 32, 32, device=args.device), autocast(args.precision, args.device)
    model = normalized(CifarNet(width=args.width)).to(args.device)

    def forward() -> None:
        with torch.no_grad(), forward_context():
            model(x)

    def init() -> None:
        with forward_context():
            data_dependent_init(model, x)

    return compare({"no-grad forward": forward, "data-dependent init": init}, 5, 1, device=args.device)


def bench_fold(args) -> dict[str, float]:
    x, forward_context = torch.randn(100, 3, 32, 32, device=args.device), autocast(args.precision, args.device)
    plain = CifarNet(width=args.width).eval()
    folded = normalized(copy.deepcopy(plain))
    remove_weight_norm(folded)

    def infer(model: nn.Module):
        model.to(args.device)

        def run() -> None:
            with torch.inference_mode(), forward_context():  # as Lightning's predict step runs
                model(x)

        return run

    cases = {PLAIN: infer(plain), "folded": infer(folded)}
    return compare(cases, steps=max(args.steps // 2, 5), device=args.device)


BENCHES = {"cifar": bench_cifar, "dqn": bench_dqn, "lstm": bench_lstm, "init": bench_init, "fold": bench_fold}
TORCH_RATIOS = {"torch / plain": (THEIRS, PLAIN), "torch + cached() / plain": (THEIRS_CACHED, PLAIN)}
REPORTS = {  # title, the ratio (numerator, denominator) held against GOALS, and ratios shown as information
    "cifar": ("CIFAR-10 CNN train step (batch 100, width {width})", ("ours / plain", OURS, PLAIN),
              {**TORCH_RATIOS, "batch norm / ours": ("batch norm", OURS)}),
    "dqn": ("Nature DQN train step (batch 32, 4x84x84)", ("ours / plain", OURS, PLAIN), TORCH_RATIOS),
    "lstm": ("LSTMCell(256, 256) unrolled 64 steps, train step (batch 100)", ("ours / plain", OURS, PLAIN),
             TORCH_RATIOS),
    "init": ("data-dependent init, CIFAR-10 CNN, 500 examples (width {width})",
             ("init / forward", "data-dependent init", "no-grad forward"), {}),
    "fold": ("inference after folding (batch 100)", ("folded / plain", "folded", PLAIN), {}),
}  # fmt: skip
GOALS = {  # each benchmark's goal at each precision; a benchmark missing here only prints its ratio
    "32": {"cifar": 1.03, "dqn": 1.05, "lstm": 1.10, "init": 1.5, "fold": 1.01},
    "bf16-mixed": {"cifar": 1.05, "dqn": 1.05, "lstm": 1.05},
    "16-mixed": {"cifar": 1.05, "dqn": 1.05, "lstm": 1.05},
}


def autocast_refusal(precision: str, device: str) -> str | None:
    """Why autocast cannot run ``precision`` on ``device`` here, or None if a matmul comes out in its dtype."""
    if PRECISIONS[precision] is None:
        return None
    a = torch.ones(2, 2, device=device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unsupported dtype is a warning and fp32, not an error
            with autocast(precision, device)():
                dtype = torch.mm(a, a).dtype
    except RuntimeError as error:  # a GPU without bfloat16
        return str(error)
    if dtype != PRECISIONS[precision]:
        return f"a matmul under torch.autocast({device!r}, dtype={PRECISIONS[precision]}) came out in {dtype}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), default=list(BENCHES))
    parser.add_argument("--steps", type=int, default=40, help="timed steps per case (CIFAR: a fifth, DQN: three times)")
    parser.add_argument("--width", type=int, default=96, help="CIFAR net width (96 in the paper)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per benchmark (median ratio)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="32", help="Lightning's names")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
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
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("`--device cuda` needs a CUDA device, and torch sees none: use `--device cpu`")
    refusal = autocast_refusal(args.precision, args.device)
    if refusal is not None:
        runs = [p for p in PRECISIONS if autocast_refusal(p, args.device) is None]
        parser.error(f"`--precision {args.precision}` does not run on `--device {args.device}` with torch "
                     f"{torch.__version__} ({refusal}); there, choose `--precision` from {runs}.")  # fmt: skip
    print(f"# precision {args.precision} on {args.device}, {args.threads} threads. Ours runs as the "
          "WeightNormalization callback runs it, each forward inside lightning_wn.cached().")  # fmt: skip
    if args.precision == "16-mixed" and args.device == "cpu":
        print("# Lightning's Trainer runs `16-mixed` on CPU as `bf16-mixed`: these fp16 timings are not what it runs.")
    missed = []
    for name in args.only:
        argv = [__file__, "--worker", "--only", name, "--steps", str(args.steps), "--width", str(args.width),
                "--threads", str(args.threads), "--precision", args.precision, "--device", args.device]  # fmt: skip
        title, (label, a, b), information = REPORTS[name]
        ratios = {label: (a, b, GOALS[args.precision].get(name))}
        ratios.update({info: (num, den, None) for info, (num, den) in information.items()})
        title = f"{title.format(width=args.width)}; precision {args.precision} on {args.device}"
        missed += report(title, in_fresh_processes(argv, args.processes), ratios)
    if missed:
        print("\nMissed goals:\n  " + "\n  ".join(missed))
        sys.exit(1)


if __name__ == "__main__":
    main()
