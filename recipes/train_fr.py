"""Train a face-recognition model on HSFace (Vec2Face paper §4, Table 10): ArcFace with a class-sharded head.

One GPU, several GPUs, or CPU processes (gloo)::

    accelerate launch recipes/train_fr.py --dataset=<hub id or folder> --dataset_config=10k
    accelerate launch --multi_gpu --num_processes 8 recipes/train_fr.py --config=paper --dataset=...
    accelerate launch recipes/train_fr.py --config=run.json --resume=latest
    python -m accelerate.commands.launch --multi_gpu --num_processes 2 --mixed_precision no \\
        recipes/train_fr.py --config=tiny --dataset=./toy        # 2 CPU processes

``--config`` takes a preset name (:data:`PRESETS`) or a JSON file of overrides (a checkpoint's
``config.json`` works); every other argument is a strict ``--field=value`` override of
:class:`TrainConfig`. Defaults are the paper's recipe: SE-IResNet-50, ArcFace (s=64, m=0.5), 512-d
embeddings, SGD lr 0.1 per 128 images (scaled linearly with the global batch), momentum 0.9,
weight decay 5e-4, 26 epochs with the lr divided by 10 at epochs 12, 20 and 24, batch 128 per
device, flip + RandAugment + random erasing, fp16 on GPU.

Outputs under ``output_dir``: ``config.json``, ``log.jsonl`` (one JSON object per log step) and
``checkpoints/step-XXXXXXXX/`` holding ``config.json``, ``trainer_state.json``, ``backbone/``
(``IResNet.save_pretrained`` or a safetensors file), ``head-rankRRR.safetensors`` (this rank's class
centres) and ``rankRRR.pt`` (optimizer, grad scaler and RNG state of the rank). Resuming needs the
same number of processes; on CPU a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run by path (`accelerate launch recipes/train_fr.py`): import the checkout's package
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout root instead of recipes/

import dataclasses
import functools
import importlib
import json
import math
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from vec2face_model.seeding import derive_seed

from recipes.fr_data import FaceAugment, TrainData, count_classes, load_face_dataset
from recipes.margin_head import ShardedMarginHead

__all__ = [
    "PRESETS", "TrainConfig", "build_backbone", "find_latest_checkpoint", "learning_rate", "load_backbone",
    "load_checkpoint", "main", "parameter_groups", "parse_config", "save_checkpoint", "train", "usage",
]

STREAM_INIT = 301
STREAM_DROPOUT = 302
PRECISIONS = ("auto", "no", "fp16", "bf16")

# -- config ----------------------------------------------------------------------------------------


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
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), _field_types()[f.name])
        positive = ["batch_size", "epochs", "lr_reference_batch", "log_every", "embedding_size"]
        non_negative = ["num_workers", "randaugment_ops", "randaugment_magnitude", "warmup_steps",
                        "checkpoint_every", "eval_every", "seed"]
        optional_positive = ["max_identities", "num_classes", "max_steps"]
        for name in positive + [n for n in optional_positive if getattr(self, n) is not None]:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {self.backbone!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        if not 0.0 <= self.erasing_prob <= 1.0:
            raise ValueError(f"erasing_prob must be in [0, 1], got {self.erasing_prob}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not 0.0 <= self.margin < math.pi / 2 or self.margin_scale <= 0:
            raise ValueError(f"need 0 <= margin < pi/2 and margin_scale > 0, got {self.margin}, {self.margin_scale}")
        if self.lr <= 0 or not 0.0 <= self.momentum < 1.0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("need lr > 0, 0 <= momentum < 1, weight_decay >= 0 and grad_clip >= 0")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if list(self.lr_milestones) != sorted(set(self.lr_milestones)) or any(m < 1 for m in self.lr_milestones):
            raise ValueError(f"lr_milestones must be increasing 1-based epochs, got {self.lr_milestones}")
        if self.eval_hook and (":" not in self.eval_hook or self.eval_hook.count(":") > 1):
            raise ValueError(f"eval_hook must look like 'package.module:function', got {self.eval_hook!r}")
        if self.eval_every and not (self.eval_hook or self.eval_data_dir):
            raise ValueError("eval_every needs eval_data_dir (built-in verification) or eval_hook")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


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


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _is_instance(value: Any, hint: Any) -> bool:
    """isinstance for the annotations TrainConfig uses (optionals, tuple[X, ...], dict[str, Any])."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_is_instance(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return hint is Any or isinstance(value, hint)


