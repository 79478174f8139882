"""Dataset analysis from face-recognition features (paper Fig. 5, Fig. 11/12, appendix A.3).

Everything here is a pure function of feature tensors: un-normalised features ``[N, D]`` with
integer identity labels ``[N]`` (numpy arrays are accepted too). Extracting the features is the
caller's job. Every threshold is a cosine (:mod:`vec2face_model.feature_math`), and every comparison
against a threshold is strict: a pair "exceeds" ``t`` when ``cos > t``, a verification pair is
accepted when ``score > t``.

Functions that compare all identities with all identities (:func:`max_neighbour_cosines`,
:func:`separability_curve`, :func:`leakage`) work on tiles of ``block_size × block_size`` cosines,
so memory stays ``O(block_size² + C)`` on top of the inputs and 300k identities fit in a laptop's RAM.
Computation happens in float64 for float64 inputs and in float32 otherwise, on the inputs' device.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .feature_math import cosine, cosine_matrix, l2_normalize
from .verification import eer, tar_at_far  # the one home of verification metrics; re-exported here

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "METRIC_DEFINITIONS",
    "IntraClassCosines",
    "Leakage",
    "MaxNeighbourCosines",
    "SeparabilityCurve",
    "VerificationScores",
    "analyze_features",
    "eer",
    "genuine_impostor_scores",
    "identity_centers",
    "intra_class_cosines",
    "leakage",
    "max_neighbour_cosines",
    "save_sample_grid",
    "separability_curve",
    "tar_at_far",
    "write_report",
]

DEFAULT_BLOCK_SIZE = 4096  # one float32 tile is 64 MiB
HISTOGRAM_BINS = 200  # over [-1, 1]: 0.01 wide
SEPARABILITY_STEP = 1000  # the official measurement reports every 1000 identities

METRIC_DEFINITIONS = {
    "intra_class": "Cosine of each image to the centre of its own identity; images below the threshold count as intra-class noise (likely not that identity).",
    "inter_class": "For each identity, the largest cosine between its centre and any other identity's centre; identities above the threshold count as inter-class noise (near-duplicate identities).",
    "separability": "Among the first k identities, the number with no earlier identity (smaller index) whose centre cosine exceeds the threshold (the official inter-separability measurement).",
    "eer": "Equal error rate of the verification scores: where the false-accept rate of impostor pairs equals the false-reject rate of genuine pairs, on the linearly interpolated empirical ROC.",
    "tar_at_far": "Fraction of genuine pairs scoring above the smallest threshold (an impostor score) at which at most a fraction far of impostor pairs score above it.",
    "leakage": "Identities whose centre has cosine above the threshold to at least one reference feature (e.g. the real identities the generator was trained on).",
}


# --- input handling ----------------------------------------------------------------------------


def _as_features(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2 or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating [N, D] array, got dtype {x.dtype} and shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero feature dimensions")
    return x


def _as_labels(labels, n: int) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integers, got {labels.dtype}; map identity names to ints first")
    if labels.dim() != 1 or len(labels) != n:
        raise ValueError(f"labels must be a 1-d array with one label per feature row ({n}), got shape {tuple(labels.shape)}")
    return labels.long()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _check_threshold(name: str, value: float) -> None:
    if not -1.0 <= value <= 1.0:
        raise ValueError(f"{name} is a cosine and must lie in [-1, 1], got {value}")


def _blocks(n: int, block_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + block_size, n)) for start in range(0, n, block_size)]


def _update_max(best: torch.Tensor, best_index: torch.Tensor, value: torch.Tensor, index: torch.Tensor) -> None:
    # Strict ">": candidates arrive in increasing index order, so ties keep the smallest index,
    # exactly like a dense argmax.
    better = value > best
    best[better] = value[better]
    best_index[better] = index[better]


# --- per-identity structure --------------------------------------------------------------------


def identity_centers(features, labels, *, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-identity centres ``[C, D]`` and their labels ``[C]`` (ascending).

    With ``normalize=True`` (default) a centre is the mean of the identity's **L2-normalised**
    features, so every image weighs the same whatever its feature norm (a quality signal for
    MagFace-style models). ``normalize=False`` averages the raw features, as the official
    ``center_features.py`` does. Centres are not re-normalised; every consumer uses cosines.
    Sums accumulate in float64 over chunks of images (a ``C × D`` float64 buffer: 1.2 GB for 300k × 512).
    """
    features = _as_features(features, "features")
    labels = _as_labels(labels, len(features)).to(features.device)
    label_ids, rows = torch.unique(labels, sorted=True, return_inverse=True)
    sums = torch.zeros(len(label_ids), features.shape[1], dtype=torch.float64, device=features.device)
    for start, end in _blocks(len(features), DEFAULT_BLOCK_SIZE):
        chunk = features[start:end].double()
        sums.index_add_(0, rows[start:end], l2_normalize(chunk) if normalize else chunk)
    counts = torch.bincount(rows, minlength=len(label_ids)).to(sums)
    return (sums / counts[:, None]).to(_compute_dtype(features)), label_ids


