"""The FastAPI app: POST /predict (an image, raw or multipart field `file`), GET /health and
GET /info. An image's probabilities are predict.py's: the same decode, preprocessing, model
and softmax (sigmoid for a multi-label model). The event loop only moves bytes: a body is read
within `max_bytes`, then parsed and decoded in a pool of `max_concurrent_decodes` threads, so no
request can hold up /health or the others, nor decode more at once than the pool allows."""

from __future__ import annotations

import asyncio
import io
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

import transferkit
from transferkit.data.images import decode_rgb
from transferkit.errors import DataError
from transferkit.inference import Predictions
from transferkit.serving.batcher import Batcher
from transferkit.serving.requests import (
    BadRequest,
    Limits,
    body_kind,
    check_length,
    check_pixels,
    image_bytes,
    read_body,
)


def answer(probs: torch.Tensor, predictor: Any, top_k: int) -> dict[str, Any]:
    """A single-label model's label, confidence and top-k; a multi-label model's labels at or
    above their thresholds, then every class's score."""
    names = predictor.class_names
    if predictor.multilabel:
        scores = [
            {"label": n, "prob": p, "threshold": t}
            for n, p, t in zip(names, probs.tolist(), predictor.thresholds.tolist(), strict=True)
        ]
        return {"labels": [s["label"] for s in scores if s["prob"] >= s["threshold"]], "scores": scores}
    top_p, top_i = probs.topk(min(top_k, len(names)))
    ranked = [{"label": names[i], "prob": p} for i, p in zip(top_i.tolist(), top_p.tolist(), strict=True)]
    return {"label": ranked[0]["label"], "confidence": ranked[0]["prob"], "top_k": ranked}


def model_info(predictor: Any, ckpt_path: str | Path, settings: dict[str, Any]) -> dict[str, Any]:
    path = Path(ckpt_path)
    return {
        "model": str(path.resolve()),
        "format": "onnx" if path.suffix == ".onnx" else "checkpoint",
        "classes": list(predictor.class_names),
        "multilabel": bool(predictor.multilabel),
        "preprocessing": asdict(predictor.preprocessing),
        "device": str(predictor.device),
        "version": transferkit.__version__,
        **settings,
    }


def build_app(
    predictor: Any,
    ckpt_path: str | Path,
    top_k: int = 5,
    max_batch_size: int = 16,
    batch_timeout: float = 0.01,
    workers: int = 1,
    limits: Limits | None = None,
) -> FastAPI:
    limits = limits or Limits()
    transform = predictor.preprocessing.transforms(train=False)
    batcher = Batcher(predictor, max_batch_size, batch_timeout, workers)
    decoders = ThreadPoolExecutor(limits.max_concurrent_decodes, thread_name_prefix="decode")
    settings = {"top_k": top_k, "max_batch_size": max_batch_size, "batch_timeout": batch_timeout}
    info = model_info(predictor, ckpt_path, {**settings, "workers": workers, **asdict(limits)})

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        yield
        await batcher.stop()
        decoders.shutdown(wait=True)

    app = FastAPI(title="transferkit", version=transferkit.__version__, lifespan=lifespan)

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, error: BadRequest) -> JSONResponse:
        """The answer ends the connection: the rest of a refused body is never read."""
        return JSONResponse({"error": str(error)}, status_code=error.status, headers={"Connection": "close"})

    def preprocess(content_type: str | None, body: bytes) -> torch.Tensor:
        """The model's input from a request's body, in a decode thread: the multipart parse, the
        pixel count from the header, then predict.py's decode and transform."""
        data = image_bytes(content_type, body, limits.max_parts)
        check_pixels(data, limits.max_pixels)
        try:
            return transform(decode_rgb(io.BytesIO(data), "in the request"))
        except DataError as error:
            reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error.__cause__ or error))
            raise BadRequest(400, f"The body is not an image that can be read ({reason}).") from None

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        content_type = request.headers.get("content-type")
        body_kind(content_type)
        check_length(request.headers.get("content-length"), limits.max_bytes)
        try:
            body = await read_body(request.stream(), limits.max_bytes)
        except ClientDisconnect:  # nobody to answer; not an error of the server's to log
            raise BadRequest(400, "The client closed the connection before the body ended.") from None
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(decoders, preprocess, content_type, body)
        logits = await batcher.logits(image)
        probs = Predictions([Path("request")], logits[None], [None], bool(predictor.multilabel)).probs[0]
        return answer(probs, predictor, top_k)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    async def model() -> dict[str, Any]:
        return info

    return app
