"""Face verification as reported in the Vec2Face paper (§4): LFW, CFP-FP, CPLFW, AgeDB-30, CALFW.

The protocol is insightface's (``recognition/arcface_torch/eval/verification.py``), re-stated on
cosine similarity:

1. Every image and its horizontal flip are embedded; the two raw embeddings are summed and then
   L2-normalised (:func:`embed_pairs`).
2. A pair's score is the cosine of its two embeddings; a pair is predicted "same" when
   ``score > threshold`` (strict, like insightface's ``distance < threshold``).
3. 10-fold cross-validation without shuffling (``sklearn.model_selection.KFold``): the threshold
   that maximises accuracy on 9 folds is applied to the held-out fold; the reported accuracy is the
   mean (and population std) over folds (:func:`verification_accuracy`).

Differences from insightface, on purpose: thresholds are cosines, not squared distances
(``‖a−b‖² = 2 − 2·cos`` for unit vectors, so the decision rule is the same), and the candidate
thresholds are exact — the midpoints between consecutive distinct training scores — instead of a
0.01 grid on distances; ties go to the largest threshold, which is also what insightface's
``argmax`` over ascending distances picks. Accuracies can therefore differ slightly from
insightface's where its grid cannot separate two scores.

Data: insightface verification ``.bin`` files (read with a restricted unpickler that never runs
code, see :func:`load_bin`) or a folder of images with a pairs file (:func:`load_pairs`). Images
must be aligned 112x112 face crops.

Usage::

    python recipes/eval_fr.py --model ./arcface-hsface --data-dir ./faces_emore --out results.json
"""

from __future__ import annotations

if __package__ in (None, ""):  # run by path (`accelerate launch recipes/eval_fr.py`): import the checkout's package
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout root instead of recipes/

import argparse
import io
import json
import logging
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from sklearn.model_selection import KFold

from vec2face_model.conventions import IMAGE_SIZE, hflip, uint8_to_tensor
from vec2face_model.feature_math import cosine, l2_normalize

logger = logging.getLogger(__name__)

__all__ = [
    "PAPER_SETS",
    "EncodedImages",
    "VerificationFileError",
    "VerificationSet",
    "embed_pairs",
    "evaluate",
    "find_threshold",
    "format_markdown",
    "load_backbone",
    "load_bin",
    "load_pairs",
    "load_sets",
    "main",
    "pair_similarities",
    "results_to_json",
    "table_row",
    "tar_at_far",
    "verification_accuracy",
]

# Set keys (insightface file stems) and their column names in the paper's table, in its order.
PAPER_SETS: dict[str, str] = {
    "lfw": "LFW",
    "cfp_fp": "CFP-FP",
    "cplfw": "CPLFW",
    "agedb_30": "AgeDB-30",
    "calfw": "CALFW",
}
MISSING = "–"
EmbedFn = Callable[[torch.Tensor], torch.Tensor]


class VerificationFileError(ValueError):
    """A verification file is malformed or holds something other than plain image/label data."""


# -- reading images ------------------------------------------------------------------------------


def _open_image(source: bytes | Path, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (UnidentifiedImageError, OSError) as error:
        raise VerificationFileError(f"{what}: not a readable image ({error})") from error


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
        from PIL import Image

        with _open_image(self.sources[index], self._what(index)) as image:
            image = image.convert("RGB")
            if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                if not self.resize:
                    self._check_size(image.size, index)
                image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8)

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


# -- protocol ------------------------------------------------------------------------------------


