"""Deployment: torch.jit.trace, torch.export, ONNX run by onnxruntime, and dynamic quantization."""

import contextlib
import copy
import io
import re
import warnings

import pytest
import torch
from torch import nn

from lightning_wn import apply_weight_norm, cached, remove_weight_norm, weight_norm, weight_norms
from lightning_wn.weight_norm import default_names

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),  # inside torch.onnx
]

X = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
WEIGHT_NORMS = ("0", "2", "5")  # the conv, the transposed conv (dim=1) and the linear layer
G_AND_V = {f"{layer}.parametrizations.weight.original{i}" for layer in WEIGHT_NORMS for i in (0, 1)}
PLAIN = {f"{layer}.{name}" for layer in WEIGHT_NORMS for name in ("weight", "bias")}


def small_model(**options) -> nn.Sequential:
    with torch.random.fork_rng():  # the same model every call, and other tests' random stream left alone
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(4, 2, 3, stride=2),  # 5x5 -> 11x11
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * 11 * 11, 5),
        )
    assert apply_weight_norm(model, **options) == list(WEIGHT_NORMS)
    return model


@contextlib.contextmanager
def filled_cache(model: nn.Module, x: torch.Tensor, grad: bool):
    """Inside `cached()` after a call, every layer's w is cached: a trace must not freeze it in as a constant."""
    with torch.set_grad_enabled(grad), cached():
        model(x)
        yield


def node_kinds(traced: torch.jit.ScriptModule) -> list[str]:
    return [node.kind() for node in traced.inlined_graph.nodes()]


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("log_scale_factor", [None, 3.0])
def test_jit_trace_records_w_from_g_and_v_not_a_frozen_weight(grad, log_scale_factor):
    model = small_model(log_scale_factor=log_scale_factor)
    with filled_cache(model, X, grad):  # grad mode raised "Cannot insert a Tensor that requires grad as a constant"
        traced = torch.jit.trace(model, X)
    kinds = node_kinds(traced)
    assert kinds.count("aten::linalg_vector_norm") == 3 and "prim::PythonOp" not in kinds
    torch.testing.assert_close(traced(X), model(X), rtol=0, atol=1e-6)

    before = traced(X).detach()
    with torch.no_grad():  # the traced module shares the parameters: a new g must reach its output
        model[0].parametrizations.weight.magnitude_param.mul_(1.5)
        model[5].parametrizations.weight.original1[:, :100].neg_()
    assert (traced(X) - before).abs().max() > 0.1 * before.abs().max()  # a w frozen in at trace time: `before`
    torch.testing.assert_close(traced(X), model(X), rtol=0, atol=1e-6)

    buffer = io.BytesIO()  # no opaque op in the graph: it saves and loads
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(X), model(X), rtol=0, atol=1e-6)


def test_a_traced_model_gets_the_eager_gradients_and_trains_like_it():
    eager = small_model()
    traced = torch.jit.trace(copy.deepcopy(eager), X)
    steps = [(model, torch.optim.SGD(model.parameters(), lr=0.1)) for model in (eager, traced)]
    for step in range(3):
        for model, optimizer in steps:
            optimizer.zero_grad()
            model(X).square().sum().backward()
        if step == 0:
            grads = [{name: p.grad for name, p in model.named_parameters()} for model, _ in steps]
            assert sorted(grads[0]) == sorted(grads[1]) and G_AND_V <= set(grads[1])
            for name, grad in grads[0].items():
                torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
        for _, optimizer in steps:
            optimizer.step()
    torch.testing.assert_close(traced(X), eager(X), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # nn.LSTM's own checks of the input's shape
@pytest.mark.parametrize(
    "make", [lambda: nn.LSTM(4, 5, batch_first=True), lambda: nn.LSTMCell(4, 5)], ids=["lstm", "lstm_cell"]
)
def test_jit_trace_of_recurrent_layers_reads_every_g_and_v(make):
    layer = weight_norm(make())
    x = torch.randn(2, 3, 4) if isinstance(layer, nn.LSTM) else torch.randn(3, 4)
    with filled_cache(layer, x, grad=True):
        traced = torch.jit.trace(layer, x)
    assert node_kinds(traced).count("aten::linalg_vector_norm") == 2  # weight_ih and weight_hh
    with torch.no_grad():
        weight_norms(layer)[default_names(layer)[-1]].original0.mul_(3)
    torch.testing.assert_close(traced(x), layer(x), rtol=0, atol=1e-6)


def test_torch_export_of_an_unfolded_model_reads_g_and_v():
    model = small_model()
    with torch.no_grad():
        expected = model(X)
    with filled_cache(model, X, grad=False):
        program = torch.export.export(model, (X,))
    assert G_AND_V <= set(program.graph_signature.parameters)
    exported = program.module()
    torch.testing.assert_close(exported(X), expected, rtol=0, atol=1e-6)
    with torch.no_grad():  # export traced fake tensors: none of them may be left in a cache
        torch.testing.assert_close(model(X), expected, rtol=0, atol=0)
    torch.testing.assert_close(model(X), expected, rtol=0, atol=1e-6)
    reference = copy.deepcopy(model)
    with torch.no_grad():  # new g and v reach the exported graph's output
        for module in (exported, reference):
            module.get_parameter("0.parametrizations.weight.original0").mul_(1.5)
            module.get_parameter("5.parametrizations.weight.original1")[:, :100].neg_()
        torch.testing.assert_close(exported(X), reference(X), rtol=0, atol=1e-6)
    assert (exported(X) - expected).abs().max() > 0.1 * expected.abs().max()


def test_torch_export_of_a_folded_model_has_plain_weights():
    model = small_model()
    with torch.no_grad():
        expected = model(X)
    remove_weight_norm(model)
    program = torch.export.export(model, (X,))
    assert set(program.graph_signature.parameters) == PLAIN
    torch.testing.assert_close(program.module()(X), expected, rtol=0, atol=1e-6)


def onnx_run(model: nn.Module, x: torch.Tensor, dynamo: bool = False):
    """The model exported to ONNX, then run by onnxruntime: its output, op types and initializer names.

    ``dynamo=False`` takes torch's TorchScript-based exporter, ``dynamo=True`` the default one (torch.export
    and onnxscript).
    """
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=dynamo, input_names=["x"])
    graph = onnx.load_from_string(buffer.getvalue()).graph
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    return torch.from_numpy(out), {node.op_type for node in graph.node}, {init.name for init in graph.initializer}


