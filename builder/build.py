"""``hsface build``: write an HSFace config as a Hub dataset repository, resumable and distributed.

Layout of ``OUT``::

    OUT/.hsface-output                          marks the folder as hsface's (it writes nowhere else)
    OUT/README.md                               dataset card (YAML configs + dataset_info, stats, grids)
    OUT/<config>/train-SSSSS-of-NNNNN.parquet   shards (embedded image bytes, explicit Features)
    OUT/<config>/generation.json                parameters + model provenance (weight hashes)
    OUT/<config>/identities.safetensors         the sampled identity vectors (sampled once)
    OUT/<config>/manifest.json                  per-shard row counts, sha256, torch version, threads
    OUT/<config>/sample_grid.png                a few identities x images

What the bytes depend on (the README's determinism contract): the config's content fields
(``builder.config.CONTENT_FIELDS``, batch size included: AttrOP and identity refinement amplify
the float rounding of differently shaped batches), the weights (by hash), and the float arithmetic
of the machine (hardware, torch version, threads per process), which each shard records. Shards are
independent: the number of processes and interruptions do not change them.

Under ``accelerate launch`` the unfinished shards are dealt out between the processes (the k-th
unfinished shard goes to rank k mod world size), so a resumed run keeps every rank busy.

Encoding (JPEG/PNG) and parquet writing of shard s run in a writer thread while shard s+1 is
generated, so an accelerator does not wait on them; the build reports how its time split.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from vec2face_model.weights import weights_sha256
from vec2face_model.errors import HSFaceError
from vec2face_model.performance import measure_precision_speedup
from vec2face_model.pipeline_vec2face import Vec2FacePipeline, Vec2FacePipelineOutput
from vec2face_model.timing import StageTimer

from .card import write_card
from .config import HSFaceConfig
from .files import OutputFolder, sha256_file, write_bytes_atomic, write_json_atomic
from .hsface_builder import configure_pipeline, generate_shard, load_pipeline, sample_config_identities, shard_examples, shard_features
from .parquet_writer import ShardWriter

GENERATION_FILE = "generation.json"
IDENTITIES_FILE = "identities.safetensors"


class BuildError(HSFaceError, RuntimeError):
    """The build cannot proceed as asked; the message says what to do."""


@dataclass
class BuildResult:
    out_dir: Path
    config_dir: Path
    num_rows: int  # rows of the finished config (main process; 0 elsewhere)
    shards_written: list[int]  # in this run, by every process
    shards_skipped: list[int]  # finished before this run
    seconds: float = 0.0  # wall clock of this process's build
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (encode/write overlap the rest)
    images_written: int = 0  # in this run, by every process


def model_provenance(pipe) -> dict:
    """sha256 of each network's weights as loaded (the state-dict bytes in key order), plus the preset label.

    These are the weight files' tensors, bit for bit, on any machine. The identity prior is left
    out: the official release ships features, not a prior, so it is refitted at load and its floats
    depend on the thread count; it only matters for sampling, which happens once (the identities
    are stored in ``identities.safetensors``, whose sha256 is recorded, and read back on resume).
    """
    components = {}
    for name in ("generator", "recognizer", "quality", "pose"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        components[name] = {"class": type(module).__name__, "sha256": weights_sha256(module)}
    return {"preset": pipe.config.get("preset"), "components": components}


def compute_provenance(device: torch.device) -> dict:
    """How a shard was computed: its float results depend on these as well as on the parameters
    (the number of processes does not matter: a shard is computed by one process)."""
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device.type}
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    return info


def _differences(existing: dict, record: dict) -> list[str]:
    """What makes ``record`` another dataset than the one recorded in ``existing``, one line each."""
    lines = []
    old, new = existing.get("parameters", {}), record["parameters"]
    for key in sorted(set(old) | set(new)):
        if key not in old:
            lines.append(f"{key}: not recorded (built by an older hsface), now {json.dumps(new[key])}")
        elif old.get(key) != new.get(key):
            lines.append(f"{key}: built with {json.dumps(old.get(key))}, now {json.dumps(new.get(key))}")
    old, new = existing.get("provenance", {}), record["provenance"]
    if old.get("preset") != new.get("preset"):
        lines.append(f"model preset: built with {old.get('preset')!r}, now {new.get('preset')!r}")
    old, new = old.get("components", {}), new.get("components", {})
    for name in sorted((set(old) | set(new)) - {"prior"}):  # older builds hashed the refitted prior too
        a, b = old.get(name, {}).get("sha256"), new.get(name, {}).get("sha256")
        if a != b:
            lines.append(f"{name} weights: built with sha256 {(a or 'none')[:12]}, now {(b or 'none')[:12]}")
    return lines


def _check_same_dataset(config_dir: Path, existing: dict, record: dict) -> None:
    """A folder holding this config built otherwise is another dataset: refuse, naming each difference."""
    differences = _differences(existing, record)
    if differences:
        raise BuildError(
            f"{config_dir} already holds '{record['config']}' data built differently:\n  " + "\n  ".join(differences)
            + "\nNothing was changed. To resume, rerun with the recorded values (see its generation.json); "
            f"otherwise build into another --out folder, or delete {config_dir} yourself to rebuild."
        )


def _sample_and_record(pipe, config: HSFaceConfig, config_dir: Path, record: dict, timer: StageTimer, progress: bool) -> None:
    """Sample the identities once, then record the parameters. ``generation.json`` is written last,
    so a build that fails before it (sampling budget exhausted, say) leaves nothing that blocks the
    corrected retry."""
    if config.precision != "fp32":
        # what the reduced precision buys on this machine, measured once (bf16 without native
        # kernels runs many times slower than fp32: the pipeline warns, and the card shows this)
        record = {**record, "execution": measure_precision_speedup(pipe, config.precision, batch_size=min(8, config.batch_size))}
    with timer.stage("sample"):
        vectors = sample_config_identities(pipe, config, progress=progress)
    # A single metadata entry: safetensors keeps metadata in a hash map, whose order varies between runs.
    metadata = {"hsface": json.dumps({"config": config.name, "seed": config.seed, "tau": config.tau}, sort_keys=True)}
    write_bytes_atomic(config_dir / IDENTITIES_FILE, save_safetensors({"identity_vectors": vectors.contiguous()}, metadata=metadata))
    write_json_atomic(config_dir / GENERATION_FILE, {**record, "identities_sha256": sha256_file(config_dir / IDENTITIES_FILE)})


def _read_identities(config_dir: Path) -> torch.Tensor:
    """The identities every shard is generated from, checked against the hash recorded with them."""
    recorded = json.loads((config_dir / GENERATION_FILE).read_text()).get("identities_sha256")
    path = config_dir / IDENTITIES_FILE
    if not path.exists() or (recorded is not None and sha256_file(path) != recorded):
        raise BuildError(f"{path} is missing or differs from the one recorded in {GENERATION_FILE}, and the shards "
                         f"depend on it. Restore it, or build into another --out folder.")
    return load_file(str(path))["identity_vectors"]


def _warn_if_processes_were_lost(num_processes: int) -> None:
    # `accelerate launch --num_processes N` without --multi_gpu (or a config saying so) starts ONE
    # process on a CPU machine and says nothing; it sets MASTER_ADDR all the same.
    launched = "ACCELERATE_MIXED_PRECISION" in os.environ and "MASTER_ADDR" in os.environ
    if num_processes == 1 and launched and "WORLD_SIZE" not in os.environ:
        warnings.warn(
            "accelerate launch was asked for several processes but started one. On a CPU machine add --multi_gpu: "
            "accelerate launch --multi_gpu --num_processes 2 $(which hsface) build ... Building with 1 process.",
            stacklevel=3,
        )


class BackgroundShardOutput:
    """Encodes and writes finished shards in a writer thread while the caller generates the next one.

    At most one finished shard waits in memory besides the one being generated. An error in the
    thread is raised in the caller at the next ``submit`` or at exit; on an interruption the shard
    being written is finished first (shards are atomic, so nothing half-written is left either way).
    ``encode_threads`` > 1 encodes images in parallel (worth it when an accelerator generates).
    """

    def __init__(self, writer: ShardWriter, image_format: str, timer: StageTimer, *, background: bool = True,
                 encode_threads: int = 1, provenance: dict | None = None):
        self.writer, self.image_format, self.timer, self.provenance = writer, image_format, timer, provenance
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
            self.writer.write(shard, examples, self.provenance)

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
    from accelerate.utils import broadcast_object_list, gather_object

    started = time.perf_counter()
    # Ranks wait for each other while the main process samples the identities (minutes at 300k on a
    # CPU) and at the end for the last shard in flight (one shard's worth): longer than NCCL's default
    # 10-minute collective timeout can allow, so the build's process group waits up to 2 hours.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=2))
    _warn_if_processes_were_lost(state.num_processes)
    timer = StageTimer(state.device)
    folder = OutputFolder(out_dir)
    config_dir = folder.root / config.name
    if state.is_main_process:
        folder.check()  # before loading anything: a refused folder costs nothing and stays as it was

    with timer.stage("load"):
        pipe = pipe if pipe is not None else load_pipeline(config.model)
        configure_pipeline(pipe.to(state.device), config)
        features = shard_features(config)
        record = {"config": config.name, "parameters": config.content(), "provenance": model_provenance(pipe),
                  "features": features.to_dict()}
    writer = ShardWriter(config_dir, config.num_shards, features)
    todo: list[int] = []
    if state.is_main_process:
        recorded = config_dir / GENERATION_FILE
        if recorded.exists():
            _check_same_dataset(config_dir, json.loads(recorded.read_text()), record)
        else:
            folder.claim(config.name)
            try:
                _sample_and_record(pipe, config, config_dir, record, timer, progress)
            except BaseException:
                folder.release_if_unused()
                raise
        todo = [s for s in range(config.num_shards) if not writer.is_complete(s)]
    # Only unfinished shards are dealt out, so after a resume no rank idles at the final barrier while
    # another works through its whole share (NCCL's default timeout is 10 minutes).
    if state.num_processes > 1:
        todo = broadcast_object_list([todo])[0]
    identities = _read_identities(config_dir)
    mine = todo[state.process_index :: state.num_processes]
    skipped = [s for s in range(config.num_shards) if s not in todo]
    bar = _progress_bar(sum(len(config.shard_identities(s)) for s in todo) * config.images_per_identity,
                        enabled=progress and state.is_main_process, label=f"hsface build {config.name}")
    if encode_threads is None:
        # PNG encoding (zlib) runs in parallel threads (1.8x with 2 threads); a 112x112 JPEG takes
        # ~0.2 ms, less than handing it to a thread. On CPU the cores are busy generating anyway.
        parallel = state.device.type != "cpu" and config.image_format == "png"
        encode_threads = max(1, min(8, (os.cpu_count() or 2) // 2)) if parallel else 1
    provenance = compute_provenance(state.device)
    with BackgroundShardOutput(writer, config.image_format, timer, background=overlap_io, encode_threads=encode_threads,
                               provenance=provenance) as output:
        for shard in mine:
            # the main process's bar stands for every rank: ranks work on equal shards at the same pace
            generated = generate_shard(pipe, config, identities, shard,
                                       on_images=lambda n: bar.update(min(n * state.num_processes, bar.total - bar.n)))
            timer.merge(generated.timings)
            output.submit(shard, generated)
    bar.close()
    written = sorted(gather_object(mine)) if state.num_processes > 1 else mine

    num_rows = 0
    if state.is_main_process:
        with timer.stage("card"):
            manifest = writer.manifest()
            num_rows = sum(e["num_rows"] for e in manifest)
            write_json_atomic(config_dir / "manifest.json", {"config": config.name, "num_rows": num_rows, "shards": manifest})
            write_card(folder.root)
    state.wait_for_everyone()
    images = sum(len(config.shard_identities(s)) for s in written) * config.images_per_identity
    return BuildResult(folder.root, config_dir, num_rows, written, skipped, time.perf_counter() - started, timer.as_dict(), images)


def _progress_bar(total: int, enabled: bool, label: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=label, unit="img", smoothing=0.1, dynamic_ncols=True)
