"""Input checks and tiling shared by the analysis modules."""

from __future__ import annotations

import math

import torch

DEFAULT_BLOCK_SIZE = 4096  # one float32 tile is 64 MiB
SEPARABILITY_STEP = 1000  # the official measurement reports every 1000 identities


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


def _running_maxima(n: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Start values for :func:`_update_max`: maxima ``-inf`` and indices ``-1`` (no candidate yet)."""
    return torch.full((n,), -math.inf, dtype=dtype, device=device), torch.full((n,), -1, dtype=torch.long, device=device)


def _update_max(best: torch.Tensor, best_index: torch.Tensor, value: torch.Tensor, index: torch.Tensor) -> None:
    # Strict ">": candidates arrive in increasing index order, so ties keep the smallest index,
    # exactly like a dense argmax.
    better = value > best
    best[better] = value[better]
    best_index[better] = index[better]
