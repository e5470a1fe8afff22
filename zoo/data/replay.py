"""A replay buffer for vector environments that stores every frame once.

Atari observations are stacks of the last 4 frames; storing stacks repeats each frame 4 times
(26 GB for a million transitions). Here each environment step writes only its newest frame, and
a sample rebuilds the stacks of ``s`` and ``s'`` from neighbouring slots, with zeros before the
episode's first frame, as ``AtariVectorEnv`` itself pads after a reset. A million 84x84
transitions take about 7 GB.

The buffer follows gymnasium's ``NEXT_STEP`` autoreset: the step after an episode ends resets
that environment, ignores its action, and is not a transition (it is never sampled).

Example:
    >>> import numpy as np
    >>> buffer = ReplayBuffer(capacity=100, num_envs=2, frame_shape=(3,), dtype=np.float32)
    >>> buffer.reset(np.zeros((2, 3), np.float32))
    >>> for step in range(5):
    ...     obs = np.full((2, 3), step + 1, np.float32)
    ...     buffer.add(np.array([0, 1]), np.array([1.0, 0.0]), np.array([False, False]), obs, reset=np.array([False, False]))
    >>> batch = buffer.sample(4, np.random.default_rng(0))
    >>> bool(((batch.next_obs - batch.obs) == 1).all()), batch.obs.shape
    (True, torch.Size([4, 3]))
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class Transitions(NamedTuple):
    """A batch of (s, a, r, s', terminal); ``terminal`` means: do not bootstrap from ``s'``."""

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    next_obs: Tensor
    terminals: Tensor


class ReplayBuffer:
    """Ring buffers, one per environment, of frames, actions, rewards and episode flags.

    Args:
        capacity: transitions kept over all environments (the oldest are overwritten).
        num_envs: environments stepped together; each gets ``capacity / num_envs`` slots.
        frame_shape: the shape of one frame (84x84 for Atari) or of one observation.
        dtype: of the frames (uint8 for Atari, float32 for vector observations).
        frame_stack: observations are stacks of this many frames, newest last (Atari: 4);
            None stores observations as they are.
    """

    def __init__(
        self,
        capacity: int,
        num_envs: int,
        frame_shape: tuple[int, ...],
        dtype: np.dtype | type = np.uint8,
        frame_stack: int | None = None,
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"`num_envs` must be at least 1, got {num_envs}.")
        slots = math.ceil(capacity / num_envs)
        if slots < (frame_stack or 1) + 2:
            raise ValueError(f"`capacity`={capacity} is too small for {num_envs} environments; give it at least {num_envs * ((frame_stack or 1) + 2)}.")
        self.num_envs, self.slots, self.frame_stack = num_envs, slots, frame_stack
        # np.zeros maps memory lazily: a large buffer costs only what has been written
        self.frames = np.zeros((num_envs, slots, *frame_shape), dtype)
        self.actions = np.zeros((num_envs, slots), np.int64)
        self.rewards = np.zeros((num_envs, slots), np.float32)
        self.terminals = np.zeros((num_envs, slots), np.bool_)
        self.starts = np.zeros((num_envs, slots), np.bool_)  # the observation begins an episode
        self.valid = np.zeros((num_envs, slots), np.bool_)  # the step from it is a real transition
        self.count = 0  # observations written per environment

    def __len__(self) -> int:
        """Transitions stored (over all environments), reset steps included."""
        return self.num_envs * max(min(self.count, self.slots) - 1, 0)

    def reset(self, obs: np.ndarray) -> None:
        """Start over from the environments' first observations."""
        self.count = 0
        self._write_obs(obs, starts=np.ones(self.num_envs, np.bool_))

    def add(self, actions: np.ndarray, rewards: np.ndarray, terminals: np.ndarray, next_obs: np.ndarray, reset: np.ndarray) -> None:
        """Record one step of every environment; ``reset`` marks environments whose step was an autoreset."""
        if self.count == 0:
            raise RuntimeError("Call `reset(obs)` with the first observations before `add`.")
        slot = (self.count - 1) % self.slots
        self.actions[:, slot] = actions
        self.rewards[:, slot] = rewards
        self.terminals[:, slot] = terminals
        self.valid[:, slot] = ~reset
        self._write_obs(next_obs, starts=reset)

    def _write_obs(self, obs: np.ndarray, starts: np.ndarray) -> None:
        slot = self.count % self.slots
        self.frames[:, slot] = obs if self.frame_stack is None else obs[:, -1]
        self.starts[:, slot] = starts
        self.valid[:, slot] = False  # until its step is recorded
        self.count += 1

    def sample(self, batch_size: int, rng: np.random.Generator) -> Transitions:
        """``batch_size`` transitions drawn uniformly from those stored, as CPU tensors."""
        history = (self.frame_stack or 1) - 1
        oldest = max(0, self.count - self.slots + history)  # its stack must not reach overwritten slots
        newest = self.count - 2  # its next observation is the last one written
        if newest < oldest:
            raise RuntimeError("The replay buffer holds no transition yet: step the environments first.")
        envs = np.empty(0, np.int64)
        steps = np.empty(0, np.int64)
        while len(envs) < batch_size:  # reset steps are rare: redraw them
            e = rng.integers(self.num_envs, size=batch_size)
            k = rng.integers(oldest, newest + 1, size=batch_size)
            keep = self.valid[e, k % self.slots]
            envs, steps = np.concatenate([envs, e[keep]]), np.concatenate([steps, k[keep]])
        envs, steps = envs[:batch_size], steps[:batch_size]
        slots = steps % self.slots
        if self.frame_stack is None:
            obs, next_obs = self.frames[envs, slots], self.frames[envs, (steps + 1) % self.slots]
        else:  # one gather of stack + 1 frames: s is the first stack, s' the last
            window = self._observations(envs, steps + 1, self.frame_stack + 1)
            obs, next_obs = window[:, :-1], window[:, 1:]
        return Transitions(
            obs=torch.from_numpy(obs),
            actions=torch.from_numpy(self.actions[envs, slots]),
            rewards=torch.from_numpy(self.rewards[envs, slots]),
            next_obs=torch.from_numpy(next_obs),
            terminals=torch.from_numpy(self.terminals[envs, slots]),
        )

    def _observations(self, envs: np.ndarray, steps: np.ndarray, length: int) -> np.ndarray:
        """The ``length`` frames up to each step, oldest first, zeros before the step's episode."""
        back = np.arange(length - 1, -1, -1)
        frames = self.frames[envs[:, None], (steps[:, None] - back) % self.slots]
        # a frame lies before its episode when an episode starts after it, up to the newest frame
        later_starts = self.starts[envs[:, None], (steps[:, None] - back[:-1] + 1) % self.slots]
        before_episode = np.flip(np.logical_or.accumulate(np.flip(later_starts, 1), axis=1), 1)
        frames[:, :-1][before_episode] = 0
        return frames
