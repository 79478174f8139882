"""Verification metrics on pair scores, in one place: k-fold accuracy, TAR@FAR, EER and ROC points.

Used by the dataset analysis (:mod:`vec2face_model.analysis`, genuine/impostor pairs of a built
dataset) and by the face-verification recipe (``recipes/eval_fr.py``, LFW-style pair lists).

One decision rule everywhere: a pair is accepted ("same identity") when ``score > t`` — strict, like
insightface's ``distance < threshold``. Scores are cosines (any real numbers work); everything is
computed in float64 on the CPU. Operating points are exact (no threshold grid):

* :func:`find_threshold` / :func:`kfold_accuracy`: insightface's protocol — the threshold with the
  best accuracy on 9 folds (candidates: midpoints between consecutive distinct scores, plus
  accept-all and reject-all; ties to the largest) is applied to the held-out fold;
* :func:`tar_at_far`: the smallest threshold whose false-accept rate is at most ``far``, which is
  an impostor score: the ``(k+1)``-th largest for ``k = floor(far · #impostors)``. This is the rule
  that never exceeds the requested FAR (an interpolated threshold could), and the achieved FAR is
  reported beside it; ``k`` is computed exactly from the decimal ``far`` (``1e-3 · 3000`` is 3, not
  2.9999…), where the two earlier copies of this function used different rounding guards;
* :func:`roc_points` / :func:`eer`: the empirical ROC over every distinct score, and the equal error
  rate where FAR and FRR cross, interpolated linearly between the two operating points around it.

``sklearn.metrics.roc_curve`` is not used: it accepts ``score >= t``, so its thresholds would mean
something else than everywhere else here. ``sklearn.model_selection.KFold`` does the folds.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import numpy as np

from .errors import InvalidInputError

__all__ = ["RocPoints", "TarAtFar", "eer", "find_threshold", "kfold_accuracy", "roc_points", "split_scores",
           "tar_at_far", "verification_metrics"]


class TarAtFar(NamedTuple):
    tar: float  # fraction of genuine scores > threshold
    threshold: float
    far_achieved: float  # fraction of impostor scores > threshold (<= the requested far)


class RocPoints(NamedTuple):
    """Operating points ``t = -inf`` and every distinct score, ascending: ``far``/``tar`` fall from 1."""

    thresholds: np.ndarray
    far: np.ndarray  # fraction of impostor scores > t
    tar: np.ndarray  # fraction of genuine scores > t (1 - FRR)


def _scores(values, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, on any device
        values = values.detach().cpu().double().numpy()
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise InvalidInputError(f"{name} must be 1-D scores, got shape {values.shape}")
    if not len(values):
        raise InvalidInputError(f"{name} is empty: need at least one score")
    if not np.isfinite(values).all():
        raise InvalidInputError(f"{name} contains NaN or inf; check the embeddings")
    return values


def _pairs(sim, issame) -> tuple[np.ndarray, np.ndarray]:
    sim = _scores(sim, "sim")
    issame = np.asarray(issame.cpu() if hasattr(issame, "cpu") else issame)
    if issame.dtype != bool:
        raise TypeError(f"issame must be boolean, got {issame.dtype}")
    if sim.shape != issame.shape:
        raise InvalidInputError(f"sim and issame must be 1-D and equally long, got {sim.shape} and {issame.shape}")
    return sim, issame


def split_scores(sim, issame) -> tuple[np.ndarray, np.ndarray]:
    """``(genuine, impostor)`` scores of a pair list."""
    sim, issame = _pairs(sim, issame)
    return sim[issame], sim[~issame]


def find_threshold(sim, issame) -> tuple[float, float]:
    """The threshold with the best accuracy on these pairs, and that accuracy.

    Candidates are exact: the midpoints between consecutive distinct scores, the largest score
    (reject all) and the float just below the smallest (accept all). Ties go to the largest threshold.
    """
    sim, issame = _pairs(sim, issame)
    distinct = np.unique(sim)
    candidates = np.concatenate(([np.nextafter(distinct[0], -np.inf)], (distinct[:-1] + distinct[1:]) / 2, distinct[-1:]))
    genuine, impostor = np.sort(sim[issame]), np.sort(sim[~issame])
    true_accepts = len(genuine) - np.searchsorted(genuine, candidates, side="right")
    true_rejects = np.searchsorted(impostor, candidates, side="right")
    accuracy = (true_accepts + true_rejects) / len(sim)
    best = len(candidates) - 1 - int(np.argmax(accuracy[::-1]))
    return float(candidates[best]), float(accuracy[best])


def kfold_accuracy(sim, issame, n_folds: int = 10) -> dict:
    """Insightface's verification accuracy: ``KFold(n_folds)`` without shuffling, each fold judged
    with :func:`find_threshold` of the others.

    Returns ``accuracy`` (mean over folds), ``accuracy_std`` (population std), ``fold_accuracies``,
    ``thresholds`` (one per fold) and ``num_pairs``.
    """
    from sklearn.model_selection import KFold

    sim, issame = _pairs(sim, issame)
    if not 2 <= n_folds <= len(sim):
        raise InvalidInputError(f"n_folds must be between 2 and the number of pairs ({len(sim)}), got {n_folds}")
    thresholds, accuracies = [], []
    for train, test in KFold(n_splits=n_folds, shuffle=False).split(sim):
        threshold, _ = find_threshold(sim[train], issame[train])
        thresholds.append(threshold)
        accuracies.append(float(np.mean((sim[test] > threshold) == issame[test])))
    return {"accuracy": float(np.mean(accuracies)), "accuracy_std": float(np.std(accuracies)),
            "fold_accuracies": accuracies, "thresholds": thresholds, "num_pairs": len(sim)}


def tar_at_far(genuine, impostor, far: float = 1e-3) -> TarAtFar:
    """True-accept rate at a false-accept rate of at most ``far`` (see the module docstring for the rule).

    The resolution is ``1 / len(impostor)``: with fewer than ``1 / far`` impostors the threshold is
    the largest impostor score (``far_achieved`` 0). Tied impostor scores at the cut stay rejected.
    """
    genuine, impostor = _scores(genuine, "genuine"), _scores(impostor, "impostor")
    if not 0 < far < 1:
        raise InvalidInputError(f"far must lie in (0, 1), got {far}")
    allowed = math.floor(Fraction(repr(float(far))) * len(impostor))  # exact: < len(impostor) as far < 1
    threshold = float(np.sort(impostor)[::-1][allowed])
    return TarAtFar(float(np.mean(genuine > threshold)), threshold, float(np.mean(impostor > threshold)))


def roc_points(genuine, impostor) -> RocPoints:
    """The empirical ROC: FAR and TAR at ``t = -inf`` and at every distinct score."""
    genuine, impostor = np.sort(_scores(genuine, "genuine")), np.sort(_scores(impostor, "impostor"))
    thresholds = np.concatenate(([-np.inf], np.unique(np.concatenate([genuine, impostor]))))
    far = (len(impostor) - np.searchsorted(impostor, thresholds, side="right")) / len(impostor)
    tar = (len(genuine) - np.searchsorted(genuine, thresholds, side="right")) / len(genuine)
    return RocPoints(thresholds, far, tar)


def eer(genuine, impostor) -> tuple[float, float]:
    """Equal error rate and its threshold on the empirical ROC (:func:`roc_points`).

    ``FAR - FRR`` falls from 1 (``t = -inf``) to -1; between the last operating point where it is
    positive and the first where it is ``<= 0`` both rates (and the threshold) are interpolated
    linearly, and the EER is the rate where they meet. Fully separated scores give 0 with ``t`` the
    largest impostor score.
    """
    thresholds, far, tar = roc_points(genuine, impostor)
    gap = far - (1.0 - tar)
    k = int(np.flatnonzero(gap <= 0)[0])  # exists: at the largest score FAR = 0 and FRR = 1
    weight = float(gap[k - 1] / (gap[k - 1] - gap[k]))
    rate = float(far[k - 1] + weight * (far[k] - far[k - 1]))
    upper = float(thresholds[k])
    threshold = upper if k == 1 else float(thresholds[k - 1]) + weight * (upper - float(thresholds[k - 1]))
    return rate, threshold


def verification_metrics(sim, issame, n_folds: int = 10, far: float = 1e-3) -> dict:
    """Everything a verification report needs from a pair list, JSON-ready.

    :func:`kfold_accuracy`'s keys, plus ``tar``, ``far``, ``far_threshold``, ``far_achieved``
    (:func:`tar_at_far` on all pairs, no cross-validation) and ``eer``, ``eer_threshold``.
    """
    result = kfold_accuracy(sim, issame, n_folds)
    genuine, impostor = split_scores(sim, issame)
    if not len(genuine) or not len(impostor):
        raise InvalidInputError("TAR@FAR and EER need both genuine and impostor pairs")
    at_far = tar_at_far(genuine, impostor, far)
    rate, threshold = eer(genuine, impostor)
    return {**result, "tar": at_far.tar, "far": far, "far_threshold": at_far.threshold,
            "far_achieved": at_far.far_achieved, "eer": rate, "eer_threshold": threshold}
