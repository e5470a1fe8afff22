"""Vector environments for the DQN zoo, and the loop that steps them with a policy.

Atari games (``ALE/<Game>-v5``) run in ``ale_py``'s ``AtariVectorEnv``, which does the standard DQN
preprocessing natively in C++ threads: noop reset, frame skip 4 with max-pool, 84x84 grayscale,
a stack of 4 frames. Any other id goes to ``gymnasium.make_vec``. Both autoreset on the next step.

Example:
    >>> env = make_vector_env("CartPole-v1", num_envs=2)
    >>> runner = EnvRunner(env, seed=0)
    >>> finished = runner.step(lambda obs: np.zeros(len(obs), np.int64), epsilon=1.0)
    >>> runner.obs.shape, finished
    ((2, 4), [])
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import NamedTuple

import gymnasium as gym
import numpy as np

from zoo.data.replay import ReplayBuffer

ATARI_FRAME_SKIP = 4  # emulator frames per environment step (each action repeated, the last two max-pooled)


def frames_per_step(env_id: str) -> int:
    """Emulator frames one environment step plays: the frame skip for Atari, 1 for other environments."""
    return ATARI_FRAME_SKIP if _atari_game(env_id) is not None else 1


class Episode(NamedTuple):
    env: int  # which of the vector's environments
    ret: float  # sum of raw rewards
    length: int  # environment steps


Policy = Callable[[np.ndarray], np.ndarray]  # observations -> greedy actions


def make_vector_env(
    env_id: str,
    num_envs: int,
    *,
    sticky_actions: float = 0.0,
    max_episode_frames: int = 108_000,
) -> gym.vector.VectorEnv:
    """``num_envs`` copies of ``env_id``; Atari ones with DQN preprocessing and raw (unclipped) rewards.

    Args:
        sticky_actions: the probability that an Atari game repeats the previous action (ALE v5
            recommends 0.25; the DQN papers used 0).
        max_episode_frames: Atari episodes are truncated after this many emulator frames (30 minutes);
            other environments keep their own time limit.
    """
    game = _atari_game(env_id)
    if game is None:
        if env_id not in gym.registry:
            raise ValueError(f"Unknown environment {env_id!r}: use an Atari id like 'ALE/SpaceInvaders-v5' or a gymnasium id like 'CartPole-v1'.")
        if sticky_actions:
            raise ValueError(f"`sticky_actions`={sticky_actions} acts on Atari games only, not on {env_id!r}: leave "
                             "it at 0.")
        return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync")
    from ale_py.vector_env import AtariVectorEnv

    return AtariVectorEnv(
        game,
        num_envs,
        num_threads=min(num_envs, os.cpu_count() or 1),
        repeat_action_probability=sticky_actions,
        max_num_frames_per_episode=max_episode_frames,
        frameskip=ATARI_FRAME_SKIP,
        reward_clipping=False,  # the learner clips; episode returns are the game's score
    )


def _atari_game(env_id: str) -> str | None:
    """'ALE/SpaceInvaders-v5' -> 'space_invaders' (ale_py's ROM name); None for other ids."""
    match = re.fullmatch(r"ALE/(\w+)-v5", env_id)
    if match is None:
        return None
    game = re.sub(r"(?<!^)(?=[A-Z])", "_", match.group(1)).lower()
    from ale_py import roms

    if game not in roms.get_all_rom_ids():
        raise ValueError(f"`{env_id}`: no Atari ROM named {game!r} in ale_py; available: {', '.join(sorted(roms.get_all_rom_ids()))}.")
    return game


class EnvRunner:
    """Steps a vector environment epsilon-greedily, optionally into a replay buffer.

    Keeps the current observations and sums each episode's return from the raw
    rewards (the full game for Atari, all lives). ``life_loss_terminal`` marks a lost life as
    terminal for learning only, as in the DQN papers; episodes still last the whole game.
    """

    def __init__(self, env: gym.vector.VectorEnv, seed: int, buffer: ReplayBuffer | None = None, life_loss_terminal: bool = False) -> None:
        self.env, self.buffer, self.life_loss_terminal = env, buffer, life_loss_terminal
        self.num_envs = env.num_envs
        self.rng = np.random.default_rng(seed)
        self.obs, info = env.reset(seed=seed)
        self.lives = info.get("lives")
        self.autoreset = np.zeros(self.num_envs, np.bool_)  # these environments reset on their next step
        self.returns = np.zeros(self.num_envs)
        self.lengths = np.zeros(self.num_envs, np.int64)
        if buffer is not None:
            buffer.reset(self.obs)

    def step(self, policy: Policy, epsilon: float) -> list[Episode]:
        """One step of every environment; returns the episodes that ended with it."""
        actions = self.rng.integers(self.env.single_action_space.n, size=self.num_envs)
        greedy = self.rng.random(self.num_envs) >= epsilon
        if greedy.any():  # no forward pass while exploring at random
            actions[greedy] = policy(self.obs)[greedy]
        obs, rewards, terminated, truncated, info = self.env.step(actions)
        terminals = terminated
        lives = info.get("lives")
        if self.life_loss_terminal and lives is not None:
            terminals = terminated | (lives < self.lives)
        if self.buffer is not None:
            self.buffer.add(actions, rewards, terminals, obs, reset=self.autoreset)
        self.returns += rewards
        self.lengths += ~self.autoreset
        ended = (terminated | truncated) & ~self.autoreset
        finished = [Episode(int(i), float(self.returns[i]), int(self.lengths[i])) for i in np.flatnonzero(ended)]
        self.returns[ended | self.autoreset] = 0
        self.lengths[ended | self.autoreset] = 0
        self.obs, self.lives, self.autoreset = obs, lives, ended
        return finished

    def run_episodes(self, policy: Policy, epsilon: float) -> np.ndarray:
        """Play until every environment has finished an episode; the first return of each."""
        first: dict[int, float] = {}
        while len(first) < self.num_envs:
            for episode in self.step(policy, epsilon):
                first.setdefault(episode.env, episode.ret)
        return np.array([first[i] for i in range(self.num_envs)])
