"""Checkpoints of the FR recipe through accelerate (``save_state`` / ``load_state``), plus the head shards.

``Accelerator.save_state`` writes what every rank shares: the backbone (``model.safetensors``), the
optimizer, the grad scaler, and each rank's RNG states. The class-sharded margin head is the one
thing it cannot hold: each rank owns different class centres (and their SGD momentum), while
accelerate writes optimizer state from the main process only. Each rank therefore adds
``head-rankRRR.safetensors`` (its centres and their optimizer state); loading puts them back over
what ``load_state`` restored. With ``backbone_config.json`` beside ``model.safetensors``, a
checkpoint is also an exported backbone (:func:`recipes.backbones.load_backbone`).

A checkpoint is written under ``step-XXXXXXXX.incomplete`` and renamed once every rank is done, so an
interrupted save never looks like a checkpoint. Resuming needs the same number of processes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from recipes.backbones import write_backbone_config
from recipes.config import save_config
from vec2face_model.errors import InvalidInputError

__all__ = ["find_latest_checkpoint", "load_checkpoint", "save_checkpoint"]

TRAINER_STATE_NAME = "trainer_state.json"  # written last: its presence marks a complete checkpoint


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``output_dir/checkpoints``, or None."""
    found = sorted((Path(output_dir) / "checkpoints").glob("step-*[0-9]"))  # not the *.incomplete ones
    found = [p for p in found if (p / TRAINER_STATE_NAME).is_file()]
    return found[-1] if found else None


def _head_file(directory: Path, rank: int) -> Path:
    return directory / f"head-rank{rank:03d}.safetensors"


def save_checkpoint(directory: Path, *, accelerator, config, head, optimizer, position: dict) -> None:
    """Write one checkpoint; it appears under its final name only once every rank has written."""
    from safetensors.torch import save_file

    partial = directory.with_name(directory.name + ".incomplete")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # a leftover of an interrupted save of this step
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    metadata = {k: str(v) for k, v in dict(class_start=head.class_start, class_end=head.class_end,
                                           num_classes=head.num_classes, world_size=head.world_size).items()}
    shard = {"weight": head.weight.detach().contiguous()}
    shard.update({f"optimizer.{k}": v.detach().contiguous() for k, v in optimizer.state.get(head.weight, {}).items()
                  if isinstance(v, torch.Tensor)})
    save_file(shard, str(_head_file(partial, accelerator.process_index)), metadata)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_config(config, partial / "config.json")
        write_backbone_config(partial, config.backbone, config.embedding_size, config.backbone_kwargs)
        state = {**position, "world_size": accelerator.num_processes, "num_classes": head.num_classes}
        (partial / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
        shutil.rmtree(directory, ignore_errors=True)
        partial.rename(directory)
    accelerator.wait_for_everyone()


def check_resumable(directory: Path, world_size: int) -> dict:
    """The checkpoint's trainer state, or an error that says why it cannot be resumed here."""
    if not (directory / TRAINER_STATE_NAME).is_file():
        raise InvalidInputError(f"{directory} is not a complete checkpoint directory (no {TRAINER_STATE_NAME}); pass "
                                "output_dir/checkpoints/step-XXXXXXXX or --resume=latest")
    if not (directory / "model.safetensors").is_file():
        raise InvalidInputError(f"{directory} has no model.safetensors: it was written before train_fr checkpointed "
                                "through accelerate; evaluate its backbone/ folder, or start a new run")
    state = json.loads((directory / TRAINER_STATE_NAME).read_text())
    if state["world_size"] != world_size:
        raise InvalidInputError(f"{directory} was written by {state['world_size']} processes (one head shard each); "
                                f"resume it with --num_processes {state['world_size']}")
    return state


def load_checkpoint(directory: Path, *, accelerator, head, optimizer) -> dict:
    """Restore everything ``save_checkpoint`` wrote (models and optimizer already prepared); returns the trainer state."""
    from safetensors.torch import load_file

    state = check_resumable(directory, accelerator.num_processes)
    accelerator.load_state(str(directory))
    shard = load_file(str(_head_file(directory, accelerator.process_index)), device=str(head.weight.device))
    head.weight.data.copy_(shard.pop("weight"))
    # load_state gave every rank the main process' optimizer state: replace the head's part with this rank's own.
    optimizer.state.pop(head.weight, None)
    if shard:
        optimizer.state[head.weight] = {k.removeprefix("optimizer."): v for k, v in shard.items()}
    return state
