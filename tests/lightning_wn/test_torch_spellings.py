"""A drop-in for torch's weight norms: their state dicts, their `dim`, their layers in a model.

torch writes g and v three ways: `parametrizations.<name>.original0/1` (torch.nn.utils.parametrizations),
`<name>_g`/`<name>_v` (the legacy torch.nn.utils.weight_norm hook), and with `dim=None` one 0-d g for the
whole tensor. torch's `dim` is 0 for every layer, which for a ConvTranspose is its input axis.
"""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from lightning_wn import (
    limit_direction_norm,
    select_layers,
    apply_weight_norm,
    data_dependent_init,
    fold_state_dict,
    is_weight_normalized,
    remove_weight_norm,
    weight_norm,
    weight_norms,
)
from lightning_wn.weight_norm import default_names

# (layer, input); the LSTM takes (batch, seq, features)
LAYERS = {
    "linear": (lambda: nn.Linear(5, 4), (3, 5)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3), (2, 3, 7)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), (2, 3, 5)),  # torch's dim=0: the input axis
    "lstm": (lambda: nn.LSTM(3, 4, batch_first=True), (2, 3, 3)),
}


def legacy_weight_norm(module: nn.Module, dim=0) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the hook, checkpoints still carry it
        for name in default_names(module):
            torch.nn.utils.weight_norm(module, name, dim=dim)
    return module


def parametrized_weight_norm(module: nn.Module, dim=0) -> nn.Module:
    for name in default_names(module):
        parametrizations.weight_norm(module, name, dim=dim)
    return module


TORCH_SPELLINGS = {"legacy": legacy_weight_norm, "parametrized": parametrized_weight_norm}
OURS = {
    "default": lambda m: weight_norm(m),
    "whole_tensor": lambda m: weight_norm(m, dim=None),
    "log_scale": lambda m: weight_norm(m, log_scale_factor=3.0),
}


def first(out):
    return out[0] if isinstance(out, tuple) else out


def randomized(module: nn.Module) -> nn.Module:
    """Every parameter scaled by its own random factor in [0.5, 1.5): g differs from ||v||, so a mix-up shows."""
    with torch.no_grad():
        for param in module.parameters():
            param.mul_(torch.rand_like(param) + 0.5)
    return module


def torch_trained(kind: str, spelling: str, dim) -> nn.Module:
    make, _ = LAYERS[kind]
    return randomized(TORCH_SPELLINGS[spelling](make(), dim=dim))


