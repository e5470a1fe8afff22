"""benchmarks/gpu_check.py (`make gpu-check`) says where it cannot run, and its checks run on the CPU too.

A GPU is lent rarely and by the minute: the checks' wiring is tested here, so that a day with one is
spent on the GPU's results, not on the script's bugs.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks/gpu_check.py"


def gpu_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, **(env or {})})  # fmt: skip


def passed(out: str) -> list[str]:
    return re.findall(r"^PASS (.+) \(\d+\.\d s\)$", out, re.M)


def test_without_cuda_it_says_it_needs_cuda_and_exits_0():
    done = gpu_check(env={"CUDA_VISIBLE_DEVICES": ""})  # no device, also on a machine that has one
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gpu_check needs CUDA" in done.stdout and "--accelerator cpu" in done.stdout
    assert "PASS" not in done.stdout and "FAIL" not in done.stdout  # nothing ran


def test_it_lists_a_fit_per_config_and_precision_and_refuses_unknown_checks():
    names = gpu_check("--list").stdout.splitlines()
    configs = sorted(p for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name != "presets")
    for config in configs:
        run = config.relative_to(ROOT / "configs").with_suffix("").as_posix()
        assert {f"fit {run} 16-mixed", f"fit {run} bf16-mixed"} <= set(names), run
    assert {"lstm", "ddp", "speed"} <= set(names) and len(names) == 2 * len(configs) + 3
    refused = gpu_check("--only", "fit imagenet/*")
    assert refused.returncode == 2 and "`--only 'fit imagenet/*'` matches no check" in refused.stderr
    assert "fit cifar10/wn bf16-mixed" in refused.stderr  # the valid names are listed


def test_a_dry_run_on_the_cpu_passes_the_lstm_and_a_config_fit():
    done = gpu_check("--accelerator", "cpu", "--only", "lstm", "fit dqn/cartpole_wn *")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert passed(done.stdout) == ["lstm", "fit dqn/cartpole_wn bf16-mixed"]  # bf16-mixed alone: no fp16 AMP on CPU
    assert re.search(r"^  final loss \d", done.stdout, re.M) and "2 of 2 checks passed" in done.stdout


@pytest.mark.slow
def test_a_dry_run_of_ddp_on_the_cpu_standardizes_the_init_batch_over_gloo():
    done = gpu_check("--accelerator", "cpu", "--only", "ddp")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert passed(done.stdout) == ["ddp"]
