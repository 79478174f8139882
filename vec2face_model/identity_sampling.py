"""Identity sampling (paper section 3.2): mutually dissimilar identities drawn from a prior.

:func:`sample_identities` draws from an :class:`~vec2face_model.identity.IdentityPrior` (or any
``sampler(n, generator)``) and keeps a candidate only if its cosine to every kept vector is ≤ τ
(exact check, greedy in draw order). The official repository does not contain this step
(ARCHITECTURE.md section 6.3). Re-exported by :mod:`vec2face_model.identity`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import HSFaceError, InvalidInputError
from .feature_math import l2_normalize
from .identity_vectors import as_float_matrix

if TYPE_CHECKING:
    from .identity import IdentityPrior

__all__ = ["IdentitySample", "SamplingBudgetError", "sample_identities"]

# sampler(n, generator) -> [n, dim] candidate identity vectors
Sampler = Callable[[int, torch.Generator], torch.Tensor]

# Elements of one candidate-vs-kept score block: cache-sized on CPU (8 MiB, ~1.4x faster GEMMs than
# 256 MiB blocks there), large on accelerators where each block costs a launch and a sync.
_SCORE_BLOCK_ELEMENTS_CPU = 1 << 21
_SCORE_BLOCK_ELEMENTS_ACCELERATOR = 1 << 26
# Candidates checked together (performance only; results do not depend on it), see sample_identities.
_MIN_SEGMENT, _MAX_SEGMENT = 256, 1024


class SamplingBudgetError(HSFaceError, RuntimeError):
    """``sample_identities`` ran out of draws before finding ``n`` vectors."""

    def __init__(self, message: str, *, num_found: int, num_drawn: int, acceptance_rate: float):
        super().__init__(message)
        self.num_found = num_found
        self.num_drawn = num_drawn
        self.acceptance_rate = acceptance_rate


@dataclass
class IdentitySample:
    """Result of :func:`sample_identities`.

    Attributes:
        vectors: [n, dim] float32 accepted vectors, in acceptance (= draw) order, un-normalised.
        num_drawn: candidates examined up to and including the n-th acceptance.
        num_rejected_tau: candidates rejected for a cosine > τ to an earlier accepted vector.
        num_rejected_exclude: candidates rejected for a cosine > ``exclude_tau`` to an excluded feature.
        acceptance_rate: ``n / num_drawn``.
    """

    vectors: torch.Tensor
    num_drawn: int
    num_rejected_tau: int
    num_rejected_exclude: int
    acceptance_rate: float


def _max_cosine_alive(
    candidates_unit: torch.Tensor, reference_unit: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Indices of candidate rows whose cosine to every reference row is ≤ ``threshold``.

    Reference rows are scanned in chunks; candidates that fail are dropped before the next chunk,
    so rejected candidates stop costing GEMM work early.
    """
    alive = torch.arange(len(candidates_unit), device=candidates_unit.device)
    if len(reference_unit) == 0 or len(alive) == 0:
        return alive
    elements = _SCORE_BLOCK_ELEMENTS_CPU if candidates_unit.device.type == "cpu" else _SCORE_BLOCK_ELEMENTS_ACCELERATOR
    chunk = max(1, elements // max(1, len(candidates_unit)))
    current = candidates_unit
    for start in range(0, len(reference_unit), chunk):
        scores = current @ reference_unit[start : start + chunk].T
        ok = scores.amax(dim=1) <= threshold
        if not bool(ok.all()):
            alive, current = alive[ok], current[ok]
            if len(alive) == 0:
                break
    return alive


def _greedy_within_block(block_unit: torch.Tensor, tau: float) -> torch.Tensor | None:
    """Boolean CPU mask: row i is kept iff its cosine to every earlier *kept* row is ≤ τ (None: all kept)."""
    count = len(block_unit)
    if count < 2:
        return None
    scores = block_unit @ block_unit.T
    # Only the strictly lower triangle (earlier rows) matters; -2 is below every cosine.
    upper = torch.ones(count, count, dtype=torch.bool, device=scores.device).triu_()
    scores.masked_fill_(upper, -2.0)
    conflicted_rows = torch.nonzero(scores.amax(dim=1) > tau).flatten()
    if len(conflicted_rows) == 0:
        return None
    # Only rows that conflict with an earlier row need a decision; rows decide in draw order because
    # a rejected earlier row no longer blocks later ones.
    conflict_rows = (scores[conflicted_rows] > tau).cpu().numpy()
    keep = torch.ones(count, dtype=torch.bool)
    keep_np = keep.numpy()  # shares memory with keep
    for row, conflict in zip(conflicted_rows.tolist(), conflict_rows):
        if conflict[:row][keep_np[:row]].any():
            keep_np[row] = False
    return keep


def _subset(indices: torch.Tensor, selected: torch.Tensor | None) -> torch.Tensor:
    """``indices[selected]``; ``selected`` is an index tensor or mask, and None means all."""
    if selected is None or len(selected) == len(indices) and selected.dtype != torch.bool:
        return indices
    return indices[selected.to(indices.device)]


@torch.no_grad()
def sample_identities(
    prior_or_sampler: IdentityPrior | Sampler,
    n: int,
    tau: float = 0.3,
    seed: int = 0,
    exclude: torch.Tensor | np.ndarray | None = None,
    exclude_tau: float = 0.4,
    block_size: int = 4096,
    max_draws: int | None = None,
    progress: bool | dict = False,
    device: torch.device | str | None = None,
) -> IdentitySample:
    """``n`` vectors whose pairwise cosine similarities are all ≤ ``tau``.

    Candidates are drawn in blocks of ``block_size`` from ``prior_or_sampler`` (an :class:`IdentityPrior`
    or a callable ``sampler(n, generator) -> [n, dim]``) with a ``torch.Generator`` seeded with ``seed``.
    A candidate is accepted iff its cosine to every previously accepted vector (including earlier
    ones of its own block) is ≤ ``tau`` and, if ``exclude`` [m, dim] is given, its cosine to every
    excluded feature is ≤ ``exclude_tau``. The checks are exact (float32 GEMMs over the whole
    accepted set; keep TF32 matmuls off on GPUs), and the result is deterministic for fixed
    ``(seed, block_size, device)``. Because decisions are greedy in draw order, the result for ``n``
    is a prefix of the result for any larger ``n`` (a bigger dataset extends a smaller one).

    Memory is ``O(n·dim)`` (one pre-normalised buffer of accepted vectors) plus a bounded score block.
    Work is about ``n²·dim`` multiply-adds at full acceptance.

    Args:
        prior_or_sampler: fitted prior, or ``sampler(n, generator)``.
        n: number of vectors to return.
        tau: pairwise cosine bound, in [-1, 1] (paper: 0.3).
        seed: seed of the candidate random stream (non-negative).
        exclude: features the new identities must stay away from (e.g. real identities), or ``None``.
        exclude_tau: cosine bound to ``exclude``.
        block_size: candidates drawn per generator call; part of the random stream, so changing it
            changes the result (checking happens in smaller segments internally).
        max_draws: candidate budget; default ``20·n + 10_000``. Exhausting it raises
            :class:`SamplingBudgetError` with the observed acceptance rate.
        progress: show a tqdm progress bar; a mapping gives its keyword arguments (e.g. a pipeline's
            ``set_progress_bar_config``).
        device: where the checks run; default the prior's device (CPU for callables). The
            torch.Generator lives on this device and is passed to callables.
    """
    if n < 0:
        raise InvalidInputError(f"n must be non-negative, got {n}")
    if not -1.0 <= tau <= 1.0:
        raise ValueError(f"tau is a cosine bound and must lie in [-1, 1], got {tau}")
    if not -1.0 <= exclude_tau <= 1.0:
        raise ValueError(f"exclude_tau is a cosine bound and must lie in [-1, 1], got {exclude_tau}")
    if block_size < 1:
        raise ValueError(f"block_size must be ≥ 1, got {block_size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if max_draws is None:
        max_draws = 20 * n + 10_000
    if max_draws < n:
        raise ValueError(f"max_draws ({max_draws}) must be at least n ({n})")

    from .identity import IdentityPrior  # identity.py re-exports this module: import here, not at the top

    if isinstance(prior_or_sampler, IdentityPrior):
        prior = prior_or_sampler
        if not prior.is_fitted:
            raise RuntimeError("IdentityPrior is not fitted: fit it on identity features before sampling")
        device = torch.device(device) if device is not None else prior.mean.device
        if prior.mean.device != device:
            prior = copy.deepcopy(prior).to(device)  # .to() is in place; leave the caller's prior where it is
        dim = prior.config.dim
        sampler: Sampler = prior.sample
    elif callable(prior_or_sampler):
        sampler = prior_or_sampler
        device = torch.device(device) if device is not None else torch.device("cpu")
        dim = None
    else:
        raise TypeError(f"prior_or_sampler must be an IdentityPrior or a callable sampler(n, generator), got {type(prior_or_sampler).__name__}")

    rng = torch.Generator(device=device)
    rng.manual_seed(seed)
    segment_size = min(_MAX_SEGMENT, max(_MIN_SEGMENT, n // 64))

    exclude_unit = None
    if exclude is not None:
        exclude_unit = l2_normalize(as_float_matrix(exclude, "exclude").to(device, torch.float32))

    kept_unit: torch.Tensor | None = None  # [n, dim] preallocated once the dimension is known
    kept_raw: torch.Tensor | None = None
    num_kept = num_drawn = rejected_tau = rejected_exclude = 0

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, **{"desc": "sampling identities", "unit": "id", **(progress if isinstance(progress, dict) else {})})
    try:
        while num_kept < n:
            if num_drawn >= max_draws:
                rate = num_kept / max(num_drawn, 1)
                raise SamplingBudgetError(
                    f"sampling budget exhausted: found {num_kept} of {n} identities after {num_drawn} draws "
                    f"(max_draws={max_draws}, observed acceptance rate {rate:.4g}). Raise tau (now {tau}) "
                    f"or exclude_tau, lower n, or raise max_draws if the rate suggests it would finish.",
                    num_found=num_kept,
                    num_drawn=num_drawn,
                    acceptance_rate=rate,
                )
            # The full block is always drawn so the candidate stream does not depend on max_draws or n.
            block = sampler(block_size, rng)
            if not isinstance(block, torch.Tensor) or block.dim() != 2 or len(block) != block_size:
                raise ValueError(
                    f"sampler must return a tensor of shape [{block_size}, dim], got "
                    f"{getattr(block, 'shape', type(block).__name__)}"
                )
            block = block.to(device, torch.float32)
            if kept_unit is None:
                dim = block.shape[1] if dim is None else dim
                if block.shape[1] != dim:
                    raise ValueError(f"sampler returned dim {block.shape[1]}, expected {dim}")
                if exclude_unit is not None and exclude_unit.shape[1] != dim:
                    raise ValueError(f"exclude has dim {exclude_unit.shape[1]} but the samples have dim {dim}")
                kept_unit = torch.empty(n, dim, device=device)
                kept_raw = torch.empty(n, dim, device=device)
            elif block.shape[1] != dim:
                raise ValueError(f"sampler returned dim {block.shape[1]}, expected {dim}")
            if not bool(torch.isfinite(block).all()):
                raise ValueError("sampler returned NaN or Inf values")
            block = block[: max_draws - num_drawn]  # the budget counts examined candidates
            block_unit = l2_normalize(block)

            # The block is checked in consecutive segments, each against everything accepted before it
            # (earlier segments included), which gives exactly the decisions of checking it whole. Small
            # segments bound the block-internal cosine matrix (its work is ~segment/n of the total)
            # and, sized by the observed acceptance rate, avoid checking candidates that are not needed.
            offset = 0
            while offset < len(block) and num_kept < n:
                rate = num_kept / num_drawn if num_drawn else 1.0
                wanted = math.ceil((n - num_kept) / max(rate, 1e-3) * 1.1) + 8
                size = min(len(block) - offset, segment_size, wanted)
                segment_unit = block_unit[offset : offset + size]

                # Index tensors into the segment; a full-length one is always arange, so no gather is needed.
                candidates = torch.arange(size, device=device)
                if exclude_unit is not None:
                    candidates = _max_cosine_alive(segment_unit, exclude_unit, exclude_tau)
                candidate_unit = segment_unit if len(candidates) == size else segment_unit[candidates]
                survivors = _subset(candidates, _max_cosine_alive(candidate_unit, kept_unit[:num_kept], tau))
                survivor_unit = segment_unit if len(survivors) == size else segment_unit[survivors]
                survivors = _subset(survivors, _greedy_within_block(survivor_unit, tau))

                take = min(len(survivors), n - num_kept)
                accepted = survivors[:take]
                # Candidates after the n-th acceptance were never needed, so they do not count as drawn.
                examined = int(accepted[-1]) + 1 if take == n - num_kept and take > 0 else size
                excluded_examined = examined - int((candidates < examined).sum())
                rejected_exclude += excluded_examined
                rejected_tau += examined - excluded_examined - take
                num_drawn += examined

                kept_unit[num_kept : num_kept + take] = segment_unit[accepted]
                kept_raw[num_kept : num_kept + take] = block[offset + accepted]
                num_kept += take
                offset += size
                if bar is not None:
                    bar.update(take)
                    bar.set_postfix(acceptance=f"{num_kept / max(num_drawn, 1):.3f}")
    finally:
        if bar is not None:
            bar.close()

    vectors = kept_raw if kept_raw is not None else torch.empty(0, dim or 0, device=device)
    return IdentitySample(
        vectors=vectors,
        num_drawn=num_drawn,
        num_rejected_tau=rejected_tau,
        num_rejected_exclude=rejected_exclude,
        acceptance_rate=num_kept / num_drawn if num_drawn else 1.0,
    )