@pytest.mark.parametrize("ours", sorted(OURS))
@pytest.mark.parametrize("dim", [0, None], ids=["torch_default_dim", "dim_none"])
@pytest.mark.parametrize("spelling", sorted(TORCH_SPELLINGS))
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_torch_state_dicts_load_strictly_and_compute_torchs_function(kind, spelling, dim, ours):
    torch.manual_seed(0)
    theirs = torch_trained(kind, spelling, dim)
    x = torch.randn(LAYERS[kind][1])
    layer = OURS[ours](LAYERS[kind][0]())
    result = layer.load_state_dict(theirs.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(first(layer(x)), first(theirs(x)), rtol=0, atol=1e-6)
    assert {k: v.shape for k, v in layer.state_dict().items()} == {
        k: v.shape for k, v in OURS[ours](LAYERS[kind][0]()).state_dict().items()
    }  # our layout kept: training goes on with our g


@pytest.mark.parametrize("saved, loaded", [(2.0, 3.0), (2.0, None), (None, 2.0)])
def test_a_state_dict_saved_with_another_log_scale_factor_loads_strictly_and_computes_its_function(saved, loaded):
    # g = exp(c * s) reads c from the layer's option: an s saved with another c is converted, not taken as it is
    torch.manual_seed(0)
    source = randomized(weight_norm(nn.Conv1d(3, 4, 3), log_scale_factor=saved))
    layer = weight_norm(nn.Conv1d(3, 4, 3), log_scale_factor=loaded)
    layer.load_state_dict(source.state_dict(), strict=True)
    x = torch.randn(2, 3, 7)
    torch.testing.assert_close(layer(x), source(x), rtol=0, atol=1e-6)
    assert sorted(layer.state_dict()) == sorted(weight_norm(nn.Conv1d(3, 4, 3), log_scale_factor=loaded).state_dict())


def test_each_load_records_whether_g_and_v_changed_form_and_the_next_load_replaces_the_record():
    # the callback reads this record to restart an optimizer state saved for other tensors: it must not go stale
    layer = weight_norm(nn.Conv1d(3, 4, 3), log_scale_factor=2.0)
    normalized = layer.parametrizations.weight
    loads = [
        (nn.Conv1d(3, 4, 3).state_dict(), "saved `weight` as a plain weight"),
        (weight_norm(nn.Conv1d(3, 4, 3)).state_dict(), "as g, which this run learns as s with c = 2"),
        (weight_norm(nn.Conv1d(3, 4, 3), log_scale_factor=5.0).state_dict(), "as s with c = 5, which this run learns"),
        (layer.state_dict(), None),
    ]
    for state_dict, record in loads:
        layer.load_state_dict(state_dict)
        assert record is None and normalized.converted_on_load is None or record in normalized.converted_on_load
    layer.load_state_dict(nn.Conv1d(3, 4, 3).state_dict())
    layer.load_state_dict({}, strict=False)  # a load that holds nothing of this layer: nothing changed form
    assert normalized.converted_on_load is None


@pytest.mark.parametrize("log_scale_factor", [0.1, 3.0])  # 0.1 is not a float32: the buffer c holds it rounded
def test_a_state_dict_in_our_own_layout_loads_bit_for_bit(log_scale_factor):
    torch.manual_seed(0)
    source = randomized(weight_norm(nn.Conv1d(3, 4, 3), log_scale_factor=log_scale_factor))
    layer = weight_norm(nn.Conv1d(3, 4, 3), log_scale_factor=log_scale_factor)
    layer.load_state_dict(source.state_dict(), strict=True)
    for name, value in source.state_dict().items():  # v too: its norm sets the effective learning rate
        assert torch.equal(layer.state_dict()[name], value), name


def test_folding_keeps_torchs_other_parametrizations():
    # a GAN: a weight-normalized generator layer beside a spectral-normalized critic layer
    model = nn.Sequential(weight_norm(nn.Linear(3, 4)), parametrizations.spectral_norm(nn.Linear(4, 2))).eval()
    plain = nn.Sequential(nn.Linear(3, 4), parametrizations.spectral_norm(nn.Linear(4, 2))).eval()
    plain.load_state_dict(fold_state_dict(model.state_dict()), strict=True)
    x = torch.randn(2, 3)
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-6)


def test_legacy_keys_are_renamed_with_their_values_kept():
    torch.manual_seed(0)
    theirs = torch_trained("conv1d", "legacy", 0)
    layer = weight_norm(nn.Conv1d(3, 4, 3))
    layer.load_state_dict(theirs.state_dict())
    wn = layer.parametrizations.weight
    assert torch.equal(wn.original0, theirs.weight_g) and torch.equal(wn.original1, theirs.weight_v)


def test_a_conv_transpose_normalized_over_its_input_axis_loads_per_output_channel():
    torch.manual_seed(0)
    theirs = torch_trained("conv_transpose1d", "parametrized", 0)
    assert theirs.parametrizations.weight.original0.shape == (3, 1, 1)  # torch: one g per input channel
    layer = weight_norm(nn.ConvTranspose1d(3, 4, 3, stride=2))
    layer.load_state_dict(theirs.state_dict())
    wn = layer.parametrizations.weight
    assert wn.original0.shape == (1, 4, 1)  # ours: one g per output channel, the weight split along it
    torch.testing.assert_close(layer.weight, theirs.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(wn.original0.flatten(), torch.linalg.vector_norm(theirs.weight, dim=(0, 2)))


def test_our_whole_tensor_state_dict_loads_into_torchs():
    torch.manual_seed(0)
    ours = randomized(weight_norm(nn.Conv1d(3, 4, 3), dim=None))
    theirs = parametrizations.weight_norm(nn.Conv1d(3, 4, 3), dim=None)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 7)
    torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dim", [0, None], ids=["torch_default_dim", "dim_none"])
