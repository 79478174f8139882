"""recipes/train_vec2face.py and recipes/vec2face_losses.py: objective terms, config, data, and real runs.

The runs use a tiny generator, a tiny recognizer and a random-trunk LPIPS on a handful of
random-pattern 112x112 images, offline on CPU: two gloo processes (accelerate launch) for the
GAN switch, exact resume and the saved pipeline; one in-process run for the overfit check.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recipes import train_vec2face as tv
from recipes.config import save_config
from recipes import vec2face_losses as vl
from vec2face_model.conventions import from_pil
from vec2face_model.errors import InvalidInputError
from vec2face_model.models.discriminator import PatchDiscriminator
from vec2face_model.models.generator import TRAINING_MASK_RATIO, Vec2Face
from vec2face_model.models.iresnet import IResNet

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BASE_TERMS = ("pixel", "lpips", "ssim", "token", "identity")


# -- shared tiny data --------------------------------------------------------------------------------


def _face_like_images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:112, 0:112]
    images = []
    for i in range(count):
        base = rng.integers(40, 216, size=(1, 1, 3))
        pattern = (np.sin(xx / (3 + i)) * 50 + np.cos(yy / (5 + i)) * 50)[..., None]
        array = np.clip(base + pattern + rng.normal(0, 8, (112, 112, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(array))
    return images


def _tiny_recognizer(images: list[Image.Image]) -> IResNet:
    """A random tiny IResNet whose output BatchNorm is calibrated on the images, so features have
    ArcFace-like norms (~20) instead of the huge ones of an uncalibrated random network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = IResNet(layers=[1, 1, 1, 1], num_features=512).eval()
    with torch.no_grad():
        fc_out = model(from_pil(images), return_intermediates=True).fc_out
    model.features.running_mean.copy_(fc_out.mean(0))
    model.features.running_var.copy_(fc_out.var(0) + 1e-3)
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """8 PNGs as an imagefolder dataset, the same images as parquet, and a saved tiny recognizer."""
    root = tmp_path_factory.mktemp("vec2face_train")
    images = _face_like_images(8)
    folder = root / "faces"
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"{i:03d}.png")
    recognizer = _tiny_recognizer(images)
    recognizer.save_pretrained(root / "recognizer")
    return types.SimpleNamespace(root=root, images=images, folder=folder, recognizer_dir=root / "recognizer", recognizer=recognizer)


@pytest.fixture
def reset_accelerate():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


# -- SSIM --------------------------------------------------------------------------------------------


def _direct_ssim(x, y, size=11, sigma=1.5, data_range=1.0):
    """SSIM with an explicit 2-D window over every valid position (no separable convolution)."""
    taps = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    window = torch.outer(taps, taps) / taps.sum() ** 2
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    px = x.double().unfold(2, size, 1).unfold(3, size, 1)
    py = y.double().unfold(2, size, 1).unfold(3, size, 1)

    def avg(t):
        return (t * window).sum((-1, -2))

    mx, my = avg(px), avg(py)
    vx, vy, cov = avg(px * px) - mx**2, avg(py * py) - my**2, avg(px * py) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean((1, 2, 3))


