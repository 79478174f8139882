"""What `hsface build` writes, where, and what it refuses: the README's "Safe" and "Deterministic"
promises at the level users meet them (the CLI entry point and `build()`)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from builder.build import BuildError, build
from builder.cli import main as hsface
from builder.config import get_config
from builder.files import MARKER

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY = get_config("tiny", model="random-tiny")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "out"
    build(TINY, out, progress=False)
    return out


def test_rerun_with_another_batch_size_is_refused_naming_field_old_and_new(built, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(built, out)
    before = snapshot(out)
    code = hsface(["build", "tiny", "--model", "random-tiny", "--out", str(out), "--no-progress", "--batch-size", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "batch_size: built with 8, now 1" in err and "Traceback" not in err
    assert snapshot(out) == before


def test_a_folder_with_files_hsface_did_not_write_is_refused_before_any_work(tmp_path, capsys):
    user = tmp_path / "project"
    user.mkdir()
    (user / "README.md").write_text("my project\n")
    # a model that cannot load: the folder is refused first, so it is never even tried
    code = hsface(["build", "tiny", "--model", str(tmp_path / "no-such-model"), "--out", str(user), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "did not write (README.md)" in err and "no-such-model" not in err
    assert snapshot(user) == {"README.md": b"my project\n"}


def test_an_unloadable_model_leaves_no_output_folder(tmp_path):
    out = tmp_path / "new"
    with pytest.raises((FileNotFoundError, OSError, ValueError)):
        build(get_config("tiny", model=str(tmp_path / "no-such-model")), out, progress=False)
    assert not out.exists()


def test_a_failed_first_build_leaves_nothing_and_the_corrected_retry_runs(tmp_path):
    from vec2face_model.identity import SamplingBudgetError

    out = tmp_path / "new"
    with pytest.raises(SamplingBudgetError):  # 4 vectors with pairwise cosine <= -0.9 do not exist
        build(TINY.replace(tau=-0.9), out, progress=False)
    assert not out.exists()
    result = build(TINY.replace(tau=0.2), out, progress=False)
    assert result.num_rows == 20


def test_a_failed_build_in_a_used_folder_leaves_the_folder_as_it_was(built, tmp_path):
    from vec2face_model.identity import SamplingBudgetError

    out = tmp_path / "out"
    shutil.copytree(built, out)
    before = snapshot(out)
    with pytest.raises(SamplingBudgetError):
        build(TINY.replace(name="tiny-other", tau=-0.9), out, progress=False)
    assert snapshot(out) == before and not (out / "tiny-other").exists()


def test_outputs_have_ordinary_modes_and_the_same_bytes_every_time(built, tmp_path):
    old = os.umask(0o022)
    try:
        again = tmp_path / "again"
        build(TINY, again, progress=False)
    finally:
        os.umask(old)
    files = snapshot(again)
    assert MARKER in files and "README.md" in files and "tiny/identities.safetensors" in files
    assert "execution" not in json.loads(files["tiny/generation.json"])  # fp32: nothing measured, nothing varies
    modes = {name: stat.S_IMODE((again / name).stat().st_mode) for name in files}
    assert set(modes.values()) == {0o644}, modes
    reference = snapshot(built)
    # every file but the card (which names its folder) is byte-identical to an earlier build
    assert {k: v for k, v in files.items() if k != "README.md"} == {k: v for k, v in reference.items() if k != "README.md"}


def test_the_default_build_in_a_fresh_clone_leaves_git_status_clean(tmp_path, monkeypatch):
    if not (PROJECT_ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(PROJECT_ROOT), str(clone)], check=True)
    monkeypatch.chdir(clone)
    assert hsface(["build", "tiny", "--model", "random-tiny", "--no-progress"]) == 0  # default --out: ./hsface
    status = subprocess.run(["git", "status", "--porcelain", "--ignored=no"], cwd=clone, capture_output=True, text=True, check=True)
    assert status.stdout == ""
    from datasets import load_dataset

    assert load_dataset("hsface", "tiny", split="train").num_rows == 20  # from the project root, as the README says


def test_a_reduced_precision_build_records_its_measured_speed_up(tmp_path):
    build(TINY.replace(precision="bf16"), tmp_path / "bf16", progress=False)
    execution = json.loads((tmp_path / "bf16" / "tiny" / "generation.json").read_text())["execution"]
    assert execution["precision"] == "bf16" and execution["speedup"] > 0 and isinstance(execution["native_kernels"], bool)
    assert "| execution | value |" in (tmp_path / "bf16" / "README.md").read_text()


def test_a_folder_from_an_older_hsface_is_refused_for_what_it_did_not_record(built, tmp_path, capsys):
    out = tmp_path / "old"
    shutil.copytree(built, out)
    generation = out / "tiny" / "generation.json"
    record = json.loads(generation.read_text())
    del record["parameters"]["batch_size"]  # not a content field before
    record["provenance"]["components"]["prior"] = {"class": "IdentityPrior", "sha256": "0" * 64}  # hashed before
    generation.write_text(json.dumps(record))
    code = hsface(["build", "tiny", "--model", "random-tiny", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "batch_size: not recorded (built by an older hsface), now 8" in err and "prior" not in err
