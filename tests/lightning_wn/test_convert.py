"""from_torch and to_torch: torch's weight norm to this library's and back, with g and v kept bit for bit.

Keeping v (not just w = g v / ||v||) is what makes a converted model train as it did: the gradient of w
through v scales with 1 / ||v||, so a re-split v (||v|| = g) would take other steps.
"""

import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from lightning_wn import from_torch, is_weight_normalized, remove_weight_norm, to_torch, weight_norm, weight_norms
from lightning_wn.torch_norms import torch_reparametrizations

sys.path.insert(0, str(Path(__file__).parent))
from test_vocoder import MEL, WAVE, Generator, adam_steps, torch_name  # its HiFi-GAN-style generator

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.* is deprecated:FutureWarning")
FORMS = ["parametrization", "legacy"]
PLAIN = "conv_post"  # left without torch's weight norm: it must stay plain


def torch_weight_norm(form: str, module: nn.Module, dim: int | None = 0) -> nn.Module:
    if form == "legacy":
        return nn.utils.weight_norm(module, dim=dim)
    return parametrizations.weight_norm(module, dim=dim)


def torch_generator(form: str, seed: int = 0) -> Generator:
    """A generator whose convolutions but ``conv_post`` are under torch's weight norm, with g != ||v|| (as trained)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Generator(torch_weight_norm=False)
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.conv._ConvNd) and name != PLAIN:
                torch_weight_norm(form, module)
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(torch.rand_like(param) + 0.5)
    return model


def g_and_v(module: nn.Module, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    if form == "legacy":
        return module.weight_g, module.weight_v
    return module.parametrizations.weight.original0, module.parametrizations.weight.original1


def ours_name(form: str, name: str) -> str:
    """Torch's parameter name for one of ours: the same for the parametrization, `weight_g`/`weight_v` for the hook."""
    return torch_name(name) if form == "legacy" else name


@pytest.mark.parametrize("form", FORMS)
def test_from_torch_converts_exactly_torchs_layers_keeping_g_v_outputs_and_gradients(form):
    theirs, ours = torch_generator(form), torch_generator(form)
    normalized = [name for name, m in theirs.named_modules() if torch_reparametrizations(m)]
    assert len(normalized) == 9 and PLAIN not in normalized

    assert from_torch(ours) == normalized
    modules, their_modules = dict(ours.named_modules()), dict(theirs.named_modules())
    assert [name for name, m in modules.items() if is_weight_normalized(m)] == normalized
    assert not any(torch_reparametrizations(m) for m in ours.modules()) and not is_weight_normalized(modules[PLAIN])
    for name in normalized:
        wn = weight_norms(modules[name])["weight"]
        g, v = g_and_v(their_modules[name], form)
        assert wn.dim == 0 and torch.equal(wn.original0, g) and torch.equal(wn.original1, v), name

    torch.testing.assert_close(ours(MEL), theirs(MEL), rtol=0, atol=1e-6)
    for model in (ours, theirs):
        nn.functional.l1_loss(model(MEL), WAVE).backward()
    their_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, their_params[ours_name(form, name)].grad, rtol=1e-5, atol=1e-7, msg=name)
    assert pickle.loads(pickle.dumps(ours)) is not None  # no torch hook (a local function) left behind


@pytest.mark.parametrize("form", FORMS)
def test_to_torch_gives_back_torchs_state_dict_which_loads_strictly(form):
    theirs, model = torch_generator(form), torch_generator(form)
    names = from_torch(model)

    assert to_torch(model, legacy=form == "legacy") == names
    assert not any(is_weight_normalized(m) for m in model.modules())
    state, their_state = model.state_dict(), theirs.state_dict()
    assert list(state) == list(their_state)
    assert all(torch.equal(state[key], their_state[key]) for key in state)
    fresh = torch_generator(form, seed=1)
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh(MEL), theirs(MEL))  # torch's own op on the same g and v: bit for bit
    if form == "legacy":  # the hook's weight attribute was recomputed from the copied g and v, not left from the split
        g, v = g_and_v(theirs.conv_pre, form)
        assert torch.equal(model.conv_pre.weight, torch._weight_norm(v, g, 0))


