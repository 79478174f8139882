"""``hsface build``: write an HSFace config as a Hub dataset repository, resumable and distributed.

Layout of ``OUT``::

    OUT/README.md                               dataset card (YAML configs + dataset_info, stats, grids)
    OUT/<config>/train-SSSSS-of-NNNNN.parquet   shards (embedded image bytes, explicit Features)
    OUT/<config>/generation.json                parameters + model provenance (weight hashes)
    OUT/<config>/identities.safetensors         the sampled identity vectors
    OUT/<config>/manifest.json                  per-shard row counts and sha256
    OUT/<config>/sample_grid.png                a few identities x images

Run the same command under ``accelerate launch`` to split shards between processes (shard s goes
to rank s mod world size). Images are functions of (seed, identity, image index) only, so the
result is identical for any number of processes and across interruptions.

Encoding (JPEG/PNG) and parquet writing of shard s run in a writer thread while shard s+1 is
generated, so an accelerator does not wait on them; the build reports how its time split.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vec2face_model.convert import weights_sha256
from vec2face_model.errors import HSFaceError
from vec2face_model.pipeline_vec2face import Vec2FacePipeline, Vec2FacePipelineOutput
from vec2face_model.timing import StageTimer

from .card import write_card
from .config import HSFaceConfig
from .hsface_builder import SHARD_FEATURES, configure_pipeline, generate_shard, load_pipeline, sample_config_identities, shard_examples
from .parquet_writer import ShardWriter, write_json_atomic

GENERATION_FILE = "generation.json"
IDENTITIES_FILE = "identities.safetensors"


class BuildError(HSFaceError, RuntimeError):
    """The build cannot proceed as asked; the message says what to do."""


@dataclass
class BuildResult:
    out_dir: Path
    config_dir: Path
    num_rows: int
    shards_written: list[int]
    shards_skipped: list[int]
    seconds: float = 0.0  # wall clock of this process's build
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (encode/write overlap the rest)


def model_provenance(pipe) -> dict:
    """sha256 of each component's weights (state-dict bytes in key order), plus the preset label."""
    components = {}
    for name in ("generator", "recognizer", "quality", "pose", "prior"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        components[name] = {"class": type(module).__name__, "sha256": weights_sha256(module)}
    return {"preset": pipe.config.get("preset"), "components": components}


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise BuildError(f"cannot write to {out_dir}: {err.strerror or err}. Choose another --out folder.") from err


def _check_or_record_parameters(config_dir: Path, record: dict) -> None:
    """A folder holding this config with other parameters is another dataset: refuse, delete nothing."""
    path = config_dir / GENERATION_FILE
    if path.exists():
        existing = json.loads(path.read_text())
        if existing.get("parameters") != record["parameters"]:
            diff = sorted(k for k in record["parameters"] if existing.get("parameters", {}).get(k) != record["parameters"][k])
            raise BuildError(
                f"{config_dir} already holds '{record['config']}' data built with different parameters "
                f"({', '.join(diff)}). Nothing was changed. Build into another --out folder, or delete "
                f"{config_dir} yourself to rebuild."
            )
        if existing.get("provenance") != record["provenance"]:
            raise BuildError(
                f"{config_dir} was built with different model weights (see its {GENERATION_FILE}). Nothing was "
                "changed. Use the same --model to resume, or build into another --out folder."
            )
        return
    write_json_atomic(path, record)


class BackgroundShardOutput:
    """Encodes and writes finished shards in a writer thread while the caller generates the next one.

    At most one finished shard waits in memory besides the one being generated. An error in the
    thread is raised in the caller at the next ``submit`` or at exit; on an interruption the shard
    being written is finished first (shards are atomic, so nothing half-written is left either way).
    ``encode_threads`` > 1 encodes images in parallel (worth it when an accelerator generates).
    """

    def __init__(self, writer: ShardWriter, image_format: str, timer: StageTimer, *, background: bool = True, encode_threads: int = 1):
        self.writer, self.image_format, self.timer = writer, image_format, timer
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="hsface-writer") if background else None
        self._encoders = ThreadPoolExecutor(encode_threads, thread_name_prefix="hsface-encode") if encode_threads > 1 else None
        self._pending: Future | None = None

    def submit(self, shard: int, out: Vec2FacePipelineOutput) -> None:
        self.wait()
        if self._thread is None:
            self._write(shard, out)
        else:
            self._pending = self._thread.submit(self._write, shard, out)

    def wait(self) -> None:
        """Block until the shard in the writer thread is on disk (time counted as ``wait for writer``)."""
        if self._pending is not None:
            with self.timer.stage("wait for writer"):
                pending, self._pending = self._pending, None
                pending.result()

    def _write(self, shard: int, out: Vec2FacePipelineOutput) -> None:
        with self.timer.stage("encode"):
            examples = shard_examples(out, self.image_format, map_fn=self._encoders.map if self._encoders else map)
        with self.timer.stage("write"):
            self.writer.write(shard, examples)

    def __enter__(self) -> "BackgroundShardOutput":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            for pool in (self._thread, self._encoders):
                if pool is not None:
                    pool.shutdown(wait=True)


