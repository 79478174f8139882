"""Training data of the FR recipe: a ``datasets`` table of ``image`` + ``label`` -> augmented batches.

* Source: ``load_dataset(path, config)`` of a Hub repo or a local folder (e.g. HSFace parquet
  shards); images stay encoded (``Image(decode=False)``) and are decoded with PIL in the loader
  workers. ``max_identities=N`` keeps the rows with ``label < N`` (the paper's 100k/200k subsets
  of larger sets).
* Order: map-style tables are read in a permutation keyed by ``(seed, epoch)``; step ``k`` of rank
  ``r`` reads one fixed slice of it, so a resumed run reads exactly what an uninterrupted one would.
  Streaming tables are shuffled with a buffer, split by rank, and replayed to resume.
* Augmentation (:class:`FaceAugment`): flip, RandAugment on uint8, conversion to the canonical
  float tensor (``vec2face_model.conventions``), random erasing. Each image's draws are keyed by
  ``(seed, epoch, index)`` and made with the global CPU generator borrowed and restored (torchvision
  takes no generator): they depend neither on the number of workers nor on resuming, and the
  process' global RNG is left as it was.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vec2face_model.conventions import uint8_to_tensor
from vec2face_model.image_io import decode_image
from vec2face_model.seeding import STREAM_FR_AUGMENT, STREAM_FR_LOADER, STREAM_FR_ORDER, derive_seed

__all__ = [
    "FaceAugment",
    "FaceTable",
    "FaceStream",
    "TrainData",
    "decode_face",
    "epoch_indices",
    "load_face_dataset",
]

SHUFFLE_BUFFER = 10_000


def load_face_dataset(path: str, name: str | None = None, split: str = "train", streaming: bool = False,
                      max_identities: int | None = None):
    """``datasets`` table with encoded ``image`` and int ``label`` columns, labels ``< max_identities``."""
    import datasets

    table = datasets.load_dataset(path, name, split=split, streaming=streaming)
    missing = {"image", "label"} - set(table.column_names or table.features or ())
    if missing:
        raise ValueError(f"{path}: the training table needs columns 'image' and 'label'; missing {sorted(missing)}")
    table = table.select_columns(["image", "label"]).cast_column("image", datasets.Image(decode=False))
    if max_identities is None:
        return table
    if streaming:
        return table.filter(lambda label: label < max_identities, input_columns="label")
    labels = _labels(table)
    return table.select(np.flatnonzero(labels < max_identities))


def _is_streaming(table) -> bool:
    import datasets

    return isinstance(table, datasets.IterableDataset)


def _labels(table) -> np.ndarray:
    return np.asarray(table.with_format("numpy")["label"][:], dtype=np.int64)


def count_classes(table, max_identities: int | None = None) -> int:
    """``max_identities`` when given, else the largest label + 1 (map-style tables only)."""
    if max_identities is not None:
        return max_identities
    if _is_streaming(table):
        raise ValueError("a streaming table cannot be counted: set num_classes (or max_identities) in the config")
    return int(_labels(table).max()) + 1


def decode_face(cell: dict) -> torch.Tensor:
    """An encoded ``Image`` cell (``{"bytes", "path"}``) -> uint8 ``[3,112,112]`` RGB."""
    pixels = decode_image(cell, what=f"face crop {cell.get('path') or '(embedded image)'}")
    return torch.from_numpy(pixels).permute(2, 0, 1)


class FaceAugment:
    """uint8 ``[3,112,112]`` -> augmented canonical float32 ``[3,112,112]`` in [-1, 1].

    Args:
        hflip: random horizontal flip (p = 0.5).
        randaugment_ops: RandAugment's number of operations per image; 0 switches it off.
        randaugment_magnitude: RandAugment's magnitude (0-30).
        erasing_prob: probability of random erasing (erased pixels become 0, mid-grey), 0 for none.
    """

    def __init__(self, hflip: bool = True, randaugment_ops: int = 2, randaugment_magnitude: int = 9,
                 erasing_prob: float = 0.5):
        from torchvision.transforms import v2

        self.flip = v2.RandomHorizontalFlip() if hflip else None
        self.randaugment = v2.RandAugment(randaugment_ops, randaugment_magnitude) if randaugment_ops else None
        self.erasing = v2.RandomErasing(p=erasing_prob, value=0) if erasing_prob else None

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        with _borrowed_cpu_rng(seed):
            if self.flip is not None:
                image = self.flip(image)
            if self.randaugment is not None:
                image = self.randaugment(image)
            image = uint8_to_tensor(image.permute(1, 2, 0))[0]
            if self.erasing is not None:
                image = self.erasing(image)
        return image


@contextlib.contextmanager
def _borrowed_cpu_rng(seed: int):
    """torchvision's transforms draw from the global CPU generator: seed it, then put its state back.

    (``torch.random.fork_rng`` + ``torch.manual_seed`` would do the same at ~20x the cost: 0.2 ms/image.)
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


