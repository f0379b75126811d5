"""An HTTP request's image bytes: the raw body or the multipart field `file`, read within the
limits a client cannot pass (bytes, parts, header lines, time) and checked for what a client can
get wrong (content type, emptiness). A hostile client must cost the server no more than these
limits allow: nothing is read or parsed past them, and every parse is linear in what it reads
(serving/images.py opens and decodes the image within max_pixels)."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

IMAGE_TYPES = ("image/", "application/octet-stream")
IN_FLIGHT_PER_DECODE = 4  # requests in flight per decode thread when max_in_flight is not set
PART_HEADERS_BYTES = 8192  # a part's headers (Content-Disposition, Content-Type) take a few hundred
HEADER_LINE_BYTES = 1024  # one of them, or the request's Content-Type: a browser's take under 200
# One `; key=value` of a header (RFC 9110 token, quoted string or bare value), matched where the
# last one ended: possessive, so a quote left open costs one scan to the end, never a backtrack.
PARAM = re.compile(
    r"""[ \t]*;[ \t]*(?:([!#$%&'*+.^_`|~0-9A-Za-z-]++)[ \t]*=[ \t]*"""
    r"""(?:"([^"\\]*+(?:\\.[^"\\]*+)*+)"|([^;"]*+)))?+[ \t]*+"""
)


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
    max_in_flight: int | None = None  # None: IN_FLIGHT_PER_DECODE per decode thread
    body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_in_flight is None:  # frozen: set once, here, so /info shows the number in force
            object.__setattr__(self, "max_in_flight", IN_FLIGHT_PER_DECODE * self.max_concurrent_decodes)


class BadRequest(Exception):
    """A request the server will not answer: with `status` and `{"error": message}` (a 4xx for a
    client's mistake, 503 while the server is full), and `headers` such as Retry-After."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def body_kind(content_type: str | None) -> str:
    """`multipart/form-data` or `raw`, from the header alone, so a body of a type that cannot be
    an image, or a Content-Type too long to parse cheaply, is refused before it is read."""
    if content_type is not None and len(content_type) > HEADER_LINE_BYTES:
        raise BadRequest(
            431, f"The Content-Type header is over {HEADER_LINE_BYTES} characters; send a shorter one."
        )
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


def header_params(value: str) -> dict[str, str]:
    """The parameters of a header's value (`form-data; name="file"` has name), lower-cased keys,
    the first of each kept. One pass, each match starting where the last ended, so a value full
    of ';' costs its length (email.message re-counts quotes from the start for each ';')."""
    params: dict[str, str] = {}
    at = value.find(";")
    while 0 <= at < len(value):
        match = PARAM.match(value, at)
        if match is None:  # a quote left open, or a parameter without '='
            raise unparsable()
        key, quoted, bare = match.groups()
        if key is not None:
            text = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare.strip()
            params.setdefault(key.lower(), text)
        at = match.end()
    return params


def boundary_of(content_type: str) -> bytes:
    """The multipart boundary of a Content-Type header (1 to 70 characters, RFC 2046)."""
    body_kind(content_type)  # refuses a header over HEADER_LINE_BYTES
    boundary = header_params(content_type).get("boundary", "")
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
    """The `name` of a part's Content-Disposition header, if it has one; 400 for a header line
    over HEADER_LINE_BYTES, which no form sends."""
    lines = headers.split(b"\r\n")
    if any(len(line) > HEADER_LINE_BYTES for line in lines):
        raise BadRequest(
            400,
            f"A multipart part has a header line over {HEADER_LINE_BYTES} bytes; "
            "send the image in a field named file with short headers.",
        )
    for line in lines:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-disposition":
            return header_params(value.decode("latin-1")).get("name")
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
