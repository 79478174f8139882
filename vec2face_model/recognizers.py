"""Face recognizers (IResNets) from wherever a user keeps them, and their features of images.

One loader for ``hsface analyze``, the Vec2Face training recipe and ``eval_fr``:
:func:`load_recognizer` takes the official weights, a preset, an official ``.pth``/safetensors file,
an ``IResNet.save_pretrained`` folder, a ``Vec2FacePipeline`` folder (either layout) or a Hub repo.
:func:`recognizer_hash` is the weights digest that provenance records and feature caches key on.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path

import numpy as np
import torch

from .errors import MissingInputError
from .models.iresnet import IResNet

__all__ = ["embed_images", "load_recognizer", "recognizer_hash"]

_HUB_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def recognizer_hash(model: torch.nn.Module) -> str:
    """sha256 of the recognizer's weights: the builder's provenance digest (``weights_sha256``),
    so an analysis can be matched to the recognizer a dataset was generated with."""
    from .weights import weights_sha256

    return weights_sha256(model)


def _official_recognizer_file() -> Path:
    from huggingface_hub import hf_hub_download

    from .pipeline_vec2face import OFFICIAL_FILES, OFFICIAL_REPO_ID

    try:
        return Path(hf_hub_download(OFFICIAL_REPO_ID, OFFICIAL_FILES["recognizer"]))
    except Exception as err:  # offline, not cached, no access: all end in the same advice
        raise MissingInputError(
            f"no recognizer given and the official ArcFace weights ({OFFICIAL_REPO_ID}/{OFFICIAL_FILES['recognizer']}) "
            f"are not available ({type(err).__name__}). Pass --recognizer: an IResNet folder (save_pretrained), "
            "an official .pth, a Vec2FacePipeline folder, or 'random-tiny' for a smoke run."
        ) from err


@functools.lru_cache(maxsize=None)
def _preset_recognizer(name: str) -> IResNet:
    # Building a preset pipeline fits its identity prior (seconds); the recognizer is all we need, once.
    from .pipeline_vec2face import Vec2FacePipeline

    return Vec2FacePipeline.from_preset(name).recognizer.eval()


def load_recognizer(name_or_path: str | os.PathLike | None = None) -> IResNet:
    """An IResNet in eval mode, from one of:

    * ``None``: the official ArcFace R100 weights of the official Vec2Face Hub repository (from the
      local Hub cache, or downloaded when online);
    * ``"random-tiny"``: the recognizer of the random-weight preset pipeline (smoke runs only);
    * a ``.pth``/``.pt``/``.safetensors`` file with official IResNet weights;
    * a folder written by ``IResNet.save_pretrained``;
    * a ``Vec2FacePipeline`` folder (diffusers layout: its ``recognizer`` subfolder; official
      layout: ``weights/arcface-r100-glint360k.pth``);
    * a Hub repo id (``owner/name``) holding an ``IResNet.save_pretrained`` folder.
    """
    from .pipeline_vec2face import OFFICIAL_FILES, PIPELINE_PRESETS

    if name_or_path is None:
        return IResNet.from_official(_official_recognizer_file()).eval()
    name = str(name_or_path)
    if name in PIPELINE_PRESETS:
        return copy.deepcopy(_preset_recognizer(name))
    path = Path(name).expanduser()
    if path.is_file():
        return IResNet.from_official(path).eval()
    if not path.is_dir():
        missing = MissingInputError(
            f"recognizer {name!r}: no such file or folder. Pass an IResNet folder, an official .pth, "
            f"a Vec2FacePipeline folder, a Hub repo id, or a preset ({', '.join(PIPELINE_PRESETS)})."
        )
        if not _HUB_REPO_ID.fullmatch(name):
            raise missing
        try:
            return IResNet.from_pretrained(name).eval()
        except Exception as err:  # not on the Hub, offline, no access: the local reading is as likely
            raise missing from err
    if (path / "model_index.json").exists():
        if not (path / "recognizer" / "config.json").exists():
            raise ValueError(f"{path} is a Vec2FacePipeline folder without a recognizer component; pass --recognizer explicitly")
        return IResNet.from_pretrained(path / "recognizer").eval()
    if (path / OFFICIAL_FILES["recognizer"]).exists():
        return IResNet.from_official(path / OFFICIAL_FILES["recognizer"]).eval()
    if (path / "config.json").exists():
        return IResNet.from_pretrained(path).eval()
    raise ValueError(
        f"{path}: neither an IResNet folder (config.json), a Vec2FacePipeline folder (model_index.json) "
        f"nor an official folder ({OFFICIAL_FILES['recognizer']})"
    )


def embed_images(recognizer: torch.nn.Module, images: torch.Tensor, device: torch.device | str | None = None) -> np.ndarray:
    """Raw features float32 ``[N, D]`` (numpy, CPU) of canonical images ``[N,3,112,112]``.

    The images go to ``device`` (default: the recognizer's) in the recognizer's dtype.
    """
    parameter = next(recognizer.parameters())
    with torch.inference_mode():
        return recognizer(images.to(device or parameter.device, parameter.dtype)).float().cpu().numpy()
