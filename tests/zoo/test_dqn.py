"""DQN: TD targets, exploration, checkpoints that resume, target copies, DDP, and a CartPole agent that learns."""

import copy
import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lightning_wn import WeightNormalization, apply_weight_norm, fold_state_dict
import zoo.dqn
from zoo.cli import main
from zoo.dqn import DQN, td_targets

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def test_td_targets_match_hand_computed_values():
    rewards, terminals = torch.tensor([1.0, 0.5, -1.0]), torch.tensor([False, True, False])
    next_target = torch.tensor([[1.0, 3.0], [2.0, 0.0], [5.0, 4.0]])
    next_online = torch.tensor([[2.0, 1.0], [0.0, 1.0], [1.0, 9.0]])
    dqn = td_targets(rewards, terminals, 0.9, next_target)
    double = td_targets(rewards, terminals, 0.9, next_target, next_online)
    torch.testing.assert_close(dqn, torch.tensor([1 + 0.9 * 3, 0.5, -1 + 0.9 * 5]))
    torch.testing.assert_close(double, torch.tensor([1 + 0.9 * 1, 0.5, -1 + 0.9 * 4]))


@pytest.mark.parametrize("double_dqn", [False, True])
@pytest.mark.parametrize("clip_rewards", [False, True])
def test_td_loss_uses_the_networks_as_the_algorithm_says(double_dqn, clip_rewards):
    agent = DQN(env_id="CartPole-v1", num_envs=2, learning_starts=200, hidden=[16], double_dqn=double_dqn, clip_rewards=clip_rewards)
    torch.nn.init.normal_(agent.target_net[-1].weight)  # target and online networks differ
    agent.setup("fit")
    agent.fill_buffer()
    batch = agent.buffer.sample(64, np.random.default_rng(0))
    batch = batch._replace(rewards=batch.rewards * 3)  # CartPole's rewards are all 1: make clipping matter
    loss, q = agent.td_loss(batch)
    with torch.no_grad():
        chooser = agent.q_net if double_dqn else agent.target_net
        best = chooser(batch.next_obs).argmax(1)
        next_value = agent.target_net(batch.next_obs)[torch.arange(64), best]
        rewards = batch.rewards.clamp(-1, 1) if clip_rewards else batch.rewards
        expected_q = agent.q_net(batch.obs)[torch.arange(64), batch.actions]
        target = rewards + 0.99 * next_value * (1 - batch.terminals.float())
    torch.testing.assert_close(q, expected_q)
    torch.testing.assert_close(loss, torch.nn.functional.smooth_l1_loss(expected_q, target))
    agent.teardown("fit")


def test_epsilon_falls_linearly_then_stays():
    agent = DQN(env_id="CartPole-v1", learning_starts=32, exploration_steps=1000, epsilon_start=1.0, epsilon_end=0.1)
    values = []
    for steps in (0, 500, 1000, 5000):
        agent.env_steps = steps
        values.append(agent.epsilon)
    assert values == pytest.approx([1.0, 0.55, 0.1, 0.1])
    late = DQN(env_id="CartPole-v1", learning_starts=32, exploration_steps=1000, exploration_starts=200, epsilon_end=0.1)
    late_values = []
    for steps in (0, 200, 700, 1200, 5000):  # deepmind/dqn's schedule: flat until learning starts, then the same fall
        late.env_steps = steps
        late_values.append(late.epsilon)
    assert late_values == pytest.approx([1.0, 1.0, 0.55, 0.1, 0.1])
    with pytest.raises(ValueError, match="`exploration_starts` must be 0 or more"):
        DQN(env_id="CartPole-v1", learning_starts=32, exploration_starts=-1)


