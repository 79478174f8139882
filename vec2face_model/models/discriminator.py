"""Patch discriminator of Vec2Face's GAN loss (ViT-VQGAN style, Yu et al., arXiv:2110.04627).

A multi-kernel "cross-embedding" stem, then stride-2 4x4 convolutions each followed by LeakyReLU,
GroupNorm and a pre-norm residual 3x3 block, and a small convolutional head producing one logit
per image patch: a [B,3,112,112] image gives [B,1,11,11] logits with the default widths.

Keys follow the official ``Discriminator(dims=(64, 128, 256, 512))`` (training checkpoint entry
``model_disc``), so official checkpoints load strictly. Used for training only.
Reference: ``shared/reference/ARCHITECTURE.md`` section 4.5.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from ..weights import StateDict, WeightsLoadError, load_official_model

__all__ = ["PatchDiscriminator", "cross_embed_widths", "infer_discriminator_config"]

LEAKY_SLOPE = 0.1
GROUP_NORM_EPS = 1e-5
CHECKPOINT_KEY = "model_disc"  # where the official training checkpoints keep the discriminator


def cross_embed_widths(out_channels: int, num_kernels: int) -> list[int]:
    """Channels per kernel of the cross-embedding stem: halving shares, the rest to the last kernel.

    64 channels over 3 kernels -> [32, 16, 16].
    """
    widths = [out_channels // 2**i for i in range(1, num_kernels)]
    return widths + [out_channels - sum(widths)]


class CrossEmbedLayer(nn.Module):
    """Parallel same-padding convolutions with different kernel sizes, concatenated (smallest first).

    Args:
        in_channels / out_channels: widths (``out_channels`` is split by :func:`cross_embed_widths`).
        kernel_sizes: odd kernel sizes.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes: list[int]):
        super().__init__()
        kernel_sizes = sorted(kernel_sizes)
        widths = cross_embed_widths(out_channels, len(kernel_sizes))
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, width, kernel_size=k, padding=(k - 1) // 2) for k, width in zip(kernel_sizes, widths)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([conv(x) for conv in self.convs], dim=1)


class NormActConv(nn.Module):
    """``conv3x3(leaky_relu(group_norm(x)))`` — the residual branch of :class:`ResidualBlock`."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.groupnorm = nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)
        self.activation = nn.LeakyReLU(LEAKY_SLOPE)
        self.project = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.activation(self.groupnorm(x)))


class ResidualBlock(nn.Module):
    """``x + block(x)`` with a width-preserving :class:`NormActConv` branch."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block = NormActConv(channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + x


class PatchDiscriminator(ModelMixin, ConfigMixin):
    """Patch discriminator: ``forward(images)`` maps [B,C,H,W] images in [-1,1] to [B,1,h,w] logits.

    Args:
        dims: widths of the stem and of each stride-2 stage (``len(dims) - 1`` downsamplings).
        channels: image channels.
        groups: GroupNorm groups (every width must be divisible by it).
        cross_embed_kernel_sizes: kernel sizes of the stem's parallel convolutions.
    """

    @register_to_config
    def __init__(
        self,
        dims: list[int] = (64, 128, 256, 512),
        channels: int = 3,
        groups: int = 8,
        cross_embed_kernel_sizes: list[int] = (3, 7, 15),
    ):
        super().__init__()
        dims, kernel_sizes = list(dims), list(cross_embed_kernel_sizes)
        if len(dims) < 1 or any(d < 1 or d % groups for d in dims):
            raise ValueError(f"dims must be positive multiples of groups={groups}, got {dims}")
        if not kernel_sizes or any(k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"cross_embed_kernel_sizes must be odd (same padding), got {kernel_sizes}")
        if min(cross_embed_widths(dims[0], len(kernel_sizes))) < 1:
            raise ValueError(f"dims[0]={dims[0]} is too small to split over {len(kernel_sizes)} stem kernels")

        # stem, then stride-2 stages (nn.Sequential indices are part of the official key names)
        stages = [nn.Sequential(CrossEmbedLayer(channels, dims[0], kernel_sizes), nn.LeakyReLU(LEAKY_SLOPE))]
        for in_width, width in zip(dims[:-1], dims[1:]):
            stages.append(
                nn.Sequential(
                    nn.Conv2d(in_width, width, kernel_size=4, stride=2, padding=1),
                    nn.LeakyReLU(LEAKY_SLOPE),
                    nn.GroupNorm(groups, width, eps=GROUP_NORM_EPS),
                    ResidualBlock(width, groups),
                )
            )
        self.layers = nn.ModuleList(stages)
        # head: one logit per 4x4 window of the last feature map (no padding)
        self.to_logits = nn.Sequential(
            nn.Conv2d(dims[-1], dims[-1], kernel_size=1),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(dims[-1], 1, kernel_size=4),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.config.channels:
            raise ValueError(f"expected images of shape [B, {self.config.channels}, H, W], got {tuple(images.shape)}")
        x = images
        for stage in self.layers:
            x = stage(x)
        return self.to_logits(x)

    @classmethod
    def from_official(cls, path_or_state_dict: str | Path | StateDict, **overrides) -> "PatchDiscriminator":
        """Build from an official discriminator state dict, or a training checkpoint holding one
        under ``model_disc``; ``dims``, ``channels`` and the stem kernels are read off the weights
        (``groups`` cannot be and defaults to 8). Loads strictly; returns the model in eval mode.
        """
        # a training checkpoint holds both models: prefer model_disc over model_vec2face
        return load_official_model(cls, path_or_state_dict, infer_discriminator_config, overrides, prefer=(CHECKPOINT_KEY,))


def infer_discriminator_config(state_dict: StateDict, source: str = "<state dict>") -> dict:
    """The :class:`PatchDiscriminator` config values that a state dict determines."""
    stem = []
    while f"layers.0.0.convs.{len(stem)}.weight" in state_dict:
        stem.append(state_dict[f"layers.0.0.convs.{len(stem)}.weight"])
    if not stem:
        raise WeightsLoadError(f"{source}: missing 'layers.0.0.convs.0.weight'; not a Vec2Face patch discriminator state dict")
    dims = [sum(int(w.shape[0]) for w in stem)]
    while f"layers.{len(dims)}.0.weight" in state_dict:
        dims.append(int(state_dict[f"layers.{len(dims)}.0.weight"].shape[0]))
    return dict(dims=dims, channels=int(stem[0].shape[1]), cross_embed_kernel_sizes=[int(w.shape[-1]) for w in stem])
