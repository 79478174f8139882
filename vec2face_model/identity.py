"""Identity vectors (paper section 3.2): the prior, τ-bounded sampling and the σ-mix perturbation.

:class:`IdentityPrior` is "PCA without reduction": the mean and the full covariance of real identity
features, stored in the PCA basis. It is fitted on *un-normalised* features, because the Vec2Face
generator was trained on raw ArcFace features (norms of about 20-30) and every σ of the perturbation
is on that scale. It lives here because saved pipeline folders name it ``vec2face_model.identity``.

The other identity concerns have their own modules, re-exported here so that
``from vec2face_model.identity import X`` works for all of them:

* :mod:`.identity_sampling` — :func:`sample_identities`, identities with pairwise cosine ≤ τ;
* :mod:`.perturbation` — :func:`perturb`, the σ mix that turns one identity into many images, and
  the official ``sample_nearby_vectors`` kept as a parity reference;
* :mod:`.identity_vectors` — :func:`validate_identity_vectors`, the input checks.

Everything is tensor in, tensor out; randomness always comes from an explicit seed or generator.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from .identity_sampling import IdentitySample, SamplingBudgetError, sample_identities
from .identity_vectors import as_float_matrix, validate_identity_vectors
from .perturbation import PerturbationError, PerturbedVectors, official_sample_nearby_vectors, perturb, sigma_counts

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

# Rows of un-normalised features accumulated per step while fitting (bounds float64 copies to ~256 MiB).
_FIT_CHUNK_ROWS = 65536


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
        features = as_float_matrix(features, "features")
        return cls(dim=features.shape[1]).fit(features)

    @torch.no_grad()
    def fit(self, features: torch.Tensor | np.ndarray) -> IdentityPrior:
        """Fit mean and full covariance on un-normalised features [N, dim] (N ≥ 2); returns ``self``.

        Equivalent to ``sklearn.decomposition.PCA(n_components=min(N, dim), whiten=False)`` with the
        missing directions (N < dim) completed at variance 0; computed as the eigendecomposition of
        the float64 sample covariance, which stays well defined when N < dim.
        """
        features = as_float_matrix(features, "features")
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
