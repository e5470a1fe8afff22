"""DQN (Mnih et al., 2015) as a LightningModule: the paper's Atari experiment, weight norm from the callback.

Every training step reads like the algorithm: once every ``gradient_steps`` updates, act for
``train_frequency`` environment steps (epsilon-greedy, into the replay buffer); then one update on
a batch the dataloader sampled from that buffer, and every ``target_sync_every`` updates copy the
network into the target network.
The dataloader's first batch waits until ``learning_starts`` steps of play fill the buffer, so the
``WeightNormalization`` callback's data-dependent init sees real observations. Validation (and
``test``) plays ``eval_episodes`` whole games greedily. Under DDP every process acts in its own environments,
with its own seed and buffer; DDP averages the gradients, so all keep identical networks.

Example:
    >>> from lightning.pytorch import Trainer
    >>> agent = DQN(env_id="CartPole-v1", num_envs=2, learning_starts=64, updates_per_epoch=5, eval_episodes=2)
    >>> trainer = Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
    ...                   enable_model_summary=False, num_sanity_val_steps=0)
    >>> trainer.fit(agent)
    >>> agent.env_steps  # 64 to fill the buffer, then 4 per update
    84
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightning_wn import fold_state_dict
from zoo.compiled_optim import with_compiled_update
from zoo.errors import ConfigError
from zoo.data.envs import Episode, EnvRunner, frames_per_step, make_vector_env
from zoo.data.replay import ReplayBuffer, Transitions
from zoo.nets import MLP, NatureDQN
from zoo.visuals import log_image_grid


class DQN(LightningModule):
    """Deep Q-learning with experience replay and a target network; double DQN optional.

    Args:
        env_id: ``ALE/<Game>-v5`` (Nature CNN on 4x84x84 frames) or a gymnasium id with vector
            observations (an MLP of ``hidden`` sizes), e.g. ``CartPole-v1``.
        num_envs: environments stepped together in each process.
        buffer_size: transitions the replay buffer keeps, per process.
        optimizer: a ``torch.optim`` class name; ``lr`` its learning rate.
        compile_optimizer: run the optimizer's update compiled (``torch.compile``, which needs a C++
            compiler on CPU): Adamax's update on the Nature network takes about 1 ms instead of 5-6.
        lr_end_factor: the learning rate falls linearly to ``lr * lr_end_factor`` over the
            trainer's ``max_steps`` updates; 1 keeps it constant.
        learning_starts: environment steps of play that fill the buffer before the first update.
        train_frequency: environment steps per collection, per process (a multiple of ``num_envs``).
        gradient_steps: updates after each collection (Stable-Baselines3's ``gradient_steps``); 1, the
            DQN paper's loop, acts before every update.
        target_sync_every: updates between target-network updates.
        target_tau: each target update moves the target network this far towards the network
            (Polyak averaging, ``target <- target + tau * (net - target)``); 1 copies it (the DQN paper).
        exploration_steps: environment steps over which epsilon falls from ``epsilon_start`` to ``epsilon_end``.
        exploration_starts: environment steps before epsilon starts to fall (deepmind/dqn counts the
            fall from its ``learn_start``; 0 counts it from the first step, as CleanRL and SB3 do).
        clip_rewards: learn from the sign of each reward (the logged returns stay the game's score).
        life_loss_terminal: a lost life ends the bootstrapping (not the logged episode).
        sticky_actions: the probability that an Atari game repeats the previous action (other
            environments refuse any but 0).
        max_episode_frames: Atari games are cut after this many emulator frames (other environments keep
            their own time limit).
        updates_per_epoch: training batches per epoch; validation runs after each epoch.
        eval_episodes: games played with ``eval_epsilon`` per validation, per process.
        seed: of the environments and exploration; each process, and each of its uses (training, every
            validation, the test), draws seeds of its own from it.
    """

    def __init__(
        self,
        env_id: str = "ALE/SpaceInvaders-v5",
        num_envs: int = 4,
        buffer_size: int = 1_000_000,  # about 7 GB of Atari frames, each stored once
        batch_size: int = 32,
        optimizer: str = "Adamax",  # the paper's optimizer for DQN
        lr: float = 1e-4,
        compile_optimizer: bool = False,
        lr_end_factor: float = 1.0,
        gamma: float = 0.99,
        learning_starts: int = 80_000,
        train_frequency: int = 4,
        gradient_steps: int = 1,
        target_sync_every: int = 250,  # every 1000 environment steps, as CleanRL's 10M-step run
        target_tau: float = 1.0,
        epsilon_start: float = 1.0,
        epsilon_end: float = 0.01,
        exploration_steps: int = 1_000_000,
        exploration_starts: int = 0,
        double_dqn: bool = False,
        loss: Literal["huber", "mse"] = "huber",  # Huber is the Nature paper's clipped TD error
        clip_rewards: bool = True,
        life_loss_terminal: bool = True,
        sticky_actions: float = 0.0,  # the DQN papers' games were deterministic; ALE v5 suggests 0.25
        max_episode_frames: int = 108_000,  # 30 minutes of play
        hidden: Sequence[int] = (120, 84),
        updates_per_epoch: int = 10_000,
        eval_episodes: int = 10,
        eval_epsilon: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_arguments(locals())
        self.save_hyperparameters()
        probe = make_vector_env(env_id, 1, sticky_actions=sticky_actions, max_episode_frames=max_episode_frames)
        obs_space, num_actions = probe.single_observation_space, int(probe.single_action_space.n)
        probe.close()
        if len(obs_space.shape) == 3:
            self.q_net: nn.Module = NatureDQN(num_actions=num_actions, in_channels=obs_space.shape[0])
        elif len(obs_space.shape) == 1:
            self.q_net = MLP(in_features=obs_space.shape[0], out_features=num_actions, hidden=hidden)
        else:
            raise ValueError(f"`{env_id}` has observations of shape {obs_space.shape}: DQN here takes stacked frames or vectors.")
        self.obs_space = obs_space
        self.target_net = copy.deepcopy(self.q_net).requires_grad_(False)  # never trained: DDP must not wait for it
        self.env_steps = 0  # per process; the exploration schedule follows it
        self.buffer: ReplayBuffer | None = None
        self.runner: EnvRunner | None = None
        self._train_env = self._eval_env = None
        self._sample_rng = np.random.default_rng(seed)
        self._episodes: list[Episode] = []
        self._clock = (time.perf_counter(), 0)

    def forward(self, obs: Tensor) -> Tensor:
        """Q-values of every action."""
        return self.q_net(obs)

    @property
    def frames(self) -> int:
        """Emulator frames this process has played in training (Atari: 4 per environment step)."""
        return self.env_steps * frames_per_step(self.hparams.env_id)

    @property
    def epsilon(self) -> float:
        h = self.hparams
        steps = max(self.env_steps - h.exploration_starts, 0)
        progress = min(steps / h.exploration_steps, 1.0) if h.exploration_steps else 1.0
        return h.epsilon_start + progress * (h.epsilon_end - h.epsilon_start)

    # -- acting ------------------------------------------------------------------------------

    @override
    def setup(self, stage: str) -> None:
        h = self.hparams
        options = {"sticky_actions": h.sticky_actions, "max_episode_frames": h.max_episode_frames}
        if stage == "fit" and self.buffer is None:
            self._train_env = make_vector_env(h.env_id, h.num_envs, **options)
            shape, stack = self.obs_space.shape, None
            if len(shape) == 3:  # stacked frames: store each frame once
                shape, stack = shape[1:], shape[0]
            self.buffer = ReplayBuffer(h.buffer_size, h.num_envs, shape, self.obs_space.dtype, frame_stack=stack)
        if stage in ("fit", "validate", "test") and self._eval_env is None:
            self._eval_env = make_vector_env(h.env_id, h.eval_episodes, **options)

    @torch.no_grad()
    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        training = self.q_net.training
        self.q_net.eval()  # layers such as mean-only batch norm act on running statistics
        q = self.q_net(torch.as_tensor(obs, device=self.device))
        self.q_net.train(training)
        return q.argmax(1).cpu().numpy()

    def collect(self, vector_steps: int) -> None:
        """Play ``vector_steps`` steps of every environment into the replay buffer."""
        for _ in range(vector_steps):
            self._episodes += self.runner.step(self.greedy_actions, self.epsilon)
            self.env_steps += self.hparams.num_envs

    def fill_buffer(self) -> None:
        """Start the environments (after a checkpoint restored the counters) and play until learning starts."""
        if self.runner is None:
            seed = self._seed(0, self.env_steps)  # a resumed run does not replay the same games
            self.runner = EnvRunner(self._train_env, seed, self.buffer, self.hparams.life_loss_terminal)
        while len(self.buffer) < self.hparams.learning_starts:
            self.collect(1)

    # -- learning ----------------------------------------------------------------------------

    @override
    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        stream = ReplayStream(self.fill_buffer, lambda: self.buffer.sample(h.batch_size, self._sample_rng), h.updates_per_epoch)
        return DataLoader(stream, batch_size=None)

    @override
    def on_train_start(self) -> None:
        if self.global_step == 0:  # after the data-dependent init; a resumed run restored its target
            self.sync_target()
        self._clock = (time.perf_counter(), self.env_steps)

    @override
    def training_step(self, batch: Transitions, batch_idx: int) -> Tensor:
        h = self.hparams
        if self.global_step % h.gradient_steps == 0:  # a resumed run continues its block of updates
            self.collect(h.train_frequency // h.num_envs)
        loss, q = self.td_loss(batch)
        self._log_training(loss, q)
        return loss

    def td_loss(self, batch: Transitions) -> tuple[Tensor, Tensor]:
        """The loss between Q(s, a) and its TD target, and Q(s, a)."""
        h = self.hparams
        q = self.q_net(batch.obs).gather(1, batch.actions[:, None]).squeeze(1)
        with torch.no_grad():
            rewards = batch.rewards.sign() if h.clip_rewards else batch.rewards
            online = self.q_net(batch.next_obs) if h.double_dqn else None
            targets = td_targets(rewards, batch.terminals, h.gamma, self.target_net(batch.next_obs), online)
        loss = F.smooth_l1_loss(q, targets) if h.loss == "huber" else F.mse_loss(q, targets)
        return loss, q

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step % self.hparams.target_sync_every == 0:
            self.sync_target(self.hparams.target_tau)

    @torch.no_grad()
    def sync_target(self, tau: float = 1.0) -> None:
        """Copy the network into the target network, or move the target ``tau`` of the way there.

        A plain target of a weight-normalized network gets its weights folded (``g * v / ||v||``): it is never
        trained, so it computes the same function without computing ``w`` again at every step.
        """
        target = self.target_net.state_dict()
        online = fold_state_dict(self.q_net.state_dict(), keep=target.keys())
        if tau == 1.0:
            self.target_net.load_state_dict(online)
            return
        for key, value in target.items():
            if value.is_floating_point():
                value.lerp_(online[key], tau)
            else:
                value.copy_(online[key])

    @override
    def configure_optimizers(self) -> Any:
        h = self.hparams
        optimizer_class = getattr(torch.optim, h.optimizer)
        if h.compile_optimizer:
            optimizer_class = with_compiled_update(optimizer_class)
        optimizer = optimizer_class(self.q_net.parameters(), lr=h.lr)
        if h.lr_end_factor == 1.0:
            return optimizer
        if self.trainer.max_steps < 1:
            raise ConfigError(
                f"`lr_end_factor`={h.lr_end_factor} decays the learning rate over the trainer's `max_steps`, "
                f"which is {self.trainer.max_steps}: set `--trainer.max_steps`."
            )
        decay = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, h.lr_end_factor, total_iters=self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}

    def _log_training(self, loss: Tensor, q: Tensor) -> None:
        every = self.trainer.log_every_n_steps
        if not every or (self.global_step + 1) % every:  # Lightning writes logs only then; a self.log costs ~0.3 ms
            return
        # the batch size saves Lightning searching the batch for it
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(q))
        steps = self.env_steps
        metrics = {"train/q_mean": q.detach().mean(), "train/epsilon": self.epsilon, "charts/env_steps": float(steps)}
        self.log_dict(metrics, batch_size=len(q))
        # what happened since the last write, to the loggers once: self.log would write the last value again at every
        # step until the next one (no play in a window shorter than gradient_steps updates, no episode ended)
        window, (start, steps_then), now = {}, self._clock, time.perf_counter()
        if steps > steps_then:
            window["charts/fps"] = (steps - steps_then) / max(now - start, 1e-9)  # environment steps per second
            self._clock = now, steps
        if self._episodes:
            window["train/episode_return"] = float(np.mean([e.ret for e in self._episodes]))
            window["train/episode_length"] = float(np.mean([e.length for e in self._episodes]))
            self._episodes.clear()
            self.log("train/episode_return", window["train/episode_return"], prog_bar=True, logger=False)
        for logger in self.loggers if window else ():
            logger.log_metrics(window, step=self.global_step)

    # -- evaluation and checkpoints -----------------------------------------------------------

    @override
    def val_dataloader(self) -> DataLoader:
        return DataLoader(range(1), batch_size=None)  # one evaluation per validation

    @override
    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._play_evaluation_games("eval", seed=self._seed(1, self.global_step))  # new games each time

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._play_evaluation_games("test", seed=self._seed(2))  # games no validation saw

    def _seed(self, *use: int) -> int:
        """A seed for one use (training from a step count, a validation, the test) of this process's environments.

        A vector environment seeds its games ``seed, seed + 1, ...``: seeds drawn apart keep each use's games its
        own, where seeds counted up from one base would share most of them between uses and processes."""
        entropy = (self.hparams.seed, self.global_rank, *use)
        return int(np.random.SeedSequence(entropy).generate_state(1)[0] >> 2)  # ALE's seeds are int32: room to count

    def _play_evaluation_games(self, prefix: str, seed: int) -> None:
        runner = EnvRunner(self._eval_env, seed=seed)
        returns = runner.run_episodes(self.greedy_actions, self.hparams.eval_epsilon)
        self.log(f"{prefix}/return", float(returns.mean()), prog_bar=True, sync_dist=True, batch_size=len(returns))
        if len(self.obs_space.shape) == 3:  # what the network sees: frame stacks, one row per game
            stacks = torch.from_numpy(runner.obs[:4]).flatten(0, 1).unsqueeze(1) / 255
            log_image_grid(self, f"{prefix}_observations", stacks, nrow=self.obs_space.shape[0])

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dqn"] = {"env_steps": self.env_steps}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.env_steps = checkpoint.get("dqn", {}).get("env_steps", 0)
        if "state_dict" in checkpoint:  # a target network saved weight-normalized loads folded into a plain one
            checkpoint["state_dict"] = fold_state_dict(checkpoint["state_dict"], keep=self.state_dict().keys())

    @override
    def teardown(self, stage: str) -> None:
        for env in (self._train_env, self._eval_env):
            if env is not None:
                env.close()
        self.buffer = self.runner = self._train_env = self._eval_env = None


def td_targets(rewards: Tensor, terminals: Tensor, gamma: float, next_q_target: Tensor, next_q_online: Tensor | None = None) -> Tensor:
    """``r + gamma * Q_target(s', a')``, without the second term where ``s'`` is terminal.

    ``a'`` maximizes ``Q_target`` (DQN), or ``next_q_online`` when given (double DQN).
    """
    chooser = next_q_target if next_q_online is None else next_q_online
    best = next_q_target.gather(1, chooser.argmax(1, keepdim=True)).squeeze(1)
    return rewards + gamma * best * (~terminals)


class ReplayStream(IterableDataset):
    """``length`` batches per epoch from ``sample``; ``fill`` runs first (it plays until learning starts)."""

    def __init__(self, fill: Callable[[], None], sample: Callable[[], Transitions], length: int) -> None:
        self.fill, self.sample, self.length = fill, sample, length

    def __iter__(self) -> Iterator[Transitions]:
        self.fill()
        for _ in range(self.length):
            yield self.sample()


def _check_arguments(args: dict[str, Any]) -> None:
    for name in ("num_envs", "buffer_size", "batch_size", "train_frequency", "gradient_steps", "target_sync_every", "updates_per_epoch", "eval_episodes"):
        if isinstance(args[name], bool) or not isinstance(args[name], int) or args[name] < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {args[name]!r}.")
    if args["train_frequency"] % args["num_envs"]:
        raise ValueError(
            f"`train_frequency`={args['train_frequency']} must be a multiple of `num_envs`={args['num_envs']}: "
            "each update follows that many environment steps, taken `num_envs` at a time."
        )
    if args["learning_starts"] < args["batch_size"]:
        raise ValueError(f"`learning_starts`={args['learning_starts']} must be at least `batch_size`={args['batch_size']}.")
    if args["learning_starts"] > args["buffer_size"] // 2:
        raise ValueError(
            f"`learning_starts`={args['learning_starts']} must be at most half of `buffer_size`={args['buffer_size']}: "
            "the buffer must hold the steps played before learning and then some."
        )
    if args["exploration_starts"] < 0:
        raise ValueError(f"`exploration_starts` must be 0 or more environment steps, got {args['exploration_starts']!r}.")
    for name in ("epsilon_start", "epsilon_end", "eval_epsilon", "sticky_actions"):
        if not 0.0 <= args[name] <= 1.0:
            raise ValueError(f"`{name}` must be a probability in [0, 1], got {args[name]!r}.")
    if not 0.0 < args["target_tau"] <= 1.0:
        raise ValueError(f"`target_tau` must be in (0, 1], got {args['target_tau']!r}; 1 copies the network.")
    if not 0.0 <= args["lr_end_factor"] <= 1.0:
        raise ValueError(f"`lr_end_factor` must be in [0, 1], got {args['lr_end_factor']!r}; 1 keeps the learning rate.")
    if not 0.0 <= args["gamma"] <= 1.0:
        raise ValueError(f"`gamma` must be in [0, 1], got {args['gamma']!r}.")
    if args["loss"] not in ("huber", "mse"):
        raise ValueError(f"`loss` must be 'huber' or 'mse', got {args['loss']!r}.")
    optimizer = getattr(torch.optim, args["optimizer"], None)
    if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
        choices = sorted(n for n, c in vars(torch.optim).items() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer)
        raise ValueError(f"`optimizer`={args['optimizer']!r} is not a torch.optim optimizer; choose one of {', '.join(choices)}.")
