"""serve.py under a hostile client: the real server (serve.py in a subprocess on 127.0.0.1) meets
each attack that used to freeze it or run it out of memory, and must answer a 4xx, keep its peak
memory within IDLE_MARGIN_MB of its idle size, and answer GET /health within HEALTH_S meanwhile.
Every attack is bounded in bytes sent and in seconds; nothing leaves this machine."""

from __future__ import annotations

import http.client
import io
import select
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_serve import DIRECT, Server, images, lying_icns

pytestmark = pytest.mark.slow

IDLE_MARGIN_MB = 200  # the most an attack may add to the server's idle memory
HEALTH_S = 1.0  # the longest GET /health may take while an attack runs
STREAM_BYTES = 300_000_000  # what the chunked attack would send if it were let
MAX_BYTES = 10_000_000  # conf/serve.yaml's max_bytes, which the server runs with


def status_kb(pid: int, key: str) -> int:
    """A line of /proc/<pid>/status (VmRSS, VmHWM), in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {key}")


@dataclass
class Watch:
    """What one attack did to the server: its peak memory over idle, and /health's slowest answer."""

    name: str
    seconds: float = 0.0
    idle_mb: float = 0.0
    peak_mb: float = 0.0
    health_s: list[float] = field(default_factory=list)

    @property
    def worst_health_s(self) -> float:
        return max(self.health_s, default=float("inf"))


