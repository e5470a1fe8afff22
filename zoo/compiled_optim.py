"""An optimizer whose update runs compiled (``torch.compile``): its element-wise ops fused into one pass.

Eager ``torch.optim.Adamax`` makes about six passes over the parameters per step (no fused
kernel exists for it): 5-6 ms of a 50 ms DQN update cycle on a 2-core CPU, against about 1 ms
compiled. The closure (forward and backward, as Lightning passes it) runs eagerly before the
compiled update; the learning rate becomes a tensor so that a scheduler changing it does not
recompile the step. Each new optimizer compiles once (dynamo guards the graph on the optimizer
object); past dynamo's recompile limit, 8 optimizers in one process, it warns and runs the rest eagerly.

Example:
    >>> net = torch.nn.Linear(3, 2)
    >>> optimizer = with_compiled_update(torch.optim.Adamax)(net.parameters(), lr=0.1)
    >>> type(optimizer).__name__, type(optimizer.param_groups[0]["lr"]).__name__
    ('CompiledAdamax', 'Tensor')
    >>> float(with_compiled_update(torch.optim.Adamax)(net.parameters()).param_groups[0]["lr"])  # Adamax's default
    0.002
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
import torch._dynamo
from torch.optim import Optimizer

NO_COMPILER = (
    "The optimizer's compiled update (`compile_optimizer: true`) could not be built: {cause}. "
    "torch.compile needs a C++ compiler on CPU (e.g. `apt install g++`); or set `--model.compile_optimizer false`."
)


@functools.cache
def with_compiled_update(optimizer_class: type[Optimizer]) -> type[Optimizer]:
    """A subclass of ``optimizer_class`` whose ``step`` runs the closure eagerly, then the update compiled."""

    default_lr = inspect.signature(optimizer_class).parameters["lr"].default

    def __init__(self, params, lr: float | torch.Tensor = default_lr, **kwargs) -> None:
        optimizer_class.__init__(self, params, lr=torch.as_tensor(lr, dtype=torch.float64), **kwargs)
        update = optimizer_class.step
        if getattr(update, "hooked", False):  # torch's step-hook wrapper: the hooks run once, around this step
            update = update.__wrapped__
        # inductor's FX graph cache is keyed without the CPU's vector ISA: a step compiled under the default
        # kernels, loaded under ATEN_CPU_CAPABILITY=avx2, made wrong updates (torch 2.14). Its C++ cache is right
        self._compiled_update = torch.compile(functools.partial(update, self), options={"fx_graph_cache": False})

    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            self._compiled_update()
        except torch._dynamo.exc.BackendCompilerFailed as error:  # nothing was updated: it fails before running
            raise RuntimeError(NO_COMPILER.format(cause=str(error).splitlines()[0])) from error
        return loss

    name = f"Compiled{optimizer_class.__name__}"
    return type(name, (optimizer_class,), {"__init__": __init__, "step": step, "__qualname__": name})

