"""``hsface analyze``: feature extraction and its cache, recognizer loading, outputs, and the card section."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from builder.analyze import (
    add_parser,
    analysis_sections,
    analyze_dataset,
    extract_features,
    load_recognizer,
    recognizer_hash,
    replace_card_section,
)
from vec2face_model.conventions import from_pil
from vec2face_model.models.iresnet import IResNet

NUM_IDS, PER_ID = 4, 5
PLOTS = ["intra_class_cosine.png", "max_neighbour_cosine.png", "separability_curve.png", "genuine_impostor.png"]
FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})


def tiny_recognizer(seed: int = 0) -> IResNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return IResNet(layers=[1, 1, 1, 1]).eval()


def face_like_images(num_ids=NUM_IDS, per_id=PER_ID, size=112, seed=0):
    """Each identity: a random base image plus small noise, so identities form feature clusters."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for identity in range(num_ids):
        base = rng.integers(0, 256, (size, size, 3))
        for _ in range(per_id):
            images.append(Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)))
            labels.append(10 + 3 * identity)
    return images, labels


def count_calls(model: torch.nn.Module) -> list:
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    return calls


def hsface_like_folder(root: Path, config: str = "tiny", built: bool = True, num_ids=NUM_IDS, per_id=PER_ID) -> Path:
    """A parquet dataset folder with a YAML ``configs:`` card; ``built`` adds ``<config>/generation.json``."""
    images, labels = face_like_images(num_ids, per_id)
    (root / config).mkdir(parents=True)
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=FEATURES).to_parquet(
        str(root / config / "train-00000-of-00001.parquet")
    )
    if built:
        (root / config / "generation.json").write_text(json.dumps({"config": config, "provenance": {"preset": "random-tiny"}}))
    (root / "README.md").write_text(
        f"---\nconfigs:\n- config_name: {config}\n  data_files:\n  - split: train\n    path: {config}/train-*.parquet\n---\n\n"
        "# HSFace\n\nIntro.\n\n## Citation\n\n```bibtex\n@x{y}\n```\n"
    )
    return root


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="hsface")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["analyze", *map(str, argv)])
    return args.run(args)


# --- extract_features ---------------------------------------------------------------------------