def _center_rows(labels: torch.Tensor, num_centers: int, label_ids) -> torch.Tensor:
    """Row of the centre of every label: via ``label_ids`` when given, else the label itself."""
    if label_ids is None:
        if len(labels) and (labels.min() < 0 or labels.max() >= num_centers):
            raise ValueError(
                f"labels lie outside 0..{num_centers - 1}, so they cannot index the centres; pass the label_ids returned by identity_centers"
            )
        return labels
    label_ids = torch.as_tensor(label_ids, device=labels.device).long()
    if label_ids.shape != (num_centers,):
        raise ValueError(f"label_ids must have one entry per centre ({num_centers}), got shape {tuple(label_ids.shape)}")
    sorted_ids, order = torch.sort(label_ids)
    position = torch.searchsorted(sorted_ids, labels).clamp_max(num_centers - 1)
    if len(labels) and not torch.equal(sorted_ids[position], labels):
        raise ValueError("some labels have no centre in label_ids; compute the centres from the same labels")
    return order[position]


@dataclass
class IntraClassCosines:
    """Cosine of every image to its identity centre (intra-class variation, paper Fig. 11)."""

    cosines: torch.Tensor  # [N]
    threshold: float

    @property
    def num_below(self) -> int:
        return int((self.cosines < self.threshold).sum())

    @property
    def fraction_below(self) -> float:
        """Intra-class noise: the fraction of images with cosine to their centre below ``threshold``."""
        return self.num_below / max(len(self.cosines), 1)


def intra_class_cosines(
    features, labels, centers, label_ids=None, *, threshold: float = 0.3, block_size: int = DEFAULT_BLOCK_SIZE
) -> IntraClassCosines:
    """Cosine of each image to the centre of its identity, and the fraction below ``threshold``.

    ``centers[r]`` is the centre of label ``label_ids[r]`` (as returned by :func:`identity_centers`);
    without ``label_ids`` labels must be row indices into ``centers``. The image itself is part of
    its centre, which biases the cosine upwards for identities with few images (a single-image
    identity scores 1 with ``normalize=True`` centres).
    """
    features = _as_features(features, "features")
    centers = _as_features(centers, "centers")
    if centers.shape[1] != features.shape[1]:
        raise ValueError(f"features have {features.shape[1]} dimensions but centers have {centers.shape[1]}")
    _check_threshold("threshold", threshold)
    _check_block_size(block_size)
    rows = _center_rows(_as_labels(labels, len(features)).to(centers.device), len(centers), label_ids)
    dtype = _compute_dtype(features)
    cosines = torch.empty(len(features), dtype=dtype, device=features.device)
    for start, end in _blocks(len(features), block_size):
        cosines[start:end] = cosine(features[start:end].to(dtype), centers[rows[start:end]].to(dtype))
    return IntraClassCosines(cosines=cosines, threshold=float(threshold))


# --- identity against identity -----------------------------------------------------------------


@dataclass
class MaxNeighbourCosines:
    """Nearest other identity of every identity (inter-class similarity, paper Fig. 12)."""

    cosines: torch.Tensor  # [C] max cosine to any other centre (-inf when C == 1)
    neighbours: torch.Tensor  # [C] long, row of that centre (smallest on ties; -1 when C == 1)
    threshold: float

    @property
    def num_above(self) -> int:
        return int((self.cosines > self.threshold).sum())

    @property
    def fraction_above(self) -> float:
        """Inter-class noise: the fraction of identities with a neighbour above ``threshold``."""
        return self.num_above / max(len(self.cosines), 1)


