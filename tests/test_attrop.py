"""AttrOP on toy differentiable 'models': it optimises, stops, is bounded and leaves weights alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vec2face_model.attrop import AttrOPConfig, attrop

DIM = 16


class ToyWorld(nn.Module):
    """A linear 'generator' plus linear 'recognizer', 'quality' and 'pose' heads on its images."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.decoder = nn.Linear(DIM, 3 * 4 * 4)
        self.recognizer = nn.Linear(3 * 4 * 4, DIM)
        self.pose = nn.Linear(3 * 4 * 4, 1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3

    def decode(self, vectors, sample_ids, iteration):
        noise = torch.stack([torch.randn(3 * 4 * 4, generator=torch.Generator().manual_seed(int(i) * 1000 + iteration)) for i in sample_ids])
        return torch.tanh(self.decoder(vectors) + 0.05 * noise).reshape(-1, 3, 4, 4)

    def identity(self, images):
        return self.recognizer(images.flatten(1))

    def quality(self, images):
        return self.identity(images).norm(dim=1)

    def yaw(self, images):
        return 90 * torch.tanh(self.pose(images.flatten(1)).squeeze(1))


def run(world, vectors, targets, **config):
    return attrop(vectors, targets, world.decode, world.identity, world.quality, world.yaw, AttrOPConfig(**config), models=[world])


def test_attrop_lowers_the_loss_and_meets_reachable_targets():
    world = ToyWorld()
    vectors = torch.randn(8, DIM, generator=torch.Generator().manual_seed(1))
    targets = world.identity(world.decode(vectors, torch.arange(8), 0)).detach()
    quality_now = world.quality(world.decode(vectors, torch.arange(8), 0)).detach()
    config = dict(target_yaw=20.0, target_quality=float(quality_now.mean()) * 1.2, max_steps=200, lr=0.05)

    def per_sample_loss(id_loss, quality, yaw):
        return 100 * id_loss + (config["target_quality"] - quality).clamp_min(0) + (20.0 - yaw.abs()).abs()

    initial = run(world, vectors, targets, **{**config, "max_steps": 1})  # measurement only, no step
    result = run(world, vectors, targets, **config)
    before = per_sample_loss(initial.id_loss, initial.quality, initial.yaw)
    after = per_sample_loss(result.id_loss, result.quality, result.yaw)
    assert after.mean() < 0.5 * before.mean()
    assert result.success.sum() >= 4
    ok = result.success
    assert (result.id_loss[ok] <= 0.3).all()
    assert ((20.0 - result.yaw[ok].abs()).abs() <= 5).all()
    assert (result.steps[ok] < 200).all()  # accepted samples left the batch early


def test_unreachable_targets_terminate_without_success():
    world = ToyWorld()
    vectors = torch.randn(4, DIM, generator=torch.Generator().manual_seed(2))
    result = run(world, vectors, vectors, target_yaw=None, target_quality=1e6, max_steps=7)
    assert not result.success.any()
    assert (result.steps == 7).all()
    assert len(result.loss_history) == 7
    assert result.images.shape == (4, 3, 4, 4)


def test_model_weights_never_change_and_get_no_gradients():
    world = ToyWorld()
    before = {k: v.clone() for k, v in world.state_dict().items()}
    vectors = torch.randn(4, DIM, generator=torch.Generator().manual_seed(3))
    run(world, vectors, vectors, target_yaw=45.0, max_steps=5)
    for key, value in world.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in world.parameters())
    assert all(p.requires_grad for p in world.parameters())  # restored after the run


def test_each_sample_trajectory_is_independent_of_the_batch():
    world = ToyWorld()
    vectors = torch.randn(5, DIM, generator=torch.Generator().manual_seed(4))
    targets = torch.randn(5, DIM, generator=torch.Generator().manual_seed(5))
    batch = run(world, vectors, targets, target_yaw=30.0, max_steps=12)

    def decode_as_sample_2(v, ids, it):  # the same sample alone keeps its own mask stream (id 2)
        return world.decode(v, ids + 2, it)

    alone = attrop(vectors[2:3], targets[2:3], decode_as_sample_2, world.identity, world.quality, world.yaw,
                   AttrOPConfig(target_yaw=30.0, max_steps=12), models=[world])
    torch.testing.assert_close(batch.vectors[2:3], alone.vectors, atol=1e-5, rtol=1e-5)
    assert batch.steps[2] == alone.steps[0]


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="max_steps"):
        AttrOPConfig(max_steps=0)
    with pytest.raises(ValueError, match="0..90"):
        AttrOPConfig(target_yaw=120)
    world = ToyWorld()
    v = torch.randn(2, DIM)
    with pytest.raises(ValueError, match="pose model"):
        attrop(v, v, world.decode, world.identity, world.quality, None, AttrOPConfig(target_yaw=60))


def test_quality_model_gets_no_backward_pass_while_every_sample_meets_the_quality_target():
    world = ToyWorld()
    vectors = torch.randn(6, DIM, generator=torch.Generator().manual_seed(3))
    targets = torch.randn(6, DIM, generator=torch.Generator().manual_seed(4))
    backward_calls = []

    def watched_quality(images):
        quality = world.quality(images)
        if quality.requires_grad:
            quality.register_hook(lambda grad: backward_calls.append(grad))
        return quality

    def steer(quality_fn, target_quality):
        config = AttrOPConfig(target_yaw=20.0, target_quality=target_quality, max_steps=5, lr=0.05)
        return attrop(vectors, targets, world.decode, world.identity, quality_fn, world.yaw, config, models=[world])

    met = steer(watched_quality, target_quality=-1.0)  # a norm is never below -1: the hinge is flat
    assert backward_calls == [] and met.steps.max() > 1
    # the same trajectories as with a quality measure that cannot pass any gradient at all
    detached = steer(lambda images: world.quality(images).detach(), target_quality=-1.0)
    assert torch.equal(met.vectors, detached.vectors)
    steer(watched_quality, target_quality=1e6)  # a shortfall everywhere: the quality gradient is used
    assert backward_calls and any(g.abs().sum() > 0 for g in backward_calls)