@pytest.mark.parametrize("spelling", ["ours", *sorted(TORCH_SPELLINGS)])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_fold_state_dict_folds_every_spelling_into_the_plain_layer(kind, spelling, dim):
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    if spelling == "ours":
        trained = randomized(weight_norm(make()) if dim == 0 else weight_norm(make(), dim=None))  # 0: ours left out
    else:
        trained = torch_trained(kind, spelling, dim)
    x = torch.randn(shape)
    plain = make()
    plain.load_state_dict(fold_state_dict(trained.state_dict()), strict=True)
    torch.testing.assert_close(first(plain(x)), first(trained(x)), rtol=0, atol=1e-6)


def test_fold_state_dict_takes_a_whole_lightning_checkpoint():
    torch.manual_seed(0)
    trained = torch_trained("conv_transpose1d", "legacy", None)
    checkpoint = {"epoch": 3, "global_step": 30, "state_dict": trained.state_dict(), "optimizer_states": []}
    folded = fold_state_dict(checkpoint)
    assert sorted(folded) == ["bias", "weight"]
    plain, x = nn.ConvTranspose1d(3, 4, 3, stride=2), torch.randn(2, 3, 5)
    plain.load_state_dict(folded, strict=True)
    torch.testing.assert_close(plain(x), trained(x), rtol=0, atol=1e-6)


def test_fold_state_dict_keeps_pairs_the_model_has_and_passes_spectral_norm_through():
    class Gated(nn.Module):  # parameters that happen to be spelled like a legacy pair
        def __init__(self):
            super().__init__()
            self.gate_g = nn.Parameter(torch.ones(3, 1))
            self.gate_v = nn.Parameter(torch.randn(3, 4))

    state = Gated().state_dict()
    assert fold_state_dict(state, keep=state.keys()).keys() == state.keys()
    for one in ("gate_g", "gate_v"):  # a model that owns one key of a pair keeps both, unfolded
        assert fold_state_dict(state, keep=[one]).keys() == state.keys()
        assert fold_state_dict(state, keep=(key for key in [one])).keys() == state.keys()  # read once, not consumed
    spectral = torch.nn.utils.spectral_norm(nn.Linear(4, 3)).state_dict()  # weight_orig, weight_u, weight_v
    assert fold_state_dict(spectral).keys() == spectral.keys()
    # a model normalized in another form (g = exp(c * s)) keeps the saved g and v whole: its layer loads them
    saved = weight_norm(nn.Linear(4, 3)).state_dict()
    own = weight_norm(nn.Linear(4, 3), log_scale_factor=2.0).state_dict().keys()  # bias, s, c, original1
    assert fold_state_dict(saved, keep=own).keys() == saved.keys()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_a_layer_loads_its_own_s_and_v_as_they_are_whatever_dtype_holds_c(dtype):
    # c = 0.1 is not exact in these dtypes: the load must not take it for another c and split s and v again
    saved = weight_norm(nn.Linear(3, 2), log_scale_factor=0.1).to(dtype)
    layer = weight_norm(nn.Linear(3, 2), log_scale_factor=0.1).to(dtype)
    layer.load_state_dict(saved.state_dict())
    for name, value in saved.state_dict().items():
        assert torch.equal(layer.state_dict()[name], value), name


def test_fold_state_dict_says_what_it_wants():
    layer = weight_norm(nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"a state dict .* got WeightNormedLinear\. Pass `model.state_dict\(\)`"):
        fold_state_dict(layer)
    with pytest.raises(TypeError, match=r"entry 'model' is a OrderedDict.*Lightning checkpoint with a 'state_dict'"):
        fold_state_dict({"model": layer.state_dict(), "epoch": 1})
    bad = {"parametrizations.weight.original0": torch.ones(2, 3), "parametrizations.weight.original1": torch.ones(2, 3)}
    with pytest.raises(ValueError, match=r"Cannot tell the axis `parametrizations.weight`'s g \(shape \(2, 3\)\)"):
        fold_state_dict(bad)
    with pytest.raises(TypeError, match=r"`keep` must be a collection .* the string 'weight_g': pass \['weight_g'\]"):
        fold_state_dict(layer.state_dict(), keep="weight_g")  # as a string it would keep `g` and `weight` too