@pytest.mark.parametrize("form", FORMS)
def test_a_converted_model_trains_step_for_step_as_torchs(form):
    theirs, ours = torch_generator(form), torch_generator(form)
    from_torch(ours)  # before the optimizer is built: g and v are new tensors
    start = {name: p.detach().clone() for name, p in theirs.named_parameters()}

    torch.testing.assert_close(adam_steps(ours, steps=3), adam_steps(theirs, steps=3), rtol=0, atol=1e-6)
    their_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param, their_params[ours_name(form, name)], rtol=0, atol=1e-6, msg=name)
    moved = max((their_params[name] - value).abs().max().item() for name, value in start.items())
    assert moved > 1e-3  # three steps of lr 1e-3: the agreement is not of untouched parameters


@pytest.mark.parametrize("form", FORMS)
def test_a_wav2vec2_positional_conv_keeps_its_axis_and_g_and_v(form):
    torch.manual_seed(0)
    theirs = torch_weight_norm(form, nn.Conv1d(16, 16, 8, padding=4, groups=4), dim=2)  # one g per kernel tap
    g, v = (t.detach().clone() for t in g_and_v(theirs, form))
    x = torch.randn(2, 16, 20)
    expected = theirs(x)

    assert from_torch(theirs) == [""]
    wn = weight_norms(theirs)["weight"]
    assert wn.dim == 2 and g.shape == (1, 1, 8)
    assert torch.equal(wn.original0, g) and torch.equal(wn.original1, v)
    torch.testing.assert_close(theirs(x), expected, rtol=0, atol=1e-6)
    to_torch(theirs, legacy=form == "legacy")
    assert all(torch.equal(a, b) for a, b in zip(g_and_v(theirs, form), (g, v)))
    torchs = next(iter(theirs._forward_pre_hooks.values())) if form == "legacy" else theirs.parametrizations.weight[0]
    assert torchs.dim == 2


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dim, axis", [(None, None), (-1, None), (1, 1), (-2, 1)], ids=["None", "-1", "1", "-2"])
def test_torchs_dim_becomes_the_same_axis(form, dim, axis):
    """torch reads dim=None and -1 alike as one norm over the whole tensor (a 0-d g); other negative dims are axes."""
    torch.manual_seed(0)
    theirs = torch_weight_norm(form, nn.Conv1d(4, 6, 3), dim=dim)
    with torch.no_grad():
        g_and_v(theirs, form)[0].mul_(1.5)  # g != ||v||, as after training: a re-split v would differ
    g, v = (t.detach().clone() for t in g_and_v(theirs, form))
    x = torch.randn(2, 4, 9)
    expected = theirs(x)

    from_torch(theirs)
    wn = weight_norms(theirs)["weight"]
    assert (None if wn.dim == -1 else wn.dim) == axis and wn.original0.shape == g.shape
    assert torch.equal(wn.original0, g) and torch.equal(wn.original1, v)
    torch.testing.assert_close(theirs(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("spectral_norm", [parametrizations.spectral_norm, nn.utils.spectral_norm], ids=FORMS)
def test_spectral_norm_is_left_alone(spectral_norm):
    model = nn.Sequential(spectral_norm(nn.Linear(4, 4)), nn.ReLU(), parametrizations.weight_norm(nn.Linear(4, 2)))
    before = torch_reparametrizations(model[0])

    assert from_torch(model) == ["2"]
    assert torch_reparametrizations(model[0]) == before and "spectral_norm" in before[0]
    assert not is_weight_normalized(model[0]) and is_weight_normalized(model[2])


@pytest.mark.parametrize("frozen", [("original0",), ("original0", "original1")], ids=["g", "g_and_v"])
def test_from_torch_keeps_requires_grad(frozen):
    layer = parametrizations.weight_norm(nn.Linear(3, 4))
    for name in frozen:
        getattr(layer.parametrizations.weight, name).requires_grad_(False)

    from_torch(layer)
    wn = weight_norms(layer)["weight"]
    assert {name: getattr(wn, name).requires_grad for name in ("original0", "original1")} == {
        name: name not in frozen for name in ("original0", "original1")
    }
    assert not dict(layer.named_buffers())  # torch folds a frozen tensor into a buffer; it is a parameter again


def test_from_torch_on_a_model_without_torchs_weight_norm_returns_nothing_and_changes_nothing():
    model = nn.Sequential(nn.Linear(3, 4), weight_norm(nn.Linear(4, 2)))
    state = {key: value.clone() for key, value in model.state_dict().items()}

    assert from_torch(model) == []
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert not is_weight_normalized(model[0]) and is_weight_normalized(model[1])


class Scale(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


def test_misconfigurations_are_refused_before_anything_changes():
    chained = nn.Sequential(nn.Linear(2, 2), parametrizations.weight_norm(nn.Linear(2, 2)))
    parametrize.register_parametrization(chained[1], "weight", Scale())
    with pytest.raises(ValueError, match=r"`1.weight` chains torch's weight norm with \['_WeightNorm', 'Scale'\]"):
        from_torch(chained)

    mixed = parametrizations.spectral_norm(parametrizations.weight_norm(nn.LSTMCell(2, 3), "weight_ih"), "weight_hh")
    with pytest.raises(ValueError, match="mixes torch's weight norm with other reparametrizations"):
        from_torch(nn.Sequential(parametrizations.weight_norm(nn.Linear(2, 2)), mixed))

    log_scaled = nn.Sequential(weight_norm(nn.Linear(2, 2)), weight_norm(nn.Linear(2, 2), log_scale_factor=3.0))
    fix = r"`1` learns g = exp\(c \* s\) .*Fold it with `lightning_wn.remove_weight_norm`, or train without"
    with pytest.raises(ValueError, match=fix):
        to_torch(log_scaled)
    assert is_weight_normalized(log_scaled[0])  # refused before the first layer was converted


@pytest.mark.parametrize("legacy", [False, True], ids=["parametrization", "legacy"])
@pytest.mark.parametrize("make", [lambda: nn.LayerNorm(5), lambda: nn.PReLU(5)], ids=["layer_norm", "prelu"])
def test_a_one_dimensional_weight_goes_to_torch_with_its_function(make, legacy):
    # a 1-D v is one unit here, with one g; torch's dim=0 would give each entry its own
    layer, x = weight_norm(make(), "weight", dim=0), torch.randn(3, 5)
    with torch.no_grad():
        layer.parametrizations.weight.original1.mul_(torch.rand(5) + 0.5)
    expected = layer(x)
    to_torch(layer, legacy=legacy)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_torchs_weight_norm_of_each_entry_of_a_one_dimensional_tensor_is_refused_before_anything_changes(form):
    layer = (nn.utils.weight_norm if form == "legacy" else parametrizations.weight_norm)(nn.Linear(3, 4), "bias", dim=0)
    params = {name: id(p) for name, p in layer.named_parameters()}
    with pytest.raises(ValueError, match=r"torch normalizes each entry of its 1-D `bias` on its own.*remove_weight_norm\(model\)"):
        from_torch(layer)
    assert {name: id(p) for name, p in layer.named_parameters()} == params and not is_weight_normalized(layer)


@pytest.mark.parametrize("form", FORMS)
def test_an_optimizer_built_before_the_conversions_trains_on(form):
    # g and v change owner, not identity: a package's optimizer, built with its model, keeps training them
    model, x = torch_weight_norm(form, nn.Linear(4, 3)), torch.randn(2, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for convert in (from_torch, lambda m: to_torch(m, legacy=form == "legacy")):
        convert(model)
        assert {id(p) for p in model.parameters()} == {id(p) for p in optimizer.param_groups[0]["params"]}
        before = model(x).detach()
        model(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert not torch.equal(model(x), before)


def test_remove_weight_norm_leaves_no_torch_hook_so_the_model_pickles():
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(3, 4)), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(RuntimeError, match="parametrized modules"):
        pickle.dumps(model)  # torch's own: a parametrized module pickles only through its state dict

    assert remove_weight_norm(model) == ["0"]
    restored = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 3)
    assert torch.equal(restored(x), model(x))


@pytest.mark.parametrize("convert", [from_torch, remove_weight_norm])
def test_copies_made_under_torchs_weight_norm_keep_working_after_the_conversion(convert):
    # torch's remove_parametrizations deletes the weight's property from the class such copies share
    model = nn.Sequential(parametrizations.weight_norm(nn.Conv1d(8, 8, 3)), nn.ReLU())
    ema, x = torch.optim.swa_utils.AveragedModel(model), torch.randn(2, 8, 12)  # a deepcopy inside
    expected = ema(x)
    assert convert(model) == ["0"]
    torch.testing.assert_close(ema(x), expected)
    assert parametrize.is_parametrized(ema.module[0]) and not parametrize.is_parametrized(model[0])


def test_a_converted_model_pickles_and_computes_the_same():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = Generator()  # every convolution under the legacy hook, as HiFi-GAN's
    from_torch(model)
    restored = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(restored(MEL), model(MEL))


@pytest.mark.parametrize("form", FORMS)
def test_a_layer_weight_norm_refuses_leaves_the_whole_model_as_torch_had_it(form):
    """The grouped transposed conv comes after a convertible layer: nothing may be converted or folded."""
    model = nn.Sequential(torch_weight_norm(form, nn.Linear(4, 4)), nn.ReLU(),
                          torch_weight_norm(form, nn.ConvTranspose2d(4, 4, 3, groups=2), dim=1))
    params = dict(model.named_parameters())
    values = {name: p.detach().clone() for name, p in params.items()}
    norms = [torch_reparametrizations(m) for m in model]

    fix = r"`2` cannot be converted: .*groups=2 shares each weight column.*Nothing was converted.*remove_weight_norm"
    with pytest.raises(ValueError, match=fix):
        from_torch(model)
    assert [torch_reparametrizations(m) for m in model] == norms and not any(map(is_weight_normalized, model))
    assert dict(model.named_parameters()) == params  # the very tensors, so an optimizer built on them still holds
    assert all(torch.equal(p, values[name]) for name, p in params.items())

    remove_weight_norm(model[2])  # the fix the message gives
    assert from_torch(model) == ["0"]


@pytest.mark.parametrize("form", [*FORMS, "ours"])
def test_remove_weight_norm_folds_a_frozen_layer_into_a_frozen_parameter(form):
    layer = weight_norm(nn.Linear(3, 4)) if form == "ours" else torch_weight_norm(form, nn.Linear(3, 4))
    for param in layer.parameters():
        param.requires_grad_(False)
    weight = layer.weight.detach().clone()

    remove_weight_norm(layer)
    assert isinstance(layer.weight, nn.Parameter) and not layer.weight.requires_grad  # torch: a buffer, or trainable
    assert [name for name, _ in layer.named_parameters()] == ["bias", "weight"] and not dict(layer.named_buffers())
    assert torch.equal(layer.weight, weight) and sorted(layer.state_dict()) == ["bias", "weight"]


@pytest.mark.parametrize("form", [*FORMS, "ours"])
@pytest.mark.parametrize("trained", ["original0", "original1"])
def test_remove_weight_norm_folds_a_layer_training_g_or_v_alone_into_a_trainable_weight(form, trained):
    layer = weight_norm(nn.Linear(3, 4)) if form == "ours" else torch_weight_norm(form, nn.Linear(3, 4))
    for name, param in layer.named_parameters():  # training g alone: DoRA-style fine-tuning of the magnitudes
        param.requires_grad_(name.endswith((trained, "_g" if trained == "original0" else "_v")))
    remove_weight_norm(layer)
    assert layer.weight.requires_grad
