"""``hsface analyze``: face-recognition features of a dataset -> the metrics of :mod:`vec2face_model.analysis`.

    hsface analyze ./hsface --config tiny --recognizer random-tiny

Features are extracted once per (dataset fingerprint, recognizer weights) and cached as a ``.npz``
file, so re-running with other thresholds or a reference set costs no forward passes. Outputs:
``report.json``, ``summary.md``, PNG plots and ``sample_grid.png`` in ``--out``. On a folder built by
``hsface build`` the plots are also copied to ``<folder>/<config>/analysis/`` and an
``## Analysis (`<config>`)`` section of its ``README.md``, between HTML comment markers, is
replaced (or inserted once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .analysis_card import analysis_sections, card_section, replace_card_section  # noqa: F401  (re-exported)

# torch and the models are imported where they are used, so that `hsface --help` (which registers
# this subcommand through add_parser) starts without importing torch.
if TYPE_CHECKING:
    import torch

    from vec2face_model.models.iresnet import IResNet

__all__ = [
    "DEFAULT_CACHE_DIR",
    "add_parser",
    "analysis_sections",
    "analyze_dataset",
    "extract_features",
    "load_recognizer",
    "recognizer_hash",
    "replace_card_section",
]

DEFAULT_CACHE_DIR = Path("~/.cache/hsface/features")
_FROM_RECOGNIZERS = ("load_recognizer", "recognizer_hash")  # their home is vec2face_model.recognizers


def __getattr__(name: str):
    # re-exported lazily: importing vec2face_model here would make `hsface --help` import torch
    if name in _FROM_RECOGNIZERS:
        from vec2face_model import recognizers

        return getattr(recognizers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
ANALYSIS_DIR = "analysis"  # under <built folder>/<config>/
GRID_IDENTITIES = 8
GRID_IMAGES = 8


# --- recognizer -------------------------------------------------------------------------------


def _describe_recognizer(name_or_path, model: IResNet) -> dict:
    import torch

    from vec2face_model.pipeline_vec2face import OFFICIAL_FILES, OFFICIAL_REPO_ID, PIPELINE_PRESETS
    from vec2face_model.recognizers import recognizer_hash

    if isinstance(name_or_path, torch.nn.Module):
        source = f"<{type(name_or_path).__name__} object>"
    elif name_or_path is None:
        source = f"{OFFICIAL_REPO_ID}/{OFFICIAL_FILES['recognizer']}"
    else:
        source = str(name_or_path)
    return {
        "source": source,
        "class": type(model).__name__,
        "config": {k: v for k, v in dict(model.config).items() if not k.startswith("_")},
        "sha256": recognizer_hash(model),
        "random_weights": source in PIPELINE_PRESETS,
    }


# --- features ---------------------------------------------------------------------------------


def _cache_path(dataset, recognizer: torch.nn.Module, cache_dir) -> Path:
    from vec2face_model.recognizers import recognizer_hash

    fingerprint = getattr(dataset, "_fingerprint", None)
    if not fingerprint:
        raise TypeError("feature caching needs a datasets.Dataset (with a fingerprint); pass a map-style Dataset, not an IterableDataset")
    cache_dir = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    return cache_dir / f"{fingerprint}-{recognizer_hash(recognizer)[:16]}.npz"


def _check_columns(dataset) -> None:
    missing = {"image", "label"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"the dataset needs 'image' and 'label' columns; it has {dataset.column_names} (missing {sorted(missing)})")


def extract_features(dataset, recognizer: IResNet, batch_size: int = 64, cache_dir=None, progress: bool = True):
    """Raw recognizer features ``float32 [N, D]`` and labels ``int64 [N]`` of every row, in row order.

    ``dataset`` is a ``datasets.Dataset`` with ``image`` (aligned 112x112 face crops) and integer
    ``label`` columns. The result is cached in ``cache_dir`` (default ``~/.cache/hsface/features``)
    under the dataset fingerprint and the recognizer's weight hash; a later call with the same
    pair loads it without running the recognizer. The recognizer runs on its own device and dtype,
    in eval mode (its previous mode is restored).
    """
    from tqdm.auto import tqdm

    from vec2face_model.files import atomic_write
    from vec2face_model.image_io import decode_to_tensor
    from vec2face_model.recognizers import embed_images

    _check_columns(dataset)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    label_dtype = str(getattr(dataset.features["label"], "dtype", ""))
    if not label_dtype.startswith(("int", "uint")):
        raise TypeError(f"the label column must hold integer identity ids, got {dataset.features['label']}; map names to ints first")
    path = _cache_path(dataset, recognizer, cache_dir)
    if path.exists():
        with np.load(path) as cached:
            features, labels = cached["features"], cached["labels"]
        if len(features) == len(labels) == len(dataset):
            return features, labels
        # a cache file for this key with another row count is stale (interrupted writer); recompute

    features = np.empty((len(dataset), recognizer.config.num_features), dtype=np.float32)
    labels = np.empty(len(dataset), dtype=np.int64)
    was_training = recognizer.training
    recognizer.eval()
    bar = tqdm(total=len(dataset), disable=not progress, desc="hsface analyze: features", unit="img", dynamic_ncols=True)
    try:
        start = 0
        for batch in dataset.select_columns(["image", "label"]).with_format(None).iter(batch_size=batch_size):
            images = decode_to_tensor(batch["image"], what="a dataset image")
            end = start + len(images)
            features[start:end] = embed_images(recognizer, images)
            labels[start:end] = batch["label"]
            start = end
            bar.update(len(images))
    finally:
        bar.close()
        recognizer.train(was_training)

    with atomic_write(path) as f:  # readers never see a half-written cache file
        np.savez(f, features=features, labels=labels)
    return features, labels


def _load_reference(path) -> np.ndarray:
    from vec2face_model.errors import MissingInputError

    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingInputError(f"reference features {path}: no such file (expected .npy or .safetensors [R, D] features)")
    if path.suffix == ".npy":
        return np.load(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        if "features" in tensors:
            return tensors["features"]
        raise ValueError(f"{path} holds several tensors ({', '.join(tensors)}); store the reference under the name 'features'")
    raise ValueError(f"reference features {path}: unsupported file type; use .npy or .safetensors")


def _built_config(path: Path, config: str | None) -> str | None:
    """The config name when ``path`` is a folder written by ``hsface build`` holding it, else None."""
    if not (path / "README.md").is_file():
        return None
    if config is None:
        built = sorted(p.parent.name for p in path.glob("*/generation.json"))
        return built[0] if len(built) == 1 else None
    return config if (path / config / "generation.json").is_file() else None


def _publish_to_folder(out_dir: Path, files: list[Path], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    names = {f.name for f in files}
    for stale in target.glob("*.png"):  # e.g. leakage.png from an earlier run with --reference
        if stale.name not in names:
            stale.unlink()
    if target.resolve() != out_dir.resolve():
        for file in files:
            shutil.copyfile(file, target / file.name)


# --- the analysis -----------------------------------------------------------------------------


def _load_train_split(path_or_repo, config: str | None):
    import datasets

    path = str(path_or_repo)
    if Path(path).expanduser().is_dir():
        # datasets keys the Arrow cache of a local folder with a YAML `configs:` card on the folder's
        # name, the config and the file *patterns* only: a rebuilt folder, or another folder of the
        # same name, would read stale rows. The resolved files carry paths and mtimes into the key.
        files = datasets.load_dataset_builder(path, config).config.data_files
        if files:
            return datasets.load_dataset(path, config, split="train", data_files=files)
    return datasets.load_dataset(path, config, split="train")


def _first_identities_grid(dataset, labels: np.ndarray, path: Path, num_identities: int, num_images: int) -> Path:
    from vec2face_model.analysis import save_sample_grid
    from vec2face_model.image_io import decode_image

    chosen: dict[int, list[int]] = {}
    for index, label in enumerate(labels.tolist()):
        if label in chosen:
            if len(chosen[label]) < num_images:
                chosen[label].append(index)
        elif len(chosen) < num_identities:
            chosen[label] = [index]
        elif all(len(rows) >= num_images for rows in chosen.values()):
            break
    indices = [i for rows in chosen.values() for i in rows]
    images = dataset.select_columns(["image"]).select(indices)["image"]
    pixels = np.stack([decode_image(image, size=None) for image in images])
    return save_sample_grid(pixels, labels[indices], path, ncols=max(len(rows) for rows in chosen.values()))


def analyze_dataset(
    path_or_repo: str | os.PathLike,
    config: str | None = None,
    recognizer: str | os.PathLike | IResNet | None = None,
    reference: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    num_pairs: int = 100_000,
    seed: int = 0,
    write_card_section: bool = True,
    *,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Analyse the ``train`` split of a dataset and write the report; returns the report dict.

    ``path_or_repo`` and ``config`` go to ``datasets.load_dataset``. ``recognizer``: see
    :func:`load_recognizer` (or an IResNet). ``reference``: ``.npy``/``.safetensors`` features
    ``[R, D]`` enabling the leakage check. ``out_dir`` receives ``report.json``, ``summary.md``,
    the plots and ``sample_grid.png``; it defaults to ``<folder>/<config>/analysis`` for a folder
    built by ``hsface build`` and to ``./hsface-analysis/<config>`` otherwise. For a built folder
    with ``write_card_section``, the outputs are copied to ``<folder>/<config>/analysis`` and the
    config's section of ``<folder>/README.md`` is regenerated.
    """
    import torch

    from vec2face_model import recognizers
    from vec2face_model.analysis import analyze_features, write_report
    from vec2face_model.errors import MissingInputError, looks_like_a_path
    from vec2face_model.files import write_text_atomic

    local = Path(path_or_repo).expanduser()
    built = _built_config(local, config) if local.is_dir() else None
    config = config or built
    if out_dir is None:
        out_dir = local / built / ANALYSIS_DIR if built else Path("hsface-analysis") / (config or "default")
    out_dir = Path(out_dir)

    # Load the recognizer first: its errors are quicker to hit than a dataset load.
    try:
        model = recognizer if isinstance(recognizer, torch.nn.Module) else recognizers.load_recognizer(recognizer)
    except FileNotFoundError as err:
        hint = _preset_hint(local, built) if recognizer is None else None
        raise MissingInputError(f"{err}{hint or ''}") from err
    if looks_like_a_path(str(path_or_repo)) and not local.exists():
        raise MissingInputError(f"{path_or_repo}: no such folder. Pass an `hsface build` output folder, a folder of "
                                "parquet/image files, or a Hub dataset id.")
    reference_features = _load_reference(reference) if reference is not None else None
    dataset = _load_train_split(path_or_repo, config)

    features, labels = extract_features(dataset, model, batch_size=batch_size, cache_dir=cache_dir, progress=progress)
    report = analyze_features(features, labels, reference_features, num_pairs=num_pairs, seed=seed)
    report["dataset"] = {"path": str(path_or_repo), "config": config, "split": "train", "fingerprint": dataset._fingerprint}
    report["recognizer"] = _describe_recognizer(recognizer, model)
    # Scoring a dataset with the recognizer that steered its generation flatters it: say so.
    report["recognizer"]["same_as_generation"] = _generation_recognizer_hash(local, built) == report["recognizer"]["sha256"] if built else None
    if reference is not None:
        report["leakage"]["reference_path"] = str(reference)

    files = write_report(report, out_dir)
    files.append(_first_identities_grid(dataset, labels, out_dir / "sample_grid.png", GRID_IDENTITIES, GRID_IMAGES))
    if built and write_card_section:
        _publish_to_folder(out_dir, files, local / built / ANALYSIS_DIR)
        card_path = local / "README.md"
        section = card_section(report, built, (out_dir / "summary.md").read_text(), [f.name for f in files], ANALYSIS_DIR)
        card = replace_card_section(card_path.read_text(), built, section)
        write_text_atomic(card_path, card)
    return report


