"""weight_norm against torch's own implementation, the fast paths, folding and the paper's facts."""

import contextlib
import contextvars
import copy
import io
import pickle
import re
import threading

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from lightning_wn import (
    apply_weight_norm,
    cached,
    fold_state_dict,
    is_weight_normalized,
    limit_direction_norm,
    remove_weight_norm,
    weight_norm,
    weight_norms,
)
from lightning_wn._normalized_weight import NormalizedWeight
from lightning_wn._scaled_linear import ScaledLinear
from lightning_wn.weight_norm import default_dim, default_names

torch.manual_seed(0)

# (layer, input); recurrent layers take (batch, seq, features) or (batch, features)
LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), (3, 7)),
    "linear_many_rows": (lambda: nn.Linear(4, 5), (30, 4)),
    "linear_3d_input": (lambda: nn.Linear(6, 5), (2, 3, 6)),
    "linear_large": (lambda: nn.Linear(1024, 256), (3, 1024)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3), (2, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 6)),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2), (2, 4, 6, 6)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 4, 3, groups=4, bias=False), (2, 4, 6, 6)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), (2, 2, 4, 4, 4)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), (2, 3, 5)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2), (2, 3, 5, 5)),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(2, 3, 2), (2, 2, 3, 3, 3)),
    "rnn": (lambda: nn.RNN(4, 5, num_layers=2, batch_first=True), (2, 3, 4)),
    "lstm_bidirectional": (lambda: nn.LSTM(4, 5, batch_first=True, bidirectional=True), (2, 3, 4)),
    "lstm_proj": (lambda: nn.LSTM(4, 6, proj_size=3, batch_first=True), (2, 3, 4)),
    "gru": (lambda: nn.GRU(4, 5, batch_first=True), (2, 3, 4)),
    "rnn_cell": (lambda: nn.RNNCell(4, 5), (3, 4)),
    "lstm_cell": (lambda: nn.LSTMCell(4, 5), (3, 4)),
    "gru_cell": (lambda: nn.GRUCell(4, 5), (3, 4)),
}


def torch_weight_norm(module: nn.Module) -> nn.Module:
    for name in default_names(module):
        parametrizations.weight_norm(module, name, dim=default_dim(module))
    return module


def output_sum(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    return (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_forward_and_gradients_equal_torch_weight_norm(kind):
    make, shape = LAYERS[kind]
    plain = make().double()
    x = torch.randn(shape, dtype=torch.double)
    expected_out = plain(x)
    ours, theirs = weight_norm(copy.deepcopy(plain)), torch_weight_norm(copy.deepcopy(plain))
    for _ in range(2):  # the second call in a step takes the cached weight
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours(x)[0] if isinstance(ours(x), tuple) else ours(x),
                               expected_out[0] if isinstance(expected_out, tuple) else expected_out)
    output_sum(ours, x).backward()
    output_sum(theirs, x).backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, theirs_grads[name].grad, rtol=1e-9, atol=1e-10, msg=name)


def test_state_dict_keys_and_shapes_are_torchs():
    for kind, (make, _) in LAYERS.items():
        plain = make()
        ours, theirs = weight_norm(copy.deepcopy(plain)), torch_weight_norm(copy.deepcopy(plain))
        assert {k: v.shape for k, v in ours.state_dict().items()} == {
            k: v.shape for k, v in theirs.state_dict().items()
        }, kind


@pytest.mark.parametrize("kind", ["conv2d", "conv_transpose2d", "lstm_cell", "linear"])
def test_state_dicts_load_both_ways(kind):
    make, shape = LAYERS[kind]
    x = torch.randn(shape)
    ours = weight_norm(make())
    theirs = torch_weight_norm(make())
    with torch.no_grad():  # make g differ from ||v|| so a mix-up would show
        for module in (ours, theirs):
            for name, p in module.named_parameters():
                p.mul_(torch.rand_like(p) + 0.5)
    fresh_ours, fresh_theirs = weight_norm(make()), torch_weight_norm(make())
    fresh_ours.load_state_dict(theirs.state_dict())
    fresh_theirs.load_state_dict(ours.state_dict())
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    torch.testing.assert_close(first(fresh_ours(x)), first(theirs(x)))
    torch.testing.assert_close(first(fresh_theirs(x)), first(ours(x)))


def test_conv_transpose_normalizes_per_output_channel():
    layer = weight_norm(nn.ConvTranspose2d(3, 4, 3, bias=False))
    wn = layer.parametrizations.weight
    assert wn.dim == 1 and wn.original0.shape == (1, 4, 1, 1)
    x = torch.randn(2, 3, 5, 5)
    before = layer(x)
    with torch.no_grad():
        wn.original0[0, 2] *= 3.0
    after = layer(x)
    torch.testing.assert_close(after[:, 2], 3.0 * before[:, 2])
    torch.testing.assert_close(after[:, [0, 1, 3]], before[:, [0, 1, 3]])
    torch.testing.assert_close(torch.linalg.vector_norm(layer.weight, dim=(0, 2, 3)), wn.original0.flatten())


