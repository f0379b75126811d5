"""A request's bytes as the model's picture: opened only as one of the formats the server
accepts, checked for size from the header, then decoded (the first frame alone) as predict.py
decodes. Pillow can open some 40 formats; some of them report one size in their header and decode
another (an ICNS reports its icon table's, at most 512x512, and decodes the PNG inside, of any
size), and EPS runs Ghostscript on the bytes. None of those is ever opened: the formats below
decode into a picture of exactly the size their header declares."""

from __future__ import annotations

import io
import re

from PIL import Image

from transferkit.data.images import decode_opened
from transferkit.serving.requests import BadRequest

# JPEG includes MPO (the multi-picture JPEG of cameras), which Pillow opens through JPEG's plugin.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
PREFIX_BYTES = 16  # what Pillow's plugins tell their format by


def refused_format(prefix: bytes) -> str | None:
    """The format of another plugin that would take bytes starting with `prefix`, told by its
    magic bytes alone (no plugin opens them): so a client hears which format is refused."""
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        if name not in FORMATS and accept is not None and accept(prefix):
            return name
    return None


def unreadable(error: Exception) -> BadRequest:
    """predict.py's reason for bytes it cannot read, without the BytesIO's address."""
    reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error))
    return BadRequest(400, f"The body is not an image that can be read ({reason}).")


def too_many_pixels(max_pixels: int, size: tuple[int, int] | None = None) -> BadRequest:
    if size is None:  # over Pillow's own limit, which max_pixels is under
        return BadRequest(413, f"The image has more than {max_pixels} pixels, the limit (max_pixels).")
    width, height = size
    return BadRequest(
        413,
        f"The image is {width}x{height} pixels ({width * height} in all), "
        f"over the limit of {max_pixels} (max_pixels).",
    )


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image in `data`, its header read and no pixel decoded: 415 for a format not in
    FORMATS, 413 for one of more than `max_pixels` (a 140 kB PNG can declare 13000x13000)."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise too_many_pixels(max_pixels) from None
    except (OSError, ValueError, SyntaxError) as error:
        refused = refused_format(data[:PREFIX_BYTES])
        if refused is None:
            raise unreadable(error) from None
        raise BadRequest(
            415, f"Images in {refused} format are not accepted; send one in {', '.join(FORMATS)}."
        ) from None
    width, height = image.size  # the first frame's: the one decoded
    if width * height > max_pixels:
        image.close()
        raise too_many_pixels(max_pixels, (width, height))
    return image


def decode(image: Image.Image) -> Image.Image:
    """RGB, as predict.py's decode makes it (`decode_opened`), from the frame `image` is at, the
    first: a page or frame after it is never read."""
    declared = image.size
    decoded = decode_opened(image)
    if image.size != declared:  # none of FORMATS does this; a plugin that did would pass the check
        raise BadRequest(400, f"The image decoded to {image.size}, not the {declared} its header declares.")
    return decoded


def read_image(data: bytes, max_pixels: int) -> Image.Image:
    """The picture in a request's `data`, or BadRequest saying why not (400, 413 or 415)."""
    with open_image(data, max_pixels) as image:
        try:
            return decode(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise unreadable(error) from None
