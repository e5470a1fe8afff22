"""Side-by-side timing: interleaved runs, warm-up, medians; the machine is noisy, ratios are not."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # Lightning's names: autocast dtype


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


def compare(
    cases: dict[str, Callable[[], object]], steps: int, warmup: int = 3, *, device: str = "cpu"
) -> dict[str, float]:
    """Median seconds per call of each case, calls interleaved so drift hits all alike.

    The order rotates every step: a case's speed depends on what ran just before it (glibc's
    allocator returns freed memory to the system and the next case pays the page faults; the
    third of three identical DQN train steps measured 25% slower in a fixed order). On CUDA each
    call is timed between two synchronizations, so it pays for its own kernels and no one else's.
    """
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    for step in range(steps):
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            cases[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def autocast(precision: str, device: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A fresh context per call that runs a forward at ``precision`` (one of ``PRECISIONS``), as Lightning does.

    ``cache_enabled=False`` as in Lightning's ``MixedPrecision``: a plain layer's weight is cast
    again at every call (64 times per forward in an unrolled LSTMCell), as a computed one is.
    """
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device, dtype=dtype, cache_enabled=False)


def train_step(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    precision: str = "32",
    scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Callable[[], None]:
    """One forward + backward + Adam step of a classifier on a fixed batch, as Lightning runs it at ``precision``.

    The forward and the loss run inside ``scope()`` (a weight cache) and autocast; backward and the
    optimizer step run outside both, through a gradient scaler for ``16-mixed``, as in Lightning's
    ``MixedPrecision``.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    forward_context = autocast(precision, inputs.device.type)
    scaler = torch.amp.GradScaler(inputs.device.type) if precision == "16-mixed" else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with scope(), forward_context():
            loss = loss_fn(model(inputs), targets)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return step


def in_fresh_processes(argv: list[str], processes: int) -> list[dict]:
    """Run ``python *argv`` ``processes`` times, one after another; each prints a JSON line last.

    A process's heap layout is one draw: the same DQN comparison measured 1.037 to 1.050 across
    fresh processes, and about 0.7% higher when another benchmark's models had run before it
    in the same process. Each benchmark therefore gets processes of its own, and their median.
    """
    runs = []
    for _ in range(processes):
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"benchmark process {argv} failed:\n{done.stderr}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs


def report(title: str, runs: list[dict[str, float]], ratios: dict[str, tuple[str, str, float | None]]) -> list[str]:
    """Print medians and ``a / b`` ratios against their goals; return the lines that missed.

    ``runs`` holds each process's median seconds per case. A ratio is taken within each process
    (side by side) and its median over processes is held against the goal; the range follows.
    """
    print(f"\n## {title} (median of {len(runs)} process{'es' if len(runs) > 1 else ''})")
    width = max(28, *map(len, runs[0]), *map(len, ratios))
    for name in runs[0]:
        print(f"  {name:<{width}} {statistics.median(run[name] for run in runs) * 1e3:9.2f} ms")
    missed = []
    for label, (a, b, goal) in ratios.items():
        each = sorted(run[a] / run[b] for run in runs)
        ratio = statistics.median(each)
        spread = f"  ({each[0]:.3f} to {each[-1]:.3f})" if len(each) > 1 else ""
        verdict = "" if goal is None else ("  ok" if ratio <= goal else "  MISSED")
        line = f"  {label:<{width}} {ratio:9.3f}{spread}" + ("" if goal is None else f"  (goal <= {goal})") + verdict
        print(line)
        if verdict == "  MISSED":
            missed.append(f"{title}: {line.strip()}")
    return missed
