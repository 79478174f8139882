"""SixDRepNet head-pose estimator (Hempel et al., 6DRepNet, arXiv:2202.12555), deploy layout.

A RepVGG backbone (Ding et al., arXiv:2101.03697) in its re-parameterised ("deploy") form — every
block is one 3x3 convolution with bias followed by ReLU — then global average pooling and a
linear layer regressing a 6D rotation representation, turned into a rotation matrix by
Gram-Schmidt (:func:`rotation_matrix_from_6d`). Vec2Face's AttrOP reads the yaw off that matrix
(:func:`euler_angles_from_rotation`).

The default config is RepVGG-B1g2, the layout of the released ``6DRepNet_300W_LP_AFLW2000.pth``
(loads strictly, official key names ``layer0.rbr_reparam.*``, ``layer{1..4}.{i}.rbr_reparam.*``,
``linear_reg.*``).

Input convention: :meth:`SixDRepNet.forward` takes what the official network is fed *by Vec2Face*
(BGR in [0,1], 112x112, no ImageNet normalisation — not 6DRepNet's own RGB/224/ImageNet recipe);
:meth:`SixDRepNet.predict_euler` takes canonical hsface images and converts them.
Reference: ``shared/reference/ARCHITECTURE.md`` section 5.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from ..conventions import to_pose_input
from ..weights import StateDict, WeightsLoadError, load_official_model

__all__ = [
    "SixDRepNet",
    "euler_angles_from_rotation",
    "infer_sixdrepnet_config",
    "rotation_matrix_from_6d",
    "sixdrepnet_repvgg_b1g2",
]

BASE_WIDTHS = (64, 128, 256, 512)  # RepVGG stage widths before the width multipliers
STEM_MAX_WIDTH = 64
# RepVGG's "g2/g4" variants group every second block, counted over the whole network from 1 at
# layer1.0 (the stem is not counted): indices 2, 4, ..., 26.
REPVGG_GROUPED_BLOCKS = tuple(range(2, 27, 2))
# Norm floor of sixdrepnet's 6D -> rotation conversion (kept for parity; not feature_math's eps,
# which serves a different purpose).
SIX_D_NORM_FLOOR = 1e-8
# Below this sqrt(R00^2 + R10^2) the Euler decomposition is treated as gimbal-locked.
GIMBAL_LOCK_THRESHOLD = 1e-6


# --------------------------------------------------------------------------------------------------
# Rotation math (pure, differentiable; sixdrepnet.utils semantics)
# --------------------------------------------------------------------------------------------------


def _normalize_with_floor(v: torch.Tensor) -> torch.Tensor:
    return v / v.pow(2).sum(-1, keepdim=True).sqrt().clamp_min(SIX_D_NORM_FLOOR)


def rotation_matrix_from_6d(six_d: torch.Tensor) -> torch.Tensor:
    """[..., 6] -> [..., 3, 3] rotation matrices by Gram-Schmidt (Zhou et al., arXiv:1812.07035).

    With ``a1, a2`` the first and last three values: columns ``x = a1/|a1|``,
    ``z = normalise(x × a2)``, ``y = z × x``; norms are floored at 1e-8.
    """
    if six_d.shape[-1] != 6:
        raise ValueError(f"expected a 6D rotation representation [..., 6], got shape {tuple(six_d.shape)}")
    x = _normalize_with_floor(six_d[..., :3])
    z = _normalize_with_floor(torch.linalg.cross(x, six_d[..., 3:], dim=-1))
    y = torch.linalg.cross(z, x, dim=-1)
    return torch.stack([x, y, z], dim=-1)


def euler_angles_from_rotation(rotation: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] rotation matrices -> [..., 3] Euler angles in **degrees**, columns (pitch, yaw, roll).

    pitch = atan2(R21, R22), yaw = atan2(-R20, s), roll = atan2(R10, R00) with s = sqrt(R00² + R10²);
    when s < 1e-6 (gimbal lock) pitch = atan2(-R12, R11) and roll = 0. Differentiable except
    exactly at gimbal lock.
    """
    if rotation.shape[-2:] != (3, 3):
        raise ValueError(f"expected rotation matrices [..., 3, 3], got shape {tuple(rotation.shape)}")
    r = rotation
    s = torch.sqrt(r[..., 0, 0] ** 2 + r[..., 1, 0] ** 2)
    singular = s < GIMBAL_LOCK_THRESHOLD
    pitch = torch.where(singular, torch.atan2(-r[..., 1, 2], r[..., 1, 1]), torch.atan2(r[..., 2, 1], r[..., 2, 2]))
    yaw = torch.atan2(-r[..., 2, 0], s)
    roll = torch.where(singular, torch.zeros_like(s), torch.atan2(r[..., 1, 0], r[..., 0, 0]))
    return torch.stack([pitch, yaw, roll], dim=-1) * (180.0 / math.pi)


