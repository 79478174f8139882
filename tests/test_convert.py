"""Official weight files: the training-checkpoint layout loads safely; damaged files fail clearly."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from vec2face_model.weights import WeightsLoadError, read_weights
from vec2face_model.models.generator import Vec2Face

TINY = dict(embed_dim=64, depth=1, num_heads=4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
            image_decoder_channels=32, z_channels=32)


def save_like_official_training(path, model: Vec2Face) -> None:
    """The container util/misc.save_model writes (ARCHITECTURE.md 1): note the pickled Namespace."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99))
    torch.save(
        {
            "model_vec2face": model.state_dict(),
            "model_disc": {"layers.0.0.convs.0.weight": torch.zeros(32, 3, 3, 3)},
            "model_ema": None,
            "optimizer_vec2face": optimizer.state_dict(),
            "optimizer_disc": optimizer.state_dict(),
            "epoch": 99,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 0},
            "args": argparse.Namespace(blr=4e-5, batch_size=32, use_rep=True, mask_ratio_min=0.5),
        },
        path,
    )


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Vec2Face(**TINY).eval()


def test_official_training_checkpoint_loads_with_weights_only(tmp_path, tiny_model):
    path = tmp_path / "vec2face_generator.pth"
    save_like_official_training(path, tiny_model)
    loaded = Vec2Face.from_official(path, num_heads=4, decoder_num_heads=4)
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_bare_state_dict_and_safetensors_load(tmp_path, tiny_model):
    from safetensors.torch import save_file

    torch.save(tiny_model.state_dict(), tmp_path / "bare.pth")
    save_file(tiny_model.state_dict(), str(tmp_path / "g.safetensors"))
    for name in ("bare.pth", "g.safetensors"):
        loaded = Vec2Face.from_official(tmp_path / name, num_heads=4, decoder_num_heads=4)
        assert torch.equal(loaded.feature_token.weight, tiny_model.feature_token.weight)


def test_wrong_shape_is_reported_with_the_key(tmp_path, tiny_model):
    state = tiny_model.state_dict()
    state["decoder_norm.weight"] = torch.ones(32)
    torch.save({"model_vec2face": state}, tmp_path / "bad.pth")
    with pytest.raises(WeightsLoadError, match=r"bad\.pth.*decoder_norm\.weight: file \(32,\), model \(64,\)"):
        Vec2Face.from_official(tmp_path / "bad.pth", num_heads=4, decoder_num_heads=4)


def test_missing_key_is_reported(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict())
    del state["center_token.bias"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(WeightsLoadError, match=r"missing\.pth.*1 missing key\(s\).*center_token\.bias"):
        Vec2Face.from_official(tmp_path / "missing.pth", num_heads=4, decoder_num_heads=4)


def test_other_model_weights_are_recognised_as_such(tmp_path):
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "arcface.pth")
    with pytest.raises(WeightsLoadError, match="does not look like a Vec2Face generator"):
        Vec2Face.from_official(tmp_path / "arcface.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_gives_a_clear_error(tmp_path, tiny_model, suffix):
    from safetensors.torch import save_file

    path = tmp_path / f"truncated{suffix}"
    if suffix == ".pth":
        torch.save({"model_vec2face": tiny_model.state_dict()}, path)
    else:
        save_file(tiny_model.state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsLoadError, match="truncated or corrupt"):
        read_weights(path)


def test_arbitrary_pickled_objects_are_refused_and_not_executed(tmp_path):
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model_vec2face": {}, "payload": Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsLoadError, match="refused to unpickle"):
        read_weights(tmp_path / "evil.pth")
    assert not marker.exists()


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(WeightsLoadError, match="no such file"):
        read_weights(tmp_path / "nope.pth")


def test_a_generator_of_another_size_asks_for_its_head_counts(tmp_path, tiny_model):
    from vec2face_model.errors import InvalidInputError

    path = tmp_path / "vec2face_generator.pth"
    save_like_official_training(path, tiny_model)
    with pytest.raises(InvalidInputError, match=r"pass num_heads and decoder_num_heads as trained.*--num-heads N --decoder-num-heads M"):
        Vec2Face.from_official(path)
    with pytest.raises(InvalidInputError, match=r"pass decoder_num_heads as trained"):
        Vec2Face.from_official(path, num_heads=4)
    assert Vec2Face.from_official(path, num_heads=4, decoder_num_heads=4).config.num_heads == 4


def test_old_convert_module_re_exports_every_weights_name():
    import vec2face_model.convert as old
    import vec2face_model.weights as weights

    assert old.__all__ == weights.__all__ and "read_weights" in old.__all__
    assert all(getattr(old, name) is getattr(weights, name) for name in weights.__all__)
