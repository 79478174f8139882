"""Pushing datasets and pipelines to the Hugging Face Hub (real ``huggingface_hub`` calls; the client
is injectable so that tests can record the calls without a network)."""

from __future__ import annotations

import tempfile
from pathlib import Path

# What a dataset repository needs; build bookkeeping (.manifest/, .incomplete/) stays local.
DATASET_PATTERNS = ("README.md", "*/train-*.parquet", "*/generation.json", "*/identities.safetensors",
                    "*/manifest.json", "*/sample_grid.png")


def _client(api):
    if api is not None:
        return api
    from huggingface_hub import HfApi

    return HfApi()


def _upload_files(api, repo_id: str, repo_type: str, root: Path, files: list[Path], message: str, private: bool):
    from huggingface_hub import CommitOperationAdd

    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=f.relative_to(root).as_posix(), path_or_fileobj=str(f)) for f in files]
    return api.create_commit(repo_id=repo_id, repo_type=repo_type, operations=operations, commit_message=message)


def dataset_files(out_dir: Path) -> list[Path]:
    files = sorted({p for pattern in DATASET_PATTERNS for p in out_dir.glob(pattern) if p.is_file()})
    if not (out_dir / "README.md").exists() or not any(p.suffix == ".parquet" for p in files):
        raise FileNotFoundError(f"{out_dir} holds no built HSFace config (README.md + shards); run `hsface build` first")
    return files


def push_dataset(out_dir: str | Path, repo_id: str, *, api=None, private: bool = False):
    """Upload the card and every finished shard of ``out_dir`` to the dataset repo ``repo_id`` in one commit."""
    out_dir = Path(out_dir)
    return _upload_files(_client(api), repo_id, "dataset", out_dir, dataset_files(out_dir), "Upload HSFace (hsface build)", private)


def push_pipeline(pipe, repo_id: str, *, api=None, private: bool = False):
    """``save_pretrained`` then upload the whole folder to the model repo ``repo_id`` in one commit."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pipe.save_pretrained(root)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return _upload_files(_client(api), repo_id, "model", root, files, "Upload Vec2FacePipeline (hsface)", private)
