"""data_dependent_init: after it, every target's output is standardized on the init batch."""

import copy
import functools
import math
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_wn import MeanOnlyBatchNorm, apply_weight_norm, attach_mean_only_bn, data_dependent_init, weight_norm


def deep_cnn() -> nn.Module:
    layers, channels = [], 3
    for width in (8, 16, 16, 32):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * channels, 10))


def decoder() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, groups=1),
        nn.ELU(),
        nn.Conv2d(8, 8, 3, groups=4, bias=False),  # grouped, no bias: mean removed by the next layer
        MeanOnlyBatchNorm(8),
        nn.ELU(),
        nn.ConvTranspose2d(8, 4, 3, stride=2),
        nn.Tanh(),
        nn.ConvTranspose2d(4, 6, 3, groups=2),  # grouped transposed conv, left plain
    )


def outputs_of(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    captured = {}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda m, a, out, name=name: captured.setdefault(name, out.detach()))
        for name in names
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return captured


def unit_moments(y: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    axes = [d for d in range(y.dim()) if d != axis % y.dim()]
    y = y.double()
    return y.mean(axes), y.std(axes, unbiased=False)


CASES = {
    "deep cnn, weight norm": (deep_cnn, (300, 3, 8, 8), True, 1.0),
    "deep cnn, plain layers": (deep_cnn, (300, 3, 8, 8), False, 1.0),
    "decoder with ConvTranspose, grouped, no bias": (decoder, (200, 3, 7, 7), True, 0.5),
    "decoder, plain layers": (decoder, (200, 3, 7, 7), False, 2.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_target_is_standardized_on_the_init_batch(case):
    make, shape, normalize, init_scale = CASES[case]
    torch.manual_seed(0)
    model = make()
    if normalize:
        apply_weight_norm(model, exclude=[m for m in ["7"] if case.startswith("decoder")])
    x = torch.randn(shape) * 3 + 2
    report = data_dependent_init(model, x, init_scale=init_scale)
    assert report.modules, report
    outputs = outputs_of(model, x, list(report.modules))
    modules = dict(model.named_modules())
    for name, out in outputs.items():
        module = modules[name]
        mean, std = unit_moments(out, -1 if isinstance(module, nn.Linear) else 1)
        if isinstance(module, MeanOnlyBatchNorm):
            assert mean.abs().max() < 1e-5, name
            continue
        assert (std / init_scale - 1).abs().max() < 1e-3, name
        if report.modules[name].bias_set:
            assert (mean.abs() / init_scale).max() < 1e-3, name
        else:
            assert report.modules[name].mean.abs().max() > 1e-2  # the mean really was there
    # every conv/linear (transposed ones included), or every normalized one, and the mean-only BN
    expected = {"deep cnn": 5, "decoder with": 4, "decoder,": 5}
    assert len(report.modules) == next(n for prefix, n in expected.items() if case.startswith(prefix))


def test_report_holds_the_pre_init_statistics_and_the_scale_set():
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(4, 3)))
    x = torch.randn(100, 4) * 2
    with torch.no_grad():
        before = model(x)
    g_before = model[0].parametrizations.weight.original0.detach().clone()
    report = data_dependent_init(model, x)
    entry = report.modules["0"]
    assert entry.kind == "weight_norm" and entry.bias_set
    torch.testing.assert_close(entry.mean, before.double().mean(0))
    torch.testing.assert_close(entry.std, before.double().std(0, unbiased=False))
    torch.testing.assert_close(entry.scale, 1 / entry.std)
    g_after = model[0].parametrizations.weight.original0
    torch.testing.assert_close(g_after.flatten().double(), g_before.flatten().double() / entry.std, rtol=1e-5, atol=0)
    assert "0" in str(report) and "weight_norm" in str(report)


def test_a_layer_without_a_bias_keeps_its_mean_over_std_and_the_report_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(4, 3, bias=False)))
    x = torch.randn(100, 4) + 2
    with torch.no_grad():
        before = model(x).double()
    report = data_dependent_init(model, x)
    with torch.no_grad():
        after = model(x).double()
    close = functools.partial(torch.testing.assert_close, rtol=1e-5, atol=1e-5)  # a float32 layer
    close(after.std(0, correction=0), torch.ones(3, dtype=torch.float64))
    close(after.mean(0), before.mean(0) / before.std(0, correction=0))  # scaled, not removed
    assert not report.modules["0"].bias_set and "no bias: mean scaled, not removed" in str(report)


def test_log_scale_magnitude_is_initialized_too():
    model = nn.Sequential(weight_norm(nn.Linear(5, 4), log_scale_factor=2.0), nn.ReLU())
    x = torch.randn(200, 5)
    data_dependent_init(model, x)
    mean, std = unit_moments(outputs_of(model, x, ["0"])["0"], -1)
    assert mean.abs().max() < 1e-4 and (std - 1).abs().max() < 1e-4


