"""Vec2Face generator: parity with the official code's outputs, official key layout, masks, round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vec2face_model.models.generator import (
    INFERENCE_MASK_RATIO,
    TRAINING_MASK_RATIO,
    Vec2Face,
    draw_token_masks,
    masks_from_noise,
    truncated_normal_ppf,
)

from conftest import assert_state_dict_matches_manifest

# The fixture generator's sizes (fixtures/meta.json); heads cannot be inferred from weights.
FIXTURE_HEADS = dict(num_heads=4, decoder_num_heads=4)
TINY = dict(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
            image_decoder_channels=32, z_channels=32)


@pytest.fixture(scope="module")
def fixture_model_and_io(request):
    from conftest import reference_file

    state_dict = load_file(reference_file("fixtures/generator_state_dict.safetensors"))
    io = load_file(reference_file("fixtures/generator_io.safetensors"))
    return Vec2Face.from_official(state_dict, **FIXTURE_HEADS), io


def test_from_official_infers_fixture_config(fixture_model_and_io, reference):
    model, _ = fixture_model_and_io
    meta = json.loads(reference("fixtures/meta.json").read_text())["generator"]
    kwargs, dd = meta["kwargs"], meta["im_decoder_ddconfig"]
    assert model.config.embed_dim == kwargs["embed_dim"]
    assert model.config.depth == kwargs["depth"]
    assert model.config.decoder_depth == kwargs["decoder_depth"]
    assert model.config.image_decoder_channels == dd["ch"]
    assert list(model.config.image_decoder_channel_mult) == dd["ch_mult"]
    assert model.config.image_decoder_num_res_blocks == dd["num_res_blocks"]
    assert model.config.z_channels == dd["z_channels"]
    assert sum(p.numel() for p in model.parameters()) == meta["num_params"]
    assert not model.training


def test_fixture_outputs_match_official(fixture_model_and_io):
    model, io = fixture_model_and_io
    captured = {}
    hooks = [
        (model.token_emb, "enc.token_emb_out"),
        (model.blocks[0], "enc.block0_out"),
        (model.blocks[1], "enc.block1_out"),
        (model.decoder_embed, "dec.decoder_embed_out"),
        (model.decoder_blocks[0], "dec.block0_out"),
        (model.im_decoder.conv_in, "imdec.conv_in_out"),
        (model.im_decoder.mid.block_1, "imdec.mid_block_1_out"),
        (model.im_decoder.mid.block_2, "imdec.mid_block_2_out"),
        (model.im_decoder.up[4].block[0], "imdec.up4_block0_out"),
        (model.im_decoder.up[4].upsample, "imdec.up4_upsample_out"),
        (model.im_decoder.up[3].block[0], "imdec.up3_block0_out"),  # the nin_shortcut quirk
    ]
    handles = [m.register_forward_hook(lambda _m, _i, out, key=key: captured.__setitem__(key, out)) for m, key in hooks]
    try:
        with torch.no_grad():
            out = model(io["input.rep"], token_drop_mask=io["mask.token_drop_mask"], token_all_mask=io["mask.token_all_mask"])
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(out.gt_tokens, io["enc.gt_indices"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.latent, io["enc.latent"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.tokens, io["dec.logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.image_latents, io["dec.decoder_proj"], atol=1e-5, rtol=1e-5)
    for key, value in captured.items():
        torch.testing.assert_close(value, io[key], atol=1e-4 if key.startswith("imdec") else 1e-5, rtol=1e-4, msg=key)
    torch.testing.assert_close(out.images, io["image"], atol=1e-4, rtol=1e-4)


def test_official_mask_rule_reproduces_fixture_masks(fixture_model_and_io):
    _, io = fixture_model_and_io
    drop, masked = masks_from_noise(io["mask.noise"], num_dropped=5, num_masked=18)
    assert torch.equal(drop, io["mask.token_drop_mask"])
    assert torch.equal(masked, io["mask.token_all_mask"])


def test_mask_ratio_distribution_matches_scipy_truncnorm(reference):
    # scipy's truncnorm.rvs = ppf(uniform) with numpy's legacy stream; the official code seeds 5000 here.
    draws = load_file(reference("fixtures/misc_io.safetensors"))["maskratio.draws"]
    uniforms = torch.from_numpy(np.random.RandomState(5000).uniform(size=len(draws)))
    torch.testing.assert_close(truncated_normal_ppf(uniforms, INFERENCE_MASK_RATIO), draws.double(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("ratio", [INFERENCE_MASK_RATIO, TRAINING_MASK_RATIO])
def test_drawn_masks_follow_the_official_layout(ratio):
    drop, masked = draw_token_masks(64, ratio, torch.Generator().manual_seed(0))
    assert drop.shape == masked.shape == (64, 50)
    assert not drop[:, 0].any() and not masked[:, 0].any()  # identity token never dropped or masked
    assert (drop.sum(1) == np.ceil(49 * ratio[0])).all()
    assert ((masked - drop) >= 0).all()  # masked is a superset of dropped
    counts = masked.sum(1)
    assert (counts == counts[0]).all()  # one ratio per batch with a single generator, as officially
    assert np.ceil(49 * ratio[0]) <= counts[0] <= 49


def test_mask_sampling_is_reproducible_and_per_sample_generators_are_batch_independent():
    a = draw_token_masks(3, rng=torch.Generator().manual_seed(7))
    b = draw_token_masks(3, rng=torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = draw_token_masks(3, rng=gens([10, 11, 12]))
    alone = draw_token_masks(1, rng=gens([11]))
    assert torch.equal(batch[0][1:2], alone[0]) and torch.equal(batch[1][1:2], alone[1])


def test_image_of_a_vector_does_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    model = Vec2Face(**TINY).eval()
    vectors = torch.randn(3, 512) * 20
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    with torch.no_grad():
        batch = model(vectors, generator=gens([1, 2, 3])).images
        alone = model(vectors[1:2], generator=gens([2])).images
    assert batch.shape == (3, 3, 112, 112)
    # float32 GEMM kernels differ with batch size: equal up to rounding, not bit for bit
    torch.testing.assert_close(batch[1:2], alone, atol=1e-4, rtol=1e-4)


def test_inference_fast_path_computes_exactly_what_autograd_mode_computes():
    # without autograd the image decoder updates activations in place; the arithmetic must not change
    torch.manual_seed(0)
    model = Vec2Face(**TINY).eval()
    vectors = torch.randn(3, 512)
    masks = model.draw_masks(3, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fast = model(vectors, token_drop_mask=masks[0], token_all_mask=masks[1]).images
    graph = model(vectors.requires_grad_(), token_drop_mask=masks[0], token_all_mask=masks[1]).images
    assert torch.equal(fast, graph.detach())
    graph.sum().backward()  # and the autograd path still differentiates (no in-place op on saved tensors)
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0


def test_default_config_matches_official_manifest():
    with torch.device("meta"):
        model = Vec2Face()
    assert_state_dict_matches_manifest(model, "manifests/vec2face_vit_base_patch16_generator.json")


def test_save_pretrained_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(1)
    model = Vec2Face(**TINY).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = Vec2Face.from_pretrained(tmp_path).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    vectors = torch.randn(2, 512)
    with torch.no_grad():
        a = model(vectors, generator=torch.Generator().manual_seed(3)).images
        b = loaded(vectors, generator=torch.Generator().manual_seed(3)).images
    assert torch.equal(a, b)


def test_bad_inputs_are_rejected_with_explanations():
    with pytest.raises(ValueError, match="decoder_embed_dim"):
        Vec2Face(**{**TINY, "decoder_embed_dim": 32})
    model = Vec2Face(**TINY).eval()
    with pytest.raises(ValueError, match=r"\[B, 512\]"):
        model(torch.randn(2, 128))
    with pytest.raises(ValueError, match="both"):
        model(torch.randn(2, 512), token_drop_mask=torch.zeros(2, 50))
    with pytest.raises(ValueError, match="one per sample"):
        model(torch.randn(2, 512), generator=[torch.Generator()])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    # Training mode with dropout: checkpointing must replay the dropout masks in the recomputation.
    torch.manual_seed(0)
    model = Vec2Face(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                     image_decoder_channels=32, z_channels=32, dropout=0.1).train()
    vectors = torch.randn(3, 512) * 20
    drop, masked = draw_token_masks(3, TRAINING_MASK_RATIO, torch.Generator().manual_seed(1))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the dropout stream
        out = model(vectors, token_drop_mask=drop, token_all_mask=masked)
        loss = out.images.square().mean() + (out.tokens - out.gt_tokens).square().mean()
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads()
    assert not model.is_gradient_checkpointing
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing and model.im_decoder.gradient_checkpointing
    calls = []
    checkpoint_func = model._gradient_checkpointing_func
    model._set_gradient_checkpointing(True, lambda block, *args: calls.append(block) or checkpoint_func(block, *args))
    checkpointed_loss, checkpointed_grads = loss_and_grads()
    # 2 encoder + 2 decoder blocks; 2 mid blocks, 5 levels x 2 ResnetBlocks, 4 upsamplings, the output head
    assert len(calls) == 2 + 2 + 2 + 10 + 4 + 1
    assert torch.equal(checkpointed_loss, plain_loss)
    assert checkpointed_grads.keys() == plain_grads.keys() and len(plain_grads) > 50
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=0, atol=0, msg=name)
    with torch.no_grad():  # inference never checkpoints
        calls.clear()
        model.eval()(vectors, token_drop_mask=drop, token_all_mask=masked)
        assert not calls
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing
