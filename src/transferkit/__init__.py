"""transferkit: fine-tune pretrained image classifiers on image folders."""

__version__ = "0.1.0"  # the one version: pyproject.toml reads it from here
