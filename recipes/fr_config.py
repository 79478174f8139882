"""The config of ``recipes/train_fr.py``: every field a run depends on, its presets and resume rules.

Parsed by :mod:`recipes.config` (``--config=PRESET|file.yaml`` then ``--field=value`` flags), like
``train_vec2face``'s. The defaults are the paper's recipe (Vec2Face §4, Table 10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from recipes.backbones import BACKBONES
from recipes.config import check_field_types
from recipes.config import parse_config as _parse_config
from vec2face_model.errors import InvalidInputError

__all__ = ["PRESETS", "RESUME_FIXED_FIELDS", "TrainConfig", "check_resume_config", "parse_config", "resolve_precision"]

PRECISIONS = ("auto", "no", "fp16", "bf16")

@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; the defaults are the paper's recipe (Table 10)."""

    # data
    dataset: str = ""  # load_dataset path: Hub repo id or local folder with image + label columns
    dataset_config: str | None = None  # e.g. "10k"
    split: str = "train"
    streaming: bool = False
    max_identities: int | None = None  # keep labels < N (the paper's 100k/200k subsets)
    num_classes: int | None = None  # None: max_identities, else largest label + 1 (map-style only)
    num_workers: int = 4
    # augmentation
    hflip: bool = True
    randaugment_ops: int = 2  # 0 switches RandAugment off
    randaugment_magnitude: int = 9
    erasing_prob: float = 0.5  # the official README: without erasing 89.94 instead of 92.00
    # model
    backbone: str = "se_iresnet50"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the factory, e.g. {"dropout": 0.0}
    embedding_size: int = 512
    margin_scale: float = 64.0
    margin: float = 0.5
    sample_rate: float = 1.0  # Partial FC negative-class sampling; 1.0 = exact softmax
    # optimisation
    batch_size: int = 128  # per process
    lr: float = 0.1  # per lr_reference_batch images of global batch
    lr_reference_batch: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4  # not on normalisation layers
    epochs: int = 26
    lr_milestones: tuple[int, ...] = (12, 20, 24)  # 1-based epochs that start with a further lr_decay
    lr_decay: float = 0.1
    warmup_steps: int = 0
    grad_clip: float = 5.0  # backbone gradient norm (official trainer); 0 = off
    mixed_precision: str = "auto"  # auto: fp16 on GPU, no on CPU
    max_steps: int | None = None  # stop early (smoke tests, benchmarks)
    seed: int = 42
    # bookkeeping
    output_dir: str = "runs/train_fr"
    log_every: int = 50
    log_with: str = ""  # an accelerate tracker ("tensorboard", "wandb", ...) besides log.jsonl
    checkpoint_every: int = 0  # steps; checkpoints are also written at every epoch end and at the end
    eval_every: int = 0  # steps; 0 = never
    eval_data_dir: str = ""  # verification sets for the built-in hook (recipes/eval_fr.py)
    eval_sets: tuple[str, ...] = ("lfw", "cfp_fp", "agedb_30")
    eval_hook: str = ""  # "module:function" returning fn(backbone, step) -> {name: value}
    resume: str = ""  # a checkpoint directory, or "latest" (newest in output_dir, if any)

    def __post_init__(self):
        check_field_types(self)
        positive = ["batch_size", "epochs", "lr_reference_batch", "log_every", "embedding_size"]
        non_negative = ["num_workers", "randaugment_ops", "randaugment_magnitude", "warmup_steps",
                        "checkpoint_every", "eval_every", "seed"]
        optional_positive = ["max_identities", "num_classes", "max_steps"]
        for name in positive + [n for n in optional_positive if getattr(self, n) is not None]:
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be positive, got {getattr(self, name)}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise InvalidInputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.backbone not in BACKBONES:
            raise InvalidInputError(f"backbone must be one of {sorted(BACKBONES)}, got {self.backbone!r}")
        if self.mixed_precision not in PRECISIONS:
            raise InvalidInputError(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        if not 0.0 <= self.erasing_prob <= 1.0:
            raise InvalidInputError(f"erasing_prob must be in [0, 1], got {self.erasing_prob}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise InvalidInputError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not 0.0 <= self.margin < math.pi / 2 or self.margin_scale <= 0:
            raise InvalidInputError(f"need 0 <= margin < pi/2 and margin_scale > 0, got {self.margin}, {self.margin_scale}")
        if self.lr <= 0 or not 0.0 <= self.momentum < 1.0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise InvalidInputError("need lr > 0, 0 <= momentum < 1, weight_decay >= 0 and grad_clip >= 0")
        if not 0.0 < self.lr_decay <= 1.0:
            raise InvalidInputError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if list(self.lr_milestones) != sorted(set(self.lr_milestones)) or any(m < 1 for m in self.lr_milestones):
            raise InvalidInputError(f"lr_milestones must be increasing 1-based epochs, got {self.lr_milestones}")
        if self.eval_hook and (":" not in self.eval_hook or self.eval_hook.count(":") > 1):
            raise InvalidInputError(f"eval_hook must look like 'package.module:function', got {self.eval_hook!r}")
        if self.eval_every and not (self.eval_hook or self.eval_data_dir):
            raise InvalidInputError("eval_every needs eval_data_dir (built-in verification) or eval_hook")


# Named presets: small deltas over the defaults (which are the paper's recipe).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    # Table 9's transformer backbones.
    "paper_vit_s": {"backbone": "vit_s"},
    "paper_vit_b": {"backbone": "vit_b"},
    # Seconds on CPU (tests): a one-block, 32-wide ViT, 4 images per process, every step logged; a
    # softer margin and scale suit a handful of classes (s=64, m=0.5 barely move in a few dozen steps).
    "tiny": {
        "backbone": "vit_s", "backbone_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2},
        "embedding_size": 32, "margin_scale": 16.0, "margin": 0.2, "batch_size": 4, "lr": 0.03,
        "lr_reference_batch": 8, "warmup_steps": 4, "epochs": 3, "lr_milestones": [3], "num_workers": 0,
        "log_every": 1,
    },
}

# Fields a resumed run must share with its checkpoint: they fix the model, the head and the data order.
RESUME_FIXED_FIELDS = ("dataset", "dataset_config", "split", "streaming", "max_identities", "num_classes",
                       "backbone", "backbone_kwargs", "embedding_size", "sample_rate", "batch_size", "seed")


def parse_config(argv: Sequence[str]) -> TrainConfig:
    """``[--config=PRESET|FILE] [--field=value ...]`` -> config: defaults, then preset/file, then flags."""
    return _parse_config(TrainConfig, argv, PRESETS, prog="train_fr")


def resolve_precision(requested: str, cuda: bool) -> str:
    if requested == "auto":
        return "fp16" if cuda else "no"
    if requested == "fp16" and not cuda:
        raise InvalidInputError("fp16 mixed precision needs a GPU; use mixed_precision=bf16 or no on CPU")
    return requested


def check_resume_config(checkpoint: Path, config: TrainConfig) -> None:
    saved = parse_config([f"--config={checkpoint / 'config.json'}"])
    changed = [f"{k}: {getattr(saved, k)!r} -> {getattr(config, k)!r}" for k in RESUME_FIXED_FIELDS
               if getattr(saved, k) != getattr(config, k)]
    if changed:
        raise InvalidInputError(f"cannot resume {checkpoint} with a different model or data order: {'; '.join(changed)}")