def test_ssim_matches_direct_definition_and_known_values():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 20, generator=g)
    y = (x + 0.2 * torch.randn(2, 3, 24, 20, generator=g)).clamp(0, 1)
    ours = vl.ssim(x, y)
    assert ours.shape == (2,)
    torch.testing.assert_close(ours.double(), _direct_ssim(x, y), rtol=0, atol=2e-6)
    torch.testing.assert_close(vl.ssim(x, x), torch.ones(2))
    # constant images: the structure term is C2/C2 = 1, luminance (2ab + C1) / (a² + b² + C1)
    a, b, c1 = 0.3, 0.7, 0.01**2
    const = vl.ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    # (float32 E[x²]−μ² leaves ~1e-8 of variance noise against C2 = 9e-4, hence the tolerance)
    assert const.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=2e-4)
    with pytest.raises(ValueError, match="smaller than"):
        vl.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_ssim_is_differentiable():
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    y = torch.rand(1, 3, 16, 16)
    (1 - vl.ssim(x, y)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# -- LPIPS -------------------------------------------------------------------------------------------


def test_lpips_random_trunk_matches_the_lpips_package():
    import lpips

    ours = vl.build_lpips(random_backbone=True, seed=3)
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training
    # the package's own construction (lin heads from its v0.1 file), given our random trunk
    reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    reference.load_state_dict({k: v for k, v in ours.state_dict().items() if k.startswith("net.")}, strict=False)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 112, 112, generator=g) * 2 - 1, torch.rand(2, 3, 112, 112, generator=g) * 2 - 1
    loss = vl.PerceptualLoss(ours)
    torch.testing.assert_close(loss(x, y), reference(x, y).flatten())
    loss.train()
    assert not loss.lpips.training  # the LPIPS heads' dropout never switches on


def test_lpips_loads_a_local_vgg16_file_and_explains_a_missing_one(tmp_path, monkeypatch):
    skeleton = vl.build_lpips(random_backbone=True).state_dict()
    g = torch.Generator().manual_seed(0)
    vgg = {}
    for slice_index, (start, stop) in enumerate(vl.LPIPS_VGG_SLICES, start=1):
        for layer in range(start, stop):
            for param in ("weight", "bias"):
                key = f"net.slice{slice_index}.{layer}.{param}"
                if key in skeleton:
                    vgg[f"features.{layer}.{param}"] = torch.randn(skeleton[key].shape, generator=g)
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files carry the classifier too: ignored
    torch.save(vgg, tmp_path / "vgg16.pth")
    model = vl.build_lpips(vgg_weights=tmp_path / "vgg16.pth")
    torch.testing.assert_close(model.state_dict()["net.slice3.12.weight"], vgg["features.12.weight"])

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    with pytest.raises(vl.LPIPSWeightsError, match="--lpips_vgg_weights"):
        vl.build_lpips()


# -- objective ---------------------------------------------------------------------------------------


def _fake_output(batch=2, width=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(batch, 3, 112, 112, generator=g) * 2 - 1).requires_grad_()
    tokens = torch.randn(batch, 50, width, generator=g, requires_grad=True)
    gt_tokens = torch.randn(batch, 50, width, generator=g)
    return types.SimpleNamespace(images=images, tokens=tokens, gt_tokens=gt_tokens)


def test_official_weights_and_weighted_total(tiny_data):
    assert vl.LossWeights() == vl.LossWeights(pixel=1.0, lpips=0.2, ssim=0.1, token=1.0, identity=1.0, gan=1.0)
    weights = vl.LossWeights(pixel=1.0, lpips=0.2, ssim=0.1, token=0.5, identity=2.0, gan=0.3)
    perceptual = vl.PerceptualLoss(vl.build_lpips(random_backbone=True))
    objective = vl.Vec2FaceObjective(weights, tiny_data.recognizer, perceptual)
    out = _fake_output()
    real = torch.rand(2, 3, 112, 112) * 2 - 1
    features = torch.randn(2, 512) * 20
    disc = PatchDiscriminator(dims=[16, 32])
    losses = objective.generator_losses(out, real, features, discriminator=disc)
    assert set(losses.terms) == set(vl.TERM_NAMES)
    expected = sum(getattr(weights, name) * value for name, value in losses.terms.items())
    torch.testing.assert_close(losses.total, expected)
    torch.testing.assert_close(losses.terms["pixel"], (out.images - real).pow(2).mean())
    torch.testing.assert_close(losses.terms["ssim"], 1 - vl.ssim((out.images + 1) / 2, (real + 1) / 2).mean())
    torch.testing.assert_close(losses.terms["gan"], -disc(out.images).mean())
    cos = torch.nn.functional.cosine_similarity(features, tiny_data.recognizer(out.images))
    torch.testing.assert_close(losses.terms["identity"], (1 - cos).mean())
    # the token loss ignores token 0 (the identity token)
    shifted = types.SimpleNamespace(images=out.images, tokens=out.tokens.detach().clone(), gt_tokens=out.gt_tokens)
    shifted.tokens[:, 0] += 100
    torch.testing.assert_close(vl.token_loss(shifted.tokens, shifted.gt_tokens), losses.terms["token"])
    # without a discriminator there is no GAN term
    assert "gan" not in objective.generator_losses(out, real, features).terms


