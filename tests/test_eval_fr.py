"""Verification recipe: protocol math on constructed scores, safe .bin reading, pairs folders, table, CLI."""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from recipes import eval_fr
from recipes.backbones import load_backbone
from recipes.eval_fr import embed_pairs, format_markdown, pair_similarities, results_to_json
from recipes.verification_sets import (
    PAPER_SETS,
    EncodedImages,
    VerificationFileError,
    VerificationSet,
    load_bin,
    load_pairs,
    load_sets,
)
from vec2face_model.conventions import uint8_to_tensor
from vec2face_model.verification import verification_metrics


def random_images(n: int, seed: int = 0, size: int = 112) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_bin(path, images: np.ndarray, issame, protocol=pickle.HIGHEST_PROTOCOL, as_bytearray=False):
    bins = [png_bytes(image) for image in images]
    if as_bytearray:
        bins = [bytearray(b) for b in bins]
    path.write_bytes(pickle.dumps((bins, list(issame)), protocol=protocol))
    return path


# -- embeddings ----------------------------------------------------------------------------------


def test_flip_sum_embedding_matches_manual_computation():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3 * 112 * 112, 8, generator=generator)

    def embed_fn(x):
        return x.flatten(1) @ weight

    images = random_images(7, seed=3)

    embeddings = embed_pairs(embed_fn, images, batch_size=3)

    x = uint8_to_tensor(images)
    manual = embed_fn(x) + embed_fn(x.flip(-1))
    manual = manual / manual.norm(dim=1, keepdim=True)
    torch.testing.assert_close(embeddings, manual, rtol=1e-5, atol=1e-5)
    unflipped = embed_pairs(embed_fn, images, batch_size=3, flip=False)
    torch.testing.assert_close(unflipped, torch.nn.functional.normalize(embed_fn(x), dim=1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unflipped, embeddings, atol=1e-3)


def test_embed_pairs_checks_embed_fn_output():
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        embed_pairs(lambda x: x.mean(dim=(1, 2, 3)), random_images(2))


def test_pair_similarities_pairs_consecutive_rows():
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(pair_similarities(embeddings), torch.tensor([1.0, 0.0]))


def test_evaluate_recovers_identities_with_an_oracle_embedding(tmp_path):
    # Identity = the image's mean colour channel; a perfect embedding of it separates every pair.
    rng = np.random.default_rng(5)
    identities = rng.integers(0, 3, 40)
    images = np.zeros((40, 112, 112, 3), np.uint8)
    images[np.arange(40), :, :, identities] = 200
    issame = identities[0::2] == identities[1::2]
    sets = {"lfw": VerificationSet("lfw", images, issame)}

    results = eval_fr.evaluate(lambda x: x.mean(dim=(2, 3)), sets, batch_size=16, n_folds=5)

    assert results["lfw"]["accuracy"] == 1.0 and results["lfw"]["num_pairs"] == 20


# -- files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol,as_bytearray", [(pickle.HIGHEST_PROTOCOL, False), (2, False), (2, True), (4, True)])
def test_bin_round_trip(tmp_path, protocol, as_bytearray):
    images = random_images(6, seed=1)
    issame = [True, False, True]
    path = write_bin(tmp_path / "agedb_30.bin", images, issame, protocol=protocol, as_bytearray=as_bytearray)

    loaded = load_bin(path)

    assert loaded.name == "agedb_30" and loaded.num_pairs == 3
    assert loaded.issame.tolist() == issame
    np.testing.assert_array_equal(np.asarray(loaded.images), images)
    np.testing.assert_array_equal(loaded.images[3], images[3])
    np.testing.assert_array_equal(loaded.images[-1], images[5])


def test_bin_written_by_python2_style_pickle_reads_as_bytes(tmp_path):
    # Python 2 wrote its str (= bytes) as BINSTRING, which Python 3 cannot emit; write the opcodes
    # by hand. Only encoding="bytes" reads them back as bytes instead of failing to decode ASCII.
    image = random_images(2, seed=2)
    data = [png_bytes(a) for a in image]
    ops = bytearray(b"\x80\x02]q\x00(")
    for blob in data:
        ops += b"T" + len(blob).to_bytes(4, "little") + blob  # BINSTRING
    ops += b"e]q\x01\x88a\x86q\x02."  # APPENDS, list [True], TUPLE2, STOP
    path = tmp_path / "lfw.bin"
    path.write_bytes(bytes(ops))

    loaded = load_bin(path)

    np.testing.assert_array_equal(np.asarray(loaded.images), image)
    assert loaded.issame.tolist() == [True]


class _Payload:
    """Pickles as a call to os.system; unpickling it with plain pickle runs the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def malicious_bin(marker, where: str) -> bytes:
    payload = _Payload(f"mkdir {shlex.quote(str(marker))}")
    bins = [png_bytes(a) for a in random_images(2)]
    content = {"top": payload, "images": ([bins[0], payload], [True]), "labels": (bins, [payload])}[where]
    return pickle.dumps(content, protocol=2)


@pytest.mark.parametrize("where", ["top", "images", "labels"])
def test_malicious_bin_is_rejected_without_running_anything(tmp_path, where):
    marker = tmp_path / "pwned"
    path = tmp_path / "lfw.bin"
    path.write_bytes(malicious_bin(marker, where))

    with pytest.raises(VerificationFileError, match="refusing to load global 'posix.system'|refusing to load global 'nt.system'"):
        load_bin(path)
    assert not marker.exists()

    # Control: plain pickle does run such a file, so the check above is not vacuous.
    control = tmp_path / "control"
    pickle.loads(malicious_bin(control, where))
    assert control.is_dir()


def test_numpy_bin_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "cplfw.bin"
    path.write_bytes(pickle.dumps(([np.frombuffer(png_bytes(random_images(1)[0]), np.uint8)] * 2, [True])))
    with pytest.raises(VerificationFileError, match="numpy arrays are not accepted"):
        load_bin(path)


@pytest.mark.parametrize(
    "content,match",
    [
        ([b"x"], "expected a pickled pair"),
        (([b"a", b"b"], [True, False]), "two images per pair"),
        (([b"a", "b"], [True]), "expected encoded bytes"),
        (([b"a", b"b"], [2]), "expected a bool"),
        (([b"not an image", b"x"], [True]), "not a readable image"),
    ],
)
def test_malformed_bin_contents_are_rejected(tmp_path, content, match):
    path = tmp_path / "x.bin"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(VerificationFileError, match=match):
        load_bin(path)


def test_truncated_bin_is_rejected(tmp_path):
    path = write_bin(tmp_path / "x.bin", random_images(2), [True])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(VerificationFileError, match="not a readable"):
        load_bin(path)


def test_wrong_size_is_refused_unless_resize(tmp_path):
    images = random_images(2, size=96)
    path = write_bin(tmp_path / "calfw.bin", images, [False])
    with pytest.raises(ValueError, match="align"):
        load_bin(path)
    resized = np.asarray(load_bin(path, resize=True).images)
    assert resized.shape == (2, 112, 112, 3) and resized.dtype == np.uint8


def test_folder_with_pairs_file(tmp_path):
    images = random_images(4, seed=4)
    (tmp_path / "a").mkdir()
    names = ["a/0.png", "a/1.png", "b.png", "c.jpg"]
    for name, image in zip(names, images):
        Image.fromarray(image).save(tmp_path / name, quality=100)
    (tmp_path / "pairs.txt").write_text("# header\na/0.png a/1.png 1\n\nb.png c.jpg 0\n")

    loaded = load_pairs(tmp_path / "pairs.txt", name="mine")

    assert loaded.name == "mine" and loaded.issame.tolist() == [True, False]
    decoded = np.asarray(loaded.images)
    np.testing.assert_array_equal(decoded[:3], images[:3])
    np.testing.assert_array_equal(decoded[3], np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB")))  # lossy


def test_pairs_file_errors(tmp_path):
    Image.fromarray(random_images(1)[0]).save(tmp_path / "x.png")
    (tmp_path / "pairs.txt").write_text("x.png x.png yes\n")
    with pytest.raises(ValueError, match=r"pairs.txt:1: expected 'path_a path_b 0\|1'"):
        load_pairs(tmp_path / "pairs.txt")
    (tmp_path / "pairs.txt").write_text("x.png missing.png 1\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_pairs(tmp_path / "pairs.txt")


def test_encoded_images_slicing(tmp_path):
    images = random_images(3, seed=6)
    encoded = EncodedImages([png_bytes(a) for a in images])
    assert encoded[1:].shape == (2, 112, 112, 3) and encoded[5:].shape == (0, 112, 112, 3)
    with pytest.raises(IndexError):
        encoded[3]


def test_load_sets_finds_bin_and_pairs_folders_and_skips_missing(tmp_path):
    write_bin(tmp_path / "lfw.bin", random_images(2), [True])
    (tmp_path / "cfp_fp").mkdir()
    for name, image in zip(["p.png", "q.png"], random_images(2, seed=9)):
        Image.fromarray(image).save(tmp_path / "cfp_fp" / name)
    (tmp_path / "cfp_fp" / "pairs.txt").write_text("p.png q.png 0\n")

    sets = load_sets(tmp_path)

    assert list(sets) == ["lfw", "cfp_fp"]
    assert sets["cfp_fp"].name == "cfp_fp" and sets["cfp_fp"].issame.tolist() == [False]


# -- table ---------------------------------------------------------------------------------------


def test_table_with_a_missing_set():
    accuracies = {"lfw": 0.99517, "cfp_fp": 0.9, "agedb_30": 0.93333, "calfw": 0.94}
    results = {key: {"accuracy": value} for key, value in accuracies.items()}

    markdown = format_markdown(results, label="hsface-10k")
    summary = results_to_json(results, label="hsface-10k")

    header, rule, row = markdown.splitlines()[:3]
    assert header == "| Model | LFW | CFP-FP | CPLFW | AgeDB-30 | CALFW | Avg |"
    average = np.mean([99.517, 90.0, 93.333, 94.0])
    assert row == f"| hsface-10k | 99.52 | 90.00 | – | 93.33 | 94.00 | {average:.2f} |"
    assert "Avg is over 4 of 5 sets; missing (–): CPLFW." in markdown
    assert summary["table"] == {"LFW": 99.52, "CFP-FP": 90.0, "CPLFW": None, "AgeDB-30": 93.33, "CALFW": 94.0, "Avg": round(average, 2)}
    assert summary["missing"] == ["CPLFW"] and summary["average_over"] == ["LFW", "CFP-FP", "AgeDB-30", "CALFW"]
    json.dumps(summary)


def test_table_with_all_sets_has_no_note():
    results = {key: {"accuracy": 0.5} for key in PAPER_SETS}
    markdown = format_markdown(results)
    assert len(markdown.splitlines()) == 3 and markdown.endswith("| 50.00 | 50.00 |")


# -- CLI -----------------------------------------------------------------------------------------


def test_cli_with_a_tiny_saved_iresnet(tmp_path):
    from vec2face_model.models.iresnet import IResNet

    model_dir = tmp_path / "tiny-iresnet"
    IResNet(layers=[1, 1, 1, 1], num_features=16).eval().save_pretrained(model_dir)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_bin(data_dir / "lfw.bin", random_images(20, seed=8), [i % 2 == 0 for i in range(10)])
    out = tmp_path / "results.json"

    eval_fr.main(["--model", str(model_dir), "--data-dir", str(data_dir), "--sets", "lfw", "cfp_fp",
                  "--batch-size", "8", "--device", "cpu", "--out", str(out)])

    summary = json.loads(out.read_text())
    assert summary["model"] == "tiny-iresnet"
    assert summary["metrics"]["lfw"]["num_pairs"] == 10 and len(summary["metrics"]["lfw"]["thresholds"]) == 10
    assert 0 <= summary["table"]["LFW"] <= 100 and summary["table"]["CFP-FP"] is None
    assert "cfp_fp" not in summary["metrics"]


def test_load_backbone_reads_official_weights_file(tmp_path):
    from vec2face_model.models.iresnet import IResNet

    model = IResNet(layers=[1, 1, 1, 1], num_features=16).eval()
    path = tmp_path / "official.pth"
    torch.save(model.state_dict(), path)

    loaded = load_backbone(path)

    assert not loaded.training and loaded.config.num_features == 16
    x = uint8_to_tensor(random_images(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_cli_evaluates_a_vit_exported_by_train_fr(tmp_path):
    # train_fr writes every backbone this way (<output_dir>/backbone and each checkpoint): a ViT too
    from recipes.backbones import build_backbone, export_backbone

    kwargs = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    torch.manual_seed(0)
    vit = build_backbone("vit_s", 16, kwargs).eval()
    export_backbone(vit, tmp_path / "backbone", "vit_s", 16, kwargs)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    images, issame = random_images(20, seed=9), [i % 2 == 0 for i in range(10)]
    write_bin(data_dir / "lfw.bin", images, issame)

    summary = eval_fr.main(["--model", str(tmp_path / "backbone"), "--data-dir", str(data_dir), "--sets", "lfw",
                            "--batch-size", "4", "--device", "cpu"])

    expected = embed_pairs(vit, images, batch_size=4)
    sim = pair_similarities(expected)
    assert summary["metrics"]["lfw"]["num_pairs"] == 10
    assert summary["metrics"]["lfw"]["accuracy"] == verification_metrics(sim, np.array(issame))["accuracy"]