def test_bad_arguments_are_refused_with_the_fix():
    cartpole = {"env_id": "CartPole-v1", "learning_starts": 64}
    with pytest.raises(ValueError, match="`train_frequency`=6 must be a multiple of `num_envs`=4"):
        DQN(**cartpole, num_envs=4, train_frequency=6)
    with pytest.raises(ValueError, match="not a torch.optim optimizer; choose one of .*Adamax"):
        DQN(**cartpole, optimizer="Adamx")
    with pytest.raises(ValueError, match="`learning_starts`=16 must be at least `batch_size`=32"):
        DQN(env_id="CartPole-v1", learning_starts=16)
    with pytest.raises(ValueError, match="`learning_starts`=600 must be at most half of `buffer_size`=1000"):
        DQN(env_id="CartPole-v1", learning_starts=600, buffer_size=1000)
    with pytest.raises(ValueError, match="`gradient_steps` must be a positive integer, got 0"):
        DQN(**cartpole, gradient_steps=0)
    with pytest.raises(ValueError, match=r"`epsilon_end` must be a probability in \[0, 1\]"):
        DQN(**cartpole, epsilon_end=1.5)
    with pytest.raises(ValueError, match=r"`target_tau` must be in \(0, 1\], got 0"):
        DQN(**cartpole, target_tau=0)
    with pytest.raises(ValueError, match=r"`lr_end_factor` must be in \[0, 1\], got 2"):
        DQN(**cartpole, lr_end_factor=2)
    with pytest.raises(ValueError, match="`sticky_actions`=0.25 acts on Atari games only, not on 'CartPole-v1'"):
        DQN(**cartpole, sticky_actions=0.25)
    with pytest.raises(ValueError, match="Unknown environment 'CartPol-v1'"):
        DQN(env_id="CartPol-v1", learning_starts=64)
    with pytest.raises(ValueError, match="no Atari ROM named 'space_invader'"):
        DQN(env_id="ALE/SpaceInvader-v5")


def _cartpole_fit(max_steps, tmp_path, ckpt_path=None, trainer_options=(), **kwargs):
    agent = DQN(env_id="CartPole-v1", num_envs=2, learning_starts=64, train_frequency=8, hidden=[16], updates_per_epoch=5,
                eval_episodes=2, **kwargs)  # fmt: skip
    trainer = Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                      **dict(trainer_options))  # fmt: skip
    trainer.fit(agent, ckpt_path=ckpt_path)
    return agent, trainer


