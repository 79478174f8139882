"""FR training recipe: margin-head math, config/CLI, data pipeline, and 2-process CPU runs with resume."""

from __future__ import annotations

import io
import json
import math
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recipes import margin_head
from recipes.backbones import build_backbone, export_backbone, load_backbone
from recipes.config import config_to_dict
from recipes.fr_checkpoints import check_resumable, find_latest_checkpoint
from recipes.fr_data import FaceAugment, TrainData, count_classes, decode_face, epoch_indices, load_face_dataset
from recipes.margin_head import ShardedMarginHead, arcface_logits, init_class_centres, shard_range
from recipes.train_fr import PRESETS, TrainConfig, learning_rate, parameter_groups, parse_config

ROOT = Path(__file__).resolve().parents[1]
NUM_IDS, PER_ID = 8, 6


def _plain_arcface_loss(embeddings, weight, labels, scale, margin):
    """The textbook single-device ArcFace softmax cross-entropy, written independently of the head."""
    cosine = F.normalize(embeddings) @ F.normalize(weight).T
    theta = torch.acos(cosine.clamp(-1 + 1e-7, 1 - 1e-7))
    target = F.one_hot(labels, weight.shape[0]).bool()
    logits = scale * torch.where(target, torch.cos(theta + margin), cosine)
    return F.cross_entropy(logits, labels), (cosine.argmax(1) == labels).float().mean()


# -- margin head ---------------------------------------------------------------------------------


