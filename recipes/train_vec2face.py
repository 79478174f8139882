"""Train (or fine-tune) the Vec2Face generator on aligned 112x112 faces, with Accelerate.

One GPU, several GPUs, or CPU processes (gloo)::

    accelerate launch recipes/train_vec2face.py --dataset=<hub id or folder> --recognizer=arcface-r100-glint360k.pth
    accelerate launch --multi_gpu --num_processes 4 recipes/train_vec2face.py --config=paper --dataset=... --recognizer=...
    accelerate launch recipes/train_vec2face.py --config=out/config.json --resume=latest
    OMP_NUM_THREADS=1 python -m accelerate.commands.launch --multi_gpu --num_processes 2 --mixed_precision no \\
        recipes/train_vec2face.py --config=tiny --dataset=./faces --recognizer=./iresnet   # 2 CPU processes

(``accelerate launch --cpu --num_processes 2`` starts ONE process; two CPU processes need
``--multi_gpu``, the script itself picks ``Accelerator(cpu=True)`` when CUDA is missing.)

``--config`` takes a preset name (:data:`PRESETS`) or a JSON file of overrides (a run's
``config.json`` works); every other argument is a strict ``--field=value`` override of
:class:`TrainConfig` (unknown fields are rejected). ``--help`` lists the fields.

Data: any ``datasets`` image dataset of aligned 112x112 RGB faces — ``load_dataset(dataset,
dataset_config, split=split)`` of a Hub repo, a local folder of images (imagefolder) or of
parquet files, or a ``save_to_disk`` folder — with an ``image`` column (an optional ``label``
column is ignored: the objective needs no labels). The identity feature of every real image comes
from a frozen recognizer (``IResNet.from_official`` for an official ``.pth``/``.safetensors``
file, ``IResNet.from_pretrained`` for a folder): ``features=cached`` adds it as a dataset column
with ``Dataset.map`` (cached under a fingerprint of the dataset and the recognizer weights, so a
second run reuses it), ``online`` computes it every step, ``column`` reads an existing column. No
LMDB is needed.

Objective (:mod:`recipes.vec2face_losses`): pixel MSE + 0.2·LPIPS + 0.1·(1−SSIM) + token MSE +
identity (1−cos) + the patch-GAN term from ``gan_start_epoch`` on (LSGAN discriminator, generator
term −mean(D(x̂))). Training masks: truncated normal (min 0.5, mu 0.75, std 0.25, max 1.0).
AdamW (betas 0.9/0.99, weight decay 0.01) for generator and discriminator at the same learning
rate, linear warm-up then half-cycle cosine, per iteration.

Where this deliberately differs from the official ``vec2face.py`` (ARCHITECTURE.md section 4):

* ``lr = base_lr · total_batch / lr_scale_divisor``. The official help text says the divisor is
  256, its code divides by 112 (README run: 4e-5·128/112 = 4.57e-5). The default is the documented
  256; ``--config=paper`` sets 112 to reproduce the released model's actual rate.
* Mixed precision is on (fp16 on CUDA) unless disabled — the official ``--use_amp`` flag is
  inverted (passing it turns AMP off). Gradient clipping (``grad_clip``, 2.0) applies in every
  precision, not only with AMP.
* The discriminator is trained only by its own loss (``official_gan_gradient_leak=true``
  reproduces the official leak of the generator's GAN gradient into it), and is neither run nor
  stepped before ``gan_start_epoch`` (officially it runs with loss factor 0 and its AdamW step
  still applies weight decay). The GAN weight is a constant ``loss_gan`` (the official adaptive
  weight is dead code; ``gan_adaptive_weight=true`` enables VQGAN's rule with ``gan_disc_weight``,
  computed per process from its local batch).
* The generator's unused ``patch_embed`` and ``center_token`` (kept for strict loading of official
  weights) are frozen instead of being decayed towards zero by AdamW.
* Every random draw is keyed by (seed, step, rank): masks, dropout, data order. A resumed run
  continues exactly like an uninterrupted one (same process count required).

Outputs under ``output_dir``: ``config.json`` (resolved config), ``log.jsonl`` (one JSON object per
logged step: every loss term, lr, GAN state, gradient norms), ``checkpoints/step-XXXXXXXX/``
(``accelerator.save_state``: generator, discriminator, scaler, RNG; plus both optimizers, EMA and
the step as registered objects, ``config.json`` and ``trainer_state.json``), and at the end
``pipeline/``: a ``Vec2FacePipeline`` folder (trained generator — its EMA if enabled — and the
recognizer) that ``Vec2FacePipeline.from_pretrained`` loads.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run by path (`accelerate launch recipes/train_vec2face.py`): import the checkout's package
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout root instead of recipes/

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from vec2face_model.models.generator import TRAINING_MASK_RATIO
from vec2face_model.convert import weights_sha256
from vec2face_model.seeding import derive_seed

from recipes.vec2face_losses import LossWeights, PerceptualLoss, Vec2FaceObjective, build_lpips

__all__ = [
    "GENERATOR_ARCHS", "PRESETS", "TrainConfig", "TrainResult", "epoch_batches", "find_checkpoint",
    "learning_rate", "load_recognizer", "load_training_dataset", "add_identity_features", "main",
    "parse_config", "train", "train_step", "TrainingParts", "usage",
]

# Seed streams of this recipe (kept apart from vec2face_model.seeding's dataset-generation streams).
STREAM_INIT = 401
STREAM_DATA_ORDER = 402
STREAM_MASK = 403
STREAM_DROPOUT = 404

FEATURE_MODES = ("cached", "online", "column")
PRECISIONS = ("auto", "no", "fp16", "bf16")
FEATURE_CACHE_VERSION = 1  # bump when the feature computation changes, to invalidate caches

GENERATOR_ARCHS: dict[str, dict[str, Any]] = {
    "base": {},  # the released vec2face_vit_base_patch16 (174M parameters)
    "large": dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=1024, decoder_depth=8, decoder_num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=1280, decoder_depth=8, decoder_num_heads=16),
    "tiny": dict(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
                 image_decoder_channels=32, z_channels=32),  # smoke tests only
}

# -- config ----------------------------------------------------------------------------------------


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
        if self.features not in FEATURE_MODES:
            raise ValueError(f"features must be one of {FEATURE_MODES}, got {self.features!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        if self.init_generator is None and self.generator_arch not in GENERATOR_ARCHS:
            raise ValueError(f"generator_arch must be one of {tuple(GENERATOR_ARCHS)}, got {self.generator_arch!r}")
        lo, mu, std, hi = self.mask_ratio
        if not (0 < lo <= hi <= 1 and std > 0):
            raise ValueError(f"need 0 < mask_ratio_min <= mask_ratio_max <= 1 and mask_ratio_std > 0, got {self.mask_ratio}")
        for name in ("epochs", "batch_size", "log_every", "save_every_epochs", "keep_checkpoints", "feature_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_samples", "max_steps", "save_every_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or none, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        if self.gan_start_epoch < 0:
            raise ValueError(f"gan_start_epoch must be >= 0, got {self.gan_start_epoch}")
        for name in ("base_lr", "lr_scale_divisor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0 or none, got {self.lr}")
        if self.min_lr < 0 or (self.lr is not None and self.min_lr > self.lr):
            raise ValueError(f"min_lr must be in [0, lr], got {self.min_lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay}, {self.grad_clip}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or none, got {self.ema_decay}")
        if not self.disc_dims or any(d < 8 or d % 8 for d in self.disc_dims):
            raise ValueError(f"disc_dims must be multiples of 8 (GroupNorm groups), got {self.disc_dims}")
        if not any(dataclasses.astuple(self.loss_weights)):  # building LossWeights validates each weight
            raise ValueError("all loss weights are zero: nothing to train")

    @property
    def loss_weights(self) -> LossWeights:
        return LossWeights(self.loss_pixel, self.loss_lpips, self.loss_ssim, self.loss_token, self.loss_identity, self.loss_gan)

    @property
    def mask_ratio(self) -> tuple[float, float, float, float]:
        return (self.mask_ratio_min, self.mask_ratio_mu, self.mask_ratio_std, self.mask_ratio_max)

    def peak_lr(self, total_batch_size: int) -> float:
        return self.lr if self.lr is not None else self.base_lr * total_batch_size / self.lr_scale_divisor

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


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


def _coerce(name: str, hint, raw):
    """Convert a CLI string (or a JSON value) to the field's annotated type, or raise ValueError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, inner, raw)
    if origin is tuple:
        items = raw
        if isinstance(raw, str):
            text = raw.strip()
            items = json.loads(text) if text.startswith("[") else [t for t in text.split(",") if t.strip()]
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"--{name}: expected a comma-separated list, got {raw!r}")
        elem_types = [args[0]] * len(items) if (len(args) == 2 and args[1] is Ellipsis) else list(args)
        if len(elem_types) != len(items):
            raise ValueError(f"--{name}: expected {len(elem_types)} values, got {raw!r}")
        return tuple(_coerce(name, t, v) for t, v in zip(elem_types, items))
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("true", "1", "yes"):
            return True
        if str(raw).lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"--{name}: expected true or false, got {raw!r}")
    if hint is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError(f"--{name}: expected an integer, got {raw!r}")
        try:
            return int(raw) if not isinstance(raw, str) else int(raw.strip())
        except ValueError:
            raise ValueError(f"--{name}: expected an integer, got {raw!r}") from None
    if hint is float:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"--{name}: expected a number, got {raw!r}") from None
    if hint is str:
        if not isinstance(raw, str):
            raise ValueError(f"--{name}: expected a string, got {raw!r}")
        return raw
    raise TypeError(f"unsupported config type {hint} for {name}")


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _apply(values: dict[str, Any], overrides: dict[str, Any], source: str) -> None:
    types_ = _field_types()
    unknown = sorted(set(overrides) - set(types_))
    if unknown:
        raise ValueError(f"{source}: unknown config field(s) {unknown}; valid fields: {', '.join(types_)}")
    for key, raw in overrides.items():
        values[key] = _coerce(key, types_[key], raw)


