"""The dataset card (``README.md``) of an HSFace output folder, regenerated from what is on disk.

Built with ``huggingface_hub.DatasetCard`` / ``DatasetCardData``. Its YAML ``configs:`` section is
what makes ``load_dataset(folder, "10k")`` work without any code, and its ``dataset_info`` declares
the features (``label`` as a ``ClassLabel`` up to ``CLASS_LABEL_MAX_IDENTITIES``), which
``load_dataset`` applies to the shards. Only
configs whose shards are all finished are listed. The card holds no local absolute path: it is
published as is by ``hsface push``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from datasets import ClassLabel
from huggingface_hub import DatasetCard, DatasetCardData

from vec2face_model.image_io import decode_image

from .config import steers_beyond_yaw
from .files import write_text_atomic
from .hsface_builder import CITATION, hsface_features

GRID_IDENTITIES = 8
GRID_IMAGES = 8

SOURCE_MODEL = "BooBooWu/Vec2Face"
REPO_PLACEHOLDER = "<user>/hsface"
GLINT360K_TERMS = "https://github.com/deepinsight/insightface/tree/master/recognition/partial_fc"
VEC2FACE_PLUS = "https://arxiv.org/abs/2507.17192"
# The Hub's size categories, by upper bound of the row count.
SIZE_CATEGORIES = (
    (1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
    (10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B"), (10**10, "1B<n<10B"),
    (10**11, "10B<n<100B"), (10**12, "100B<n<1T"),
)


def size_category(num_rows: int) -> str:
    """The Hub's ``size_categories`` value for a dataset of ``num_rows`` examples."""
    return next((name for bound, name in SIZE_CATEGORIES if num_rows < bound), "n>1T")


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
    images = np.stack([decode_image(row["image"], size=None) for row in chosen])
    path = config_dir / "sample_grid.png"
    save_sample_grid(images, np.array([row["label"] for row in chosen]), path, ncols=min(GRID_IMAGES, max(r["image_index"] for r in chosen) + 1))
    return path


def public_model_name(model: str) -> str:
    """``model`` as it may appear on a public card: a Hub id or preset as is, a local file or folder by its name only."""
    if os.path.isabs(model) or Path(model).expanduser().exists():
        return f"local '{Path(model).name}'"
    return model


def _arrow_bytes(config_dir: Path, manifest: dict) -> int:
    """Uncompressed size of a config's rows (``num_bytes`` of the split), from the parquet footers."""
    total = 0
    for entry in manifest["shards"]:
        metadata = pq.ParquetFile(config_dir / entry["file"]).metadata
        total += sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    return total


def card_data(out_dir: Path, configs: dict[str, dict]) -> DatasetCardData:
    """The card's YAML metadata: license, tasks, size, tags, configs and features of every built config."""
    largest = max((info["manifest"]["num_rows"] for info in configs.values()), default=0)
    return DatasetCardData(
        pretty_name="HSFace (generated with hsface)",
        license="other",
        license_name="vec2face-mit-glint360k-noncommercial",
        license_link=GLINT360K_TERMS,
        task_categories=["image-classification", "image-feature-extraction"],
        size_categories=[size_category(largest)],
        source_datasets=["original"],
        tags=["synthetic", "face-recognition", "vec2face"],
        configs=[{"config_name": name, "data_files": [{"split": "train", "path": f"{name}/train-*.parquet"}]} for name in configs],
        dataset_info=[
            {
                "config_name": name,
                "features": _features_of(info["generation"]["parameters"])._to_yaml_list(),
                "splits": [{"name": "train", "num_bytes": _arrow_bytes(out_dir / name, info["manifest"]),
                            "num_examples": info["manifest"]["num_rows"]}],
                "download_size": sum((out_dir / name / e["file"]).stat().st_size for e in info["manifest"]["shards"]),
            }
            for name, info in configs.items()
        ],
    )


USES_AND_LIMITATIONS = f"""## Uses and limitations

- **Synthetic faces.** The images are generated, not photographs: identity vectors are sampled at
  random and decoded by Vec2Face. They are meant for training and studying face-recognition models.
  Resemblance to real people cannot be ruled out, and the data does not replace evaluation on real
  faces.
- **Data terms of the models behind it.** The Vec2Face code and weights ({SOURCE_MODEL}) are released
  under the MIT license, but the recognizers that guide generation (ArcFace and MagFace IResNet-100)
  were trained on Glint360K, whose terms make the dataset and models trained with it available for
  non-commercial research purposes only ([Glint360K]({GLINT360K_TERMS})), and the released generator was
  trained on WebFace4M images. Whether those terms extend to images generated this way is not settled
  here: check them before any use beyond non-commercial research. Hence `license: other` above.
- **Bias.** The Vec2Face+ paper ([arXiv:2507.17192]({VEC2FACE_PLUS})) reports that face-recognition
  models trained on synthetic identities, its own included, were more demographically biased than
  models trained on real identities, and that only 1 of 11 synthetic datasets it tested did better
  than chance at identical-twin verification. Expect similar limits here and measure them for your
  use (e.g. with `hsface analyze` and demographic test sets).
"""


