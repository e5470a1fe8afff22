"""Second derivatives through every weight-norm path: gradgradcheck in float64, and gradient
penalties (WGAN-GP, R1) against torch's weight norm and plain autograd through ``g * v / ||v||``."""

import contextlib
import copy
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call
from torch.nn.utils import parametrizations

from lightning_wn import cached, weight_norm
from lightning_wn._normalized_weight import NormalizedWeight
from lightning_wn._scaled_linear import ScaledLinear
from lightning_wn.weight_norm import WeightNorm

DOUBLE = torch.float64

# (weight shape, dim), small enough for gradgradcheck's numerical Jacobians
WEIGHTS = {
    "linear": ((3, 4), 0),
    "conv2d": ((3, 2, 2, 2), 0),
    "conv3d": ((2, 2, 2, 2, 2), 0),
    "conv_transpose2d": ((2, 3, 2, 2), 1),  # (in, out, ...): the output units are axis 1
    "last_axis": ((2, 2, 3), 2),
    "middle_axis": ((2, 3, 2, 2), 2),
    "vector": ((5,), 0),  # a 1-D weight is one unit
}
LOG_SCALE = {"g": None, "exp_cs": 2.0}  # g learned directly, or g = exp(c * s)


@pytest.fixture
def computed(monkeypatch):
    """"built" per weight computed (NormalizedWeight), "scaled" per output-scaled Linear call, in call order;
    a cached read adds nothing."""
    taken = []
    built, scaled = NormalizedWeight.apply, ScaledLinear.apply
    monkeypatch.setattr(NormalizedWeight, "apply", lambda *a: taken.append("built") or built(*a))
    monkeypatch.setattr(ScaledLinear, "apply", lambda *a: taken.append("scaled") or scaled(*a))
    return taken


def expected_weight(v, g, dim):
    """``g * v / ||v||`` in plain autograd."""
    axes = [axis for axis in range(v.dim()) if axis != dim] or None
    return g * v / torch.linalg.vector_norm(v, dim=axes, keepdim=True)


def inputs_of(wn: WeightNorm):
    """Fresh leaves holding ``wn``'s ``v`` and magnitude parameter, and the names they replace."""
    names = ("original1", "original0" if wn.log_scale_factor is None else "s")
    v, magnitude = (wn.get_parameter(name).detach().clone().requires_grad_() for name in names)
    with torch.no_grad():  # g away from ||v||, so that a mix-up of the two would show
        magnitude.add_(torch.linspace(0.1, 0.5, magnitude.numel(), dtype=DOUBLE).view_as(magnitude))
    return names, (v, magnitude)


@pytest.mark.parametrize("log_scale", sorted(LOG_SCALE))
@pytest.mark.parametrize("scoped", [False, True], ids=["uncached", "cached"])
@pytest.mark.parametrize("kind", sorted(WEIGHTS))
def test_every_weight_passes_gradcheck_and_gradgradcheck(kind, scoped, log_scale, computed):
    shape, dim = WEIGHTS[kind]
    wn = WeightNorm(torch.randn(shape, dtype=DOUBLE), dim, LOG_SCALE[log_scale])
    names, inputs = inputs_of(wn)

    def weight(v, magnitude):
        if not scoped:
            return functional_call(wn, dict(zip(names, (v, magnitude))), ())
        with cached():  # the second read is the first one's tensor
            functional_call(wn, dict(zip(names, (v, magnitude))), ())
            return functional_call(wn, dict(zip(names, (v, magnitude))), ())

    g = inputs[1] if wn.log_scale_factor is None else torch.exp(wn.log_scale_factor * inputs[1])
    torch.testing.assert_close(weight(*inputs), expected_weight(inputs[0], g, dim))
    computed.clear()
    weight(*inputs)
    assert len(computed) == 1
    assert gradcheck(weight, inputs)
    assert gradgradcheck(weight, inputs)


