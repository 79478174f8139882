"""Image conventions in one place.

The canonical image tensor of hsface is float32 NCHW **RGB in [-1, 1], 112x112** — what the
generator emits (unclipped), what ArcFace/MagFace IResNets take, what the training data holds.
Every conversion to and from uint8 / PIL, and the pose network's peculiar input, lives here.
"""

from __future__ import annotations

import numpy as np
import torch

IMAGE_SIZE = 112


def uint8_to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``[N,H,W,3]`` (or ``[H,W,3]``) uint8 RGB -> float32 ``[N,3,H,W]`` in [-1, 1] (``(x/255-0.5)/0.5``)."""
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    if x.dim() == 3:
        x = x[None]
    return (x.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """float ``[N,3,H,W]`` in [-1, 1] -> uint8 ``[N,H,W,3]``, rounding to nearest.

    (The official scripts truncate ``((x+1)/2*255)``; rounding makes ``uint8 -> tensor -> uint8``
    an exact round trip.) Values outside [-1, 1] are clipped.
    """
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(a) for a in tensor_to_uint8(images)]


def from_pil(images) -> torch.Tensor:
    """PIL images (any mode) -> canonical tensor; images must already be aligned 112x112 crops."""
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"expected aligned {IMAGE_SIZE}x{IMAGE_SIZE} face crops, got {im.size[0]}x{im.size[1]}; "
                "align and crop faces first (e.g. with insightface's norm_crop)"
            )
        arrays.append(np.asarray(im))
    return uint8_to_tensor(np.stack(arrays))


def to_pose_input(images: torch.Tensor) -> torch.Tensor:
    """What Vec2Face feeds SixDRepNet: BGR (channel reversal), [0, 1], 112x112, no ImageNet normalisation.

    This deviates from 6DRepNet's own preprocessing (RGB, 224, ImageNet mean/std) on purpose: the
    official AttrOP does it this way, and its pose targets are calibrated against it.
    """
    return (images.clamp(-1, 1).flip(1) + 1) / 2


def hflip(images: torch.Tensor) -> torch.Tensor:
    return images.flip(-1)
