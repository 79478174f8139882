"""Train (or fine-tune) the Vec2Face generator on aligned 112x112 faces, with Accelerate.

One GPU, several GPUs, or CPU processes (gloo)::

    accelerate launch recipes/train_vec2face.py --dataset=<hub id or folder> --recognizer=arcface-r100-glint360k.pth
    accelerate launch --multi_gpu --num_processes 4 recipes/train_vec2face.py --config=paper --dataset=... --recognizer=...
    accelerate launch recipes/train_vec2face.py --config=out/config.json --resume=latest
    OMP_NUM_THREADS=1 python -m accelerate.commands.launch --multi_gpu --num_processes 2 --mixed_precision no \\
        recipes/train_vec2face.py --config=tiny --dataset=./faces --recognizer=./iresnet   # 2 CPU processes

(``accelerate launch --cpu --num_processes 2`` starts ONE process; two CPU processes need
``--multi_gpu``, the script itself picks ``Accelerator(cpu=True)`` when CUDA is missing.)

Config (:mod:`recipes.vec2face_config`, parsed by :mod:`recipes.config` like ``train_fr``'s):
``--config`` takes a preset name or a YAML/JSON file of fields (a run's ``config.json`` works);
every other argument is a ``--field=value`` override (unknown fields are rejected); ``--help``
lists every field with its default. ``--gradient_checkpointing`` (or ``--gradient-checkpointing``)
recomputes the generator's blocks in backward (``Vec2Face.enable_gradient_checkpointing``): less
activation memory for the 174M-parameter generator at the cost of a second forward.

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
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from recipes.config import parse_or_exit, save_config
from recipes.vec2face_config import GENERATOR_ARCHS, PRESETS, RESUME_FREE_FIELDS, TrainConfig, parse_config
from recipes.vec2face_data import (
    FaceTrainingData,
    add_identity_features,
    epoch_batches,
    load_recognizer,
    load_training_dataset,
)
from recipes.vec2face_losses import PerceptualLoss, Vec2FaceObjective, build_lpips
from recipes.vec2face_step import TrainingParts, train_step
from vec2face_model.errors import InvalidInputError
from vec2face_model.files import write_json_atomic
from vec2face_model.seeding import STREAM_VEC2FACE_INIT, derive_seed

__all__ = [
    # defined here
    "TrainResult", "TrainingParts", "build_discriminator", "build_generator", "find_checkpoint", "learning_rate", "main",
    "train", "train_step",
    # the recipe's config and data, re-exported so `recipes.train_vec2face` stays the one entry point
    "GENERATOR_ARCHS", "PRESETS", "TrainConfig", "add_identity_features", "epoch_batches", "load_recognizer",
    "load_training_dataset", "parse_config",
]

# Seed streams of this recipe, kept apart from vec2face_model.seeding's dataset-generation streams:
# 401 initial weights (here), 402 data order (vec2face_data.py), 403 masks and 404 dropout (vec2face_step.py).


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


# -- models ----------------------------------------------------------------------------------------


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


def enable_gradient_checkpointing(generator: nn.Module) -> None:
    """diffusers' ``ModelMixin.enable_gradient_checkpointing``, or an error saying the model cannot."""
    if not getattr(generator, "_supports_gradient_checkpointing", False):
        raise InvalidInputError(f"gradient_checkpointing=true, but {type(generator).__name__} does not support gradient "
                                "checkpointing in this version of vec2face_model; drop --gradient_checkpointing")
    generator.enable_gradient_checkpointing()


class TrainerState:
    """The step counter, checkpointed with the run (everything else follows from it)."""

    def __init__(self):
        self.global_step = 0

    def state_dict(self) -> dict:
        return {"global_step": self.global_step}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])




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


def _save_checkpoint(accelerator, config: TrainConfig, state: TrainerState, output_dir: Path, extra: dict) -> Path:
    folder = output_dir / "checkpoints" / f"step-{state.global_step:08d}"
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_config(config, folder / "config.json")
        # written last: marks the checkpoint complete
        write_json_atomic(folder / "trainer_state.json", {"global_step": state.global_step, **extra})
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


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; call once per process (under ``accelerate launch``)."""
    from accelerate import Accelerator
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from vec2face_model.pipeline_vec2face import Vec2FacePipeline

    if not config.recognizer:
        raise InvalidInputError("no --recognizer given: pass an official IResNet .pth/.safetensors or an IResNet.save_pretrained folder")
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
        save_config(config, output_dir / "config.json")
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
            raise InvalidInputError(f"features=column but the dataset has no column {config.feature_column!r}; columns: {ds.column_names}")
        feature_column = config.feature_column
    data = FaceTrainingData(ds, config.image_column, feature_column)
    total_batch = config.batch_size * world
    steps_per_epoch = len(data) // total_batch
    if steps_per_epoch < 1:
        raise InvalidInputError(f"{len(data)} images are fewer than one global batch ({config.batch_size} x {world} processes)")
    total_steps = steps_per_epoch * config.epochs
    gan_start_step = math.ceil(config.gan_start_epoch * steps_per_epoch)
    peak_lr = config.peak_lr(total_batch)

    # 2. models (identical initial weights on every rank)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, STREAM_VEC2FACE_INIT))
        generator = build_generator(config).train()
        discriminator = build_discriminator(config).train()
    _freeze_unused_generator_parts(generator)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(generator)
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
                raise InvalidInputError(
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
        save_config(config, pipeline_dir / "train_vec2face_config.json")
        log(f"saved the pipeline to {pipeline_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output_dir=output_dir, global_step=state.global_step, history=history, pipeline_dir=pipeline_dir)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_or_exit(TrainConfig, argv, PRESETS, prog="train_vec2face", description=__doc__)
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
