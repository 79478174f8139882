"""Train a face-recognition model on HSFace (Vec2Face paper §4, Table 10): ArcFace with a class-sharded head.

One GPU, several GPUs, or CPU processes (gloo)::

    accelerate launch recipes/train_fr.py --dataset=<hub id or folder> --dataset_config=10k
    accelerate launch --multi_gpu --num_processes 8 recipes/train_fr.py --config=paper --dataset=...
    accelerate launch recipes/train_fr.py --config=run.json --resume=latest
    python -m accelerate.commands.launch --multi_gpu --num_processes 2 --mixed_precision no \\
        recipes/train_fr.py --config=tiny --dataset=./toy        # 2 CPU processes

Config (:mod:`recipes.config`, shared with ``train_vec2face``): ``--config`` takes a preset name
(:data:`PRESETS`) or a YAML/JSON file of fields (a checkpoint's ``config.json`` works); every other
argument is a ``--field=value`` override of :class:`TrainConfig`; ``--help`` lists the fields.
Defaults are the paper's recipe: SE-IResNet-50, ArcFace (s=64, m=0.5), 512-d embeddings, SGD lr 0.1 per 128 images (scaled linearly with the global batch), momentum 0.9,
weight decay 5e-4, 26 epochs with the lr divided by 10 at epochs 12, 20 and 24, batch 128 per
device, flip + RandAugment + random erasing, fp16 on GPU.

Outputs under ``output_dir``: ``config.json``, ``log.jsonl`` (one JSON object per log step),
``checkpoints/step-XXXXXXXX/`` (:mod:`recipes.fr_checkpoints`: ``accelerator.save_state`` plus one
head shard per rank) and, at the end, ``backbone/`` (``model.safetensors`` + ``backbone_config.json``,
what ``python -m recipes.eval_fr --model=<output_dir>/backbone`` reads; a checkpoint folder works
too). Resuming needs the same number of processes; on CPU a resumed run is bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run by path (`accelerate launch recipes/train_fr.py`): import the checkout's package
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout root instead of recipes/

import dataclasses
import importlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from recipes.backbones import BACKBONES, build_backbone, export_backbone
from recipes.config import check_field_types, parse_or_exit, save_config
from recipes.config import parse_config as _parse_config
from recipes.fr_checkpoints import check_resumable, find_latest_checkpoint, load_checkpoint, save_checkpoint
from recipes.fr_data import FaceAugment, TrainData, count_classes, load_face_dataset
from recipes.margin_head import ShardedMarginHead
from vec2face_model.errors import InvalidInputError
from vec2face_model.seeding import derive_seed

__all__ = ["PRESETS", "TrainConfig", "learning_rate", "main", "parameter_groups", "parse_config", "train"]

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


def _check_resume_config(checkpoint: Path, config: TrainConfig) -> None:
    saved = parse_config([f"--config={checkpoint / 'config.json'}"])
    changed = [f"{k}: {getattr(saved, k)!r} -> {getattr(config, k)!r}" for k in RESUME_FIXED_FIELDS
               if getattr(saved, k) != getattr(config, k)]
    if changed:
        raise InvalidInputError(f"cannot resume {checkpoint} with a different model or data order: {'; '.join(changed)}")


# -- optimisation ----------------------------------------------------------------------------------


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
    from recipes.verification_sets import load_sets
    sets = load_sets(config.eval_data_dir, config.eval_sets)
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
        raise InvalidInputError("set --dataset=<Hub repo id or local folder with image and label columns>")
    cuda = torch.cuda.is_available()
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(cpu=not cuda, mixed_precision=resolve_precision(config.mixed_precision, cuda),
                              log_with=config.log_with or None, project_dir=str(output_dir))
    rank, world_size = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.json")
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
    # 3. resume: checked before anything is prepared, restored after (accelerate's load_state wants prepared objects)
    resume_from = find_latest_checkpoint(output_dir) if config.resume == "latest" else (config.resume or None)
    if resume_from is not None:
        resume_from = Path(resume_from)
        check_resumable(resume_from, world_size)
        _check_resume_config(resume_from, config)
    optimizer = torch.optim.SGD(parameter_groups(backbone, head, config.weight_decay), lr=config.lr,
                                momentum=config.momentum)
    backbone, optimizer = accelerator.prepare(backbone, optimizer)
    run = _Run(config, accelerator, data, backbone, head, optimizer)
    if resume_from is not None:
        saved = load_checkpoint(resume_from, accelerator=accelerator, head=head, optimizer=optimizer)
        run.step, run.epoch, run.step_in_epoch = saved["step"], saved["epoch"], saved["step_in_epoch"]
        run.last_checkpoint = resume_from
        accelerator.print(f"resumed from {resume_from} at step {run.step} (epoch {run.epoch}, step {run.step_in_epoch})")
    return run


def _checkpoint(run: _Run, epoch_done: bool) -> None:
    position = {"step": run.step, "epoch": run.epoch + epoch_done, "step_in_epoch": 0 if epoch_done else run.step_in_epoch}
    directory = Path(run.config.output_dir) / "checkpoints" / f"step-{run.step:08d}"
    save_checkpoint(directory, accelerator=run.accelerator, config=run.config, head=run.head, optimizer=run.optimizer,
                    position=position)
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
    if accelerator.is_main_process:  # what eval_fr reads: python -m recipes.eval_fr --model=<output_dir>/backbone
        export_backbone(accelerator.unwrap_model(backbone), Path(config.output_dir) / "backbone", config.backbone,
                        config.embedding_size, config.backbone_kwargs)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run.last_checkpoint


def _every_rank_has(has: bool, accelerator) -> bool:
    if accelerator.num_processes == 1:
        return has
    flag = torch.tensor([int(has)], device=accelerator.device)
    return int(accelerator.reduce(flag, reduction="sum").item()) == accelerator.num_processes


def main(argv: Sequence[str] | None = None) -> Path:
    config = parse_or_exit(TrainConfig, argv, PRESETS, prog="train_fr", description=__doc__)
    return train(config)


if __name__ == "__main__":
    main()