def test_training_each_validation_and_the_test_play_games_of_their_own(tmp_path, monkeypatch):
    # a vector environment seeds its games seed, seed + 1, ...: validations seeded one apart replayed 9 of 10 games
    starts = []

    class RecordingRunner(zoo.dqn.EnvRunner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            starts.append({tuple(state) for state in self.obs.tolist()})

    monkeypatch.setattr(zoo.dqn, "EnvRunner", RecordingRunner)
    agent, trainer = _cartpole_fit(15, tmp_path)  # 3 epochs of 5 updates, each validated with 2 games
    trainer.test(agent, verbose=False)
    assert [len(games) for games in starts] == [2, 2, 2, 2, 2]  # training, 3 validations, the test
    _cartpole_fit(10, tmp_path, trainer_options={"val_check_interval": 2})  # 2 validations in each epoch
    assert [len(games) for games in starts[5:]] == [2] * 5  # training, 4 validations
    for run in (starts[:5], starts[5:]):  # (the same seed repeats a run: the two fits' training games are one)
        assert all(not first & second for first, second in itertools.combinations(run, 2))


@pytest.mark.parametrize(("gradient_steps", "updates"), [(1, 5), (3, 7), (4, 8)])
def test_each_collection_of_train_frequency_steps_is_followed_by_gradient_steps_updates(gradient_steps, updates, tmp_path):
    agent, _ = _cartpole_fit(updates, tmp_path, gradient_steps=gradient_steps)
    assert agent.env_steps == 64 + 8 * math.ceil(updates / gradient_steps)


def test_episode_returns_and_rates_are_written_once_not_repeated_until_the_next_ones(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    agent = DQN(env_id="CartPole-v1", num_envs=2, learning_starts=64, train_frequency=8, gradient_steps=8, hidden=[16],
                updates_per_epoch=40, eval_episodes=1)  # fmt: skip
    Trainer(max_steps=40, logger=CSVLogger(tmp_path), log_every_n_steps=1, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0).fit(agent)  # fmt: skip
    with open(next(tmp_path.glob("**/metrics.csv"))) as file:
        rows = list(csv.DictReader(file))
    losses = [row["step"] for row in rows if row.get("train/loss")]
    returns = [row["step"] for row in rows if row.get("train/episode_return")]
    assert len(losses) == 40 and 1 <= len(returns) <= 5  # episodes end in the 5 collections (and the first fill)
    assert len(set(returns)) == len(returns)
    rates = [float(row["charts/fps"]) for row in rows if row.get("charts/fps")]
    assert len(rates) == 5 and min(rates) > 0  # one rate per window with play in it, not 0.0 for the 35 without


def test_a_resumed_run_finishes_its_block_of_updates_before_it_collects(tmp_path):
    _, trainer = _cartpole_fit(5, tmp_path, gradient_steps=3)  # collected before updates 0 and 3
    trainer.save_checkpoint(tmp_path / "five.ckpt")
    resumed, trainer = _cartpole_fit(9, tmp_path, ckpt_path=tmp_path / "five.ckpt", gradient_steps=3)
    assert trainer.global_step == 9
    assert resumed.env_steps == (64 + 8 * 2) + 64 + 8 * 1  # the buffer refilled, then one collection: before update 6


def test_target_copies_of_a_weight_normalized_network_stay_correct():
    agent = DQN(env_id="CartPole-v1", learning_starts=64, hidden=[16])
    apply_weight_norm(agent)  # both networks, as the callback does
    x = torch.randn(8, 4)
    with torch.no_grad():
        agent.q_net(x)  # a cached weight must not leak into copies
    clone = copy.deepcopy(agent.q_net)
    torch.testing.assert_close(clone(x), agent.q_net(x), rtol=0, atol=0)
    before = clone(x).detach()
    optimizer = torch.optim.SGD(agent.q_net.parameters(), lr=0.1)
    agent.q_net(x).square().sum().backward()
    optimizer.step()
    assert not torch.allclose(agent.q_net(x), before)
    torch.testing.assert_close(clone(x), before, rtol=0, atol=0)
    agent.sync_target()
    with torch.no_grad():  # both networks build w the same way: bitwise equal
        torch.testing.assert_close(agent.target_net(x), agent.q_net(x), rtol=0, atol=0)



def test_a_soft_target_update_moves_the_target_tau_of_the_way():
    agent = DQN(env_id="CartPole-v1", learning_starts=64, hidden=[16])
    apply_weight_norm(agent)
    torch.nn.init.normal_(agent.q_net[0].parametrizations.weight.original1)
    before = {k: v.clone() for k, v in agent.target_net.state_dict().items()}
    online = agent.q_net.state_dict()
    agent.sync_target(0.25)
    for key, value in agent.target_net.state_dict().items():
        torch.testing.assert_close(value, before[key] + 0.25 * (online[key] - before[key]))
    assert not torch.equal(agent.target_net.state_dict()["0.parametrizations.weight.original1"], before["0.parametrizations.weight.original1"])


def test_a_plain_target_network_takes_the_folded_weights_of_a_weight_normalized_network():
    agent = DQN(env_id="CartPole-v1", learning_starts=64, hidden=[16])
    apply_weight_norm(agent, exclude=["target_net"])  # as the weight-norm configs do
    torch.nn.init.normal_(agent.q_net[0].parametrizations.weight.original1)
    x = torch.randn(8, 4)
    before = {k: v.clone() for k, v in agent.target_net.state_dict().items()}
    assert sorted(before) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # plain
    folded = {k: v.clone() for k, v in fold_state_dict(agent.q_net.state_dict()).items()}
    agent.sync_target(0.25)
    for key, value in agent.target_net.state_dict().items():
        torch.testing.assert_close(value, before[key] + 0.25 * (folded[key] - before[key]))
    agent.sync_target()
    with torch.no_grad():
        torch.testing.assert_close(agent.target_net(x), agent.q_net(x), rtol=1e-6, atol=1e-6)


def test_a_checkpoint_with_a_weight_normalized_target_network_resumes_into_a_plain_one():
    saved = DQN(env_id="CartPole-v1", learning_starts=64, hidden=[16])
    apply_weight_norm(saved)  # both networks, as the configs did before they left the target plain
    torch.nn.init.normal_(saved.target_net[0].parametrizations.weight.original1)
    checkpoint = {"state_dict": saved.state_dict(), "dqn": {"env_steps": 7}}
    resumed = DQN(env_id="CartPole-v1", learning_starts=64, hidden=[16])
    apply_weight_norm(resumed, exclude=["target_net"])
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"])  # strict: every key found its place
    x = torch.randn(8, 4)
    with torch.no_grad():
        torch.testing.assert_close(resumed.q_net(x), saved.q_net(x), rtol=0, atol=0)
        torch.testing.assert_close(resumed.target_net(x), saved.target_net(x), rtol=1e-6, atol=1e-6)
    assert resumed.env_steps == 7


def test_the_learning_rate_falls_linearly_over_max_steps(tmp_path):
    agent, trainer = _cartpole_fit(8, tmp_path, lr=1e-3, lr_end_factor=0.25)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)
    agent, trainer = _cartpole_fit(4, tmp_path, lr=1e-3, lr_end_factor=1.0)
    assert trainer.lr_scheduler_configs == [] and trainer.optimizers[0].param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="`lr_end_factor`=0.5 decays the learning rate over the trainer's `max_steps`"):
        _cartpole_fit(-1, tmp_path, lr_end_factor=0.5)


