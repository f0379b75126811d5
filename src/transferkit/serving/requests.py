"""An HTTP request's image: the raw body or the multipart field `file`, read within the limits a
client cannot pass (bytes, parts, pixels) and checked for what a client can get wrong (content
type, emptiness, bytes that are no image). A hostile client must cost the server no more than
these limits allow: nothing is read, parsed or decoded past them."""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from email.message import Message

from PIL import Image

IMAGE_TYPES = ("image/", "application/octet-stream")
PART_HEADERS_BYTES = 8192  # a part's headers (Content-Disposition, Content-Type) take a few hundred


def cpu_cores() -> int:
    """The cores this process may run on (a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Limits:
    """What one request may make the server read, parse and decode (docs/serving.md#limits)."""

    max_bytes: int = 10_000_000
    max_parts: int = 16
    max_pixels: int = 40_000_000
    max_concurrent_decodes: int = field(default_factory=cpu_cores)


class BadRequest(Exception):
    """A client's mistake: answered with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def body_kind(content_type: str | None) -> str:
    """`multipart/form-data` or `raw`, from the header alone, so a body of a type that cannot be
    an image is refused before it is read."""
    kind = (content_type or "application/octet-stream").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return "multipart"
    if kind.startswith(IMAGE_TYPES):
        return "raw"
    raise BadRequest(
        415,
        f"Content type {kind} is not supported; send the image as the raw body "
        "(image/* or application/octet-stream) or as multipart/form-data with a field named file.",
    )


def check_length(content_length: str | None, max_bytes: int) -> None:
    """Refuse a body over `max_bytes` from its header, before reading it."""
    if content_length is not None and content_length.isdigit() and int(content_length) > max_bytes:
        raise BadRequest(
            413, f"The body is {int(content_length)} bytes, over the limit of {max_bytes} (max_bytes)."
        )


async def read_body(chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """The body, read chunk by chunk and refused as soon as it passes `max_bytes`: a chunked
    upload has no Content-Length to refuse it by, and the rest of it is never read."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise BadRequest(
                413, f"The body is over the limit of {max_bytes} bytes (max_bytes); the rest was not read."
            )
    return bytes(body)


def unparsable() -> BadRequest:
    return BadRequest(400, "The multipart body could not be parsed; send the image in a field named file.")


def boundary_of(content_type: str) -> bytes:
    """The multipart boundary of a Content-Type header (1 to 70 characters, RFC 2046)."""
    message = Message()
    message["content-type"] = content_type
    boundary = message.get_boundary()
    if not boundary or len(boundary) > 70:
        raise unparsable()
    return boundary.encode("latin-1")


def form_parts(body: bytes, boundary: bytes, max_parts: int) -> Iterator[tuple[int, int]]:
    """The (start, end) of each part of a multipart body: found with bytes.find, so a body of
    many tiny parts costs no Python loop per byte, and refused past `max_parts` parts."""
    dash = b"--" + boundary
    if body.startswith(dash):
        at = 0
    else:  # after a preamble
        at = body.find(b"\r\n" + dash)
        if at < 0:
            raise unparsable()
        at += 2
    count = 0
    while True:
        at += len(dash)
        if body.startswith(b"--", at):  # the close delimiter
            return
        line_end = body.find(b"\r\n", at, at + 1024)
        if line_end < 0 or body[at:line_end].strip(b" \t"):  # only padding may follow a delimiter
            raise unparsable()
        end = body.find(b"\r\n" + dash, line_end + 2)
        if end < 0:  # no delimiter closes the part: the body was cut short
            raise unparsable()
        count += 1
        if count > max_parts:
            raise BadRequest(
                413,
                f"The multipart body has more than {max_parts} parts, the limit (max_parts); "
                "send the image alone in a field named file.",
            )
        yield line_end + 2, end
        at = end + 2


def field_name(headers: bytes) -> str | None:
    """The `name` of a part's Content-Disposition header, if it has one."""
    for line in headers.decode("latin-1").split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-disposition":
            message = Message()
            message["content-disposition"] = value.strip()
            name = message.get_param("name", header="content-disposition")
            return name if isinstance(name, str) else None
    return None


def multipart_file(content_type: str, body: bytes, max_parts: int) -> bytes:
    """The bytes of the form field `file`; every part is counted, so a body of more than
    `max_parts` parts is refused wherever its file is."""
    found = None
    for start, end in form_parts(body, boundary_of(content_type), max_parts):
        if body.startswith(b"\r\n", start):  # a part with no headers
            continue
        headers_end = body.find(b"\r\n\r\n", start, min(end, start + PART_HEADERS_BYTES))
        if headers_end < 0:
            raise unparsable()
        if found is None and field_name(body[start:headers_end]) == "file":
            found = body[headers_end + 4 : end]
    if found is None:
        raise BadRequest(
            400, "The multipart body has no field named file; send the image as file=@image.jpg."
        )
    return found


def image_bytes(content_type: str | None, body: bytes, max_parts: int) -> bytes:
    """The image's bytes from a request with `content_type` and `body` (read within max_bytes);
    BadRequest when there are none, too many parts, or a type that cannot be an image."""
    data = (
        multipart_file(content_type or "", body, max_parts)
        if body_kind(content_type) == "multipart"
        else body
    )
    if not data:
        raise BadRequest(400, "The request has no image: the body (or its file field) is empty.")
    return data


def check_pixels(data: bytes, max_pixels: int) -> None:
    """Refuse an image of more than `max_pixels` from its header, before anything is decoded: a
    small file (a PNG of one colour) can declare a size whose pixels take gigabytes."""
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
    except Image.DecompressionBombError:  # over Pillow's own limit, which max_pixels is under
        raise BadRequest(
            413, f"The image has more than {max_pixels} pixels, the limit (max_pixels)."
        ) from None
    except (OSError, ValueError, SyntaxError):
        return  # not an image: the decode says why, in predict.py's words
    if width * height > max_pixels:
        raise BadRequest(
            413,
            f"The image is {width}x{height} pixels ({width * height} in all), "
            f"over the limit of {max_pixels} (max_pixels).",
        )
