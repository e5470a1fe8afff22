"""Side-by-side timing: interleaved runs, warm-up, medians; the machine is noisy, ratios are not."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def pin_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


def keep_freed_memory() -> None:
    """Stop glibc's allocator handing freed memory back to the system (a no-op on other C libraries).

    By default glibc moves its thresholds as blocks are freed, and with several models in one
    process one of them can end up re-faulting its large buffers every step: one of three
    identical DQN train steps measured 18-28% slower for a whole run. Kept memory makes every
    case run as a long training run settles, without page faults.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_mmap_threshold, 1 << 30)


def compare(cases: dict[str, Callable[[], object]], steps: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each case, calls interleaved so drift hits all alike.

    The order rotates every step: a case's speed depends on what ran just before it (glibc's
    allocator returns freed memory to the system and the next case pays the page faults; the
    third of three identical DQN train steps measured 25% slower in a fixed order).
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    for step in range(steps):
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def train_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Callable[[], None]:
    """One forward + backward + Adam step of a classifier on a fixed batch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(inputs), targets).backward()
        optimizer.step()

    return step


def report(title: str, medians: dict[str, float], ratios: dict[str, tuple[str, str, float | None]]) -> list[str]:
    """Print medians and ``a / b`` ratios against their goals; return the lines that missed."""
    print(f"\n## {title}")
    for name, seconds in medians.items():
        print(f"  {name:<28} {seconds * 1e3:9.2f} ms")
    missed = []
    for label, (a, b, goal) in ratios.items():
        ratio = medians[a] / medians[b]
        verdict = "" if goal is None else ("  ok" if ratio <= goal else "  MISSED")
        line = f"  {label:<28} {ratio:9.3f}" + ("" if goal is None else f"  (goal <= {goal})") + verdict
        print(line)
        if verdict == "  MISSED":
            missed.append(f"{title}: {line.strip()}")
    return missed
