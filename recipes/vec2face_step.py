"""One optimisation step of ``recipes/train_vec2face.py``: generator, then (with the GAN on) discriminator.

Masks and dropout are keyed by (seed, step, rank), so a resumed run draws what an uninterrupted one
would. One backward serves both models: the discriminator loss sees detached fakes, and the
generator's GAN term runs through a frozen discriminator (unless ``official_gan_gradient_leak``).
With fp16, the grad scaler follows torch's AMP recipe for several optimizers (unscale each, clip,
step each, update the scale once), which accelerate's prepared optimizers would not do for two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recipes.vec2face_config import TrainConfig
from recipes.vec2face_losses import Vec2FaceObjective
from vec2face_model.seeding import STREAM_VEC2FACE_DROPOUT, STREAM_VEC2FACE_MASK, derive_seed

__all__ = ["TrainingParts", "train_step"]

# Seed streams of the step (the recipe's others: 401 initial weights, 402 data order).


@dataclass
class TrainingParts:
    """What one optimisation step touches. ``generator``/``discriminator`` are what forward is called
    on (DDP wrappers under several processes); ``*_module`` the plain models (masks, frozen GAN term)."""

    config: TrainConfig
    device: torch.device
    rank: int
    autocast: Any  # () -> context manager (accelerator.autocast)
    generator: nn.Module
    generator_module: nn.Module
    discriminator: nn.Module
    discriminator_module: nn.Module
    recognizer: nn.Module
    objective: Vec2FaceObjective
    g_optimizer: torch.optim.Optimizer
    d_optimizer: torch.optim.Optimizer
    scaler: Any = None  # torch.amp.GradScaler for fp16, else None

    @property
    def g_params(self) -> list[torch.Tensor]:
        return [p for group in self.g_optimizer.param_groups for p in group["params"]]

    @property
    def d_params(self) -> list[torch.Tensor]:
        return [p for group in self.d_optimizer.param_groups for p in group["params"]]


def train_step(parts: TrainingParts, batch: dict, step: int, gan_on: bool) -> dict[str, float]:
    """One generator (+ discriminator, when ``gan_on``) update; returns the step's scalars."""
    config, device = parts.config, parts.device
    images = batch["pixel_values"].to(device, non_blocking=True)
    if "features" in batch:
        features = batch["features"].to(device, non_blocking=True)
    else:
        with torch.no_grad():
            features = parts.recognizer(images).float()
    # Masks and dropout are keyed by (seed, step, rank): a resumed run draws what an uninterrupted one would.
    mask_rng = torch.Generator().manual_seed(derive_seed(config.seed, STREAM_VEC2FACE_MASK, step, parts.rank))
    token_drop_mask, token_all_mask = parts.generator_module.draw_masks(len(images), mask_rng, ratio=config.mask_ratio)
    torch.manual_seed(derive_seed(config.seed, STREAM_VEC2FACE_DROPOUT, step, parts.rank))

    with parts.autocast():
        output = parts.generator(features, token_drop_mask=token_drop_mask, token_all_mask=token_all_mask)
        losses = parts.objective.generator_losses(
            output, images, features, discriminator=parts.discriminator_module if gan_on else None,
            last_layer=parts.generator_module.im_decoder.conv_out.weight if config.gan_adaptive_weight else None,
        )
        disc_loss = parts.objective.discriminator_loss(parts.discriminator, images, output.images) if gan_on else None
    # One backward for both: the discriminator loss sees detached fakes, and the generator's GAN
    # term runs through a frozen discriminator (unless official_gan_gradient_leak).
    loss = losses.total if disc_loss is None else losses.total + disc_loss
    (parts.scaler.scale(loss) if parts.scaler is not None else loss).backward()

    # torch's AMP recipe for several optimizers: unscale each, clip, step each, update the scale once.
    optimizers = [parts.g_optimizer] + ([parts.d_optimizer] if gan_on else [])
    if parts.scaler is not None:
        for optimizer in optimizers:
            parts.scaler.unscale_(optimizer)
    g_norm = _grad_norm(parts.g_params, config.grad_clip)
    d_norm = _grad_norm(parts.d_params, config.grad_clip) if gan_on else 0.0
    for optimizer in optimizers:
        if parts.scaler is not None:
            parts.scaler.step(optimizer)
        else:
            optimizer.step()
    if parts.scaler is not None:
        parts.scaler.update()
    parts.g_optimizer.zero_grad(set_to_none=True)
    parts.d_optimizer.zero_grad(set_to_none=True)

    record = {f"loss_{name}": float(value.detach()) for name, value in losses.terms.items()}
    record["loss"] = float(losses.total.detach())
    record["gan_weight"] = losses.gan_weight
    record["grad_norm_generator"] = g_norm
    if gan_on:
        record["loss_disc"] = float(disc_loss.detach())
        record["grad_norm_discriminator"] = d_norm
    return record


def _grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))
