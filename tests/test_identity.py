"""Identity prior, τ-bounded identity sampling, σ-mix perturbation and the official perturbation parity."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from vec2face_model import identity_sampling as sampling_module
from vec2face_model.feature_math import cosine_matrix, l2_normalize
from vec2face_model.identity import (
    IdentityPrior,
    PerturbationError,
    SamplingBudgetError,
    perturb,
    sample_identities,
    sigma_counts,
    validate_identity_vectors,
)
from vec2face_model.errors import InvalidInputError
from vec2face_model.perturbation import official_sample_nearby_vectors  # parity reference only

# float32 GEMM rounding of a cosine is ~1e-7; accepted pairs can sit right at τ.
COSINE_ROUNDING = 1e-6


def synthetic_features(num: int, dim: int, seed: int, offset: float) -> torch.Tensor:
    """Anisotropic Gaussian features with a common offset, on the ArcFace scale (norm ≈ 20-30)."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.3, 2.0, dim)
    return torch.randn(num, dim, generator=generator) * scales + offset


@pytest.fixture(scope="module")
def prior512() -> IdentityPrior:
    return IdentityPrior.from_features(synthetic_features(4000, 512, seed=0, offset=0.2))


@pytest.fixture(scope="module")
def prior64() -> IdentityPrior:
    return IdentityPrior.from_features(synthetic_features(3000, 64, seed=1, offset=0.1))


def max_pairwise_cosine_float64(vectors: torch.Tensor) -> float:
    unit = l2_normalize(vectors.double())
    sims = unit @ unit.T
    sims.fill_diagonal_(-2.0)
    return float(sims.max())


# --------------------------------------------------------------------------------------------------
# IdentityPrior
# --------------------------------------------------------------------------------------------------


def test_prior_recovers_mean_covariance_and_scale():
    dim, num = 32, 40_000
    generator = torch.Generator().manual_seed(2)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    stds = torch.linspace(0.2, 3.0, dim, dtype=torch.float64)
    true_cov = rotation @ torch.diag(stds**2) @ rotation.T
    true_mean = torch.full((dim,), 2.0, dtype=torch.float64) + torch.randn(dim, generator=generator, dtype=torch.float64)
    features = (torch.randn(num, dim, generator=generator, dtype=torch.float64) * stds) @ rotation.T + true_mean

    prior = IdentityPrior.from_features(features.float())
    assert int(prior.num_fitted) == num
    # Standard error of a mean entry is ≤ 3/sqrt(40000) = 0.015; of a covariance entry ≤ 9·sqrt(2/40000) ≈ 0.064.
    torch.testing.assert_close(prior.mean.double(), true_mean, atol=0.08, rtol=0)
    torch.testing.assert_close(prior.covariance(), true_cov, atol=0.3, rtol=0)
    torch.testing.assert_close(prior.variances.double(), (stds**2).flip(0), atol=0.3, rtol=0.05)
    # Components are an orthonormal basis.
    components = prior.components.double()
    torch.testing.assert_close(components @ components.T, torch.eye(dim, dtype=torch.float64), atol=1e-5, rtol=0)

    samples = prior.sample(num, generator=torch.Generator().manual_seed(3)).double()
    assert prior.sample(2, torch.Generator()).dtype == torch.float32
    torch.testing.assert_close(samples.mean(0), true_mean, atol=0.08, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), true_cov, atol=0.35, rtol=0)
    # Scale is kept: no normalisation anywhere.
    feature_norm, sample_norm = features.norm(dim=1).mean(), samples.norm(dim=1).mean()
    assert abs(float(sample_norm / feature_norm) - 1) < 0.01


def test_prior_matches_sklearn_pca():
    from sklearn.decomposition import PCA

    features = synthetic_features(600, 48, seed=4, offset=0.5).double().numpy()
    prior = IdentityPrior.from_features(features)
    pca = PCA(n_components=48, whiten=False).fit(features)
    np.testing.assert_allclose(prior.mean.numpy(), pca.mean_, rtol=0, atol=1e-5)
    np.testing.assert_allclose(prior.variances.numpy(), pca.explained_variance_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prior.covariance().numpy(), pca.get_covariance(), rtol=0, atol=1e-5)
    # Same basis up to the sign of each row.
    overlap = np.abs((prior.components.double().numpy() * pca.components_).sum(1))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-4)