def test_gan_terms():
    real, fake = torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)
    assert vl.discriminator_lsgan_loss(real, fake).item() == 0.0
    assert vl.discriminator_lsgan_loss(fake, real).item() == pytest.approx(1.0)  # 0.5·(1 + 1)
    assert vl.generator_gan_loss(torch.full((2, 1, 3, 3), 0.25)).item() == pytest.approx(-0.25)
    # one batched discriminator call equals separate calls (GroupNorm normalises per sample)
    disc = PatchDiscriminator(dims=[16, 32])
    x, y = torch.randn(2, 3, 112, 112), torch.randn(2, 3, 112, 112)
    separate = vl.discriminator_lsgan_loss(disc(x), disc(y))
    torch.testing.assert_close(vl.Vec2FaceObjective.discriminator_loss(disc, x, y), separate, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("leak", [False, True])
def test_generator_gan_gradient_reaches_the_discriminator_only_with_the_official_leak(leak):
    weights = vl.LossWeights(pixel=1.0, lpips=0.0, ssim=0.0, token=0.0, identity=0.0, gan=1.0)
    objective = vl.Vec2FaceObjective(weights, None, official_gan_gradient_leak=leak)
    disc = PatchDiscriminator(dims=[16, 32])
    out = _fake_output()
    losses = objective.generator_losses(out, torch.zeros(2, 3, 112, 112), torch.randn(2, 512), discriminator=disc)
    losses.total.backward()
    assert out.images.grad is not None and out.images.grad.abs().sum() > 0
    disc_grads = [p.grad for p in disc.parameters()]
    if leak:
        assert all(g is not None for g in disc_grads) and sum(g.abs().sum() for g in disc_grads) > 0
    else:
        assert all(g is None for g in disc_grads)
    assert all(p.requires_grad for p in disc.parameters())  # frozen only while the term was computed


def test_adaptive_gan_weight_is_the_vqgan_gradient_ratio():
    last = torch.nn.Parameter(torch.ones(3))
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    weight = vl.adaptive_gan_weight((last * a).sum(), (last * b).sum(), last, disc_weight=0.8)
    assert weight.item() == pytest.approx(0.8 * 5.0 / (1.0 + 1e-4))


# -- config --------------------------------------------------------------------------------------------


def test_presets_overrides_and_strict_cli(tmp_path, capsys):
    default = tv.TrainConfig()
    assert default.mask_ratio == TRAINING_MASK_RATIO == (0.5, 0.75, 0.25, 1.0)
    assert default.loss_weights == vl.LossWeights()
    assert default.official_gan_gradient_leak is False and default.adam_betas == (0.9, 0.99) and default.weight_decay == 0.01
    # lr scaling: documented /256 by default, the official code's /112 in the paper preset
    assert default.peak_lr(128) == pytest.approx(4e-5 * 128 / 256)
    assert tv.parse_config(["--config=paper"]).peak_lr(128) == pytest.approx(4.5714e-5, rel=1e-4)
    assert tv.parse_config(["--lr=0.01"]).peak_lr(999) == 0.01

    config = tv.parse_config(["--config=tiny", "--disc_dims=8,16", "--ema_decay=0.99", "--resume=none",
                              "--official_gan_gradient_leak=true", "--adam_betas=[0.5, 0.9]", "--max_samples=3"])
    assert config.generator_arch == "tiny" and config.disc_dims == (8, 16) and config.ema_decay == 0.99
    assert config.official_gan_gradient_leak is True and config.adam_betas == (0.5, 0.9) and config.max_samples == 3
    assert config.resume is None
    # the resolved config round-trips through JSON (what --config=<run>/config.json reads)
    save_config(config, tmp_path / "config.json")
    assert tv.parse_config([f"--config={tmp_path / 'config.json'}"]) == config

    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['lr_scale'\]; valid fields: dataset, .*lr_scale_divisor"):
        tv.parse_config(["--lr_scale=112"])
    for bad, message in [
        (["--epochs=1.5"], "expected an int"),
        (["--gan_adaptive_weight=maybe"], "true or false"),
        (["--features=lmdb"], "features must be one of"),
        (["--mask_ratio_min=0.9", "--mask_ratio_max=0.5"], "mask_ratio_min <= mask_ratio_max"),
        (["--warmup_epochs=100"], "warmup_epochs"),
        (["--config=nope"], "neither a preset"),
        (["epochs=3"], "--field=value"),
        (["--loss_pixel=0", "--loss_lpips=0", "--loss_ssim=0", "--loss_token=0", "--loss_identity=0", "--loss_gan=0"], "all loss weights are zero"),
        (["--loss_ssim=-1"], "loss weight ssim"),
    ]:
        with pytest.raises(ValueError, match=message):
            tv.parse_config(bad)
    with pytest.raises(SystemExit) as exited:
        tv.main(["--bogus=1"])
    assert exited.value.code == 2 and "valid fields" in capsys.readouterr().err


def test_learning_rate_warmup_then_cosine():
    config = tv.TrainConfig(epochs=10, warmup_epochs=2.0, min_lr=1e-6)
    steps_per_epoch, peak = 5, 1e-3
    lrs = [tv.learning_rate(s, steps_per_epoch, config, peak) for s in range(50)]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(peak / 2)  # linear warm-up from 0 (per iteration)
    assert lrs[10] == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then monotone decay
    assert lrs[30] == pytest.approx(1e-6 + (peak - 1e-6) * 0.5)  # half-way through the cosine
    assert tv.learning_rate(50, steps_per_epoch, config, peak) == pytest.approx(1e-6)


def test_epoch_batches_split_one_permutation_across_ranks():
    per_rank = [tv.epoch_batches(11, 2, 2, rank, seed=0, epoch=3) for rank in range(2)]
    assert [len(b) for b in per_rank] == [2, 2]  # 11 // (2·2) steps, remainder dropped
    used = [i for step in range(2) for rank in range(2) for i in per_rank[rank][step]]
    assert len(set(used)) == 8 and set(used) <= set(range(11))
    assert per_rank[0] == tv.epoch_batches(11, 2, 2, 0, seed=0, epoch=3)  # keyed, reproducible
    assert per_rank[0] != tv.epoch_batches(11, 2, 2, 0, seed=0, epoch=4)


# -- data ------------------------------------------------------------------------------------------------


def test_identity_features_are_cached_by_fingerprint(tiny_data, tmp_path):
    import datasets

    datasets.Dataset.from_dict({"image": tiny_data.images[:4], "label": [0, 0, 1, 1]}).cast_column(
        "image", datasets.Image()
    ).to_parquet(str(tmp_path / "train.parquet"))
    config = tv.TrainConfig(dataset=str(tmp_path))
    ds = tv.load_training_dataset(config)
    assert len(ds) == 4 and "label" in ds.column_names

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, images):
            self.calls += 1
            return self.inner(images)

    counting = Counting(tiny_data.recognizer)
    first = tv.add_identity_features(ds, counting, "image", "identity_feature", 2, "cpu")
    assert counting.calls == 2
    again = tv.add_identity_features(tv.load_training_dataset(config), counting, "image", "identity_feature", 2, "cpu")
    assert counting.calls == 2  # served from the datasets cache
    expected = tiny_data.recognizer(from_pil(tiny_data.images[:4]))
    assert again.features["identity_feature"].feature.dtype == "float32"
    torch.testing.assert_close(torch.tensor(np.asarray(again["identity_feature"], dtype=np.float32)), expected, rtol=1e-4, atol=1e-4)
    assert first["identity_feature"] == again["identity_feature"]
    # another recognizer gets its own cache entry
    other = Counting(_tiny_recognizer(tiny_data.images[4:]))
    tv.add_identity_features(ds, other, "image", "identity_feature", 2, "cpu")
    assert other.calls == 2

    with pytest.raises(ValueError, match="no image column 'img'"):
        tv.load_training_dataset(tv.TrainConfig(dataset=str(tmp_path), image_column="img"))


