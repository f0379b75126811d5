"""The serve task: answer POST /predict with a checkpoint or an exported model.onnx.

Built on FastAPI and uvicorn (what LitServe runs on) rather than LitServe itself: LitServe
0.2 parses every request body that is not a form as JSON before the API sees it, so a raw
image body cannot reach the model, and its worker processes load the model only after the
port is bound. The model is loaded here first, so a checkpoint that cannot be served ends the
run with one line before anything listens."""

from __future__ import annotations

import logging
import socket

from omegaconf import DictConfig

from transferkit.errors import ConfigError
from transferkit.extras import require
from transferkit.inference import load_predictor
from transferkit.tasks.wrapper import exit_on_user_error

log = logging.getLogger(__name__)


def check_settings(cfg: DictConfig) -> None:
    for key in ("workers", "max_batch_size", "top_k", "max_bytes"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key}={cfg[key]} must be 1 or more.")
    if float(cfg.batch_timeout) < 0:
        raise ConfigError(f"batch_timeout={cfg.batch_timeout} must be 0 or more seconds.")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, made here so a port in use is one line, not uvicorn's traceback."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConfigError(
            f"Cannot listen on {host}:{port} ({error.strerror}); choose another port=."
        ) from None
    return sock


def serve(cfg: DictConfig) -> None:
    check_settings(cfg)
    uvicorn = require("uvicorn", extra="serve", feature="serve.py")
    require("fastapi", extra="serve", feature="serve.py")
    from transferkit.serving import build_app  # needs FastAPI

    predictor = load_predictor(cfg.ckpt_path, cfg.device, cfg.precision)
    app = build_app(
        predictor,
        cfg.ckpt_path,
        top_k=int(cfg.top_k),
        max_batch_size=int(cfg.max_batch_size),
        batch_timeout=float(cfg.batch_timeout),
        workers=int(cfg.workers),
        max_bytes=int(cfg.max_bytes),
    )
    sock = bind(str(cfg.host), int(cfg.port))
    log.info(
        "Serving %s (%d classes, %s) on http://%s:%d: POST /predict, GET /health, GET /info",
        cfg.ckpt_path,
        len(predictor.class_names),
        predictor.device,
        cfg.host,
        cfg.port,
    )
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=int(cfg.graceful_s))
    uvicorn.Server(config).run(sockets=[sock])  # SIGTERM: stop accepting, answer what is in flight
    log.info("Server stopped.")


@exit_on_user_error
def main(cfg: DictConfig) -> None:
    serve(cfg)
