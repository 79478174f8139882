"""Reading official Vec2Face weight files safely, and loading them strictly into our models.

All trusted-file handling lives here:

* safetensors files are preferred and read with ``safetensors.torch.load_file``;
* official ``.pth`` files are read with ``torch.load(weights_only=True)`` and an explicit
  allow-list (the training checkpoints pickle an ``argparse.Namespace`` under ``args``), always
  mapped to CPU (the released files hold CUDA storages);
* a strict load reports the file, the first mismatching keys and what was expected, instead of
  torch's multi-page message or a crash deep inside a layer.

Our modules keep the official key names (so that ``load_state_dict(strict=True)`` accepts the
released files as they are): no key renaming is needed, only unwrapping of checkpoint dicts.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import HSFaceError

__all__ = [
    "CHECKPOINT_STATE_DICT_KEYS",
    "OFFICIAL_PICKLE_ALLOWLIST",
    "StateDict",
    "WeightsLoadError",
    "load_official_model",
    "load_state_dict_strict",
    "read_weights",
    "unwrap_state_dict",
    "weights_sha256",
]

# What the official training checkpoints pickle besides tensors. Nothing else is unpickled.
OFFICIAL_PICKLE_ALLOWLIST = [argparse.Namespace]

# Keys under which official (and common) checkpoint containers keep the model's state dict.
CHECKPOINT_STATE_DICT_KEYS = ("model_vec2face", "state_dict", "model")

StateDict = dict[str, torch.Tensor]


class WeightsLoadError(HSFaceError, ValueError):
    """A weight file could not be read, or does not fit the model it was loaded into."""


def read_weights(path: str | os.PathLike, key: str | None = None, prefer: tuple[str, ...] = CHECKPOINT_STATE_DICT_KEYS) -> StateDict:
    """Read a state dict from a ``.safetensors`` or official ``.pth``/``.pt``/``.bin`` file.

    ``key`` picks an entry of a checkpoint dict (e.g. ``"model_vec2face"``); without it, the
    first of ``prefer`` present is used, or the file itself when it is a plain state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsLoadError(f"{path}: no such file. Pass the path of a .pth or .safetensors weight file.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsLoadError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from err
    else:
        obj = _torch_load_restricted(path)
    return unwrap_state_dict(obj, key=key, source=str(path), prefer=prefer)


def _torch_load_restricted(path: Path):
    try:
        with torch.serialization.safe_globals(OFFICIAL_PICKLE_ALLOWLIST):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refused an object outside the allow-list: never fall back to full unpickling.
        raise WeightsLoadError(
            f"{path}: refused to unpickle an object that is not a tensor or an allow-listed type "
            f"({', '.join(c.__qualname__ for c in OFFICIAL_PICKLE_ALLOWLIST)}). Only official Vec2Face "
            f"weight files are supported; convert others to safetensors. Details: {err}"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise WeightsLoadError(f"{path}: not a readable PyTorch weight file (truncated or corrupt?): {err}") from err


def unwrap_state_dict(
    obj, key: str | None = None, source: str = "<state dict>", prefer: tuple[str, ...] = CHECKPOINT_STATE_DICT_KEYS
) -> StateDict:
    """Return the tensor mapping inside a checkpoint container (or ``obj`` itself)."""
    if not isinstance(obj, Mapping):
        raise WeightsLoadError(f"{source}: expected a state dict or checkpoint dict, found {type(obj).__name__}.")
    if key is not None:
        if key not in obj:
            raise WeightsLoadError(f"{source}: checkpoint has no entry {key!r}; entries: {sorted(map(str, obj))[:10]}.")
        obj = obj[key]
    elif not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for candidate in prefer:
            if isinstance(obj.get(candidate), Mapping):
                obj = obj[candidate]
                break
        else:
            raise WeightsLoadError(
                f"{source}: a checkpoint dict without a state dict under any of {prefer}; "
                f"entries: {sorted(map(str, obj))[:10]}."
            )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsLoadError(f"{source}: entries that are not tensors: {bad[:5]}.")
    return dict(obj)


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with an error that says what is wrong.

    BatchNorm ``num_batches_tracked`` may be absent (PyTorch tolerates that for checkpoints saved
    without metadata); every other key must be present with the expected shape. Values are copied
    with upcasting (float16/float8 fixture weights become float32 exactly).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k}: file {tuple(state_dict[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), first: {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), first: {unexpected[:5]}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es), first: {wrong_shape[:5]}")
    if problems:
        raise WeightsLoadError(
            f"{source} does not fit {type(model).__name__} ({len(expected)} entries expected): "
            + "; ".join(problems)
            + ". Is this the right file for this model, and do the config overrides match the weights?"
        )
    full = dict(state_dict)
    for k, v in expected.items():  # tolerated absences keep the model's own value
        full.setdefault(k, v)
    model.load_state_dict(full, strict=True)


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's weights: every state-dict key and its tensor's bytes, in state-dict order.

    The one weight fingerprint of the project (dataset provenance, analysis feature caches, recipe
    caches), so a digest computed in one place can be matched against one recorded in another.
    """
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        # reshape(-1): a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_official_model(cls, path_or_state_dict, infer_config, overrides: dict, prefer: tuple[str, ...] = CHECKPOINT_STATE_DICT_KEYS):
    """The shared ``from_official``: read (or unwrap) the weights, build ``cls`` from the config the
    weights determine (``infer_config(state_dict, source)``) updated with ``overrides``, load
    strictly, return in eval mode."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = str(path_or_state_dict)
        state_dict = read_weights(path_or_state_dict, prefer=prefer)
    else:
        source = "<state dict>"
        state_dict = unwrap_state_dict(path_or_state_dict, source=source, prefer=prefer)
    model = cls(**{**infer_config(state_dict, source), **overrides})
    load_state_dict_strict(model, state_dict, source)
    return model.eval()
