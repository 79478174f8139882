"""Encoded image bytes <-> arrays (vec2face_model.image_io) and the atomic writes (vec2face_model.files)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vec2face_model.errors import InvalidInputError
from vec2face_model.files import atomic_write, write_json_atomic
from vec2face_model.image_io import UnreadableImageError, decode_image, decode_to_tensor, encode_image, open_image


def face(seed: int = 0, size: int = 112) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_encode_keeps_the_dataset_encoder_settings():
    pixels = face()
    reference = io.BytesIO()
    Image.fromarray(pixels).save(reference, format="JPEG", quality=95)  # what every HSFace shard holds
    assert encode_image(pixels, "jpeg") == reference.getvalue()
    png = encode_image(pixels, "png")
    assert png.startswith(b"\x89PNG") and np.array_equal(decode_image(png), pixels)  # lossless
    with pytest.raises(InvalidInputError, match="unknown image format"):
        encode_image(pixels, "webp")


def test_decode_takes_every_source_kind(tmp_path):
    pixels = face(1)
    data = encode_image(pixels, "png")
    (tmp_path / "a.png").write_bytes(data)
    for source in (data, tmp_path / "a.png", str(tmp_path / "a.png"), {"bytes": data, "path": None},
                   {"bytes": None, "path": str(tmp_path / "a.png")}, Image.fromarray(pixels)):
        out = decode_image(source)
        assert out.dtype == np.uint8 and out.flags.writeable and np.array_equal(out, pixels)
    tensor = decode_to_tensor([data, data])
    assert tensor.shape == (2, 3, 112, 112) and tensor.dtype == torch.float32
    assert float(tensor.min()) >= -1 and float(tensor.max()) <= 1


def test_decode_checks_size_and_readability():
    small = encode_image(face(2, 100), "png")
    with pytest.raises(InvalidInputError, match="100x100, expected an aligned 112x112"):
        decode_image(small)
    assert decode_image(small, resize=True).shape == (112, 112, 3)
    assert decode_image(small, size=None).shape == (100, 100, 3)
    with pytest.raises(UnreadableImageError, match="my image: not a readable image"):
        decode_image(b"not an image", what="my image")
    with pytest.raises(TypeError):
        open_image(3.0)


def test_decode_leaves_a_callers_image_open():
    image = Image.fromarray(face(3))
    decode_image(image)
    assert image.getpixel((0, 0)) is not None  # still usable: decode_image closes only what it opened


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "report.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write(b"half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert os.listdir(tmp_path) == ["report.json"]  # the temporary file is gone too
