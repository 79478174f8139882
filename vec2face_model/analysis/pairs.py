"""Genuine and impostor verification scores of a labelled feature set (for EER and TAR@FAR).

The metrics themselves (EER, TAR@FAR, ROC points) live in :mod:`vec2face_model.verification`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..feature_math import cosine
from .common import DEFAULT_BLOCK_SIZE, _as_features, _as_labels, _blocks, _check_block_size, _compute_dtype


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
