"""The serve task: answer POST /predict with a checkpoint or an exported model.onnx.

Built on FastAPI and uvicorn (what LitServe runs on) rather than LitServe itself: LitServe
0.2 parses every request body that is not a form as JSON before the API sees it, so a raw
image body cannot reach the model, and its worker processes load the model only after the
port is bound. The model is loaded here first, so a checkpoint that cannot be served ends the
run with one line before anything listens."""

from __future__ import annotations

import logging
import math
import socket
from typing import TYPE_CHECKING

from omegaconf import DictConfig
from PIL import Image

from transferkit.errors import ConfigError
from transferkit.extras import require
from transferkit.inference import load_predictor
from transferkit.tasks.settings import check_config
from transferkit.tasks.wrapper import exit_on_user_error

if TYPE_CHECKING:
    from transferkit.serving import Limits

log = logging.getLogger(__name__)
PILLOW_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # Pillow refuses to open any image larger


def whole(cfg: DictConfig, key: str, high: int | None = None, why: str = "") -> None:
    """ConfigError in one line unless cfg[key] is a whole number from 1 (to `high`): a limit
    that is not would leave the server open to what it guards."""
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={value} must be a whole number.")
    if value < 1 or (high is not None and value > high):
        raise ConfigError(
            f"{key}={value} must be " + (f"from 1 to {high}" if high else "1 or more") + f"{why}."
        )


def check_settings(cfg: DictConfig) -> None:
    for key in ("workers", "max_batch_size", "top_k", "max_bytes", "max_parts"):
        whole(cfg, key)
    whole(cfg, "max_pixels", PILLOW_MAX_PIXELS, " (Pillow refuses to open a larger image)")
    if cfg.max_concurrent_decodes is not None:
        whole(cfg, "max_concurrent_decodes", why=" (or null: one per CPU core)")
    if cfg.max_in_flight is not None:
        whole(cfg, "max_in_flight", why=" (or null: 4 per decode thread)")
    if float(cfg.batch_timeout) < 0:
        raise ConfigError(f"batch_timeout={cfg.batch_timeout} must be 0 or more seconds.")
    if not 0 < float(cfg.body_timeout_s) < math.inf:  # NaN too: a body must end some time
        raise ConfigError(f"body_timeout_s={cfg.body_timeout_s} must be a number of seconds above 0.")


def limits(cfg: DictConfig) -> Limits:
    """What one request may make the server read, parse and decode."""
    from transferkit.serving import Limits  # needs FastAPI

    decodes = cfg.max_concurrent_decodes
    return Limits(
        max_bytes=int(cfg.max_bytes),
        max_parts=int(cfg.max_parts),
        max_pixels=int(cfg.max_pixels),
        **({} if decodes is None else {"max_concurrent_decodes": int(decodes)}),
        max_in_flight=None if cfg.max_in_flight is None else int(cfg.max_in_flight),
        body_timeout_s=float(cfg.body_timeout_s),
    )


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

    predictor = load_predictor(cfg.ckpt_path, cfg.device, cfg.precision, cfg.runtime, cfg.runtime_dir)
    app = build_app(
        predictor,
        cfg.ckpt_path,
        top_k=int(cfg.top_k),
        max_batch_size=int(cfg.max_batch_size),
        batch_timeout=float(cfg.batch_timeout),
        workers=int(cfg.workers),
        limits=limits(cfg),
    )
    sock = bind(str(cfg.host), int(cfg.port))
    log.info(
        "Serving %s (%d classes, %s, %s) on http://%s:%d: POST /predict, GET /health, GET /info",
        cfg.ckpt_path,
        len(predictor.class_names),
        predictor.device,
        predictor.runtime,
        cfg.host,
        cfg.port,
    )
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=int(cfg.graceful_s))
    uvicorn.Server(config).run(sockets=[sock])  # SIGTERM: stop accepting, answer what is in flight
    log.info("Server stopped.")


@exit_on_user_error
def main(cfg: DictConfig) -> None:
    check_config(cfg)
    serve(cfg)
