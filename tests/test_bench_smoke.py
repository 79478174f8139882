"""bench/gpu_check.py --smoke: the GPU speed check runs end to end on CPU and reports every field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_mode_reports_every_figure(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0]) == result

    assert result["device"] == "cpu" and result["smoke"] is True
    for row in result["decode"].values():  # two batch sizes, fp32 and bf16 images/s
        assert row["fp32"] > 0 and row["bf16"] > 0
    assert len(result["decode"]) == 2
    attrop = result["attrop"]
    assert attrop["images_per_s"] > 0 and 1 <= attrop["mean_steps"] <= attrop["max_steps"] and 0 <= attrop["success_rate"] <= 1
    build = result["build"]
    assert build["images"] == build["identities"] * 5 and build["images_per_s"] > 0
    assert {"decode", "attrop", "refine", "encode", "write"} <= build["stages_seconds"].keys()
    assert build["plain_images_per_s"] > 0 and build["attrop_image_iterations_per_s"] > 0
    hours = result["hours"]
    assert 0 < hours["HSFace10K"] < hours["HSFace300K"]
    # the extrapolation is linear in identities: 30x the identities, 30x the hours (up to rounding)
    assert abs(hours["HSFace300K"] / hours["HSFace10K"] - 30) < 0.1
