"""Shared test set-up: offline Hub, reference fixtures from ../shared, small thread count."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# datasets names the cache of a local folder by the folder's name, not its content: a fresh cache per
# test session keeps results of an earlier run (same tmp folder names) out of this one.
if "HF_DATASETS_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="hsface-test-datasets-cache-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("HSFACE_REFERENCE_DIR", PROJECT_ROOT.parent / "shared" / "reference"))


def reference_file(relative: str) -> Path:
    """Path of a file under ``../shared/reference``; skips (or fails under HSFACE_REQUIRE_FIXTURES=1) if absent."""
    path = REFERENCE_DIR / relative
    if not path.exists():
        message = (
            f"reference file {relative} not found under {REFERENCE_DIR} (expected ../shared/reference "
            "beside the project root, or set HSFACE_REFERENCE_DIR)"
        )
        if os.environ.get("HSFACE_REQUIRE_FIXTURES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def reference():
    return reference_file


def assert_state_dict_matches_manifest(model, manifest_relative: str) -> dict:
    """Keys (order-insensitive), shapes and dtypes of ``model.state_dict()`` equal an official manifest."""
    manifest = json.loads(reference_file(manifest_relative).read_text())
    ours = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    theirs = {e["key"]: (e["shape"], e["dtype"]) for e in manifest["state_dict"]}
    assert ours == theirs
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    return manifest
