"""Per-identity structure and identity against identity (paper Fig. 5, Fig. 11/12, appendix A.3).

Intra-class cosines to the identity centres, the largest cosine to another identity's centre
(inter-class noise), the separability curve, and leakage against reference features. The
all-against-all functions work on ``block_size x block_size`` tiles of cosines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..feature_math import cosine, cosine_matrix, l2_normalize
from .common import (
    DEFAULT_BLOCK_SIZE,
    SEPARABILITY_STEP,
    _as_features,
    _as_labels,
    _blocks,
    _check_block_size,
    _check_threshold,
    _compute_dtype,
    _running_maxima,
    _update_max,
)


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
    best, best_index = _running_maxima(len(centers), dtype, centers.device)
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
    best, best_index = _running_maxima(len(centers), dtype, centers.device)
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
