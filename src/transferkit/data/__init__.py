"""Image folders as LightningDataModules."""

from transferkit.data.datamodule import ImageFolderDataModule
from transferkit.data.demo import DemoDataModule

__all__ = ["DemoDataModule", "ImageFolderDataModule"]