# --------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------


class RepVGGDeployBlock(nn.Module):
    """Re-parameterised RepVGG block: ``relu(conv3x3(x))`` (the key name ``rbr_reparam`` is RepVGG's).

    Args:
        in_channels / out_channels: widths.
        stride: convolution stride.
        groups: convolution groups.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.rbr_reparam = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.rbr_reparam(x))


class SixDRepNet(ModelMixin, ConfigMixin):
    """Head-pose network; ``forward(pose_input)`` -> [B,3,3] rotation matrices.

    Args:
        num_blocks: blocks in layer1..layer4 (each stage's first block has stride 2, as has layer0).
        width_multipliers: stage widths are ``int(base * m)`` for bases 64/128/256/512; the stem
            has ``min(64, int(64 * m[0]))`` channels.
        groups: convolution groups of the grouped blocks.
        grouped_blocks: global indices of the grouped blocks, counted from 1 at layer1.0 over all
            stages (RepVGG's convention; B1g2 groups 2, 4, ..., 26 = the odd positions of layers 1-3).
    """

    @register_to_config
    def __init__(
        self,
        num_blocks: list[int] = (4, 6, 16, 1),
        width_multipliers: list[float] = (2.0, 2.0, 2.0, 4.0),
        groups: int = 2,
        grouped_blocks: list[int] = REPVGG_GROUPED_BLOCKS,
    ):
        super().__init__()
        num_blocks, width_multipliers = list(num_blocks), list(width_multipliers)
        if len(num_blocks) != 4 or any(int(n) < 1 for n in num_blocks):
            raise ValueError(f"num_blocks must be 4 positive block counts (B1g2: [4, 6, 16, 1]), got {num_blocks}")
        if len(width_multipliers) != 4:
            raise ValueError(f"width_multipliers must have 4 entries (B1g2: [2, 2, 2, 4]), got {width_multipliers}")
        widths = [int(base * m) for base, m in zip(BASE_WIDTHS, width_multipliers)]
        stem_width = min(STEM_MAX_WIDTH, int(STEM_MAX_WIDTH * width_multipliers[0]))
        if min(widths + [stem_width]) < 1:
            raise ValueError(f"width_multipliers {width_multipliers} give an empty stage (widths {widths})")
        grouped = set(grouped_blocks)

        # stem
        self.layer0 = RepVGGDeployBlock(3, stem_width, stride=2)
        # stages
        in_channels, block_index = stem_width, 1
        for stage, (width, count) in enumerate(zip(widths, num_blocks), start=1):
            blocks = []
            for position in range(int(count)):
                block_groups = groups if block_index in grouped else 1
                if in_channels % block_groups or width % block_groups:
                    raise ValueError(
                        f"block {block_index} (layer{stage}.{position}) has {in_channels}->{width} channels, "
                        f"not divisible by groups={block_groups}; pick width_multipliers giving even widths"
                    )
                blocks.append(RepVGGDeployBlock(in_channels, width, stride=2 if position == 0 else 1, groups=block_groups))
                in_channels, block_index = width, block_index + 1
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        # head
        self.linear_reg = nn.Linear(in_channels, 6)

    def forward_features(self, pose_input: torch.Tensor) -> torch.Tensor:
        """Backbone and global average pool: [B,3,H,W] -> [B, width of layer4]."""
        if pose_input.dim() != 4 or pose_input.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(pose_input.shape)}")
        x = self.layer0(pose_input)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return x.mean(dim=(2, 3))

    def predict_six_d(self, pose_input: torch.Tensor) -> torch.Tensor:
        """[B,6] raw 6D rotation representation."""
        return self.linear_reg(self.forward_features(pose_input))

    def forward(self, pose_input: torch.Tensor) -> torch.Tensor:
        """Rotation matrices [B,3,3] from network input (BGR in [0,1], see :func:`to_pose_input`)."""
        return rotation_matrix_from_6d(self.predict_six_d(pose_input))

    def predict_euler(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3] (pitch, yaw, roll) in degrees from canonical images (RGB in [-1,1], 112x112).

        Applies Vec2Face's preprocessing (BGR, [0,1], no resize, no ImageNet normalisation).
        Differentiable with respect to ``images`` (inside [-1,1]).
        """
        return euler_angles_from_rotation(self(to_pose_input(images)))

    @classmethod
    def from_official(cls, path_or_state_dict: str | Path | StateDict, **overrides) -> "SixDRepNet":
        """Build from an official deploy-mode state dict (``6DRepNet_300W_LP_AFLW2000.pth``,
        a safetensors file or a mapping), inferring every config value from the weights; loads
        strictly and returns the model in eval mode.

        Training-mode RepVGG checkpoints (``rbr_dense``/``rbr_1x1`` branches) are not supported:
        re-parameterise them first.
        """
        return load_official_model(cls, path_or_state_dict, infer_sixdrepnet_config, overrides)


def infer_sixdrepnet_config(state_dict: StateDict, source: str = "<state dict>") -> dict:
    """The :class:`SixDRepNet` config that a deploy-mode state dict determines."""
    if "layer0.rbr_reparam.weight" not in state_dict:
        hint = " (a training-mode RepVGG checkpoint? re-parameterise it first)" if any("rbr_dense" in k for k in state_dict) else ""
        raise WeightsLoadError(f"{source}: missing 'layer0.rbr_reparam.weight'; not a deploy-mode SixDRepNet state dict{hint}")
    num_blocks, multipliers, grouped, group_counts = [], [], [], set()
    in_channels, block_index = state_dict["layer0.rbr_reparam.weight"].shape[0], 1
    for stage, base in enumerate(BASE_WIDTHS, start=1):
        count = 0
        while f"layer{stage}.{count}.rbr_reparam.weight" in state_dict:
            weight = state_dict[f"layer{stage}.{count}.rbr_reparam.weight"]
            if weight.dim() != 4 or weight.shape[1] == 0 or in_channels % weight.shape[1]:
                raise WeightsLoadError(
                    f"{source}: 'layer{stage}.{count}.rbr_reparam.weight' has shape {tuple(weight.shape)}, "
                    f"which does not fit {in_channels} input channels"
                )
            block_groups = in_channels // weight.shape[1]
            if block_groups > 1:
                grouped.append(block_index)
                group_counts.add(block_groups)
            in_channels, block_index, count = weight.shape[0], block_index + 1, count + 1
        if count == 0:
            raise WeightsLoadError(f"{source}: no blocks 'layer{stage}.*.rbr_reparam.weight'; not a SixDRepNet state dict")
        num_blocks.append(count)
        multipliers.append(state_dict[f"layer{stage}.0.rbr_reparam.weight"].shape[0] / base)
    if len(group_counts) > 1:
        raise WeightsLoadError(f"{source}: grouped blocks use different group counts {sorted(group_counts)}; unsupported")
    return dict(
        num_blocks=num_blocks,
        width_multipliers=multipliers,
        groups=group_counts.pop() if group_counts else 1,
        grouped_blocks=grouped,
    )


def sixdrepnet_repvgg_b1g2(**overrides) -> SixDRepNet:
    """The released 6DRepNet layout (RepVGG-B1g2, deploy form; 39.3M parameters)."""
    return SixDRepNet(**overrides)
