"""Checking and decoding client image files, with limits against oversize and decompression bombs.

`check_image` reads only the header (cheap, at the edge); `decode_image` decodes every pixel (in the vision
stage, per request, before the request enters a batch). Both raise InvalidInput with the reason.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from blip2_serve.clients.contract import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from blip2_serve.deployments.errors import InvalidInput
from blip2_serve.deployments.types import EncodedImage
from PIL import Image, UnidentifiedImageError

# Formats PIL may try; others (EPS, PSD, ...) are never parsed.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on one image: encoded bytes and decoded pixels (width x height)."""

    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    if not data:
        raise InvalidInput("IMAGE is empty: expected an encoded image file (PNG, JPEG, WebP, ...)")
    if len(data) > limits.max_bytes:
        raise InvalidInput(f"IMAGE is {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"IMAGE has too many pixels (decompression bomb): {exc}") from None
    except UnidentifiedImageError:
        raise InvalidInput(f"IMAGE is not an image file of a supported format ({', '.join(ALLOWED_FORMATS)})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # broken headers surface as any of these
        raise InvalidInput(f"IMAGE header is invalid: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidInput(f"IMAGE has zero size ({width}x{height})")
    if width * height > limits.max_pixels:
        raise InvalidInput(f"IMAGE is {width}x{height} pixels, over the limit of {limits.max_pixels} pixels")
    return image


def check_image(data: bytes, limits: ImageLimits = ImageLimits()) -> EncodedImage:
    """Header-only check of one image file: format, size and pixel count. Does not decode pixels."""
    image = _open(data, limits)
    return EncodedImage.of(data, image.size[0], image.size[1], image.format or "unknown")


def decode_image(image: EncodedImage, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode every pixel to RGB; truncated or corrupt data raises InvalidInput."""
    opened = _open(image.data, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened.load()
            return opened.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"IMAGE could not be decoded (truncated or corrupt): {exc}") from None
