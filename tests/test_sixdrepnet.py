"""SixDRepNet: 6D -> rotation -> Euler parity with sixdrepnet, official key layout, Vec2Face's input convention."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from vec2face_model.weights import WeightsLoadError
from vec2face_model.models.sixdrepnet import (
    SixDRepNet,
    euler_angles_from_rotation,
    rotation_matrix_from_6d,
    sixdrepnet_repvgg_b1g2,
)

from conftest import assert_state_dict_matches_manifest

TINY = dict(num_blocks=[1, 2, 2, 1], width_multipliers=[0.25, 0.25, 0.25, 0.25])


def _rotation(axis: str, degrees: float) -> torch.Tensor:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    matrices = {
        "x": [[1, 0, 0], [0, c, -s], [0, s, c]],  # pitch
        "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],  # yaw
        "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]],  # roll
    }
    return torch.tensor(matrices[axis], dtype=torch.float32)


def _six_d_of(rotation: torch.Tensor) -> torch.Tensor:
    # The first two columns reproduce the matrix exactly under Gram-Schmidt.
    return torch.cat([rotation[..., :, 0], rotation[..., :, 1]], dim=-1)


@pytest.fixture(scope="module")
def pose_io():
    from conftest import reference_file

    return load_file(reference_file("fixtures/misc_io.safetensors"))


def test_rotation_from_6d_matches_sixdrepnet(pose_io):
    rotation = rotation_matrix_from_6d(pose_io["pose.six_d"])
    torch.testing.assert_close(rotation, pose_io["pose.rotation_matrix"], atol=1e-6, rtol=0)


def test_euler_from_rotation_matches_sixdrepnet(pose_io):
    euler = euler_angles_from_rotation(pose_io["pose.rotation_matrix"])
    torch.testing.assert_close(euler, pose_io["pose.euler_deg_pitch_yaw_roll"], atol=1e-4, rtol=0)
    chained = euler_angles_from_rotation(rotation_matrix_from_6d(pose_io["pose.six_d"]))
    torch.testing.assert_close(chained, pose_io["pose.euler_deg_pitch_yaw_roll"], atol=1e-4, rtol=0)


def test_rotation_from_6d_is_orthonormal(pose_io):
    rotation = rotation_matrix_from_6d(pose_io["pose.six_d"])
    identity = torch.eye(3).expand_as(rotation)
    torch.testing.assert_close(rotation.transpose(-1, -2) @ rotation, identity, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(len(rotation)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("axis, column, degrees", [("y", 1, 30.0), ("y", 1, -45.0), ("x", 0, 20.0), ("z", 2, -10.0)])
def test_known_rotations_give_their_angle(axis, column, degrees):
    rotation = rotation_matrix_from_6d(_six_d_of(_rotation(axis, degrees))[None])
    euler = euler_angles_from_rotation(rotation)[0]
    expected = torch.zeros(3)
    expected[column] = degrees
    torch.testing.assert_close(euler, expected, atol=1e-4, rtol=0)


def test_gimbal_lock_branch_sets_roll_to_zero():
    # yaw 90° then pitch 30° about x: R00 = R10 = 0, so roll is undetermined and set to 0.
    rotation = _rotation("y", 90.0) @ _rotation("x", 30.0)
    euler = euler_angles_from_rotation(rotation)
    assert abs(float(euler[1]) - 90.0) < 1e-3
    assert float(euler[2]) == 0.0
    # the pitch then absorbs the whole in-plane rotation
    assert abs(float(euler[0])) > 1.0


def test_yaw_gradient_reaches_the_6d_input():
    six_d = torch.tensor([[0.9, 0.1, -0.3, 0.2, 1.0, 0.1], [0.5, -0.4, 0.6, 0.1, 0.8, -0.5]], requires_grad=True)
    yaw = euler_angles_from_rotation(rotation_matrix_from_6d(six_d))[:, 1]
    yaw.sum().backward()
    assert torch.isfinite(six_d.grad).all()
    assert (six_d.grad.abs().sum(dim=1) > 0).all()


def test_default_config_matches_official_manifest():
    with torch.device("meta"):
        model = sixdrepnet_repvgg_b1g2()
    assert_state_dict_matches_manifest(model, "manifests/sixdrepnet_repvgg_b1g2_deploy.json")
    grouped = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d) and module.groups == 2}
    odd_positions = {1: range(1, 4, 2), 2: range(1, 6, 2), 3: range(1, 16, 2)}
    assert grouped == {f"layer{stage}.{i}.rbr_reparam" for stage, positions in odd_positions.items() for i in positions}


def test_tiny_model_predicts_proper_rotations_per_image():
    torch.manual_seed(0)
    model = SixDRepNet(**TINY).eval()
    images = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        rotation = model(images)
        euler = model.predict_euler(images)
        alone = model(images[1:2])
    assert rotation.shape == (3, 3, 3) and euler.shape == (3, 3)
    # Gram-Schmidt output: orthonormal with determinant +1 (a rotation, never a reflection)
    eye = torch.eye(3).expand(3, 3, 3)
    torch.testing.assert_close(rotation @ rotation.transpose(1, 2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(3), atol=1e-5, rtol=0)
    assert torch.isfinite(euler).all() and (euler.abs() <= 180).all()  # degrees
    assert not torch.allclose(rotation[0], rotation[1], atol=1e-4)  # depends on the image
    torch.testing.assert_close(alone[0], rotation[1], atol=1e-5, rtol=1e-5)  # eval mode: no batch coupling


def test_predict_euler_uses_vec2face_preprocessing():
    torch.manual_seed(0)
    model = SixDRepNet(**TINY).eval()
    images = torch.rand(2, 3, 112, 112) * 2 - 1
    bgr_unit_range = (images.flip(1) + 1) / 2  # BGR, [0, 1], no resize, no ImageNet normalisation
    with torch.no_grad():
        expected = euler_angles_from_rotation(model(bgr_unit_range))
        torch.testing.assert_close(model.predict_euler(images), expected, atol=0, rtol=0)
        assert not torch.allclose(model.predict_euler(images.flip(1)), expected)  # channel order matters


def test_predict_euler_is_differentiable_in_the_image():
    torch.manual_seed(0)
    model = SixDRepNet(**TINY).eval().double()
    images = (torch.rand(2, 3, 112, 112, dtype=torch.float64) * 1.8 - 0.9).requires_grad_()
    model.predict_euler(images)[0, 1].backward()  # yaw of image 0 only
    gradient = images.grad
    assert gradient[0].abs().sum() > 0
    assert gradient[1].abs().sum() == 0  # image 1 does not influence image 0's yaw
    # the gradient AttrOP follows is the true derivative: a central difference along a direction
    # that mixes the gradient with noise matches it (float64, so the quotient is exact to ~1e-6)
    noise = torch.randn(2, 3, 112, 112, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    direction = gradient / gradient.norm() + noise / noise.norm()
    direction[1] = 0
    step = 1e-4
    with torch.no_grad():
        plus = model.predict_euler(images + step * direction)[0, 1]
        minus = model.predict_euler(images - step * direction)[0, 1]
    numeric = (plus - minus) / (2 * step)
    analytic = (gradient * direction).sum()
    torch.testing.assert_close(numeric, analytic, rtol=1e-3, atol=1e-6)


def test_from_official_infers_config_and_round_trips(tmp_path):
    torch.manual_seed(0)
    source = SixDRepNet(**TINY, grouped_blocks=[2, 5]).eval()
    model = SixDRepNet.from_official(source.state_dict())
    assert list(model.config.num_blocks) == [1, 2, 2, 1]
    assert list(model.config.width_multipliers) == [0.25, 0.25, 0.25, 0.25]
    assert model.config.groups == 2 and list(model.config.grouped_blocks) == [2, 5]
    images = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(model(images), source(images))

    model.save_pretrained(tmp_path)
    loaded = SixDRepNet.from_pretrained(tmp_path).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(images), source(images))


def test_from_official_errors_name_the_key():
    state_dict = SixDRepNet(**TINY).state_dict()
    state_dict["linear_reg.weight"] = torch.zeros(6, 7)
    with pytest.raises(WeightsLoadError, match=r"linear_reg\.weight"):
        SixDRepNet.from_official(state_dict)
    state_dict = SixDRepNet(**TINY).state_dict()
    del state_dict["layer2.1.rbr_reparam.bias"]
    with pytest.raises(WeightsLoadError, match=r"layer2\.1\.rbr_reparam\.bias"):
        SixDRepNet.from_official(state_dict)
    with pytest.raises(WeightsLoadError, match="re-parameterise"):
        SixDRepNet.from_official({"layer0.rbr_dense.conv.weight": torch.zeros(64, 3, 3, 3)})


def test_bad_inputs_raise_value_errors():
    with pytest.raises(ValueError, match="6D"):
        rotation_matrix_from_6d(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="3, 3"):
        euler_angles_from_rotation(torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match="groups"):
        SixDRepNet(num_blocks=[1, 2, 1, 1], width_multipliers=[0.02, 0.02, 0.02, 0.02])
    with pytest.raises(ValueError, match="num_blocks"):
        SixDRepNet(num_blocks=[1, 1, 1])
