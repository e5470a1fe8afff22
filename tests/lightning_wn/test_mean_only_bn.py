import numpy as np
import pytest
import torch
from torch import nn

from lightning_wn import MeanOnlyBatchNorm, attach_mean_only_bn, data_dependent_init


@pytest.mark.parametrize("shape", [(16, 3), (16, 3, 7), (8, 3, 5, 5), (4, 3, 3, 4, 5)])
def test_subtracts_the_batch_mean_in_training_and_the_running_mean_in_eval(shape):
    norm = MeanOnlyBatchNorm(3, momentum=0.2)
    reference = nn.BatchNorm1d(3, affine=False, momentum=0.2)  # same running-mean rule
    with torch.no_grad():
        norm.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    axes = [0, *range(2, len(shape))]
    broadcast = (1, 3) + (1,) * (len(shape) - 2)
    for _ in range(3):
        x = torch.randn(shape) * 2 + torch.tensor([1.0, -3.0, 4.0]).view(broadcast)
        y = norm(x)
        reference(x.reshape(shape[0], 3, -1))
        torch.testing.assert_close(y, x - x.mean(axes, keepdim=True) + norm.bias.view(broadcast))
    torch.testing.assert_close(norm.running_mean, reference.running_mean)
    assert norm.num_batches_tracked.item() == 3
    norm.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(norm(x), x - (norm.running_mean - norm.bias).view(broadcast))


def test_gradient_is_the_centering_projection():
    norm = MeanOnlyBatchNorm(2)
    x = torch.randn(5, 2, requires_grad=True)
    upstream = torch.randn(5, 2)
    norm(x).backward(upstream)
    torch.testing.assert_close(x.grad, upstream - upstream.mean(0))
    torch.testing.assert_close(norm.bias.grad, upstream.sum(0))


def test_bad_arguments():
    for num_features in (0, 3.5, "3", True):
        with pytest.raises(ValueError, match=f"`num_features` must be a positive integer, got {num_features!r}"):
            MeanOnlyBatchNorm(num_features)
    with pytest.raises(ValueError, match=r"`momentum` must be a number in \[0, 1\], got 1.5"):
        MeanOnlyBatchNorm(3, momentum=1.5)
    with pytest.raises(ValueError, match=r"got None \(BatchNorm's None, a cumulative average, is not supported\)"):
        MeanOnlyBatchNorm(3, momentum=None)
    for momentum in (torch.tensor([0.1, 0.2]), torch.tensor(0.5j), "0.1", float("nan")):
        with pytest.raises(ValueError, match=r"`momentum` must be a number in \[0, 1\], got"):
            MeanOnlyBatchNorm(3, momentum=momentum)
    for momentum in (np.float32(0.25), torch.tensor(0.25)):  # numbers too, as BatchNorm takes them
        assert MeanOnlyBatchNorm(3, momentum=momentum).momentum == 0.25
    with pytest.raises(ValueError, match=r"expects input \(N, 3, \.\.\.\), got shape \(4, 2\)"):
        MeanOnlyBatchNorm(3)(torch.randn(4, 2))


def test_a_training_batch_of_one_example_is_refused_not_turned_into_the_bias():
    norm = MeanOnlyBatchNorm(3)
    with pytest.raises(ValueError, match=r"more than one value per channel in training, got shape \(1, 3\)"):
        norm(torch.randn(1, 3))
    assert norm.num_batches_tracked == 0 and not norm.running_mean.any()  # nothing moved
    assert norm(torch.randn(1, 3, 2)).mean(dim=(0, 2)).abs().max() < 1e-6  # one example, several values per channel
    norm.eval()
    torch.testing.assert_close(norm(x := torch.randn(1, 3)), x - norm.running_mean)


@pytest.mark.parametrize("steps", [16, 5])
def test_after_a_linear_on_sequences_it_centres_each_feature_not_each_step(steps):
    # a Linear's units are its last axis: with as many steps as features the wrong axis would raise nothing
    torch.manual_seed(0)
    layer = nn.Linear(8, 16)
    attach_mean_only_bn(layer)
    x = torch.randn(64, steps, 8) + torch.linspace(-3, 3, 8)
    out = layer(x)
    assert out.shape == (64, steps, 16)
    torch.testing.assert_close(out.mean((0, 1)), torch.zeros(16), atol=1e-5, rtol=0)
    report = data_dependent_init(layer, x)  # the init's statistics follow the same axis
    assert report.modules["mean_only_bn"].mean.shape == (16,)
    torch.testing.assert_close(layer(x).std((0, 1), unbiased=False), torch.ones(16), atol=1e-4, rtol=0)


def test_after_an_unbatched_convolution_it_centres_each_channel():
    layer = nn.Conv2d(4, 5, 1)  # unbatched input (4, 5, 5): as many channels out as rows
    attach_mean_only_bn(layer)
    out = layer(torch.randn(4, 5, 5) + torch.linspace(-2, 2, 5))
    torch.testing.assert_close(out.mean((1, 2)), torch.zeros(5), atol=1e-5, rtol=0)