def parse_config(argv: Sequence[str]) -> TrainConfig:
    """``--config=PRESET|file.json`` first, then strict ``--field=value`` overrides, into a validated config."""
    values: dict[str, Any] = {}
    overrides: dict[str, str] = {}
    preset = None
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"arguments must look like --field=value, got {arg!r} (see --help)")
        key, value = arg[2:].split("=", 1)
        if key == "config":
            preset = value
        elif key in overrides:
            raise ValueError(f"--{key} given twice")
        else:
            overrides[key] = value
    if preset is not None:
        if preset in PRESETS:
            _apply(values, PRESETS[preset], f"preset {preset!r}")
        elif Path(preset).is_file():
            loaded = json.loads(Path(preset).read_text())
            if not isinstance(loaded, dict):
                raise ValueError(f"{preset}: expected a JSON object of config fields")
            _apply(values, loaded, preset)
        else:
            raise ValueError(f"--config={preset}: neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    _apply(values, overrides, "command line")
    return TrainConfig(**values)


def usage() -> str:
    lines = [__doc__.split("\n\n")[0], "", "usage: train_vec2face.py [--config=PRESET|config.json] [--field=value ...]", "",
             f"presets: {', '.join(PRESETS)}", "fields (default):"]
    defaults = TrainConfig()
    for name, hint in _field_types().items():
        lines.append(f"  --{name}={getattr(defaults, name)!r}  [{getattr(hint, '__name__', hint)}]")
    return "\n".join(lines)


# -- schedule and data order -------------------------------------------------------------------------


def learning_rate(step: int, steps_per_epoch: int, config: TrainConfig, peak_lr: float) -> float:
    """Per-iteration lr: linear warm-up from 0 over ``warmup_epochs``, then half-cycle cosine to ``min_lr``."""
    epoch = step / steps_per_epoch  # fractional epoch, as the official schedule
    # 1. warm-up
    if epoch < config.warmup_epochs:
        return peak_lr * epoch / config.warmup_epochs
    # 2. cosine decay over the remaining epochs
    progress = min(1.0, (epoch - config.warmup_epochs) / (config.epochs - config.warmup_epochs))
    return config.min_lr + (peak_lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_batches(num_samples: int, batch_size: int, num_processes: int, rank: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's batches of one epoch: a permutation keyed by (seed, epoch), cut into global batches
    of ``batch_size·num_processes`` (last partial one dropped), each split across ranks."""
    global_batch = batch_size * num_processes
    generator = torch.Generator().manual_seed(derive_seed(seed, STREAM_DATA_ORDER, epoch))
    order = torch.randperm(num_samples, generator=generator)
    start = rank * batch_size
    return [order[s * global_batch + start : s * global_batch + start + batch_size].tolist() for s in range(num_samples // global_batch)]


# -- models ----------------------------------------------------------------------------------------


def load_recognizer(path: str | os.PathLike):
    """Frozen eval-mode IResNet from an official weight file or a ``save_pretrained`` folder
    (a pipeline folder works too: its ``recognizer`` component is used)."""
    from vec2face_model.models.iresnet import IResNet

    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "model_index.json").exists():
            model = IResNet.from_pretrained(path, subfolder="recognizer")
        else:
            model = IResNet.from_pretrained(path)
    elif path.is_file():
        model = IResNet.from_official(path)
    else:
        raise FileNotFoundError(f"recognizer={str(path)!r}: no such file or folder (official .pth/.safetensors or IResNet folder)")
    return model.eval().requires_grad_(False)


def build_generator(config: TrainConfig):
    from vec2face_model.models.generator import Vec2Face

    if config.init_generator is None:
        return Vec2Face(**GENERATOR_ARCHS[config.generator_arch])
    path = Path(config.init_generator).expanduser()
    if path.is_dir():
        if (path / "model_index.json").exists():
            return Vec2Face.from_pretrained(path, subfolder="generator")
        return Vec2Face.from_pretrained(path)
    return Vec2Face.from_official(path)


def build_discriminator(config: TrainConfig):
    from vec2face_model.models.discriminator import PatchDiscriminator

    if config.init_discriminator is None:
        return PatchDiscriminator(dims=list(config.disc_dims))
    path = Path(config.init_discriminator).expanduser()
    return PatchDiscriminator.from_pretrained(path) if path.is_dir() else PatchDiscriminator.from_official(path)


def _freeze_unused_generator_parts(generator: nn.Module) -> None:
    # Kept only so official weights load strictly; forward never uses them. Frozen, DDP needs no
    # find_unused_parameters and AdamW does not decay them.
    generator.patch_embed.requires_grad_(False)
    generator.center_token.requires_grad_(False)


class TrainerState:
    """The step counter, checkpointed with the run (everything else follows from it)."""

    def __init__(self):
        self.global_step = 0

    def state_dict(self) -> dict:
        return {"global_step": self.global_step}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])


# -- data ------------------------------------------------------------------------------------------


def load_training_dataset(config: TrainConfig):
    """The image dataset (a ``datasets.Dataset``) with the image column checked."""
    import datasets

    path = Path(config.dataset).expanduser()
    if not config.dataset:
        raise ValueError("no --dataset given: pass a Hub dataset id, a folder of images or parquet files, or a save_to_disk folder")
    if path.is_dir() and (path / "state.json").exists() and (path / "dataset_info.json").exists():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[config.split]
    else:
        ds = datasets.load_dataset(config.dataset, config.dataset_config, split=config.split)
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"{config.dataset}: expected a map-style dataset split, got {type(ds).__name__}")
    if config.image_column not in ds.column_names:
        raise ValueError(f"{config.dataset}: no image column {config.image_column!r}; columns: {ds.column_names} (set --image_column)")
    if not isinstance(ds.features[config.image_column], datasets.Image):
        raise ValueError(f"{config.dataset}: column {config.image_column!r} is {ds.features[config.image_column]}, not an Image feature")
    if config.max_samples is not None:
        ds = ds.select(range(min(config.max_samples, len(ds))))
    return ds


def _module_digest(module: nn.Module) -> str:
    config = json.dumps(dict(getattr(module, "config", {})), sort_keys=True, default=str)
    return hashlib.sha256((config + weights_sha256(module)).encode()).hexdigest()


def add_identity_features(ds, recognizer: nn.Module, image_column: str, feature_column: str, batch_size: int, device) -> Any:
    """``ds`` plus a float32 column of recognizer features of its images (``Dataset.map``).

    The new fingerprint hashes the dataset fingerprint and the recognizer's weights, so datasets
    finds the cache file of an earlier run with the same data and recognizer and skips the work.
    """
    from datasets.fingerprint import Hasher

    from vec2face_model.conventions import from_pil

    fingerprint = Hasher.hash([ds._fingerprint, _module_digest(recognizer), image_column, feature_column, FEATURE_CACHE_VERSION])

    def embed(batch):
        images = from_pil(batch[image_column]).to(device)
        with torch.inference_mode():
            features = recognizer(images).float().cpu().numpy()
        return {feature_column: features}

    return ds.map(embed, batched=True, batch_size=batch_size, new_fingerprint=fingerprint, desc="identity features")


class FaceTrainingData(torch.utils.data.Dataset):
    """Items ``{"pixel_values": [3,112,112] in [-1,1], "features": [512] (if a feature column is used)}``."""

    def __init__(self, ds, image_column: str, feature_column: str | None):
        columns = [image_column] + ([feature_column] if feature_column else [])
        self.ds = ds.select_columns(columns)
        self.image_column = image_column
        self.feature_column = feature_column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict:
        from vec2face_model.conventions import from_pil

        row = self.ds[index]
        item = {"pixel_values": from_pil([row[self.image_column]])[0]}
        if self.feature_column:
            item["features"] = torch.as_tensor(row[self.feature_column], dtype=torch.float32)
        return item


# -- checkpoints -------------------------------------------------------------------------------------


def find_checkpoint(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint folder to resume from (None: start fresh; "latest" with none saved yet also starts fresh)."""
    if resume is None:
        return None
    if resume == "latest":
        done = [p for p in sorted((output_dir / "checkpoints").glob("step-*")) if (p / "trainer_state.json").exists()]
        return done[-1] if done else None
    path = Path(resume).expanduser()
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"resume={resume!r}: not a finished checkpoint folder (no trainer_state.json)")
    return path


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) if not isinstance(obj, str) else obj)
    os.replace(tmp, path)


