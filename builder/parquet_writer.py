"""Sharded, resumable parquet output: nothing is lost on interruption and nothing is written twice.

A shard is written under ``.incomplete/`` and moved into place with ``os.replace`` only once it is
complete; its manifest entry (row count, sha256) is written after the move. A shard counts as
finished when its file exists and matches its entry, so a rerun regenerates exactly the shards
that were missing or cut short (a file without an entry is redone).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from .files import sha256_file, write_json_atomic

MANIFEST_DIR = ".manifest"
INCOMPLETE_DIR = ".incomplete"


class ShardWriter:
    def __init__(self, directory: str | os.PathLike, num_shards: int, features: datasets.Features, split: str = "train"):
        self.directory = Path(directory)
        self.num_shards = num_shards
        self.features = features
        self.split = split

    def shard_path(self, shard: int) -> Path:
        return self.directory / f"{self.split}-{shard:05d}-of-{self.num_shards:05d}.parquet"

    def entry_path(self, shard: int) -> Path:
        return self.directory / MANIFEST_DIR / f"{self.split}-{shard:05d}.json"

    def entry(self, shard: int) -> dict | None:
        path = self.entry_path(shard)
        return json.loads(path.read_text()) if path.exists() else None

    def is_complete(self, shard: int) -> bool:
        entry, path = self.entry(shard), self.shard_path(shard)
        return entry is not None and path.exists() and entry["sha256"] == sha256_file(path)

    def write(self, shard: int, examples: list[dict], provenance: dict | None = None) -> dict:
        """Encode examples with the Features, write atomically, record the manifest entry (with
        ``provenance``: how this shard was computed, e.g. torch version and thread count)."""
        encoded = [self.features.encode_example(e) for e in examples]
        table = pa.Table.from_pylist(encoded, schema=self.features.arrow_schema)
        final = self.shard_path(shard)
        tmp = self.directory / INCOMPLETE_DIR / final.name
        tmp.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        entry = {"file": final.name, "num_rows": table.num_rows, "sha256": sha256_file(final), **(provenance or {})}
        write_json_atomic(self.entry_path(shard), entry)
        return entry

    def manifest(self) -> list[dict]:
        """Entries of all shards; raises if any shard is not finished."""
        missing = [s for s in range(self.num_shards) if not self.is_complete(s)]
        if missing:
            raise RuntimeError(f"{self.directory}: shards {missing[:10]} are not finished; rerun the build to complete them")
        return [self.entry(s) for s in range(self.num_shards)]
