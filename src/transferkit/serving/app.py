"""The FastAPI app: POST /predict (an image, raw or multipart field `file`), GET /health and
GET /info. An image's probabilities are predict.py's: the same decode, preprocessing, model
and softmax (sigmoid for a multi-label model). The event loop only moves bytes: a body is read
within `max_bytes` and `body_timeout_s`, then parsed and decoded in a pool of
`max_concurrent_decodes` threads, so no request can hold up /health or the others, nor decode
more at once than the pool allows; past `max_in_flight` requests a new one is refused unread, so
the bodies held (read, waiting or decoding) take at most max_in_flight x max_bytes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

import transferkit
from transferkit.inference import Predictions
from transferkit.serving.batcher import Batcher
from transferkit.serving.images import read_image
from transferkit.serving.requests import BadRequest, Limits, body_kind, check_length, image_bytes, read_body

RETRY_AFTER_S = 1  # what a client refused for a full server is told to wait


class InFlight:
    """The /predict requests between arrival and answer. Each may hold a body of up to max_bytes
    (while it is read, waits for a decode thread, decodes), so past `limit` a new one is refused
    before its body is read. Counted on the event loop alone, so no lock."""

    def __init__(self, limit: int) -> None:
        self.limit, self.count = limit, 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        if self.count >= self.limit:
            raise BadRequest(
                503,
                f"The server is busy: {self.count} requests are in flight, the limit (max_in_flight); "
                f"retry after {RETRY_AFTER_S} s.",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1


async def read_in_time(request: Request, limits: Limits) -> bytes:
    """The body within max_bytes and body_timeout_s: a client that sends it slowly, or not at
    all, holds its slot no longer than that."""
    try:
        return await asyncio.wait_for(read_body(request.stream(), limits.max_bytes), limits.body_timeout_s)
    except TimeoutError:
        raise BadRequest(
            408,
            f"The body did not arrive within {limits.body_timeout_s:g} s (body_timeout_s); "
            "the rest was not read.",
        ) from None
    except ClientDisconnect:  # nobody to answer; not an error of the server's to log
        raise BadRequest(400, "The client closed the connection before the body ended.") from None


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
        "runtime": predictor.runtime,
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
    in_flight = InFlight(limits.max_in_flight)
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
        headers = {"Connection": "close", **error.headers}
        return JSONResponse({"error": str(error)}, status_code=error.status, headers=headers)

    def preprocess(content_type: str | None, body: bytes) -> torch.Tensor:
        """The model's input from a request's body, in a decode thread: the multipart parse, the
        format and pixel count from the header, then predict.py's decode and transform."""
        return transform(read_image(image_bytes(content_type, body, limits.max_parts), limits.max_pixels))

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        with in_flight.slot():
            content_type = request.headers.get("content-type")
            body_kind(content_type)
            check_length(request.headers.get("content-length"), limits.max_bytes)
            body = await read_in_time(request, limits)
            loop = asyncio.get_running_loop()
            image = await loop.run_in_executor(decoders, preprocess, content_type, body)
            del body  # the decoded image is what waits for a batch
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
