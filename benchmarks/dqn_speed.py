"""How close DQN's Lightning training loop comes to the speed of its parts, on Space Invaders.

    python benchmarks/dqn_speed.py                 # 5 rounds, plain and weight-normalized
    python benchmarks/dqn_speed.py --rounds 3 --updates 150

Measures, in interleaved rounds (medians reported):
  (a) environment steps per second of the environments alone (random actions),
  (b) seconds per learning update alone (TD loss, backward, Adamax step on a sampled batch),
  (c) environment steps per second of the whole training loop (``Trainer.fit``: acting with the
      network at the final epsilon, replay sampling, the update, logging), after learning starts.
Without overhead, (c) would be the bound 1 / (1/a + b / train_frequency); the goal is (c) >= 0.9 x bound.
Exits 1 if a goal is missed.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from lightning.pytorch import Callback, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import compare, keep_freed_memory, pin_threads  # noqa: E402
from lightning_wn import WeightNormalization, apply_weight_norm  # noqa: E402
from zoo.data.envs import make_vector_env  # noqa: E402
from zoo.dqn import DQN  # noqa: E402

ENV = "ALE/SpaceInvaders-v5"
SETTINGS = {"env_id": ENV, "num_envs": 4, "train_frequency": 4, "batch_size": 32, "optimizer": "Adamax",
            "buffer_size": 20_000, "learning_starts": 2_000, "epsilon_start": 0.01, "epsilon_end": 0.01,
            "compile_optimizer": True}  # as the Space Invaders configs  # fmt: skip


def env_steps_per_second(seconds: float) -> float:
    env = make_vector_env(ENV, SETTINGS["num_envs"])
    env.reset(seed=0)
    rng, steps, start = np.random.default_rng(0), 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        env.step(rng.integers(env.single_action_space.n, size=env.num_envs))
        steps += env.num_envs
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def seconds_per_update(updates: int) -> dict[str, float]:
    """Median seconds of one update (plain and weight-normalized, interleaved) on batches from a filled buffer."""
    agents = {"plain": DQN(**SETTINGS), "wn": DQN(**SETTINGS)}
    apply_weight_norm(agents["wn"])
    agents["plain"].setup("fit")
    agents["plain"].fill_buffer()
    batches = [agents["plain"].buffer.sample(SETTINGS["batch_size"], np.random.default_rng(i)) for i in range(updates)]
    agents["plain"].teardown("fit")

    def update(agent: DQN):
        optimizer, stream = agent.configure_optimizers(), itertools.cycle(batches)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            agent.td_loss(next(stream))[0].backward()
            optimizer.step()

        return step

    return compare({name: update(agent) for name, agent in agents.items()}, steps=updates)


class LoopClock(Callback):
    """Environment steps per second between update ``skip`` and the end of fit."""

    def __init__(self, skip: int) -> None:
        self.skip = skip

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.skip:
            self.start = (time.perf_counter(), pl_module.env_steps)

    def on_train_end(self, trainer, pl_module) -> None:
        self.rate = (pl_module.env_steps - self.start[1]) / (time.perf_counter() - self.start[0])


def loop_env_steps_per_second(weight_norm: bool, updates: int, root: str) -> float:
    clock = LoopClock(skip=10)
    normalization = WeightNormalization(init_samples=500, exclude=["q_net.9", "target_net"])  # as space_invaders_wn.yaml
    callbacks = [normalization, clock] if weight_norm else [clock]
    trainer = Trainer(
        max_steps=updates, accelerator="cpu", devices=1, limit_val_batches=0, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=50, default_root_dir=root,
        callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(DQN(**SETTINGS, updates_per_epoch=updates))
    return clock.rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--updates", type=int, default=200, help="training-loop updates per round and variant")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    pin_threads(args.threads)
    keep_freed_memory()
    results: dict[str, list[float]] = {k: [] for k in ("a", "b plain", "b wn", "c plain", "c wn")}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(args.rounds):
            results["a"].append(env_steps_per_second(2.0))
            for name, seconds in seconds_per_update(40).items():
                results[f"b {name}"].append(seconds)
            results["c plain"].append(loop_env_steps_per_second(False, args.updates, root))
            results["c wn"].append(loop_env_steps_per_second(True, args.updates, root))
    med = {k: statistics.median(v) for k, v in results.items()}
    frequency = SETTINGS["train_frequency"]
    print(f"\n## DQN training loop on {ENV} ({SETTINGS['num_envs']} environments, batch {SETTINGS['batch_size']}, "
          f"train_frequency {frequency}, {args.threads} threads, medians of {args.rounds} rounds)")  # fmt: skip
    print(f"  (a) environments alone        {med['a']:9.0f} steps/s")
    missed = []
    for variant in ("plain", "wn"):
        b, c = med[f"b {variant}"], med[f"c {variant}"]
        bound = 1 / (1 / med["a"] + b / frequency)
        ratio = c / bound
        verdict = "ok" if ratio >= 0.9 else "MISSED"
        print(f"  {variant:>5}: (b) update alone {b * 1e3:7.2f} ms   bound {bound:7.1f} steps/s   "
              f"(c) loop {c:7.1f} steps/s   c / bound {ratio:.3f}  (goal >= 0.9) {verdict}")  # fmt: skip
        if verdict == "MISSED":
            missed.append(variant)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