def test_extract_features_matches_the_recognizer_row_by_row_and_reuses_its_cache(tmp_path):
    images, labels = face_like_images(num_ids=3, per_id=2)
    dataset = datasets.Dataset.from_dict({"image": images, "label": labels}, features=FEATURES)
    model = tiny_recognizer()
    calls = count_calls(model)

    features, got_labels = extract_features(dataset, model, batch_size=4, cache_dir=tmp_path, progress=False)
    assert features.dtype == np.float32 and features.shape == (6, 512)
    assert got_labels.dtype == np.int64 and got_labels.tolist() == labels
    assert calls == [4, 2]  # batched, last batch partial
    with torch.inference_mode():
        expected = model(from_pil(images)).numpy()
    # batch composition changes float summation order; features are O(100), so compare at that scale
    np.testing.assert_allclose(features, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    cached = list(tmp_path.glob("*.npz"))
    assert [p.name for p in cached] == [f"{dataset._fingerprint}-{recognizer_hash(model)[:16]}.npz"]

    calls.clear()
    again, again_labels = extract_features(dataset, model, batch_size=4, cache_dir=tmp_path, progress=False)
    assert calls == [], "the second call must load the cache, not run the recognizer"
    np.testing.assert_array_equal(again, features)
    np.testing.assert_array_equal(again_labels, got_labels)

    other = tiny_recognizer(seed=1)  # other weights: another cache entry
    other_calls = count_calls(other)
    extract_features(dataset, other, batch_size=64, cache_dir=tmp_path, progress=False)
    assert other_calls == [6] and len(list(tmp_path.glob("*.npz"))) == 2


def test_extract_features_ignores_the_dataset_format_accepts_undecoded_images_and_restores_training_mode(tmp_path):
    images, labels = face_like_images(num_ids=2, per_id=2)
    dataset = datasets.Dataset.from_dict({"image": images, "label": labels}, features=FEATURES).with_format("torch")
    model = tiny_recognizer()
    decoded, _ = extract_features(dataset, model, cache_dir=tmp_path / "a", progress=False)
    model.train()
    raw, _ = extract_features(dataset.cast_column("image", datasets.Image(decode=False)), model, cache_dir=tmp_path / "b", progress=False)
    assert model.training
    np.testing.assert_array_equal(raw, decoded)  # same batches, eval-mode features despite train()


def test_extract_features_rejects_unaligned_images_string_labels_and_missing_columns(tmp_path):
    model = tiny_recognizer()
    small = datasets.Dataset.from_dict({"image": [Image.new("RGB", (64, 64))], "label": [0]}, features=FEATURES)
    with pytest.raises(ValueError, match="112x112"):
        extract_features(small, model, cache_dir=tmp_path, progress=False)
    named = datasets.Dataset.from_dict({"image": [Image.new("RGB", (112, 112))], "label": ["alice"]})
    with pytest.raises(TypeError, match="integer identity ids"):
        extract_features(named, model, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="'image' and 'label'"):
        extract_features(datasets.Dataset.from_dict({"img": [0], "label": [0]}), model, cache_dir=tmp_path, progress=False)
    assert not list(tmp_path.glob("*.npz"))


# --- load_recognizer ----------------------------------------------------------------------------


def test_load_recognizer_from_every_supported_source(tmp_path):
    preset = load_recognizer("random-tiny")  # == the preset pipeline's: see the builder-built test
    assert isinstance(preset, IResNet) and not preset.training
    preset.train()
    assert not load_recognizer("random-tiny").training, "each call returns its own copy"

    model = tiny_recognizer(seed=3)
    digest = recognizer_hash(model)
    model.save_pretrained(tmp_path / "iresnet")
    torch.save(model.state_dict(), tmp_path / "official.pth")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    model.save_pretrained(tmp_path / "pipe" / "recognizer")
    (tmp_path / "official" / "weights").mkdir(parents=True)
    torch.save(model.state_dict(), tmp_path / "official" / "weights" / "arcface-r100-glint360k.pth")
    for source in ("iresnet", "official.pth", "pipe", "official"):
        loaded = load_recognizer(tmp_path / source)
        assert recognizer_hash(loaded) == digest, source
        assert not loaded.training and loaded.config.layers == [1, 1, 1, 1]


def test_load_recognizer_errors_say_what_to_pass(tmp_path):
    from huggingface_hub import try_to_load_from_cache

    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_recognizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither an IResNet folder"):
        load_recognizer(tmp_path / "empty")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="without a recognizer"):
        load_recognizer(tmp_path / "pipe")
    if isinstance(try_to_load_from_cache("BooBooWu/Vec2Face", "weights/arcface-r100-glint360k.pth"), str):
        pytest.skip("the official ArcFace weights are in the local Hub cache")
    with pytest.raises(FileNotFoundError, match="--recognizer"):
        load_recognizer(None)  # the test session is offline (conftest)


# --- the card section ---------------------------------------------------------------------------


def test_replace_card_section_inserts_before_citation_once_and_replaces_in_place():
    card = "# Title\n\ntext\n\n## Citation\n\nbib\n"
    once = replace_card_section(card, "tiny", "## Analysis (`tiny`)\n\nv1\n")
    assert once.index("<!-- hsface-analyze:tiny:start -->") < once.index("## Citation")
    assert replace_card_section(once, "tiny", "## Analysis (`tiny`)\n\nv1\n") == once
    both = replace_card_section(once, "10k", "## Analysis (`10k`)\n\nw\n")
    updated = replace_card_section(both, "tiny", "## Analysis (`tiny`)\n\nv2\n")
    assert "v2" in updated and "v1" not in updated and "\nw\n" in updated
    assert updated.count("hsface-analyze:tiny:start") == 1 and updated.count("hsface-analyze:10k:end") == 1
    assert replace_card_section("# no citation\n", "tiny", "x").endswith("<!-- hsface-analyze:tiny:end -->\n")
    # a regenerated card gets its sections back
    sections = analysis_sections(updated)
    assert sorted(sections) == ["10k", "tiny"] and "v2" in sections["tiny"]
    rebuilt = card
    for config, body in sections.items():
        rebuilt = replace_card_section(rebuilt, config, body)
    assert analysis_sections(rebuilt) == sections and rebuilt.count("## Citation") == 1
    with pytest.raises(ValueError, match="remove the broken"):
        replace_card_section(card + "<!-- hsface-analyze:tiny:start -->\n", "tiny", "x")


