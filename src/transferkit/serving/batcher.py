"""Dynamic batching: requests wait up to `batch_timeout` seconds for others to share a forward
pass of at most `max_batch_size` images; up to `workers` batches run at once, in threads (torch
and onnxruntime release the GIL)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch


class Batcher:
    def __init__(self, predictor: Any, max_batch_size: int, batch_timeout: float, workers: int) -> None:
        self.predictor = predictor
        self.max_batch_size, self.batch_timeout = max_batch_size, batch_timeout
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference")
        self.slots = asyncio.Semaphore(workers)
        self.queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future]] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.pool.shutdown(wait=True)

    async def logits(self, image: torch.Tensor) -> torch.Tensor:
        """The model's logits for one preprocessed image (C, H, W), computed in a batch."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((image, future))
        return await future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.batch_timeout
            while len(batch) < self.max_batch_size:
                left = deadline - time.monotonic()
                try:
                    batch.append(
                        self.queue.get_nowait()
                        if left <= 0
                        else await asyncio.wait_for(self.queue.get(), left)
                    )
                except (asyncio.QueueEmpty, TimeoutError):
                    break
            await self.slots.acquire()
            loop.create_task(self._run(batch))

    async def _run(self, batch: list[tuple[torch.Tensor, asyncio.Future]]) -> None:
        try:
            images = torch.stack([image for image, _ in batch])
            out = await asyncio.get_running_loop().run_in_executor(self.pool, self.predictor.logits, images)
            for row, (_, future) in zip(out, batch, strict=True):
                if not future.done():
                    future.set_result(row)
        except Exception as error:  # noqa: BLE001 - every waiting request hears of it
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
        finally:
            self.slots.release()