def test_gradcheck_the_custom_autograd_function():
    v4 = torch.randn(3, 4, 2, 2, dtype=torch.double, requires_grad=True)
    for dim in range(4):  # 0 and 3 take ATen's fused kernels, 1 and 2 the generic path
        shape = [1] * 4
        shape[dim] = v4.shape[dim]
        g4 = (torch.rand(shape, dtype=torch.double) + 0.5).requires_grad_()
        assert torch.autograd.gradcheck(lambda a, b, d=dim: NormalizedWeight.apply(a, b, d)[0], (v4, g4))


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(3, 4, 3), lambda: nn.ConvTranspose2d(3, 4, 3)], ids=["conv", "transpose"])
@pytest.mark.parametrize("grad", [True, False])
def test_a_channels_last_layer_computes_what_the_contiguous_one_does(make, grad):
    # channels_last strides: ATen's fused kernels, which read v as contiguous, must not see them
    layer = weight_norm(make())
    fast = copy.deepcopy(layer).to(memory_format=torch.channels_last)
    assert not fast.parametrizations.weight.original1.is_contiguous()
    x = torch.randn(2, 3, 6, 6)
    with torch.set_grad_enabled(grad):
        out = fast(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(out, layer(x))
    if grad:
        output_sum(fast, x).backward()
        output_sum(layer, x).backward()
        for (name, p), q in zip(fast.named_parameters(), layer.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_separate_backward_passes_through_one_cached_weight():
    plain = nn.LSTMCell(3, 4)
    cell, reference = weight_norm(copy.deepcopy(plain)), torch_weight_norm(copy.deepcopy(plain))
    x1, x2 = torch.randn(2, 3), torch.randn(2, 3)
    for module in (cell, reference):
        with cached():
            loss_a, loss_b = module(x1)[0].sum(), module(x2)[1].square().sum()
            loss_a.backward()
            loss_b.backward()
    ref = dict(reference.named_parameters())
    for name, p in cell.named_parameters():
        torch.testing.assert_close(p.grad, ref[name].grad)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_cached_weight_that_learns_g_as_exp_serves_separate_backward_passes_and_checkpointing(reentrant):
    # g = exp(c * s) as an autograd node of its own freed its saved output at the first backward through a reused w
    torch.manual_seed(0)
    layer, x = weight_norm(nn.Linear(4, 4), log_scale_factor=3.0), torch.randn(8, 4, requires_grad=True)

    def grads(scope, run) -> list[torch.Tensor]:
        layer.zero_grad()
        with scope:
            run()
        return [p.grad.clone() for p in layer.parameters()]

    def separate():
        for half in x.chunk(2):
            layer(half).square().sum().backward()

    def checkpointed():
        torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=reentrant).square().sum().backward()

    for run in (separate, checkpointed):
        for got, expected in zip(grads(cached(), run), grads(contextlib.nullcontext(), run)):
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("scoped", [True, False], ids=["cached", "uncached"])
def test_a_module_called_many_times_computes_its_weight_once_per_step_inside_cached(monkeypatch, scoped):
    calls = []
    apply = NormalizedWeight.apply
    monkeypatch.setattr(NormalizedWeight, "apply", lambda *a: calls.append(1) or apply(*a))
    cell = weight_norm(nn.LSTMCell(3, 4))
    optimizer = torch.optim.SGD(cell.parameters(), lr=0.1)
    x = torch.randn(2, 3)
    outputs = []
    for _ in range(3):
        calls.clear()
        with cached() if scoped else contextlib.nullcontext():
            h = c = torch.zeros(2, 4)
            for _ in range(16):
                h, c = cell(x, (h, c))
            h.sum().backward()
            optimizer.step()  # inside the block: g and v change, and the next read must see it
            optimizer.zero_grad()
            outputs.append(cell(x, (h, c))[0].detach())
        assert len(calls) == (2 + 2 if scoped else 2 * 17)  # weight_ih and weight_hh, again after the step
    fresh = cell(x, (h, c))[0]
    torch.testing.assert_close(outputs[-1], fresh.detach())


@pytest.mark.parametrize(("features", "rows", "scaled"), [(1024, 3, True), (1024, 2000, False), (64, 3, False)])
@pytest.mark.parametrize("grad", [True, False])
def test_a_linear_scales_its_output_only_where_that_is_cheaper(monkeypatch, features, rows, scaled, grad):
    """A big weight fed fewer rows than inputs: the paper's output scaling, at every call (cached or not); otherwise
    w itself."""
    calls = []
    apply = ScaledLinear.apply
    monkeypatch.setattr(ScaledLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    layer = weight_norm(nn.Linear(features, 256))
    x = torch.randn(rows, features)
    with torch.set_grad_enabled(grad):
        first = layer(x)
        assert len(calls) == scaled
        with cached():
            second, third = layer(x), layer(x)
        assert len(calls) == 3 * scaled
    w = layer.parametrizations.weight.compute()
    for out in (first, second, third):
        torch.testing.assert_close(out, nn.functional.linear(x, w, layer.bias))


@pytest.mark.parametrize("rows", [4, 2000], ids=["output_scaling", "built_w"])
def test_an_input_of_another_dtype_is_refused_as_by_a_plain_linear(rows):
    x = torch.randn(rows, 1024, dtype=torch.bfloat16)
    for layer in (nn.Linear(1024, 256), weight_norm(nn.Linear(1024, 256))):
        with pytest.raises(RuntimeError, match="dtype"):
            layer(x)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("calls", [1, 2])
def test_activation_checkpointing_inside_cached_recomputes_what_the_forward_computed(reentrant, calls):
    # the recomputed forward must take the path the first took: a cached() entry must not switch it
    torch.manual_seed(0)
    layer, x = weight_norm(nn.Linear(1024, 256)), torch.randn(4, 1024)  # the output-scaling path
    reference = parametrizations.weight_norm(nn.Linear(1024, 256))
    reference.load_state_dict(layer.state_dict())
    x, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()  # reentrant checkpointing needs one

    def run(module, x):
        for _ in range(calls):
            x = module(x).repeat(1, 4)
        return x

    with cached():
        torch.utils.checkpoint.checkpoint(run, layer, x, use_reentrant=reentrant).square().sum().backward()
    run(reference, x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for (name, p), q in zip(layer.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_a_float64_layer_under_autocast_stays_float64_on_the_output_scaling_path():
    layer, x = weight_norm(nn.Linear(1024, 256).double()), torch.randn(4, 1024, dtype=torch.float64)
    with torch.no_grad():
        expected = nn.functional.linear(x, layer.weight, layer.bias)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves float64 alone, as for a plain Linear
            out = layer(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected)


def test_a_compiled_model_is_not_compiled_again_inside_cached():
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    model = nn.Sequential(weight_norm(nn.Linear(8, 8)), nn.ReLU(), weight_norm(nn.Linear(8, 2)))
    compiled, x = torch.compile(model, backend=backend), torch.randn(4, 8)
    compiled(x).sum().backward()
    with cached():
        compiled(x).sum().backward()
    assert len(graphs) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_scaling_under_autocast_runs_the_matmul_in_its_dtype_and_the_norm_in_float32(dtype):
    torch.manual_seed(0)
    layer = weight_norm(nn.Linear(1024, 256))
    x = torch.randn(4, 1024)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x)  # the scaled path
        expected = nn.functional.linear(x, layer.parametrizations.weight.compute(), layer.bias)  # w built, then cast
    assert out.dtype == expected.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.02, atol=0.02)
    out.float().square().sum().backward()
    g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
    assert g.grad.dtype == v.grad.dtype == torch.float32 and torch.isfinite(g.grad).all() and torch.isfinite(v.grad).all()
    reference = copy.deepcopy(layer)
    reference.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        nn.functional.linear(x, reference.parametrizations.weight.compute(), reference.bias).float().square().sum().backward()
    rg = reference.parametrizations.weight.original0.grad
    torch.testing.assert_close(g.grad, rg, rtol=0.05, atol=0.05 * rg.abs().max().item())


@pytest.mark.parametrize("scoped", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("grad", [True, False])
def test_the_cached_weight_follows_which_tensors_are_used_not_only_their_versions(scoped, grad):
    def expected(params, x):
        w = torch._weight_norm(params["parametrizations.weight.original1"], params["parametrizations.weight.original0"], 0)
        return nn.functional.linear(x, w, params["bias"])

    layer = weight_norm(nn.Linear(4, 3))
    x = torch.randn(4, 4)
    a = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    b = {k: torch.randn_like(v) for k, v in a.items()}
    with torch.set_grad_enabled(grad), cached() if scoped else contextlib.nullcontext():
        for params in (a, a, b, b, a):  # twice each: the second call would be served from the cache
            out = torch.func.functional_call(layer, params, (x,))
            torch.testing.assert_close(out, expected(params, x))
        for params in (a, b):
            layer.load_state_dict({k: nn.Parameter(v.clone()) for k, v in params.items()}, assign=True)
            for _ in range(2):
                torch.testing.assert_close(layer(x), expected(params, x))


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True),  # updates in place without bumping versions
        lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=True),
        lambda ps: torch.optim.Adamax(ps, lr=0.1),
    ],
    ids=["fused_adam", "foreach_sgd", "adamax"],
)
def test_an_optimizer_step_inside_cached_is_seen_by_the_next_forward(make_optimizer):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 2))
    apply_weight_norm(model)
    optimizer, x = make_optimizer(model.parameters()), torch.randn(2, 3, 6, 6)
    with cached():
        before = model(x)
        before.square().sum().backward()
        optimizer.step()
        after = model(x)
    torch.testing.assert_close(after, model(x))  # computed afresh outside the block
    assert not torch.allclose(after, before)