# --- analyze_dataset end to end -------------------------------------------------------------------


def section_of(card: str, config: str = "tiny") -> str:
    return card.split(f"<!-- hsface-analyze:{config}:start -->")[1].split(f"<!-- hsface-analyze:{config}:end -->")[0]


def test_cli_on_a_built_folder_writes_report_plots_grid_and_one_card_section(tmp_path, monkeypatch):
    folder = hsface_like_folder(tmp_path / "hsface")
    cache = tmp_path / "cache"
    forward_calls = []
    original_forward = IResNet.forward
    monkeypatch.setattr(IResNet, "forward", lambda self, *a, **k: forward_calls.append(1) or original_forward(self, *a, **k))

    assert run_cli(folder, "--recognizer", "random-tiny", "--cache-dir", cache, "--no-progress", "--num-pairs", "50") == 0
    analysis = folder / "tiny" / "analysis"
    for name in ["report.json", "summary.md", "sample_grid.png", *PLOTS]:
        assert (analysis / name).is_file(), name
    for name in ["sample_grid.png", *PLOTS]:
        with Image.open(analysis / name) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
    with Image.open(analysis / "sample_grid.png") as grid:
        assert grid.size == (PER_ID * 112, NUM_IDS * 112)  # one row per identity, all 5 images

    report = json.loads((analysis / "report.json").read_text())
    assert report["num_images"] == 20 and report["num_identities"] == 4 and report["feature_dim"] == 512
    assert report["verification"]["num_genuine"] == 40 and report["verification"]["num_impostor"] == 50  # 150 available
    assert report["leakage"] is None
    assert report["dataset"]["config"] == "tiny" and report["recognizer"]["random_weights"] is True
    assert report["recognizer"]["same_as_generation"] is False  # this generation.json records no weights

    card = (folder / "README.md").read_text()
    section = section_of(card)
    assert "## Analysis (`tiny`)" in section and "Random-weight recognizer" in section
    assert "| Intra-class noise (cos < 0.3) |" in section
    links = [line.split("](")[1].rstrip(")") for line in section.splitlines() if line.startswith("![")]
    assert sorted(Path(link).name for link in links) == sorted(["sample_grid.png", *PLOTS])
    assert all((folder / link).is_file() for link in links)
    assert card.index("hsface-analyze:tiny:end") < card.index("## Citation") and card.startswith("---\nconfigs:")
    assert len(forward_calls) == 1 and len(list(cache.glob("*.npz"))) == 1

    # Second run with a reference set and an explicit --out: the cache is reused, the section is
    # regenerated (not appended), and the plots are copied next to the card.
    with np.load(next(cache.glob("*.npz"))) as cached:
        planted = cached["features"][cached["labels"] == 16].mean(axis=0, keepdims=True)  # identity 16 "leaks"
    np.save(tmp_path / "reference.npy", planted)
    out = tmp_path / "out"
    assert run_cli(folder, "--config", "tiny", "--recognizer", "random-tiny", "--reference", tmp_path / "reference.npy",
                   "--out", out, "--cache-dir", cache, "--no-progress") == 0
    assert len(forward_calls) == 1, "features must come from the cache"
    card = (folder / "README.md").read_text()
    assert card.count("<!-- hsface-analyze:tiny:start -->") == 1 and card.count("## Analysis (`tiny`)") == 1
    assert "Leakage (cos > 0.4)" in section_of(card) and "tiny/analysis/leakage.png" in section_of(card)
    assert (out / "leakage.png").is_file() and (analysis / "leakage.png").is_file()
    leak = json.loads((analysis / "report.json").read_text())["leakage"]
    assert leak["num_reference"] == 1 and 16 in leak["leaked_ids"]
    assert leak["leaked_max_cosines"][leak["leaked_ids"].index(16)] > 0.99

    # Third run without the reference: the stale leakage plot and its card lines go.
    assert run_cli(folder, "--recognizer", "random-tiny", "--cache-dir", cache, "--no-progress") == 0
    card = (folder / "README.md").read_text()
    assert card.count("## Analysis (`tiny`)") == 1 and "leakage" not in section_of(card).lower()
    assert not (analysis / "leakage.png").exists()


