"""Encoded image bytes <-> arrays, in one place.

Datasets, verification sets and reports hold images encoded (JPEG/PNG bytes, a file path, or a
``datasets.Image`` cell ``{"bytes", "path"}``); everything that computes on them wants uint8
``[H,W,3]`` RGB arrays or the canonical tensor of :mod:`vec2face_model.conventions`. PIL does the
codec work (torchvision.io's decoders are deprecated as of torchvision 0.29).

The encoder settings are part of hsface's determinism promise: the same pixels give the same
dataset bytes, so ``JPEG_QUALITY`` must not change.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch

from .conventions import IMAGE_SIZE, uint8_to_tensor
from .errors import InvalidInputError

JPEG_QUALITY = 95
IMAGE_FORMATS = ("jpeg", "png")


class UnreadableImageError(InvalidInputError):
    """Bytes or a file that PIL cannot decode as an image."""


def encode_image(image: np.ndarray, image_format: str) -> bytes:
    """uint8 ``[H,W,3]`` RGB -> JPEG (quality 95) or PNG bytes."""
    from PIL import Image

    if image_format not in IMAGE_FORMATS:
        raise InvalidInputError(f"unknown image format {image_format!r}; use one of {', '.join(IMAGE_FORMATS)}")
    buffer = io.BytesIO()
    if image_format == "jpeg":
        Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def open_image(source, what: str = "image"):
    """A PIL image (lazily decoded) from bytes, a path, a ``{"bytes", "path"}`` cell or a PIL image.

    Raises :class:`UnreadableImageError` (naming ``what``) when PIL cannot read it.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):  # an undecoded datasets.Image value
        if source.get("bytes") is not None:
            source = source["bytes"]
        elif source.get("path"):
            source = source["path"]
        else:
            raise InvalidInputError(f"{what}: an image cell with neither bytes nor a path")
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    elif not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{what}: expected image bytes, a path, a {{'bytes', 'path'}} dict or a PIL image, got {type(source).__name__}")
    try:
        return Image.open(source)
    except (UnidentifiedImageError, OSError) as error:
        raise UnreadableImageError(f"{what}: not a readable image ({error})") from error


def decode_image(source, *, size: int | None = IMAGE_SIZE, resize: bool = False, what: str = "image") -> np.ndarray:
    """Any image :func:`open_image` takes -> a writable uint8 ``[H,W,3]`` RGB array.

    With ``size`` (default 112) the image must be an aligned ``size x size`` crop, or with
    ``resize=True`` is resized to it (bilinear; resizing does not align a face). ``size=None``
    keeps whatever size it has.
    """
    from PIL import Image

    opened = open_image(source, what)
    try:
        image = opened.convert("RGB")
        if size is not None and image.size != (size, size):
            if not resize:
                raise InvalidInputError(
                    f"{what} is {image.size[0]}x{image.size[1]}, expected an aligned {size}x{size} face crop; "
                    "align and crop the faces first (e.g. insightface's norm_crop)"
                )
            image = image.resize((size, size), Image.BILINEAR)
        return np.array(image, dtype=np.uint8)  # a copy: writable, independent of the file
    finally:
        if opened is not source:  # close what we opened, never the caller's image
            opened.close()


def decode_to_tensor(sources, *, what: str = "image") -> torch.Tensor:
    """Aligned 112x112 images (anything :func:`open_image` takes) -> the canonical float32 ``[N,3,112,112]`` in [-1, 1]."""
    sources = list(sources)
    if not sources:
        return torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    return uint8_to_tensor(np.stack([decode_image(s, what=what) for s in sources]))
