"""A HiFi-GAN-style vocoder generator trained with torch's legacy weight norm, carried over to this library.

HiFi-GAN (and BigVGAN) wrap every convolution in ``torch.nn.utils.weight_norm`` with torch's default
``dim=0``; for a ``ConvTranspose1d`` that is the *input* axis (its weight is laid out (in, out, k)).
Their checkpoints load strictly here: along torch's axis (``dim=0``) the parameters are the same ``g`` and
``v`` and train step for step like torch's; along this library's default output axis they load with
equal outputs. Folded, the generator exports to ONNX as plain convolutions.
"""

import io
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_wn import apply_weight_norm, remove_weight_norm, weight_norms

pytestmark = [
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),  # inside torch.onnx
]
ROOT = Path(__file__).resolve().parents[2]
LRELU_SLOPE = 0.1  # HiFi-GAN's
H = SimpleNamespace(num_mels=16, channels=32, upsample_rates=(4, 2), resblock_dilations=(1, 3, 5))


class ResBlock(nn.Module):
    """Dilated convolutions, each on a leaky-ReLU'd input, each added back (HiFi-GAN's ResBlock2)."""

    def __init__(self, channels: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, 3, dilation=d, padding=d) for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = x + conv(nn.functional.leaky_relu(x, LRELU_SLOPE))
        return x


