"""Serving a trained model over HTTP (`python serve.py ckpt_path=...`): the request's bytes,
the dynamic batcher, and the FastAPI app that joins them."""

from transferkit.serving.app import build_app
from transferkit.serving.batcher import Batcher
from transferkit.serving.requests import BadRequest, Limits, image_bytes

__all__ = ["BadRequest", "Batcher", "Limits", "build_app", "image_bytes"]