def test_importing_lightning_wn_changes_nothing_in_torch():
    """Torch's own weight norm computes its second derivative as torch ships it, and the import warns of nothing."""
    probe = (
        "import torch\n"
        "v = torch.randn(3, 4, dtype=torch.float64, requires_grad=True, generator=torch.Generator().manual_seed(0))\n"
        "g = torch.full((3, 1), 1.5, dtype=torch.float64, requires_grad=True)\n"
        "def second():\n"
        "    (gv,) = torch.autograd.grad(torch._weight_norm(v, g, 0).pow(3).sum(), v, create_graph=True)\n"
        "    return torch.autograd.grad(gv.square().sum(), (v, g))\n"
        "before = second()\n"
        "import lightning_wn\n"
        "after = second()\n"
        "assert all(torch.equal(a, b) for a, b in zip(before, after)), 'torch changed'\n"
    )
    done = subprocess.run([sys.executable, "-W", "error", "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


# --- gradient penalties -------------------------------------------------------------------------


def wgan_gp_loss(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's critic loss (Gulrajani et al., 2017): the critic runs three times per step."""
    eps = torch.linspace(0.2, 0.8, real.shape[0], dtype=real.dtype).view(-1, *[1] * (real.dim() - 1))
    between = (eps * real + (1 - eps) * fake).requires_grad_()
    (grad,) = torch.autograd.grad(critic(between).sum(), between, create_graph=True)
    penalty = (grad.flatten(1).norm(dim=1) - 1).square().mean()
    return critic(fake).mean() - critic(real).mean() + 10 * penalty


def r1_loss(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al., 2018): the gradient penalty on real data, one critic call."""
    real = real.clone().requires_grad_()
    out = critic(real)
    (grad,) = torch.autograd.grad(out.sum(), real, create_graph=True)
    return nn.functional.softplus(-out).mean() + 5 * grad.square().sum()


CRITICS = {  # (critic, input shape); a Linear(512, 512) fed 4 rows scales its output
    "linear_large": (lambda: nn.Sequential(nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 1)), (4, 512)),
    "conv": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.Softplus(), nn.ConvTranspose2d(4, 3, 2), nn.Tanh(),  # (3, 3, 4, 4)
            nn.Unflatten(1, (1, 3)), nn.Conv3d(1, 2, 2), nn.Softplus(), nn.Flatten(), nn.Linear(36, 1),
        ),
        (3, 2, 5, 5),
    ),
}
NORMALIZED = (nn.Linear, nn.modules.conv._ConvNd)


def make_critic(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    make, shape = CRITICS[kind]
    torch.manual_seed(0)
    return make().double(), torch.randn(shape, dtype=DOUBLE), torch.randn(shape, dtype=DOUBLE)


def normalized_pair(critic: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The critic under our weight norm and under torch's, with the same g (not ||v||), v and biases."""
    ours, theirs = copy.deepcopy(critic), copy.deepcopy(critic)
    for module in ours:
        if isinstance(module, NORMALIZED):
            weight_norm(module)
            with torch.no_grad():
                module.parametrizations.weight.original0.mul_(1.5)
    for module in theirs:
        if isinstance(module, NORMALIZED):
            parametrizations.weight_norm(module, dim=1 if isinstance(module, nn.ConvTranspose2d) else 0)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def plain_autograd(critic: nn.Module, ours: nn.Module):
    """``critic`` with every weight built as ``g * v / ||v||`` in plain autograd from leaves equal to
    ``ours``'s parameters: the reference. Returns the forward and the leaves, by ``ours``'s names."""
    leaves = {name: p.detach().clone().requires_grad_() for name, p in ours.named_parameters()}

    def forward(x):
        params = {}
        for name, module in ours.named_children():
            if hasattr(module, "parametrizations"):
                wn, prefix = module.parametrizations.weight, f"{name}.parametrizations.weight."
                c = wn.log_scale_factor
                g = leaves[prefix + "original0"] if c is None else torch.exp(c * leaves[prefix + "s"])
                params[f"{name}.weight"] = expected_weight(leaves[prefix + "original1"], g, wn.dim)
                params[f"{name}.bias"] = leaves[f"{name}.bias"]
        return functional_call(critic, params, (x,))

    return forward, leaves


@pytest.mark.parametrize("loss_fn", [wgan_gp_loss, r1_loss], ids=["wgan_gp", "r1"])
@pytest.mark.parametrize("kind", sorted(CRITICS))
def test_gradient_penalties_give_the_gradients_of_torchs_weight_norm_and_of_plain_autograd(kind, loss_fn, computed):
    critic, real, fake = make_critic(kind)
    ours, theirs = normalized_pair(critic)
    computed.clear()
    with cached():  # as the callback runs a step: WGAN-GP's three critic calls share each weight
        loss_fn(ours, real, fake).backward()
    assert computed.count("built") <= sum(isinstance(m, NORMALIZED) for m in critic)  # each weight built once at most
    assert ("scaled" in computed) == (kind == "linear_large")  # a Linear(512, 512) fed 4 rows scales its output
    loss_fn(theirs, real, fake).backward()
    reference, leaves = plain_autograd(critic, ours)
    loss_fn(reference, real, fake).backward()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_params[name].grad, rtol=1e-7, atol=1e-9, msg=f"{name} vs torch")
        torch.testing.assert_close(p.grad, leaves[name].grad, rtol=1e-7, atol=1e-9, msg=f"{name} vs plain autograd")


def gradient_norm_penalty(critic: nn.Module, params: list[torch.Tensor], x: torch.Tensor, calls: int) -> torch.Tensor:
    """A penalty on the parameters' own gradients (as in hypergradients or MAML): it backpropagates
    through the weight-norm nodes' backward, their second derivative."""
    loss = sum(critic(x * (1 + k)).square().mean() for k in range(calls))
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return loss + sum(grad.square().sum() for grad in grads)


@pytest.mark.parametrize("calls", [1, 2], ids=["first_call", "second_call"])
@pytest.mark.parametrize("log_scale", sorted(LOG_SCALE))
@pytest.mark.parametrize("kind", sorted(CRITICS))
def test_a_penalty_on_parameter_gradients_matches_plain_autograd(kind, log_scale, calls, computed):
    critic, real, _ = make_critic(kind)
    ours = copy.deepcopy(critic)
    for module in ours:
        if isinstance(module, NORMALIZED):
            weight_norm(module, log_scale_factor=LOG_SCALE[log_scale])
    computed.clear()
    with cached():
        gradient_norm_penalty(ours, list(ours.parameters()), real, calls).backward()
    assert computed.count("built") <= sum(isinstance(m, NORMALIZED) for m in critic)  # once, however many calls
    assert ("scaled" in computed) == (kind == "linear_large")
    reference, leaves = plain_autograd(critic, ours)
    gradient_norm_penalty(reference, list(leaves.values()), real, calls).backward()
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, leaves[name].grad, rtol=1e-7, atol=1e-9, msg=name)


def test_the_compiled_path_gives_second_derivatives_or_refuses_them():
    """Under torch.compile the weight is built from plain ops, whose second derivatives autograd knows (dynamo
    detaches the create_graph backward of an autograd.Function: they came out silently wrong). AOTAutograd
    refuses double backward with a clear error (which one depends on the graph it compiled: with donated
    buffers it names them); dynamo alone keeps autograd, and the result is right."""
    critic, real, _ = make_critic("conv")
    ours = copy.deepcopy(critic)
    for module in ours:
        if isinstance(module, NORMALIZED):
            weight_norm(module)
    torch._dynamo.reset()
    gradient_norm_penalty(torch.compile(ours, backend="eager"), list(ours.parameters()), real, 1).backward()
    reference, leaves = plain_autograd(critic, ours)
    gradient_norm_penalty(reference, list(leaves.values()), real, 1).backward()
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, leaves[name].grad, rtol=1e-7, atol=1e-9, msg=name)
    torch._dynamo.reset()
    refusals = "does not currently support double backward|donated buffers which requires create_graph=False"
    with pytest.raises(RuntimeError, match=refusals):
        gradient_norm_penalty(torch.compile(ours, backend="aot_eager"), list(ours.parameters()), real, 1).backward()
    torch._dynamo.reset()


