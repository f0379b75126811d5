"""serve.py: the server started as a subprocess on a free port and driven over HTTP: answers,
every bad input (and the server still up after it), parity with predict.py for a checkpoint and
its model.onnx, a bounded concurrent run, start-up failures, and a graceful SIGTERM."""

from __future__ import annotations

import io
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from conftest import EXPORTS, ROOT, compose_task

from transferkit.inference import load_predictor, predict_files

pytestmark = pytest.mark.slow
DIRECT = urllib.request.build_opener(
    urllib.request.ProxyHandler({})
)  # the dead test proxy is not for localhost


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, model: str, root: Path, *overrides: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "serve.py",
            f"ckpt_path={model}",
            f"port={self.port}",
            f"hydra.run.dir={root}",
            f"runtime_dir={EXPORTS}",
        ]
        self.process = subprocess.Popen(
            [*command, *overrides], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve.py exited: {self.process.stdout.read()}")
            try:
                if get(self.url + "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("serve.py did not answer /health in time")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)


def get(url: str) -> tuple[int, dict]:
    with DIRECT.open(url, timeout=30) as response:
        return response.status, json.loads(response.read())


def post(url: str, body: bytes, content_type: str | None = "application/octet-stream") -> tuple[int, dict]:
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(url + "/predict", data=body, headers=headers, method="POST")
    try:
        with DIRECT.open(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def multipart(field: str, data: bytes) -> tuple[bytes, str]:
    boundary = "transferkit-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def images(trained_run: dict) -> list[Path]:
    return sorted((Path(trained_run["data_root"]) / "val").rglob("*.png"))


def reference(model: str, paths: list[Path]) -> list[list[float]]:
    """predict.py's probabilities (its predictor, loop and softmax) for `paths`."""
    return predict_files(load_predictor(model, runtime_dir=EXPORTS), paths, batch_size=32).probs.tolist()


def assert_parity(server: Server, model: str, paths: list[Path]) -> None:
    expected = reference(model, paths)
    names = load_predictor(model, runtime_dir=EXPORTS).class_names
    for path, probs in zip(paths, expected, strict=True):
        status, body = post(server.url, path.read_bytes(), "image/png")
        assert status == 200, body
        assert len(body["top_k"]) == len(names)  # top_k=5 > 3 classes: all listed
        served = {r["label"]: r["prob"] for r in body["top_k"]}
        assert [served[n] for n in names] == pytest.approx(probs, abs=1e-5)
        assert body["label"] == names[max(range(len(probs)), key=probs.__getitem__)]


@pytest.fixture(scope="module")
def served(trained_run: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(trained_run["best_model_path"], tmp_path_factory.mktemp("serve"), "max_bytes=200000")
    server.wait_ready()
    yield server
    server.stop()


def test_predict_raw_and_multipart_match_predict_py(served: Server, trained_run: dict) -> None:
    paths = images(trained_run)
    assert_parity(served, trained_run["best_model_path"], paths)
    raw = post(served.url, paths[0].read_bytes())
    body, content_type = multipart("file", paths[0].read_bytes())
    assert post(served.url, body, content_type) == raw
    assert raw[1]["confidence"] == raw[1]["top_k"][0]["prob"]


def test_health_and_info(served: Server, trained_run: dict) -> None:
    assert get(served.url + "/health") == (200, {"status": "ok"})
    status, info = get(served.url + "/info")
    assert status == 200
    assert info["classes"] == trained_run["class_names"]
    assert info["format"] == "checkpoint"
    assert info["preprocessing"]["image_size"] == 32
    assert {"model", "version", "max_batch_size", "top_k"} <= set(info)
    assert info["max_in_flight"] == 4 * info["max_concurrent_decodes"]  # null: resolved, as in force
    assert info["body_timeout_s"] == 30


def test_bad_inputs_answer_4xx_and_the_server_stays_up(served: Server, trained_run: dict) -> None:
    good = images(trained_run)[0].read_bytes()
    jpeg = subprocess.run(  # a real JPEG, cut short
        [
            sys.executable,
            "-c",
            "import io,sys;from PIL import Image;b=io.BytesIO();"
            "Image.new('RGB',(64,64),'red').save(b,'JPEG');sys.stdout.buffer.write(b.getvalue())",
        ],
        capture_output=True,
        check=True,
    ).stdout
    file_missing, file_missing_type = multipart("image", good)
    cases = {
        "not an image": (
            b"hello, not an image",
            "application/octet-stream",
            400,
            "(cannot identify image file)",
        ),
        "empty body": (b"", "image/png", 400, "empty"),
        "too large": (b"\0" * 300_000, "image/png", 413, "over the limit"),
        "unsupported type": (b'{"a": 1}', "application/json", 415, "not supported"),
        "truncated jpeg": (jpeg[: len(jpeg) // 2], "image/jpeg", 400, "truncated"),
        "no file field": (file_missing, file_missing_type, 400, "field named file"),
    }
    for name, (body, content_type, status, words) in cases.items():
        got, answer = post(served.url, body, content_type)
        assert (got, list(answer)) == (status, ["error"]), name
        assert words in answer["error"].lower(), (name, answer)
        assert post(served.url, good)[0] == 200, f"not answered after {name}"


def test_load_test_script_runs_bounded_without_errors(served: Server, trained_run: dict) -> None:
    started = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            "scripts/load_test.py",
            f"--images={Path(trained_run['data_root']) / 'val'}",
            f"--port={served.port}",
            "--concurrency=8",
            "--requests=48",
            "--seconds=20",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    results = json.loads(out)
    assert (results["ok"], results["errors"]) == (48, {})
    assert results["p50_ms"] <= results["p95_ms"] <= results["p99_ms"]
    assert time.monotonic() - started < 25
    refused = subprocess.run(
        [sys.executable, "scripts/load_test.py", "--images=.", "--host=example.com"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "this machine" in refused.stderr


def test_onnx_parity_and_sigterm_with_a_request_in_flight(trained_run: dict, tmp_path: Path) -> None:
    from transferkit.tasks.export import export

    ckpt = trained_run["best_model_path"]
    onnx = export(compose_task("export", tmp_path / "export", [f"ckpt_path={ckpt}", "format=onnx"]))["model"]
    # A long batch window holds a lone request in the batcher: it is in flight when SIGTERM comes.
    server = Server(onnx, tmp_path / "serve", "batch_timeout=1.0", "max_batch_size=64")
    try:
        server.wait_ready()
        assert get(server.url + "/info")[1]["format"] == "onnx"
        assert_parity(server, onnx, images(trained_run)[:2])
        answered: list[tuple[int, dict]] = []
        thread = threading.Thread(
            target=lambda: answered.append(post(server.url, images(trained_run)[0].read_bytes()))
        )
        thread.start()
        time.sleep(0.4)
        server.process.send_signal(signal.SIGTERM)
        thread.join(30)
        assert answered and answered[0][0] == 200
        assert server.process.wait(30) == -signal.SIGTERM  # uvicorn re-raises the signal once all is answered
        assert "Traceback" not in server.process.stdout.read()
    finally:
        server.stop()


def test_a_model_that_cannot_be_served_fails_before_binding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """In process, as serve.py's main runs it: one line, exit code 2, and no socket was made."""
    from transferkit.tasks import serve

    bad = tmp_path / "not_a_model.ckpt"
    bad.write_text("nothing here")
    bound: list[tuple] = []
    monkeypatch.setattr(serve, "bind", lambda *args: bound.append(args))
    cfg = compose_task("serve", tmp_path, [f"ckpt_path={bad}", f"port={free_port()}"])
    with pytest.raises(SystemExit) as ended:
        serve.main(cfg)
    assert ended.value.code == 2 and bound == []
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "not_a_model.ckpt" in errors[0], errors


def test_a_multilabel_model_answers_every_label_at_or_above_its_threshold(tmp_path: Path) -> None:
    """In process (FastAPI's TestClient drives the same app serve.py runs): each class's score is
    predict.py's sigmoid, and the labels are those at or above the checkpoint's thresholds, set
    here between the scores so that the images get different labels."""
    import torch
    from conftest import TINY_MODEL, make_label_file
    from fastapi.testclient import TestClient

    from transferkit.inference import ModelInfo, TorchPredictor
    from transferkit.model.module import TransferModule
    from transferkit.serving import build_app

    make_label_file(tmp_path, multilabel=True, splits={"val": 4})
    paths = sorted((tmp_path / "images").glob("val_*.png"))
    torch.manual_seed(0)
    classes = ["circle", "square", "triangle"]
    model = TransferModule(
        TINY_MODEL, classes, weights=None, multilabel=True, preprocessing={"image_size": 32}
    )
    predictor = TorchPredictor(model, ModelInfo.of(model), torch.device("cpu"), torch.float32)
    probs = predict_files(predictor, paths, batch_size=32).probs
    middle = probs.median(dim=0).values
    model.thresholds.copy_(middle)
    predictor.thresholds = middle.clone()
    expected = [[c for c, p, t in zip(classes, row, middle, strict=True) if p >= t] for row in probs.tolist()]
    assert len({tuple(labels) for labels in expected}) > 1  # the thresholds split the images

    with TestClient(build_app(predictor, tmp_path / "model.ckpt")) as client:
        assert client.get("/info").json()["multilabel"] is True
        for path, row, labels in zip(paths, probs.tolist(), expected, strict=True):
            response = client.post(
                "/predict", content=path.read_bytes(), headers={"Content-Type": "image/png"}
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["labels"] == labels
            assert [s["label"] for s in body["scores"]] == classes
            assert [s["prob"] for s in body["scores"]] == pytest.approx(row, abs=1e-5)
            assert [s["threshold"] for s in body["scores"]] == pytest.approx(middle.tolist())


def test_load_test_times_the_model_alone_at_batch_1_and_at_the_batch_size(trained_run: dict) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("load_test", ROOT / "scripts" / "load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    files = load_test.image_files(Path(trained_run["data_root"]) / "val")
    alone = load_test.model_alone(Path(trained_run["best_model_path"]), files, batch_size=4, seconds=0.2)
    assert alone["batch_1_ips"] > 0 and alone["batch_4_ips"] > 0
    assert alone["ratio"] == pytest.approx(alone["batch_4_ips"] / alone["batch_1_ips"], rel=0.03)


def test_the_multipart_parser_finds_the_file_field_within_max_parts() -> None:
    """In process: a preamble, a part without headers and other fields are passed over; more
    than max_parts parts, or a body cut before its last delimiter, is refused."""
    from transferkit.serving.requests import BadRequest, multipart_file

    kind = "multipart/form-data; boundary=xyz"

    def part(headers: str, content: bytes) -> bytes:
        return f"--xyz\r\n{headers}\r\n".encode() + content + b"\r\n"

    note = part('Content-Disposition: form-data; name="note"\r\n', b"hi")
    image = part('Content-Disposition: form-data; name="file"; filename="a.png"\r\n', b"PNG--xy\r\n-")
    body = b"preamble\r\n" + part("", b"no headers") + note + image + b"--xyz--\r\n"
    assert multipart_file(kind, body, max_parts=3) == b"PNG--xy\r\n-"
    for cut, status, words in [
        (lambda b: b, 413, "more than 2 parts"),
        (lambda b: b[: b.rindex(b"\r\n--xyz--")], 400, "could not be parsed"),
        (lambda b: b.replace(b"--xyz\r\n", b"--xyzz\r\n"), 400, "could not be parsed"),
    ]:
        with pytest.raises(BadRequest) as refused:
            multipart_file(kind, cut(body), max_parts=2 if status == 413 else 3)
        assert refused.value.status == status and words in str(refused.value)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("max_parts=0", "max_parts=0 must be 1 or more."),
        ("max_pixels=200000000", "max_pixels=200000000 must be from 1 to 178956970"),
        ("max_concurrent_decodes=0", "max_concurrent_decodes=0 must be 1 or more (or null"),
        ("max_in_flight=0", "max_in_flight=0 must be 1 or more (or null: 4 per decode thread)."),
        ("body_timeout_s=0", "body_timeout_s=0 must be a number of seconds above 0."),
        ("body_timeout_s=inf", "body_timeout_s=inf must be a number of seconds above 0."),
        ("max_parts=abc", "max_parts=abc"),  # by type (tasks/settings.py), or else as no whole number
    ],
)
def test_a_limit_that_cannot_work_is_refused_before_binding(
    override: str,
    words: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from transferkit.tasks import serve

    bound: list[tuple] = []
    monkeypatch.setattr(serve, "bind", lambda *args: bound.append(args))
    cfg = compose_task("serve", tmp_path, [f"ckpt_path={tmp_path / 'model.ckpt'}", override])
    with pytest.raises(SystemExit) as ended:
        serve.main(cfg)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert ended.value.code == 2 and bound == [] and len(errors) == 1, errors
    assert errors[0].startswith(words), errors


@contextmanager
def in_process(tmp_path: Path, **limits: Any) -> Iterator[Any]:
    """FastAPI's TestClient on the app serve.py runs, with a tiny untrained model and `limits`."""
    import torch
    from conftest import TINY_MODEL
    from fastapi.testclient import TestClient

    from transferkit.inference import ModelInfo, TorchPredictor
    from transferkit.model.module import TransferModule
    from transferkit.serving import Limits, build_app

    model = TransferModule(TINY_MODEL, ["a", "b", "c"], weights=None, preprocessing={"image_size": 32})
    predictor = TorchPredictor(model, ModelInfo.of(model), torch.device("cpu"), torch.float32)
    with TestClient(build_app(predictor, tmp_path / "model.ckpt", limits=Limits(**limits))) as client:
        yield client


def saved(image: Any, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def lying_icns(side: int, mode: str = "1") -> bytes:
    """An ICNS whose icon table says 512x512 (what Pillow reports before decoding) around a PNG of
    side x side pixels (what Pillow decodes)."""
    from PIL import Image

    png = saved(Image.new(mode, (side, side)), "PNG")
    entry = b"ic09" + struct.pack(">I", 8 + len(png)) + png
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\n%%EOF\n"
ALLOWED = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def test_a_format_off_the_allow_list_is_refused_unopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ICNS (whose header reports its icon table's 512x512 while it decodes a PNG of any size)
    and an EPS (which Pillow hands to Ghostscript) are refused with 415 naming what is allowed,
    and no plugin but the allowed ones ever sees the bytes."""
    from PIL import Image

    icns = lying_icns(1200)
    with Image.open(io.BytesIO(icns)) as image:
        assert image.size == (512, 512)  # what a pixel check from the header would see
    Image.init()
    opened: list[str] = []
    for name, (factory, accept) in list(Image.OPEN.items()):
        if name not in ALLOWED:

            def spy(*args: Any, name: str = name, factory: Any = factory) -> Any:
                opened.append(name)
                return factory(*args)

            monkeypatch.setitem(Image.OPEN, name, (spy, accept))
    with in_process(tmp_path, max_pixels=1_000_000) as client:
        for fmt, data in [("ICNS", icns), ("EPS", EPS)]:
            response = client.post("/predict", content=data, headers={"Content-Type": "image/png"})
            assert response.status_code == 415, (fmt, response.text)
            error = response.json()["error"]
            assert fmt in error and all(allowed in error for allowed in ALLOWED), error
            assert "\n" not in error
        assert opened == []
        response = client.post("/predict", content=b"hello, not an image", headers={})
        assert response.status_code == 400 and "cannot identify image file" in response.json()["error"]


def test_only_the_first_frame_is_checked_and_decoded(tmp_path: Path) -> None:
    """A multi-page TIFF is its first page: a small first page before a page over max_pixels is
    answered, a first page over it refused by its own size; a GIF whose first frame reaches past
    its logical screen is checked at the frame's size; animations and an MPO decode as
    predict.py's decode_rgb decodes them (their first frame)."""
    from PIL import Image

    from transferkit.data.images import decode_rgb
    from transferkit.serving.images import read_image

    small, large = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (1200, 1200), "blue")
    small_first = saved(small, "TIFF", save_all=True, append_images=[large])
    large_first = saved(large, "TIFF", save_all=True, append_images=[small])
    gif = bytearray(saved(large, "GIF"))
    gif[6:10] = struct.pack("<HH", 10, 10)  # a 10x10 logical screen
    with in_process(tmp_path, max_pixels=1_000_000) as client:
        headers = {"Content-Type": "image/tiff"}
        assert client.post("/predict", content=small_first, headers=headers).status_code == 200
        for data in (large_first, bytes(gif)):
            response = client.post("/predict", content=data, headers=headers)
            assert response.status_code == 413 and "1200x1200" in response.json()["error"], response.text
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "green")]
    for fmt in ("GIF", "WEBP", "PNG", "TIFF", "MPO"):
        data = saved(frames[0], fmt, save_all=True, append_images=frames[1:])
        served = read_image(data, max_pixels=10_000)
        assert served.tobytes() == decode_rgb(io.BytesIO(data), fmt).tobytes(), fmt


def parse_seconds(body: bytes, content_type: str = "multipart/form-data; boundary=b") -> float:
    """The least time of five that multipart_file takes on `body`, answered or refused."""
    from transferkit.serving.requests import BadRequest, multipart_file

    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        with suppress(BadRequest):
            multipart_file(content_type, body, max_parts=16)
        best = min(best, time.perf_counter() - started)
    return best


def form(disposition: str, content: bytes, parts: int = 16) -> bytes:
    part = f"--b\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return part * parts + b"--b--\r\n"


def test_the_multipart_parse_is_linear_in_its_headers() -> None:
    """Sixteen parts whose Content-Disposition holds thousands of ';' inside quotes (once 0.7 s of
    CPU: email.message re-counted the quotes from the start for each ';') parse no more than 20x
    slower than a benign body of the same size; a header line over 1 KB is refused."""
    from transferkit.serving.requests import BadRequest, boundary_of, multipart_file

    hostile = form('form-data; name="x"; filename="' + ";" * 8000 + '"', b"x")
    benign = form('form-data; name="x"; filename="a.png"', b"x" * 7996)
    assert abs(len(hostile) - len(benign)) < 100
    with pytest.raises(BadRequest) as refused:
        multipart_file("multipart/form-data; boundary=b", hostile, max_parts=16)
    assert refused.value.status == 400 and "1024" in str(refused.value)
    within = form('form-data; filename="' + ";" * 950 + '"; name="file"', b"x" * 7048)
    assert abs(len(within) - len(benign)) < 100
    assert multipart_file("multipart/form-data; boundary=b", within, max_parts=16) == b"x" * 7048
    for body in (hostile, within):
        assert parse_seconds(body) <= max(20 * parse_seconds(benign), 0.001), parse_seconds(body)
    quoted = 'multipart/form-data; x="' + ";" * 950 + '"; boundary=b'
    assert boundary_of(quoted) == b"b"
    assert parse_seconds(benign, quoted) <= 20 * parse_seconds(benign)
    with pytest.raises(BadRequest) as refused:
        boundary_of('multipart/form-data; x="' + ";" * 8000 + '"; boundary=b')
    assert refused.value.status == 431 and "1024" in str(refused.value)