def test_world_size_one_equals_plain_arcface_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(12, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 10, (12,), generator=generator)
    head = ShardedMarginHead(16, 10, scale=64.0, margin=0.5, seed=3)
    out = head(embeddings, labels)
    out.loss.backward()

    reference_embeddings = embeddings.detach().clone().requires_grad_()
    reference_weight = head.weight.detach().clone().requires_grad_()
    loss, accuracy = _plain_arcface_loss(reference_embeddings, reference_weight, labels, 64.0, 0.5)
    loss.backward()
    torch.testing.assert_close(out.loss, loss, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(embeddings.grad, reference_embeddings.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(head.weight.grad, reference_weight.grad, atol=1e-6, rtol=1e-5)
    assert out.accuracy == accuracy


def test_arcface_margin_moves_only_the_target_logit():
    cosine = torch.tensor([[0.5, 0.2, -0.1], [0.3, 0.9, 0.0]])
    logits = arcface_logits(cosine, torch.tensor([0, -1]), scale=2.0, margin=0.3)
    expected = 2 * cosine.clone()
    expected[0, 0] = 2 * math.cos(math.acos(0.5) + 0.3)
    torch.testing.assert_close(logits, expected)


class _ThreadCollectives:
    """A ``torch.distributed`` stand-in for ranks that are threads of this process (ops in lockstep).

    Reductions add in rank order. The real gloo path runs in the 2-process training tests below.
    """

    ReduceOp = torch.distributed.ReduceOp

    def __init__(self, world_size: int):
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.slots = [None] * world_size
        self.local = threading.local()

    def get_rank(self) -> int:
        return self.local.rank

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.slots[self.local.rank] = tensor.detach().clone()
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()  # all have read before the next exchange overwrites
        return values

    def all_reduce(self, tensor: torch.Tensor, op=torch.distributed.ReduceOp.SUM) -> None:
        stacked = torch.stack(self._exchange(tensor))
        tensor.copy_(stacked.amax(0) if op == self.ReduceOp.MAX else stacked.sum(0))

    def all_gather(self, chunks: list[torch.Tensor], tensor: torch.Tensor) -> None:
        for chunk, value in zip(chunks, self._exchange(tensor)):
            chunk.copy_(value)


def _run_shards(world_size: int, fn) -> list:
    """``fn(rank)`` on one thread per rank; re-raises the first failure."""
    results, errors = [None] * world_size, []

    def target(rank):
        collectives.local.rank = rank
        try:
            results[rank] = fn(rank)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            errors.append(err)
            collectives.barrier.abort()

    collectives = margin_head.dist
    threads = [threading.Thread(target=target, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_head_equals_the_unsharded_head(monkeypatch, world_size):
    monkeypatch.setattr(margin_head, "dist", _ThreadCollectives(world_size))
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(world_size * 5, 16, generator=generator)
    labels = torch.randint(0, 11, (world_size * 5,), generator=generator)

    def shard(rank):
        local = embeddings[rank * 5 : (rank + 1) * 5].clone().requires_grad_()
        head = ShardedMarginHead(16, 11, rank=rank, world_size=world_size, seed=3)
        out = head(local, labels[rank * 5 : (rank + 1) * 5])
        out.loss.backward()
        return out, local.grad, head

    shards = _run_shards(world_size, shard)
    full = ShardedMarginHead(16, 11, seed=3)
    torch.testing.assert_close(torch.cat([h.weight.detach() for _, _, h in shards]), full.weight.detach(), atol=0, rtol=0)
    reference = embeddings.clone().requires_grad_()
    out = full(reference, labels)
    out.loss.backward()
    for shard_out, _, _ in shards:  # the same global loss and accuracy on every rank
        torch.testing.assert_close(shard_out.loss.detach(), out.loss.detach(), atol=1e-5, rtol=1e-6)
        assert shard_out.accuracy == out.accuracy
    scale = float(full.weight.grad.abs().max())
    torch.testing.assert_close(torch.cat([h.weight.grad for _, _, h in shards]), full.weight.grad, atol=1e-5 * scale, rtol=0)
    # Embedding gradients come back times world_size: DDP then averages them over the ranks.
    scale = float(reference.grad.abs().max())
    torch.testing.assert_close(torch.cat([g for _, g, _ in shards]) / world_size, reference.grad, atol=1e-5 * scale, rtol=0)


def test_negative_sampling_keeps_every_positive_and_is_keyed():
    head = ShardedMarginHead(8, 100, sample_rate=0.1, seed=1)
    local_labels = torch.tensor([3, 3, 50, 97])
    index = head._sample_classes(local_labels, step=5)
    assert len(index) == 10 and set(local_labels.tolist()) <= set(index.tolist())
    assert torch.equal(index, head._sample_classes(local_labels, step=5))
    assert not torch.equal(index, head._sample_classes(local_labels, step=6))
    # The sampled loss is the plain loss over the sampled columns.
    embeddings = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    out = head(embeddings, local_labels, step=5)
    loss, _ = _plain_arcface_loss(embeddings, head.weight.detach()[index], torch.searchsorted(index, local_labels), 64.0, 0.5)
    torch.testing.assert_close(out.loss.detach(), loss, atol=1e-5, rtol=1e-6)


def test_shards_and_initial_centres_do_not_depend_on_world_size():
    assert [shard_range(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    full = init_class_centres(9000, 4, 0, 9000, seed=5)  # spans three init chunks
    parts = [init_class_centres(9000, 4, *shard_range(9000, 3, r), seed=5) for r in range(3)]
    assert torch.equal(torch.cat(parts), full)
    with pytest.raises(ValueError, match="world_size"):
        shard_range(2, 4, 0)


def test_head_rejects_out_of_range_labels_and_bad_shapes():
    head = ShardedMarginHead(8, 5)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        head(torch.randn(2, 8), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="embeddings"):
        head(torch.randn(2, 7), torch.tensor([0, 1]))


# -- config and CLI -------------------------------------------------------------------------------


def test_defaults_are_the_paper_recipe_and_presets_are_valid():
    config = parse_config([])
    assert config == parse_config(["--config=paper"]) == TrainConfig()
    assert (config.backbone, config.margin_scale, config.margin, config.embedding_size) == ("se_iresnet50", 64.0, 0.5, 512)
    assert (config.lr, config.momentum, config.weight_decay, config.epochs) == (0.1, 0.9, 5e-4, 26)
    assert config.lr_milestones == (12, 20, 24) and config.batch_size == 128 and config.erasing_prob > 0
    for name in PRESETS:
        parse_config(["--config", name])


def test_cli_overrides_are_typed_and_strict():
    config = parse_config(["--config=tiny", "--epochs=5", "--hflip=false", "--lr_milestones=2,4",
                           "--backbone_kwargs={\"depth\": 2}", "--max_identities=none", "--margin=0.3"])
    assert config.epochs == 5 and config.hflip is False and config.lr_milestones == (2, 4)
    assert config.backbone_kwargs == {"depth": 2} and config.max_identities is None and config.margin == 0.3
    assert parse_config(["--epochs", "5"]) == parse_config(["--epochs=5"])  # argparse's two spellings
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['epoch'\]; valid fields: dataset, "):  # no abbreviations
        parse_config(["--epoch=5"])
    with pytest.raises(ValueError, match="int"):
        parse_config(["--epochs=1.5"])
    with pytest.raises(ValueError, match="neither a preset"):
        parse_config(["--config=no_such_preset"])


def test_config_validation_names_the_field():
    for overrides, match in [({"batch_size": 0}, "batch_size"), ({"backbone": "resnet9"}, "backbone"),
                             ({"sample_rate": 0.0}, "sample_rate"), ({"lr_milestones": (20, 12)}, "lr_milestones"),
                             ({"mixed_precision": "fp8"}, "mixed_precision"), ({"eval_every": 10}, "eval_data_dir"),
                             ({"eval_hook": "no_colon"}, "eval_hook")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**overrides)
    with pytest.raises(TypeError, match="epochs"):
        TrainConfig(epochs="26")


def test_config_json_round_trip(tmp_path):
    config = parse_config(["--config=tiny", "--lr_milestones=1,2", "--dataset=x"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config_to_dict(config)))
    assert parse_config([f"--config={path}"]) == config
    path.write_text(json.dumps({"epochs": 3, "bogus": 1}))
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['bogus'\]; valid fields: dataset, dataset_config"):
        parse_config([f"--config={path}"])


def test_learning_rate_schedule():
    config = TrainConfig()
    # linear scaling: 0.1 per 128 images of global batch
    assert learning_rate(config, 0, 0, world_size=4) == pytest.approx(0.4)
    # the official trainer lowers the lr when `epoch + 1 in [12, 20, 24]`
    lrs = [learning_rate(config, 0, epoch, world_size=1) for epoch in (10, 11, 18, 19, 22, 23, 25)]
    assert lrs == pytest.approx([0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4])
    warm = TrainConfig(warmup_steps=10)
    assert learning_rate(warm, 4, 0, 1) == pytest.approx(0.05) and learning_rate(warm, 50, 0, 1) == pytest.approx(0.1)


def test_backbones_and_weight_decay_groups():
    vit = build_backbone("vit_s", 32, {"embed_dim": 32, "depth": 1, "num_heads": 2})
    assert vit(torch.zeros(2, 3, 112, 112)).shape == (2, 32)
    with torch.device("meta"):
        se = build_backbone("se_iresnet50", 512)
    assert se.config.se_mode == "shortcut_first" and list(se.config.layers) == [3, 4, 14, 3]
    groups = parameter_groups(se, torch.nn.Linear(2, 2), weight_decay=5e-4)
    norm_params = {id(p) for n, p in se.named_parameters() if "bn" in n or "downsample.1" in n or n.startswith("features")}
    assert {id(p) for p in groups[1]["params"]} == norm_params - {id(se.features.weight)}  # frozen, so left out
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == groups[2]["weight_decay"] == 5e-4
    assert not any(id(p) in norm_params for p in groups[0]["params"])


@pytest.mark.parametrize("name, kwargs", [("iresnet18", {"dropout": 0.0}),
                                          ("vit_s", {"embed_dim": 32, "depth": 1, "num_heads": 2})])
def test_every_backbone_exports_and_rebuilds_for_eval(tmp_path, name, kwargs):
    torch.manual_seed(0)
    backbone = build_backbone(name, 32, kwargs).eval()
    export_backbone(backbone, tmp_path / name, name, 32, kwargs)
    assert json.loads((tmp_path / name / "backbone_config.json").read_text())["backbone"] == name
    probe = torch.linspace(-1, 1, 2 * 3 * 112 * 112).reshape(2, 3, 112, 112)
    loaded = load_backbone(tmp_path / name)
    assert not loaded.training and torch.equal(loaded(probe), backbone(probe))


def test_resume_checks_name_the_problem(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step-00000004"
    checkpoint.mkdir(parents=True)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        check_resumable(checkpoint, world_size=1)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 4, "world_size": 2}))
    with pytest.raises(ValueError, match="before train_fr checkpointed through accelerate"):
        check_resumable(checkpoint, world_size=2)  # the hand-rolled format had backbone/ instead
    (checkpoint / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="--num_processes 2"):
        check_resumable(checkpoint, world_size=1)
    assert check_resumable(checkpoint, world_size=2)["step"] == 4
    (tmp_path / "checkpoints" / "step-00000008.incomplete").mkdir()  # an interrupted save is never "latest"
    assert find_latest_checkpoint(tmp_path) == checkpoint


# -- data -----------------------------------------------------------------------------------------


def _write_toy_dataset(directory: Path) -> Path:
    """8 identities x 6 JPEGs: a class-specific 7x7 colour layout plus per-image noise (learnable)."""
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    rows = []
    for label in range(NUM_IDS):
        layout = np.kron(rng.integers(0, 256, (7, 7, 3)), np.ones((16, 16, 1))).astype(int)
        for _ in range(PER_ID):
            pixels = np.clip(layout + rng.integers(-20, 21, layout.shape), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            PILImage.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            rows.append({"image": {"bytes": buffer.getvalue(), "path": None}, "label": label})
    table = Dataset.from_list(rows, features=Features({"image": Image(), "label": Value("int64")}))
    (directory / "data").mkdir(parents=True)
    table.to_parquet(str(directory / "data" / "train-00000-of-00001.parquet"))
    return directory


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory) -> Path:
    return _write_toy_dataset(tmp_path_factory.mktemp("toy"))


def test_augmentation_is_keyed_and_leaves_the_global_rng_alone(toy_dataset):
    table = load_face_dataset(str(toy_dataset))
    image = decode_face(table[0]["image"])
    assert image.shape == (3, 112, 112) and image.dtype == torch.uint8
    augment = FaceAugment()
    state = torch.get_rng_state()
    first, again, other = augment(image, 1), augment(image, 1), augment(image, 2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.dtype == torch.float32 and first.min() >= -1 and first.max() <= 1


def test_subsets_ranks_and_resume_positions(toy_dataset):
    table = load_face_dataset(str(toy_dataset), max_identities=6)
    assert len(table) == 6 * PER_ID and count_classes(table, None) == 6 and count_classes(table, 6) == 6
    plain = FaceAugment(hflip=False, randaugment_ops=0, erasing_prob=0)
    ranks = [TrainData(table, plain, batch_size=3, rank=r, world_size=2, seed=0) for r in range(2)]
    assert ranks[0].steps_per_epoch == 6
    epoch = [list(r.batches(epoch=1)) for r in ranks]
    labels = torch.cat([b[1] for r in epoch for b in r])
    order = epoch_indices(len(table), 1, seed=0)[:36]
    assert sorted(labels.tolist()) == sorted(np.asarray(table["label"])[order.numpy()].tolist())
    resumed = list(ranks[1].batches(epoch=1, start_step=4))
    assert len(resumed) == 2 and torch.equal(resumed[0][0], epoch[1][4][0])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TrainData(table, plain, batch_size=32, world_size=2)


# -- training runs (subprocesses) -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_command(processes: int, *args: str) -> list[str]:
    script = str(ROOT / "recipes" / "train_fr.py")
    if processes == 1:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), script, *args]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


def probe_eval_hook(backbone: torch.nn.Module, step: int) -> dict:
    """The eval hook of run A: deterministic, and reports the mode it was called in."""
    return {"eval/probe_norm": float(backbone(torch.zeros(2, 3, 112, 112)).norm(dim=1).mean()),
            "eval/in_train_mode": backbone.training, "eval/grad_enabled": torch.is_grad_enabled()}


def _check(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    if process.returncode != 0:
        raise AssertionError(f"training failed ({process.returncode}):\n{output[-4000:]}")


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r}


@pytest.fixture(scope="module")
def runs(toy_dataset, tmp_path_factory):
    """A: 2 processes, 18 steps; B: resumed from A mid-epoch (step 9); C: 1 process, same global batch."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--config=tiny", f"--dataset={toy_dataset}"]
    start = lambda processes, *args: subprocess.Popen(_train_command(processes, *common, *args), env=_env(), cwd=root,
                                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_a = start(2, f"--output_dir={root / 'a'}", "--checkpoint_every=9", "--eval_every=9",
                  "--eval_hook=test_train_fr:probe_eval_hook")
    run_c = start(1, f"--output_dir={root / 'c'}", "--batch_size=8", "--checkpoint_every=1000")
    _check(run_a)
    _check(run_c)
    _check(start(2, f"--output_dir={root / 'b'}", f"--resume={root / 'a' / 'checkpoints' / 'step-00000009'}"))
    return {name: root / name for name in "abc"}


@pytest.mark.slow
def test_two_process_training_learns(runs):
    losses = _losses(runs["a"])
    assert sorted(losses) == list(range(1, 19))  # 3 epochs of 48 images / (2 x 4)
    first_epoch, last_epoch = np.mean([losses[s] for s in range(1, 7)]), np.mean([losses[s] for s in range(13, 19)])
    assert last_epoch < 0.8 * first_epoch, losses


@pytest.mark.slow
def test_head_shards_differ_per_rank_and_are_checkpointed(runs):
    from safetensors import safe_open

    checkpoint = runs["a"] / "checkpoints" / "step-00000018"
    shards = []
    for rank in range(2):
        with safe_open(str(checkpoint / f"head-rank{rank:03d}.safetensors"), "pt") as f:
            shards.append((f.metadata(), f.get_tensor("weight")))
            # each rank's own SGD momentum of its centres (accelerate saves the main process' optimizer only)
            assert f.get_tensor("optimizer.momentum_buffer").shape == (4, 32)
    assert [(m["class_start"], m["class_end"], m["num_classes"]) for m, _ in shards] == [("0", "4", "8"), ("4", "8", "8")]
    assert shards[0][1].shape == shards[1][1].shape == (4, 32)
    assert not torch.allclose(shards[0][1], shards[1][1])
    initial = init_class_centres(8, 32, 0, 8, seed=TrainConfig().seed)
    assert not torch.allclose(torch.cat([w for _, w in shards]), initial)  # trained
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 18
    assert parse_config([f"--config={checkpoint / 'config.json'}"]) == parse_config([f"--config={runs['a'] / 'config.json'}"])
    assert find_latest_checkpoint(runs["a"]) == checkpoint
    # Both the checkpoint (DDP-wrapped names) and the final export rebuild the ViT for eval_fr.
    probe = torch.linspace(-1, 1, 3 * 112 * 112).reshape(1, 3, 112, 112)
    from_checkpoint, exported = load_backbone(checkpoint), load_backbone(runs["a"] / "backbone")
    assert not from_checkpoint.training and from_checkpoint(probe).shape == (1, 32)
    assert torch.equal(from_checkpoint(probe), exported(probe))


@pytest.mark.slow
def test_eval_hook_runs_every_n_steps_in_eval_mode(runs):
    records = [r for r in map(json.loads, (runs["a"] / "log.jsonl").read_text().splitlines()) if "eval/probe_norm" in r]
    assert [r["step"] for r in records] == [9, 18]
    assert not any(r["eval/in_train_mode"] or r["eval/grad_enabled"] for r in records)
    assert records[0]["eval/probe_norm"] != records[1]["eval/probe_norm"]


@pytest.mark.slow
def test_resume_continues_bit_identically(runs):
    from safetensors.torch import load_file

    uninterrupted, resumed = _losses(runs["a"]), _losses(runs["b"])
    assert sorted(resumed) == list(range(10, 19))
    assert resumed == {step: uninterrupted[step] for step in resumed}  # exact floats
    for name in ("head-rank000.safetensors", "head-rank001.safetensors", "model.safetensors"):
        a = load_file(str(runs["a"] / "checkpoints" / "step-00000018" / name))
        b = load_file(str(runs["b"] / "checkpoints" / "step-00000018" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    # Same images, order and augmentation; the sharded head and DDP averaging give the same updates.
    two, one = _losses(runs["a"]), _losses(runs["c"])
    assert sorted(one) == sorted(two)
    np.testing.assert_allclose([one[s] for s in sorted(one)], [two[s] for s in sorted(two)], rtol=1e-4)