def test_analyze_dataset_on_a_plain_folder_leaves_its_card_alone(tmp_path):
    folder = hsface_like_folder(tmp_path / "plain", config="faces", built=False, num_ids=3, per_id=2)
    card_before = (folder / "README.md").read_text()
    model = tiny_recognizer()
    report = analyze_dataset(folder, "faces", recognizer=model, out_dir=tmp_path / "out", num_pairs=1000,
                             cache_dir=tmp_path / "cache", progress=False)
    assert (folder / "README.md").read_text() == card_before
    assert not (folder / "faces" / "analysis").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(["report.json", "summary.md", "sample_grid.png", *PLOTS])
    assert report["recognizer"]["random_weights"] is False and report["recognizer"]["sha256"] == recognizer_hash(model)
    assert report["num_images"] == 6 and report["num_identities"] == 3
    assert report["verification"]["num_genuine"] == 3 and report["verification"]["num_impostor"] == 12  # all pairs
    assert report["separability"]["counts"] == [3]


def test_same_named_folders_with_other_data_are_not_confused_by_the_datasets_cache(tmp_path):
    model = tiny_recognizer()
    counts = []
    for num_ids in (2, 3):  # same folder name and config, other data
        folder = hsface_like_folder(tmp_path / f"run{num_ids}" / "hsface", num_ids=num_ids, per_id=2)
        report = analyze_dataset(folder, "tiny", recognizer=model, out_dir=tmp_path / f"out{num_ids}",
                                 cache_dir=tmp_path / "cache", progress=False)
        counts.append((report["num_images"], report["num_identities"]))
    assert counts == [(4, 2), (6, 3)]


def test_analyze_dataset_without_recognizer_hints_at_the_preset_it_was_built_with(tmp_path):
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("BooBooWu/Vec2Face", "weights/arcface-r100-glint360k.pth"), str):
        pytest.skip("the official ArcFace weights are in the local Hub cache")
    folder = hsface_like_folder(tmp_path / "hsface")
    with pytest.raises(FileNotFoundError, match="pass --recognizer random-tiny"):
        analyze_dataset(folder, progress=False)


@pytest.mark.slow
def test_analyze_on_a_builder_built_tiny_folder(tmp_path):
    from builder.build import build
    from builder.config import get_config

    build(get_config("tiny", model="random-tiny"), tmp_path / "hsface", progress=False)
    folder = tmp_path / "hsface"
    for _ in range(2):
        assert run_cli(folder, "--config", "tiny", "--recognizer", "random-tiny", "--cache-dir", tmp_path / "cache", "--no-progress") == 0
    report = json.loads((folder / "tiny" / "analysis" / "report.json").read_text())
    assert report["num_images"] == 20 and report["num_identities"] == 4
    generation = json.loads((folder / "tiny" / "generation.json").read_text())
    # load_recognizer("random-tiny") is the recognizer the dataset was generated with
    assert report["recognizer"]["sha256"] == generation["provenance"]["components"]["recognizer"]["sha256"]
    assert report["recognizer"]["same_as_generation"] is True
    card = (folder / "README.md").read_text()
    assert card.count("<!-- hsface-analyze:tiny:start -->") == 1 and "## Config `tiny`" in card
    assert "guided the generation" in section_of(card)
    for name in PLOTS:
        assert (folder / "tiny" / "analysis" / name).is_file()
