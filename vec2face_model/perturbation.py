"""The σ-mix perturbation (paper section 3.2): one identity vector → many image vectors.

* :func:`perturb` — per identity, exactly the requested mix of σ levels; every vector is a function
  of ``(seed, global identity index, image index)``, so any slice of identities can be generated alone.
* :func:`official_sample_nearby_vectors` — the official ``sample_nearby_vectors`` reproduced bit-exactly;
  a parity reference only (tests compare it with the official fixture), hsface uses :func:`perturb`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from . import seeding
from .errors import HSFaceError, InvalidInputError
from .feature_math import cosine, rescale_to_norm
from .identity_vectors import as_float_matrix, validate_identity_vectors

__all__ = ["PerturbationError", "PerturbedVectors", "official_sample_nearby_vectors", "perturb", "sigma_counts"]

# Identities whose noise is held at once in perturb (256·50·512 float32 = 25 MiB).
_PERTURB_CHUNK_IDS = 256



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


def _perturbation_rng_seed(seed: int, identity: int, attempt: int) -> int:
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

    Determinism: identity ``i`` draws its first ``[k, dim]`` noise from a torch.Generator seeded with
    ``SeedSequence([seed, identity_offset + i, 0])``, and redraw attempt ``a`` of its image ``j``
    takes row ``j`` of a ``[k, dim]`` draw seeded with ``[seed, identity_offset + i, a]``. So every
    output row depends only on ``(seed, global identity index, j, k)`` and the identity vector:
    perturbing a slice with ``identity_offset`` reproduces the matching rows of the whole.
    """
    identities = as_float_matrix(identities, "identities")
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

    rng = torch.Generator()
    vectors = torch.empty(num_ids, k, dim)
    cos = torch.empty(num_ids, k)
    noise = torch.empty(min(num_ids, _PERTURB_CHUNK_IDS), k, dim)
    for start in range(0, num_ids, _PERTURB_CHUNK_IDS):
        stop = min(start + _PERTURB_CHUNK_IDS, num_ids)
        for i in range(start, stop):
            rng.manual_seed(_perturbation_rng_seed(seed, identity_offset + i, 0))
            torch.randn(k, dim, generator=rng, out=noise[i - start])
        vectors[start:stop], cos[start:stop] = noisy(
            base[start:stop, None, :], noise[: stop - start], sigma_per_image, base_norm[start:stop, None]
        )

    failing = cos < min_similarity
    for i in torch.nonzero(failing.any(dim=1)).flatten().tolist():
        rows = torch.nonzero(failing[i]).flatten()
        for attempt in range(1, max_redraws + 1):
            if len(rows) == 0:
                break
            rng.manual_seed(_perturbation_rng_seed(seed, identity_offset + i, attempt))
            redraw = torch.randn(k, dim, generator=rng)[rows]
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
