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
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vec2face_model.convert import weights_sha256

from .card import write_card
from .config import HSFaceConfig
from .hsface_builder import FEATURES, generate_shard_examples, load_pipeline, sample_config_identities
from .parquet_writer import ShardWriter, write_json_atomic

GENERATION_FILE = "generation.json"
IDENTITIES_FILE = "identities.safetensors"


class BuildError(RuntimeError):
    """The build cannot proceed as asked; the message says what to do."""


@dataclass
class BuildResult:
    out_dir: Path
    config_dir: Path
    num_rows: int
    shards_written: list[int]
    shards_skipped: list[int]


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


def build(config: HSFaceConfig, out_dir: str | os.PathLike = "hsface", *, progress: bool = True) -> BuildResult:
    """Generate (or finish generating) ``config`` into ``out_dir``; safe to rerun after interruption."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    out_dir = Path(out_dir)
    config_dir = out_dir / config.name
    if state.is_main_process:
        _check_writable(out_dir)
    state.wait_for_everyone()

    pipe = load_pipeline(config.model)
    pipe.to(state.device)
    record = {"config": config.name, "parameters": config.content(), "provenance": model_provenance(pipe),
              "features": FEATURES.to_dict()}
    if state.is_main_process:
        config_dir.mkdir(parents=True, exist_ok=True)
        _check_or_record_parameters(config_dir, record)
        identities_path = config_dir / IDENTITIES_FILE
        if not identities_path.exists():
            vectors = sample_config_identities(pipe, config, progress=progress)
            tmp = identities_path.with_name(f".{IDENTITIES_FILE}.tmp")
            save_file({"identity_vectors": vectors.contiguous()}, str(tmp), metadata={"seed": str(config.seed), "tau": str(config.tau)})
            os.replace(tmp, identities_path)
    state.wait_for_everyone()
    if not (config_dir / GENERATION_FILE).exists():
        raise BuildError(f"{config_dir}: the main process did not record the parameters (see its error above)")
    identities = load_file(str(config_dir / IDENTITIES_FILE))["identity_vectors"]

    writer = ShardWriter(config_dir, config.num_shards, FEATURES)
    mine = [s for s in range(config.num_shards) if s % state.num_processes == state.process_index]
    todo = [s for s in mine if not writer.is_complete(s)]
    skipped = sorted(set(mine) - set(todo))
    bar = _progress_bar(sum(len(config.shard_identities(s)) for s in todo) * config.images_per_identity,
                        enabled=progress and state.is_main_process, label=f"hsface build {config.name}")
    for shard in todo:
        examples = generate_shard_examples(pipe, config, identities, shard, on_images=bar.update)
        writer.write(shard, examples)
    bar.close()
    state.wait_for_everyone()

    num_rows = 0
    if state.is_main_process:
        manifest = writer.manifest()
        num_rows = sum(e["num_rows"] for e in manifest)
        write_json_atomic(config_dir / "manifest.json", {"config": config.name, "num_rows": num_rows, "shards": manifest})
        write_card(out_dir)
    state.wait_for_everyone()
    return BuildResult(out_dir, config_dir, num_rows, todo, skipped)


def _progress_bar(total: int, enabled: bool, label: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=label, unit="img", smoothing=0.1, dynamic_ncols=True)

