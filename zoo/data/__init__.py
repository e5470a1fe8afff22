"""DataModules for the zoo."""

from zoo.data.images import CIFAR10Data, FashionMNISTData, ImageDataModule, MNISTData

__all__ = ["CIFAR10Data", "FashionMNISTData", "ImageDataModule", "MNISTData"]
