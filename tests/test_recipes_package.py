"""recipes is a package: `python -m recipes.X`, scripts run by path, plain `pytest` and the bench work from anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, pythonpath: str | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_recipes_run_as_modules_and_by_path_from_another_directory(tmp_path):
    as_module = _run([sys.executable, "-m", "recipes.train_fr", "--help"], cwd=tmp_path, pythonpath=str(ROOT))
    assert "usage: train_fr" in as_module.stdout and "--lr_milestones" in as_module.stdout
    # by path, as `accelerate launch recipes/train_vec2face.py` runs it: no PYTHONPATH, another directory
    by_path = _run([sys.executable, str(ROOT / "recipes" / "train_vec2face.py"), "--help"], cwd=tmp_path)
    assert "usage: train_vec2face" in by_path.stdout and "--gradient_checkpointing" in by_path.stdout


@pytest.mark.slow
def test_scripts_run_by_path_import_this_checkout():
    # The bootstrap replaces recipes/ (sys.path[0] of a script) with the checkout root, so `recipes`
    # and `vec2face_model` resolve here even where another checkout is installed.
    script = str(ROOT / "recipes" / "eval_fr.py")
    code = (f"import runpy, sys; sys.path[0] = {str(ROOT / 'recipes')!r}; "  # what `python recipes/eval_fr.py` starts with
            f"runpy.run_path({script!r}, run_name='as_script'); import recipes; print(recipes.__file__)")
    done = _run([sys.executable, "-c", code], cwd=ROOT / "tests")
    assert Path(done.stdout.strip().splitlines()[-1]).resolve() == ROOT / "recipes" / "__init__.py"


@pytest.mark.slow
def test_plain_pytest_collects_the_recipe_tests():
    pytest_script = Path(sys.executable).parent / "pytest"
    if not pytest_script.exists():
        pytest.skip("no pytest console script next to this interpreter")
    done = _run([str(pytest_script), "--collect-only", "-q", "tests/test_eval_fr.py", "tests/test_recipes_config.py"], cwd=ROOT)
    assert "error" not in done.stdout.lower().split("tests collected")[-1]


@pytest.mark.slow
def test_bench_train_fr_runs_from_another_directory(tmp_path):
    done = _run([sys.executable, str(ROOT / "bench" / "bench_train_fr.py"), "--data-images", "8", "--backbone", "vit_s",
                 "--backbone-kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}', "--batch-size", "2",
                 "--classes", "4", "--steps", "1", "--warmup", "1"], cwd=tmp_path)
    assert "images/s" in done.stdout