def test_a_vector_weight_is_one_unit_on_every_path():
    """ATen's fused op reads dim 0 of a 1-D tensor as one unit per entry: with one g it read (and
    wrote) past the end of g, and the process aborted. Here a 1-D weight is one unit, one g."""
    wn = WeightNorm(torch.randn(5, dtype=DOUBLE), dim=0)
    _, (v, g) = inputs_of(wn)
    wn.original1, wn.original0 = nn.Parameter(v.detach().clone()), nn.Parameter(g.detach().clone())
    first = wn()
    with cached():
        second = wn()
    with torch.no_grad():
        no_grad = wn()
    expected = expected_weight(v, g, 0)
    for w in (first, second, no_grad):
        torch.testing.assert_close(w, expected)
    (first + 2 * second).sum().backward()
    (3 * expected).sum().backward()
    torch.testing.assert_close(wn.original1.grad, v.grad)
    torch.testing.assert_close(wn.original0.grad, g.grad)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape", [(2, 5), (2, 1, 5), (5,)], ids=["rows", "3d", "one_row"])
def test_output_scaling_passes_gradcheck_and_gradgradcheck(x_shape, bias):
    x = torch.randn(x_shape, dtype=DOUBLE, requires_grad=True)
    v = torch.randn(3, 5, dtype=DOUBLE, requires_grad=True)
    g = (torch.rand(3, 1, dtype=DOUBLE) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=DOUBLE, requires_grad=True) if bias else None
    inputs = (x, v, g, b, DOUBLE)
    assert gradcheck(ScaledLinear.apply, inputs)
    assert gradgradcheck(ScaledLinear.apply, inputs)