def _execution_lines(execution: dict) -> list[str]:
    lines = ["| execution | value |", "|---|---|"]
    lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in execution.items()]
    return ["How this config was run (does not change what the parameters define, unless stated):", "", *lines, ""]


def _config_lines(out_dir: Path, name: str, info: dict) -> list[str]:
    generation, manifest = info["generation"], info["manifest"]
    params = dict(generation["parameters"])
    if "model" in params:
        params["model"] = public_model_name(str(params["model"]))
    provenance = generation["provenance"]
    lines = [f"## Config `{name}`", ""]
    if provenance.get("preset"):
        lines += [f"> **Random weights (`{provenance['preset']}` preset): these images are not faces.** "
                  "For tests and smoke runs only.", ""]
    num_identities = params["num_identities"]
    if isinstance(hsface_features(num_identities)["label"], ClassLabel):
        label = f"`label`: ClassLabel with {num_identities:,} classes"
    else:  # see CLASS_LABEL_MAX_IDENTITIES: a ClassLabel this large would bloat this card
        label = (f"`label`: int64 identity index 0..{num_identities - 1:,}; for a ClassLabel: "
                 f"`ds = ds.cast_column('label', ClassLabel(num_classes={num_identities}))`")
    lines += [
        f"- identities: {num_identities:,} ({label}); images per identity: {params['images_per_identity']}; "
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
    if isinstance(generation.get("execution"), dict) and generation["execution"]:
        lines += _execution_lines(generation["execution"])
    if (out_dir / name / "sample_grid.png").exists():
        lines += [f"![{name} samples]({name}/sample_grid.png)", ""]
    return lines


def render_card(out_dir: Path, configs: dict[str, dict]) -> str:
    example = next(iter(configs), "tiny")
    body = [
        "# HSFace",
        "",
        f"Synthetic face-recognition training data generated with [Vec2Face](https://huggingface.co/{SOURCE_MODEL}) "
        "([code](https://github.com/HaiyuWu/Vec2Face)) by the `hsface` toolkit: identity vectors sampled with "
        "pairwise cosine ≤ tau, perturbed into images, decoded, and pose images steered with AttrOP. Every "
        "parameter that defines the images is listed per config below (and in `<config>/generation.json`).",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f"ds = load_dataset({REPO_PLACEHOLDER!r}, {example!r}, split='train')  # once pushed with `hsface push`",
        f"ds = load_dataset({'./' + out_dir.name!r}, {example!r}, split='train')  # the local folder, from its parent",
        "```",
        "",
        "Columns: `image` (112x112 aligned face), `label` (identity index), `image_index`, `sigma` "
        "(perturbation level), `cos_to_identity`, and for AttrOP images `attrop_target_yaw`, `attrop_success`, "
        "`yaw`, `quality` (null otherwise). Configs whose schedule steers pitch or roll also have "
        "`attrop_target_pitch`, `attrop_target_roll`, `pitch`, `roll`.",
        "",
        "After rebuilding a local folder, load it with `download_mode='force_redownload'`: `datasets` caches a "
        "local folder under its name, not its content.",
        "",
        "Configs not listed here are not built yet: `hsface build CONFIG --out <folder>` makes them "
        "(10k, 20k, 100k, 200k, 300k, tiny).",
        "",
        USES_AND_LIMITATIONS,
    ]
    for name, info in configs.items():
        body += _config_lines(out_dir, name, info)
    body += ["## Citation", "", "```bibtex", CITATION, "```", ""]
    card = DatasetCard(f"---\n{card_data(out_dir, configs).to_yaml()}\n---\n\n" + "\n".join(body))
    return str(card)


def _features_of(parameters: dict):
    return hsface_features(parameters["num_identities"], steers_beyond_yaw(parameters.get("attrop_groups", [])))


def write_card(out_dir: str | Path) -> Path:
    """Regenerate ``out_dir/README.md`` (atomically), keeping the sections `hsface analyze` wrote."""
    out_dir = Path(out_dir)
    configs = built_configs(out_dir)
    for name, info in configs.items():
        if not (out_dir / name / "sample_grid.png").exists():
            write_sample_grid(out_dir / name, info["manifest"])
    path = out_dir / "README.md"
    card = render_card(out_dir, configs)
    if path.exists():  # keep the sections `hsface analyze` wrote
        from .analysis_card import analysis_sections, replace_card_section

        for config, body in analysis_sections(path.read_text()).items():
            card = replace_card_section(card, config, body)
    write_text_atomic(path, card)
    return path