def test_a_folded_model_exported_to_onnx_matches_torch():
    model = small_model().eval()
    remove_weight_norm(model)
    out, ops, initializers = onnx_run(model, X)
    with torch.no_grad():
        torch.testing.assert_close(out, model(X), rtol=0, atol=1e-5)
    assert ops == {"Conv", "ConvTranspose", "Relu", "Flatten", "Gemm"}
    assert PLAIN <= initializers


@pytest.mark.parametrize("folded", [True, False], ids=["folded", "unfolded"])
def test_the_default_dynamo_exporter_matches_torch(folded):
    # torch.onnx.export's default since torch 2.9: torch.export, then onnxscript's translation
    model = small_model().eval()
    with torch.no_grad():
        expected = model(X)
    if folded:
        remove_weight_norm(model)
    out, ops, initializers = onnx_run(model, X, dynamo=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    if folded:  # plain weights, no norm computed at run time
        assert PLAIN <= initializers and not {"ReduceL2", "ReduceSumSquare", "Sqrt"} & ops, (ops, initializers)
    # unfolded, the exporter's constant folding computes w from g and v once, at export


def test_an_unfolded_model_exported_to_onnx_computes_w_from_g_and_v():
    model = small_model().eval()
    with filled_cache(model, X, grad=True):  # "Cannot insert a Tensor that requires grad as a constant" otherwise
        out, ops, initializers = onnx_run(model, X)
    with torch.no_grad():
        torch.testing.assert_close(out, model(X), rtol=0, atol=1e-5)
    assert "ReduceL2" in ops
    assert G_AND_V <= initializers and not {f"{layer}.weight" for layer in WEIGHT_NORMS} & initializers


def test_dynamic_quantization_of_an_unfolded_model_warns_and_leaves_it_in_float():
    quantize_dynamic = pytest.importorskip("torch.ao.quantization").quantize_dynamic
    model = small_model().eval()
    with torch.no_grad():
        expected = model(X)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        quantized = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    messages = [str(w.message) for w in caught if "unquantized" in str(w.message)]
    assert len(messages) == 3  # one per weight-normalized layer
    assert re.search(r"leaves `WeightNormedLinear` unquantized, in float, even where it would quantize a `Linear`. "
                     r"Fold weight norm first with `lightning_wn.remove_weight_norm\(model\)`", messages[-1])
    # what the user gets: torch passed the subclass over, so it is still the float layer
    assert type(quantized[5]).__name__ == "WeightNormedLinear" and not hasattr(quantized[5], "qconfig")
    with torch.no_grad():
        torch.testing.assert_close(quantized(X), expected, rtol=0, atol=1e-6)


def test_dynamic_quantization_after_folding_quantizes_the_linear_layer():
    quantization = pytest.importorskip("torch.ao.quantization")
    model = small_model().eval()
    remove_weight_norm(model)
    with torch.no_grad():
        expected = model(X)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert not [w for w in caught if "unquantized" in str(w.message)]
    assert isinstance(quantized[5], torch.ao.nn.quantized.dynamic.Linear)
    with torch.no_grad():
        error = (quantized(X) - expected).abs().max() / expected.abs().max()
    assert 0 < error < 0.05  # int8 weights and activations: close, not equal


def test_jit_trace_of_a_large_linear_records_w_from_g_and_v():
    layer = weight_norm(nn.Linear(1024, 256))  # big, fed fewer rows than inputs: eager scales its output
    x = torch.randn(3, 1024)
    with filled_cache(layer, x, grad=True), warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # the path is chosen on shapes, which tracing fixes
        traced = torch.jit.trace(layer, x)
    kinds = node_kinds(traced)
    assert "aten::linalg_vector_norm" in kinds and "prim::PythonOp" not in kinds
    torch.testing.assert_close(traced(x), layer(x), rtol=0, atol=1e-5)
    with torch.no_grad():
        layer.parametrizations.weight.original0.mul_(2)
    torch.testing.assert_close(traced(x), layer(x), rtol=0, atol=1e-5)
