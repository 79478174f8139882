"""Pose beyond yaw: AttrOP towards pitch and roll targets, scheduled by the pipeline and the builder,
recorded in the dataset, with the paper's yaw-only defaults untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from builder.build import build
from builder.config import get_config
from vec2face_model.attrop import AttrOPConfig, attrop
from vec2face_model.errors import InvalidInputError
from vec2face_model.pipeline_vec2face import AttrOPSchedule, Vec2FacePipeline

DIM = 16


class ToyPoseWorld(nn.Module):
    """A linear 'generator' whose images a linear 'pose net' maps to (pitch, yaw, roll)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.decoder = nn.Linear(DIM, 48)
        self.recognizer = nn.Linear(48, DIM)
        self.head = nn.Linear(48, 3)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3

    def decode(self, vectors, sample_ids, iteration):
        return torch.tanh(self.decoder(vectors)).reshape(-1, 3, 4, 4)

    def identity(self, images):
        return self.recognizer(images.flatten(1))

    def quality(self, images):
        return self.identity(images).norm(dim=1)

    def pose(self, images):  # [b, 3] (pitch, yaw, roll)
        return 90 * torch.tanh(self.head(images.flatten(1)))


def test_attrop_reaches_pitch_and_roll_targets_and_judges_each_angle():
    world = ToyPoseWorld()
    vectors = torch.randn(8, DIM, generator=torch.Generator().manual_seed(1))
    targets = world.identity(world.decode(vectors, torch.arange(8), 0)).detach()
    config = AttrOPConfig(target_yaw=None, target_pitch=-15.0, target_roll=10.0, target_quality=0.0, id_threshold=2.0,
                          max_steps=300, lr=0.05)
    result = attrop(vectors, targets, world.decode, world.identity, world.quality, world.pose, config, models=[world])
    assert result.success.sum() >= 6
    ok = result.success
    assert ((result.pitch[ok] + 15.0).abs() <= 5).all() and ((result.roll[ok].abs() - 10.0).abs() <= 5).all()
    # success means every set target is met: re-judge the returned measurements
    angles = torch.stack([result.pitch, result.yaw, result.roll], dim=1)
    _, met = config.pose_error(angles)
    assert torch.equal(met, result.success)


def test_yaw_only_pose_error_is_the_official_term_bit_for_bit():
    angles = torch.randn(64, 3, generator=torch.Generator().manual_seed(2)) * 50
    loss, met = AttrOPConfig(target_yaw=60.0).pose_error(angles)
    assert torch.equal(loss, (60.0 - angles[:, 1].abs()).abs())
    assert torch.equal(met, (60.0 - angles[:, 1].abs()).abs() <= 5.0)


def test_pitch_targets_need_a_three_angle_pose_model_and_sane_ranges():
    world = ToyPoseWorld()
    yaw_only = lambda images: world.pose(images)[:, 1]  # noqa: E731
    vectors = torch.randn(2, DIM)
    with pytest.raises(InvalidInputError, match="-90..90"):
        AttrOPConfig(target_pitch=120.0)
    with pytest.raises(InvalidInputError, match="0..90"):
        AttrOPConfig(target_roll=-5.0)
    with pytest.raises(InvalidInputError, match=r"\(pitch, yaw, roll\)"):
        attrop(vectors, vectors, world.decode, world.identity, world.quality, yaw_only,
               AttrOPConfig(target_yaw=None, target_pitch=10.0), models=[world])


@pytest.fixture(scope="module")
def pipe():
    return Vec2FacePipeline.from_preset("random-tiny")


def test_pipeline_schedules_pitch_groups_and_reports_every_angle(pipe):
    schedule = AttrOPSchedule(groups=((1, 60.0), (1, None, 20.0)), config=AttrOPConfig(max_steps=1))
    out = pipe(num_identities=2, images_per_identity=3, attrop_schedule=schedule, output_type="np", progress=False)
    assert np.isnan(out.attrop_target_yaw[0::3]).all() and np.isnan(out.attrop_target_pitch[0::3]).all()
    assert (out.attrop_target_yaw[1::3] == 60.0).all() and np.isnan(out.attrop_target_pitch[1::3]).all()
    assert np.isnan(out.attrop_target_yaw[2::3]).all() and (out.attrop_target_pitch[2::3] == 20.0).all()
    steered = ~np.isnan(out.yaw)
    assert steered.tolist() == [False, True, True] * 2
    assert np.isfinite(out.pitch[steered]).all() and np.isfinite(out.roll[steered]).all()


def test_an_unset_pitch_changes_nothing(pipe):
    common = dict(num_identities=2, images_per_identity=2, output_type="np", progress=False)
    plain = pipe(attrop_schedule=AttrOPSchedule(groups=((1, 60.0),), config=AttrOPConfig(max_steps=2)), **common)
    explicit = pipe(attrop_schedule=AttrOPSchedule(groups=((1, 60.0, None, None),), config=AttrOPConfig(max_steps=2)), **common)
    assert np.array_equal(plain.images, explicit.images) and np.array_equal(plain.yaw, explicit.yaw, equal_nan=True)


def test_a_build_with_pitch_groups_records_the_angles_and_the_paper_configs_keep_their_columns(tmp_path):
    from datasets import load_dataset

    config = get_config("tiny", model="random-tiny", attrop_groups=((1, 60.0, 15.0),))
    build(config, tmp_path / "pitch", progress=False)
    rows = load_dataset(str(tmp_path / "pitch"), "tiny", split="train")
    steered = [r for r in rows if r["image_index"] == 4]
    assert len(steered) == 4
    assert all(r["attrop_target_pitch"] == 15.0 and r["attrop_target_yaw"] == 60.0 and r["pitch"] is not None
               and r["roll"] is not None and r["attrop_target_roll"] is None for r in steered)
    assert all(r["pitch"] is None and r["attrop_target_pitch"] is None for r in rows if r["image_index"] < 4)
    assert "`pitch`" in (tmp_path / "pitch" / "README.md").read_text()
    from builder.hsface_builder import shard_features

    assert "pitch" not in shard_features(get_config("10k")) and "pitch" in shard_features(config)