def mixed_model() -> nn.Sequential:
    """Weight norm applied three ways, spectral norm two ways, and a plain layer."""
    torch.manual_seed(0)
    return nn.Sequential(
        randomized(weight_norm(nn.Conv1d(2, 4, 3, padding=1))),
        randomized(parametrizations.weight_norm(nn.Conv1d(4, 4, 3, padding=1))),
        randomized(legacy_weight_norm(nn.ConvTranspose1d(4, 4, 3, padding=1), dim=None)),
        parametrizations.spectral_norm(nn.Conv1d(4, 4, 3, padding=1)),
        torch.nn.utils.spectral_norm(nn.Conv1d(4, 4, 3, padding=1)),
        nn.Conv1d(4, 2, 1),
    ).eval()  # eval: spectral norm's power iteration stands still


def test_remove_weight_norm_folds_weight_norm_whatever_applied_it():
    model = mixed_model()
    x = torch.randn(2, 2, 9)
    before = model(x)
    assert remove_weight_norm(model) == ["0", "1", "2"]
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    names = sorted(name for name, _ in model.named_parameters())
    folded = [f"{i}.{p}" for i in "012" for p in ("bias", "weight")]
    assert [n for n in names if n.startswith(("0.", "1.", "2."))] == folded
    assert parametrize.is_parametrized(model[3], "weight") and hasattr(model[4], "weight_orig")  # spectral norm stays
    assert not model[2]._forward_pre_hooks  # the legacy hook is gone: nothing recomputes the weight


@pytest.mark.parametrize("spelling", sorted(TORCH_SPELLINGS))
def test_remove_weight_norm_folds_torchs_weight_norm_of_an_lstm(spelling):
    torch.manual_seed(0)
    lstm = torch_trained("lstm", spelling, 0)
    x = torch.randn(LAYERS["lstm"][1])
    before = lstm(x)[0]
    assert remove_weight_norm(lstm) == [""]
    assert sorted(name for name, _ in lstm.named_parameters()) == sorted(nn.LSTM(3, 4).state_dict())
    torch.testing.assert_close(lstm(x)[0], before, rtol=0, atol=1e-6)


def test_remove_weight_norm_refuses_a_chain_before_folding_anything():
    model = nn.Sequential(weight_norm(nn.Linear(3, 3)), parametrizations.weight_norm(nn.Linear(3, 2)))
    parametrizations.spectral_norm(model[1])  # a second parametrization on the same weight
    with pytest.raises(ValueError, match=r"`1.weight` chains torch's weight norm with \['_WeightNorm', '_SpectralNorm"):
        remove_weight_norm(model)
    assert is_weight_normalized(model[0])


def test_apply_weight_norm_leaves_torchs_layers_alone_and_names_them():
    model = mixed_model()
    x = torch.randn(2, 2, 9)
    model[0] = nn.Conv1d(2, 4, 3, padding=1)  # plain, like the last layer
    before = model(x)
    with pytest.warns(UserWarning, match=r"leaves 4 layers alone that torch already reparametrizes: `1` \(weight: "
                      r"torch.nn.utils.parametrizations.weight_norm\), `2` \(weight: torch.nn.utils.weight_norm\), "
                      r"`3` \(weight: torch.nn.utils.parametrizations.spectral_norm\), "
                      r"`4` \(weight: torch.nn.utils.spectral_norm\)"):
        assert apply_weight_norm(model) == ["0", "5"]
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # left out explicitly: nothing to warn about
        assert select_layers(mixed_model(), exclude=["1", "2", "3", "4"]) == ["0", "5"]