def test_a_context_copied_inside_cached_computes_afresh_once_the_block_has_exited():
    layer, x = weight_norm(nn.Linear(4, 3)), torch.randn(2, 4)
    with cached():
        layer(x)
        copied = contextvars.copy_context()  # as an asyncio task created in the block holds it
    with torch.no_grad():
        layer.parametrizations.weight.original0.data.mul_(2.0)  # no version bump: only the block's end tells
    torch.testing.assert_close(copied.run(layer, x), layer(x))


def test_a_thread_running_a_context_copied_inside_cached_goes_on_as_the_block_closes():
    layer, x, errors = weight_norm(nn.Linear(4, 4)), torch.randn(2, 4), []

    def forward_until(stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                layer(x)
        except Exception as error:  # noqa: BLE001 (a thread's errors are lost unless kept)
            errors.append(error)

    for _ in range(30):  # the block closing between two reads of the cache was seen within the first few
        stop = threading.Event()
        with cached():
            thread = threading.Thread(target=contextvars.copy_context().run, args=(forward_until, stop))
            thread.start()
            for _ in range(20):
                layer(x)
        for _ in range(20):
            layer(x)
        stop.set()
        thread.join()
    assert not errors


def test_a_storage_swapped_inside_cached_is_seen_by_the_next_forward():
    layer, x = weight_norm(nn.Linear(4, 3)), torch.randn(2, 4)
    with cached():
        before = layer(x)
        g = layer.parametrizations.weight.original0
        g.data = g.data * 2  # what Module.to() does to every parameter: same tensor, same version, new storage
        after = layer(x)
    torch.testing.assert_close(after - layer.bias, 2 * (before - layer.bias))


def test_a_storage_swapped_twice_inside_cached_is_seen_though_the_allocator_may_reuse_the_address():
    # .half() then .float(): new storage twice; the second may take the first's freed address (some runs in ten)
    x = torch.randn(200, 100)
    for seed in range(100):
        torch.manual_seed(seed)
        layer = weight_norm(nn.Linear(100, 100))
        with cached():
            layer(x)
            layer.half().float()
            out = layer(x)
        torch.testing.assert_close(out, nn.functional.linear(x, layer.parametrizations.weight.compute(), layer.bias))


def test_a_weight_cached_without_grad_does_not_serve_a_forward_with_grad():
    layer = weight_norm(nn.Linear(4, 3))
    with cached():
        with torch.no_grad():
            layer(torch.randn(2, 4))
        layer(torch.randn(2, 4)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


@pytest.mark.parametrize("make", [lambda: nn.Linear(6, 4), lambda: nn.Conv2d(3, 4, 3)], ids=["linear", "conv"])
@pytest.mark.parametrize("log_scale_factor", [None, 3.0])
def test_a_zero_initialized_layer_stays_finite_forward_and_backward(make, log_scale_factor):
    layer = make()
    nn.init.zeros_(layer.weight)
    with torch.no_grad():
        layer.weight[0] = 1.0  # one unit with a direction, the others without
    plain = copy.deepcopy(layer)
    weight_norm(layer, log_scale_factor=log_scale_factor)
    x = torch.randn(2, *((6,) if isinstance(layer, nn.Linear) else (3, 5, 5)))
    out = layer(x)
    torch.testing.assert_close(out, plain(x))  # w is the zero weight, exactly as before
    out.square().sum().backward()
    grads = [p.grad for p in layer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "make", [lambda: nn.Linear(64, 32), lambda: nn.ConvTranspose2d(8, 4, 3), lambda: nn.LSTM(4, 8)], ids=["linear", "conv-transpose", "lstm"]
)
def test_reset_parameters_reinitializes_g_and_v_after_to_empty(make):
    torch.manual_seed(0)
    reference = make()  # the layer's own init, for its scale
    with torch.device("meta"):
        layer = weight_norm(make())
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    for name in type(layer)._wn_names:
        w, expected = getattr(layer, name), getattr(reference, name)
        assert torch.isfinite(w).all() and w.abs().max().item() <= expected.abs().max().item() * 1.01
        assert w.std().item() == pytest.approx(expected.std().item(), rel=0.15)  # drawn as the plain layer draws
    assert all(torch.isfinite(p).all() for p in layer.parameters())


def test_a_layer_learning_s_built_on_meta_saves_the_c_it_computes_with():
    with torch.device("meta"):
        built, loaded = (weight_norm(nn.Linear(4, 3), log_scale_factor=3.0) for _ in range(2))
    built.to_empty(device="cpu")
    built.reset_parameters()  # the buffer c too, which to_empty left uninitialized
    fresh = weight_norm(nn.Linear(4, 3), log_scale_factor=3.0)
    fresh.load_state_dict(built.state_dict())
    x = torch.randn(5, 4)
    torch.testing.assert_close(fresh(x), built(x))
    torch.testing.assert_close(fold_state_dict(built.state_dict())["weight"], built.weight)
    plain = nn.Linear(4, 3)
    loaded.load_state_dict(plain.state_dict(), assign=True)  # a plain weight, split into s and v on the cpu
    assert loaded.parametrizations.weight.c.device.type == "cpu"
    torch.testing.assert_close(fold_state_dict(loaded.state_dict())["weight"], plain.weight)


WRITES = {  # into the computed tensor, not into g or v
    "normal_": lambda w: w.normal_(),
    "through .data": lambda w: w.data.normal_(),  # a tensor with a version counter of its own
    "through a view": lambda w: w.view(-1)[1:].zero_(),
    "through a chunk": lambda w: w.chunk(3)[0].fill_(2.0),
    "through detach": lambda w: w.detach().copy_(torch.ones_like(w)),  # shares storage, yet is not a view
    "setitem": lambda w: w.__setitem__(0, 1.0),
    "out=": lambda w: torch.add(w, 1, out=w),
    "orthogonal_": nn.init.orthogonal_,
}


@pytest.mark.parametrize("write", WRITES)
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_writing_into_the_computed_weight_is_refused_with_the_fix(write, grad):
    layer = weight_norm(nn.Linear(4, 3))
    layer(torch.randn(2, 4))  # a cached w, as after any call
    before = [p.clone() for p in layer.parameters()]
    with pytest.raises(RuntimeError, match=r"weight was written in place.*`layer.reset_parameters\(\)`"):
        with torch.set_grad_enabled(grad), torch.no_grad():  # nn.init's way: no grad, from either mode
            WRITES[write](layer.weight)
        layer(torch.randn(2, 4))  # where the write itself was not seen, the next call refuses it
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    bias, g, v = before
    expected = nn.functional.linear(torch.ones(1, 4), g * v / v.norm(dim=1, keepdim=True), bias)
    torch.testing.assert_close(layer(torch.ones(1, 4)), expected)  # computed from g and v, as before the write
    wanted = torch.randn(3, 4)
    layer.parametrizations.weight.reset(wanted)
    torch.testing.assert_close(layer.weight, wanted)
    layer(torch.randn(2, 4)).sum().backward()  # and it trains from there
    with torch.inference_mode():  # inference tensors keep no version counter: nothing to watch
        torch.testing.assert_close(layer(torch.ones(1, 4)), layer(torch.ones(1, 4)))


def test_a_leaf_made_from_the_computed_weight_is_that_leaf_and_takes_its_gradient():
    layer = weight_norm(nn.Linear(4, 3))
    leaf = layer.weight.detach().requires_grad_()  # requires_grad_ returns the tensor itself, not an alias of it
    leaf.square().sum().backward()
    torch.testing.assert_close(leaf.grad, 2 * layer.weight.detach())
    frozen = nn.Parameter(layer.weight.detach(), requires_grad=False)  # a frozen copy of the user's own
    assert not frozen.requires_grad and torch.equal(frozen, layer.weight)


def test_the_weight_read_outside_the_layer_copies_and_saves_as_a_plain_tensor(tmp_path):
    layer = weight_norm(nn.Linear(4, 3))
    with torch.no_grad():
        w = layer.weight
    for copied in (copy.deepcopy(w), copy.deepcopy(w.detach()), copy.deepcopy({"w": w})["w"], pickle.loads(pickle.dumps(w))):
        assert type(copied) is torch.Tensor and torch.equal(copied, w)
        copied.zero_()  # a copy is the user's own to write
    torch.save({"w": w.detach()}, tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt", weights_only=True)["w"]
    assert type(loaded) is torch.Tensor and torch.equal(loaded, layer.weight)


def test_ops_on_the_weight_read_outside_the_layer_return_as_on_a_plain_tensor():
    layer = weight_norm(nn.Linear(4, 3))
    w = layer.weight
    plain = w.clone()  # a new tensor: plain
    for op in (lambda t: t.max(0), lambda t: t.sort(1), lambda t: torch.topk(t, 2), lambda t: t.chunk(3)):
        got, wanted = op(w), op(plain)  # named tuples keep their type and fields (w.max(0).values)
        assert type(got) is type(wanted) and all(torch.equal(a, b) for a, b in zip(got, wanted))
    assert torch.equal(w.max(0).values, plain.max(0).values)
    with pytest.raises(RuntimeError, match="written in place"):
        w.chunk(3)[0].zero_()  # views in a tuple still refuse writes


GRAD_MODE_WRITES = {  # layer, input shape, the computed tensor written
    "linear": (lambda: nn.Linear(4, 3), (2, 4), "weight"),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3), (2, 2, 5, 5), "weight"),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3), (2, 2, 5), "weight"),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(2, 3, 3), (2, 2, 5, 5), "weight"),
    "lstm_cell": (lambda: nn.LSTMCell(4, 3), (2, 4), "weight_ih"),
    "gru_cell": (lambda: nn.GRUCell(4, 3), (2, 4), "weight_hh"),
    "rnn_cell": (lambda: nn.RNNCell(4, 3), (2, 4), "weight_ih"),
    "lstm": (lambda: nn.LSTM(4, 3), (5, 2, 4), "weight_ih_l0"),
    "gru_2_layers": (lambda: nn.GRU(4, 3, num_layers=2), (5, 2, 4), "weight_hh_l1"),
}


