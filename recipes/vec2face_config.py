"""The config of ``recipes/train_vec2face.py``: every field a run depends on, its presets and resume rules.

Parsed by :mod:`recipes.config` (``--config=PRESET|file.yaml`` then ``--field=value`` flags), like
``train_fr``'s. Defaults follow the official recipe (README command, 4x32 batch); see the
``train_vec2face`` docstring for where the defaults deliberately differ from the official code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from recipes.config import check_field_types
from recipes.config import parse_config as _parse_config
from recipes.vec2face_losses import LossWeights
from vec2face_model.errors import InvalidInputError
from vec2face_model.models.generator import TRAINING_MASK_RATIO

__all__ = ["FEATURE_MODES", "GENERATOR_ARCHS", "PRESETS", "RESUME_FREE_FIELDS", "TrainConfig", "parse_config"]

FEATURE_MODES = ("cached", "online", "column")
PRECISIONS = ("auto", "no", "fp16", "bf16")
GENERATOR_ARCHS: dict[str, dict[str, Any]] = {
    "base": {},  # the released vec2face_vit_base_patch16 (174M parameters)
    "large": dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=1024, decoder_depth=8, decoder_num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=1280, decoder_depth=8, decoder_num_heads=16),
    "tiny": dict(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
                 image_decoder_channels=32, z_channels=32),  # smoke tests only
}



@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. Defaults follow the official recipe (README command, 4x32 batch)."""

    # data
    dataset: str = ""  # load_dataset path: Hub repo id, folder of images/parquet, or save_to_disk folder
    dataset_config: str | None = None
    split: str = "train"
    image_column: str = "image"  # aligned 112x112 RGB faces
    max_samples: int | None = None  # use only the first N images
    num_workers: int = 4
    # identity features
    recognizer: str = ""  # official .pth/.safetensors (IResNet.from_official) or IResNet.save_pretrained folder
    features: str = "cached"  # cached: Dataset.map column | online: every step | column: already in the dataset
    feature_column: str = "identity_feature"
    feature_batch_size: int = 128
    # models
    generator_arch: str = "base"  # GENERATOR_ARCHS key; ignored when init_generator is given
    init_generator: str | None = None  # fine-tune: official .pth, safetensors, Vec2Face folder or pipeline folder
    init_discriminator: str | None = None  # official training checkpoint (model_disc) or PatchDiscriminator folder
    disc_dims: tuple[int, ...] = (64, 128, 256, 512)
    mask_ratio_min: float = TRAINING_MASK_RATIO[0]
    mask_ratio_mu: float = TRAINING_MASK_RATIO[1]
    mask_ratio_std: float = TRAINING_MASK_RATIO[2]
    mask_ratio_max: float = TRAINING_MASK_RATIO[3]
    # objective (recipes/vec2face_losses.py)
    loss_pixel: float = 1.0
    loss_lpips: float = 0.2
    loss_ssim: float = 0.1  # weighs 1 - SSIM
    loss_token: float = 1.0
    loss_identity: float = 1.0
    loss_gan: float = 1.0  # weighs -mean(D(x_hat)) from gan_start_epoch on
    gan_start_epoch: float = 80.0
    gan_adaptive_weight: bool = False  # VQGAN adaptive weight (dead code officially)
    gan_disc_weight: float = 0.8  # only with gan_adaptive_weight
    official_gan_gradient_leak: bool = False  # True: the generator's GAN term also trains D (official bug)
    lpips_vgg_weights: str | None = None  # torchvision vgg16-397923af.pth; default: torch hub cache
    lpips_lin_weights: str | None = None  # LPIPS linear heads; default: the file shipped with `lpips`
    lpips_random_backbone: bool = False  # smoke tests only: random VGG16 trunk
    # optimisation
    epochs: int = 100
    batch_size: int = 32  # per process
    base_lr: float = 4e-5
    lr_scale_divisor: float = 256.0  # lr = base_lr * total_batch / divisor (official code: 112, see docstring)
    lr: float | None = None  # absolute peak lr; overrides base_lr scaling
    min_lr: float = 0.0
    warmup_epochs: float = 5.0
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 2.0  # max global grad norm, generator and discriminator separately; 0 disables
    ema_decay: float | None = None  # e.g. 0.9999; the final pipeline then holds the EMA generator
    gradient_checkpointing: bool = False  # recompute the generator's blocks in backward: less memory, more time
    mixed_precision: str = "auto"  # auto: launcher's setting, else fp16 on CUDA, no on CPU
    # run
    seed: int = 0
    output_dir: str = "vec2face-run"
    resume: str | None = None  # "latest" (in output_dir) or a checkpoint folder
    max_steps: int | None = None  # stop early (the schedule still spans `epochs`)
    log_every: int = 50
    save_every_steps: int | None = None
    save_every_epochs: int = 1
    keep_checkpoints: int = 2

    def __post_init__(self):
        check_field_types(self)
        if self.features not in FEATURE_MODES:
            raise InvalidInputError(f"features must be one of {FEATURE_MODES}, got {self.features!r}")
        if self.mixed_precision not in PRECISIONS:
            raise InvalidInputError(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        if self.init_generator is None and self.generator_arch not in GENERATOR_ARCHS:
            raise InvalidInputError(f"generator_arch must be one of {tuple(GENERATOR_ARCHS)}, got {self.generator_arch!r}")
        lo, mu, std, hi = self.mask_ratio
        if not (0 < lo <= hi <= 1 and std > 0):
            raise InvalidInputError(f"need 0 < mask_ratio_min <= mask_ratio_max <= 1 and mask_ratio_std > 0, got {self.mask_ratio}")
        for name in ("epochs", "batch_size", "log_every", "save_every_epochs", "keep_checkpoints", "feature_batch_size"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_samples", "max_steps", "save_every_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1 or none, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise InvalidInputError(f"num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise InvalidInputError(f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        if self.gan_start_epoch < 0:
            raise InvalidInputError(f"gan_start_epoch must be >= 0, got {self.gan_start_epoch}")
        for name in ("base_lr", "lr_scale_divisor"):
            if not getattr(self, name) > 0:
                raise InvalidInputError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise InvalidInputError(f"lr must be > 0 or none, got {self.lr}")
        if self.min_lr < 0 or (self.lr is not None and self.min_lr > self.lr):
            raise InvalidInputError(f"min_lr must be in [0, lr], got {self.min_lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise InvalidInputError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay}, {self.grad_clip}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise InvalidInputError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise InvalidInputError(f"ema_decay must be in (0, 1) or none, got {self.ema_decay}")
        if not self.disc_dims or any(d < 8 or d % 8 for d in self.disc_dims):
            raise InvalidInputError(f"disc_dims must be multiples of 8 (GroupNorm groups), got {self.disc_dims}")
        if not any(dataclasses.astuple(self.loss_weights)):  # building LossWeights validates each weight
            raise InvalidInputError("all loss weights are zero: nothing to train")

    @property
    def loss_weights(self) -> LossWeights:
        return LossWeights(self.loss_pixel, self.loss_lpips, self.loss_ssim, self.loss_token, self.loss_identity, self.loss_gan)

    @property
    def mask_ratio(self) -> tuple[float, float, float, float]:
        return (self.mask_ratio_min, self.mask_ratio_mu, self.mask_ratio_std, self.mask_ratio_max)

    def peak_lr(self, total_batch_size: int) -> float:
        return self.lr if self.lr is not None else self.base_lr * total_batch_size / self.lr_scale_divisor


PRESETS: dict[str, dict[str, Any]] = {
    # The official README run (4 GPUs x 32): lr 4e-5*128/112 as the code computes it.
    "paper": dict(lr_scale_divisor=112.0),
    # Smoke tests on CPU: tiny generator and discriminator, random LPIPS trunk (not a perceptual
    # distance: never for real training), GAN from epoch 1.
    "tiny": dict(
        generator_arch="tiny", disc_dims=(16, 32), batch_size=2, epochs=4, warmup_epochs=0.0, gan_start_epoch=1.0,
        lr=1e-3, lpips_random_backbone=True, num_workers=0, log_every=1, feature_batch_size=16, mixed_precision="no",
    ),
}

# Fields that may change when resuming without affecting what is computed.
RESUME_FREE_FIELDS = {
    "resume", "max_steps", "log_every", "save_every_steps", "save_every_epochs", "keep_checkpoints", "num_workers",
    "output_dir", "feature_batch_size", "dataset", "recognizer", "lpips_vgg_weights", "lpips_lin_weights",
    "init_generator", "init_discriminator",
}


def parse_config(argv: Sequence[str]) -> TrainConfig:
    """``[--config=PRESET|FILE] [--field=value ...]`` -> config: defaults, then preset/file, then flags."""
    return _parse_config(TrainConfig, argv, PRESETS, prog="train_vec2face")