def _save_checkpoint(accelerator, config: TrainConfig, state: TrainerState, output_dir: Path, extra: dict) -> Path:
    folder = output_dir / "checkpoints" / f"step-{state.global_step:08d}"
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(folder / "config.json", config.to_json())
        # written last: marks the checkpoint complete
        _write_json(folder / "trainer_state.json", {"global_step": state.global_step, **extra})
        finished = [p for p in sorted((output_dir / "checkpoints").glob("step-*")) if (p / "trainer_state.json").exists()]
        for old in finished[: -config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def _check_resume_config(saved: dict, config: TrainConfig, log) -> None:
    current = dataclasses.asdict(config)
    changed = {k: (saved.get(k), v) for k, v in current.items() if k not in RESUME_FREE_FIELDS and json.loads(json.dumps(v)) != saved.get(k)}
    if changed:
        log(f"warning: resuming with a config that differs from the checkpoint's: {changed}")


# -- training ----------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    history: list[dict]  # the logged records of this invocation (main process; other ranks: empty)
    pipeline_dir: Path | None


def _resolve_precision(setting: str, cuda: bool) -> str | None:
    if setting != "auto":
        return setting
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # the launcher's --mixed_precision decides
    return "fp16" if cuda else "no"


def _grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; call once per process (under ``accelerate launch``)."""
    from accelerate import Accelerator
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from vec2face_model.pipeline_vec2face import Vec2FacePipeline

    if not config.recognizer:
        raise ValueError("no --recognizer given: pass an official IResNet .pth/.safetensors or an IResNet.save_pretrained folder")
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, mixed_precision=_resolve_precision(config.mixed_precision, cuda))
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    output_dir = Path(config.output_dir).expanduser()

    def log(message: str) -> None:
        if accelerator.is_main_process:
            print(f"[train_vec2face] {message}", flush=True)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_json(output_dir / "config.json", config.to_json())
    accelerator.wait_for_everyone()

    # 1. frozen recognizer and data
    recognizer = load_recognizer(config.recognizer).to(device)
    ds = load_training_dataset(config)
    feature_column = None
    if config.features == "cached":
        with accelerator.main_process_first():  # rank 0 computes, the others read its cache
            ds = add_identity_features(ds, recognizer, config.image_column, config.feature_column, config.feature_batch_size, device)
        feature_column = config.feature_column
    elif config.features == "column":
        if config.feature_column not in ds.column_names:
            raise ValueError(f"features=column but the dataset has no column {config.feature_column!r}; columns: {ds.column_names}")
        feature_column = config.feature_column
    data = FaceTrainingData(ds, config.image_column, feature_column)
    total_batch = config.batch_size * world
    steps_per_epoch = len(data) // total_batch
    if steps_per_epoch < 1:
        raise ValueError(f"{len(data)} images are fewer than one global batch ({config.batch_size} x {world} processes)")
    total_steps = steps_per_epoch * config.epochs
    gan_start_step = math.ceil(config.gan_start_epoch * steps_per_epoch)
    peak_lr = config.peak_lr(total_batch)

    # 2. models (identical initial weights on every rank)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, STREAM_INIT))
        generator = build_generator(config).train()
        discriminator = build_discriminator(config).train()
    _freeze_unused_generator_parts(generator)
    perceptual = None
    if config.loss_lpips > 0:
        lpips_model = build_lpips(config.lpips_vgg_weights, config.lpips_lin_weights, config.lpips_random_backbone, seed=config.seed)
        perceptual = PerceptualLoss(lpips_model).to(device)
    objective = Vec2FaceObjective(
        config.loss_weights, recognizer, perceptual, adaptive_gan_weight=config.gan_adaptive_weight,
        disc_weight=config.gan_disc_weight, official_gan_gradient_leak=config.official_gan_gradient_leak,
    )
    generator, discriminator = generator.to(device), discriminator.to(device)
    g_params = [p for p in generator.parameters() if p.requires_grad]
    d_params = [p for p in discriminator.parameters() if p.requires_grad]
    adamw = dict(lr=peak_lr, betas=config.adam_betas, weight_decay=config.weight_decay)
    g_optimizer = torch.optim.AdamW(g_params, **adamw)
    d_optimizer = torch.optim.AdamW(d_params, **adamw)
    ema = None
    if config.ema_decay is not None:
        ema = AveragedModel(generator, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=False)
    # Optimizers are not passed to prepare(): with two of them accelerate's fp16 path would update the
    # grad scaler twice per step. train_step drives accelerate's scaler itself (torch's multi-optimizer recipe).
    wrapped_generator, wrapped_discriminator = accelerator.prepare(generator, discriminator)
    parts = TrainingParts(
        config=config, device=device, rank=rank, autocast=accelerator.autocast, generator=wrapped_generator,
        generator_module=generator, discriminator=wrapped_discriminator, discriminator_module=discriminator,
        recognizer=recognizer, objective=objective, g_optimizer=g_optimizer, d_optimizer=d_optimizer, scaler=accelerator.scaler,
    )
    state = TrainerState()
    accelerator.register_for_checkpointing(g_optimizer, d_optimizer, state, *([ema] if ema is not None else []))

    # Dropout reseeds torch's global RNG every step (and load_state restores saved RNG states):
    # keep that inside this run so a caller's RNG state is left as it was.
    rng_devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=rng_devices):
        # 3. resume
        checkpoint = find_checkpoint(output_dir, config.resume)
        if checkpoint is not None:
            saved_state = json.loads((checkpoint / "trainer_state.json").read_text())
            if saved_state.get("num_processes", world) != world:
                raise ValueError(
                    f"{checkpoint} was written by {saved_state['num_processes']} processes, this run has {world}; "
                    "resume with the same number of processes (the data order and RNG streams depend on it)"
                )
            _check_resume_config(json.loads((checkpoint / "config.json").read_text()), config, log)
            accelerator.load_state(str(checkpoint))
            log(f"resumed from {checkpoint} at step {state.global_step}")
        log(
            f"{len(data)} images, {world} process(es) x {config.batch_size} = {total_batch} per step, {steps_per_epoch} steps/epoch, "
            f"{total_steps} steps, peak lr {peak_lr:.3g}, GAN from step {gan_start_step}, precision {accelerator.mixed_precision}"
        )

        # 4. loop
        history: list[dict] = []
        log_file = output_dir / "log.jsonl"
        stop_step = min(total_steps, config.max_steps or total_steps)
        saved_at = state.global_step if checkpoint is not None else -1
        tick = time.perf_counter()
        while state.global_step < stop_step:
            step = state.global_step
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            batches = epoch_batches(len(data), config.batch_size, world, rank, config.seed, epoch)[step_in_epoch:]
            loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=config.num_workers, pin_memory=cuda)
            for batch in loader:
                step = state.global_step
                lr = learning_rate(step, steps_per_epoch, config, peak_lr)
                for optimizer in (g_optimizer, d_optimizer):
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                gan_on = config.loss_gan > 0 and step >= gan_start_step
                record = train_step(parts, batch, step, gan_on)
                if ema is not None:
                    ema.update_parameters(generator)
                state.global_step += 1
                if state.global_step % config.log_every == 0 or state.global_step == stop_step:
                    names = sorted(record)
                    values = accelerator.reduce(torch.tensor([record[n] for n in names], dtype=torch.float64, device=device), "mean")
                    now = time.perf_counter()
                    entry = {"step": state.global_step, "epoch": state.global_step / steps_per_epoch, "lr": lr, "gan_active": gan_on,
                             **{n: float(v) for n, v in zip(names, values.cpu())}, "seconds": now - tick}
                    tick = now
                    if accelerator.is_main_process:
                        history.append(entry)
                        with log_file.open("a") as fh:
                            fh.write(json.dumps(entry) + "\n")
                        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
                end_of_epoch = state.global_step % steps_per_epoch == 0
                if (config.save_every_steps and state.global_step % config.save_every_steps == 0) or (
                    end_of_epoch and (state.global_step // steps_per_epoch) % config.save_every_epochs == 0
                ):
                    _save_checkpoint(accelerator, config, state, output_dir, {"num_processes": world, "epoch": state.global_step / steps_per_epoch})
                    saved_at = state.global_step
                if state.global_step >= stop_step:
                    break

    # 5. final checkpoint and the pipeline folder
    if saved_at != state.global_step:
        _save_checkpoint(accelerator, config, state, output_dir, {"num_processes": world, "epoch": state.global_step / steps_per_epoch})
    pipeline_dir = output_dir / "pipeline"
    if accelerator.is_main_process:
        final = (ema.module if ema is not None else generator).eval()
        Vec2FacePipeline(generator=final, recognizer=recognizer).save_pretrained(str(pipeline_dir))
        _write_json(pipeline_dir / "train_vec2face_config.json", config.to_json())
        log(f"saved the pipeline to {pipeline_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output_dir=output_dir, global_step=state.global_step, history=history, pipeline_dir=pipeline_dir)


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
    mask_generator = torch.Generator().manual_seed(derive_seed(config.seed, STREAM_MASK, step, parts.rank))
    token_drop_mask, token_all_mask = parts.generator_module.draw_masks(len(images), mask_generator, ratio=config.mask_ratio)
    torch.manual_seed(derive_seed(config.seed, STREAM_DROPOUT, step, parts.rank))

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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    try:
        config = parse_config(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