@pytest.mark.parametrize("init", [nn.init.normal_, nn.init.kaiming_uniform_, nn.init.zeros_])
@pytest.mark.parametrize("case", GRAD_MODE_WRITES)
def test_nn_init_on_the_computed_weight_in_grad_mode_is_refused_not_lost(case, init):
    # right after construction, grad mode on: the w that nn.init writes is the first one computed
    make, shape, name = GRAD_MODE_WRITES[case]
    layer = weight_norm(make())
    before = [p.clone() for p in layer.parameters()]
    with pytest.raises(RuntimeError, match="weight was written in place.*`layer.reset_parameters\\(\\)`"):
        init(getattr(layer, name))  # refused as it writes
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))  # g and v untouched
    out = layer(torch.randn(shape))  # the layer computes from g and v, as before
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_a_weight_read_outside_the_forward_gets_its_gradient():
    torch.manual_seed(0)
    layer, x = weight_norm(nn.Conv2d(2, 3, 3)), torch.randn(2, 2, 5, 5)
    g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
    penalty = layer.weight.square().sum()  # read by the training step, outside the layer's forward
    (layer(x).sum() + penalty).backward()
    g_, v_ = g.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    w = g_ * v_ / torch.linalg.vector_norm(v_, dim=(1, 2, 3), keepdim=True)
    (nn.functional.conv2d(x, w, layer.bias.detach()).sum() + w.square().sum()).backward()
    torch.testing.assert_close(g.grad, g_.grad)
    torch.testing.assert_close(v.grad, v_.grad)
    layer(x).sum().backward()  # the cached w went with its backward: the next step builds a new graph