def test_prior_with_fewer_samples_than_dimensions_stays_in_their_span():
    features = synthetic_features(20, 64, seed=5, offset=0.3)
    prior = IdentityPrior.from_features(features)
    assert (prior.variances[:19] > 0).all()
    assert float(prior.variances[19:].abs().max()) < 1e-4 * float(prior.variances[0])
    # Draws minus the mean lie in the span of the centred data (no arbitrary extra directions).
    centred = (features - features.mean(0)).double()
    basis = torch.linalg.svd(centred, full_matrices=False).Vh[:19]
    draws = prior.sample(200, torch.Generator().manual_seed(0)).double() - prior.mean.double()
    residual = draws - (draws @ basis.T) @ basis
    assert float(residual.norm() / draws.norm()) < 1e-3


def test_prior_save_load_round_trip_is_exact(tmp_path, prior64):
    prior64.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = IdentityPrior.from_pretrained(tmp_path)
    assert loaded.config.dim == 64
    for name in ("mean", "components", "variances", "num_fitted"):
        assert torch.equal(getattr(loaded, name), getattr(prior64, name)), name
    torch.testing.assert_close(
        loaded.sample(5, torch.Generator().manual_seed(9)), prior64.sample(5, torch.Generator().manual_seed(9)), rtol=0, atol=0
    )


def test_unfitted_prior_refuses_to_sample(tmp_path):
    prior = IdentityPrior(dim=16)
    with pytest.raises(RuntimeError, match="not fitted"):
        prior.sample(3, torch.Generator())
    with pytest.raises(RuntimeError, match="not fitted"):
        sample_identities(prior, 3)
    prior.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="not fitted"):
        IdentityPrior.from_pretrained(tmp_path).sample(3, torch.Generator())


