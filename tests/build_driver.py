"""Runs ``hsface`` (``builder.cli.main``) with fault points for the build tests: a test process, not
part of the library. Launch it like the CLI, directly or under ``accelerate launch``.

Environment:
  HSFACE_TEST_KILL_AT=point[:n]   SIGKILL this process at the n-th (default 1st) time it reaches point:
      identities   identities.safetensors written, generation.json not yet
      refine       an identity refinement finished, the shard not yet decoded
      attrop       an AttrOP batch finished (the stage may have more batches)
      shard-write  a parquet file written under .incomplete/, not yet moved into place
      manifest     a shard moved into place, its manifest entry not yet written
      card         the sample grid written, the card (README.md) not yet
  HSFACE_TEST_KILL_RANK=r         only the process of that rank dies (default: any)
  HSFACE_TEST_RECORD_SHARDS=dir   each process appends the shards it generates to dir/rank-<r>.txt
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pyarrow.parquet as pq

import builder.build
import builder.card
import builder.parquet_writer
from builder.cli import main
from vec2face_model.attrop import AttrOPConfig
from vec2face_model.pipeline_vec2face import Vec2FacePipeline

RANK = int(os.environ.get("RANK", "0"))
point, _, count = os.environ.get("HSFACE_TEST_KILL_AT", "").partition(":")
remaining = int(count or 1)
kill_rank = os.environ.get("HSFACE_TEST_KILL_RANK")


def reached(name: str) -> None:
    global remaining
    if name != point or (kill_rank is not None and int(kill_rank) != RANK):
        return
    remaining -= 1
    if remaining == 0:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def after(owner, name: str, fault: str, when=lambda *a, **k: True):
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        if when(*args, **kwargs):
            reached(fault)
        return result

    setattr(owner, name, wrapped)


def before(owner, name: str, fault: str, when=lambda *a, **k: True):
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if when(*args, **kwargs):
            reached(fault)
        return original(*args, **kwargs)

    setattr(owner, name, wrapped)


def _steers_pose(*args, **kwargs) -> bool:
    configs = [a for a in (*args, *kwargs.values()) if isinstance(a, AttrOPConfig)]
    return bool(configs) and configs[0].target_yaw is not None


before(builder.build, "write_json_atomic", "identities", when=lambda path, value: Path(path).name == "generation.json")
after(Vec2FacePipeline, "refine", "refine")
after(Vec2FacePipeline, "steer", "attrop", when=_steers_pose)
after(pq, "write_table", "shard-write")
before(builder.parquet_writer, "write_json_atomic", "manifest")
after(builder.card, "write_sample_grid", "card")

record_dir = os.environ.get("HSFACE_TEST_RECORD_SHARDS")
if record_dir:
    original_generate = builder.build.generate_shard

    def recording_generate(pipe, config, identities, shard, **kwargs):
        with open(Path(record_dir) / f"rank-{RANK}.txt", "a") as f:
            f.write(f"{shard}\n")
        return original_generate(pipe, config, identities, shard, **kwargs)

    builder.build.generate_shard = recording_generate

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