def test_tied_weights_are_refused_not_silently_untied():
    class TiedAutoencoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.decode = nn.Linear(6, 6, bias=False), nn.Linear(6, 6)
            self.decode.weight = self.embed.weight  # one tensor, two layers

    model = TiedAutoencoder()
    with pytest.raises(ValueError, match=r"`embed.weight` and `decode.weight` are one tensor \(tied weights\).*\['decode', 'embed'\]"):
        apply_weight_norm(model)
    assert not any(is_weight_normalized(m) for m in model.modules())  # refused before anything changed


def test_a_weight_tied_to_the_models_own_parameter_names_an_exclude_that_works():
    class Tied(nn.Module):  # the model itself holds the tensor a layer uses
        def __init__(self):
            super().__init__()
            self.shared, self.lin, self.head = nn.Parameter(torch.randn(4, 4)), nn.Linear(4, 4), nn.Linear(4, 2)
            self.lin.weight = self.shared

    model = Tied()
    with pytest.raises(ValueError, match=re.escape("Leave them out: `exclude`=['lin'].")):  # not '', the model
        apply_weight_norm(model)
    assert apply_weight_norm(model, exclude=["lin"]) == ["head"]


@pytest.mark.parametrize("kind", ["conv2d", "linear_large", "lstm_cell"])
def test_second_forward_and_backward_without_a_step_accumulate_like_torch(kind):
    make, shape = LAYERS[kind]
    plain = make().double()
    x1, x2 = torch.randn(shape, dtype=torch.double), torch.randn(shape, dtype=torch.double)
    ours, theirs = weight_norm(copy.deepcopy(plain)), torch_weight_norm(copy.deepcopy(plain))
    for module in (ours, theirs):
        output_sum(module, x1).backward()
        output_sum(module, x2).backward()  # gradient accumulation: same parameters, a new graph
    theirs_grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, theirs_grads[name].grad, rtol=1e-9, atol=1e-10, msg=name)