def test_an_unbatched_convolution_is_initialized_per_channel():
    # (C, L) in, (C_out, L) out: the units are on axis 0, not 1
    model = nn.Sequential(weight_norm(nn.Conv1d(3, 8, 3)))
    x = torch.randn(3, 50) * 2 + 1
    data_dependent_init(model, x)
    mean, std = unit_moments(outputs_of(model, x, ["0"])["0"], 0)
    assert mean.abs().max() < 1e-4 and (std - 1).abs().max() < 1e-4


def test_one_forward_pass_first_call_counts_and_recurrent_layers_are_skipped():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.cell, self.calls = nn.Linear(4, 4), nn.GRUCell(4, 4), 0

        def forward(self, x):
            self.calls += 1
            first = self.layer(x)
            return self.cell(self.layer(first))  # the same layer twice

    model = Shared()
    apply_weight_norm(model, include=[nn.Linear, nn.GRUCell])
    x = torch.randn(64, 4)
    report = data_dependent_init(model, x)
    assert model.calls == 1
    assert list(report.modules) == ["layer"]
    assert "recurrent" in report.skipped["cell"]
    first_call = outputs_of(model, x, ["layer"])["layer"]  # the hook keeps the first call's output
    mean, std = unit_moments(first_call, -1)
    assert mean.abs().max() < 1e-4 and (std - 1).abs().max() < 1e-4


def test_units_without_variance_are_left_alone_and_reported():
    layer = weight_norm(nn.Linear(3, 4))
    with torch.no_grad():
        layer.parametrizations.weight.original0[1] = 0.0  # unit 1 outputs its bias only
        layer.bias[1] = 0.7
    x = torch.randn(50, 3)
    report = data_dependent_init(nn.Sequential(layer), x)
    assert report.modules["0"].tiny_units == [1]
    out = layer(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 1], torch.full((50,), 0.7))
    assert "1 units with ~0 std left alone" in str(report)


def test_model_inputs_as_tuple_and_dict():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 3), nn.Linear(5, 3)

        def forward(self, left, right):
            return self.a(left) + self.b(right)

    x = {"left": torch.randn(40, 2), "right": torch.randn(40, 5)}
    assert set(data_dependent_init(TwoInputs(), x).modules) == {"a", "b"}
    assert set(data_dependent_init(TwoInputs(), (x["left"], x["right"])).modules) == {"a", "b"}


