"""Train a face-recognition model on HSFace (Vec2Face paper §4, Table 10): ArcFace with a class-sharded head.

One GPU, several GPUs, or CPU processes (gloo)::

    accelerate launch recipes/train_fr.py --dataset=<hub id or folder> --dataset_config=10k
    accelerate launch --multi_gpu --num_processes 8 recipes/train_fr.py --config=paper --dataset=...
    accelerate launch recipes/train_fr.py --config=run.json --resume=latest
    python -m accelerate.commands.launch --multi_gpu --num_processes 2 --mixed_precision no \\
        recipes/train_fr.py --config=tiny --dataset=./toy        # 2 CPU processes

Config (:mod:`recipes.fr_config`, parsed by :mod:`recipes.config` like ``train_vec2face``'s):
``--config`` takes a preset name (:data:`PRESETS`) or a YAML/JSON file of fields (a checkpoint's
``config.json`` works); every other argument is a ``--field=value`` override of
:class:`TrainConfig`; ``--help`` lists the fields. Defaults are the paper's recipe: SE-IResNet-50,
ArcFace (s=64, m=0.5), 512-d embeddings, SGD lr 0.1 per 128 images (scaled linearly with the global
batch), momentum 0.9, weight decay 5e-4, 26 epochs with the lr divided by 10 at epochs 12, 20 and
24, batch 128 per device, flip + RandAugment + random erasing, fp16 on GPU.

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
import importlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from recipes.backbones import build_backbone, export_backbone
from recipes.config import config_to_dict, parse_or_exit, save_config
from recipes.fr_checkpoints import check_resumable, find_latest_checkpoint, load_checkpoint, save_checkpoint
from recipes.fr_config import PRESETS, TrainConfig, check_resume_config, parse_config, resolve_precision
from recipes.fr_data import FaceAugment, TrainData, count_classes, load_face_dataset
from recipes.margin_head import ShardedMarginHead
from vec2face_model.errors import InvalidInputError
from vec2face_model.seeding import STREAM_FR_DROPOUT, STREAM_FR_INIT, derive_seed

__all__ = ["PRESETS", "TrainConfig", "learning_rate", "main", "parameter_groups", "parse_config", "train"]



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
        accelerator.init_trackers("train_fr", config={k: str(v) for k, v in config_to_dict(config).items()})
    # 1. data
    table = load_face_dataset(config.dataset, config.dataset_config, config.split, config.streaming, config.max_identities)
    num_classes = config.num_classes or count_classes(table, config.max_identities)
    augment = FaceAugment(config.hflip, config.randaugment_ops, config.randaugment_magnitude, config.erasing_prob)
    data = TrainData(table, augment, batch_size=config.batch_size, rank=rank, world_size=world_size, seed=config.seed,
                     num_workers=config.num_workers, pin_memory=cuda)
    # 2. models: the same initial backbone everywhere, this rank's head shard, per-rank dropout
    torch.manual_seed(derive_seed(config.seed, STREAM_FR_INIT))
    backbone = build_backbone(config.backbone, config.embedding_size, config.backbone_kwargs)
    head = ShardedMarginHead(config.embedding_size, num_classes, scale=config.margin_scale, margin=config.margin,
                             rank=rank, world_size=world_size, sample_rate=config.sample_rate, seed=config.seed)
    head.to(accelerator.device)  # never prepared: DDP would broadcast rank 0's shard and average the shards' grads
    torch.manual_seed(derive_seed(config.seed, STREAM_FR_DROPOUT, rank))
    # 3. resume: checked before anything is prepared, restored after (accelerate's load_state wants prepared objects)
    resume_from = find_latest_checkpoint(output_dir) if config.resume == "latest" else (config.resume or None)
    if resume_from is not None:
        resume_from = Path(resume_from)
        check_resumable(resume_from, world_size)
        check_resume_config(resume_from, config)
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
