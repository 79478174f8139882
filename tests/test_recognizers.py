"""One recognizer loader (vec2face_model.recognizers) behind hsface analyze, train_vec2face and eval_fr."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recipes.backbones import load_backbone
from recipes.vec2face_data import load_recognizer as load_frozen_recognizer
from vec2face_model.models.iresnet import IResNet
from vec2face_model.recognizers import embed_images, load_recognizer, recognizer_hash


def tiny_recognizer(seed: int = 0) -> IResNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return IResNet(layers=[1, 1, 1, 1]).eval()


def test_every_caller_reads_the_same_sources(tmp_path):
    model = tiny_recognizer(1)
    digest = recognizer_hash(model)
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    model.save_pretrained(tmp_path / "pipe" / "recognizer")
    torch.save(model.state_dict(), tmp_path / "official.pth")
    for source in (tmp_path / "pipe", tmp_path / "official.pth"):
        frozen = load_frozen_recognizer(source)  # train_vec2face: eval mode and no gradients
        assert recognizer_hash(frozen) == digest and not frozen.training
        assert not any(p.requires_grad for p in frozen.parameters())
        assert recognizer_hash(load_backbone(source)) == digest  # eval_fr


def test_an_unknown_hub_id_reads_as_a_missing_recognizer():
    # offline test session: the Hub lookup fails, and the message names every accepted form
    with pytest.raises(FileNotFoundError, match="no such file or folder.*Hub repo id"):
        load_recognizer("nobody-here/no-such-recognizer")


def test_embed_images_runs_on_the_recognizers_dtype():
    model = tiny_recognizer(2)
    images = torch.rand(3, 3, 112, 112) * 2 - 1
    features = embed_images(model, images)
    assert features.dtype == np.float32 and features.shape == (3, 512)
    with torch.no_grad():
        np.testing.assert_allclose(features, model(images).numpy(), rtol=1e-5, atol=1e-5)
    half = embed_images(model.to(torch.bfloat16), images)  # float32 images are cast to the model's dtype
    assert half.dtype == np.float32 and np.abs(half - features).max() < 0.1 * np.abs(features).max()