def test_training_matches_torch_step_by_step():
    """A stale cached weight would make the runs part after the first optimizer step."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    apply_weight_norm(ours)
    for layer in (theirs[0], theirs[2]):
        parametrizations.weight_norm(layer)
    runs = [(m, torch.optim.Adam(m.parameters(), lr=0.05)) for m in (ours, theirs)]
    for _ in range(5):
        x = torch.randn(4, 6, dtype=torch.double)
        for module, optimizer in runs:
            optimizer.zero_grad()
            module(x).square().mean().backward()
            optimizer.step()
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(dict(ours.named_parameters()), dict(theirs.named_parameters()))


def test_function_unchanged_and_options():
    layer = nn.Linear(5, 3)
    x = torch.randn(10, 5)
    expected = layer(x)
    logged = weight_norm(copy.deepcopy(layer), log_scale_factor=3.0)
    wn = logged.parametrizations.weight
    assert "original0" not in dict(wn.named_parameters())
    torch.testing.assert_close(torch.exp(3.0 * wn.s), layer.weight.norm(dim=1, keepdim=True))
    torch.testing.assert_close(logged(x), expected)

    torch.manual_seed(1)
    paper = weight_norm(nn.Linear(400, 300), paper_init=True)
    v = paper.parametrizations.weight.original1
    assert abs(v.std().item() - 0.05) < 0.001 and abs(v.mean().item()) < 0.001
    torch.testing.assert_close(paper.parametrizations.weight.original0, v.norm(dim=1, keepdim=True))


def test_remove_weight_norm_folds_to_the_same_function():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    lstm = nn.LSTM(3, 4, num_layers=2)
    x, seq = torch.randn(5, 3, 6, 6), torch.randn(7, 2, 3)
    apply_weight_norm(model)
    weight_norm(lstm)
    with torch.no_grad():  # move away from the initial g = ||v|| so folding has work to do
        for p in [*model.parameters(), *lstm.parameters()]:
            p.mul_(torch.rand_like(p) + 0.5)
    expected, expected_seq = model(x), lstm(seq)[0]
    assert remove_weight_norm(model) == ["0", "1", "3"]
    assert remove_weight_norm(lstm) == [""]
    assert type(model[0]) is nn.Conv2d and type(lstm) is nn.LSTM
    assert sorted(dict(model.named_parameters())) == ["0.bias", "0.weight", "1.bias", "1.weight", "3.bias", "3.weight"]
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(lstm(seq)[0], expected_seq)


def test_deepcopy_and_pickle_keep_the_function_and_are_independent():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LSTM(8, 3))
    apply_weight_norm(model, include=[nn.Linear, nn.LSTM])
    x = torch.randn(5, 4)
    model(x)  # fill the caches: they must not be copied
    expected = model(x)[0]
    copied = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    unpickled = pickle.loads(pickle.dumps(model))
    for clone in (copied, loaded, unpickled):
        assert is_weight_normalized(clone[0]) and is_weight_normalized(clone[2])
        torch.testing.assert_close(clone(x)[0], expected)
    with torch.no_grad():
        copied[0].parametrizations.weight.original0.mul_(2.0)
    torch.testing.assert_close(model(x)[0], expected)
    assert not torch.allclose(copied(x)[0], expected)


def test_direction_norm_grows_monotonically_under_sgd():
    """The paper, Section 2.1: the gradient is orthogonal to v, so plain SGD only lengthens it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    apply_weight_norm(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(64, 10), torch.randn(64, 1)
    norms = []
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        norms.append(torch.stack([wn.v.norm() for _, m in [("", model[0]), ("", model[2])]
                                  for wn in weight_norms(m).values()]))
    norms = torch.stack(norms)
    assert (norms[1:] >= norms[:-1]).all()
    assert (norms[-1] > norms[0] * 1.001).all()


def test_limit_direction_norm_keeps_the_function():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Conv1d(1, 2, 3))
    apply_weight_norm(model)
    x = torch.randn(3, 4)
    first = model[0](x)
    with torch.no_grad():
        model[0].parametrizations.weight.original1[:2].mul_(50.0)
    assert limit_direction_norm(model, max_norm=1.0) >= 2
    torch.testing.assert_close(model[0](x), first)
    for m in (model[0], model[2]):
        v = m.parametrizations.weight.original1
        assert (v.flatten(1).norm(dim=1) <= 1.0 + 1e-6).all()
    with pytest.raises(ValueError, match="`max_norm` must be a positive number, got 0"):
        limit_direction_norm(model, 0)


def test_apply_weight_norm_selects_by_type_and_pattern():
    def make():
        return nn.ModuleDict(
            {
                "encoder": nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3)),
                "rnn": nn.LSTMCell(2, 2),
                "head": nn.Linear(2, 1),
            }
        )

    assert apply_weight_norm(make()) == ["encoder.0", "encoder.2", "head"]
    assert apply_weight_norm(make(), include=["encoder"]) == ["encoder.0", "encoder.2"]
    assert apply_weight_norm(make(), include=[nn.LSTMCell, "head"]) == ["rnn", "head"]
    assert apply_weight_norm(make(), include=["LSTMCell", "Conv2d"], exclude=["encoder.2"]) == ["encoder.0", "rnn"]
    assert apply_weight_norm(make(), exclude=["encoder.*"]) == ["head"]
    assert apply_weight_norm(make(), include="enc*.2") == ["encoder.2"]
    assert apply_weight_norm(make(), include=["encoder.*"]) == ["encoder.0", "encoder.2"]  # encoder.1 is a ReLU
    for near_miss in ("conv2d", "nn.Conv2d", "torch.nn.Conv2d"):  # as a YAML file may write a type
        with pytest.raises(ValueError, match=rf"pattern '{near_miss}' matches no module\. A layer type is named as in "
                           r"`torch.nn`: 'Conv2d'\. Module names: 'encoder', "):
            apply_weight_norm(make(), include=[near_miss])
    for no_type in ("encoder.init", "head.linear", "functional"):  # a module path, or no layer type of torch.nn
        with pytest.raises(ValueError, match=rf"pattern '{no_type}' matches no module\. Module names: 'encoder', "):
            apply_weight_norm(make(), include=[no_type])


