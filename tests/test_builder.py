"""HSFace builder end to end on the random-tiny pipeline: layout, loading, resume, distribution, errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from builder.build import BuildError, build
from builder.config import get_config
from builder.files import OutputFolderError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY = get_config("tiny", model="random-tiny")


def run_cli(*args, env_extra=None, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(PROJECT_ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "builder.cli", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, **kwargs)


def decoded_rows(out_dir: Path, config: str = "tiny") -> dict:
    """(label, image_index) -> (decoded pixels, metadata) for a built folder, via load_dataset."""
    from datasets import load_dataset

    ds = load_dataset(str(out_dir), config, split="train")
    rows = {}
    for row in ds:
        key = (row["label"], row["image_index"])
        assert key not in rows, f"duplicate {key}"
        meta = {k: v for k, v in row.items() if k != "image"}
        rows[key] = (np.asarray(row["image"]), meta)
    return rows


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("hsface")
    result = build(TINY, out, progress=False)
    return out, result


def test_tiny_build_loads_with_the_expected_rows_schema_and_invariants(tiny_build):
    out, result = tiny_build
    assert result.num_rows == 20 and result.shards_written == [0, 1]
    assert sorted(p.name for p in (out / "tiny").glob("train-*.parquet")) == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    for name in ("generation.json", "identities.safetensors", "manifest.json", "sample_grid.png"):
        assert (out / "tiny" / name).exists(), name
    rows = decoded_rows(out)
    assert sorted(rows) == [(i, j) for i in range(4) for j in range(5)]
    for (label, j), (pixels, meta) in rows.items():
        assert pixels.shape == (112, 112, 3) and pixels.dtype == np.uint8
        assert meta["cos_to_identity"] >= 0.5 - 1e-6
        if j == 4:  # the tiny schedule steers the last image of each identity to yaw 60
            assert meta["attrop_target_yaw"] == 60.0 and meta["attrop_success"] is not None
            assert meta["yaw"] is not None and meta["quality"] is not None
        else:
            assert meta["attrop_target_yaw"] is None and meta["attrop_success"] is None and meta["yaw"] is None
    for label in range(4):  # exact sigma mix per identity: round(5 * (0.4, 0.4, 0.2)) = 2, 2, 1
        mix = Counter(round(rows[(label, j)][1]["sigma"], 3) for j in range(5))
        assert mix == {0.3: 2, 0.5: 2, 0.7: 1}
    card = (out / "README.md").read_text()
    assert "config_name: tiny" in card and "not faces" in card and "dataset_info" in card


def test_label_is_a_class_label_of_the_config_identities(tiny_build):
    from datasets import ClassLabel, load_dataset

    out, _ = tiny_build
    ds = load_dataset(str(out), "tiny", split="train")
    assert isinstance(ds.features["label"], ClassLabel) and ds.features["label"].num_classes == 4
    split = ds.train_test_split(test_size=0.4, stratify_by_column="label", seed=0)
    for part, per_identity in (("train", 3), ("test", 2)):  # 5 images per identity, stratified 60/40
        assert Counter(split[part]["label"]) == {label: per_identity for label in range(4)}


def test_hsface_folder_streams_and_splits_by_node(tiny_build):
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    out, _ = tiny_build
    stream = load_dataset(str(out), "tiny", split="train", streaming=True)
    assert stream.features["label"].num_classes == 4
    streamed = list(stream)
    assert len(streamed) == 20
    parts = [list(split_dataset_by_node(load_dataset(str(out), "tiny", split="train", streaming=True), rank=r, world_size=2)) for r in range(2)]
    assert sorted((x["label"], x["image_index"]) for p in parts for x in p) == sorted((x["label"], x["image_index"]) for x in streamed)


def test_rerun_skips_finished_shards_and_changes_nothing(tiny_build):
    out, _ = tiny_build
    before = {p.name: p.read_bytes() for p in (out / "tiny").glob("train-*.parquet")}
    again = build(TINY, out, progress=False)
    assert again.shards_written == [] and again.shards_skipped == [0, 1]
    assert before == {p.name: p.read_bytes() for p in (out / "tiny").glob("train-*.parquet")}


FOREGROUND_STAGES = ("load", "sample", "refine", "perturb", "decode", "attrop", "wait for writer", "card")


def test_writer_thread_writes_the_same_shards_and_the_time_split_adds_up(tiny_build, tmp_path):
    out, threaded = tiny_build
    inline = build(TINY, tmp_path, progress=False, overlap_io=False, encode_threads=2)
    shards = sorted(p.name for p in (out / "tiny").glob("train-*.parquet"))
    assert shards and all((out / "tiny" / s).read_bytes() == (tmp_path / "tiny" / s).read_bytes() for s in shards)
    for result in (threaded, inline):
        t = result.timings
        assert {"load", "sample", "refine", "perturb", "decode", "attrop", "encode", "write", "card"} <= t.keys()
        # stages of the calling thread are sequential, so they cannot add up to more than the wall clock
        assert sum(t.get(stage, 0.0) for stage in FOREGROUND_STAGES) <= result.seconds
    assert "wait for writer" not in inline.timings  # nothing ran in the background


def test_writer_thread_errors_reach_the_build_and_stop_it(monkeypatch, tmp_path):
    import builder.build as build_module

    written = []

    def failing_write(self, shard, examples, provenance=None):
        written.append(shard)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(build_module.ShardWriter, "write", failing_write)
    config = TINY.replace(identities_per_shard=1)  # 4 shards
    with pytest.raises(OSError, match="No space left"):
        build(config, tmp_path, progress=False)
    # the failure of shard 0 surfaces when shard 1 is handed over: no further shard is written
    assert written == [0]
    assert not list((tmp_path / "tiny").glob("train-*.parquet"))


def test_datasets_native_builder_gives_the_same_examples(tiny_build, tmp_path):
    from builder.hsface_builder import HSFace

    out, _ = tiny_build
    builder = HSFace(config_name="tiny", model="random-tiny", cache_dir=str(tmp_path))
    builder.download_and_prepare()
    native = {(r["label"], r["image_index"]): np.asarray(r["image"]) for r in builder.as_dataset(split="train")}
    built = decoded_rows(out)
    assert native.keys() == built.keys()
    assert all(np.array_equal(native[k], built[k][0]) for k in native)


def test_unknown_config_is_rejected_with_the_list():
    result = run_cli("build", "5k", "--model", "random-tiny")
    assert result.returncode == 2 and "unknown HSFace config '5k'" in result.stderr and "10k" in result.stderr


def test_unwritable_output_folder_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputFolderError, match="cannot write"):
        build(TINY, blocker / "out", progress=False)


def test_folder_with_other_parameters_is_refused_and_left_intact(tiny_build, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_build[0], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(BuildError, match=r"built differently:\n  seed: built with 0, now 1\nNothing was changed"):
        build(TINY.replace(seed=1), out, progress=False)
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_sample_grid_is_a_real_picture(tiny_build):
    grid = Image.open(tiny_build[0] / "tiny" / "sample_grid.png")
    assert grid.size == (5 * 112, 2 * 112)  # the first shard: 2 identities x 5 images
    assert np.asarray(grid.convert("L")).std() > 1  # not a blank canvas
    with open(tiny_build[0] / "tiny" / "sample_grid.png", "rb") as f:
        assert Image.open(io.BytesIO(f.read())).format == "PNG"
