"""Where the time goes: seconds per named stage (sample, decode, AttrOP, encode, write, ...).

The pipeline reports its stages in ``Vec2FacePipelineOutput.timings``; ``hsface build`` adds its
own (encode and write run in a writer thread) and prints the split at the end. Thread-safe, so a
writer thread and the generating thread can report into one timer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager

import torch


class StageTimer:
    def __init__(self, device: torch.device | str | None = None):
        # Stages that launch GPU work wait for it before the clock stops; otherwise the time of
        # asynchronous kernels would land in whichever later stage first copies a result back.
        self._sync_cuda = device is not None and torch.device(device).type == "cuda"
        self._seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync_cuda:
                torch.cuda.synchronize()
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def merge(self, seconds: Mapping[str, float]) -> None:
        for name, value in seconds.items():
            self.add(name, value)

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)


def format_split(seconds: Mapping[str, float], wall: float, background: Collection[str] = ("encode", "write")) -> str:
    """``decode 12.3 s (61%), ...; wall 20.1 s``: shares of the wall-clock time ``wall``. Stages in
    ``background`` ran in another thread, overlapping the rest, and are listed after it."""
    def part(name: str) -> str:
        return f"{name} {seconds[name]:.1f} s ({seconds[name] / wall:.0%})"

    front = [part(name) for name in seconds if name not in background and seconds[name] > 0]
    behind = [part(name) for name in seconds if name in background and seconds[name] > 0]
    return ", ".join(front) + (f"; in the writer thread: {', '.join(behind)}" if behind else "") + f"; wall {wall:.1f} s"