@pytest.mark.parametrize(("last", "options", "why"), [
    (nn.ConvTranspose2d(4, 6, 3, groups=2), {}, "groups=2 shares each weight column"),
    (nn.LazyLinear(3), {}, "has no shape yet"),
    (nn.Linear(3, 4), {"dim": 3}, "`dim`=3 is out of range"),  # an axis the first layer has
])  # fmt: skip
def test_apply_weight_norm_normalizes_nothing_where_it_refuses_one_layer(last, options, why):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), last)
    fix = re.escape("Nothing was normalized; leave it out with `exclude`=['1']")
    with pytest.raises(ValueError, match=f"Module `1`: .*{why}.* {fix}"):
        apply_weight_norm(model, **options)
    assert not is_weight_normalized(model[0])
    assert apply_weight_norm(model, exclude=["1"], **options) == ["0"]  # the fix the message names


def test_bad_input_raises_clear_errors():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Embedding(4, 2))
    with pytest.raises(ValueError, match=r"pattern 'decoder\.\*' matches no module. Module names: '0', '1', '2'"):
        apply_weight_norm(model, include=["decoder.*"])
    with pytest.raises(ValueError, match=r"`exclude` pattern 'nope' matches no module"):
        apply_weight_norm(model, exclude="nope")
    with pytest.raises(ValueError, match=r"matches `1` \(ReLU\), which is not a supported layer"):
        apply_weight_norm(model, include=["1"])
    with pytest.raises(ValueError, match="names `Embedding`, which weight norm does not support"):
        apply_weight_norm(model, include=[nn.Embedding])
    with pytest.raises(TypeError, match="entries must be layer types or name patterns, got 3"):
        apply_weight_norm(model, include=[3])
    with pytest.raises(ValueError, match="No module of Sequential is selected"):
        apply_weight_norm(model, exclude=[nn.Linear])
    apply_weight_norm(model)
    with pytest.raises(ValueError, match="Module `0` \\(WeightNormedLinear\\) is already weight-normalized"):
        apply_weight_norm(model)
    with pytest.raises(ValueError, match="`weight` of this WeightNormedLinear is already weight-normalized"):
        weight_norm(model[0])
    with pytest.raises(ValueError, match="Cannot tell the output-unit axis of `Embedding`.*Pass `dim=`"):
        weight_norm(model[2])
    with pytest.raises(ValueError, match="has no parameter `kernel`; its parameters are \\['bias', 'weight'\\]"):
        weight_norm(nn.Linear(2, 2), "kernel")
    with pytest.raises(ValueError, match="groups=2 shares each weight column"):
        weight_norm(nn.ConvTranspose2d(2, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2 shares each weight column"):  # the same axis, counted from the end
        weight_norm(nn.ConvTranspose2d(2, 4, 3, groups=2), dim=-3)
    with pytest.raises(ValueError, match="`log_scale_factor` must be a positive number"):
        weight_norm(nn.Linear(2, 2), log_scale_factor=-1.0)
    with pytest.raises(ValueError, match=r"`weight` of this Linear is empty \(shape \(0, 5\)\).*Leave the layer out"):
        weight_norm(nn.Linear(5, 0))  # ATen's kernels would divide by zero: the process would die
    with pytest.raises(ValueError, match=r"`weight` of this LazyLinear has no shape yet \(a lazy module\): run one"):
        apply_weight_norm(nn.Sequential(nn.LazyLinear(3)))
    for dim in ("0", 0.0, True):  # 0.0 failed only at the first forward; True was taken for axis 1
        with pytest.raises(TypeError, match=r"`dim` must be an axis \(an int\) or None, got"):
            weight_norm(nn.Linear(2, 2), dim=dim)
    embedding = weight_norm(nn.Embedding(4, 3), dim=np.int64(0))  # any layer works once `dim` is given
    torch.testing.assert_close(embedding.weight.norm(dim=1), embedding.parametrizations.weight.original0.flatten())


@pytest.mark.slow
def test_torch_compile_with_inductor_matches_eager(tmp_path, monkeypatch):
    # inductor's on-disk cache is not keyed on ATEN_CPU_CAPABILITY: kernels built by a run with other
    # kernels selected gave NaN here, or aborted. This test compiles into a cache of its own
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    apply_weight_norm(model)
    x = torch.randn(5, 3, 8, 8)
    compiled = torch.compile(model)
    out = compiled(x)
    out.square().sum().backward()
    compiled_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    expected = model(x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(compiled_grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_the_norm_in_float32(dtype):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    reference = copy.deepcopy(model)
    apply_weight_norm(model)
    x = torch.randn(5, 3, 8, 8)
    with torch.autocast("cpu", dtype=dtype):
        out, expected = model(x), reference(x)
        assert model[0].weight.dtype == torch.float32  # w from float32 g and v, cast at use
    assert out.dtype == expected.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.02, atol=0.02)
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_layer_frozen_then_unfrozen_inside_cached_gets_its_gradients():
    # a GAN step: the critic frozen for one pass, trainable for the next, with no optimizer step between
    layer, x = weight_norm(nn.Linear(4, 3)), torch.randn(2, 4)
    g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
    layer(x).sum().backward()
    expected = g.grad.clone(), v.grad.clone()
    layer.zero_grad()
    with cached():
        layer.requires_grad_(False)
        layer(x)
        layer.requires_grad_(True)
        layer(x).sum().backward()
    torch.testing.assert_close((g.grad, v.grad), expected)


def test_torchs_parametrizations_are_refused_on_a_normalized_layer_which_stays_as_it_was():
    cell = weight_norm(nn.LSTMCell(4, 3), name="weight_hh")
    params = dict(cell.named_parameters())
    for register in (parametrizations.orthogonal, parametrizations.spectral_norm, nn.utils.spectral_norm):
        with pytest.raises(ValueError, match=r"nor can torch's parametrizations .* would replace g and v.*remove_weight"):
            register(cell, "weight_ih")
        assert type(cell).__name__ == "WeightNormedLSTMCell"
        assert {n: id(p) for n, p in cell.named_parameters()} == {n: id(p) for n, p in params.items()}
    x = (torch.randn(2, 4), (torch.zeros(2, 3), torch.zeros(2, 3)))
    cell(*x)[0].sum().backward()
    assert cell.parametrizations.weight_hh.original1.grad is not None


@pytest.mark.parametrize("case", ["scaled output, float16 autocast", "model.half()"])
def test_float16_computes_w_whatever_the_norm_of_v(case):
    # the output depends on g and the direction of v only; float16 cannot hold ||v|| = 1e5 of each row, nor x @ v.T
    torch.manual_seed(0)
    layer = weight_norm(nn.Linear(1024, 256) if case.startswith("scaled") else nn.Linear(16, 512))
    x = torch.randn(4, layer.in_features)
    with torch.no_grad():
        v = layer.parametrizations.weight.original1
        v.mul_(1e5 / v.norm(dim=1, keepdim=True))
    g, v = layer.parametrizations.weight.original0.double(), layer.parametrizations.weight.original1.double()
    expected = x.double() @ (g * v / v.norm(dim=1, keepdim=True)).T + layer.bias.double()
    if case == "model.half()":
        out = layer.half()(x.half())
    else:
        with torch.autocast("cpu", dtype=torch.float16):
            out = layer(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("dtype", "cases"), [
    (torch.float16, [(0.01, 1e-4), (0.01, 1.0), (1.0, 1.0), (50.0, 1.0), (200.0, 1.0), (1e3, 1e2)]),
    (torch.float32, [(1e-15, 1.0), (1.0, 1.0), (1e14, 1.0)]),
], ids=["float16", "float32"])  # fmt: skip
@pytest.mark.parametrize("make", [lambda: nn.ConvTranspose2d(16, 8, 3), lambda: nn.Conv2d(8, 16, 3)],
                         ids=["transpose", "conv"])
def test_the_gradients_are_right_whatever_the_norms_off_the_fused_kernels(dtype, cases, make):
    # ConvTranspose's output axis 1 and channels_last are off ATen's fused kernels: ||v||**3 overflowed or underflowed,
    # and so did float16's grad_w * v where both were large (or small)
    torch.manual_seed(0)
    plain = make()
    x = torch.randn(2, plain.in_channels, 6, 6)
    up = torch.randn_like(plain(x))
    axes = (0, 2, 3) if isinstance(plain, nn.ConvTranspose2d) else (1, 2, 3)
    for target, grad_size in cases:
        layer = weight_norm(copy.deepcopy(plain)).to(dtype)
        if isinstance(plain, nn.Conv2d):
            layer = layer.to(memory_format=torch.channels_last)
        ours = layer.parametrizations.weight
        with torch.no_grad():
            norm = torch.linalg.vector_norm(ours.original1.float(), dim=axes, keepdim=True)
            ours.original1.mul_(target / norm.to(dtype))
        reference = parametrizations.weight_norm(copy.deepcopy(plain).double(), dim=default_dim(plain))
        theirs = reference.parametrizations.weight
        for name in ("original0", "original1"):
            getattr(theirs, name).data.copy_(getattr(ours, name).detach())
        (reference(x.double()) * up.double() * grad_size).sum().backward()
        (layer(x.to(dtype)).double() * up.double() * grad_size).sum().backward()
        for name in ("original0", "original1"):
            expected, got = getattr(theirs, name).grad, getattr(ours, name).grad.double()
            error = (got - expected).norm() / expected.norm()
            assert error < (3e-3 if dtype == torch.float16 else 1e-5), (name, target, grad_size, error.item())


def test_parameters_made_in_inference_mode_compute_with_and_without_grad_and_inside_cached():
    # inference tensors keep no version counter: an averaging callback can swap them in through `.data`
    with torch.inference_mode():
        layer = weight_norm(nn.Linear(4, 3))
        x = torch.randn(2, 4)
        expected = nn.functional.linear(x, torch._weight_norm(layer.parametrizations.weight.original1,
                                                              layer.parametrizations.weight.original0, 0), layer.bias)
    for scope in (contextlib.nullcontext, cached):
        with scope(), torch.inference_mode():
            torch.testing.assert_close(layer(x), expected)
        with scope(), torch.no_grad():
            torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("kind", ["linear", "conv_transpose2d", "lstm_cell", "rnn"])
def test_assigning_a_weight_sets_g_and_v_so_that_the_layer_computes_it(kind):
    make, shape = LAYERS[kind]
    layer = weight_norm(make())
    name = default_names(layer)[-1]
    wanted = torch.randn_like(getattr(layer, name))
    params = {n: p for n, p in layer.named_parameters()}
    setattr(layer, name, wanted)  # as torch's right_inverse: g and v change in place, the parameters stay
    torch.testing.assert_close(getattr(layer, name), wanted)
    assert {n: p for n, p in layer.named_parameters()} == params and is_weight_normalized(layer, name)
    reference = make()
    reference.load_state_dict({k: v for k, v in layer.state_dict().items()}, strict=False)  # fills the other tensors
    with torch.no_grad():
        for other in default_names(layer):
            setattr(reference, other, nn.Parameter(getattr(layer, other).detach().clone()))
    x = torch.randn(shape)
    out, expected = layer(x), reference(x)
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, expected[0] if isinstance(expected, tuple) else expected)
    with pytest.raises(TypeError, match=f"`{name}` of a weight-normalized layer is computed; assign a tensor"):
        setattr(layer, name, 1.0)
    for broadcast in (wanted[:1], wanted[0]):  # would fill every unit with one row
        with pytest.raises(ValueError, match=rf"Cannot set a weight of shape {re.escape(str(tuple(broadcast.shape)))}"):
            setattr(layer, name, broadcast)
    torch.testing.assert_close(getattr(layer, name), wanted)
