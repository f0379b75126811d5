"""Load-test a running `serve.py` on this machine: concurrent POST /predict with real image files,
bounded in requests and seconds; prints throughput, p50/p95/p99 latency and errors.

    python scripts/load_test.py --images data/demo/val --concurrency 16 --requests 400 --seconds 60

With --model (no server), it times the model alone on the same images at batch 1 and at
--batch-size: the ratio is the most dynamic batching can gain on this machine, since a server
batching perfectly still runs that model.

    python scripts/load_test.py --images data/demo/val --model best.ckpt --batch-size 16
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

LOCAL = ("127.0.0.1", "localhost", "::1")
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost: never via a proxy
SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def image_files(root: Path) -> list[bytes]:
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES)
    if not paths:
        sys.exit(f"No images under {root}.")
    return [p.read_bytes() for p in paths[:256]]


def run(url: str, images: list[bytes], concurrency: int, requests: int, seconds: float) -> dict:
    """Send up to `requests` requests from `concurrency` threads, stopping after `seconds`."""
    counter, lock = itertools.count(), threading.Lock()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    deadline = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < deadline:
            with lock:
                n = next(counter)
            if n >= requests:
                return
            request = urllib.request.Request(
                url, data=images[n % len(images)], headers={"Content-Type": "application/octet-stream"}
            )
            started = time.perf_counter()
            try:
                with DIRECT.open(request, timeout=max(1.0, deadline - time.monotonic())) as response:
                    json.loads(response.read())
                with lock:
                    latencies.append(time.perf_counter() - started)
            except urllib.error.HTTPError as error:
                with lock:
                    errors[f"HTTP {error.code}"] += 1
            except (OSError, ValueError) as error:
                with lock:
                    errors[f"{type(error).__name__}: {getattr(error, 'reason', error)}"] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    q = (
        statistics.quantiles(latencies, n=100)
        if len(latencies) > 1
        else [latencies[0] if latencies else 0.0] * 99
    )
    return {
        "requests": len(latencies) + sum(errors.values()),
        "ok": len(latencies),
        "errors": dict(errors),
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(latencies) / wall, 1),
        "p50_ms": round(q[49] * 1000, 1),
        "p95_ms": round(q[94] * 1000, 1),
        "p99_ms": round(q[98] * 1000, 1),
    }


def model_alone(path: Path, images: list[bytes], batch_size: int, seconds: float) -> dict:
    """Images per second of the model's forward pass alone (predict.py's predictor, decoded and
    preprocessed images) at batch 1 and at `batch_size`, each for about `seconds` / 2."""
    import io

    import torch

    from transferkit.data.images import decode_rgb
    from transferkit.inference import load_predictor

    predictor = load_predictor(path)
    transform = predictor.preprocessing.transforms(train=False)
    tensors = [transform(decode_rgb(io.BytesIO(data), "an image")) for data in images]
    rates = {}
    for size in (1, batch_size):
        batch = torch.stack([tensors[i % len(tensors)] for i in range(size)])
        predictor.logits(batch)  # warm-up
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 2 or done < 4 * size:
            predictor.logits(batch)
            done += size
        rates[size] = done / (time.perf_counter() - started)
    return {
        "batch_1_ips": round(rates[1], 1),
        f"batch_{batch_size}_ips": round(rates[batch_size], 1),
        "ratio": round(rates[batch_size] / rates[1], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, required=True, help="an image or a folder of them")
    parser.add_argument("--host", default="127.0.0.1", help="this machine only: 127.0.0.1, localhost or ::1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400, help="at most this many requests")
    parser.add_argument("--seconds", type=float, default=60.0, help="and for at most this long")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line")
    parser.add_argument("--model", type=Path, help="no server: time this checkpoint or model.onnx alone")
    parser.add_argument("--batch-size", type=int, default=16, help="with --model: the batch to compare to 1")
    args = parser.parse_args()
    if args.model is not None:
        alone = model_alone(args.model, image_files(args.images), args.batch_size, min(args.seconds, 20.0))
        print(
            json.dumps(alone)
            if args.json
            else (
                f"model alone: {alone['batch_1_ips']} images/s at batch 1, "
                f"{alone[f'batch_{args.batch_size}_ips']} at batch {args.batch_size}: {alone['ratio']}x"
            )
        )
        return
    if args.host not in LOCAL:
        sys.exit(f"--host={args.host}: the load test only targets this machine ({', '.join(LOCAL)}).")
    host = f"[{args.host}]" if ":" in args.host else args.host
    results = run(
        f"http://{host}:{args.port}/predict",
        image_files(args.images),
        args.concurrency,
        args.requests,
        args.seconds,
    )
    if args.json:
        print(json.dumps(results))
        return
    print(
        f"{results['ok']} ok of {results['requests']} requests in {results['wall_s']} s at concurrency "
        f"{args.concurrency}: {results['throughput_rps']} req/s, latency p50 {results['p50_ms']} ms, "
        f"p95 {results['p95_ms']} ms, p99 {results['p99_ms']} ms; errors: {results['errors'] or 'none'}"
    )


if __name__ == "__main__":
    main()
