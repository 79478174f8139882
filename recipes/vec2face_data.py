"""Data of ``recipes/train_vec2face.py``: aligned faces, their identity features, and the per-rank batch order.

* :func:`load_training_dataset`: any ``datasets`` image dataset (Hub repo, folder of images or
  parquet files, ``save_to_disk`` folder) with an ``Image`` column of aligned 112x112 RGB faces.
* :func:`add_identity_features`: the frozen recognizer's feature of every image as a ``Dataset.map``
  column, cached under a fingerprint of the dataset and the recognizer's weights (a second run with
  the same data and recognizer reuses it).
* :func:`epoch_batches`: one permutation per (seed, epoch), cut into global batches and split across
  ranks, so a resumed run reads what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vec2face_model.weights import weights_sha256
from vec2face_model.errors import InvalidInputError
from vec2face_model.seeding import STREAM_VEC2FACE_DATA_ORDER, derive_seed

__all__ = ["FaceTrainingData", "add_identity_features", "epoch_batches", "load_recognizer", "load_training_dataset"]

FEATURE_CACHE_VERSION = 1  # bump when the feature computation changes, to invalidate caches


def epoch_batches(num_samples: int, batch_size: int, num_processes: int, rank: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's batches of one epoch: a permutation keyed by (seed, epoch), cut into global batches
    of ``batch_size·num_processes`` (last partial one dropped), each split across ranks."""
    global_batch = batch_size * num_processes
    generator = torch.Generator().manual_seed(derive_seed(seed, STREAM_VEC2FACE_DATA_ORDER, epoch))
    order = torch.randperm(num_samples, generator=generator)
    start = rank * batch_size
    return [order[s * global_batch + start : s * global_batch + start + batch_size].tolist() for s in range(num_samples // global_batch)]



def load_recognizer(path: str | os.PathLike):
    """The frozen (eval mode, no gradients) recognizer: any source :func:`vec2face_model.recognizers.load_recognizer`
    takes (official weight file, ``save_pretrained`` folder, pipeline folder, Hub repo, preset)."""
    from vec2face_model.recognizers import load_recognizer as load

    return load(path).requires_grad_(False)


def load_training_dataset(config):
    """The image dataset (a ``datasets.Dataset``) with the image column checked."""
    import datasets

    path = Path(config.dataset).expanduser()
    if not config.dataset:
        raise InvalidInputError("no --dataset given: pass a Hub dataset id, a folder of images or parquet files, or a save_to_disk folder")
    if path.is_dir() and (path / "state.json").exists() and (path / "dataset_info.json").exists():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[config.split]
    else:
        ds = datasets.load_dataset(config.dataset, config.dataset_config, split=config.split)
    if not isinstance(ds, datasets.Dataset):
        raise InvalidInputError(f"{config.dataset}: expected a map-style dataset split, got {type(ds).__name__}")
    if config.image_column not in ds.column_names:
        raise InvalidInputError(f"{config.dataset}: no image column {config.image_column!r}; columns: {ds.column_names} (set --image_column)")
    if not isinstance(ds.features[config.image_column], datasets.Image):
        raise InvalidInputError(f"{config.dataset}: column {config.image_column!r} is {ds.features[config.image_column]}, not an Image feature")
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
    from vec2face_model.recognizers import embed_images

    fingerprint = Hasher.hash([ds._fingerprint, _module_digest(recognizer), image_column, feature_column, FEATURE_CACHE_VERSION])

    def embed(batch):
        return {feature_column: embed_images(recognizer, from_pil(batch[image_column]), device)}

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