# -- the speed path: inference views of the real networks, precision checks --------------------------


@pytest.fixture(scope="module")
def tiny_pipe():
    from vec2face_model import Vec2FacePipeline

    return Vec2FacePipeline.from_preset("random-tiny", seed=0)


def test_inference_views_compute_the_same_function_and_leave_the_registered_weights_alone(tiny_pipe):
    from vec2face_model.weights import weights_sha256
    from vec2face_model.performance import inference_view

    networks = {name: getattr(tiny_pipe, name) for name in ("generator", "recognizer", "quality", "pose")}
    digests = {name: weights_sha256(m) for name, m in networks.items()}
    keys = {name: list(m.state_dict()) for name, m in networks.items()}
    views = {name: inference_view(m) for name, m in networks.items()}
    assert all(inference_view(m) is views[name] for name, m in networks.items())  # cached

    vectors = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))
    drop, masked = networks["generator"].draw_masks(3, torch.Generator().manual_seed(1))
    images = networks["generator"](vectors, token_drop_mask=drop, token_all_mask=masked).images
    torch.testing.assert_close(views["generator"](vectors, token_drop_mask=drop, token_all_mask=masked).images, images, rtol=1e-5, atol=1e-5)
    images = images.clamp(-1, 1).detach().requires_grad_(True)
    for name in ("recognizer", "quality"):
        expected, got = networks[name](images), views[name](images)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.detach().abs().max()))
        # The gradient AttrOP takes reaches the images alike. Compared as a whole: a PReLU input that
        # rounding moves across zero changes its slope, so single pixels may differ by a few percent.
        (expected_grad,), (got_grad,) = (torch.autograd.grad(out.norm(dim=1).sum(), images) for out in (expected, got))
        assert (got_grad - expected_grad).norm() <= 1e-2 * expected_grad.norm()
    torch.testing.assert_close(views["pose"].predict_euler(images), networks["pose"].predict_euler(images), rtol=1e-4, atol=1e-3)

    assert {name: weights_sha256(m) for name, m in networks.items()} == digests
    assert {name: list(m.state_dict()) for name, m in networks.items()} == keys
    copies = [views["recognizer"], views["quality"], views["pose"], views["generator"].im_decoder]  # the transformer is shared
    assert not any(p.requires_grad for copy in copies for p in copy.parameters())


def test_inference_view_follows_weight_changes_and_ignores_training_mode(tiny_pipe):
    import copy

    from vec2face_model.performance import inference_view

    recognizer = copy.deepcopy(tiny_pipe.recognizer)
    before = inference_view(recognizer)
    images = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        recognizer.fc.bias.add_(1.0)
        after = inference_view(recognizer)
        assert after is not before
        expected = recognizer(images)
        torch.testing.assert_close(after(images), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert inference_view(recognizer.train()) is recognizer


def test_steering_is_a_deterministic_function_of_its_inputs(tiny_pipe):
    identities = tiny_pipe.sample_identities(3, seed=4).vectors
    labels, index = torch.arange(3), torch.zeros(3, dtype=torch.long)
    config = AttrOPConfig(max_steps=2)
    first, second = (tiny_pipe.steer(identities, identities, labels, index, config, seed=7) for _ in range(2))
    assert torch.equal(first.vectors, second.vectors) and torch.equal(first.images, second.images)
    assert torch.equal(first.steps, second.steps)


def test_slow_precision_warns_and_the_speedup_is_measured(tiny_pipe, monkeypatch):
    from vec2face_model import performance

    assert performance.has_fast_kernels("fp32") and performance.warn_if_slow_precision("fp32")
    monkeypatch.setattr(performance, "cpu_flags", lambda: frozenset({"avx2", "fma"}))  # an AVX2-only CPU
    assert not performance.has_fast_kernels("bf16", "cpu")
    with pytest.warns(performance.SlowPrecisionWarning, match="bf16"):
        assert not performance.warn_if_slow_precision("bf16", "cpu")
    monkeypatch.setattr(performance, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert performance.has_fast_kernels("bf16", "cpu")
    with pytest.raises(ValueError, match="precision"):
        performance.has_fast_kernels("int8")

    measured = performance.measure_precision_speedup(tiny_pipe, "bf16", batch_size=2, repeats=1)
    assert measured.keys() == {"precision", "device", "batch_size", "native_kernels", "fp32_images_per_s", "images_per_s", "speedup"}
    assert measured["precision"] == "bf16" and measured["fp32_images_per_s"] > 0 and measured["images_per_s"] > 0
    assert measured["speedup"] == pytest.approx(measured["images_per_s"] / measured["fp32_images_per_s"], rel=1e-2)


def test_folded_batchnorm_copy_computes_the_same_features_and_leaves_the_model_alone(tiny_pipe):
    from vec2face_model.weights import weights_sha256
    from vec2face_model.models.iresnet import fold_batchnorm

    model = tiny_pipe.recognizer
    digest = weights_sha256(model)
    folded = fold_batchnorm(model)
    remaining = [name for name, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert remaining and all(name.endswith(".bn1") for name in remaining)  # only each block's leading BatchNorm stays
    images = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = model(images)
        torch.testing.assert_close(folded(images), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert weights_sha256(model) == digest and not any(p.requires_grad for p in folded.parameters())