def probe_health(url: str, stop: threading.Event, latencies: list[float]) -> None:
    """GET /health every 50 ms until `stop`; a request that fails or times out counts as 2 s+."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            with DIRECT.open(url + "/health", timeout=2) as response:
                response.read()
            latencies.append(time.monotonic() - started)
        except OSError:
            latencies.append(max(2.0, time.monotonic() - started))
        stop.wait(0.05)


@contextmanager
def watched(server: Server, name: str) -> Iterator[Watch]:
    """Reset the server's memory high-water mark, probe /health from another thread while the
    block runs, then record the peak over idle and print one line of what was measured."""
    pid = server.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM back to the current RSS
    watch = Watch(name, idle_mb=status_kb(pid, "VmRSS") / 1024)
    stop = threading.Event()
    prober = threading.Thread(target=probe_health, args=(server.url, stop, watch.health_s))
    prober.start()
    started = time.monotonic()
    try:
        yield watch
    finally:
        watch.seconds = time.monotonic() - started
        time.sleep(0.2)  # a few probes more, however fast the attack was refused
        stop.set()
        prober.join(5)
        watch.peak_mb = status_kb(pid, "VmHWM") / 1024 - watch.idle_mb
        print(
            f"\n{name}: {watch.seconds:.2f} s; idle {watch.idle_mb:.0f} MB, peak +{watch.peak_mb:.0f} MB, "
            f"/health at worst {watch.worst_health_s * 1000:.0f} ms over {len(watch.health_s)} probes"
        )


def assert_within_bounds(watch: Watch) -> None:
    assert watch.peak_mb <= IDLE_MARGIN_MB, f"{watch.name}: peak memory +{watch.peak_mb:.0f} MB"
    assert watch.worst_health_s <= HEALTH_S, f"{watch.name}: /health took {watch.worst_health_s:.2f} s"


def post(server: Server, body: bytes, content_type: str, timeout: float = 10) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        connection.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def many_parts(count: int) -> tuple[bytes, str]:
    """A multipart body of `count` one-byte fields (none named file), about 54 bytes a part."""
    part = b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n'
    return part * count + b"--b--\r\n", "multipart/form-data; boundary=b"


def stream_chunked(port: int, pieces: Iterable[bytes]) -> tuple[int, int]:
    """POST `pieces` with Transfer-Encoding: chunked, stopping as soon as the server answers or
    cuts the connection: the status it answered and how many bytes were sent."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        try:
            for piece in pieces:
                if select.select([sock], [], [], 0)[0]:  # answered already
                    break
                sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
                sent += len(piece)
            else:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # cut off: the answer came before, and is waiting to be read
        answer = b""
        try:
            while b"\r\n" not in answer and (data := sock.recv(4096)):
                answer += data
        except ConnectionResetError:
            pass
    status = int(answer.split(b" ")[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, sent


def pixel_bomb(side: int = 13_000) -> bytes:
    """A 1-bit PNG of side x side pixels: about 100 kB that would decode to gigabytes."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("1", (side, side)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def server(trained_run: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """serve.py with conf/serve.yaml's own limits: what a user who sets nothing gets."""
    server = Server(trained_run["best_model_path"], tmp_path_factory.mktemp("abuse"))
    server.wait_ready()
    yield server
    server.stop()
    assert "Traceback" not in server.process.stdout.read()


def test_many_multipart_parts_are_refused_without_freezing_the_server(server: Server) -> None:
    body, content_type = many_parts(150_000)
    assert len(body) < MAX_BYTES  # under max_bytes: only the parts are too many
    with watched(server, "150,000-part multipart") as watch:
        status, answer = post(server, body, content_type)
    assert status == 413 and "max_parts" in answer, (status, answer)
    assert_within_bounds(watch)


def test_a_chunked_stream_is_cut_off_at_max_bytes(server: Server, trained_run: dict) -> None:
    megabyte = b"\0" * 1_000_000
    with watched(server, "300 MB chunked stream") as watch:
        status, sent = stream_chunked(server.port, (megabyte for _ in range(STREAM_BYTES // len(megabyte))))
    print(f"chunked stream: {status} after {sent / 1e6:.0f} MB sent")
    assert status == 413, status
    assert sent < MAX_BYTES + 40_000_000, f"the server read {sent} bytes of the stream"
    assert_within_bounds(watch)
    image = images(trained_run)[0].read_bytes()
    assert stream_chunked(server.port, [image[:100], image[100:]])[0] == 200  # chunked is welcome
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:  # hangs up mid-body
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n" + image[:10]
        )
    assert post(server, image, "image/png")[0] == 200  # and no traceback in the log (the fixture)


def test_a_decompression_bomb_is_refused_from_its_header(server: Server, trained_run: dict) -> None:
    bomb = pixel_bomb()
    assert len(bomb) < 200_000
    with watched(server, "13000x13000 PNG") as watch:
        status, answer = post(server, bomb, "image/png")
    assert status == 413 and "13000x13000" in answer and "max_pixels" in answer, (status, answer)
    assert_within_bounds(watch)
    assert post(server, images(trained_run)[0].read_bytes(), "image/png")[0] == 200  # still up


def test_a_format_whose_header_lies_is_refused_undecoded(server: Server, trained_run: dict) -> None:
    """An ICNS reports its icon table's size (512x512) but decodes the PNG inside, of any size."""
    icns = lying_icns(6000, "RGBA")
    assert len(icns) < 200_000
    with watched(server, "ICNS around a 6000x6000 RGBA PNG") as watch:
        status, answer = post(server, icns, "image/png")
    assert status == 415 and "ICNS" in answer, (status, answer)
    assert_within_bounds(watch)
    assert post(server, images(trained_run)[0].read_bytes(), "image/png")[0] == 200  # still up


def slow_upload(port: int, declared: int = 9_900_000) -> socket.socket:
    """A POST that declares `declared` bytes and sends its headers and 1 kB of them, then stalls."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
        b"Content-Length: %d\r\n\r\n" % declared + b"\0" * 1000
    )
    return sock


def answer_of(sock: socket.socket) -> tuple[int, bytes]:
    """The status and whole answer the server sent on `sock`, which it then closes (0 if it closed
    without one); a server that never answers raises TimeoutError after the socket's 5 s."""
    answer = b""
    try:
        while data := sock.recv(4096):
            answer += data
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    status = int(answer.split(b" ")[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, answer


def test_slow_uploads_are_bounded_in_number_and_in_time(trained_run: dict, tmp_path: Path) -> None:
    """max_in_flight=2: of five stalled uploads two are let in and three refused at once (503,
    Retry-After, their bodies unread); the two are cut off at body_timeout_s (408). An image sent
    after is answered, and /health answers throughout."""
    server = Server(trained_run["best_model_path"], tmp_path, "max_in_flight=2", "body_timeout_s=1")
    held: list[socket.socket] = []
    try:
        server.wait_ready()
        with watched(server, "5 stalled uploads, max_in_flight=2") as watch:
            held_at = time.monotonic()
            held += [slow_upload(server.port) for _ in range(2)]
            time.sleep(0.3)  # both are in the handler, reading their bodies
            started = time.monotonic()
            refused = [answer_of(slow_upload(server.port)) for _ in range(3)]
            refused_s = time.monotonic() - started
            cut = [answer_of(sock) for sock in held]
            cut_s = time.monotonic() - held_at
        assert [status for status, _ in refused] == [503] * 3, refused
        assert all(b"retry-after: 1\r\n" in head.lower() and b"max_in_flight" in head for _, head in refused)
        assert refused_s < 1.0, f"refusing took {refused_s:.2f} s"
        assert [status for status, _ in cut] == [408] * 2, cut
        assert all(b"body_timeout_s" in head for _, head in cut)
        assert 0.9 <= cut_s < 3.0, f"the stalled uploads were cut after {cut_s:.2f} s"
        assert_within_bounds(watch)
        assert post(server, images(trained_run)[0].read_bytes(), "image/png")[0] == 200
    finally:
        for sock in held:
            sock.close()
        server.stop()
    assert "Traceback" not in server.process.stdout.read()


@pytest.mark.parametrize("allowed", [1, 2])
def test_no_more_than_max_concurrent_decodes_images_decode_at_once(
    allowed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process: four images sent at once, each decode held 0.2 s; the most that ever ran at
    once is the limit (the others waited their turn and were answered, not refused)."""
    import torch
    from conftest import TINY_MODEL, make_image_folder
    from fastapi.testclient import TestClient

    from transferkit.inference import ModelInfo, TorchPredictor
    from transferkit.model.module import TransferModule
    from transferkit.serving import Limits, build_app
    from transferkit.serving import images as serving_images

    running, most, lock = [0], [0], threading.Lock()
    decode = serving_images.decode

    def slow_decode(*args: object) -> object:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return decode(*args)

    monkeypatch.setattr(serving_images, "decode", slow_decode)
    image = next((make_image_folder(tmp_path, splits={"val": 1}) / "val").rglob("*.png")).read_bytes()
    model = TransferModule(TINY_MODEL, ["a", "b", "c"], weights=None, preprocessing={"image_size": 32})
    predictor = TorchPredictor(model, ModelInfo.of(model), torch.device("cpu"), torch.float32)
    limits = Limits(max_concurrent_decodes=allowed)
    with TestClient(build_app(predictor, tmp_path / "model.ckpt", limits=limits)) as client:
        assert client.get("/info").json()["max_concurrent_decodes"] == allowed
        statuses: list[int] = []

        def send() -> None:
            headers = {"Content-Type": "image/png"}
            statuses.append(client.post("/predict", content=image, headers=headers).status_code)

        senders = [threading.Thread(target=send) for _ in range(4)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(30)
    assert statuses == [200] * 4 and most[0] == allowed
