"""Applying a trained model to files: inputs, predictors (a checkpoint on onnxruntime or
PyTorch, or an exported model.onnx) and the batch loop."""

from transferkit.inference.checkpoint import ModelInfo
from transferkit.inference.inputs import collect_inputs
from transferkit.inference.loop import Predictions, predict_files
from transferkit.inference.predictors import (
    OnnxPredictor,
    Predictor,
    SessionPredictor,
    TorchPredictor,
    best_device,
    load_predictor,
)

__all__ = [
    "ModelInfo",
    "OnnxPredictor",
    "Predictions",
    "Predictor",
    "SessionPredictor",
    "TorchPredictor",
    "best_device",
    "collect_inputs",
    "load_predictor",
    "predict_files",
]
