"""Dataset analysis on planted structure: clusters, near-duplicates, leaks, score overlaps, blockwise = dense."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vec2face_model.analysis import (
    analyze_features,
    genuine_impostor_scores,
    identity_centers,
    intra_class_cosines,
    leakage,
    max_neighbour_cosines,
    save_sample_grid,
    separability_curve,
    write_report,
)
from vec2face_model.feature_math import cosine, cosine_matrix

BLOCK_SIZES = [1, 2, 5, 7, 36, 37, 100]  # 5 and 7 do not divide the sizes used below


def orthonormal(dim: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T  # rows are orthonormal


def random_norms(n: int, seed: int) -> torch.Tensor:
    return 5 + 25 * torch.rand(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def clusters(num_ids=8, per_id=10, dim=32, spread=0.01, seed=0):
    """Tight, un-normalised clusters around orthogonal directions; labels are 100, 103, 106, ..."""
    g = torch.Generator().manual_seed(seed)
    directions = orthonormal(dim, seed)[:num_ids]
    base = directions.repeat_interleave(per_id, dim=0)
    features = (base + spread * torch.randn(base.shape, generator=g, dtype=torch.float64)) * random_norms(len(base), seed + 1)
    labels = (100 + 3 * torch.arange(num_ids)).repeat_interleave(per_id)
    return features, labels, directions


def planted_duplicates():
    """60 orthogonal identity centres, with planted similar pairs (cosines exact by construction).

    10 ~ 3 (0.9), 20 ~ 5 (0.9), 41 ~ 20 (0.8) hence 41 ~ 5 (0.72), 30 ~ 7 (0.5).
    """
    q = orthonormal(128, seed=1)
    centers = q[:60].clone()
    centers[10] = 0.9 * q[3] + math.sqrt(0.19) * q[60]
    centers[20] = 0.9 * q[5] + math.sqrt(0.19) * q[61]
    centers[41] = 0.8 * centers[20] + 0.6 * q[62]
    centers[30] = 0.5 * q[7] + math.sqrt(0.75) * q[63]
    return centers * random_norms(60, seed=2)


def dense_first_conflict(centers, threshold):
    above = torch.triu(cosine_matrix(centers) > threshold, diagonal=1)
    return torch.tensor([int(torch.nonzero(col)[0]) if col.any() else -1 for col in above.T])


def dense_unique(centers, k, threshold):
    """The official measurement, literally: strict upper triangle of the first k, column-wise."""
    above = torch.triu(cosine_matrix(centers[:k]) > threshold, diagonal=1)
    return int((~above.any(dim=0)).sum())


# --- centres and intra-class ---------------------------------------------------------------------


def test_identity_centers_sorted_ids_and_normalisation_choice():
    features = torch.tensor([[10.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    labels = np.array([7, 7, 2])
    centers, ids = identity_centers(features, labels)
    assert ids.tolist() == [2, 7]
    torch.testing.assert_close(centers, torch.tensor([[0.6, 0.8], [0.5, 0.5]]))
    raw, _ = identity_centers(features, labels, normalize=False)
    torch.testing.assert_close(raw, torch.tensor([[3.0, 4.0], [5.0, 0.5]]))
    assert centers.dtype == torch.float32
    assert identity_centers(features.double(), labels)[0].dtype == torch.float64


def test_tight_orthogonal_clusters():
    features, labels, directions = clusters()
    centers, ids = identity_centers(features, labels)
    assert ids.tolist() == (100 + 3 * torch.arange(8)).tolist()
    assert (cosine(centers, directions) > 0.999).all()

    intra = intra_class_cosines(features, labels, centers, ids)
    assert intra.cosines.shape == (80,)
    assert intra.cosines.min() > 0.99
    assert intra.num_below == 0 and intra.fraction_below == 0.0

    inter = max_neighbour_cosines(centers)
    assert inter.cosines.abs().max() < 0.05
    assert inter.num_above == 0

    curve = separability_curve(centers, counts=[1, 4, 8])
    assert curve.unique == [1, 4, 8]


def test_intra_class_noise_counts_planted_mislabels():
    features, labels, _ = clusters(num_ids=4, per_id=10)
    wrong = [3, 17, 25]  # give these images the feature of another identity (mislabelled images)
    features[wrong] = features[[35, 5, 8]]
    centers, ids = identity_centers(features, labels)
    intra = intra_class_cosines(features, labels, centers, ids, threshold=0.3)
    assert torch.nonzero(intra.cosines < 0.3).squeeze(1).tolist() == wrong
    assert intra.fraction_below == pytest.approx(3 / 40)


def test_intra_class_label_mapping():
    features, labels, _ = clusters(num_ids=3, per_id=4)
    centers, ids = identity_centers(features, labels)
    shuffled = torch.tensor([2, 0, 1])
    by_ids = intra_class_cosines(features, labels, centers[shuffled], ids[shuffled]).cosines
    torch.testing.assert_close(by_ids, intra_class_cosines(features, labels, centers, ids).cosines)
    with pytest.raises(ValueError, match="label_ids"):
        intra_class_cosines(features, labels, centers)  # labels 100.. are no row indices
    with pytest.raises(ValueError, match="no centre"):
        intra_class_cosines(features, labels + 1, centers, ids)
    by_rows = intra_class_cosines(features, (labels - 100) // 3, centers).cosines
    torch.testing.assert_close(by_rows, by_ids)


# --- planted near-duplicates -----------------------------------------------------------------------


def test_max_neighbour_finds_exactly_the_planted_duplicates():
    inter = max_neighbour_cosines(planted_duplicates(), threshold=0.7)
    above = torch.nonzero(inter.cosines > 0.7).squeeze(1).tolist()
    assert above == [3, 5, 10, 20, 41]
    assert inter.num_above == 5 and inter.fraction_above == pytest.approx(5 / 60)
    expected = {3: (10, 0.9), 10: (3, 0.9), 5: (20, 0.9), 20: (5, 0.9), 41: (20, 0.8), 7: (30, 0.5), 30: (7, 0.5)}
    for row, (neighbour, value) in expected.items():
        assert int(inter.neighbours[row]) == neighbour
        assert float(inter.cosines[row]) == pytest.approx(value, abs=1e-12)


def test_separability_curve_exact_counts_on_planted_duplicates():
    curve = separability_curve(planted_duplicates(), counts=[10, 11, 20, 21, 30, 31, 41, 42, 60], threshold=0.4)
    assert curve.unique == [10, 10, 19, 19, 28, 28, 38, 38, 56]
    conflicts = {j: int(i) for j, i in enumerate(curve.first_conflict) if i >= 0}
    assert conflicts == {10: 3, 20: 5, 30: 7, 41: 5}  # 41 ~ 20 (0.8) but 5 is earlier (0.72)
    # 30 ~ 7 at 0.5 is a conflict at 0.4 but not at 0.6
    assert separability_curve(planted_duplicates(), counts=[60], threshold=0.6).unique == [57]


def test_separability_default_counts():
    centers = planted_duplicates()
    assert separability_curve(centers).counts == [60]
    big = torch.randn(2500, 8, generator=torch.Generator().manual_seed(0))
    assert separability_curve(big, threshold=1.0).counts == [1000, 2000, 2500]
    assert separability_curve(big, threshold=1.0).unique == [1000, 2000, 2500]
    with pytest.raises(ValueError, match="counts"):
        separability_curve(centers, counts=[61])


# --- leakage -------------------------------------------------------------------------------------


def test_leakage_returns_exactly_the_planted_ids():
    q = orthonormal(128, seed=3)
    centers = q[:20] * random_norms(20, seed=4)
    label_ids = torch.arange(20) * 10 + 1000
    reference = [q[40:90]]  # unrelated real identities
    planted = {2: 0.6, 7: 0.9, 11: 0.45}
    for k, (row, cos) in enumerate(planted.items()):
        reference.append((cos * q[row] + math.sqrt(1 - cos**2) * q[90 + k])[None])
    reference.append((0.3 * q[5] + math.sqrt(0.91) * q[100])[None])  # similar, but below 0.4
    reference = torch.cat(reference) * 7.0

    found = leakage(centers, label_ids, reference, threshold=0.4)
    assert found.leaked_ids.tolist() == [1020, 1070, 1110]
    torch.testing.assert_close(found.leaked_max_cosines, torch.tensor([0.6, 0.9, 0.45], dtype=torch.float64))
    assert found.leaked_reference_indices.tolist() == [50, 51, 52]
    assert float(found.max_cosines[5]) == pytest.approx(0.3)
    assert leakage(centers, label_ids, reference, threshold=0.5).leaked_ids.tolist() == [1020, 1070]


# --- blockwise = dense -------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_blockwise_equals_dense(block_size):
    g = torch.Generator().manual_seed(5)
    centers = torch.randn(37, 16, generator=g, dtype=torch.float64) * 3  # cosines spread ~ ±0.25: many conflicts at 0.4
    reference = torch.randn(23, 16, generator=g, dtype=torch.float64)
    sim = cosine_matrix(centers)

    dense = sim.clone().fill_diagonal_(-math.inf).max(dim=1)
    inter = max_neighbour_cosines(centers, block_size=block_size)
    torch.testing.assert_close(inter.cosines, dense.values, rtol=0, atol=1e-12)
    assert torch.equal(inter.neighbours, dense.indices)

    curve = separability_curve(centers, counts=range(1, 38), threshold=0.4, block_size=block_size)
    assert torch.equal(curve.first_conflict, dense_first_conflict(centers, 0.4))
    assert curve.unique == [dense_unique(centers, k, 0.4) for k in range(1, 38)]
    assert 0 < curve.unique[-1] < 30  # the case is not trivial

    dense_leak = cosine_matrix(centers, reference).max(dim=1)
    found = leakage(centers, torch.arange(37), reference, threshold=0.4, block_size=block_size)
    torch.testing.assert_close(found.max_cosines, dense_leak.values, rtol=0, atol=1e-12)
    assert found.leaked_ids.tolist() == torch.nonzero(dense_leak.values > 0.4).squeeze(1).tolist()
    assert torch.equal(found.leaked_reference_indices, dense_leak.indices[dense_leak.values > 0.4])

    labels = torch.arange(37) % 5
    intra_centers, ids = identity_centers(centers, labels)
    intra = intra_class_cosines(centers, labels, intra_centers, ids, block_size=block_size)
    torch.testing.assert_close(intra.cosines, cosine(centers, intra_centers[labels]), rtol=0, atol=1e-12)

    scores = genuine_impostor_scores(centers, labels, num_pairs=50, block_size=block_size)
    reference_scores = genuine_impostor_scores(centers, labels, num_pairs=50, block_size=1000)
    torch.testing.assert_close(scores.genuine, reference_scores.genuine, rtol=0, atol=1e-12)
    torch.testing.assert_close(scores.impostor, reference_scores.impostor, rtol=0, atol=1e-12)


def test_blockwise_float32_and_numpy_input():
    centers = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    inter = max_neighbour_cosines(centers, block_size=7)
    assert inter.cosines.dtype == torch.float32
    dense = cosine_matrix(torch.from_numpy(centers)).fill_diagonal_(-math.inf).max(dim=1).values
    torch.testing.assert_close(inter.cosines, dense, rtol=0, atol=1e-5)
    curve = separability_curve(centers, counts=[30], threshold=0.5, block_size=4)
    assert curve.unique == [dense_unique(torch.from_numpy(centers).double(), 30, 0.5)]


def test_single_identity_has_no_neighbour():
    inter = max_neighbour_cosines(torch.ones(1, 4))
    assert inter.cosines.tolist() == [-math.inf] and inter.neighbours.tolist() == [-1]
    assert separability_curve(torch.ones(1, 4)).unique == [1]


# --- verification scores -------------------------------------------------------------------------


def test_exhaustive_pairs_when_few():
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    features = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    scores = genuine_impostor_scores(features, labels, num_pairs=100)
    genuine = {tuple(sorted(p)) for p in scores.genuine_pairs.tolist()}
    impostor = {tuple(sorted(p)) for p in scores.impostor_pairs.tolist()}
    assert genuine == {(0, 2), (0, 5), (2, 5), (1, 4)}
    assert impostor == {(i, j) for i in range(6) for j in range(i + 1, 6) if labels[i] != labels[j]}
    assert (scores.num_genuine, scores.num_impostor) == (4, 11)
    assert (scores.genuine_available, scores.impostor_available) == (4, 11)
    torch.testing.assert_close(scores.genuine, cosine(features[scores.genuine_pairs[:, 0]], features[scores.genuine_pairs[:, 1]]))


def test_sampled_pairs_valid_and_seeded():
    labels = torch.arange(50).repeat_interleave(6)
    features = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    scores = genuine_impostor_scores(features, labels, num_pairs=500, seed=3)
    assert (scores.num_genuine, scores.num_impostor) == (500, 500)
    assert scores.genuine_available == 750 and scores.impostor_available == 300 * 299 // 2 - 750
    g, i = scores.genuine_pairs, scores.impostor_pairs
    assert (labels[g[:, 0]] == labels[g[:, 1]]).all() and (g[:, 0] != g[:, 1]).all()
    assert (labels[i[:, 0]] != labels[i[:, 1]]).all()
    torch.testing.assert_close(scores.impostor, cosine(features[i[:, 0]], features[i[:, 1]]))
    again = genuine_impostor_scores(features, labels, num_pairs=500, seed=3)
    assert torch.equal(again.genuine_pairs, g) and torch.equal(again.impostor_pairs, i)
    assert not torch.equal(genuine_impostor_scores(features, labels, num_pairs=500, seed=4).genuine_pairs, g)


def test_genuine_sampling_weights_identities_by_pair_count():
    labels = torch.tensor([0, 0] + [1] * 10 + [2])  # 1 and 45 genuine pairs; the singleton has none
    scores = genuine_impostor_scores(torch.randn(13, 4), labels, num_pairs=20_000)
    share = float((labels[scores.genuine_pairs[:, 0]] == 0).double().mean())
    assert share == pytest.approx(2 / 92, abs=5 * math.sqrt(0.02 * 0.98 / 20_000))


def test_no_genuine_pairs_when_all_singletons():
    scores = genuine_impostor_scores(torch.randn(5, 4), torch.arange(5))
    assert scores.num_genuine == 0 and scores.num_impostor == 10


# --- report ------------------------------------------------------------------------------------


def test_analyze_and_write_report(tmp_path):
    features, labels, directions = clusters(num_ids=6, per_id=8, dim=32)
    reference = torch.cat([3 * directions[[1, 4]], orthonormal(32, seed=0)[6:16]])  # identities 103, 112 leaked
    report = analyze_features(features.float(), labels, reference.float(), num_pairs=500, separability_counts=[2, 6])

    json.dumps(report, allow_nan=False)
    assert report["num_images"] == 48 and report["num_identities"] == 6 and report["feature_dim"] == 32
    assert report["intra_class"]["num_below"] == 0 and report["intra_class"]["num_images"] == 48
    assert report["inter_class"]["num_above"] == 0
    assert report["separability"]["unique"] == [2, 6]
    ver = report["verification"]
    assert ver["num_genuine"] == 6 * 28 and ver["num_impostor"] == 500  # all 6·C(8,2) genuine; 960 impostor pairs exist
    assert ver["eer"] == 0.0 and ver["tar"] == 1.0
    assert sum(ver["genuine_histogram"]["counts"]) == ver["num_genuine"]
    assert report["leakage"]["leaked_ids"] == [103, 112]
    assert report["leakage"]["num_reference"] == 12

    written = write_report(report, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == sorted(
        ["report.json", "summary.md", "intra_class_cosine.png", "max_neighbour_cosine.png", "separability_curve.png", "genuine_impostor.png", "leakage.png"]
    )
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| Metric | Value | Definition |" in summary
    for metric in ["Intra-class noise", "Inter-class noise", "Separability", "EER", "TAR @ FAR", "Leakage"]:
        assert f"| {metric}" in summary
    for path in written:
        if path.suffix == ".png":
            with Image.open(path) as image:
                assert image.format == "PNG" and image.size == (640, 400)
                assert len(np.unique(np.asarray(image.convert("L")))) > 5  # something was drawn


def test_report_without_reference_or_genuine_pairs(tmp_path):
    features = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    report = analyze_features(features, torch.arange(20))
    assert report["leakage"] is None and report["verification"]["eer"] is None
    written = write_report(report, tmp_path, plots=False)
    assert [p.name for p in written] == ["report.json", "summary.md"]
    assert "| EER | n/a" in (tmp_path / "summary.md").read_text()


def test_save_sample_grid(tmp_path):
    colours = np.arange(8, dtype=np.uint8)[:, None, None, None] * 30 + 10
    images = np.broadcast_to(colours, (8, 112, 112, 3)).copy()
    labels = np.array([5, 9, 5, 9, 9, 9, 9, 1])  # rows: 5 (2 images), 9 (5 images), 1 (1 image)
    path = save_sample_grid(images, labels, tmp_path / "grid.png", ncols=4)
    with Image.open(path) as image:
        assert image.size == (4 * 112, 3 * 112)
        grid = np.asarray(image.convert("RGB"))
    cell = lambda row, col: grid[row * 112 + 56, col * 112 + 56]  # noqa: E731
    assert cell(0, 0).tolist() == images[0, 0, 0].tolist() and cell(0, 1).tolist() == images[2, 0, 0].tolist()
    assert cell(1, 3).tolist() == images[5, 0, 0].tolist()  # the 4th image of identity 9; the 5th is cut
    assert cell(0, 2).tolist() == [0, 0, 0] and cell(2, 1).tolist() == [0, 0, 0]
    assert cell(2, 0).tolist() == images[7, 0, 0].tolist()
    with pytest.raises(TypeError, match="uint8"):
        save_sample_grid(images.astype(np.float32), labels, tmp_path / "bad.png")


def test_input_validation():
    with pytest.raises(TypeError, match="integers"):
        identity_centers(torch.randn(3, 4), torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="one label per feature"):
        identity_centers(torch.randn(3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="block_size"):
        max_neighbour_cosines(torch.randn(3, 4), block_size=0)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        separability_curve(torch.randn(3, 4), threshold=1.5)
