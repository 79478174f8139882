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

Modules: :mod:`.identities` (intra-class, inter-class / max-neighbour, separability, leakage),
:mod:`.pairs` (genuine and impostor scores), :mod:`.report` (:func:`analyze_features`, report
files, sample grid). The verification metrics (EER, TAR@FAR) live in :mod:`vec2face_model.verification`
and are re-exported here.
"""

from __future__ import annotations

from ..verification import eer, tar_at_far
from .common import DEFAULT_BLOCK_SIZE
from .identities import (
    IntraClassCosines,
    Leakage,
    MaxNeighbourCosines,
    SeparabilityCurve,
    identity_centers,
    intra_class_cosines,
    leakage,
    max_neighbour_cosines,
    separability_curve,
)
from .pairs import VerificationScores, genuine_impostor_scores
from .report import METRIC_DEFINITIONS, analyze_features, save_sample_grid, write_report

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
