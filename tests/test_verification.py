"""vec2face_model/verification.py: the one home of verification metrics (k-fold accuracy, TAR@FAR, EER, ROC)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vec2face_model import analysis
from vec2face_model.verification import (
    eer,
    find_threshold,
    kfold_accuracy,
    roc_points,
    tar_at_far,
    verification_metrics,
)


# -- 10-fold accuracy and TAR@FAR on pair lists ------------------------------------------------------------------------------------


def test_separable_scores_give_full_accuracy_and_thresholds_between_classes():
    rng = np.random.default_rng(0)
    genuine = rng.uniform(0.5, 0.9, 300)
    impostor = rng.uniform(-0.2, 0.3, 300)
    issame = rng.permutation(np.r_[np.ones(300, bool), np.zeros(300, bool)])
    sim = np.empty(600)
    sim[issame], sim[~issame] = genuine, impostor

    result = verification_metrics(sim, issame)

    assert result["accuracy"] == 1.0 and result["accuracy_std"] == 0.0
    assert len(result["thresholds"]) == 10 and len(result["fold_accuracies"]) == 10
    assert all(impostor.max() < t < genuine.min() for t in result["thresholds"])
    assert result["tar"] == 1.0


def test_shuffled_labels_give_chance_accuracy():
    rng = np.random.default_rng(1)
    sim = rng.uniform(-1, 1, 6000)
    issame = rng.random(6000) < 0.5
    assert abs(verification_metrics(sim, issame)["accuracy"] - 0.5) < 0.04


def test_hand_computed_two_fold_case_with_tie_break():
    # Fold 1 trains on pairs 2,3 (0.3 genuine, 0.6 impostor): accept-all and reject-all (0.6) both
    # score 1/2 there, the tie goes to the larger threshold 0.6, and pairs 0,1 are then both right.
    # Fold 2 trains on pairs 0,1: threshold (0.9 + 0.5) / 2 = 0.7 gets pair 3 right, pair 2 wrong.
    sim = np.array([0.9, 0.5, 0.3, 0.6])
    issame = np.array([True, False, True, False])

    result = verification_metrics(sim, issame, n_folds=2)

    assert result["thresholds"] == pytest.approx([0.6, 0.7])
    assert result["fold_accuracies"] == [1.0, 0.5]
    assert result["accuracy"] == pytest.approx(0.75) and result["accuracy_std"] == pytest.approx(0.25)


def test_find_threshold_uses_strict_rule_and_midpoints():
    threshold, accuracy = find_threshold(np.array([0.2, 0.4, 0.4, 0.8]), np.array([False, False, True, True]))
    # Candidates 0.2-, 0.3, 0.6, 0.8: 0.3 and 0.6 both get 3/4 right; the tie goes to the larger.
    assert threshold == pytest.approx(0.6) and accuracy == 0.75
    threshold, accuracy = find_threshold(np.array([0.5, 0.5]), np.array([True, True]))
    assert threshold < 0.5 and accuracy == 1.0  # accept-all needs a threshold just below the minimum


def test_tar_at_far_on_distinct_scores():
    impostor = np.arange(2000) / 4000  # 0 .. 0.49975
    genuine = np.array([0.2, 0.4, 0.4995, 0.6, 0.9])
    sim = np.r_[impostor, genuine]
    issame = np.r_[np.zeros(2000, bool), np.ones(5, bool)]

    result = verification_metrics(sim, issame, far=1e-3)

    # 2 false accepts allowed: the threshold is the 3rd largest impostor score, 1997/4000.
    assert result["far_threshold"] == pytest.approx(1997 / 4000)
    assert result["far_achieved"] == pytest.approx(1e-3)
    assert result["tar"] == pytest.approx(3 / 5)
    assert tar_at_far(genuine, impostor, far=1e-3) == (result["tar"], result["far_threshold"], result["far_achieved"])


def test_tar_at_far_with_tied_top_impostors():
    impostor = np.r_[np.full(5, 0.8), np.linspace(-0.5, 0.5, 1995)]
    genuine = np.array([0.79, 0.81, 0.95])
    sim = np.r_[impostor, genuine]
    issame = np.r_[np.zeros(2000, bool), np.ones(3, bool)]

    result = verification_metrics(sim, issame, far=1e-3)

    # Any threshold below 0.8 lets 5 > 2 impostors through, so 0.8 is the smallest allowed.
    assert result["far_threshold"] == 0.8 and result["far_achieved"] == 0.0
    assert result["tar"] == pytest.approx(2 / 3)


def test_protocol_rejects_bad_input():
    with pytest.raises(TypeError, match="boolean"):
        verification_metrics(np.zeros(20), np.zeros(20))
    with pytest.raises(ValueError, match="n_folds"):
        verification_metrics(np.zeros(5), np.zeros(5, bool))
    with pytest.raises(ValueError, match="NaN"):
        verification_metrics(np.full(20, np.nan), np.zeros(20, bool))


# --- EER / TAR -----------------------------------------------------------------------------------


def test_eer_zero_for_disjoint_ranges():
    g = torch.Generator().manual_seed(0)
    genuine = 0.6 + 0.4 * torch.rand(1000, generator=g)
    impostor = -0.2 + 0.6 * torch.rand(5000, generator=g)
    rate, threshold = eer(genuine, impostor)
    assert rate == 0.0
    assert threshold == pytest.approx(float(impostor.max()))
    assert tar_at_far(genuine, impostor, far=1e-3)[0] == 1.0


def test_eer_hand_computed():
    # At t=1: FAR 2/3, FRR 1/2; at t=2: FAR 1/3, FRR 1/2 -> the gap crosses half way: EER 1/2 at 1.5.
    assert eer([1.0, 3.0], [0.0, 2.0, 4.0]) == pytest.approx((0.5, 1.5))
    # At t=2.5 one of four impostors is above and one of four genuine is at or below: EER 1/4 exactly.
    assert eer([2.5, 3.5, 4.5, 5.5], [0.0, 1.0, 2.0, 3.0]) == pytest.approx((0.25, 2.5))
    # Swapped roles: everything is misclassified.
    assert eer([0.0], [1.0])[0] == pytest.approx(1.0)


def test_eer_between_empirical_bounds():
    g = torch.Generator().manual_seed(1)
    genuine = 0.5 + 0.2 * torch.randn(300, generator=g, dtype=torch.float64)
    impostor = 0.1 * torch.randn(700, generator=g, dtype=torch.float64)
    rate, threshold = eer(genuine, impostor)
    points = torch.cat([torch.tensor([-math.inf]), torch.unique(torch.cat([genuine, impostor]))])
    far = (impostor[None] > points[:, None]).double().mean(1)
    frr = (genuine[None] <= points[:, None]).double().mean(1)
    assert float(torch.minimum(far, frr).max()) <= rate <= float(torch.maximum(far, frr).min())
    assert 0.0 < rate < 0.2
    far_at, frr_at = float((impostor > threshold).double().mean()), float((genuine <= threshold).double().mean())
    assert abs(far_at - rate) <= 1 / 300 + 1 / 700 and abs(frr_at - rate) <= 1 / 300 + 1 / 700


def test_tar_at_far_hand_computed():
    impostor = torch.arange(1000) / 1000
    tar, threshold, far_achieved = tar_at_far([0.5, 0.99, 0.995, 1.0], impostor, far=1e-2)
    assert threshold == pytest.approx(0.989) and tar == 0.75 and far_achieved == pytest.approx(0.01)
    assert float((impostor > threshold).double().mean()) == pytest.approx(0.01)
    # ties at the cut: the threshold is the tied score, so no impostor is accepted
    tied = torch.tensor([0.9] * 5 + [0.1] * 995, dtype=torch.float64)  # the same 0.9 as the genuine list
    assert tar_at_far([0.95, 0.9], tied, far=1e-3) == pytest.approx((0.5, 0.9, 0.0))


def test_score_validation():
    with pytest.raises(ValueError, match="empty"):
        eer([], [0.1])
    with pytest.raises(ValueError, match="far"):
        tar_at_far([0.5], [0.1], far=0.0)




def test_roc_points_and_one_rule_for_analysis_and_eval():
    thresholds, far, tar = roc_points([0.2, 0.6, 0.9], [0.1, 0.6, 0.7, 0.8])
    assert thresholds[0] == -math.inf and list(thresholds[1:]) == [0.1, 0.2, 0.6, 0.7, 0.8, 0.9]
    assert list(far) == [1.0, 0.75, 0.75, 0.5, 0.25, 0.0, 0.0]  # strict: the impostor at 0.6 is rejected at t=0.6
    assert list(tar) == pytest.approx([1.0, 1.0, 2 / 3, 1 / 3, 1 / 3, 1 / 3, 0.0])
    # the dataset analysis uses these very functions (no second copy)
    assert analysis.tar_at_far is tar_at_far and analysis.eer is eer


def test_far_count_is_exact_for_decimal_rates():
    # 1e-3 * 3000 is 2.9999999999999996 in floating point: the rule must still allow 3 false accepts.
    impostor = np.arange(3000, dtype=np.float64)
    result = tar_at_far([2997.5, 2995.5], impostor, far=1e-3)
    assert result.threshold == 2996.0 and result.far_achieved == pytest.approx(1e-3) and result.tar == 0.5


def test_kfold_accuracy_keys_and_torch_input():
    sim = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.3])
    issame = torch.tensor([True, False, True, False, True, False])
    result = kfold_accuracy(sim, issame, n_folds=3)
    assert result["accuracy"] == 1.0 and result["num_pairs"] == 6 and len(result["thresholds"]) == 3
    metrics = verification_metrics(sim, issame, n_folds=3)
    assert metrics["eer"] == 0.0 and metrics["tar"] == 1.0
    with pytest.raises(ValueError, match="genuine and impostor"):
        verification_metrics(sim[::2], issame[::2], n_folds=3)
