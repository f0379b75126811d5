"""An HTTP request's image: the raw body or the multipart field `file`, checked for what a
client can get wrong (content type, size, emptiness, bytes that are no image)."""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import HTTP

IMAGE_TYPES = ("image/", "application/octet-stream")


class BadRequest(Exception):
    """A client's mistake: answered with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_length(content_length: str | None, max_bytes: int) -> None:
    """Refuse a body over `max_bytes` from its header, before reading it."""
    if content_length is not None and content_length.isdigit() and int(content_length) > max_bytes:
        raise BadRequest(
            413, f"The body is {int(content_length)} bytes, over the limit of {max_bytes} (max_bytes)."
        )


def multipart_file(content_type: str, body: bytes) -> bytes:
    """The bytes of the form field `file` (the standard library's MIME parser, so no
    python-multipart dependency)."""
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise BadRequest(400, "The multipart body could not be parsed; send the image in a field named file.")
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            return part.get_payload(decode=True) or b""
    raise BadRequest(400, "The multipart body has no field named file; send the image as file=@image.jpg.")


def image_bytes(content_type: str | None, body: bytes, max_bytes: int) -> bytes:
    """The image's bytes from a request with `content_type` and `body`; BadRequest when there
    are none, too many, or they come as a type that cannot be an image."""
    kind = (content_type or "application/octet-stream").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        data = multipart_file(content_type or "", body)
    elif kind.startswith(IMAGE_TYPES):
        data = body
    else:
        raise BadRequest(
            415,
            f"Content type {kind} is not supported; send the image as the raw body "
            "(image/* or application/octet-stream) or as multipart/form-data with a field named file.",
        )
    if not data:
        raise BadRequest(400, "The request has no image: the body (or its file field) is empty.")
    if len(data) > max_bytes:
        raise BadRequest(413, f"The image is {len(data)} bytes, over the limit of {max_bytes} (max_bytes).")
    return data