@pytest.mark.parametrize("log_scale", sorted(LOG_SCALE))
def test_a_large_linear_on_the_output_scaling_path_passes_gradgradcheck(log_scale, computed):
    layer = weight_norm(nn.Linear(1024, 256).double(), log_scale_factor=LOG_SCALE[log_scale])  # 2^18 weights
    (v_name, m_name), (v, magnitude) = inputs_of(layer.parametrizations.weight)
    x = torch.randn(2, 1024, dtype=DOUBLE, requires_grad=True)
    bias = layer.bias.detach().clone().requires_grad_()

    def forward(x, v, magnitude, bias):
        params = {f"parametrizations.weight.{v_name}": v, f"parametrizations.weight.{m_name}": magnitude, "bias": bias}
        return functional_call(layer, params, (x,))[:, :3]  # a few outputs: gradgradcheck's Jacobians stay small

    computed.clear()
    assert gradgradcheck(forward, (x, v, magnitude, bias), eps=1e-6, atol=1e-4, fast_mode=True)
    assert set(computed) == {"scaled"}


# (layer, one example's shape): the large Linear fed one row would take the output-scaling path
TRANSFORMED = {
    "conv2d": (lambda: nn.Conv2d(2, 3, 2), (2, 4, 4)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(2, 3, 2), (2, 3, 3)),
    "linear_large": (lambda: nn.Linear(1024, 256), (1024,)),
}


@pytest.mark.parametrize("scoped", [False, True], ids=["uncached", "cached"])
@pytest.mark.parametrize("kind", sorted(TRANSFORMED))
def test_torch_func_transforms_equal_plain_autograd(kind, scoped):
    make, shape = TRANSFORMED[kind]
    layer, plain = weight_norm(make().double()), make().double()
    ours = {name: p.detach() for name, p in layer.named_parameters()}
    (name, wn), = layer.parametrizations.named_children()
    v_key, g_key = f"parametrizations.{name}.original1", f"parametrizations.{name}.original0"
    xs = torch.randn(3, *shape, dtype=DOUBLE)

    def loss(params, x):
        return functional_call(layer, params, (x,)).sin().sum()

    def reference(params, x):  # w = g * v / ||v|| in plain ops, through the plain layer
        w = expected_weight(params[v_key], params[g_key], wn.dim)
        return functional_call(plain, {"weight": w, "bias": params["bias"]}, (x,)).sin().sum()

    grad, vmap, ones = torch.func.grad, torch.func.vmap, torch.ones_like(ours[v_key])
    with cached() if scoped else contextlib.nullcontext():  # as inside a Lightning step
        per_example = vmap(grad(loss), in_dims=(None, 0))(ours, xs)
        expected = vmap(grad(reference), in_dims=(None, 0))(ours, xs)
        for key in ours:
            torch.testing.assert_close(per_example[key], expected[key], msg=key)
        g, t = ours[g_key], torch.linspace(-1, 1, ours[g_key].numel(), dtype=DOUBLE).view_as(ours[g_key])

        def hessian_vector_products(f):  # in g: forward over reverse, reverse over reverse
            grad_g = grad(lambda g: f(ours | {g_key: g}, xs[0]))
            return torch.func.jvp(grad_g, (g,), (t,))[1], torch.func.vjp(grad_g, g)[1](t)[0]

        torch.testing.assert_close(hessian_vector_products(loss), hessian_vector_products(reference))
        jvp = torch.func.jvp(lambda v: loss(ours | {v_key: v}, xs[0]), (ours[v_key],), (ones,))
        expected = torch.func.jvp(lambda v: reference(ours | {v_key: v}, xs[0]), (ours[v_key],), (ones,))
        torch.testing.assert_close(jvp, expected)