def max_neighbour_cosines(
    centers, *, threshold: float = 0.7, block_size: int = DEFAULT_BLOCK_SIZE
) -> MaxNeighbourCosines:
    """For each centre, the largest cosine to any *other* centre, and the fraction above ``threshold``.

    Computed on the upper-triangular tiles of the cosine matrix (each tile updates the maxima of
    its rows and of its columns), so the ``C × C`` matrix is never held and each cosine is
    computed once.
    """
    centers = _as_features(centers, "centers")
    _check_threshold("threshold", threshold)
    _check_block_size(block_size)
    dtype = _compute_dtype(centers)
    best = torch.full((len(centers),), -math.inf, dtype=dtype, device=centers.device)
    best_index = torch.full((len(centers),), -1, dtype=torch.long, device=centers.device)
    blocks = _blocks(len(centers), block_size)
    for block, (r0, r1) in enumerate(blocks):
        rows = centers[r0:r1].to(dtype)
        for c0, c1 in blocks[block:]:
            tile = cosine_matrix(rows, centers[c0:c1].to(dtype))
            if c0 == r0:
                tile.fill_diagonal_(-math.inf)
            value, index = tile.max(dim=1)
            _update_max(best[r0:r1], best_index[r0:r1], value, index + c0)
            if c0 != r0:
                value, index = tile.max(dim=0)
                _update_max(best[c0:c1], best_index[c0:c1], value, index + r0)
    return MaxNeighbourCosines(cosines=best, neighbours=best_index, threshold=float(threshold))


@dataclass
class SeparabilityCurve:
    """Number of unique identities among the first k, for each k (paper Fig. 5)."""

    counts: list[int]  # k values
    unique: list[int]  # unique identities among the first k
    first_conflict: torch.Tensor  # [max(counts)] long: smallest earlier index above threshold, -1 if none
    threshold: float


def _default_counts(num_identities: int) -> list[int]:
    counts = list(range(SEPARABILITY_STEP, num_identities + 1, SEPARABILITY_STEP))
    return counts if counts and counts[-1] == num_identities else counts + [num_identities]


def separability_curve(
    centers, counts=None, *, threshold: float = 0.4, block_size: int = DEFAULT_BLOCK_SIZE
) -> SeparabilityCurve:
    """Unique identities among the first ``k`` centres, for every ``k`` in ``counts``.

    Identity ``j`` is unique within the first ``k`` when ``j < k`` and no identity ``i < j`` has
    ``cos(center_i, center_j) > threshold`` (the official measurement: strict upper triangle,
    column-wise; order matters). Earlier identities of ``j`` are always within the first ``k``,
    so one pass finds each identity's *first conflict* and the curve is a cumulative count.
    ``counts`` defaults to every multiple of 1000 up to C, plus C itself. Columns are processed in
    blocks against the earlier row blocks only; a column block stops once all its identities have
    a conflict.
    """
    centers = _as_features(centers, "centers")
    _check_threshold("threshold", threshold)
    _check_block_size(block_size)
    if len(centers) == 0:
        raise ValueError("centers is empty")
    counts = _default_counts(len(centers)) if counts is None else [int(k) for k in counts]
    if not counts or min(counts) < 1 or max(counts) > len(centers):
        raise ValueError(f"counts must be non-empty and lie in 1..{len(centers)} (the number of centres), got {counts}")
    num = max(counts)
    dtype = _compute_dtype(centers)
    first_conflict = torch.full((num,), -1, dtype=torch.long, device=centers.device)
    blocks = _blocks(num, block_size)
    for block, (c0, c1) in enumerate(blocks):
        columns = centers[c0:c1].to(dtype)
        conflict = first_conflict[c0:c1]
        for r0, r1 in blocks[: block + 1]:
            unresolved = conflict < 0
            if not unresolved.any():
                break
            above = cosine_matrix(centers[r0:r1].to(dtype), columns) > threshold
            if r0 == c0:
                above = above.triu(diagonal=1)  # only earlier rows: i < j
            # argmax returns the first maximum, i.e. the smallest row index above the threshold
            first = above.to(torch.uint8).argmax(dim=0) + r0
            found = unresolved & above.any(dim=0)
            conflict[found] = first[found]
    cumulative = torch.cumsum(first_conflict < 0, dim=0)
    return SeparabilityCurve(
        counts=counts,
        unique=[int(cumulative[k - 1]) for k in counts],
        first_conflict=first_conflict,
        threshold=float(threshold),
    )