@torch.inference_mode()
def embed_pairs(
    embed_fn: EmbedFn,
    images: np.ndarray | EncodedImages,
    batch_size: int = 64,
    flip: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Unit-norm embeddings ``[N, D]`` (float32, CPU) of uint8 ``[N,112,112,3]`` RGB images.

    With ``flip``, the raw embeddings of each image and of its horizontal flip are summed before
    normalising (insightface's test-time augmentation).

    Args:
        embed_fn: maps canonical float32 ``[B,3,112,112]`` RGB in [-1, 1] to ``[B, D]``; put a
            model in eval mode before passing it.
        images: array or :class:`EncodedImages`, read ``batch_size`` at a time.
        device: where the batches are sent before ``embed_fn`` is called.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = uint8_to_tensor(images[start : start + batch_size])
        if device is not None:
            batch = batch.to(device)
        features = _call_embed(embed_fn, batch)
        if flip:
            features = features + _call_embed(embed_fn, hflip(batch))
        chunks.append(l2_normalize(features.float()).cpu())
    if not chunks:
        raise ValueError("no images to embed")
    return torch.cat(chunks)


def _call_embed(embed_fn: EmbedFn, batch: torch.Tensor) -> torch.Tensor:
    features = embed_fn(batch)
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or len(features) != len(batch):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"embed_fn must return a [B, D] tensor for a batch of {len(batch)} images, got {shape}")
    return features


def pair_similarities(embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine of rows ``2i`` and ``2i+1``: ``[2P, D] -> [P]``."""
    if len(embeddings) % 2:
        raise ValueError(f"expected an even number of embeddings (two per pair), got {len(embeddings)}")
    return cosine(embeddings[0::2], embeddings[1::2])


def _as_scores(sim, issame) -> tuple[np.ndarray, np.ndarray]:
    sim = sim.detach().cpu().double().numpy() if isinstance(sim, torch.Tensor) else np.asarray(sim, np.float64)
    issame = np.asarray(issame.cpu() if isinstance(issame, torch.Tensor) else issame)
    if issame.dtype != bool:
        raise TypeError(f"issame must be boolean, got {issame.dtype}")
    if sim.ndim != 1 or sim.shape != issame.shape:
        raise ValueError(f"sim and issame must be 1-D and equally long, got {sim.shape} and {issame.shape}")
    if not np.isfinite(sim).all():
        raise ValueError("similarities contain NaN or inf; check the embeddings")
    return sim, issame


def find_threshold(sim: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """Cosine threshold with the best accuracy on these pairs (rule: same iff ``sim > threshold``).

    Candidates are exact: the midpoints between consecutive distinct similarities, the largest
    similarity (reject all) and the float just below the smallest (accept all). Ties go to the
    largest threshold. Returns ``(threshold, accuracy)``.
    """
    sim, issame = _as_scores(sim, issame)
    if not len(sim):
        raise ValueError("no pairs to pick a threshold from")
    distinct = np.unique(sim)
    candidates = np.concatenate(([np.nextafter(distinct[0], -np.inf)], (distinct[:-1] + distinct[1:]) / 2, distinct[-1:]))
    genuine, impostor = np.sort(sim[issame]), np.sort(sim[~issame])
    true_accepts = len(genuine) - np.searchsorted(genuine, candidates, side="right")
    true_rejects = np.searchsorted(impostor, candidates, side="right")
    accuracy = (true_accepts + true_rejects) / len(sim)
    best = len(candidates) - 1 - int(np.argmax(accuracy[::-1]))
    return float(candidates[best]), float(accuracy[best])


def tar_at_far(sim, issame, far: float = 1e-3) -> dict:
    """True accept rate at a false accept rate, on all pairs (no cross-validation).

    With ``same iff sim > t``, ``FAR(t)`` is the fraction of impostor scores above ``t``. The
    threshold is the smallest ``t`` with ``FAR(t) <= far``: the ``(k+1)``-th largest impostor score
    for ``k = floor(far * #impostors)``. With fewer than ``1/far`` impostors this is the largest
    impostor score (``far_achieved`` 0), so the estimate is coarse; ``far_achieved`` says what the
    threshold really gives. Returns ``{"tar", "far", "far_threshold", "far_achieved"}``.
    """
    sim, issame = _as_scores(sim, issame)
    if not 0 < far < 1:
        raise ValueError(f"far must be in (0, 1), got {far}")
    genuine, impostor = sim[issame], np.sort(sim[~issame])[::-1]
    if not len(genuine) or not len(impostor):
        raise ValueError("TAR@FAR needs both genuine and impostor pairs")
    # The tiny slack keeps e.g. 1e-3 * 3000 from flooring to 2 through rounding.
    allowed = min(int(math.floor(far * len(impostor) * (1 + 1e-9))), len(impostor) - 1)
    threshold = float(impostor[allowed])
    return {
        "tar": float(np.mean(genuine > threshold)),
        "far": far,
        "far_threshold": threshold,
        "far_achieved": float(np.mean(impostor > threshold)),
    }


def verification_accuracy(sim, issame, n_folds: int = 10, far: float = 1e-3) -> dict:
    """Insightface's verification accuracy on cosine similarities, plus TAR@FAR.

    ``KFold(n_folds)`` without shuffling splits the pairs in order; for each fold the threshold of
    :func:`find_threshold` on the other folds is applied to it.

    Args:
        sim: cosine similarities ``[P]`` (array or tensor).
        issame: bool ``[P]``.
        n_folds: folds of the cross-validation.
        far: false accept rate of :func:`tar_at_far`.

    Returns:
        ``accuracy`` (mean over folds, a fraction), ``accuracy_std`` (population std),
        ``fold_accuracies``, ``thresholds`` (per fold, cosine), ``num_pairs`` and the
        :func:`tar_at_far` keys.
    """
    sim, issame = _as_scores(sim, issame)
    if not 2 <= n_folds <= len(sim):
        raise ValueError(f"n_folds must be between 2 and the number of pairs ({len(sim)}), got {n_folds}")
    thresholds, accuracies = [], []
    for train, test in KFold(n_splits=n_folds, shuffle=False).split(sim):
        threshold, _ = find_threshold(sim[train], issame[train])
        thresholds.append(threshold)
        accuracies.append(float(np.mean((sim[test] > threshold) == issame[test])))
    return {
        "accuracy": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "fold_accuracies": accuracies,
        "thresholds": thresholds,
        "num_pairs": len(sim),
        **tar_at_far(sim, issame, far),
    }


def evaluate(
    embed_fn: EmbedFn,
    sets: dict[str, VerificationSet],
    batch_size: int = 64,
    flip: bool = True,
    n_folds: int = 10,
    far: float = 1e-3,
    device: torch.device | str | None = None,
) -> dict[str, dict]:
    """Run :func:`verification_accuracy` on each set; returns ``{name: metrics}``."""
    results = {}
    for name, dataset in sets.items():
        embeddings = embed_pairs(embed_fn, dataset.images, batch_size=batch_size, flip=flip, device=device)
        results[name] = verification_accuracy(pair_similarities(embeddings), dataset.issame, n_folds=n_folds, far=far)
        logger.info("%s: %.2f%% +- %.2f (%d pairs)", name, 100 * results[name]["accuracy"],
                    100 * results[name]["accuracy_std"], dataset.num_pairs)
    return results


# -- the paper's table ---------------------------------------------------------------------------


def table_row(results: dict[str, dict]) -> dict[str, float | None]:
    """Accuracy in % (2 decimals) per paper column plus ``Avg``; missing sets are None.

    ``Avg`` is the mean over the paper's sets that are present (unrounded values, then rounded),
    None if none is. Sets outside :data:`PAPER_SETS` get their own columns after ``Avg`` and are
    not averaged.
    """
    present = [100 * results[key]["accuracy"] for key in PAPER_SETS if key in results]
    row = {column: _percent(results.get(key)) for key, column in PAPER_SETS.items()}
    row["Avg"] = round(float(np.mean(present)), 2) if present else None
    row.update({key: _percent(metrics) for key, metrics in results.items() if key not in PAPER_SETS})
    return row


def _percent(metrics: dict | None) -> float | None:
    return None if metrics is None else round(100 * metrics["accuracy"], 2)


def format_markdown(results: dict[str, dict], label: str = "model") -> str:
    """The paper's table as Markdown: missing sets show ``–``; a note says which ``Avg`` left out."""
    row = table_row(results)
    header = ["Model", *row]
    cells = [label, *(MISSING if value is None else f"{value:.2f}" for value in row.values())]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(row)) + "|", "| " + " | ".join(cells) + " |"]
    missing = [column for key, column in PAPER_SETS.items() if key not in results]
    if missing:
        lines.append("")
        lines.append(f"Avg is over {len(PAPER_SETS) - len(missing)} of {len(PAPER_SETS)} sets; missing ({MISSING}): {', '.join(missing)}.")
    return "\n".join(lines)


def results_to_json(results: dict[str, dict], label: str = "model") -> dict:
    """JSON-ready summary: ``table`` (:func:`table_row`, missing sets null), ``missing``,
    ``average_over`` and the full per-set ``metrics``."""
    return {
        "model": label,
        "table": table_row(results),
        "missing": [column for key, column in PAPER_SETS.items() if key not in results],
        "average_over": [column for key, column in PAPER_SETS.items() if key in results],
        "metrics": results,
    }


# -- CLI -----------------------------------------------------------------------------------------


def load_backbone(path_or_name: str | Path) -> torch.nn.Module:
    """An :class:`~vec2face_model.models.iresnet.IResNet` in eval mode.

    A file is read as official weights (``IResNet.from_official``: ``.pth`` or safetensors); anything
    else goes to ``IResNet.from_pretrained`` (a ``save_pretrained`` folder or a Hub id).
    """
    from vec2face_model.models.iresnet import IResNet

    if Path(path_or_name).is_file():
        model = IResNet.from_official(path_or_name)
    else:
        model = IResNet.from_pretrained(str(path_or_name))
    return model.eval()


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Face verification accuracy (LFW, CFP-FP, CPLFW, AgeDB-30, CALFW).")
    parser.add_argument("--model", required=True, help="save_pretrained folder, Hub id, or official .pth/.safetensors file")
    parser.add_argument("--data-dir", required=True, help="folder with <set>.bin files or <set>/pairs.txt folders")
    parser.add_argument("--sets", nargs="+", default=list(PAPER_SETS), help=f"default: {' '.join(PAPER_SETS)}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resize", action="store_true", help="resize non-112x112 crops instead of refusing them")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    sets = load_sets(args.data_dir, args.sets, resize=args.resize)
    if not sets:
        parser.error(f"none of {args.sets} found in {args.data_dir} (expected <set>.bin or <set>/pairs.txt)")
    model = load_backbone(args.model).to(args.device)
    results = evaluate(model, sets, batch_size=args.batch_size, device=args.device)
    label = Path(args.model).name or str(args.model)
    summary = results_to_json(results, label=label)
    print(format_markdown(results, label=label))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