# -- training --------------------------------------------------------------------------------------------


def _tiny_parts(config, scaler=None):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        generator = tv.build_generator(config).train()
        disc = tv.build_discriminator(config).train()
    tv._freeze_unused_generator_parts(generator)
    recognizer = _tiny_recognizer(_face_like_images(2))
    objective = vl.Vec2FaceObjective(config.loss_weights, recognizer, None)
    adamw = dict(lr=1e-3, betas=config.adam_betas, weight_decay=config.weight_decay)
    return tv.TrainingParts(
        config=config, device=torch.device("cpu"), rank=0, autocast=contextlib.nullcontext,
        generator=generator, generator_module=generator, discriminator=disc, discriminator_module=disc, recognizer=recognizer,
        objective=objective, g_optimizer=torch.optim.AdamW([p for p in generator.parameters() if p.requires_grad], **adamw),
        d_optimizer=torch.optim.AdamW(list(disc.parameters()), **adamw), scaler=scaler,
    )


def test_loss_scaling_with_two_optimizers_unscales_before_clipping():
    # fp16 on CUDA scales the loss; scaling by a power of two and unscaling before clipping must give
    # exactly the unscaled update for both optimizers (the scaler is stepped by hand for two of them).
    config = tv.parse_config(["--config=tiny", "--loss_lpips=0", "--grad_clip=0.5"])
    batch = {"pixel_values": from_pil(_face_like_images(2, seed=5))}
    plain, scaled = _tiny_parts(config), _tiny_parts(config, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
    with torch.random.fork_rng(devices=[]):
        record = tv.train_step(plain, batch, step=0, gan_on=True)
    with torch.random.fork_rng(devices=[]):
        record_scaled = tv.train_step(scaled, batch, step=0, gan_on=True)
    assert record["grad_norm_generator"] > 0.5 and record["grad_norm_discriminator"] > 0  # clipping was active
    assert record == pytest.approx(record_scaled)
    for a, b in [(plain.generator, scaled.generator), (plain.discriminator, scaled.discriminator)]:
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_fp16_autocast_with_grad_scaler_skips_overflowing_steps_and_then_trains():
    # The real fp16 path (CPU autocast supports float16): a loss scale past float16's range makes the
    # scaled gradients inf, so both optimizers must skip the step (weights untouched) and the scale
    # must back off; at a sane scale the next step updates both models with finite losses.
    config = tv.parse_config(["--config=tiny", "--loss_lpips=0"])
    batch = {"pixel_values": from_pil(_face_like_images(2, seed=5))}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    parts = _tiny_parts(config, scaler=scaler)
    parts.autocast = lambda: torch.autocast("cpu", dtype=torch.float16)
    before = [p.detach().clone() for p in parts.g_params + parts.d_params]
    with torch.random.fork_rng(devices=[]):
        tv.train_step(parts, batch, step=0, gan_on=True)
    assert scaler.get_scale() == 2.0**39  # one backoff (factor 0.5) after the overflow
    assert all(torch.equal(p, q) for p, q in zip(parts.g_params + parts.d_params, before))  # step skipped

    scaler.update(new_scale=2.0**8)
    with torch.random.fork_rng(devices=[]):
        record = tv.train_step(parts, batch, step=1, gan_on=True)
    assert all(math.isfinite(v) for v in record.values())
    changed = [not torch.equal(p, q) for p, q in zip(parts.g_params + parts.d_params, before)]
    assert any(changed[: len(parts.g_params)]) and any(changed[len(parts.g_params) :])
    assert scaler.get_scale() == 2.0**8  # no overflow: the scale stays until growth_interval steps


def test_online_features_equal_precomputed_ones():
    # features=online: batches carry no "features" and the step embeds the images with the frozen
    # recognizer; the update must be the one a cached/column feature of the same recognizer gives.
    config = tv.parse_config(["--config=tiny", "--loss_lpips=0", "--features=online"])
    images = from_pil(_face_like_images(2, seed=7))
    online, precomputed = _tiny_parts(config), _tiny_parts(config)
    with torch.no_grad():
        features = precomputed.recognizer(images).float()
    with torch.random.fork_rng(devices=[]):
        record = tv.train_step(online, {"pixel_values": images}, step=3, gan_on=False)
    with torch.random.fork_rng(devices=[]):
        record_precomputed = tv.train_step(precomputed, {"pixel_values": images, "features": features}, step=3, gan_on=False)
    assert record == pytest.approx(record_precomputed)
    for (name, p), q in zip(online.generator.named_parameters(), precomputed.generator.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    # and a different feature gives a different update: the step really uses the features it is given
    other = _tiny_parts(config)
    with torch.random.fork_rng(devices=[]):
        record_other = tv.train_step(other, {"pixel_values": images, "features": features.flip(0)}, step=3, gan_on=False)
    assert record_other["loss"] != pytest.approx(record["loss"])


def test_gradient_checkpointing_flag_and_unsupported_model_error(monkeypatch):
    assert tv.parse_config(["--gradient-checkpointing"]).gradient_checkpointing is True  # bare flag, either spelling
    assert tv.parse_config(["--gradient_checkpointing=false"]).gradient_checkpointing is False
    generator = tv.build_generator(tv.parse_config(["--config=tiny"]))
    monkeypatch.setattr(type(generator), "_supports_gradient_checkpointing", False, raising=False)
    with pytest.raises(InvalidInputError, match="does not support gradient checkpointing"):
        tv.enable_gradient_checkpointing(generator)


@pytest.mark.skipif(not getattr(Vec2Face, "_supports_gradient_checkpointing", False),
                    reason="needs Vec2Face gradient checkpointing (vec2face_model/models/generator.py)")
def test_gradient_checkpointing_gives_the_same_training_step():
    config = tv.parse_config(["--config=tiny", "--loss_lpips=0", "--gradient_checkpointing"])
    batch = {"pixel_values": from_pil(_face_like_images(2, seed=6))}
    plain, checkpointed = _tiny_parts(config), _tiny_parts(config)
    tv.enable_gradient_checkpointing(checkpointed.generator_module)
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.generator_module.modules())
    with torch.random.fork_rng(devices=[]):
        record = tv.train_step(plain, batch, step=0, gan_on=True)
    with torch.random.fork_rng(devices=[]):
        record_checkpointed = tv.train_step(checkpointed, batch, step=0, gan_on=True)
    assert record == pytest.approx(record_checkpointed, rel=1e-5)
    for (name, p), q in zip(plain.generator.named_parameters(), checkpointed.generator.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def test_overfit_run_in_process_lowers_the_loss(tiny_data, tmp_path, reset_accelerate):
    import datasets

    # two images with precomputed features in a parquet dataset (features=column)
    images = tiny_data.images[:2]
    features = tiny_data.recognizer(from_pil(images)).numpy()
    datasets.Dataset.from_dict({"image": images, "identity_feature": list(features)}).cast_column(
        "image", datasets.Image()
    ).to_parquet(str(tmp_path / "data" / "train.parquet"))
    config = tv.parse_config([
        "--config=tiny", f"--dataset={tmp_path / 'data'}", f"--recognizer={tiny_data.recognizer_dir}",
        f"--output_dir={tmp_path / 'run'}", "--features=column", "--epochs=12", "--gan_start_epoch=100",
        "--lr=2e-3", "--save_every_epochs=100",
    ])
    with torch.random.fork_rng(devices=[]):
        before = torch.rand(3)
    result = tv.train(config)
    with torch.random.fork_rng(devices=[]):
        after = torch.rand(3)
    assert torch.equal(before, after)  # the caller's RNG state is left alone
    losses = [entry["loss"] for entry in result.history]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-4:]) < 0.93 * np.mean(losses[:4]), losses
    assert all(not entry["gan_active"] for entry in result.history)
    assert (result.output_dir / "checkpoints" / "step-00000012" / "trainer_state.json").exists()
    saved = json.loads((result.output_dir / "config.json").read_text())
    assert tv.TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}) == config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two_processes(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(PROJECT_ROOT / "recipes" / "train_vec2face.py"), *args,
    ]
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_two_processes_gan_switch_exact_resume_and_pipeline(tiny_data, tmp_path):
    from safetensors.torch import load_file

    from vec2face_model.pipeline_vec2face import Vec2FacePipeline

    # 8 images, 2 processes x 2 = 4 per step -> 2 steps per epoch; GAN from epoch 0.5 = the 2nd step
    common = [
        "--config=tiny", f"--dataset={tiny_data.folder}", f"--recognizer={tiny_data.recognizer_dir}", "--epochs=3",
        "--gan_start_epoch=0.5", "--max_steps=3", "--save_every_steps=2", "--keep_checkpoints=5",
    ]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    _launch_two_processes([*common, f"--output_dir={run_a}"])
    log_a = _log(run_a)
    assert [e["step"] for e in log_a] == [1, 2, 3]
    assert [e["gan_active"] for e in log_a] == [False, True, True]
    for entry in log_a:
        terms = BASE_TERMS + (("gan", "disc") if entry["gan_active"] else ())
        assert all(math.isfinite(entry[f"loss_{t}"]) for t in terms), entry
        assert entry["gan_weight"] == (1.0 if entry["gan_active"] else 0.0)
    assert "loss_gan" not in log_a[0] and "loss_disc" not in log_a[0]

    # resume from A's step-2 checkpoint (the discriminator has stepped once): the next step and the
    # final weights are exactly A's
    _launch_two_processes([*common, f"--output_dir={run_b}", f"--resume={run_a / 'checkpoints' / 'step-00000002'}"])
    log_b = _log(run_b)
    assert [e["step"] for e in log_b] == [3]
    for entry_a, entry_b in zip(log_a[2:], log_b):
        assert {k: v for k, v in entry_a.items() if k != "seconds"} == {k: v for k, v in entry_b.items() if k != "seconds"}
    weights_a = load_file(str(run_a / "pipeline" / "generator" / "diffusion_pytorch_model.safetensors"))
    weights_b = load_file(str(run_b / "pipeline" / "generator" / "diffusion_pytorch_model.safetensors"))
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    # ... and differ from the step-2 weights (training did move them)
    step2 = load_file(str(run_a / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert not torch.equal(step2["im_decoder.conv_out.weight"], weights_a["im_decoder.conv_out.weight"])

    # the saved pipeline loads and decodes; it carries the recognizer used for training
    pipe = Vec2FacePipeline.from_pretrained(str(run_a / "pipeline"))
    assert isinstance(pipe.generator, Vec2Face) and isinstance(pipe.recognizer, IResNet)
    torch.testing.assert_close(pipe.recognizer.fc.weight, tiny_data.recognizer.fc.weight)
    out = pipe(identity_vectors=torch.randn(1, 512) * 20, images_per_identity=2, output_type="pt", progress=False)
    assert out.images.shape == (2, 3, 112, 112) and torch.isfinite(out.images).all()
    assert json.loads((run_a / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())["num_processes"] == 2
