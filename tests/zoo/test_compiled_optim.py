"""The compiled optimizer update: eager torch.optim's numbers, one compile, a clear error without a compiler."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo

from zoo.compiled_optim import with_compiled_update


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _backward(net, step):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
    net(x).square().sum().backward()


@pytest.mark.parametrize("name", ["Adamax", "Adam"])
def test_the_compiled_update_matches_eager_under_a_scheduler_and_after_a_reload_without_recompiling(name):
    eager, compiled = _net(), _net()
    optimizers = [getattr(torch.optim, name)(eager.parameters(), lr=0.01),
                  with_compiled_update(getattr(torch.optim, name))(compiled.parameters(), lr=0.01)]  # fmt: skip
    schedulers = [torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.2, total_iters=6) for o in optimizers]
    for step in range(6):
        if step == 3:  # a resumed run: the state reloaded into a new optimizer, which compiles once
            state = copy.deepcopy(optimizers[1].state_dict())
            optimizers[1] = with_compiled_update(getattr(torch.optim, name))(compiled.parameters(), lr=0.01)
            optimizers[1].load_state_dict(state)
            schedulers[1].optimizer = optimizers[1]
        # the falling learning rate is a tensor: a change of it does not recompile
        with torch._dynamo.config.patch(error_on_recompile=step not in (0, 3)):
            for net, optimizer, scheduler in zip((eager, compiled), optimizers, schedulers):
                optimizer.zero_grad()
                _backward(net, step)
                optimizer.step()
                scheduler.step()
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(eager[0].weight, _net()[0].weight)  # they did move
    assert float(optimizers[1].param_groups[0]["lr"]) == pytest.approx(optimizers[0].param_groups[0]["lr"])
    assert optimizers[1].state[next(compiled.parameters())]["step"] == 6


def test_the_closure_runs_eagerly_before_the_update_its_loss_is_returned_and_hooks_run_once():
    torch.optim.Adamax(_net().parameters())  # torch wraps Adamax.step in its hook runner at the first Adamax
    net = _net()
    optimizer = with_compiled_update(torch.optim.Adamax)(net.parameters(), lr=0.01)
    before = net[0].weight.detach().clone()

    def closure():
        optimizer.zero_grad()
        loss = net(torch.ones(2, 6)).sum()
        loss.backward()
        return loss

    calls = []
    optimizer.register_step_pre_hook(lambda *args: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *args: calls.append("post"))
    loss = optimizer.step(closure)
    assert loss.requires_grad and net[0].weight.grad is not None
    assert not torch.equal(net[0].weight, before)
    assert calls == ["pre", "post"]  # once each: the compiled part is Adamax's update without the hook runner


NO_COMPILER = """
import torch, torch._inductor.config
from zoo.compiled_optim import with_compiled_update
torch._inductor.config.cpp.cxx = ("no-such-compiler",)
net = torch.nn.Linear(7, 11)
optimizer = with_compiled_update(torch.optim.Adamax)(net.parameters(), lr=0.1)
net(torch.ones(1, 7)).sum().backward()
before = net.weight.detach().clone()
try:
    optimizer.step()
except RuntimeError as error:
    print(error)
print("unchanged", torch.equal(net.weight, before))
"""


def test_without_a_cpp_compiler_the_step_fails_naming_the_fix_and_changes_nothing(tmp_path):
    # a fresh cache: a compiled kernel on disk would be loaded without any compiler
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", NO_COMPILER], capture_output=True, text=True, env=env, check=True)
    out = run.stdout
    assert "could not be built: InvalidCxxCompiler: No working C++ compiler found" in out
    assert "`apt install g++`" in out and "--model.compile_optimizer false" in out
    assert "unchanged True" in out


MATCHES_EAGER = """
import torch
from zoo.compiled_optim import with_compiled_update
nets = []
for _ in range(2):
    torch.manual_seed(0)
    nets.append(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)))
optimizers = [torch.optim.Adamax(nets[0].parameters(), lr=0.01),
              with_compiled_update(torch.optim.Adamax)(nets[1].parameters(), lr=0.01)]
for step in range(3):
    for net, optimizer in zip(nets, optimizers):
        optimizer.zero_grad()
        net(torch.randn(4, 6, generator=torch.Generator().manual_seed(step))).square().sum().backward()
        optimizer.step()
print(max((a - b).abs().max().item() for a, b in zip(nets[0].parameters(), nets[1].parameters())))
"""


def test_a_step_compiled_under_one_kernel_set_is_not_reused_under_another(tmp_path):
    # inductor's FX graph cache once handed the default kernels' step to an AVX2 run: updates off by the lr
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path)  # one cache for both runs, as one machine has
    for capability in ({}, {"ATEN_CPU_CAPABILITY": "avx2"}):
        command = [sys.executable, "-c", MATCHES_EAGER]
        run = subprocess.run(command, capture_output=True, text=True, env=env | capability)
        assert run.returncode == 0, run.stderr[-2000:]
        assert float(run.stdout.split()[-1]) < 1e-6, capability