def _check_type(name: str, value: Any, hint: Any) -> None:
    if not _is_instance(value, hint):
        raise TypeError(f"{name} must be {hint}, got {value!r}")


def _coerce(name: str, value: Any) -> Any:
    """A JSON value as the field's type: lists become tuples, ints become floats."""
    hint = _field_types()[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    if typing.get_origin(base) is tuple and isinstance(value, list):
        return tuple(value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _parse_value(name: str, text: str) -> Any:
    """A command-line string as the field's type (``none``/``null`` for optional fields)."""
    hint = _field_types()[name]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null"):
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"--{name} takes true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            raise ValueError(f"--{name} takes {hint.__name__}, got {text!r}") from None
    if origin is tuple:
        items = json.loads(text) if text.startswith("[") else [t for t in text.split(",") if t]
        item_type = typing.get_args(hint)[0]
        return tuple(item_type(i) for i in items)
    if origin is dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--{name} takes a JSON object, e.g. '{{\"dropout\": 0.0}}': {err}") from None
        return value
    return text


def _check_keys(keys, where: str) -> None:
    valid = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = [k for k in keys if k not in valid]
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} in {where}; valid keys: {', '.join(valid)}")


def parse_config(argv: Sequence[str]) -> TrainConfig:
    """``[--config=NAME|FILE] [--field=value ...]`` -> config: defaults, then preset/file, then overrides."""
    argv = list(argv)
    overrides: dict[str, Any] = {}
    source = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):  # the one flag that also takes a separate value
            source, i = argv[i + 1], i + 2
            continue
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"arguments are --config=NAME|FILE and --field=value overrides, got {arg!r}")
        key, text = arg[2:].split("=", 1)
        if key == "config":
            source = text
        else:
            _check_keys([key], "the command line")
            overrides[key] = _parse_value(key, text)
        i += 1
    values: dict[str, Any] = {}
    if source is not None:
        if source in PRESETS:
            values = dict(PRESETS[source])
        elif Path(source).is_file():
            values = json.loads(Path(source).read_text())
        else:
            raise ValueError(f"--config: {source!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
        _check_keys(values, f"--config {source}")
    values = {k: _coerce(k, v) for k, v in {**values, **overrides}.items()}
    return TrainConfig(**values)


def resolve_precision(requested: str, cuda: bool) -> str:
    if requested == "auto":
        return "fp16" if cuda else "no"
    if requested == "fp16" and not cuda:
        raise ValueError("fp16 mixed precision needs a GPU; use mixed_precision=bf16 or no on CPU")
    return requested


# -- model -----------------------------------------------------------------------------------------

TIMM_VITS = {"vit_s": "vit_small_patch16_224", "vit_b": "vit_base_patch16_224"}
BACKBONES = ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "se_iresnet50", *TIMM_VITS)


def build_backbone(name: str, embedding_size: int, kwargs: dict | None = None) -> nn.Module:
    """Images ``[B,3,112,112]`` in [-1, 1] -> raw embeddings ``[B, embedding_size]``; never downloads."""
    kwargs = dict(kwargs or {})
    if name in TIMM_VITS:
        import timm

        return timm.create_model(TIMM_VITS[name], pretrained=False, img_size=112, num_classes=embedding_size, **kwargs)
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    from vec2face_model.models import iresnet

    return getattr(iresnet, name)(num_features=embedding_size, **kwargs)


def save_backbone(backbone: nn.Module, directory: Path) -> None:
    from vec2face_model.models.iresnet import IResNet

    if isinstance(backbone, IResNet):
        backbone.save_pretrained(directory)  # loadable with IResNet.from_pretrained / eval_fr.py --model
    else:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(directory / "model.safetensors"))


def load_backbone(checkpoint_dir: str | Path) -> nn.Module:
    """The trained backbone of a checkpoint directory, in eval mode."""
    checkpoint_dir = Path(checkpoint_dir)
    config = parse_config([f"--config={checkpoint_dir / 'config.json'}"])
    backbone = build_backbone(config.backbone, config.embedding_size, config.backbone_kwargs)
    _load_backbone_weights(backbone, checkpoint_dir / "backbone")
    return backbone.eval()


