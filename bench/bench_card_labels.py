"""Cost of declaring ``label`` as a ``ClassLabel`` of N identities: card size and ``load_dataset`` time.

    python bench/bench_card_labels.py --identities 4 10000 20000 100000 300000

A ``ClassLabel`` always carries its N names (datasets has no names-free form), so the card's YAML
``dataset_info`` grows with N and every ``load_dataset`` of *any* config in the repository parses it.
Also shown: the size of one parquet shard whose schema carries the ClassLabel (parquet keeps the
schema metadata twice). Decides ``builder.hsface_builder.CLASS_LABEL_MAX_IDENTITIES``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from builder.config import get_config
from builder.hsface_builder import shard_features

SHARD_FEATURES = shard_features(get_config("10k"))


def folder_with_card(root: Path, num_identities: int) -> int:
    """A two-config folder: 'small' (4 identities) and 'big' (num_identities as ClassLabel); returns README bytes."""
    row = {"image": None, "label": 0, "image_index": 0, "sigma": 0.3, "cos_to_identity": 0.9, "attrop_target_yaw": None,
           "attrop_success": None, "yaw": None, "quality": None}
    for config in ("small", "big"):
        (root / config).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist([row], schema=SHARD_FEATURES.arrow_schema), root / config / "train-0.parquet")
    def label(n: int) -> list:
        return datasets.Features({**SHARD_FEATURES, "label": datasets.ClassLabel(num_classes=n)})._to_yaml_list()

    metadata = {
        "configs": [{"config_name": c, "data_files": [{"split": "train", "path": f"{c}/train-*.parquet"}]} for c in ("small", "big")],
        "dataset_info": [{"config_name": "small", "features": label(4)}, {"config_name": "big", "features": label(num_identities)}],
    }
    text = "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n# bench\n"
    (root / "README.md").write_text(text)
    return len(text.encode())


def shard_bytes_with_class_label(root: Path, num_identities: int) -> int:
    features = datasets.Features({"label": datasets.ClassLabel(num_classes=num_identities)})
    path = root / "one-row.parquet"
    pq.write_table(pa.Table.from_pylist([{"label": 0}], schema=features.arrow_schema), path)
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, nargs="+", default=[4, 10_000, 20_000, 100_000, 300_000])
    parser.add_argument("--repeats", type=int, default=2, help="best of this many loads per size")
    args = parser.parse_args()

    datasets.disable_progress_bars()
    print("identities | card bytes | load_dataset('small') s (best) | x of 4 identities | 1-row shard bytes with ClassLabel")
    baseline = None
    for n in args.identities:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "repo"
            card_bytes = folder_with_card(root, n)
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                datasets.load_dataset(str(root), "small", split="train", download_mode="force_redownload",
                                      cache_dir=str(Path(tmp) / "cache"))
                best = min(best, time.perf_counter() - start)
            baseline = baseline or best
            print(f"{n:>10,} | {card_bytes:>10,} | {best:>8.2f} | {best / baseline:>6.1f} | {shard_bytes_with_class_label(Path(tmp), n):,}")


if __name__ == "__main__":
    main()
