"""IResNet: parity with the official outputs, official key layout, SE variant, loading errors."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

from vec2face_model.weights import WeightsLoadError
from vec2face_model.models.iresnet import (
    IResNet,
    iresnet18,
    iresnet34,
    iresnet50,
    iresnet100,
    iresnet200,
    magface_quality,
    se_iresnet50,
)

from conftest import assert_state_dict_matches_manifest

TINY = dict(layers=[1, 1, 1, 1], num_features=32)


def _assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str) -> None:
    # Error relative to the tensor's scale: fc_out reaches ~450, where float32 summation order alone
    # moves single entries by 1e-3 (an fp64 recomputation differs from the fixture by as much).
    torch.testing.assert_close(actual, expected, atol=rel * float(expected.abs().max()), rtol=0, msg=name)


@pytest.fixture(scope="module")
def fixture_model_and_io():
    from conftest import reference_file

    state_dict = load_file(reference_file("fixtures/iresnet_state_dict.safetensors"))  # float8 weights
    io = load_file(reference_file("fixtures/iresnet_io.safetensors"))
    return IResNet.from_official(state_dict), io


def test_from_official_infers_fixture_config(fixture_model_and_io):
    model, _ = fixture_model_and_io
    assert list(model.config.layers) == [1, 1, 1, 1]
    assert model.config.num_features == 32
    assert model.config.use_se is False
    assert not model.training
    assert model.fc.weight.dtype == torch.float32  # upcast from float8 on load


def test_fixture_outputs_match_official(fixture_model_and_io):
    model, io = fixture_model_and_io
    with torch.no_grad():
        out = model(io["input"], return_intermediates=True)
        plain = model(io["input"])
    torch.testing.assert_close(out.features, io["features"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, out.features, atol=0, rtol=0)
    for key in ("layer4_out", "bn2_out", "fc_out"):
        _assert_close_scaled(getattr(out, key), io[key], rel=1e-5, name=key)


def test_magface_quality_is_the_feature_norm(fixture_model_and_io):
    model, io = fixture_model_and_io
    with torch.no_grad():
        quality = magface_quality(model, io["input"])
    assert quality.shape == (2,)
    torch.testing.assert_close(quality, io["feature_l2_norm"][:, 0], atol=1e-5, rtol=1e-5)


def test_iresnet100_matches_official_manifest():
    with torch.device("meta"):
        model = iresnet100()
    manifest = assert_state_dict_matches_manifest(model, "manifests/iresnet100_arcface_magface.json")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == manifest["num_params_requires_grad"]


@pytest.mark.parametrize(
    "factory, layers",
    [(iresnet18, [2, 2, 2, 2]), (iresnet34, [3, 4, 6, 3]), (iresnet50, [3, 4, 14, 3]), (iresnet100, [3, 13, 30, 3]),
     (iresnet200, [6, 26, 60, 6]), (se_iresnet50, [3, 4, 14, 3])],
)
def test_factories_build_their_layouts(factory, layers):
    with torch.device("meta"):
        model = factory()
    assert list(model.config.layers) == layers
    assert [len(stage) for stage in model.stages] == layers
    assert model.config.use_se == (factory is se_iresnet50)


def test_iresnet200_is_not_the_official_duplicate_of_100():
    with torch.device("meta"):
        r200, r100 = iresnet200(), iresnet100()
    assert len(r200.state_dict()) > len(r100.state_dict())


def test_from_official_reinfers_sizes_and_features_are_raw():
    torch.manual_seed(0)
    source = IResNet(layers=[1, 2, 1, 1], num_features=24).eval()
    model = IResNet.from_official(source.state_dict())
    assert list(model.config.layers) == [1, 2, 1, 1] and model.config.num_features == 24
    images = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        features = model(images)
        torch.testing.assert_close(features, source(images), atol=0, rtol=0)
    assert features.shape == (2, 24)
    assert not torch.allclose(features.norm(dim=1), torch.ones(2))  # not L2-normalised


def test_se_variant_forward_inference_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = IResNet(**TINY, use_se=True, se_reduction=8).eval()
    keys = model.state_dict().keys()
    assert {"layer1.0.se.fc1.weight", "layer1.0.se.fc2.weight", "layer4.0.se.fc1.weight"} <= set(keys)
    assert model.state_dict()["layer1.0.se.fc1.weight"].shape == (64 // 8, 64, 1, 1)
    images = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        features = model(images)
    assert features.shape == (3, 32)

    inferred = IResNet.from_official(model.state_dict())
    assert inferred.config.use_se is True and inferred.config.se_reduction == 8

    model.save_pretrained(tmp_path)
    loaded = IResNet.from_pretrained(tmp_path).eval()
    assert loaded.config.use_se is True and list(loaded.config.layers) == [1, 1, 1, 1]
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(images), features)


def test_se_gate_changes_the_output():
    torch.manual_seed(0)
    plain = IResNet(**TINY).eval()
    with_se = IResNet(**TINY, use_se=True).eval()
    with_se.load_state_dict(plain.state_dict(), strict=False)
    images = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert not torch.allclose(plain(images), with_se(images))


def test_gradients_reach_the_input():
    torch.manual_seed(0)
    model = IResNet(**TINY).eval()
    images = (torch.rand(1, 3, 112, 112) * 2 - 1).requires_grad_()
    magface_quality(model, images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_from_official_wrong_shape_names_the_key():
    state_dict = IResNet(**TINY).state_dict()
    state_dict["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    with pytest.raises(WeightsLoadError, match=r"layer2\.0\.conv1\.weight"):
        IResNet.from_official(state_dict)


def test_from_official_missing_key_names_the_key():
    state_dict = IResNet(**TINY).state_dict()
    del state_dict["layer3.0.bn2.running_var"]
    with pytest.raises(WeightsLoadError, match=r"layer3\.0\.bn2\.running_var"):
        IResNet.from_official(state_dict)


def test_from_official_rejects_other_models():
    with pytest.raises(WeightsLoadError, match="fc.weight"):
        IResNet.from_official({"linear_reg.weight": torch.zeros(6, 8)})


def test_from_official_reads_files(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = IResNet(**TINY).eval()
    path = tmp_path / "tiny.safetensors"
    save_file(source.state_dict(), str(path))
    model = IResNet.from_official(path)
    for key, value in source.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="layers"):
        IResNet(layers=[1, 1, 1])
    model = IResNet(**TINY)
    with pytest.raises(ValueError, match="112"):
        model(torch.zeros(1, 3, 128, 128))


# -- official SOTA-Face-Recognition-Train-and-Test SE layout (fr_weights/hsface*.pth) --------------


def _official_shortcut_se_state_dict(plain_state_dict: dict, fc2_value: float | None = None) -> dict:
    """The official HSFace-FR key layout: a gate ``attn.fc1/fc2`` only in each stage's first block."""
    generator = torch.Generator().manual_seed(1)
    official = dict(plain_state_dict)
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        official[f"layer{stage}.0.attn.fc1.weight"] = torch.randn(width // 16, width, 1, 1, generator=generator)
        fc2 = torch.randn(width, width // 16, 1, 1, generator=generator)
        official[f"layer{stage}.0.attn.fc2.weight"] = fc2 if fc2_value is None else torch.full_like(fc2, fc2_value)
    return official


def test_from_official_detects_the_shortcut_se_layout():
    torch.manual_seed(0)
    plain = IResNet(layers=[2, 1, 1, 1], num_features=32).eval()
    official = _official_shortcut_se_state_dict(plain.state_dict())
    model = IResNet.from_official(official)
    assert model.config.use_se is True
    assert model.config.se_mode == "shortcut_first"
    assert model.config.se_reduction == 16
    assert list(model.config.layers) == [2, 1, 1, 1]
    for key, value in official.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert not any(".se." in key for key in model.state_dict())


def test_shortcut_se_gate_multiplies_the_first_shortcut_only():
    # fc2 = 0 makes every gate sigmoid(0) = 1/2: the same as halving the shortcut BatchNorm's affine.
    torch.manual_seed(0)
    plain = IResNet(layers=[2, 1, 1, 1], num_features=32).eval()
    model = IResNet.from_official(_official_shortcut_se_state_dict(plain.state_dict(), fc2_value=0.0))
    halved = plain.state_dict()
    for stage in range(1, 5):
        halved[f"layer{stage}.0.downsample.1.weight"] = halved[f"layer{stage}.0.downsample.1.weight"] * 0.5
        halved[f"layer{stage}.0.downsample.1.bias"] = halved[f"layer{stage}.0.downsample.1.bias"] * 0.5
    plain.load_state_dict(halved)
    images = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(images), plain(images), atol=1e-5, rtol=1e-5)


def test_se_iresnet50_defaults_to_the_official_hsface_layout(tmp_path):
    with torch.device("meta"):
        model = se_iresnet50()
        residual = se_iresnet50(se_mode="residual")
    keys = set(model.state_dict())
    assert model.config.se_mode == "shortcut_first"
    assert {f"layer{s}.0.attn.fc1.weight" for s in range(1, 5)} <= keys
    assert "layer1.1.attn.fc1.weight" not in keys and not any(".se." in k for k in keys)
    assert "layer3.13.se.fc2.weight" in set(residual.state_dict())

    small = IResNet(layers=[1, 1, 1, 1], num_features=8, use_se=True, se_mode="shortcut_first")
    small.save_pretrained(tmp_path)
    assert IResNet.from_pretrained(tmp_path).config.se_mode == "shortcut_first"


def test_bad_se_mode_and_mixed_se_keys_raise():
    with pytest.raises(ValueError, match="se_mode"):
        IResNet(**TINY, use_se=True, se_mode="everywhere")
    residual = IResNet(**TINY, use_se=True).state_dict()
    mixed = _official_shortcut_se_state_dict(residual)
    with pytest.raises(WeightsLoadError, match="both"):
        IResNet.from_official(mixed)