def _generation_recognizer_hash(local: Path, built: str) -> str | None:
    try:
        generation = json.loads((local / built / "generation.json").read_text())
        return generation["provenance"]["components"]["recognizer"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _preset_hint(local: Path, built: str | None) -> str | None:
    if not built:
        return None
    try:
        preset = json.loads((local / built / "generation.json").read_text())["provenance"].get("preset")
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return f" (this dataset was built with the {preset!r} preset: pass --recognizer {preset})" if preset else None


# --- command line -----------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    report = analyze_dataset(
        args.dataset, args.config, recognizer=args.recognizer, reference=args.reference, out_dir=args.out,
        num_pairs=args.num_pairs, seed=args.seed, write_card_section=not args.no_card,
        batch_size=args.batch_size, cache_dir=args.cache_dir, progress=not args.no_progress,
    )
    intra, inter, verification = report["intra_class"], report["inter_class"], report["verification"]
    eer = "n/a" if verification["eer"] is None else f"{verification['eer']:.4f}"
    print(f"{report['num_images']} images, {report['num_identities']} identities: intra-class noise "
          f"{intra['fraction_below']:.2%}, inter-class noise {inter['fraction_above']:.2%}, EER {eer}")
    if report["recognizer"]["random_weights"]:
        print("note: random-weight recognizer; the numbers are for smoke runs only")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``analyze`` on an ``argparse`` subparsers object; ``args.run(args)`` returns the exit code."""
    a = subparsers.add_parser("analyze", help="face-recognition feature analysis of a dataset: report.json, summary, plots")
    a.add_argument("dataset", help="a folder built by `hsface build`, another image/label dataset folder, or a Hub dataset repo id")
    a.add_argument("--config", help="dataset config (e.g. tiny, 10k); optional when the folder holds one")
    a.add_argument("--recognizer", help="IResNet folder, official .pth, Vec2FacePipeline folder, or 'random-tiny' "
                                        "(default: the official ArcFace weights)")
    a.add_argument("--reference", help=".npy/.safetensors [R, 512] features (e.g. real identity centres) for the leakage check")
    a.add_argument("--out", help="output folder (default: <folder>/<config>/analysis for a built folder, else ./hsface-analysis/<config>)")
    a.add_argument("--num-pairs", type=int, default=100_000, help="genuine and impostor pairs sampled for EER/TAR (default 100000)")
    a.add_argument("--seed", type=int, default=0, help="seed of the pair sampling")
    a.add_argument("--batch-size", type=int, default=64, help="images per recognizer forward pass (default 64)")
    a.add_argument("--cache-dir", help=f"feature cache (default {DEFAULT_CACHE_DIR})")
    a.add_argument("--no-card", action="store_true", help="leave the dataset card of a built folder alone")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a.set_defaults(run=_run)
    return a
