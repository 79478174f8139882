"""Cosine and normalisation math in one place: every threshold in hsface is a cosine.

These are the only epsilon constants of the package; ``‖a−b‖² = 2 − 2·cos(a, b)`` holds for the
unit vectors returned by :func:`l2_normalize` (tested), so no code path needs a distance metric.
"""

from __future__ import annotations

import torch

NORM_EPS = 1e-12  # guards against division by zero for all-zero vectors only


def l2_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(NORM_EPS)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise cosine similarities ``[len(a), len(b)]`` (``b`` defaults to ``a``)."""
    a = l2_normalize(a)
    b = a if b is None else l2_normalize(b)
    return a @ b.transpose(-1, -2)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two equally shaped batches."""
    return (l2_normalize(a) * l2_normalize(b)).sum(-1)


def rescale_to_norm(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` rescaled to the given L2 norms (broadcast ``[N]`` or ``[N, 1]``)."""
    norm = norm.reshape(*norm.shape, 1) if norm.dim() == x.dim() - 1 else norm
    return l2_normalize(x) * norm