def build(
    config: HSFaceConfig,
    out_dir: str | os.PathLike = "hsface",
    *,
    progress: bool = True,
    pipe: Vec2FacePipeline | None = None,
    overlap_io: bool = True,
    encode_threads: int | None = None,
) -> BuildResult:
    """Generate (or finish generating) ``config`` into ``out_dir``; safe to rerun after interruption.

    ``pipe`` is an already loaded pipeline (default: load ``config.model``; the weights are recorded
    by hash either way). ``overlap_io`` writes shards in a background thread. ``encode_threads``
    defaults to 1, and to up to 8 for PNG output when an accelerator generates.
    """
    from accelerate import PartialState

    started = time.perf_counter()
    state = PartialState(cpu=not torch.cuda.is_available())
    timer = StageTimer(state.device)
    out_dir = Path(out_dir)
    config_dir = out_dir / config.name
    if state.is_main_process:
        _check_writable(out_dir)
    state.wait_for_everyone()

    with timer.stage("load"):
        pipe = pipe if pipe is not None else load_pipeline(config.model)
        configure_pipeline(pipe.to(state.device), config)
        record = {"config": config.name, "parameters": config.content(), "provenance": model_provenance(pipe),
                  "features": SHARD_FEATURES.to_dict()}
    if state.is_main_process:
        config_dir.mkdir(parents=True, exist_ok=True)
        _check_or_record_parameters(config_dir, record)
        identities_path = config_dir / IDENTITIES_FILE
        if not identities_path.exists():
            with timer.stage("sample"):
                vectors = sample_config_identities(pipe, config, progress=progress)
            tmp = identities_path.with_name(f".{IDENTITIES_FILE}.tmp")
            save_file({"identity_vectors": vectors.contiguous()}, str(tmp), metadata={"seed": str(config.seed), "tau": str(config.tau)})
            os.replace(tmp, identities_path)
    state.wait_for_everyone()
    if not (config_dir / GENERATION_FILE).exists():
        raise BuildError(f"{config_dir}: the main process did not record the parameters (see its error above)")
    identities = load_file(str(config_dir / IDENTITIES_FILE))["identity_vectors"]

    writer = ShardWriter(config_dir, config.num_shards, SHARD_FEATURES)
    mine = [s for s in range(config.num_shards) if s % state.num_processes == state.process_index]
    todo = [s for s in mine if not writer.is_complete(s)]
    skipped = sorted(set(mine) - set(todo))
    bar = _progress_bar(sum(len(config.shard_identities(s)) for s in todo) * config.images_per_identity,
                        enabled=progress and state.is_main_process, label=f"hsface build {config.name}")
    if encode_threads is None:
        # PNG encoding (zlib) runs in parallel threads (1.8x with 2 threads); a 112x112 JPEG takes
        # ~0.2 ms, less than handing it to a thread. On CPU the cores are busy generating anyway.
        parallel = state.device.type != "cpu" and config.image_format == "png"
        encode_threads = max(1, min(8, (os.cpu_count() or 2) // 2)) if parallel else 1
    with BackgroundShardOutput(writer, config.image_format, timer, background=overlap_io, encode_threads=encode_threads) as output:
        for shard in todo:
            generated = generate_shard(pipe, config, identities, shard, on_images=bar.update)
            timer.merge(generated.timings)
            output.submit(shard, generated)
    bar.close()
    state.wait_for_everyone()

    num_rows = 0
    if state.is_main_process:
        with timer.stage("card"):
            manifest = writer.manifest()
            num_rows = sum(e["num_rows"] for e in manifest)
            write_json_atomic(config_dir / "manifest.json", {"config": config.name, "num_rows": num_rows, "shards": manifest})
            write_card(out_dir)
    state.wait_for_everyone()
    return BuildResult(out_dir, config_dir, num_rows, todo, skipped, time.perf_counter() - started, timer.as_dict())


def _progress_bar(total: int, enabled: bool, label: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=label, unit="img", smoothing=0.1, dynamic_ncols=True)

