"""Identity vectors (paper section 3.2): a Gaussian prior over face-recognition features, sampling of
mutually dissimilar identities, and the σ-mix perturbation that turns one identity into many images.

* :class:`IdentityPrior` — "PCA without reduction": the mean and the full covariance of real identity
  features, stored in the PCA basis. Fitted on *un-normalised* features, because the generator was
  trained on raw ArcFace features (norms of about 20-30) and every σ below is on that scale.
* :func:`sample_identities` — draws from a prior (or any ``sampler(n, generator)``) and keeps a
  candidate only if its cosine to every kept vector is ≤ τ (exact check, greedy in draw order).
  The official repository does not contain this step (ARCHITECTURE.md section 6.3).
* :func:`perturb` — per identity, exactly the requested mix of σ levels; every vector is a function
  of ``(seed, global identity index, image index)``, so any slice of identities can be generated alone.
* :func:`official_sample_nearby_vectors` — the official ``sample_nearby_vectors`` reproduced bit-exactly
  (parity reference only; hsface uses :func:`perturb`).

Everything is tensor in, tensor out; randomness always comes from an explicit seed or generator.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from . import seeding
from .errors import HSFaceError, InvalidInputError
from .feature_math import cosine, l2_normalize, rescale_to_norm

__all__ = [
    "IdentityPrior",
    "IdentitySample",
    "PerturbedVectors",
    "PerturbationError",
    "SamplingBudgetError",
    "official_sample_nearby_vectors",
    "perturb",
    "sample_identities",
    "sigma_counts",
    "validate_identity_vectors",
]

# sampler(n, generator) -> [n, dim] candidate identity vectors
Sampler = Callable[[int, torch.Generator], torch.Tensor]

# Rows of un-normalised features accumulated per step while fitting (bounds float64 copies to ~256 MiB).
_FIT_CHUNK_ROWS = 65536
# Elements of one candidate-vs-kept score block: cache-sized on CPU (8 MiB, ~1.4x faster GEMMs than
# 256 MiB blocks there), large on accelerators where each block costs a launch and a sync.
_SCORE_BLOCK_ELEMENTS_CPU = 1 << 21
_SCORE_BLOCK_ELEMENTS_ACCELERATOR = 1 << 26
# Candidates checked together (performance only; results do not depend on it), see sample_identities.
_MIN_SEGMENT, _MAX_SEGMENT = 256, 1024
# Identities whose noise is held at once in perturb (256·50·512 float32 = 25 MiB).
_PERTURB_CHUNK_IDS = 256


def _as_float_tensor(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [N, dim], got {tuple(x.shape)}")
    return x


def validate_identity_vectors(vectors, dim: int = 512, *, name: str = "identity_vectors", single: bool = False) -> torch.Tensor:
    """``vectors`` as a float32 [N, dim] tensor (a single [dim] vector becomes [1, dim]), or an
    :class:`InvalidInputError` saying what is wrong: not numeric, wrong shape, empty, NaN/inf, all-zero.

    ``single=True`` requires exactly one vector. Identity vectors are un-normalised features: their
    norm sets the norm of every image vector, so a zero vector has no direction and no scale.
    """
    if isinstance(vectors, np.ndarray):
        if not np.issubdtype(vectors.dtype, np.number) or np.issubdtype(vectors.dtype, np.complexfloating):
            raise InvalidInputError(f"{name} must hold real numbers, got numpy dtype {vectors.dtype}")
        vectors = torch.from_numpy(np.ascontiguousarray(vectors))
    if not isinstance(vectors, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor or numpy.ndarray of shape [N, {dim}], got {type(vectors).__name__}")
    if vectors.dtype == torch.bool or vectors.is_complex():
        raise InvalidInputError(f"{name} must hold real numbers, got {vectors.dtype}")
    shape = tuple(vectors.shape)
    if vectors.dim() == 1 and shape[0] == dim:
        vectors = vectors.unsqueeze(0)
    if vectors.dim() != 2 or vectors.shape[1] != dim:
        wanted = f"a {dim}-d vector" if single else f"[N, {dim}] (or one {dim}-d vector)"
        raise InvalidInputError(f"{name} must have shape {wanted}, got {shape}")
    if len(vectors) == 0:
        raise InvalidInputError(f"{name} is empty (shape {shape}): pass at least one vector")
    if single and len(vectors) != 1:
        raise InvalidInputError(f"{name} must be a single {dim}-d vector, got {len(vectors)} vectors")
    vectors = vectors.float()
    bad = (~torch.isfinite(vectors).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise InvalidInputError(f"{name} rows {bad[:10]} contain NaN or inf values ({len(bad)} of {len(vectors)} rows); pass finite features")
    zero = (vectors.norm(dim=1) == 0).nonzero().flatten().tolist()
    if zero:
        raise InvalidInputError(
            f"{name} rows {zero[:10]} are all zeros ({len(zero)} of {len(vectors)} rows); an identity vector's "
            "direction is the identity and its norm the images' norm, so it must be non-zero"
        )
    return vectors


# --------------------------------------------------------------------------------------------------
# Prior
# --------------------------------------------------------------------------------------------------


class IdentityPrior(ModelMixin, ConfigMixin):
    """Gaussian prior of identity features: ``mean + z @ components`` with ``z ~ N(0, diag(variances))``.

    ``components`` holds the PCA basis as rows (orthonormal, sorted by decreasing variance, each row
    signed so its largest-magnitude entry is positive); ``variances`` are the (unbiased) variances
    along those rows. Nothing is discarded, so the covariance is reproduced in full. Directions not
    spanned by the fitted data (fewer samples than dimensions) get variance 0.

    Args:
        dim: feature dimension (512 for ArcFace).
    """

    @register_to_config
    def __init__(self, dim: int = 512):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("components", torch.eye(dim))
        self.register_buffer("variances", torch.zeros(dim))
        # 0 marks an unfitted prior; saved with the buffers so a loaded prior knows it was fitted.
        self.register_buffer("num_fitted", torch.zeros((), dtype=torch.int64))

    @property
    def is_fitted(self) -> bool:
        return int(self.num_fitted) > 0

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray) -> IdentityPrior:
        """A prior of matching ``dim`` fitted on ``features`` [N, dim]."""
        features = _as_float_tensor(features, "features")
        return cls(dim=features.shape[1]).fit(features)

    @torch.no_grad()
    def fit(self, features: torch.Tensor | np.ndarray) -> IdentityPrior:
        """Fit mean and full covariance on un-normalised features [N, dim] (N ≥ 2); returns ``self``.

        Equivalent to ``sklearn.decomposition.PCA(n_components=min(N, dim), whiten=False)`` with the
        missing directions (N < dim) completed at variance 0; computed as the eigendecomposition of
        the float64 sample covariance, which stays well defined when N < dim.
        """
        features = _as_float_tensor(features, "features")
        num, dim = features.shape
        if dim != self.config.dim:
            raise ValueError(f"features have dim {dim} but the prior was built with dim={self.config.dim}")
        if num < 2:
            raise ValueError(f"fitting a covariance needs at least 2 feature vectors, got {num}")
        if not bool(torch.isfinite(features).all()):
            raise ValueError("features contain NaN or Inf values; clean them before fitting the prior")

        # Two passes in float64 chunks: the exact mean first, then centred scatter (no catastrophic
        # cancellation from E[x²] − E[x]², which matters at feature norms of ~25).
        mean = torch.zeros(dim, dtype=torch.float64)
        for start in range(0, num, _FIT_CHUNK_ROWS):
            mean += features[start : start + _FIT_CHUNK_ROWS].to("cpu", torch.float64).sum(0)
        mean /= num
        scatter = torch.zeros(dim, dim, dtype=torch.float64)
        for start in range(0, num, _FIT_CHUNK_ROWS):
            centred = features[start : start + _FIT_CHUNK_ROWS].to("cpu", torch.float64) - mean
            scatter += centred.T @ centred
        covariance = scatter / (num - 1)

        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        order = torch.argsort(eigenvalues, descending=True, stable=True)
        variances = eigenvalues[order].clamp_min(0.0)  # round-off can make null directions slightly negative
        components = eigenvectors[:, order].T.contiguous()
        # Deterministic signs (as sklearn's svd_flip): the largest-magnitude entry of each row is positive.
        pivot = components.abs().argmax(dim=1)
        signs = torch.sign(components.gather(1, pivot[:, None]))
        components *= torch.where(signs == 0, torch.ones_like(signs), signs)

        device = self.mean.device
        self.mean.copy_(mean.to(device))
        self.components.copy_(components.to(device))
        self.variances.copy_(variances.to(device))
        self.num_fitted.fill_(num)
        return self

    def covariance(self) -> torch.Tensor:
        """Full covariance ``componentsᵀ · diag(variances) · components`` [dim, dim] (float64)."""
        components = self.components.double()
        return components.T @ (self.variances.double()[:, None] * components)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` identity vectors [n, dim] float32, on the prior's device.

        Uses ``generator`` (on the prior's device); without one, a freshly seeded generator is used
        and the global RNG is left untouched.
        """
        if not self.is_fitted:
            raise RuntimeError(
                "IdentityPrior is not fitted: call .fit(features) or IdentityPrior.from_features(features) "
                "on un-normalised identity features, or load a fitted prior with from_pretrained"
            )
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        device = self.mean.device
        if generator is None:
            generator = torch.Generator(device=device)
            generator.seed()
        z = torch.randn(n, self.config.dim, generator=generator, device=device, dtype=torch.float32)
        z *= self.variances.float().sqrt()
        return torch.addmm(self.mean.float(), z, self.components.float())

    def forward(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample(n, generator=generator)


# --------------------------------------------------------------------------------------------------
# Identity sampling with a pairwise cosine bound
# --------------------------------------------------------------------------------------------------


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
        seed: seed of the candidate generator (non-negative).
        exclude: features the new identities must stay away from (e.g. real identities), or ``None``.
        exclude_tau: cosine bound to ``exclude``.
        block_size: candidates drawn per generator call; part of the random stream, so changing it
            changes the result (checking happens in smaller segments internally).
        max_draws: candidate budget; default ``20·n + 10_000``. Exhausting it raises
            :class:`SamplingBudgetError` with the observed acceptance rate.
        progress: show a tqdm progress bar; a mapping gives its keyword arguments (e.g. a pipeline's
            ``set_progress_bar_config``).
        device: where the checks run; default the prior's device (CPU for callables). The
            generator lives on this device and is passed to callables.
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

    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    segment_size = min(_MAX_SEGMENT, max(_MIN_SEGMENT, n // 64))

    exclude_unit = None
    if exclude is not None:
        exclude_unit = l2_normalize(_as_float_tensor(exclude, "exclude").to(device, torch.float32))

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
            block = sampler(block_size, generator)
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


# --------------------------------------------------------------------------------------------------
# Perturbation (σ mix)
# --------------------------------------------------------------------------------------------------


class PerturbationError(HSFaceError, RuntimeError):
    """A perturbed vector stayed below ``min_similarity`` after ``max_redraws`` redraws."""


@dataclass
class PerturbedVectors:
    """Result of :func:`perturb` (identity-major: row ``i·k + j`` is image ``j`` of identity ``i``).

    Attributes:
        vectors: [N·k, dim] float32, each with the norm of its identity vector.
        identity_index: [N·k] long, global identity index (``identity_offset + i``).
        image_index: [N·k] long, image index ``j`` within the identity.
        sigma: [N·k] float32 noise level used.
        cos_to_identity: [N·k] float32 cosine to the identity vector (≥ ``min_similarity``).
    """

    vectors: torch.Tensor
    identity_index: torch.Tensor
    image_index: torch.Tensor
    sigma: torch.Tensor
    cos_to_identity: torch.Tensor


def sigma_counts(images_per_identity: int, fractions: Sequence[float]) -> list[int]:
    """Images per σ level: ``fractions · k`` rounded by the largest-remainder method (sums to ``k``).

    Ties in the remainder go to the earlier level, so the result is deterministic.
    """
    k = images_per_identity
    # Exact rationals: in floats 0.4·5 can land a hair off 2, and the floors must not depend on that.
    rational = [Fraction(f).limit_denominator(10**9) for f in fractions]
    total = sum(rational)
    if total <= 0:
        raise ValueError(f"fractions must have a positive sum, got {list(fractions)}")
    exact = [r * k / total for r in rational]
    counts = [math.floor(x) for x in exact]
    remainders = [x - c for x, c in zip(exact, counts)]
    for level in sorted(range(len(fractions)), key=lambda i: (-remainders[i], i))[: k - sum(counts)]:
        counts[level] += 1
    return counts


def _perturbation_generator_seed(seed: int, identity: int, attempt: int) -> int:
    # Keyed without a stream id (see seeding.STREAM_PERTURB). Always three words: SeedSequence pads
    # short entropy with zeros, so [s, i] would equal [s, i, 0].
    return seeding.derive_seed(seed, identity, attempt)


@torch.no_grad()
def perturb(
    identities: torch.Tensor | np.ndarray,
    images_per_identity: int,
    sigmas: Sequence[float] = (0.3, 0.5, 0.7),
    fractions: Sequence[float] = (0.4, 0.4, 0.2),
    min_similarity: float = 0.5,
    seed: int = 0,
    max_redraws: int = 100,
    identity_offset: int = 0,
) -> PerturbedVectors:
    """``images_per_identity`` noisy copies of every identity vector, with an exact σ mix per identity.

    For identity ``i`` with ``k`` images, the first ``counts[0]`` images use ``sigmas[0]``, the next
    ``counts[1]`` use ``sigmas[1]``, ... with ``counts = sigma_counts(k, fractions)``. Each image is
    ``identity + N(0, σ²·I)`` rescaled to the identity's norm (as the official code does); one whose
    cosine to the identity is < ``min_similarity`` is redrawn. σ is absolute, i.e. on the scale of
    un-normalised FR features (norm ≈ 20-30): unit-norm inputs would be drowned by the noise.

    Determinism: identity ``i`` draws its first ``[k, dim]`` noise from a generator seeded with
    ``SeedSequence([seed, identity_offset + i, 0])``, and redraw attempt ``a`` of its image ``j``
    takes row ``j`` of a ``[k, dim]`` draw seeded with ``[seed, identity_offset + i, a]``. So every
    output row depends only on ``(seed, global identity index, j, k)`` and the identity vector:
    perturbing a slice with ``identity_offset`` reproduces the matching rows of the whole.
    """
    identities = _as_float_tensor(identities, "identities")
    k = images_per_identity
    if k < 1:
        raise InvalidInputError(f"images_per_identity must be ≥ 1, got {k}")
    if len(sigmas) != len(fractions) or len(sigmas) == 0:
        raise ValueError(f"sigmas and fractions must be non-empty and of equal length, got {len(sigmas)} and {len(fractions)}")
    if any(s < 0 for s in sigmas):
        raise ValueError(f"sigmas must be non-negative, got {list(sigmas)}")
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {list(fractions)}")
    if not -1.0 <= min_similarity <= 1.0:
        raise ValueError(f"min_similarity is a cosine and must lie in [-1, 1], got {min_similarity}")
    if seed < 0 or identity_offset < 0 or max_redraws < 0:
        raise ValueError(f"seed, identity_offset and max_redraws must be non-negative, got {seed}, {identity_offset}, {max_redraws}")

    out_device = identities.device
    base = identities.detach().to("cpu", torch.float32)
    num_ids, dim = base.shape
    base_norm = base.norm(dim=1)
    if num_ids:
        validate_identity_vectors(base, dim, name="identities")  # NaN/inf/zero rows, each named

    counts = sigma_counts(k, fractions)
    sigma_per_image = torch.repeat_interleave(
        torch.tensor([float(s) for s in sigmas], dtype=torch.float32), torch.tensor(counts)
    )

    def noisy(rows_base: torch.Tensor, rows_noise: torch.Tensor, rows_sigma: torch.Tensor, rows_norm: torch.Tensor):
        vectors = rescale_to_norm(rows_base + rows_noise * rows_sigma[..., None], rows_norm)
        return vectors, cosine(vectors, rows_base.expand_as(vectors))

    generator = torch.Generator()
    vectors = torch.empty(num_ids, k, dim)
    cos = torch.empty(num_ids, k)
    noise = torch.empty(min(num_ids, _PERTURB_CHUNK_IDS), k, dim)
    for start in range(0, num_ids, _PERTURB_CHUNK_IDS):
        stop = min(start + _PERTURB_CHUNK_IDS, num_ids)
        for i in range(start, stop):
            generator.manual_seed(_perturbation_generator_seed(seed, identity_offset + i, 0))
            torch.randn(k, dim, generator=generator, out=noise[i - start])
        vectors[start:stop], cos[start:stop] = noisy(
            base[start:stop, None, :], noise[: stop - start], sigma_per_image, base_norm[start:stop, None]
        )

    failing = cos < min_similarity
    for i in torch.nonzero(failing.any(dim=1)).flatten().tolist():
        rows = torch.nonzero(failing[i]).flatten()
        for attempt in range(1, max_redraws + 1):
            if len(rows) == 0:
                break
            generator.manual_seed(_perturbation_generator_seed(seed, identity_offset + i, attempt))
            redraw = torch.randn(k, dim, generator=generator)[rows]
            new_vectors, new_cos = noisy(base[i], redraw, sigma_per_image[rows], base_norm[i].expand(len(rows)))
            ok = new_cos >= min_similarity
            vectors[i, rows[ok]] = new_vectors[ok]
            cos[i, rows[ok]] = new_cos[ok]
            rows = rows[~ok]
        if len(rows):
            j = int(rows[0])
            raise PerturbationError(
                f"image {j} of identity {identity_offset + i} (sigma {float(sigma_per_image[j])}) stayed below "
                f"min_similarity={min_similarity} after {max_redraws} redraws. Use smaller sigmas or a lower "
                f"min_similarity; sigmas are absolute, so identity vectors must be un-normalised FR features "
                f"(this identity's norm is {float(base_norm[i]):.3g})."
            )

    identity_index = torch.arange(identity_offset, identity_offset + num_ids).repeat_interleave(k)
    return PerturbedVectors(
        vectors=vectors.reshape(num_ids * k, dim).to(out_device),
        identity_index=identity_index.to(out_device),
        image_index=torch.arange(k).repeat(num_ids).to(out_device),
        sigma=sigma_per_image.repeat(num_ids).to(out_device),
        cos_to_identity=cos.reshape(num_ids * k).to(out_device),
    )


# --------------------------------------------------------------------------------------------------
# Official reference (parity only)
# --------------------------------------------------------------------------------------------------


def official_sample_nearby_vectors(
    base: np.ndarray,
    sigmas: Sequence[float],
    fractions: Sequence[float],
    random_state: np.random.RandomState,
) -> np.ndarray:
    """The official ``sample_nearby_vectors`` (image_generation.py), bit-exact; returns float64.

    Parity/reference path only — hsface uses :func:`perturb`. ``base`` [rows, dim] holds the
    already repeated identity vectors (float32 in the official script). Per σ level it draws
    ``int(rows·fraction)`` rows of float64 normals from ``random_state``, stacks them, shuffles the
    rows over the whole set (so an identity's σ mix is random), adds them to ``base`` and rescales
    each row to the norm of its base row. The norms are taken with torch (float32 for ``base``,
    float64 for the sum), as the official code does; that is what makes the result bit-exact.
    The official code fails with a shape error unless the counts add up to ``rows``; this raises.
    """
    if not isinstance(random_state, np.random.RandomState):
        raise TypeError("random_state must be a numpy.random.RandomState (the legacy stream the official code uses)")
    base = np.asarray(base)
    if base.ndim != 2:
        raise ValueError(f"base must have shape [rows, dim], got {base.shape}")
    rows, dim = base.shape
    counts = [int(rows * fraction) for fraction in fractions]
    if sum(counts) != rows:
        raise ValueError(
            f"int(rows·fraction) gives {counts}, summing to {sum(counts)} instead of rows={rows}; the official "
            "code only works when every rows·fraction is an integer (rows a multiple of 5 for 0.4/0.4/0.2)"
        )
    noise = np.vstack([random_state.normal(0, sigma, (count, dim)) for sigma, count in zip(sigmas, counts)])
    random_state.shuffle(noise)
    summed = torch.from_numpy(base + noise)
    target_norm = torch.from_numpy(base).norm(dim=1, keepdim=True)
    return (summed / summed.norm(dim=1, keepdim=True) * target_norm).numpy()