class Generator(nn.Module):
    """mel (batch, num_mels, frames) -> waveform (batch, 1, frames * prod(upsample_rates)).

    With ``torch_weight_norm`` every convolution is wrapped in torch's legacy ``weight_norm``, as
    HiFi-GAN's own ``Generator`` does.
    """

    def __init__(self, h: SimpleNamespace = H, torch_weight_norm: bool = True) -> None:
        super().__init__()
        wrap = _legacy_weight_norm if torch_weight_norm else (lambda m: m)
        self.conv_pre = wrap(nn.Conv1d(h.num_mels, h.channels, 7, padding=3))
        channels, self.ups, self.resblocks = h.channels, nn.ModuleList(), nn.ModuleList()
        for rate in h.upsample_rates:
            self.ups.append(wrap(nn.ConvTranspose1d(channels, channels // 2, 2 * rate, stride=rate, padding=rate // 2)))
            channels //= 2
            self.resblocks.append(ResBlock(channels, h.resblock_dilations))
            for i, conv in enumerate(self.resblocks[-1].convs):
                self.resblocks[-1].convs[i] = wrap(conv)
        self.conv_post = wrap(nn.Conv1d(channels, 1, 7, padding=3))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.conv_pre(mel)
        for up, resblock in zip(self.ups, self.resblocks):
            x = resblock(up(nn.functional.leaky_relu(x, LRELU_SLOPE)))
        return torch.tanh(self.conv_post(nn.functional.leaky_relu(x)))


CONVS = 1 + 2 * (1 + len(H.resblock_dilations)) + 1  # conv_pre, each stage's upsampling and resblock, conv_post
UPS = ["ups.0", "ups.1"]


def _legacy_weight_norm(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the hook; vocoder checkpoints carry it
        return torch.nn.utils.weight_norm(module)  # torch's default dim=0, as HiFi-GAN calls it


def torch_trained() -> Generator:
    """A generator under torch's legacy weight norm whose g differs from ||v|| (as after training)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = Generator()
        with torch.no_grad():
            for param in theirs.parameters():
                param.mul_(torch.rand_like(param) + 0.5)
    assert sum(name.endswith("weight_g") for name, _ in theirs.named_parameters()) == CONVS
    return theirs


def saved(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict through torch.save and torch.load, as a checkpoint file gives it."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def ours_normalized(**options) -> Generator:
    with torch.random.fork_rng():
        torch.manual_seed(1)  # other weights than torch_trained's: the load must set them all
        model = Generator(torch_weight_norm=False)
    assert len(apply_weight_norm(model, **options)) == CONVS
    return model


MEL = torch.randn(2, H.num_mels, 10, generator=torch.Generator().manual_seed(2))
WAVE = torch.rand(2, 1, 80, generator=torch.Generator().manual_seed(3)) * 1.6 - 0.8


def test_the_generator_upsamples_mel_frames_to_samples():
    assert Generator()(MEL).shape == (2, 1, 10 * 4 * 2)


@pytest.mark.parametrize("dim", [0, None], ids=["torch_axis", "output_axis"])
def test_torchs_legacy_checkpoint_loads_strictly_with_equal_outputs(dim):
    theirs = torch_trained()
    ours = ours_normalized() if dim is None else ours_normalized(dim=dim)
    result = ours.load_state_dict(saved(theirs), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(ours(MEL), theirs(MEL), rtol=0, atol=1e-5)
    modules = dict(ours.named_modules())
    for name in UPS:
        g = modules[name].parametrizations.weight.original0
        in_channels, out_channels = modules[name].in_channels, modules[name].out_channels
        # torch's axis keeps its g (one per input channel); the output axis splits w again, one g per output channel
        assert g.shape == ((in_channels, 1, 1) if dim == 0 else (1, out_channels, 1))


def adam_steps(model: nn.Module, steps: int = 5) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.l1_loss(model(MEL), WAVE)  # HiFi-GAN's mel-spectrogram L1, on the waveform here
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def torch_name(name: str) -> str:
    return name.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v")


def test_along_torchs_axis_training_follows_torchs_trajectory():
    theirs = torch_trained()
    ours = ours_normalized(dim=0)
    ours.load_state_dict(saved(theirs), strict=True)
    start = {name: p.detach().clone() for name, p in theirs.named_parameters()}
    theirs_losses, ours_losses = adam_steps(theirs), adam_steps(ours)
    torch.testing.assert_close(ours_losses, theirs_losses, rtol=0, atol=1e-5)
    theirs_params = dict(theirs.named_parameters())
    assert sorted(map(torch_name, dict(ours.named_parameters()))) == sorted(theirs_params)
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param, theirs_params[torch_name(name)], rtol=0, atol=1e-5, msg=name)
    moved = max((theirs_params[name] - value).abs().max().item() for name, value in start.items())
    assert moved > 1e-3  # five steps of lr 1e-3 moved the parameters: the agreement is not of untouched ones


def test_along_the_output_axis_training_takes_another_path():
    theirs = torch_trained()
    ours = ours_normalized()  # the transposed convolutions get one g per output channel
    ours.load_state_dict(saved(theirs), strict=True)
    adam_steps(theirs), adam_steps(ours)
    with torch.no_grad():
        apart = (ours(MEL) - theirs(MEL)).abs().max().item()
    assert apart > 1e-4  # not a defect: another parameterization; pass dim=0 to follow torch's


def onnx_run(path_or_bytes, mel: torch.Tensor) -> torch.Tensor:
    onnxruntime = pytest.importorskip("onnxruntime")
    source = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    session = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"mel": mel.numpy()})
    return torch.from_numpy(out)


def test_folded_and_exported_to_onnx_it_computes_the_trained_generator():
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    theirs = torch_trained()
    ours = ours_normalized(dim=0)
    ours.load_state_dict(saved(theirs), strict=True)
    adam_steps(ours, steps=2)
    ours.eval()
    with torch.no_grad():
        trained = ours(MEL)
    assert len(remove_weight_norm(ours)) == CONVS and not any(weight_norms(m) for m in ours.modules())
    buffer = io.BytesIO()
    torch.onnx.export(ours, (MEL,), buffer, dynamo=False, input_names=["mel"], dynamic_axes={"mel": {0: "batch", 2: "frames"}})
    ops = {node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node}
    assert {"Conv", "ConvTranspose", "Tanh"} <= ops and "ReduceL2" not in ops  # folded: plain weights, no norms
    torch.testing.assert_close(onnx_run(buffer.getvalue(), MEL), trained, rtol=0, atol=1e-5)
    longer = torch.randn(1, H.num_mels, 23, generator=torch.Generator().manual_seed(4))  # another batch and length
    with torch.no_grad():
        torch.testing.assert_close(onnx_run(buffer.getvalue(), longer), ours(longer), rtol=0, atol=1e-5)


def readme_vocoder_block() -> str:
    """The code block of the README's section for vocoder users, as written there."""
    section = (ROOT / "README.md").read_text().split("### For vocoder users (HiFi-GAN, BigVGAN)", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_vocoder_path_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")  # torch.onnx.export's default exporter (dynamo=True)
    pytest.importorskip("onnxruntime")
    theirs = torch_trained()
    checkpoint = tmp_path / "g_02500000"
    torch.save({"generator": theirs.state_dict()}, checkpoint)  # HiFi-GAN's generator checkpoint layout
    monkeypatch.chdir(tmp_path)  # the block writes generator.onnx to the working directory
    namespace = {"Generator": Generator, "h": H, "checkpoint_path": str(checkpoint), "mel": MEL}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the class itself calls torch's deprecated weight_norm
        exec(compile(readme_vocoder_block(), "README.md", "exec"), namespace)
    generator = namespace["generator"]
    assert not any(weight_norms(m) for m in generator.modules())  # folded at the end of the block
    with torch.no_grad():  # the block's training is `...`: the generator is the checkpoint's
        torch.testing.assert_close(generator(MEL), theirs(MEL), rtol=0, atol=1e-5)
    torch.testing.assert_close(onnx_run(tmp_path / "generator.onnx", MEL), theirs(MEL).detach(), rtol=0, atol=1e-5)


def test_the_readme_vocoder_path_keeps_the_checkpoints_g_and_v(tmp_path):
    """The block up to its training (`...`) leaves torch's g and v as they were saved, so training goes on from them."""
    theirs = torch_trained()
    checkpoint = tmp_path / "g_02500000"
    torch.save({"generator": theirs.state_dict()}, checkpoint)
    head = readme_vocoder_block().split("\n...", 1)[0]
    namespace = {"Generator": Generator, "h": H, "checkpoint_path": str(checkpoint)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        exec(compile(head, "README.md", "exec"), namespace)
    theirs_params = dict(theirs.named_parameters())
    for name, param in namespace["generator"].named_parameters():
        assert torch.equal(param, theirs_params[torch_name(name)]), name