@dataclass
class Leakage:
    """Identities that match a reference feature (e.g. a real training identity)."""

    leaked_ids: torch.Tensor  # [L] labels of the leaked identities (in centre order)
    leaked_max_cosines: torch.Tensor  # [L]
    leaked_reference_indices: torch.Tensor  # [L] row of the closest reference feature
    max_cosines: torch.Tensor  # [C] max cosine of every centre to any reference feature
    threshold: float


def leakage(
    centers, label_ids, reference_features, *, threshold: float = 0.4, block_size: int = DEFAULT_BLOCK_SIZE
) -> Leakage:
    """Identities whose centre has ``cos > threshold`` to any reference feature (blockwise)."""
    centers = _as_features(centers, "centers")
    reference = _as_features(reference_features, "reference_features")
    if reference.shape[1] != centers.shape[1]:
        raise ValueError(f"reference features have {reference.shape[1]} dimensions but centers have {centers.shape[1]}")
    if len(reference) == 0:
        raise ValueError("reference_features is empty")
    label_ids = torch.as_tensor(label_ids, device=centers.device)
    if label_ids.shape != (len(centers),):
        raise ValueError(f"label_ids must have one entry per centre ({len(centers)}), got shape {tuple(label_ids.shape)}")
    _check_threshold("threshold", threshold)
    _check_block_size(block_size)
    dtype = _compute_dtype(centers)
    best = torch.full((len(centers),), -math.inf, dtype=dtype, device=centers.device)
    best_index = torch.full((len(centers),), -1, dtype=torch.long, device=centers.device)
    reference_blocks = _blocks(len(reference), block_size)
    for r0, r1 in _blocks(len(centers), block_size):
        rows = centers[r0:r1].to(dtype)
        for f0, f1 in reference_blocks:
            value, index = cosine_matrix(rows, reference[f0:f1].to(dtype)).max(dim=1)
            _update_max(best[r0:r1], best_index[r0:r1], value, index + f0)
    leaked = best > threshold
    return Leakage(
        leaked_ids=label_ids[leaked],
        leaked_max_cosines=best[leaked],
        leaked_reference_indices=best_index[leaked],
        max_cosines=best,
        threshold=float(threshold),
    )


# --- verification ------------------------------------------------------------------------------


@dataclass
class VerificationScores:
    """Cosine scores of genuine (same identity) and impostor (different identity) image pairs."""

    genuine: torch.Tensor  # [G]
    impostor: torch.Tensor  # [I]
    genuine_pairs: torch.Tensor  # [G, 2] long feature rows
    impostor_pairs: torch.Tensor  # [I, 2]
    genuine_available: int  # unordered genuine pairs in the data
    impostor_available: int

    @property
    def num_genuine(self) -> int:
        return len(self.genuine)

    @property
    def num_impostor(self) -> int:
        return len(self.impostor)


def _all_genuine_pairs(order: torch.Tensor, sorted_labels: torch.Tensor, max_count: int) -> torch.Tensor:
    # In label-sorted order, the members of an identity are contiguous: pair positions p and p + d.
    pairs = [torch.empty(0, 2, dtype=torch.long)]
    for offset in range(1, max_count):
        same = torch.nonzero(sorted_labels[:-offset] == sorted_labels[offset:]).squeeze(1)
        pairs.append(torch.stack([order[same], order[same + offset]], dim=1))
    return torch.cat(pairs)