def test_naming_a_layer_torch_reparametrizes_is_an_error():
    model = mixed_model()
    with pytest.raises(ValueError, match=r"`include` names `3` \(weight: torch.nn.utils.parametrizations.spectral_norm"
                                         r"\), already reparametrized by torch"):
        apply_weight_norm(model, include=["3", "5"])
    with pytest.raises(ValueError, match=r"ConvTranspose1d is already reparametrized by torch \(weight: "
                                         r"torch.nn.utils.weight_norm\).*remove_weight_norm"):
        weight_norm(model[2])
    with pytest.raises(ValueError, match=r"ParametrizedConv1d is already reparametrized by torch"):
        weight_norm(model[1], dim=None)

    class Positive(nn.Module):
        def forward(self, bias):
            return bias.abs()

    biased = nn.utils.parametrize.register_parametrization(nn.Linear(2, 3), "bias", Positive())
    with pytest.raises(ValueError, match=r"already reparametrized by torch \(bias: Positive\), which this library's "
                                         r"weight norm cannot share a layer with\. Remove them first \(`torch.nn.utils."
                                         r"parametrize.remove_parametrizations`"):  # not the advice for torch's weight norm
        weight_norm(biased)
    with pytest.raises(ValueError, match=r"No module of Sequential is selected .* 3 selected are under torch's norms: "
                                         r"Convert torch's weight norm with `lightning_wn.from_torch\(model\)`"):
        apply_weight_norm(model, include=[nn.Conv1d], exclude=["0", "2", "5"])
    assert not is_weight_normalized(model[3])


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv_transpose1d", "linear_large"])
def test_dim_none_is_torchs_one_norm_over_the_whole_tensor(kind):
    make, shape = {**LAYERS, "linear_large": (lambda: nn.Linear(1024, 256), (3, 1024))}[kind]
    torch.manual_seed(0)
    plain = make().double()
    ours = randomized(weight_norm(copy.deepcopy(plain), dim=None))
    theirs = parametrizations.weight_norm(copy.deepcopy(plain), dim=None)
    theirs.load_state_dict(ours.state_dict())
    assert ours.parametrizations.weight.original0.shape == ()
    assert "dim=None" in repr(ours)
    x = torch.randn(shape, dtype=torch.double)
    for _ in range(2):  # the second call takes the cached weight
        out_ours, out_theirs = ours(x), theirs(x)
        torch.testing.assert_close(out_ours, out_theirs, rtol=1e-10, atol=1e-10)
        (out_ours * out_ours.detach().cos()).sum().backward()
        (out_theirs * out_theirs.detach().cos()).sum().backward()
    grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-9, atol=1e-10, msg=name)


def test_dim_given_on_a_large_linear_takes_the_axis_asked_for():
    torch.manual_seed(0)
    plain = nn.Linear(1024, 256)  # large enough that a few rows would take the output-scaling path
    x = torch.randn(3, 1024)
    ours = weight_norm(copy.deepcopy(plain), dim=1)
    theirs = parametrizations.weight_norm(copy.deepcopy(plain), dim=1)
    with torch.no_grad():
        ours.parametrizations.weight.original0.mul_(torch.linspace(0.5, 1.5, 1024))
        theirs.parametrizations.weight.original0.mul_(torch.linspace(0.5, 1.5, 1024))
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_dim_left_out_picks_the_output_axis_and_minus_one_is_refused():
    assert weight_norm(nn.ConvTranspose1d(3, 4, 3)).parametrizations.weight.original0.shape == (1, 4, 1)
    assert weight_norm(nn.Conv1d(3, 4, 3)).parametrizations.weight.original0.shape == (4, 1, 1)
    with pytest.raises(ValueError, match=r"`dim`=-1 is ambiguous.*Pass `dim=None` for the whole tensor"):
        weight_norm(nn.Linear(3, 4), dim=-1)
    with pytest.raises(ValueError, match=r"`dim`=3 is out of range for `weight` of shape \(4, 3\)"):
        weight_norm(nn.Linear(3, 4), dim=3)


def test_data_dependent_init_needs_g_along_the_output_axis():
    x = torch.randn(64, 3, 8)
    for layer, axis in [
        (weight_norm(nn.Conv1d(3, 4, 3), dim=None), r"one g for the whole tensor \(dim=None\)"),
        (weight_norm(nn.ConvTranspose1d(3, 4, 3), dim=0), r"dim=0, .* \(dim=1 for ConvTranspose1d\)"),
    ]:
        model = nn.Sequential(layer)
        g = layer.parametrizations.weight.original0.detach().clone()
        with pytest.raises(ValueError, match=rf"Module `0` is weight-normalized with {axis}.*Normalize it with `dim`.*"
                           r"`from_torch` converted keeps torch's axis: .*skip the init, the callback's `data_init=False`"):
            data_dependent_init(model, x)
        assert torch.equal(layer.parametrizations.weight.original0, g)


def test_data_dependent_init_skips_torchs_layers_unless_named():
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.spectral_norm(nn.Conv1d(3, 4, 3)), nn.ReLU(), nn.Conv1d(4, 2, 1)).eval()
    x = torch.randn(64, 3, 8)
    report = data_dependent_init(model, x)
    assert list(report.modules) == ["2"] and "reparametrized by torch" in report.skipped["0"]
    out = model(x)
    torch.testing.assert_close(out.mean(dim=(0, 2)), torch.zeros(2), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"Module `0` is reparametrized by torch \(weight: torch.nn.utils.parametriz"
                                         r"ations.spectral_norm\): its weight cannot be rescaled in place"):
        data_dependent_init(model, x, modules=["0"])