def test_a_second_call_on_the_same_layers_warns():
    model = nn.Sequential(weight_norm(nn.Linear(4, 8)), nn.ReLU(), weight_norm(nn.Linear(8, 2)))
    x = torch.randn(64, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first call is silent
        data_dependent_init(model, x)
    with pytest.warns(UserWarning, match="`0`, `2` were initialized by an earlier call; this one rescales them again") as caught:
        data_dependent_init(model, x)
    assert caught[0].filename == __file__  # the caller's line, not torch.no_grad's wrapper


def test_a_model_compiled_and_run_before_is_initialized_through_its_hooks():
    # a graph compiled before the init's hooks were added would run without them, initializing nothing
    model, x = nn.Sequential(weight_norm(nn.Linear(8, 16)), nn.ReLU(), weight_norm(nn.Linear(16, 4))), torch.randn(64, 8)
    compiled = torch.compile(model, backend="eager")
    compiled(x)
    assert sorted(data_dependent_init(compiled, x).modules) == ["_orig_mod.0", "_orig_mod.2"]
    mean, std = unit_moments(outputs_of(model, x, ["2"])["2"], -1)
    assert mean.abs().max() < 1e-4 and (std - 1).abs().max() < 1e-4


class Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared, self.head = nn.Linear(32, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.head(self.shared(x) + self.shared(2 * x))


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)), Siamese])
def test_the_init_under_autocast_is_seen_by_the_next_forward_and_by_a_second_call_in_the_pass(normalized, make):
    # autocast keeps bfloat16 copies of the parameters (biases; plain weights), which the init rescales in place; its
    # cache (on outside Lightning) also serves a module's second call in the pass, which must see the rescaling
    torch.manual_seed(0)
    model, x = make(), torch.randn(256, 32) * 2 + 3
    if normalized:
        apply_weight_norm(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        data_dependent_init(model, x)
        with torch.no_grad():
            mean, std = unit_moments(model(x).double(), -1)
    assert mean.abs().max() < 0.05 and (std - 1).abs().max() < 0.05  # bfloat16's rounding; stale copies: 0.2 to 4.7


def test_a_target_the_pass_never_calls_is_reported_and_warned_about():
    class Attention(nn.Module):  # MultiheadAttention reads out_proj's weight itself, never calling out_proj
        def __init__(self):
            super().__init__()
            self.inp, self.mha = nn.Linear(4, 8), nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            h = self.inp(x)
            return self.mha(h, h, h)[0]

    model = Attention()
    assert apply_weight_norm(model) == ["inp", "mha.out_proj"]
    with pytest.warns(UserWarning, match="`mha.out_proj` were not called through their own forward"):
        report = data_dependent_init(model, torch.randn(32, 5, 4))
    assert list(report.modules) == ["inp"] and report.skipped["mha.out_proj"] == "not called by the forward pass"


def test_a_plain_layer_with_a_tied_weight_is_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(10, 6), nn.Linear(6, 10)
            self.head.weight = self.embed.weight  # one tensor: rescaling the head's rows rescales the embedding

        def forward(self, tokens):
            return self.head(self.embed(tokens))

    model = Tied()
    before = model.embed.weight.detach().clone()
    with pytest.raises(ValueError, match="Module `head`'s weight is tied: `embed.weight` and `head.weight` are one tensor"):
        data_dependent_init(model, torch.randint(0, 10, (64,)))
    assert torch.equal(model.embed.weight, before)


@pytest.mark.parametrize("shared", ["parametrization", "g"])
def test_weight_normalized_layers_that_share_g_are_refused(shared):
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    apply_weight_norm(model)
    if shared == "parametrization":
        model[4].parametrizations.weight = model[2].parametrizations.weight
    else:
        model[4].parametrizations.weight.original0 = model[2].parametrizations.weight.original0
    g = model[2].parametrizations.weight.original0.detach().clone()
    for modules in (None, ["0", "2"]):  # rescaling the g of `2` alone rescales `4` too
        with pytest.raises(ValueError, match=r"Modules `2` and `4` share one g: the init of one would rescale the "
                           r"others' outputs too\. Leave them all out of `modules`"):
            data_dependent_init(model, torch.randn(256, 6) * 3 + 2, modules=modules)
    assert torch.equal(model[2].parametrizations.weight.original0, g)


def test_modules_leaves_the_mean_only_batch_norms_of_other_layers_alone():
    model = nn.Sequential(weight_norm(nn.Linear(4, 8)), nn.ReLU(), weight_norm(nn.Linear(8, 3)))
    attach_mean_only_bn(model[0])
    attach_mean_only_bn(model[2])
    assert list(data_dependent_init(model, torch.randn(64, 4) + 2, modules=["0"]).modules) == ["0", "0.mean_only_bn"]
    kept = model[0].mean_only_bn.running_mean.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing initialized before is touched: no warning either
        report = data_dependent_init(model.eval(), torch.randn(64, 4) * 3 - 5, modules=["2"])  # eval: no update
    assert list(report.modules) == ["2", "2.mean_only_bn"]
    assert torch.equal(model[0].mean_only_bn.running_mean, kept)


def test_huge_inputs_do_not_overflow_the_statistics():
    model = nn.Sequential(weight_norm(nn.Linear(8, 16)), nn.ReLU(), weight_norm(nn.Linear(16, 4)))
    x = torch.randn(256, 8) * 1e20  # squares overflow float32
    data_dependent_init(model, x)
    with torch.no_grad():
        out = model(x).double()
    assert out.mean(0).abs().max() < 1e-3 and (out.std(0, unbiased=False) - 1).abs().max() < 1e-3


def test_a_batch_of_one_is_an_error_not_a_silent_no_op():
    model = nn.Sequential(weight_norm(nn.Linear(8, 16)))
    g = model[0].parametrizations.weight.original0.detach().clone()
    with pytest.raises(ValueError, match="Module `0` gives one value per output unit on the init batch"):
        data_dependent_init(model, torch.randn(1, 8))
    assert torch.equal(model[0].parametrizations.weight.original0, g)


def test_a_forward_that_fails_halfway_leaves_the_model_as_it_was():
    class Fails(nn.Module):
        def forward(self, x):
            raise RuntimeError("a bug further down the network")

    model = nn.Sequential(weight_norm(nn.Linear(8, 16)), nn.BatchNorm1d(16), nn.Linear(16, 4), Fails())
    before = copy.deepcopy(model.state_dict())  # the batch norm's running statistics too
    with pytest.raises(RuntimeError, match="a bug further down"):
        data_dependent_init(model, torch.randn(64, 8), modules=["0", "2"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_lazy_module_is_refused_and_left_without_hooks():
    model = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"`0` are lazy .* Run one forward pass first"):
        data_dependent_init(model, torch.randn(100, 4))
    model(torch.randn(100, 4))
    assert not model[0]._forward_hooks  # a hook left behind would rescale the layer at some later forward
    before = nn.Sequential(nn.LazyLinear(8), nn.LazyBatchNorm1d(), nn.Linear(8, 4))  # lazy, but no target
    data_dependent_init(before, x := torch.randn(200, 3) * 3, modules=["2"])
    with torch.no_grad():
        mean, std = unit_moments(before(x).double(), -1)
    assert mean.abs().max() < 1e-4 and (std - 1).abs().max() < 1e-4


def test_bad_input_raises_clear_errors():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(ValueError, match=r"`inputs` is an empty batch \(a tensor of shape \(0, 2\)\)"):
        data_dependent_init(model, torch.zeros(0, 2))
    with pytest.raises(ValueError, match="`inputs` contains NaN or infinite values"):
        data_dependent_init(model, torch.tensor([[1.0, math.nan]]))
    with pytest.raises(TypeError, match="`inputs` holds no tensor"):
        data_dependent_init(model, "images")
    with pytest.raises(ValueError, match="`modules` pattern 'head' matches no module of Sequential"):
        data_dependent_init(model, torch.randn(4, 2), modules=["head"])
    with pytest.raises(ValueError, match=r"Module `1` \(ReLU\) is not a layer data-dependent init can rescale"):
        data_dependent_init(model, torch.randn(4, 2), modules=["1"])
    with pytest.raises(ValueError, match="No module of Sequential to initialize"):
        data_dependent_init(nn.Sequential(nn.ReLU()), torch.randn(4, 2))
    with pytest.raises(ValueError, match="`init_scale` must be a positive number, got 0"):
        data_dependent_init(model, torch.randn(4, 2), init_scale=0)
    with pytest.raises(TypeError, match=r"`init_scale` must be a number, got '1' \(str\)"):
        data_dependent_init(model, torch.randn(4, 2), init_scale="1")
    for modules in ([nn.Linear], 5):  # apply_weight_norm takes layer types; this takes names
        with pytest.raises(TypeError, match=r"`modules` must be module names or glob patterns .* got"):
            data_dependent_init(model, torch.randn(4, 2), modules=modules)
    with pytest.raises(ValueError, match="`min_std` must be a positive number, got -1"):
        data_dependent_init(model, torch.randn(4, 2), min_std=-1)
    with pytest.raises(TypeError, match=r"takes 2 positional arguments but 3 were given \(`inputs`, a tuple, was passed "
                       r"as `model\(\*inputs\)`: for a batch `\(x, y\)`, pass its model inputs alone, `batch\[0\]`\)"):
        data_dependent_init(model, (torch.randn(4, 2), torch.randn(4)))  # a whole batch
    data_dependent_init(model, torch.randn(4, 2), init_scale=torch.tensor(2.0))  # a 0-d tensor is a number


def normalized_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = deep_cnn()
    apply_weight_norm(model)
    return model


def _init_on_rank(rank: int, port: int, shards: list, sync: bool, results, make=normalized_cnn) -> None:
    model = make()  # built here: a model sent to a process would share its storage
    # without sync, no process group: what the ranks would get without the all-reduce. (Making one and
    # destroying it at once raced: a rank could close it while the other was still connecting.)
    if sync:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        data_dependent_init(model, shards[rank])
        results[rank] = {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sync", [True, False])
def test_distributed_init_gives_every_rank_the_statistics_of_the_whole_batch(sync):
    batch = torch.randn(64, 3, 8, 8) * 2 + 1
    shards = [batch[:32], batch[32:] * 1.5]
    results = mp.Manager().dict()
    mp.spawn(_init_on_rank, args=(_free_port(), shards, sync, results), nprocs=2)
    single = normalized_cnn()
    data_dependent_init(single, torch.cat(shards))
    rank0, rank1 = results[0], results[1]
    if sync:
        for name, value in single.state_dict().items():
            assert torch.equal(rank0[name], rank1[name]), name
            torch.testing.assert_close(rank0[name], value, rtol=1e-4, atol=1e-5)
    else:
        assert any(not torch.allclose(rank0[n], rank1[n]) for n in rank0)


def float64_linear() -> nn.Module:
    torch.manual_seed(0)
    return weight_norm(nn.Linear(4, 3).double())


def test_distributed_init_is_exact_where_the_mean_is_many_stds():
    # the ranks' E[y^2] - mean^2 cancelled here: the std came out 0.79 to 1.21 (one process: 1)
    batch = torch.randn(200, 4, dtype=torch.float64) + 1e8
    results = mp.Manager().dict()
    mp.spawn(_init_on_rank, args=(_free_port(), [batch[:100], batch[100:]], True, results, float64_linear), nprocs=2)
    model = float64_linear()
    model.load_state_dict(results[0])
    with torch.no_grad():
        std = model(batch).std(dim=0, correction=0)
    torch.testing.assert_close(std, torch.ones(3, dtype=torch.float64), rtol=1e-6, atol=0)
