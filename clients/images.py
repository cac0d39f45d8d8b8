"""Images as the SDK takes them (a path, bytes, a PIL image or a numpy array) -> encoded image file bytes."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Union

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, Any]


def image_bytes(image: ImageLike) -> bytes:
    """Encoded image file bytes: files and bytes as they are, PIL images and uint8 arrays ([H, W] or [H, W, 3|4])
    encoded as PNG (lossless, so the server sees exactly these pixels)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    from PIL import Image

    if hasattr(image, "__array_interface__") and not isinstance(image, Image.Image):
        import numpy as np

        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise TypeError(f"a numpy image must be uint8 [H, W] or [H, W, 3|4], not {array.dtype} {array.shape}")
        image = Image.fromarray(array)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return buffer.getvalue()
    raise TypeError(f"an image must be a path, bytes, a PIL image or a numpy array, not {type(image).__name__}")
