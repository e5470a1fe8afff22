"""The replay buffer rebuilds (s, a, r, s', terminal) exactly, with stacks that stop at episode starts."""

import numpy as np
import pytest
import torch

from zoo.data.envs import EnvRunner, make_vector_env
from zoo.data.replay import ReplayBuffer

STACK = 4


def scripted_play(episodes: list[list[tuple[int, str]]], steps: int, seed: int = 0):
    """Play ``steps`` vector steps of hand-written episodes (length, 'term' or 'trunc') per environment.

    Frames are 2x2 images filled with a unique id; observations are the last 4 frames of the
    episode, zeros before its first, as AtariVectorEnv returns them. Autoreset is on the next step.
    Returns the buffer feed (first obs, then per step: actions, rewards, terminals, obs, reset) and
    the real transitions as {id of the newest frame of s: (s, a, r, s', terminal, step)}.
    """
    rng = np.random.default_rng(seed)
    num_envs, next_id = len(episodes), 1
    frames: list[list[int]] = [[] for _ in range(num_envs)]
    remaining = [list(e) for e in episodes]

    def new_frame(e: int) -> None:
        nonlocal next_id
        frames[e].append(next_id)
        next_id += 1

    def observe() -> np.ndarray:
        ids = [([0] * STACK + f)[-STACK:] for f in frames]
        return np.array(ids, np.uint8)[:, :, None, None].repeat(2, 2).repeat(2, 3)

    for e in range(num_envs):
        new_frame(e)
    first = observe()
    feed, transitions = [], {}
    autoreset = np.zeros(num_envs, bool)
    obs = first
    for t in range(steps):
        actions, rewards = rng.integers(6, size=num_envs), rng.normal(size=num_envs).astype(np.float32)
        terminated, truncated = np.zeros(num_envs, bool), np.zeros(num_envs, bool)
        for e in range(num_envs):
            if autoreset[e]:
                frames[e] = []
                rewards[e] = 0.0
            new_frame(e)
            if not autoreset[e] and len(frames[e]) - 1 == remaining[e][0][0]:
                terminated[e] = remaining[e][0][1] == "term"
                truncated[e] = remaining[e][0][1] == "trunc"
                remaining[e].pop(0)
        next_obs = observe()
        for e in np.flatnonzero(~autoreset):
            transitions[int(obs[e, -1, 0, 0])] = (obs[e], actions[e], rewards[e], next_obs[e], terminated[e], t)
        feed.append((actions, rewards, terminated, next_obs, autoreset.copy()))
        autoreset = terminated | truncated
        obs = next_obs
    return first, feed, transitions


EPISODES = [
    [(3, "term"), (1, "term"), (6, "trunc"), (2, "term"), (50, "term")],
    [(5, "trunc"), (2, "term"), (1, "trunc"), (4, "term"), (50, "term")],
]


def fill(capacity: int, steps: int):
    first, feed, transitions = scripted_play(EPISODES, steps)
    buffer = ReplayBuffer(capacity, num_envs=2, frame_shape=(2, 2), frame_stack=STACK)
    buffer.reset(first)
    for step in feed:
        buffer.add(*step[:4], reset=step[4])
    return buffer, transitions


def check_against(batch, transitions) -> set[int]:
    seen = set()
    for i in range(len(batch.actions)):
        key = int(batch.obs[i, -1, 0, 0])
        obs, action, reward, next_obs, terminal, _ = transitions[key]
        assert torch.equal(batch.obs[i], torch.from_numpy(obs)), key
        assert torch.equal(batch.next_obs[i], torch.from_numpy(next_obs)), key
        assert (batch.actions[i].item(), batch.rewards[i].item(), batch.terminals[i].item()) == (action, reward, terminal)
        seen.add(key)
    return seen


def test_samples_are_the_real_transitions_and_every_one_is_reachable():
    buffer, transitions = fill(capacity=200, steps=20)
    batch = buffer.sample(4000, np.random.default_rng(0))
    assert batch.obs.shape == (4000, STACK, 2, 2) and batch.obs.dtype == torch.uint8
    assert check_against(batch, transitions) == set(transitions)  # autoreset steps never come out
    assert len(transitions) == 2 * 20 - 8  # 4 episodes end in each environment's first 20 steps


def test_stacks_are_zero_padded_at_episode_starts():
    buffer, transitions = fill(capacity=200, steps=20)
    batch = buffer.sample(4000, np.random.default_rng(1))
    starts = [k for k, (obs, *_rest) in transitions.items() if (obs[:-1] == 0).all()]
    assert len(starts) == 2 * 5  # every episode's first observation: 5 begin in each environment
    for i in range(len(batch.obs)):
        ids = batch.obs[i, :, 0, 0].tolist()
        nonzero = [x for x in ids if x]
        assert ids[-len(nonzero) :] == nonzero and nonzero == sorted(nonzero)  # zeros only before the episode


def test_wrapped_ring_keeps_only_whole_stacks():
    buffer, transitions = fill(capacity=2 * 12, steps=40)  # 12 slots per environment, 41 observations each
    seen = check_against(buffer.sample(4000, np.random.default_rng(2)), transitions)
    # slots hold observations 29..40; a stack reaches 3 back, so transitions start at 32 and end at 39
    assert seen == {key for key, t in transitions.items() if 32 <= t[-1] <= 39}
    assert len(seen) == 2 * 8  # both environments are in their last, long episode


def test_a_million_atari_transitions_take_about_7_gb():
    buffer = ReplayBuffer(1_000_000, num_envs=4, frame_shape=(84, 84), frame_stack=4)  # memory is mapped lazily
    total = sum(a.nbytes for a in (buffer.frames, buffer.actions, buffer.rewards, buffer.terminals, buffer.starts, buffer.valid))
    assert 7.0e9 < total < 7.1e9  # frames 84 * 84 bytes each, once; stacks of 4 would be 28 GB


def test_misuse_is_reported():
    with pytest.raises(ValueError, match="too small"):
        ReplayBuffer(8, num_envs=4, frame_shape=(84, 84), frame_stack=4)
    buffer = ReplayBuffer(100, num_envs=1, frame_shape=(3,), dtype=np.float32)
    with pytest.raises(RuntimeError, match="reset"):
        buffer.add(np.zeros(1), np.zeros(1), np.zeros(1, bool), np.zeros((1, 3)), reset=np.zeros(1, bool))
    buffer.reset(np.zeros((1, 3), np.float32))
    with pytest.raises(RuntimeError, match="no transition"):
        buffer.sample(1, np.random.default_rng(0))


@pytest.mark.slow
def test_stacks_rebuilt_from_space_invaders_equal_what_the_emulator_returned():
    env = make_vector_env("ALE/SpaceInvaders-v5", 2)
    buffer = ReplayBuffer(4000, num_envs=2, frame_shape=(84, 84), frame_stack=STACK)
    runner = EnvRunner(env, seed=3, buffer=buffer)
    seen = [runner.obs]
    games = []
    while len(games) < 2 or len(seen) <= 1000:  # random play loses a game in a few hundred steps
        games += runner.step(lambda obs: obs, epsilon=1.0)
        seen.append(runner.obs)
    env.close()
    steps = np.arange(len(seen))
    for e in range(2):
        rebuilt = buffer._observations(np.full(len(seen), e), steps, STACK)
        assert np.array_equal(rebuilt, np.stack([obs[e] for obs in seen]))
    assert buffer.starts[:, 1 : len(seen)].sum() >= 2  # the comparison spans resets
    assert buffer.frames.nbytes == 2 * 2000 * 84 * 84  # each frame once, not 4 times
