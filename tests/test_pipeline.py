"""Vec2FacePipeline on tiny random components: determinism, invariants, loading paths, reference mode."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from vec2face_model import AttrOPConfig, AttrOPSchedule, IdentityPrior, Vec2FacePipeline
from vec2face_model.errors import HubUnreachableError
from vec2face_model.feature_math import cosine
from vec2face_model.models.iresnet import IResNet
from vec2face_model.models.sixdrepnet import SixDRepNet
from vec2face_model.pipeline_hub import offline_advice
from vec2face_model.pipeline_vec2face import OFFICIAL_FILES, TINY_GENERATOR, TINY_IRESNET, TINY_SIXDREPNET


@pytest.fixture(scope="module")
def pipe():
    return Vec2FacePipeline.from_preset("random-tiny", seed=0)


def test_same_seed_gives_the_same_images_for_any_batch_size(pipe):
    identities = pipe.sample_identities(3, seed=1).vectors
    outs = [pipe(identities, images_per_identity=3, seed=5, output_type="pt", batch_size=b, progress=False) for b in (1, 3, 8)]
    for other in outs[1:]:
        # float32 GEMM kernels vary with batch shape: equal up to rounding
        torch.testing.assert_close(other.images, outs[0].images, atol=1e-4, rtol=1e-4)
        assert np.array_equal(other.sigma, outs[0].sigma)
    different_seed = pipe(identities, images_per_identity=3, seed=6, output_type="pt", progress=False)
    assert (different_seed.images - outs[0].images).abs().max() > 1e-2


def test_images_depend_only_on_seed_identity_and_image_index(pipe):
    identities = pipe.sample_identities(4, seed=2).vectors
    whole = pipe(identities, images_per_identity=2, seed=3, output_type="pt", progress=False)
    part = pipe(identities[2:], identity_offset=2, images_per_identity=2, seed=3, output_type="pt", progress=False)
    assert part.labels.tolist() == [2, 2, 3, 3]
    torch.testing.assert_close(part.images, whole.images[4:], atol=1e-4, rtol=1e-4)


def test_sampled_identities_and_perturbations_meet_the_paper_constraints(pipe):
    out = pipe(num_identities=6, images_per_identity=10, tau=0.3, seed=0, output_type="np", progress=False)
    ids = out.identity_vectors
    sims = cosine(ids[:, None], ids[None, :])
    assert sims[~torch.eye(6, dtype=torch.bool)].max() <= 0.3
    assert out.images.shape == (60, 112, 112, 3) and out.images.dtype == np.uint8
    assert (out.cos_to_identity >= 0.5 - 1e-6).all()
    for label in range(6):
        sig = [round(float(s), 3) for s in out.sigma[out.labels == label]]
        assert sorted(sig) == [0.3] * 4 + [0.5] * 4 + [0.7] * 2
    torch.testing.assert_close(out.vectors.norm(dim=1), ids[out.labels].norm(dim=1), rtol=1e-5, atol=1e-4)


def test_attrop_schedule_marks_and_measures_the_steered_images(pipe):
    schedule = AttrOPSchedule(groups=((1, 60.0), (1, 85.0)), config=AttrOPConfig(max_steps=2))
    out = pipe(num_identities=2, images_per_identity=4, attrop_schedule=schedule, seed=0, output_type="np", progress=False)
    steered = ~np.isnan(out.attrop_target_yaw)
    assert out.attrop_target_yaw[steered].tolist() == [60.0, 85.0, 60.0, 85.0]
    assert out.image_index[steered].tolist() == [2, 3, 2, 3]
    assert np.isfinite(out.yaw[steered]).all() and np.isfinite(out.quality[steered]).all()
    assert np.isnan(out.yaw[~steered]).all() and not out.attrop_success[~steered].any()
    assert {"sample", "perturb", "decode", "attrop"} <= out.timings.keys() and min(out.timings.values()) > 0
    with pytest.raises(ValueError, match="needs 2 images per identity"):
        pipe(num_identities=1, images_per_identity=1, attrop_schedule=schedule, progress=False)


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = Vec2FacePipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.config.preset == "random-tiny"
    for name in ("generator", "recognizer", "quality", "pose", "prior"):
        for key, value in getattr(pipe, name).state_dict().items():
            assert torch.equal(getattr(loaded, name).state_dict()[key], value), (name, key)
    a = pipe(num_identities=2, images_per_identity=2, seed=4, output_type="pt", progress=False)
    b = loaded(num_identities=2, images_per_identity=2, seed=4, output_type="pt", progress=False)
    assert torch.equal(a.images, b.images)


def write_official_layout(folder, with_prior: bool) -> None:
    """Small random weights saved the way the official scripts and release store them."""
    from vec2face_model.models.generator import Vec2Face

    weights = folder / "weights"
    weights.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({"model_vec2face": Vec2Face(**TINY_GENERATOR).state_dict(), "epoch": 1,
                "args": argparse.Namespace(model="vec2face_vit_base_patch16")}, weights / "vec2face_generator.pth")
    torch.save(IResNet(**TINY_IRESNET).state_dict(), weights / "arcface-r100-glint360k.pth")
    torch.save(IResNet(**TINY_IRESNET).state_dict(), weights / "magface-r100-glint360k.pth")
    torch.save(SixDRepNet(**TINY_SIXDREPNET).state_dict(), weights / "6DRepNet_300W_LP_AFLW2000.pth")
    if with_prior:
        np.save(folder / "center_feature_examples.npy", (np.random.default_rng(0).standard_normal((300, 512)) * 1.1).astype(np.float32))


def test_official_layout_folder_loads_and_fits_the_prior_on_its_features(tmp_path):
    write_official_layout(tmp_path, with_prior=True)
    pipe = Vec2FacePipeline.from_pretrained(tmp_path, num_heads=4, decoder_num_heads=4)
    assert pipe.prior is not None and int(pipe.prior.num_fitted) == 300
    assert pipe.pose is not None and pipe.recognizer is not None
    out = pipe(num_identities=2, images_per_identity=2, output_type="np", progress=False)
    assert out.images.shape == (4, 112, 112, 3)


def test_official_layout_without_features_has_no_silent_prior(tmp_path):
    write_official_layout(tmp_path, with_prior=False)
    pipe = Vec2FacePipeline.from_pretrained(tmp_path, num_heads=4, decoder_num_heads=4)
    assert pipe.prior is None
    with pytest.raises(ValueError, match="no identity prior"):
        pipe(num_identities=2, progress=False)
    given = pipe(np.random.default_rng(1).standard_normal((1, 512)).astype(np.float32) * 20, images_per_identity=2, progress=False)
    assert len(given.images) == 2  # explicit vectors need no prior


def test_convert_cli_writes_a_loadable_pipeline(tmp_path):
    from builder.cli import main

    write_official_layout(tmp_path / "official", with_prior=True)
    # tiny weights need their head counts; the released model's (12/16) are the defaults
    assert main(["convert", str(tmp_path / "official"), str(tmp_path / "cli")]) == 2
    assert main(["convert", str(tmp_path / "official"), str(tmp_path / "cli"), "--num-heads", "4", "--decoder-num-heads", "4"]) == 0
    loaded = Vec2FacePipeline.from_pretrained(tmp_path / "cli")
    assert isinstance(loaded.prior, IdentityPrior) and loaded.generator.config.num_heads == 4
    assert (tmp_path / "cli" / "model_index.json").exists()
    assert (tmp_path / "cli" / "generator" / "diffusion_pytorch_model.safetensors").exists()


def test_unreachable_repo_id_says_which_files_to_fetch_and_how(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnreachableError, match="pass the local folder") as official:
        Vec2FacePipeline.from_pretrained("BooBooWu/Vec2Face")
    assert isinstance(official.value, OSError)  # callers catching OSError keep working
    message = str(official.value)
    files = " ".join(OFFICIAL_FILES.values())
    assert f"`hf download BooBooWu/Vec2Face {files} center_feature_examples.npy --local-dir Vec2Face`" in message
    assert "huggingface-cli" not in message and "HF_HUB_OFFLINE is set" in message
    with pytest.raises(HubUnreachableError, match="hf download someone/other-vec2face --local-dir other-vec2face"):
        Vec2FacePipeline.from_pretrained("someone/other-vec2face")
    # online but unreachable: no advice about a variable that is not set
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert "HF_HUB_OFFLINE" not in offline_advice("BooBooWu/Vec2Face", ConnectionError("down"))


def test_reference_mode_variations_and_interpolation(pipe):
    faces = pipe(num_identities=2, images_per_identity=1, seed=0, output_type="pil", progress=False).images
    out = pipe.variations(faces, images_per_identity=3, sigma=0.2, seed=1, align=False)  # random-tiny images are no faces
    assert len(out.images) == 6 and out.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert out.images[0].size == (112, 112)
    # the identities are the recognizer's features of the given photos, perturbed with the one sigma
    torch.testing.assert_close(out.identity_vectors, pipe.identity_features(faces))
    assert np.all(out.sigma == np.float32(0.2))
    assert len({img.tobytes() for img in out.images[:3]}) == 3  # three different images of person 0
    a, b = out.identity_vectors
    frames = pipe.interpolate(a, b, steps=5, output_type="pt")
    assert frames.shape == (5, 3, 112, 112)
    # the ends are exactly a and b, decoded with the one mask all steps share (float rounding only:
    # the batch shape differs); the middle frame is neither end
    zero = torch.zeros(1, dtype=torch.long)
    torch.testing.assert_close(frames[0], pipe.decode(a[None], zero, zero, seed=0)[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(frames[-1], pipe.decode(b[None], zero, zero, seed=0)[0], atol=1e-4, rtol=1e-4)
    ends_apart = (frames[0] - frames[-1]).abs().mean()
    assert ends_apart > 1e-2
    assert min((frames[2] - frames[0]).abs().mean(), (frames[2] - frames[-1]).abs().mean()) > 0.1 * ends_apart
    np.testing.assert_array_equal(pipe.interpolate(a, b, steps=5, output_type="np"), pipe._format(frames, "np"))


def test_compile_generator_routes_plain_decoding_through_torch_compile():
    # A recording backend checks the wiring in seconds; inductor's own numerics are bench material.
    pipe = Vec2FacePipeline.from_preset("random-tiny", seed=0)
    identities = pipe.sample_identities(2, seed=0).vectors
    schedule = AttrOPSchedule(groups=((1, 60.0),), config=AttrOPConfig(max_steps=1))
    eager = pipe(identities, images_per_identity=3, attrop_schedule=schedule, seed=1, output_type="pt", progress=False)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    pipe.compile_generator(backend=recording_backend)
    compiled = pipe(identities, images_per_identity=3, attrop_schedule=schedule, seed=1, output_type="pt", progress=False)
    assert graphs, "the compiled generator was never called"
    assert torch.equal(compiled.images, eager.images)
    assert compiled.attrop_success.tolist() == eager.attrop_success.tolist()


def test_bf16_runs_and_stays_close_to_fp32(pipe):
    identities = pipe.sample_identities(3, seed=1).vectors
    run = dict(images_per_identity=2, seed=5, output_type="pt", progress=False)
    fp32 = pipe(identities, **run).images
    bf16 = pipe(identities, precision="bf16", **run).images
    other_seed = pipe(identities, **{**run, "seed": 6}).images
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape and torch.isfinite(bf16).all()
    assert not torch.equal(bf16, fp32)  # autocast really ran in bf16
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per operation): images differ by rounding,
    # which must stay far below what a different seed (other masks and noise) changes. Measured on
    # random-tiny: 0.011 against 0.32 mean absolute difference, a ratio of 0.035; 0.15 leaves room for
    # other CPUs' kernels while still failing if bf16 changed what is drawn rather than how it rounds.
    rounding = (bf16 - fp32).abs().mean()
    seed_change = (other_seed - fp32).abs().mean()
    assert rounding < 0.15 * seed_change
    # same seed, same bytes in bf16 too
    assert torch.equal(bf16, pipe(identities, precision="bf16", **run).images)


def test_identity_refinement_raises_quality_and_keeps_the_identity(pipe):
    from vec2face_model import attrop, magface_quality, seeding

    identities = pipe.sample_identities(4, seed=1).vectors
    labels, zero = torch.arange(4), torch.zeros(4, dtype=torch.long)
    quality = lambda images: magface_quality(pipe.quality, images)  # noqa: E731

    # The refinement objective with the masks held fixed: every step raises every identity's MagFace
    # quality (small lr so Adam's first-order step dominates the random network's curvature).
    def decode(v, rows, iteration):
        rows = rows.cpu()
        return pipe.decode(v, labels[rows], zero[rows], seed=0, stream=seeding.STREAM_REFINE_MASK)

    def measured(vectors):
        with torch.no_grad():
            return quality(decode(vectors, labels, None).clamp(-1, 1))

    models = [pipe.generator, pipe.recognizer, pipe.quality]
    gains = []
    for steps in (2, 3):
        config = AttrOPConfig(target_yaw=None, target_quality=1e6, lr=0.01, max_steps=steps)  # target never met: all steps run
        refined = attrop(identities, identities, decode, pipe.recognizer, quality, None, config, models=models).vectors
        gains.append(measured(refined) - measured(identities))
    assert (gains[0] > 0).all() and (gains[1] > gains[0]).all()

    # The pipeline's pass (fresh masks each step): moves the identities, keeps their direction, repeats exactly.
    config = AttrOPConfig(target_quality=1e6, lr=0.01, max_steps=2)
    refined = pipe.refine(identities, config, seed=0, progress=False)
    assert not torch.equal(refined, identities)
    assert (cosine(refined, identities) > 0.99).all()
    torch.testing.assert_close(refined, pipe.refine(identities, config, seed=0, progress=False), atol=0, rtol=0)
    out = pipe(identities, images_per_identity=1, refine_identities=config, seed=0, output_type="pt", progress=False)
    torch.testing.assert_close(out.identity_vectors, refined, atol=1e-5, rtol=1e-5)


def test_renamed_names_keep_working_with_a_deprecation_warning(pipe):
    import vec2face_model.pipeline_vec2face as pipeline_module

    identities = pipe.sample_identities(2, seed=1).vectors
    schedule = AttrOPSchedule(groups=((1, 60.0),), config=AttrOPConfig(max_steps=1))
    run = dict(images_per_identity=2, seed=0, output_type="pt", progress=False)
    new = pipe(identities, attrop_schedule=schedule, **run)
    with pytest.warns(DeprecationWarning, match="attrop_schedule"):
        old = pipe(identities, attrop=schedule, **run)
    torch.testing.assert_close(old.images, new.images, atol=0, rtol=0)
    assert np.isfinite(old.attrop_target_yaw).sum() == 2  # the schedule really applied
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="once"):
        pipe(identities, attrop=schedule, attrop_schedule=schedule, **run)
    with pytest.raises(TypeError, match="attrops"):
        pipe(identities, attrops=schedule, **run)
    with pytest.warns(DeprecationWarning, match="PIPELINE_PRESETS"):
        assert pipeline_module.PRESETS == pipeline_module.PIPELINE_PRESETS == ("random-tiny",)

    output = pipe.generator(identities, generator=torch.Generator().manual_seed(0))
    assert output.tokens.shape == (2, 50, pipe.generator.config.decoder_embed_dim)
    with pytest.warns(DeprecationWarning, match="tokens"):
        assert output.logits is output.tokens