def epoch_indices(num_examples: int, epoch: int, seed: int) -> torch.Tensor:
    """The read order of one epoch: a permutation of the table keyed by ``(seed, epoch)``."""
    generator = torch.Generator().manual_seed(derive_seed(seed, STREAM_FR_ORDER, epoch))
    return torch.randperm(num_examples, generator=generator)


class FaceTable(torch.utils.data.Dataset):
    """A map-style table read a batch at a time; keys are ``(epoch, row)`` so augmentation is keyed by both."""

    def __init__(self, table, augment: FaceAugment, seed: int):
        self.table, self.augment, self.seed = table, augment, seed

    def __len__(self) -> int:
        return len(self.table)

    def __getitems__(self, keys: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.table[[row for _, row in keys]]  # one Arrow take per batch
        images = [self.augment(decode_face(cell), derive_seed(self.seed, STREAM_FR_AUGMENT, epoch, row))
                  for cell, (epoch, row) in zip(rows["image"], keys)]
        return torch.stack(images), torch.as_tensor(rows["label"], dtype=torch.int64)

    def __getitem__(self, key: tuple[int, int]):
        images, labels = self.__getitems__([key])
        return images[0], labels[0]


class _EpochBatchSampler:
    """Rank ``rank``'s share of each global batch of one epoch's permutation, from ``start_step`` on."""

    def __init__(self, order: torch.Tensor, epoch: int, batch_size: int, rank: int, world_size: int,
                 start_step: int, steps: int):
        self.order, self.epoch, self.batch_size, self.rank = order, epoch, batch_size, rank
        self.world_size, self.start_step, self.steps = world_size, start_step, steps

    def __len__(self) -> int:
        return max(self.steps - self.start_step, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        global_batch = self.batch_size * self.world_size
        for step in range(self.start_step, self.steps):
            start = step * global_batch + self.rank * self.batch_size
            yield [(self.epoch, row) for row in self.order[start : start + self.batch_size].tolist()]


class FaceStream(IterableDataset):
    """This rank's part of a streaming table for one epoch, decoded and augmented."""

    def __init__(self, stream, augment: FaceAugment, seed: int, epoch: int, rank: int):
        self.stream, self.augment, self.seed, self.epoch, self.rank = stream, augment, seed, epoch, rank

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        worker = get_worker_info()
        worker_id = worker.id if worker is not None else 0
        for position, example in enumerate(self.stream):  # datasets splits the shards among workers
            seed = derive_seed(self.seed, STREAM_FR_AUGMENT, self.epoch, self.rank, worker_id, position)
            yield self.augment(decode_face(example["image"]), seed), int(example["label"])


def _batch_as_is(batch):
    return batch


class TrainData:
    """Batches of one epoch for one rank; ``steps_per_epoch`` is None for streaming tables.

    Args:
        table: from :func:`load_face_dataset` (map-style ``Dataset`` or streaming ``IterableDataset``).
        batch_size: per rank.
        rank, world_size: this process and the number of processes.
        seed: keys order, shuffling and augmentation.
        num_workers: loader processes per rank.
        pin_memory: pin batches for faster host-to-GPU copies.
    """

    def __init__(self, table, augment: FaceAugment, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 0, pin_memory: bool = False):
        self.table, self.augment, self.batch_size = table, augment, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.streaming = _is_streaming(table)
        if not self.streaming and len(table) < batch_size * world_size:
            raise ValueError(f"the table has {len(table)} rows, fewer than one global batch "
                             f"({batch_size} x {world_size} processes); lower batch_size")

    @property
    def steps_per_epoch(self) -> int | None:
        """Full global batches per epoch (the rest of the permutation is dropped); None when streaming."""
        return None if self.streaming else len(self.table) // (self.batch_size * self.world_size)

    def batches(self, epoch: int, start_step: int = 0) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """``(images [B,3,112,112] float32, labels [B] int64)`` of steps ``start_step, ...`` of ``epoch``."""
        # The loader's own generator: creating its iterator must not draw from the global RNG.
        loader_generator = torch.Generator().manual_seed(derive_seed(self.seed, STREAM_FR_LOADER, epoch, self.rank))
        common = dict(num_workers=self.num_workers, pin_memory=self.pin_memory, generator=loader_generator)
        if self.streaming:
            from datasets.distributed import split_dataset_by_node

            stream = self.table.shuffle(seed=derive_seed(self.seed, STREAM_FR_ORDER) % 2**32, buffer_size=SHUFFLE_BUFFER)
            stream.set_epoch(epoch)
            stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)
            loader = DataLoader(FaceStream(stream, self.augment, self.seed, epoch, self.rank),
                                batch_size=self.batch_size, drop_last=True, **common)
            return itertools.islice(loader, start_step, None)  # replays the skipped part: exact, not free
        order = epoch_indices(len(self.table), epoch, self.seed)
        batches = _EpochBatchSampler(order, epoch, self.batch_size, self.rank, self.world_size, start_step,
                                     self.steps_per_epoch)
        return DataLoader(FaceTable(self.table, self.augment, self.seed), batch_sampler=batches,
                          collate_fn=_batch_as_is, **common)