def _load_backbone_weights(backbone: nn.Module, directory: Path) -> None:
    from safetensors.torch import load_file

    from vec2face_model.convert import load_state_dict_strict

    files = sorted(directory.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{directory}: expected one .safetensors weight file, found {[f.name for f in files]}")
    load_state_dict_strict(backbone, load_file(str(files[0])), str(files[0]))


def parameter_groups(backbone: nn.Module, head: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on everything but normalisation layers (the official trainer spares BatchNorm)."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    no_decay = {id(p) for m in backbone.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in trainable if id(p) in no_decay], "weight_decay": 0.0},
        {"params": list(head.parameters()), "weight_decay": weight_decay},
    ]


def learning_rate(config: TrainConfig, step: int, epoch: int, world_size: int) -> float:
    """lr of optimizer step ``step`` (0-based) in ``epoch`` (0-based)."""
    # 1. linear scaling with the global batch
    lr = config.lr * config.batch_size * world_size / config.lr_reference_batch
    # 2. step decay: milestone m (1-based) starts lowering the lr at 0-based epoch m - 1, as the
    #    official trainer's `epoch + 1 in reduce_lr`
    lr *= config.lr_decay ** sum(epoch + 1 >= m for m in config.lr_milestones)
    # 3. linear warmup
    if config.warmup_steps:
        lr *= min(1.0, (step + 1) / config.warmup_steps)
    return lr


# -- checkpoints -----------------------------------------------------------------------------------


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``output_dir/checkpoints``, or None."""
    found = sorted((Path(output_dir) / "checkpoints").glob("step-*[0-9]"))  # not the *.incomplete ones
    return found[-1] if found else None


def save_checkpoint(directory: Path, *, accelerator, config: TrainConfig, backbone, head: ShardedMarginHead,
                    optimizer, position: dict) -> None:
    """Write one checkpoint; it appears under its final name only once every rank has written."""
    from safetensors.torch import save_file

    rank = accelerator.process_index
    partial = directory.with_name(directory.name + ".incomplete")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        (partial / "config.json").write_text(config.to_json())
        state = {**position, "world_size": accelerator.num_processes, "num_classes": head.num_classes}
        (partial / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        save_backbone(accelerator.unwrap_model(backbone), partial / "backbone")
    accelerator.wait_for_everyone()
    metadata = {k: str(v) for k, v in dict(class_start=head.class_start, class_end=head.class_end,
                                           num_classes=head.num_classes, world_size=head.world_size).items()}
    save_file({"weight": head.weight.detach().contiguous()}, str(partial / f"head-rank{rank:03d}.safetensors"), metadata)
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler, "rng": rng}, partial / f"rank{rank:03d}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(directory, ignore_errors=True)
        partial.rename(directory)
    accelerator.wait_for_everyone()


def load_checkpoint(directory: Path, *, accelerator, config: TrainConfig, backbone, head: ShardedMarginHead) -> dict:
    """Backbone and head weights into the unwrapped models; returns the position and this rank's saved states."""
    from safetensors.torch import load_file

    if not (directory / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{directory} is not a checkpoint directory (no trainer_state.json); pass "
                                "output_dir/checkpoints/step-XXXXXXXX or --resume=latest")
    state = json.loads((directory / "trainer_state.json").read_text())
    if state["world_size"] != accelerator.num_processes:
        raise ValueError(f"{directory} was written by {state['world_size']} processes (one head shard and optimizer "
                         f"state each); resume it with --num_processes {state['world_size']}")
    saved = parse_config([f"--config={directory / 'config.json'}"])
    changed = [f"{k}: {getattr(saved, k)!r} -> {getattr(config, k)!r}" for k in RESUME_FIXED_FIELDS
               if getattr(saved, k) != getattr(config, k)]
    if changed:
        raise ValueError(f"cannot resume {directory} with a different model or data order: {'; '.join(changed)}")
    _load_backbone_weights(backbone, directory / "backbone")
    shard = load_file(str(directory / f"head-rank{accelerator.process_index:03d}.safetensors"))["weight"]
    head.weight.data.copy_(shard)
    rank_state = torch.load(directory / f"rank{accelerator.process_index:03d}.pt", map_location="cpu", weights_only=True)
    return {**state, **rank_state}


# -- evaluation hook -------------------------------------------------------------------------------

EvalHook = Callable[[nn.Module, int], dict]


def make_eval_hook(config: TrainConfig, device: torch.device) -> EvalHook | None:
    """``eval_hook`` imported, or verification accuracy on ``eval_data_dir`` (recipes/eval_fr.py), or None."""
    if config.eval_hook:
        module, function = config.eval_hook.split(":")
        return getattr(importlib.import_module(module), function)
    if not config.eval_data_dir:
        return None
    from recipes import eval_fr
    sets = eval_fr.load_sets(config.eval_data_dir, config.eval_sets)
    if not sets:
        raise FileNotFoundError(f"none of {config.eval_sets} found in {config.eval_data_dir}")

    def verification(backbone: nn.Module, step: int) -> dict:
        results = eval_fr.evaluate(backbone, sets, batch_size=config.batch_size, device=device)
        return {f"eval/{name}": metrics["accuracy"] for name, metrics in results.items()}

    return verification


# -- training --------------------------------------------------------------------------------------


class _Meter:
    """Loss, accuracy and throughput since the last log line; values stay on device until read."""

    def __init__(self):
        self.loss = self.accuracy = 0.0
        self.steps = self.images = 0
        self.data_time = 0.0
        self.start = time.perf_counter()

    def update(self, loss: torch.Tensor, accuracy: torch.Tensor, images: int, data_time: float) -> None:
        self.loss, self.accuracy = self.loss + loss.detach(), self.accuracy + accuracy
        self.steps, self.images, self.data_time = self.steps + 1, self.images + images, self.data_time + data_time

    def read(self) -> dict:
        elapsed = time.perf_counter() - self.start
        return {"loss": float(self.loss) / self.steps, "accuracy": float(self.accuracy) / self.steps,
                "images_per_s": self.images / elapsed, "data_wait": self.data_time / elapsed}


@dataclass
class _Run:
    """The live objects of a run and its position: ``step`` optimizer steps done, ``step_in_epoch`` of ``epoch``."""

    config: TrainConfig
    accelerator: Any
    data: TrainData
    backbone: nn.Module
    head: ShardedMarginHead
    optimizer: Any
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    last_checkpoint: Path | None = None


def _setup(config: TrainConfig) -> _Run:
    """Accelerator, data, backbone, head and optimizer; restored from ``config.resume`` if given."""
    from accelerate import Accelerator

    if not config.dataset:
        raise ValueError("set --dataset=<Hub repo id or local folder with image and label columns>")
    cuda = torch.cuda.is_available()
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(cpu=not cuda, mixed_precision=resolve_precision(config.mixed_precision, cuda),
                              log_with=config.log_with or None, project_dir=str(output_dir))
    rank, world_size = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(config.to_json())
    if config.log_with:
        accelerator.init_trackers("train_fr", config={k: str(v) for k, v in dataclasses.asdict(config).items()})
    # 1. data
    table = load_face_dataset(config.dataset, config.dataset_config, config.split, config.streaming, config.max_identities)
    num_classes = config.num_classes or count_classes(table, config.max_identities)
    augment = FaceAugment(config.hflip, config.randaugment_ops, config.randaugment_magnitude, config.erasing_prob)
    data = TrainData(table, augment, batch_size=config.batch_size, rank=rank, world_size=world_size, seed=config.seed,
                     num_workers=config.num_workers, pin_memory=cuda)
    # 2. models: the same initial backbone everywhere, this rank's head shard, per-rank dropout
    torch.manual_seed(derive_seed(config.seed, STREAM_INIT))
    backbone = build_backbone(config.backbone, config.embedding_size, config.backbone_kwargs)
    head = ShardedMarginHead(config.embedding_size, num_classes, scale=config.margin_scale, margin=config.margin,
                             rank=rank, world_size=world_size, sample_rate=config.sample_rate, seed=config.seed)
    head.to(accelerator.device)  # never prepared: DDP would broadcast rank 0's shard and average the shards' grads
    torch.manual_seed(derive_seed(config.seed, STREAM_DROPOUT, rank))
    # 3. resume: weights before DDP wraps the backbone, optimizer state after
    resume_from = find_latest_checkpoint(output_dir) if config.resume == "latest" else (config.resume or None)
    saved = None
    if resume_from is not None:
        saved = load_checkpoint(Path(resume_from), accelerator=accelerator, config=config, backbone=backbone, head=head)
    optimizer = torch.optim.SGD(parameter_groups(backbone, head, config.weight_decay), lr=config.lr,
                                momentum=config.momentum)
    backbone, optimizer = accelerator.prepare(backbone, optimizer)
    run = _Run(config, accelerator, data, backbone, head, optimizer)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        if accelerator.scaler is not None and saved["scaler"] is not None:
            accelerator.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng"]["cpu"])
        if cuda and saved["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(saved["rng"]["cuda"])
        run.step, run.epoch, run.step_in_epoch = saved["step"], saved["epoch"], saved["step_in_epoch"]
        run.last_checkpoint = Path(resume_from)
        accelerator.print(f"resumed from {resume_from} at step {run.step} (epoch {run.epoch}, step {run.step_in_epoch})")
    return run


def _checkpoint(run: _Run, epoch_done: bool) -> None:
    position = {"step": run.step, "epoch": run.epoch + epoch_done, "step_in_epoch": 0 if epoch_done else run.step_in_epoch}
    directory = Path(run.config.output_dir) / "checkpoints" / f"step-{run.step:08d}"
    save_checkpoint(directory, accelerator=run.accelerator, config=run.config, backbone=run.backbone, head=run.head,
                    optimizer=run.optimizer, position=position)
    run.last_checkpoint = directory


def _log(run: _Run, record: dict) -> None:
    if run.accelerator.is_main_process:
        with (Path(run.config.output_dir) / "log.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        run.accelerator.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    if run.config.log_with:
        run.accelerator.log(record, step=record["step"])


def _evaluate(run: _Run, eval_hook: EvalHook) -> None:
    """The hook on the main process, backbone in eval mode; the other ranks wait."""
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        model = run.accelerator.unwrap_model(run.backbone)
        model.eval()
        with torch.no_grad():
            metrics = eval_hook(model, run.step)
        model.train()
        _log(run, {"step": run.step, **metrics})
    run.accelerator.wait_for_everyone()


def train(config: TrainConfig, eval_hook: EvalHook | None = None) -> Path:
    """Run (or resume) training; returns the final checkpoint directory."""
    run = _setup(config)
    accelerator, backbone, head, optimizer = run.accelerator, run.backbone, run.head, run.optimizer
    eval_hook = eval_hook or make_eval_hook(config, accelerator.device)
    steps_per_epoch = run.data.steps_per_epoch
    total_steps = min(config.epochs * steps_per_epoch if steps_per_epoch else math.inf, config.max_steps or math.inf)
    backbone.train()
    head.train()
    while run.step < total_steps and run.epoch < config.epochs:
        meter, exhausted = _Meter(), False
        batches = iter(run.data.batches(run.epoch, run.step_in_epoch))
        while run.step < total_steps:
            tick = time.perf_counter()
            batch = next(batches, None)
            # streaming: ranks may hold different amounts of data; all stop with the first that runs out
            exhausted = batch is None if steps_per_epoch else not _every_rank_has(batch is not None, accelerator)
            if exhausted:
                break
            images, labels = (t.to(accelerator.device, non_blocking=True) for t in batch)
            data_time = time.perf_counter() - tick
            lr = learning_rate(config, run.step, run.epoch, accelerator.num_processes)
            for group in optimizer.param_groups:
                group["lr"] = lr
            out = head(backbone(images), labels, step=run.step)
            accelerator.backward(out.loss)
            if config.grad_clip:
                accelerator.clip_grad_norm_(backbone.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.step, run.step_in_epoch = run.step + 1, run.step_in_epoch + 1
            meter.update(out.loss, out.accuracy, len(images) * accelerator.num_processes, data_time)
            if run.step % config.log_every == 0:
                _log(run, {"step": run.step, "epoch": run.epoch, "lr": lr, **meter.read()})  # a GPU sync point
                meter = _Meter()
            if config.eval_every and run.step % config.eval_every == 0 and eval_hook is not None:
                _evaluate(run, eval_hook)
            if config.checkpoint_every and run.step % config.checkpoint_every == 0 and run.step_in_epoch != steps_per_epoch:
                _checkpoint(run, epoch_done=False)
        if exhausted or run.step_in_epoch == steps_per_epoch:
            _checkpoint(run, epoch_done=True)
            run.epoch, run.step_in_epoch = run.epoch + 1, 0
        elif run.last_checkpoint is None or run.last_checkpoint.name != f"step-{run.step:08d}":
            _checkpoint(run, epoch_done=False)  # stopped by max_steps
    accelerator.end_training()
    return run.last_checkpoint


def _every_rank_has(has: bool, accelerator) -> bool:
    if accelerator.num_processes == 1:
        return has
    flag = torch.tensor([int(has)], device=accelerator.device)
    return int(accelerator.reduce(flag, reduction="sum").item()) == accelerator.num_processes


def usage() -> str:
    defaults = TrainConfig()
    shown = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(TrainConfig)}
    fields = "\n".join(f"  --{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in shown.items())
    return f"{__doc__}\nPresets: {', '.join(PRESETS)}\n\nFields and defaults:\n{fields}"


def main(argv: Sequence[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(argv):
        print(usage())
        raise SystemExit(0)
    try:
        config = parse_config(argv)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"train_fr.py: {err}") from None
    return train(config)


if __name__ == "__main__":
    main()