def test_prior_rejects_bad_features():
    with pytest.raises(ValueError, match="dim"):
        IdentityPrior(dim=8).fit(torch.randn(10, 9))
    with pytest.raises(ValueError, match="at least 2"):
        IdentityPrior(dim=8).fit(torch.randn(1, 8))
    with pytest.raises(ValueError, match="NaN"):
        IdentityPrior(dim=2).fit(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(TypeError):
        IdentityPrior(dim=2).fit([[0.0, 1.0], [1.0, 2.0]])


def test_prior_sampling_without_generator_leaves_global_rng_alone(prior64):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    prior64.sample(4)
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------------------------------
# sample_identities
# --------------------------------------------------------------------------------------------------


def test_every_pair_of_sampled_identities_is_below_tau(prior512):
    tau = 0.2  # tight enough that about two thirds of the candidates are rejected
    result = sample_identities(prior512, 2000, tau=tau, seed=1, block_size=512)
    assert result.vectors.shape == (2000, 512) and result.vectors.dtype == torch.float32
    assert max_pairwise_cosine_float64(result.vectors) <= tau + COSINE_ROUNDING
    assert result.num_rejected_tau > 1000
    assert result.num_drawn == 2000 + result.num_rejected_tau + result.num_rejected_exclude
    assert result.acceptance_rate == pytest.approx(2000 / result.num_drawn)
    # Un-normalised: accepted vectors keep the prior's scale.
    assert float(result.vectors.norm(dim=1).mean()) > 10


def test_sampling_equals_a_sequential_greedy_reference(prior64):
    """The blocked implementation makes exactly the decisions of a one-candidate-at-a-time loop."""
    drawn_blocks = []

    def recording_sampler(count, generator):
        block = prior64.sample(count, generator)
        drawn_blocks.append(block)
        return block

    exclude = prior64.sample(300, torch.Generator().manual_seed(77))
    tau, exclude_tau, n = 0.45, 0.5, 400
    result = sample_identities(recording_sampler, n, tau=tau, seed=3, exclude=exclude, exclude_tau=exclude_tau, block_size=64)

    pairwise = cosine_matrix(torch.cat(drawn_blocks)).numpy()
    excluded = (cosine_matrix(torch.cat(drawn_blocks), exclude) > exclude_tau).any(dim=1).numpy()
    kept, drawn, rejected_tau, rejected_exclude = [], 0, 0, 0
    for index in range(len(pairwise)):
        if len(kept) == n:
            break
        drawn += 1
        if excluded[index]:
            rejected_exclude += 1
        elif kept and pairwise[index, kept].max() > tau:
            rejected_tau += 1
        else:
            kept.append(index)
    assert len(kept) == n
    assert torch.equal(result.vectors, torch.cat(drawn_blocks)[kept])
    assert (result.num_drawn, result.num_rejected_tau, result.num_rejected_exclude) == (drawn, rejected_tau, rejected_exclude)
    assert rejected_tau > 50 and rejected_exclude > 20  # both paths, and many in-block conflicts, were exercised
    assert len(drawn_blocks) > 5


def test_chunked_scoring_gives_the_same_result(prior64, monkeypatch):
    expected = sample_identities(prior64, 300, tau=0.45, seed=5, block_size=128)
    # Force tiny score blocks: many kept-set chunks and early dropping of rejected candidates.
    monkeypatch.setattr(sampling_module, "_SCORE_BLOCK_ELEMENTS_CPU", 500)
    chunked = sample_identities(prior64, 300, tau=0.45, seed=5, block_size=128)
    assert torch.equal(chunked.vectors, expected.vectors)
    assert chunked.num_drawn == expected.num_drawn


def test_segment_size_does_not_change_the_result(prior64, monkeypatch):
    expected = sample_identities(prior64, 300, tau=0.45, seed=6, block_size=256)
    monkeypatch.setattr(sampling_module, "_MIN_SEGMENT", 7)
    monkeypatch.setattr(sampling_module, "_MAX_SEGMENT", 7)
    segmented = sample_identities(prior64, 300, tau=0.45, seed=6, block_size=256)
    assert torch.equal(segmented.vectors, expected.vectors)
    assert (segmented.num_drawn, segmented.num_rejected_tau) == (expected.num_drawn, expected.num_rejected_tau)


def test_smaller_n_gives_a_prefix(prior64):
    large = sample_identities(prior64, 400, tau=0.45, seed=9, block_size=128)
    small = sample_identities(prior64, 150, tau=0.45, seed=9, block_size=128)
    assert torch.equal(small.vectors, large.vectors[:150])


def test_exclusion_is_honoured(prior64):
    exclude = prior64.sample(500, torch.Generator().manual_seed(11))
    result = sample_identities(prior64, 300, tau=0.5, seed=2, exclude=exclude.numpy(), exclude_tau=0.4)
    assert float(cosine_matrix(result.vectors, exclude).max()) <= 0.4 + COSINE_ROUNDING
    assert max_pairwise_cosine_float64(result.vectors) <= 0.5 + COSINE_ROUNDING
    assert result.num_rejected_exclude > 0
    unconstrained = sample_identities(prior64, 300, tau=0.5, seed=2)
    assert float(cosine_matrix(unconstrained.vectors, exclude).max()) > 0.4  # the exclusion did something


def test_same_seed_same_result_and_different_seed_differs(prior64):
    first = sample_identities(prior64, 500, tau=0.45, seed=7, block_size=256)
    second = sample_identities(prior64, 500, tau=0.45, seed=7, block_size=256)
    other = sample_identities(prior64, 500, tau=0.45, seed=8, block_size=256)
    assert torch.equal(first.vectors, second.vectors)
    assert first.num_drawn == second.num_drawn
    assert not torch.equal(first.vectors, other.vectors)


def test_impossible_tau_raises_budget_error_quickly(prior64):
    start = time.perf_counter()
    with pytest.raises(SamplingBudgetError, match="acceptance rate") as info:
        # At most 3 unit vectors can have pairwise cosines ≤ -0.5.
        sample_identities(prior64, 100, tau=-0.5, seed=0)
    assert time.perf_counter() - start < 10
    assert info.value.num_found < 100
    assert info.value.num_drawn == 20 * 100 + 10_000
    assert isinstance(info.value, RuntimeError)

    with pytest.raises(SamplingBudgetError, match=r"found \d+ of 50"):
        sample_identities(prior64, 50, tau=0.0, seed=0, max_draws=60, block_size=16)


def test_callable_sampler_and_argument_checks():
    calls = []

    def gaussian(count, generator):
        calls.append(generator)
        return torch.randn(count, 24, generator=generator)

    result = sample_identities(gaussian, 50, tau=0.6, seed=4, block_size=32)
    assert result.vectors.shape == (50, 24)
    assert max_pairwise_cosine_float64(result.vectors) <= 0.6 + COSINE_ROUNDING
    assert all(isinstance(g, torch.Generator) for g in calls)
    assert torch.equal(result.vectors, sample_identities(gaussian, 50, tau=0.6, seed=4, block_size=32).vectors)

    with pytest.raises(ValueError, match="tau"):
        sample_identities(gaussian, 5, tau=1.5)
    with pytest.raises(TypeError):
        sample_identities("not a sampler", 5)
    with pytest.raises(ValueError, match="shape"):
        sample_identities(lambda count, generator: torch.zeros(count + 1, 4), 5)
    assert sample_identities(gaussian, 0).vectors.shape[0] == 0


def test_progress_bar_changes_nothing_but_the_display(prior64, capsys):
    quiet = sample_identities(prior64, 50, tau=0.6, seed=0, progress=False)
    shown = sample_identities(prior64, 50, tau=0.6, seed=0, progress=True)
    # the bar counts accepted identities on stderr; the draws, and so the result, are the same
    assert "50/50" in capsys.readouterr().err
    assert torch.equal(shown.vectors, quiet.vectors)
    assert (shown.num_drawn, shown.num_rejected_tau) == (quiet.num_drawn, quiet.num_rejected_tau)
    sample_identities(prior64, 50, tau=0.6, seed=0, progress=False)
    assert capsys.readouterr().err == ""


def test_progress_bar_takes_tqdm_options(prior64):
    import io

    log = io.StringIO()
    sample_identities(prior64, 20, tau=0.6, seed=0, progress={"file": log, "desc": "ids", "ascii": True})
    assert "ids: 100%" in log.getvalue() and "20/20" in log.getvalue()


# --------------------------------------------------------------------------------------------------
# perturb
# --------------------------------------------------------------------------------------------------


def test_sigma_counts_largest_remainder():
    assert sigma_counts(50, (0.4, 0.4, 0.2)) == [20, 20, 10]
    assert sigma_counts(5, (0.4, 0.4, 0.2)) == [2, 2, 1]
    assert sigma_counts(7, (0.4, 0.4, 0.2)) == [3, 3, 1]
    assert sigma_counts(1, (0.4, 0.4, 0.2)) == [1, 0, 0]
    assert sigma_counts(3, (1.0,)) == [3]
    for k in range(1, 120):
        counts = sigma_counts(k, (0.4, 0.4, 0.2))
        assert sum(counts) == k
        assert all(abs(c - f * k) < 1 for c, f in zip(counts, (0.4, 0.4, 0.2)))


@pytest.mark.parametrize("k", [1, 7, 50])
def test_perturb_mix_similarity_and_norms(k):
    identities = synthetic_features(12, 512, seed=6, offset=0.0)
    out = perturb(identities, k, seed=3)
    num = len(identities)
    assert out.vectors.shape == (num * k, 512) and out.vectors.dtype == torch.float32
    assert torch.equal(out.identity_index, torch.arange(num).repeat_interleave(k))
    assert torch.equal(out.image_index, torch.arange(k).repeat(num))
    expected_counts = sigma_counts(k, (0.4, 0.4, 0.2))
    sigma = out.sigma.reshape(num, k)
    for row in sigma:
        assert [int((row == s).sum()) for s in (0.3, 0.5, 0.7)] == expected_counts
    assert (out.cos_to_identity >= 0.5).all()
    base = identities.repeat_interleave(k, dim=0)
    torch.testing.assert_close(out.cos_to_identity, torch.nn.functional.cosine_similarity(out.vectors, base), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.vectors.norm(dim=1), base.norm(dim=1), rtol=1e-5, atol=0)
    # Larger σ moves the vector further away on average.
    cos = out.cos_to_identity.reshape(num, k)
    if k == 50:
        means = [float(cos[sigma == s].mean()) for s in (0.3, 0.5, 0.7)]
        assert means[0] > means[1] > means[2]


def test_perturb_slice_invariance_including_redraws():
    identities = synthetic_features(10, 512, seed=7, offset=0.0)
    # σ 1.6 on norm-29 vectors puts cosines around 0.62 ± 0.03, so min_similarity 0.6 forces many redraws.
    kwargs = dict(sigmas=(0.3, 1.6), fractions=(0.5, 0.5), min_similarity=0.6, seed=11)
    whole = perturb(identities, 9, **kwargs)
    part = perturb(identities[5:], 9, identity_offset=5, **kwargs)
    assert torch.equal(part.vectors, whole.vectors[45:])
    assert torch.equal(part.identity_index, whole.identity_index[45:])
    assert torch.equal(part.cos_to_identity, whole.cos_to_identity[45:])
    assert (whole.cos_to_identity >= 0.6).all()
    # The redraw path was taken: without the bound, some vectors are below 0.6.
    unbounded = perturb(identities, 9, **{**kwargs, "min_similarity": -1.0})
    assert int((unbounded.cos_to_identity < 0.6).sum()) > 5
    assert not torch.equal(perturb(identities, 9, **{**kwargs, "seed": 12}).vectors, whole.vectors)
    assert torch.equal(perturb(identities.numpy(), 9, **kwargs).vectors, whole.vectors)


def test_perturb_unreachable_similarity_raises_with_advice():
    unit_identities = l2_normalize(synthetic_features(3, 512, seed=8, offset=0.0))
    with pytest.raises(PerturbationError, match="smaller sigmas"):
        perturb(unit_identities, 5, max_redraws=5)


def test_perturb_argument_checks():
    identities = torch.randn(2, 8)
    with pytest.raises(ValueError, match="sum to 1"):
        perturb(identities, 5, fractions=(0.5, 0.4, 0.2))
    with pytest.raises(ValueError, match="equal length"):
        perturb(identities, 5, sigmas=(0.3,), fractions=(0.5, 0.5))
    with pytest.raises(ValueError, match="images_per_identity"):
        perturb(identities, 0)
    with pytest.raises(InvalidInputError, match="non-zero"):
        perturb(torch.zeros(1, 8), 2)
    with pytest.raises(InvalidInputError, match=r"rows \[1\] contain NaN or inf"):  # not "must be non-zero"
        perturb(torch.stack([torch.ones(8), torch.full((8,), float("nan"))]), 2)
    with pytest.raises(InvalidInputError, match="contain NaN or inf"):
        perturb(torch.full((1, 8), float("inf")), 2)


def test_identity_vector_validation_names_the_problem_and_the_rows():
    good = torch.randn(3, 512) * 20
    assert validate_identity_vectors(good).shape == (3, 512)
    assert validate_identity_vectors(good[0]).shape == (1, 512)  # one vector
    assert validate_identity_vectors(good.double().numpy()).dtype == torch.float32
    bad = good.clone()
    bad[1, 7], bad[2] = float("nan"), 0.0
    with pytest.raises(InvalidInputError, match=r"rows \[1\] contain NaN or inf values \(1 of 3 rows\)"):
        validate_identity_vectors(bad)
    with pytest.raises(InvalidInputError, match=r"rows \[1\] are all zeros"):
        validate_identity_vectors(bad[[0, 2]])
    for wrong in (torch.randn(0, 512), torch.randn(4, 511), torch.randn(2, 3, 512), torch.randn(511)):
        with pytest.raises(InvalidInputError, match="empty|shape"):
            validate_identity_vectors(wrong)
    with pytest.raises(InvalidInputError, match="single 512-d vector"):
        validate_identity_vectors(good, single=True)


def test_sample_identities_rejects_negative_counts_with_the_library_error(prior64):
    with pytest.raises(InvalidInputError, match="non-negative"):
        sample_identities(prior64, -1)
    assert sample_identities(prior64, 0).vectors.shape == (0, 64)  # zero is a valid (empty) request here


# --------------------------------------------------------------------------------------------------
# Official perturbation parity
# --------------------------------------------------------------------------------------------------


def test_official_sample_nearby_vectors_matches_fixture(reference):
    io = load_file(reference("fixtures/misc_io.safetensors"))
    out = official_sample_nearby_vectors(io["perturb.base"], [0.3, 0.5, 0.7], [0.4, 0.4, 0.2], np.random.RandomState(6000))
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, io["perturb.out_float64"])
    np.testing.assert_array_equal(out.astype(np.float32), io["perturb.out_float32"])


def test_official_sample_nearby_vectors_rejects_what_the_official_code_crashes_on():
    with pytest.raises(ValueError, match="multiple of 5"):
        official_sample_nearby_vectors(np.ones((7, 4), np.float32), [0.3, 0.5, 0.7], [0.4, 0.4, 0.2], np.random.RandomState(0))
    with pytest.raises(TypeError, match="RandomState"):
        official_sample_nearby_vectors(np.ones((5, 4), np.float32), [0.3], [1.0], np.random.default_rng(0))
