"""The dataset card (``README.md``) of an HSFace output folder, regenerated from what is on disk.

Its YAML ``configs:`` section is what makes ``load_dataset(folder, "10k")`` work without any code;
only configs whose shards are all finished are listed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml
from PIL import Image

from .hsface_builder import CITATION, FEATURES

GRID_IDENTITIES = 8
GRID_IMAGES = 8


def built_configs(out_dir: Path) -> dict[str, dict]:
    """{config name: {"generation": ..., "manifest": ...}} for every finished config in ``out_dir``."""
    found = {}
    for manifest_path in sorted(out_dir.glob("*/manifest.json")):
        generation_path = manifest_path.with_name("generation.json")
        if generation_path.exists():
            found[manifest_path.parent.name] = {
                "generation": json.loads(generation_path.read_text()),
                "manifest": json.loads(manifest_path.read_text()),
            }
    return found


def write_sample_grid(config_dir: Path, manifest: dict) -> Path:
    """A PNG grid: rows = the first identities of the first shard, columns = their first images."""
    from vec2face_model.analysis import save_sample_grid

    table = pq.read_table(config_dir / manifest["shards"][0]["file"], columns=["image", "label", "image_index"]).to_pylist()
    labels = sorted({row["label"] for row in table})[:GRID_IDENTITIES]
    chosen = [row for row in table if row["label"] in labels and row["image_index"] < GRID_IMAGES]
    images = np.stack([np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")) for row in chosen])
    path = config_dir / "sample_grid.png"
    save_sample_grid(images, np.array([row["label"] for row in chosen]), path, ncols=min(GRID_IMAGES, max(r["image_index"] for r in chosen) + 1))
    return path


def render_card(out_dir: Path, configs: dict[str, dict]) -> str:
    metadata = {
        "pretty_name": "HSFace (generated with hsface)",
        "tags": ["face-recognition", "synthetic", "vec2face"],
        "task_categories": ["image-classification"],
        "configs": [
            {"config_name": name, "data_files": [{"split": "train", "path": f"{name}/train-*.parquet"}]} for name in configs
        ],
        "dataset_info": [
            {
                "config_name": name,
                "features": FEATURES._to_yaml_list(),
                "splits": [{"name": "train", "num_examples": info["manifest"]["num_rows"],
                            "num_bytes": sum((out_dir / name / e["file"]).stat().st_size for e in info["manifest"]["shards"])}],
            }
            for name, info in configs.items()
        ],
    }
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).rstrip(),
        "---",
        "",
        "# HSFace",
        "",
        "Synthetic face-recognition training data generated with [Vec2Face](https://github.com/HaiyuWu/Vec2Face) "
        "by the `hsface` toolkit: identity vectors sampled with pairwise cosine ≤ tau, perturbed into images, "
        "decoded, and pose images steered with AttrOP. Each image is a function of (seed, identity, image index).",
        "",
        "```python",
        "from datasets import load_dataset",
        f"ds = load_dataset({str(out_dir)!r}, {next(iter(configs), 'tiny')!r}, split='train')",
        "```",
        "",
        "After rebuilding a folder, load it with `download_mode='force_redownload'`: `datasets` caches a local "
        "folder under its name, not its content.",
        "",
        "Configs not listed here are not built yet: `hsface build CONFIG --out " + str(out_dir) + "` makes them "
        "(10k, 20k, 100k, 200k, 300k, tiny).",
        "",
    ]
    for name, info in configs.items():
        generation, manifest = info["generation"], info["manifest"]
        params = generation["parameters"]
        provenance = generation["provenance"]
        lines += [f"## Config `{name}`", ""]
        if provenance.get("preset"):
            lines += [f"> **Random weights (`{provenance['preset']}` preset): these images are not faces.** "
                      "For tests and smoke runs only.", ""]
        lines += [
            f"- identities: {params['num_identities']:,}; images per identity: {params['images_per_identity']}; "
            f"rows: {manifest['num_rows']:,} in {len(manifest['shards'])} shard(s)",
            "",
            "| parameter | value |",
            "|---|---|",
            *[f"| {k} | `{json.dumps(v)}` |" for k, v in params.items()],
            "",
            "| model component | class | sha256 of weights |",
            "|---|---|---|",
            *[f"| {c} | {v['class']} | `{v['sha256'][:16]}…` |" for c, v in provenance["components"].items()],
            "",
        ]
        if (out_dir / name / "sample_grid.png").exists():
            lines += [f"![{name} samples]({name}/sample_grid.png)", ""]
    lines += ["## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def write_card(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    configs = built_configs(out_dir)
    for name, info in configs.items():
        if not (out_dir / name / "sample_grid.png").exists():
            write_sample_grid(out_dir / name, info["manifest"])
    path = out_dir / "README.md"
    card = render_card(out_dir, configs)
    if path.exists():  # keep the sections `hsface analyze` wrote
        from .analyze import analysis_sections, replace_card_section

        for config, body in analysis_sections(path.read_text()).items():
            card = replace_card_section(card, config, body)
    path.write_text(card)
    return path
