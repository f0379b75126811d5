"""Applying a trained model to files: inputs, predictors (checkpoint or ONNX) and the batch loop."""

from transferkit.inference.inputs import collect_inputs
from transferkit.inference.loop import Predictions, predict_files
from transferkit.inference.predictors import OnnxPredictor, TorchPredictor, best_device, load_predictor

__all__ = [
    "OnnxPredictor",
    "Predictions",
    "TorchPredictor",
    "best_device",
    "collect_inputs",
    "load_predictor",
    "predict_files",
]
