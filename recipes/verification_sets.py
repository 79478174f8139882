"""Face-verification pair sets (LFW, CFP-FP, CPLFW, AgeDB-30, CALFW) read from disk for ``eval_fr``.

Two layouts: insightface verification ``.bin`` files, read with a restricted unpickler that never
runs code (:func:`load_bin`), or a folder of images with a pairs file (:func:`load_pairs`).
Images stay encoded until used and must be aligned 112x112 face crops (:class:`EncodedImages`).
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from vec2face_model.conventions import IMAGE_SIZE
from vec2face_model.image_io import UnreadableImageError, decode_image, open_image

logger = logging.getLogger(__name__)

__all__ = ["PAPER_SETS", "EncodedImages", "VerificationFileError", "VerificationSet", "load_bin", "load_pairs", "load_sets"]

# Set keys (insightface file stems) and their column names in the paper's table, in its order.
PAPER_SETS: dict[str, str] = {
    "lfw": "LFW",
    "cfp_fp": "CFP-FP",
    "cplfw": "CPLFW",
    "agedb_30": "AgeDB-30",
    "calfw": "CALFW",
}


class VerificationFileError(ValueError):
    """A verification file is malformed or holds something other than plain image/label data."""


# -- reading images ------------------------------------------------------------------------------


def _open_image(source: bytes | Path, what: str):
    try:
        return open_image(source, what)
    except UnreadableImageError as error:
        raise VerificationFileError(str(error)) from error


class EncodedImages:
    """Encoded images (bytes or file paths) decoded on access to uint8 ``[H,W,3]`` RGB arrays.

    Indexing with an int gives ``[112,112,3]``, with a slice ``[n,112,112,3]``; ``np.asarray``
    decodes everything. Sizes are checked from the image headers when the object is built, so a
    wrong-sized set fails at load time, not halfway through an evaluation.

    Args:
        sources: encoded image bytes or paths, in pair order (``2i`` and ``2i+1`` form pair ``i``).
        resize: resize images that are not 112x112 (bilinear) instead of refusing them. Resizing
            does not align faces; use it only for crops that are already aligned.
        name: used in error messages.
    """

    def __init__(self, sources: Sequence[bytes | Path], resize: bool = False, name: str = "images"):
        self.sources = list(sources)
        self.resize = resize
        self.name = name
        if not resize:
            for index, source in enumerate(self.sources):
                with _open_image(source, self._what(index)) as image:
                    self._check_size(image.size, index)

    def _what(self, index: int) -> str:
        source = self.sources[index]
        return f"{self.name}: image {index}" + ("" if isinstance(source, bytes) else f" ({source})")

    def _check_size(self, size: tuple[int, int], index: int) -> None:
        if size != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"{self._what(index)} is {size[0]}x{size[1]}, expected an aligned {IMAGE_SIZE}x{IMAGE_SIZE} "
                "face crop; align and crop the faces first (e.g. insightface's norm_crop), or pass "
                "resize=True (--resize) if the crops are aligned but only differently sized"
            )

    def _decode(self, index: int) -> np.ndarray:
        # sizes were checked at construction (unless resize), so decode_image's own check cannot trip here
        try:
            return decode_image(self.sources[index], resize=self.resize, what=self._what(index))
        except UnreadableImageError as error:
            raise VerificationFileError(str(error)) from error

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, key: int | slice) -> np.ndarray:
        if isinstance(key, slice):
            indices = range(*key.indices(len(self)))
            if not indices:
                return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
            return np.stack([self._decode(i) for i in indices])
        if isinstance(key, (int, np.integer)):
            index = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f"image index {key} out of range for {len(self)} images")
            return self._decode(index)
        raise TypeError(f"index EncodedImages with an int or a slice, got {type(key).__name__}")

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self[:]
        return array if dtype is None else array.astype(dtype)


@dataclass
class VerificationSet:
    """Pairs of aligned face crops.

    Attributes:
        name: set key, e.g. ``"lfw"`` (see :data:`PAPER_SETS`).
        images: uint8 ``[2P,112,112,3]`` RGB array or :class:`EncodedImages`; images ``2i`` and
            ``2i+1`` form pair ``i``.
        issame: bool ``[P]``, True for genuine (same identity) pairs.
    """

    name: str
    images: np.ndarray | EncodedImages
    issame: np.ndarray

    def __post_init__(self):
        self.issame = np.asarray(self.issame, dtype=bool).reshape(-1)
        if len(self.images) != 2 * len(self.issame):
            raise ValueError(
                f"{self.name}: {len(self.images)} images for {len(self.issame)} pairs; expected exactly two "
                "images per pair (images 2i and 2i+1 form pair i)"
            )
        if isinstance(self.images, np.ndarray) and (
            self.images.dtype != np.uint8 or self.images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3)
        ):
            raise ValueError(
                f"{self.name}: images must be uint8 [2P,{IMAGE_SIZE},{IMAGE_SIZE},3] RGB, "
                f"got {self.images.dtype} {self.images.shape}"
            )

    @property
    def num_pairs(self) -> int:
        return len(self.issame)


# -- insightface .bin files ----------------------------------------------------------------------


def _latin1_bytes(text, encoding):
    # Python 3 pickles non-empty bytes under protocols 0-2 as ``_codecs.encode(text, "latin1")``.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise VerificationFileError("refusing a codecs call that is not the latin-1 encoding of bytes data")
    return text.encode("latin-1")


def _plain_bytes(*args):
    # ``bytes()`` is how protocols 0-2 pickle b"".
    if args:
        raise VerificationFileError("refusing a bytes(...) call with arguments")
    return b""


def _plain_bytearray(*args):
    # Protocols 0-4 pickle a bytearray as ``bytearray()`` or ``bytearray(<bytes>)``.
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], bytes):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):  # protocol 0-1
        return bytearray(args[0].encode("latin-1"))
    raise VerificationFileError("refusing a bytearray(...) call whose arguments are not bytes data")


# The only names a verification file may reference: the ways pickle spells bytes/bytearray data
# under old protocols. They resolve to the local data-only constructors above, never to the real
# objects, so nothing named in the file is ever looked up, imported or called.
_DATA_CONSTRUCTORS = {
    ("_codecs", "encode"): _latin1_bytes,
    ("builtins", "bytes"): _plain_bytes,
    ("__builtin__", "bytes"): _plain_bytes,
    ("builtins", "bytearray"): _plain_bytearray,
    ("__builtin__", "bytearray"): _plain_bytearray,
}


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickler for plain data: lists, tuples, bytes, bytearray, str, int, bool, None.

    ``find_class`` refuses every global (except the bytes spellings above), so objects whose
    ``__reduce__`` names ``os.system``, ``numpy`` reconstructors or anything else never run.
    """

    def find_class(self, module: str, name: str):
        constructor = _DATA_CONSTRUCTORS.get((module, name))
        if constructor is not None:
            return constructor
        hint = (
            " (numpy arrays are not accepted: convert the images to bytes, e.g. arr.tobytes() of the "
            "encoded buffer, and the labels to a list of bool, then re-pickle)"
            if module.split(".")[0] == "numpy"
            else ""
        )
        raise VerificationFileError(
            f"refusing to load global '{module}.{name}': verification files may contain only a list of "
            f"encoded image bytes and a list of bools, nothing that runs code{hint}"
        )

    def persistent_load(self, pid):
        raise VerificationFileError("refusing a persistent reference: verification files hold plain data only")


