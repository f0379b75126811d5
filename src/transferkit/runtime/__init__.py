"""Where a model's frozen part runs: onnxruntime on a CPU (exported once, checked against
PyTorch, kept on disk), PyTorch elsewhere or when it cannot be exported (`choice`, `onnx`)."""

from transferkit.runtime.choice import RUNTIMES, TORCH, resolve_runtime
from transferkit.runtime.onnx import PARITY_RTOL, OnnxModule, session_for

__all__ = ["PARITY_RTOL", "RUNTIMES", "TORCH", "OnnxModule", "resolve_runtime", "session_for"]