@pytest.mark.parametrize("ours", sorted(OURS))
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_a_plain_layers_state_dict_loads_strictly_and_computes_its_function(kind, ours):
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    plain = randomized(make())
    x = torch.randn(shape)
    layer = OURS[ours](make())
    result = layer.load_state_dict(plain.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(first(layer(x)), first(plain(x)), rtol=0, atol=1e-6)
    for name, normalized in weight_norms(layer).items():  # split into g = ||w|| along our axis and v = w
        w = getattr(plain, name)
        torch.testing.assert_close(normalized.v, w, rtol=0, atol=0)
        others = [d for d in range(w.dim()) if d != normalized.dim]  # every axis for the whole tensor (dim -1)
        norm = torch.linalg.vector_norm(w, dim=others)
        torch.testing.assert_close(normalized.g().flatten(), norm.flatten(), rtol=1e-5, atol=1e-6)
    assert {k: v.shape for k, v in layer.state_dict().items()} == {
        k: v.shape for k, v in OURS[ours](make()).state_dict().items()
    }


def test_a_plain_conv_transpose_loads_split_along_its_output_axis():
    torch.manual_seed(0)
    plain = randomized(nn.ConvTranspose1d(3, 4, 3, stride=2))
    layer = weight_norm(nn.ConvTranspose1d(3, 4, 3, stride=2))
    layer.load_state_dict(plain.state_dict(), strict=True)
    wn = layer.parametrizations.weight
    assert wn.original0.shape == (1, 4, 1)
    torch.testing.assert_close(wn.original0.flatten(), torch.linalg.vector_norm(plain.weight, dim=(0, 2)))
    torch.testing.assert_close(layer.weight, plain.weight.detach(), rtol=0, atol=1e-6)  # a ComputedWeight, not a Parameter


def test_a_plain_model_loads_into_a_partly_normalized_one_and_trains_like_it():
    torch.manual_seed(0)
    plain = randomized(nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(20, 2)))
    model = copy.deepcopy(plain)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # the load, not the copy, must give the weights
    apply_weight_norm(model, include=[nn.Conv1d])
    model.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(6, 3, 7)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-6)
    assert model[3].weight is model[3]._parameters["weight"]  # the plain layer loaded as it was
    # a step on g and v then moves the function, as any training would (the loaded v is trainable)
    model(x).square().sum().backward()
    assert model[0].parametrizations.weight.original1.grad.abs().sum() > 0


def test_a_plain_weight_of_the_wrong_shape_or_beside_g_and_v_is_an_error():
    plain = nn.Linear(5, 4).state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: copying a plain weight of shape \(4, 5\).*\(3, 5\)"):
        weight_norm(nn.Linear(5, 3)).load_state_dict(plain)
    layer = weight_norm(nn.Linear(5, 4))
    both = {**layer.state_dict(), "weight": plain["weight"]}  # ambiguous: which one is the layer's?
    before = layer.weight.clone()
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "weight"'):
        layer.load_state_dict(both, strict=True)
    layer.load_state_dict(both, strict=False)  # g and v win; the plain entry is reported, not used
    torch.testing.assert_close(layer.weight, before, rtol=0, atol=0)


def test_nothing_to_act_on_says_why_and_names_from_torch_when_torchs_weight_norm_is_the_cause():
    under_torch = nn.Sequential(parametrizations.weight_norm(nn.Linear(3, 4)), nn.ReLU(), nn.utils.weight_norm(nn.Linear(4, 2)))
    fix = r"under torch's weight.*`lightning_wn.from_torch\(model\)`"
    with pytest.raises(ValueError, match=r"No module of Sequential to initialize.* 2 layers are " + fix):
        data_dependent_init(under_torch, torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"`limit_direction_norm` found no weight-normalized layer .*2 layers are " + fix):
        limit_direction_norm(under_torch, max_norm=1.0)
    with pytest.raises(ValueError, match=r"found no weight-normalized layer in Linear. Normalize its layers first"):
        limit_direction_norm(nn.Linear(3, 4), max_norm=1.0)