def _parse_bin_payload(payload, source: str) -> tuple[list[bytes], np.ndarray]:
    if not isinstance(payload, (tuple, list)) or len(payload) != 2:
        raise VerificationFileError(f"{source}: expected a pickled pair (image bytes list, issame list)")
    bins, issame = payload
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise VerificationFileError(f"{source}: expected a pickled pair (image bytes list, issame list)")
    images = []
    for index, item in enumerate(bins):
        if not isinstance(item, (bytes, bytearray)):
            raise VerificationFileError(f"{source}: image {index} is {type(item).__name__}, expected encoded bytes")
        images.append(bytes(item))
    labels = []
    for index, item in enumerate(issame):
        # bool is an int subclass; py2-era files may store 0/1.
        if not isinstance(item, int) or item not in (0, 1):
            raise VerificationFileError(f"{source}: issame[{index}] is {item!r}, expected a bool")
        labels.append(bool(item))
    if len(images) != 2 * len(labels):
        raise VerificationFileError(
            f"{source}: {len(images)} images for {len(labels)} pairs; expected two images per pair"
        )
    return images, np.asarray(labels, dtype=bool)


def load_bin(path: str | Path, name: str | None = None, resize: bool = False) -> VerificationSet:
    """Read an insightface verification ``.bin``: a pickle of ``(image bytes list, issame list)``.

    The pickle is read with a data-only unpickler (protocols 0-5; Python 2 files are read with
    ``encoding="bytes"``); any global reference (``os.system``, numpy, ...) raises
    :class:`VerificationFileError` before anything is called. Images stay encoded until used.

    Args:
        path: the ``.bin`` file.
        name: set name (default: the file stem, e.g. ``"agedb_30"``).
        resize: see :class:`EncodedImages`.
    """
    path = Path(path)
    name = name or path.stem
    try:
        with open(path, "rb") as file:
            payload = _DataOnlyUnpickler(file, encoding="bytes").load()
    except VerificationFileError as error:
        raise VerificationFileError(f"{path}: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError) as error:
        raise VerificationFileError(f"{path}: not a readable verification .bin pickle ({error})") from error
    images, issame = _parse_bin_payload(payload, str(path))
    return VerificationSet(name, EncodedImages(images, resize=resize, name=f"{name} ({path.name})"), issame)


def load_pairs(pairs_file: str | Path, root: str | Path | None = None, name: str | None = None, resize: bool = False) -> VerificationSet:
    """Read a folder of images plus a pairs file with lines ``path_a path_b 0|1``.

    Paths are relative to ``root`` (default: the pairs file's folder) and may not contain
    whitespace; blank lines and lines starting with ``#`` are skipped; ``1`` marks a genuine pair.

    Args:
        pairs_file: the pairs file.
        root: folder the image paths are relative to.
        name: set name (default: the name of ``root``).
        resize: see :class:`EncodedImages`.
    """
    pairs_file = Path(pairs_file)
    root = pairs_file.parent if root is None else Path(root)
    name = name or root.resolve().name
    paths, issame = [], []
    for number, line in enumerate(pairs_file.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 3 or fields[2] not in ("0", "1"):
            raise ValueError(f"{pairs_file}:{number}: expected 'path_a path_b 0|1', got {line!r}")
        for field in fields[:2]:
            path = root / field
            if not path.is_file():
                raise FileNotFoundError(f"{pairs_file}:{number}: image {path} does not exist")
            paths.append(path)
        issame.append(fields[2] == "1")
    if not issame:
        raise ValueError(f"{pairs_file}: no pairs found; expected lines 'path_a path_b 0|1'")
    return VerificationSet(name, EncodedImages(paths, resize=resize, name=name), np.asarray(issame))


def load_sets(data_dir: str | Path, names: Sequence[str] = tuple(PAPER_SETS), resize: bool = False) -> dict[str, VerificationSet]:
    """Load the sets found in ``data_dir``: ``<name>.bin``, else ``<name>/pairs.txt``; missing ones are skipped (logged)."""
    data_dir = Path(data_dir)
    sets = {}
    for name in names:
        bin_path, pairs_path = data_dir / f"{name}.bin", data_dir / name / "pairs.txt"
        if bin_path.is_file():
            sets[name] = load_bin(bin_path, name=name, resize=resize)
        elif pairs_path.is_file():
            sets[name] = load_pairs(pairs_path, name=name, resize=resize)
        else:
            logger.warning("%s: neither %s nor %s exists; skipping it", name, bin_path, pairs_path)
    return sets
