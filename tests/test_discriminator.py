"""Patch discriminator: official key layout, output shapes, small configs, loading."""

from __future__ import annotations


import pytest
import torch

from vec2face_model.weights import WeightsLoadError
from vec2face_model.models.discriminator import PatchDiscriminator, cross_embed_widths

from conftest import assert_state_dict_matches_manifest

TINY = dict(dims=[16, 32], groups=4)


def test_default_config_matches_official_manifest():
    with torch.device("meta"):
        model = PatchDiscriminator()
    assert_state_dict_matches_manifest(model, "manifests/patch_discriminator_dims_64_128_256_512.json")


def test_default_output_is_11x11_patch_logits_per_image():
    torch.manual_seed(0)
    model = PatchDiscriminator().eval()
    a, b = torch.rand(2, 1, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        logits = model(torch.cat([a, b]))
        alone_a, alone_b = model(a), model(b)
        with_other_b = model(torch.cat([a, b.flip(-1) * 0.5]))
    assert logits.shape == (2, 1, 11, 11)
    assert torch.isfinite(logits).all()
    # one logit per patch: the map varies over the image, and differs between images
    assert logits[0].std() > 1e-4 and not torch.allclose(logits[0], logits[1], atol=1e-4)
    # GroupNorm normalises per image: an image's logits do not depend on the rest of the batch
    torch.testing.assert_close(logits[0:1], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1:2], alone_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_other_b[0], logits[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_other_b[1], logits[1], atol=1e-4)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.rand(1, 1, 112, 112))


def test_stem_split():
    assert cross_embed_widths(64, 3) == [32, 16, 16]
    assert cross_embed_widths(16, 3) == [8, 4, 4]
    assert cross_embed_widths(10, 1) == [10]


def test_tiny_config_forward_backward():
    torch.manual_seed(0)
    model = PatchDiscriminator(**TINY)
    images = (torch.rand(2, 3, 112, 112) * 2 - 1).requires_grad_()
    logits = model(images)
    # one downsampling (112 -> 56), then the unpadded 4x4 head conv
    assert logits.shape == (2, 1, 53, 53)
    logits.mean().backward()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_residual_block_keeps_its_input():
    torch.manual_seed(0)
    model = PatchDiscriminator(**TINY).eval()
    block = model.layers[1][3]
    torch.nn.init.zeros_(block.block.project.weight)
    torch.nn.init.zeros_(block.block.project.bias)
    x = torch.randn(1, 32, 8, 8)
    assert torch.equal(block(x), x)


def test_from_official_reads_state_dicts_and_training_checkpoints(tmp_path):
    torch.manual_seed(0)
    source = PatchDiscriminator(dims=[16, 32, 48], groups=4, cross_embed_kernel_sizes=[3, 5]).eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = source(images)
    checkpoint = {"model_vec2face": {"latent_prior_proj_f.weight": torch.zeros(2, 2)}, "model_disc": source.state_dict(), "epoch": 3}
    for obj in (source.state_dict(), checkpoint):
        model = PatchDiscriminator.from_official(obj, groups=4)
        assert list(model.config.dims) == [16, 32, 48]
        assert list(model.config.cross_embed_kernel_sizes) == [3, 5]
        with torch.no_grad():
            assert torch.equal(model(images), expected)
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    with torch.no_grad():
        assert torch.equal(PatchDiscriminator.from_official(path, groups=4)(images), expected)
    path = tmp_path / "disc.pth"
    torch.save(source.state_dict(), path)
    with torch.no_grad():
        assert torch.equal(PatchDiscriminator.from_official(path, groups=4)(images), expected)


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = PatchDiscriminator(**TINY).eval()
    model.save_pretrained(tmp_path)
    loaded = PatchDiscriminator.from_pretrained(tmp_path).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_errors():
    state_dict = PatchDiscriminator(**TINY).state_dict()
    state_dict["to_logits.2.weight"] = torch.zeros(1, 32, 3, 3)
    with pytest.raises(WeightsLoadError, match=r"to_logits\.2\.weight"):
        PatchDiscriminator.from_official(state_dict, groups=4)
    with pytest.raises(WeightsLoadError, match="layers.0.0.convs.0.weight"):
        PatchDiscriminator.from_official({"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="groups"):
        PatchDiscriminator(dims=[12, 20], groups=8)
    with pytest.raises(ValueError, match="odd"):
        PatchDiscriminator(cross_embed_kernel_sizes=[3, 4])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        PatchDiscriminator(**TINY)(torch.zeros(1, 1, 32, 32))