def test_compile_optimizer_trains_the_same_agent_with_the_compiled_update(tmp_path):
    agents = {}
    for compiled in (False, True):
        seed_everything(0)
        agents[compiled], trainer = _cartpole_fit(8, tmp_path, compile_optimizer=compiled, lr=1e-3, lr_end_factor=0.25)
    assert type(trainer.optimizers[0]).__name__ == "CompiledAdamax"
    assert float(trainer.optimizers[0].param_groups[0]["lr"]) == pytest.approx(1e-3 * 0.25)  # the scheduler reached it
    eager, compiled = (agents[c].q_net.state_dict() for c in (False, True))
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(compiled["0.weight"], agents[False].target_net.state_dict()["0.weight"])  # it learned


class Probe(Callback):
    def on_train_start(self, trainer, pl_module):
        self.start = {"global_step": trainer.global_step, "env_steps": pl_module.env_steps}
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.obs = batch.obs


@pytest.mark.slow
def test_space_invaders_plays_logs_checkpoints_and_resumes(tmp_path):
    def run(max_steps, ckpt_path=None):
        seed_everything(0)
        agent = DQN(buffer_size=8000, learning_starts=1000, exploration_steps=10_000, updates_per_epoch=50,
                    eval_episodes=2, max_episode_frames=1000)  # fmt: skip
        probe = Probe()
        trainer = Trainer(
            max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, default_root_dir=tmp_path,
            callbacks=[WeightNormalization(init_samples=64), ModelCheckpoint(dirpath=tmp_path, save_last=True), probe],
        )  # fmt: skip
        trainer.fit(agent, ckpt_path=ckpt_path)
        return agent, trainer, probe

    agent, trainer, probe = run(100)
    assert probe.obs.shape == (32, 4, 84, 84) and probe.obs.dtype == torch.uint8
    metrics = trainer.callback_metrics
    assert metrics["train/episode_return"] >= 0 and metrics["eval/return"] >= 0  # 1000-frame games end
    assert agent.env_steps == 1000 + 4 * 100  # 5600 frames
    assert len(list((tmp_path / "images").glob("eval_observations_epoch*.png"))) == 2  # a frame-stack grid per validation
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert checkpoint["dqn"] == {"env_steps": 1400} and checkpoint["global_step"] == 100
    assert any(key.startswith("target_net.") for key in checkpoint["state_dict"]) and checkpoint["optimizer_states"]

    resumed, trainer, probe = run(150, ckpt_path=tmp_path / "last.ckpt")
    assert probe.start == {"global_step": 100, "env_steps": 1400 + 1000}  # restored, then the buffer refilled
    for name, value in checkpoint["state_dict"].items():  # restored as saved: no second init, no target reset
        assert torch.equal(probe.state[name], value), name
    assert trainer.global_step == 150
    assert resumed.env_steps == 1400 + 1000 + 4 * 50  # the exploration schedule continued
    assert resumed.epsilon == pytest.approx(1 - 0.99 * 2600 / 10_000)


@pytest.mark.slow
def test_ddp_processes_play_their_own_games_and_keep_identical_networks(tmp_path):
    subprocess.run([sys.executable, str(HERE / "dqn_ddp.py"), str(tmp_path)], check=True, cwd=tmp_path, timeout=300)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for name, value in rank0["end"].items():
        assert torch.equal(value, rank1["end"][name]), name
    assert any(not torch.equal(rank0["start"][n], rank0["end"][n]) for n in rank0["end"])  # they did learn
    assert not torch.equal(rank0["frames"], rank1["frames"])  # each its own seed and buffer
    assert rank0["env_steps"] == rank1["env_steps"] == 200 + 2 * 12


@pytest.fixture
def one_thread():
    """The MLP is too small to split across threads, and 2 threads crawl (20x) when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("variant", ["wn", "plain"])
def test_cartpole_agent_reaches_a_greedy_return_of_195(variant, seed, tmp_path, one_thread):
    cli = main([
        f"--config={ROOT / f'configs/dqn/cartpole_{variant}.yaml'}", f"--seed_everything={seed}", f"--model.init_args.seed={seed}",
        "--trainer.enable_progress_bar=false", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
    ], run=False)  # fmt: skip
    cli.trainer.callbacks.append(EarlyStopping(monitor="eval/return", mode="max", stopping_threshold=195, patience=1000))
    cli.trainer.fit(cli.model)  # stops at the first evaluation >= 195, else after the config's 25,000 updates
    assert cli.trainer.callback_metrics["eval/return"] >= 195  # mean over 10 greedy games
