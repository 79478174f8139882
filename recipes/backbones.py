"""Face-recognition backbones of the recipes: built by ``train_fr``, exported, and rebuilt by ``eval_fr``.

Every backbone maps canonical images ``[B,3,112,112]`` RGB in [-1, 1] to raw embeddings
``[B, embedding_size]``. An exported backbone is a folder with ``model.safetensors`` and
``backbone_config.json`` (``{"backbone", "embedding_size", "backbone_kwargs"}``), enough to rebuild
any of :data:`BACKBONES` (IResNets and timm ViTs alike) without the training config. ``train_fr``
writes that file into every checkpoint too, so a checkpoint folder is evaluable as it stands.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from vec2face_model.errors import InvalidInputError
from vec2face_model.files import write_text_atomic

__all__ = ["BACKBONES", "BACKBONE_CONFIG_NAME", "TIMM_VITS", "build_backbone", "export_backbone", "load_backbone",
           "write_backbone_config"]

TIMM_VITS = {"vit_s": "vit_small_patch16_224", "vit_b": "vit_base_patch16_224"}  # Table 9's transformer backbones
BACKBONES = ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "se_iresnet50", *TIMM_VITS)
BACKBONE_CONFIG_NAME = "backbone_config.json"
WEIGHTS_NAME = "model.safetensors"  # also the name accelerate's save_state gives the first prepared model


def build_backbone(name: str, embedding_size: int, kwargs: dict | None = None) -> nn.Module:
    """A freshly initialised backbone; never downloads."""
    kwargs = dict(kwargs or {})
    if name in TIMM_VITS:
        import timm

        return timm.create_model(TIMM_VITS[name], pretrained=False, img_size=112, num_classes=embedding_size, **kwargs)
    if name not in BACKBONES:
        raise InvalidInputError(f"backbone must be one of {BACKBONES}, got {name!r}")
    from vec2face_model.models import iresnet

    return getattr(iresnet, name)(num_features=embedding_size, **kwargs)


def write_backbone_config(directory: str | Path, name: str, embedding_size: int, kwargs: dict | None = None) -> None:
    description = {"backbone": name, "embedding_size": embedding_size, "backbone_kwargs": dict(kwargs or {})}
    write_text_atomic(Path(directory) / BACKBONE_CONFIG_NAME, json.dumps(description, indent=2) + "\n")


def export_backbone(backbone: nn.Module, directory: str | Path, name: str, embedding_size: int, kwargs: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``backbone_config.json`` into ``directory``; returns it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in backbone.state_dict().items()}, str(directory / WEIGHTS_NAME))
    write_backbone_config(directory, name, embedding_size, kwargs)
    return directory


def load_backbone(path: str | Path) -> nn.Module:
    """A backbone in eval mode from any of the forms the recipes meet.

    * a folder with ``backbone_config.json`` (an export, or a ``train_fr`` checkpoint): rebuilt with
      :func:`build_backbone` and loaded strictly from ``model.safetensors``;
    * anything else an IResNet recognizer comes as (official weights file, ``save_pretrained``
      folder, pipeline folder, Hub repo id): :func:`vec2face_model.recognizers.load_recognizer`.
    """
    from vec2face_model.recognizers import load_recognizer

    if (Path(path) / BACKBONE_CONFIG_NAME).is_file():
        return _load_exported(Path(path)).eval()
    return load_recognizer(path)


def _load_exported(directory: Path) -> nn.Module:
    from safetensors.torch import load_file

    from vec2face_model.weights import load_state_dict_strict

    description = json.loads((directory / BACKBONE_CONFIG_NAME).read_text())
    backbone = build_backbone(description["backbone"], description["embedding_size"], description.get("backbone_kwargs"))
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{directory}: {BACKBONE_CONFIG_NAME} but no {WEIGHTS_NAME}")
    state = load_file(str(weights))
    # A checkpoint written under DistributedDataParallel holds the wrapper's "module." names.
    state = {k.removeprefix("module."): v for k, v in state.items()}
    load_state_dict_strict(backbone, state, str(weights))
    return backbone
