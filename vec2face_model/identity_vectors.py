"""Checking identity-vector inputs: what every identity-level function accepts as "vectors".

Identity vectors are *un-normalised* face-recognition features (ArcFace norms of about 20-30): the
direction is the identity, the norm sets the scale of every σ in :mod:`.perturbation`.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import InvalidInputError

__all__ = ["as_float_matrix", "validate_identity_vectors"]


def as_float_matrix(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """``x`` as a floating-point [N, dim] tensor (numpy arrays are wrapped, not copied); TypeError/ValueError otherwise."""
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