def _all_impostor_pairs(order: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    # Every image of an identity against every image of the identities after it in sorted order.
    pairs = [torch.empty(0, 2, dtype=torch.long)]
    for start, count in zip(starts.tolist(), counts.tolist()):
        members, later = order[start : start + count], order[start + count :]
        pairs.append(torch.stack([members.repeat_interleave(len(later)), later.repeat(len(members))], dim=1))
    return torch.cat(pairs)


def _sample_genuine_pairs(order, starts, counts, num_pairs: int, generator: torch.Generator) -> torch.Tensor:
    # Identity with probability ∝ n(n-1), then two distinct members: uniform over ordered genuine pairs.
    weights = (counts * (counts - 1)).double()
    cdf = torch.cumsum(weights, dim=0)
    u = torch.rand(num_pairs, generator=generator, dtype=torch.float64) * cdf[-1]
    # rounding may give u == cdf[-1]: fall back to the last identity with two images, never a singleton
    group = torch.searchsorted(cdf, u, right=True).clamp_max(int(torch.nonzero(weights)[-1]))
    n = counts[group]
    first = (torch.rand(num_pairs, generator=generator, dtype=torch.float64) * n).long().clamp_max(n - 1)
    second = (torch.rand(num_pairs, generator=generator, dtype=torch.float64) * (n - 1)).long().clamp_max(n - 2)
    second = second + (second >= first)
    return torch.stack([order[starts[group] + first], order[starts[group] + second]], dim=1)


def _sample_impostor_pairs(labels: torch.Tensor, num_pairs: int, generator: torch.Generator) -> torch.Tensor:
    # Uniform over ordered pairs of distinct images, rejecting same-identity pairs.
    pairs, needed = [], num_pairs
    while needed > 0:
        first = torch.randint(len(labels), (needed,), generator=generator)
        second = torch.randint(len(labels) - 1, (needed,), generator=generator)
        second = second + (second >= first)
        keep = labels[first] != labels[second]
        pairs.append(torch.stack([first[keep], second[keep]], dim=1))
        needed -= int(keep.sum())
    return torch.cat(pairs)


def _pair_cosines(features: torch.Tensor, pairs: torch.Tensor, block_size: int) -> torch.Tensor:
    dtype = _compute_dtype(features)
    pairs = pairs.to(features.device)
    scores = torch.empty(len(pairs), dtype=dtype, device=features.device)
    for start, end in _blocks(len(pairs), block_size):
        chunk = pairs[start:end]
        scores[start:end] = cosine(features[chunk[:, 0]].to(dtype), features[chunk[:, 1]].to(dtype))
    return scores


def genuine_impostor_scores(
    features, labels, num_pairs: int = 100_000, seed: int = 0, *, block_size: int = DEFAULT_BLOCK_SIZE
) -> VerificationScores:
    """Cosine scores of genuine pairs (same label, different images) and impostor pairs.

    Each kind is exhaustive (every unordered pair once) when the data has at most ``num_pairs`` of
    them; otherwise ``num_pairs`` pairs are drawn uniformly, with replacement, from a CPU
    ``torch.Generator`` seeded with ``seed``. ``num_genuine``/``num_impostor`` give the counts used
    (0 genuine when every identity has a single image).
    """
    features = _as_features(features, "features")
    labels = _as_labels(labels, len(features)).cpu()
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"num_pairs must be a positive int, got {num_pairs!r}")
    _check_block_size(block_size)
    generator = torch.Generator().manual_seed(seed)
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    _, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    starts = torch.cumsum(counts, dim=0) - counts
    genuine_available = int((counts * (counts - 1) // 2).sum())
    impostor_available = len(labels) * (len(labels) - 1) // 2 - genuine_available

    if genuine_available <= num_pairs:
        genuine_pairs = _all_genuine_pairs(order, sorted_labels, int(counts.max()) if len(counts) else 0)
    else:
        genuine_pairs = _sample_genuine_pairs(order, starts, counts, num_pairs, generator)
    if impostor_available <= num_pairs:
        impostor_pairs = _all_impostor_pairs(order, starts, counts)
    else:
        impostor_pairs = _sample_impostor_pairs(labels, num_pairs, generator)
    return VerificationScores(
        genuine=_pair_cosines(features, genuine_pairs, block_size),
        impostor=_pair_cosines(features, impostor_pairs, block_size),
        genuine_pairs=genuine_pairs,
        impostor_pairs=impostor_pairs,
        genuine_available=genuine_available,
        impostor_available=impostor_available,
    )


# --- report ------------------------------------------------------------------------------------


def _describe(values: torch.Tensor) -> dict:
    values = values.detach().double().cpu().numpy()
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return {"count": 0, "mean": None, "std": None, "min": None, "p5": None, "p50": None, "p95": None, "max": None}
    p5, p50, p95 = np.percentile(values, [5, 50, 95])
    return {
        "count": int(len(values)),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "p5": float(p5),
        "p50": float(p50),
        "p95": float(p95),
        "max": float(values.max()),
    }


def _histogram(values: torch.Tensor) -> dict:
    values = values.detach().double().cpu().numpy()
    values = np.clip(values[np.isfinite(values)], -1.0, 1.0)  # rounding can put cosines at 1 + 1e-7
    counts, _ = np.histogram(values, bins=HISTOGRAM_BINS, range=(-1.0, 1.0))
    return {"range": [-1.0, 1.0], "bins": HISTOGRAM_BINS, "counts": counts.tolist()}


def analyze_features(
    features,
    labels,
    reference=None,
    *,
    normalize_centers: bool = True,
    intra_threshold: float = 0.3,
    inter_threshold: float = 0.7,
    separability_threshold: float = 0.4,
    separability_counts=None,
    leakage_threshold: float = 0.4,
    num_pairs: int = 100_000,
    far: float = 1e-3,
    seed: int = 0,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict:
    """All metrics of this module as a JSON-serialisable report (with every count used).

    Identity order (for the separability curve) is ascending label. ``reference`` (features
    ``[R, D]``, e.g. real identity centres) enables the leakage check; without it
    ``report["leakage"]`` is None. Cosine histograms (200 bins over [-1, 1]) are included so that
    :func:`write_report` can plot without the features.
    """
    features = _as_features(features, "features")
    labels = _as_labels(labels, len(features))
    if len(features) == 0:
        raise ValueError("features is empty")
    centers, label_ids = identity_centers(features, labels, normalize=normalize_centers)
    images_per_identity = torch.bincount(torch.unique(labels, return_inverse=True)[1])

    intra = intra_class_cosines(features, labels, centers, label_ids, threshold=intra_threshold, block_size=block_size)
    inter = max_neighbour_cosines(centers, threshold=inter_threshold, block_size=block_size)
    curve = separability_curve(centers, separability_counts, threshold=separability_threshold, block_size=block_size)
    scores = genuine_impostor_scores(features, labels, num_pairs, seed, block_size=block_size)

    verification = {
        "num_genuine": scores.num_genuine,
        "num_impostor": scores.num_impostor,
        "genuine_available": scores.genuine_available,
        "impostor_available": scores.impostor_available,
        "seed": seed,
        "genuine": _describe(scores.genuine),
        "impostor": _describe(scores.impostor),
        "genuine_histogram": _histogram(scores.genuine),
        "impostor_histogram": _histogram(scores.impostor),
        "eer": None,
        "eer_threshold": None,
        "far": far,
        "tar": None,
        "tar_threshold": None,
        "far_achieved": None,
    }
    if scores.num_genuine and scores.num_impostor:
        verification["eer"], verification["eer_threshold"] = eer(scores.genuine, scores.impostor)
        at_far = tar_at_far(scores.genuine, scores.impostor, far)
        verification["tar"], verification["tar_threshold"], verification["far_achieved"] = at_far

    leak = None
    if reference is not None:
        found = leakage(centers, label_ids, reference, threshold=leakage_threshold, block_size=block_size)
        leak = {
            "threshold": leakage_threshold,
            "num_reference": len(torch.as_tensor(reference)),
            "num_leaked": len(found.leaked_ids),
            "fraction_leaked": len(found.leaked_ids) / len(centers),
            "leaked_ids": found.leaked_ids.tolist(),
            "leaked_max_cosines": found.leaked_max_cosines.tolist(),
            "leaked_reference_indices": found.leaked_reference_indices.tolist(),
            "max_cosine": _describe(found.max_cosines),
            "histogram": _histogram(found.max_cosines),
        }

    return {
        "num_images": len(features),
        "num_identities": len(centers),
        "feature_dim": features.shape[1],
        "images_per_identity": _describe(images_per_identity),
        "settings": {
            "normalize_centers": normalize_centers,
            "block_size": block_size,
            "num_pairs": num_pairs,
            "seed": seed,
        },
        "intra_class": {
            "threshold": intra_threshold,
            "num_images": len(intra.cosines),
            "num_below": intra.num_below,
            "fraction_below": intra.fraction_below,
            "cosine": _describe(intra.cosines),
            "histogram": _histogram(intra.cosines),
        },
        "inter_class": {
            "threshold": inter_threshold,
            "num_identities": len(inter.cosines),
            "num_above": inter.num_above,
            "fraction_above": inter.fraction_above,
            "max_neighbour_cosine": _describe(inter.cosines),
            "histogram": _histogram(inter.cosines),
        },
        "separability": {
            "threshold": separability_threshold,
            "counts": curve.counts,
            "unique": curve.unique,
            "fraction_unique": [u / k for k, u in zip(curve.counts, curve.unique)],
        },
        "verification": verification,
        "leakage": leak,
    }


def _format(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _summary_markdown(report: dict, plots: list[str]) -> str:
    intra, inter, sep = report["intra_class"], report["inter_class"], report["separability"]
    ver, leak = report["verification"], report["leakage"]
    per_identity = report["images_per_identity"]
    k, unique = sep["counts"][-1], sep["unique"][-1]
    rows = [
        ("Images / identities", f"{report['num_images']} / {report['num_identities']}", f"Feature rows and distinct labels; {_format(per_identity['mean'], 1)} images per identity on average (min {per_identity['min']:.0f}, max {per_identity['max']:.0f})."),
        (f"Intra-class noise (cos < {intra['threshold']})", f"{intra['fraction_below']:.2%} ({intra['num_below']} of {intra['num_images']} images)", METRIC_DEFINITIONS["intra_class"]),
        ("Mean intra-class cosine", _format(intra["cosine"]["mean"]), "Mean over images of the cosine to their identity centre."),
        (f"Inter-class noise (cos > {inter['threshold']})", f"{inter['fraction_above']:.2%} ({inter['num_above']} of {inter['num_identities']} identities)", METRIC_DEFINITIONS["inter_class"]),
        ("Mean max-neighbour cosine", _format(inter["max_neighbour_cosine"]["mean"]), "Mean over identities of the largest cosine to another identity centre."),
        (f"Separability (cos > {sep['threshold']})", f"{unique} of {k} unique ({unique / k:.2%})", METRIC_DEFINITIONS["separability"]),
        ("EER", f"{_format(ver['eer'])} at cos > {_format(ver['eer_threshold'])}", METRIC_DEFINITIONS["eer"] + f" {ver['num_genuine']} genuine / {ver['num_impostor']} impostor pairs."),
        (f"TAR @ FAR={ver['far']:g}", f"{_format(ver['tar'])} at cos > {_format(ver['tar_threshold'])}", METRIC_DEFINITIONS["tar_at_far"]),
    ]
    if leak is not None:
        rows.append(
            (f"Leakage (cos > {leak['threshold']})", f"{leak['num_leaked']} of {report['num_identities']} identities ({leak['fraction_leaked']:.2%})", METRIC_DEFINITIONS["leakage"] + f" {leak['num_reference']} reference features.")
        )
    lines = ["# Feature analysis", "", "| Metric | Value | Definition |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {definition} |" for name, value, definition in rows]
    lines += ["", "## Separability curve", "", "| k | unique | fraction |", "|---|---|---|"]
    shown = sorted(set(np.linspace(0, len(sep["counts"]) - 1, min(len(sep["counts"]), 20)).round().astype(int).tolist()))
    lines += [f"| {sep['counts'][i]} | {sep['unique'][i]} | {sep['fraction_unique'][i]:.4f} |" for i in shown]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _bar_histogram(axes, histogram: dict, label: str | None = None, alpha: float = 1.0) -> None:
    low, high = histogram["range"]
    edges = np.linspace(low, high, histogram["bins"] + 1)
    axes.stairs(histogram["counts"], edges, fill=True, alpha=alpha, label=label)


def _write_plots(report: dict, out_dir: Path) -> list[str]:
    try:
        from matplotlib.figure import Figure  # a Figure without pyplot leaves the global backend alone
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'hsface[build]', or call write_report(..., plots=False)") from error

    def save(name: str, draw) -> str:
        figure = Figure(figsize=(6.4, 4.0), dpi=100, layout="tight")
        draw(figure.add_subplot())
        figure.savefig(out_dir / name, format="png")  # Agg renders PNGs
        return name

    def intra(axes):
        section = report["intra_class"]
        _bar_histogram(axes, section["histogram"])
        axes.axvline(section["threshold"], color="red", linestyle="--", label=f"noise threshold {section['threshold']}")
        axes.set(xlabel="cosine to identity centre", ylabel="images", title="Intra-class cosine")
        axes.legend()

    def inter(axes):
        section = report["inter_class"]
        _bar_histogram(axes, section["histogram"])
        axes.axvline(section["threshold"], color="red", linestyle="--", label=f"noise threshold {section['threshold']}")
        axes.set(xlabel="max cosine to another identity centre", ylabel="identities", title="Max-neighbour cosine")
        axes.legend()

    def separability(axes):
        section = report["separability"]
        axes.plot([0] + section["counts"], [0] + section["unique"], marker="." if len(section["counts"]) < 50 else None, label="unique")
        axes.plot([0, section["counts"][-1]], [0, section["counts"][-1]], color="grey", linestyle=":", label="all unique")
        axes.set(xlabel="first k identities", ylabel="unique identities", title=f"Separability (cos > {section['threshold']})")
        axes.legend()

    def verification(axes):
        section = report["verification"]
        _bar_histogram(axes, section["impostor_histogram"], label=f"impostor ({section['num_impostor']})", alpha=0.6)
        _bar_histogram(axes, section["genuine_histogram"], label=f"genuine ({section['num_genuine']})", alpha=0.6)
        if section["eer_threshold"] is not None:
            axes.axvline(section["eer_threshold"], color="red", linestyle="--", label=f"EER {section['eer']:.4f} at {section['eer_threshold']:.3f}")
        axes.set(xlabel="cosine", ylabel="pairs", title="Genuine / impostor scores")
        axes.legend()

    plots = [
        save("intra_class_cosine.png", intra),
        save("max_neighbour_cosine.png", inter),
        save("separability_curve.png", separability),
        save("genuine_impostor.png", verification),
    ]
    if report["leakage"] is not None:

        def leak(axes):
            section = report["leakage"]
            _bar_histogram(axes, section["histogram"])
            axes.axvline(section["threshold"], color="red", linestyle="--", label=f"leakage threshold {section['threshold']}")
            axes.set(xlabel="max cosine to a reference feature", ylabel="identities", title="Leakage")
            axes.legend()

        plots.append(save("leakage.png", leak))
    return plots


def write_report(report: dict, out_dir, *, plots: bool = True) -> list[Path]:
    """Write ``report.json``, ``summary.md`` and (with ``plots``) PNG plots; returns the paths.

    Plots (matplotlib, imported here): intra-class cosine histogram, max-neighbour histogram,
    separability curve, genuine/impostor histograms with the EER threshold, and the leakage
    histogram when the report has one. Everything is drawn from ``report`` alone.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    names = _write_plots(report, out_dir) if plots else []
    (out_dir / "summary.md").write_text(_summary_markdown(report, names))
    return [out_dir / "report.json", out_dir / "summary.md"] + [out_dir / name for name in names]


def save_sample_grid(images_uint8, labels, path, ncols: int = 8) -> Path:
    """Save a PNG grid of ``[N, H, W, 3]`` uint8 images: one row per identity, ``ncols`` columns.

    Rows follow the labels' order of first appearance; within a row, images keep their input order
    (the first ``ncols`` of the identity); missing cells stay black.
    """
    from PIL import Image

    images = images_uint8.cpu().numpy() if isinstance(images_uint8, torch.Tensor) else np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise TypeError(f"images must be uint8 [N, H, W, 3] (RGB), got {images.dtype} {images.shape}")
    labels = _as_labels(labels, len(images)).tolist()
    if len(images) == 0:
        raise ValueError("no images to put in the grid")
    if ncols < 1:
        raise ValueError(f"ncols must be positive, got {ncols}")
    rows: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        rows.setdefault(label, []).append(index)
    height, width = images.shape[1:3]
    canvas = np.zeros((len(rows) * height, ncols * width, 3), dtype=np.uint8)
    for row, members in enumerate(rows.values()):
        for column, index in enumerate(members[:ncols]):
            canvas[row * height : (row + 1) * height, column * width : (column + 1) * width] = images[index]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path, format="PNG")
    return path
