"""Vec2FacePipeline as a diffusers pipeline: saved layout, DiffusionPipeline loading, push_to_hub with
a model card, generator= / return_dict=, progress bars, and bad inputs refused before any work."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from vec2face_model import AttrOPConfig, AttrOPSchedule, Vec2FacePipeline
from vec2face_model.weights import WeightsLoadError
from vec2face_model.errors import InvalidInputError


@pytest.fixture(scope="module")
def pipe():
    return Vec2FacePipeline.from_preset("random-tiny", seed=0)


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "pipe"
    pipe.save_pretrained(folder)
    return folder


GOLDEN_MODEL_INDEX = {
    "_class_name": ["pipeline", "Vec2FacePipeline"],
    "generator": ["vec2face_model.models.generator", "Vec2Face"],
    "pose": ["vec2face_model.models.sixdrepnet", "SixDRepNet"],
    "preset": "random-tiny",
    "prior": ["vec2face_model.identity", "IdentityPrior"],
    "quality": ["vec2face_model.models.iresnet", "IResNet"],
    "recognizer": ["vec2face_model.models.iresnet", "IResNet"],
}


def test_saved_folder_has_the_golden_layout(saved):
    index = json.loads((saved / "model_index.json").read_text())
    assert index.pop("_diffusers_version")
    assert index == GOLDEN_MODEL_INDEX
    files = sorted(str(p.relative_to(saved)) for p in saved.rglob("*") if p.is_file())
    components = ("generator", "pose", "prior", "quality", "recognizer")
    assert files == sorted(["model_index.json", "pipeline.py"] + [f"{c}/{f}" for c in components
                                                                  for f in ("config.json", "diffusion_pytorch_model.safetensors")])
    assert "from vec2face_model.pipeline_vec2face import Vec2FacePipeline" in (saved / "pipeline.py").read_text()


def test_plain_diffusion_pipeline_from_pretrained_loads_the_saved_folder(pipe, saved):
    reference = pipe(num_identities=2, images_per_identity=2, seed=4, output_type="pt", progress=False).images
    ours = Vec2FacePipeline.from_pretrained(saved)  # our class needs no remote code
    plain = DiffusionPipeline.from_pretrained(saved, trust_remote_code=True)
    explicit = DiffusionPipeline.from_pretrained(saved, custom_pipeline=str(saved), trust_remote_code=True)
    for loaded in (ours, plain, explicit):
        assert type(loaded) is Vec2FacePipeline and loaded.config.preset == "random-tiny"
        images = loaded(num_identities=2, images_per_identity=2, seed=4, output_type="pt", progress=False).images
        assert torch.equal(images, reference)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(saved)  # diffusers' own refusal to run code without consent


def test_save_pretrained_does_not_overwrite_a_pipeline_py_it_did_not_write(pipe, tmp_path):
    (tmp_path / "pipeline.py").write_text("print('mine')\n")
    with pytest.raises(InvalidInputError, match="not written by hsface"):
        pipe.save_pretrained(tmp_path)
    assert (tmp_path / "pipeline.py").read_text() == "print('mine')\n"
    assert not (tmp_path / "model_index.json").exists()


def test_truncated_or_foreign_weights_in_a_saved_folder_raise_weights_load_error(pipe, tmp_path):
    import shutil

    pipe.save_pretrained(tmp_path / "ok")
    for case in ("truncated", "foreign"):
        shutil.copytree(tmp_path / "ok", tmp_path / case)
    weights = "generator/diffusion_pytorch_model.safetensors"
    data = (tmp_path / "ok" / weights).read_bytes()
    (tmp_path / "truncated" / weights).write_bytes(data[: len(data) // 2])
    save_file({"something.else": torch.zeros(3)}, tmp_path / "foreign" / weights)
    with pytest.raises(WeightsLoadError, match=r"truncated/generator/diffusion_pytorch_model\.safetensors: not a readable"):
        Vec2FacePipeline.from_pretrained(tmp_path / "truncated")
    # diffusers alone would load it with randomly initialised weights and a warning
    with pytest.raises(WeightsLoadError, match=r"foreign/generator/diffusion_pytorch_model\.safetensors does not hold Vec2Face weights"):
        Vec2FacePipeline.from_pretrained(tmp_path / "foreign")


class RecordingHub:
    """Stands in for the Hub calls diffusers' push_to_hub makes; keeps what would be uploaded."""

    def __init__(self, existing_card: str | None = None):
        self.existing_card = existing_card
        self.repos, self.uploads = [], []

    def install(self, monkeypatch):
        import diffusers.utils.hub_utils as hub_utils
        from huggingface_hub.errors import EntryNotFoundError

        def create_repo(repo_id, **kwargs):
            self.repos.append((repo_id, kwargs))
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def load_card(repo_id_or_path, **kwargs):
            if str(repo_id_or_path).endswith("README.md"):  # a local file: the real loader
                return ModelCard(open(repo_id_or_path).read())
            if self.existing_card is None:
                raise EntryNotFoundError("no README.md")
            return ModelCard(self.existing_card)

        def upload_folder(repo_id, folder_path, **kwargs):
            files = {str(p.relative_to(folder_path)): p.read_bytes() for p in __import__("pathlib").Path(folder_path).rglob("*") if p.is_file()}
            self.uploads.append((repo_id, files, kwargs))
            return "commit-url"

        monkeypatch.setattr(hub_utils, "create_repo", create_repo)
        monkeypatch.setattr(hub_utils, "upload_folder", upload_folder)
        monkeypatch.setattr(ModelCard, "load", classmethod(lambda cls, repo, **kw: load_card(repo, **kw)))
        return self


def test_push_to_hub_goes_through_diffusers_and_uploads_a_model_card(pipe, monkeypatch):
    hub = RecordingHub().install(monkeypatch)
    assert pipe.push_to_hub("me/vec2face-tiny", private=True) == "commit-url"
    assert hub.repos == [("me/vec2face-tiny", {"private": True, "token": None, "exist_ok": True})]
    (repo_id, files, options), = hub.uploads
    assert repo_id == "me/vec2face-tiny" and options["commit_message"] == "Upload Vec2FacePipeline"
    assert {"model_index.json", "pipeline.py", "README.md", "generator/diffusion_pytorch_model.safetensors"} <= files.keys()
    card = ModelCard(files["README.md"].decode())
    assert card.data.license == "mit" and card.data.library_name == "diffusers"
    assert "random-weights" in card.data.tags and card.data.base_model is None  # random weights derive from nothing
    assert "Warning: random weights" in card.text and "random-tiny" in card.text
    assert 'DiffusionPipeline.from_pretrained("me/vec2face-tiny", trust_remote_code=True)' in card.text
    assert "Glint360K" in card.text


def test_model_card_of_real_weights_names_the_base_model(pipe):
    released_like = Vec2FacePipeline(generator=pipe.generator)  # no preset label, no prior
    card = released_like.model_card("me/vec2face")
    assert card.data.base_model == "BooBooWu/Vec2Face" and "random-weights" not in card.data.tags
    assert "Warning" not in card.text and "identity_vectors" in card.text  # no prior: usage passes vectors


def test_push_to_hub_keeps_a_card_the_repo_already_has(pipe, monkeypatch):
    written = "---\nlicense: mit\nlibrary_name: diffusers\n---\n# My own card\n"
    hub = RecordingHub(existing_card=written).install(monkeypatch)
    pipe.push_to_hub("me/vec2face-tiny")
    assert "# My own card" in hub.uploads[0][1]["README.md"].decode()


def test_generator_argument_maps_onto_the_counter_seed(pipe):
    ids = pipe.sample_identities(3, seed=1).vectors

    def run(vectors, **kwargs):
        return pipe(vectors, images_per_identity=2, output_type="pt", progress=False, **kwargs)

    a = run(ids, generator=torch.Generator().manual_seed(0))
    b = run(ids, generator=torch.Generator().manual_seed(0), batch_size=1)
    drawn = int(torch.randint(0, 2**63 - 1, (1,), generator=torch.Generator().manual_seed(0)))
    c = run(ids, seed=drawn)
    torch.testing.assert_close(b.images, a.images, atol=1e-4, rtol=1e-4)  # batch-size independent
    assert torch.equal(c.images, a.images)  # the generator gives one int64 seed
    reused = torch.Generator().manual_seed(0)
    first, second = run(ids, generator=reused), run(ids, generator=reused)
    assert (first.images - second.images).abs().max() > 1e-2  # a consumed generator gives new images, as in diffusers
    # a list: one generator per identity; identity 2 alone reproduces its rows of the whole call
    whole = run(ids, generator=[torch.Generator().manual_seed(s) for s in (10, 11, 12)])
    alone = run(ids[2:], identity_offset=2, generator=[torch.Generator().manual_seed(12)])
    torch.testing.assert_close(alone.images, whole.images[4:], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(whole.images[:2], whole.images[2:4])
    with pytest.raises(InvalidInputError, match="2 generators for 3 identities"):
        run(ids, generator=[torch.Generator(), torch.Generator()])
    images, labels, *_ = run(ids, seed=drawn, return_dict=False)
    assert torch.equal(images, a.images) and labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_progress_bars_follow_set_progress_bar_config(capsys):
    pipe = Vec2FacePipeline.from_preset("random-tiny", seed=0)
    log = io.StringIO()
    pipe.set_progress_bar_config(file=log, mininterval=0, ascii=True)
    pipe(num_identities=3, images_per_identity=2, refine_identities=AttrOPConfig(max_steps=1), batch_size=2, output_type="np")
    text = log.getvalue()
    assert "sampling identities" in text and "3/3" in text
    assert "refining identities:  67%" in text and "refining identities: 100%" in text  # advances per batch
    assert "Vec2Face: 100%" in text and "6/6" in text
    assert capsys.readouterr().err == ""
    pipe.set_progress_bar_config(disable=True)
    pipe(num_identities=1, images_per_identity=1, refine_identities=AttrOPConfig(max_steps=1), output_type="np")
    assert log.getvalue() == text and capsys.readouterr().err == ""


def test_a_schedule_of_only_attrop_images_works(pipe):
    schedule = AttrOPSchedule(groups=((2, 60.0),), config=AttrOPConfig(max_steps=1))
    out = pipe(num_identities=2, images_per_identity=2, attrop_schedule=schedule, output_type="np", progress=False)
    assert out.images.shape == (4, 112, 112, 3) and (out.attrop_target_yaw == 60.0).all()
    assert np.isfinite(out.yaw).all()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p, v: p(v[:0]), r"empty \(shape \(0, 512\)\)"),
        (lambda p, v: p(v[:, :100]), r"shape \[N, 512\] \(or one 512-d vector\), got \(2, 100\)"),
        (lambda p, v: p(v[None]), r"got \(1, 2, 512\)"),
        (lambda p, v: p(torch.cat([v, v.new_full((1, 512), float("nan"))])), r"rows \[2\] contain NaN or inf"),
        (lambda p, v: p(torch.cat([v.new_full((1, 512), float("inf")), v])), r"rows \[0\] contain NaN or inf"),
        (lambda p, v: p(torch.cat([v, torch.zeros(1, 512)])), r"rows \[2\] are all zeros"),
        (lambda p, v: p(v.numpy().astype(np.complex64)), "real numbers"),
        (lambda p, v: p([1.0] * 512), "torch.Tensor or numpy.ndarray"),
        (lambda p, v: p(num_identities=0), "num_identities must be a positive integer, got 0"),
        (lambda p, v: p(), "pass identity_vectors"),
        (lambda p, v: p(v, images_per_identity=0), "images_per_identity must be a positive integer, got 0"),
        (lambda p, v: p(v, batch_size=0), "batch_size must be a positive integer"),
        (lambda p, v: p(v, seed=-1), "seed must be a non-negative integer"),
        (lambda p, v: p(v, identity_offset=-2), "identity_offset must be a non-negative integer"),
        (lambda p, v: p(v, images_per_identity=1, attrop_schedule=AttrOPSchedule(groups=((2, 60.0),))), "needs 2 images per identity"),
        (lambda p, v: p(v, generator=3), "torch.Generator"),
        (lambda p, v: p.sample_identities(0), "num_identities must be a positive integer"),
        (lambda p, v: p.interpolate(v[0], v[1], steps=0), "steps must be a positive integer, got 0"),
        (lambda p, v: p.interpolate(v[0], v[1, :3]), r"b must have shape a 512-d vector, got \(3,\)"),
        (lambda p, v: p.interpolate(v[0], v[1] * float("nan")), "contain NaN or inf"),
    ],
)
def test_bad_inputs_raise_invalid_input_error_before_any_work(pipe, monkeypatch, call, message):
    vectors = pipe.sample_identities(2, seed=0).vectors
    work = []
    monkeypatch.setattr(pipe, "decode", lambda *a, **k: work.append("decode"))
    monkeypatch.setattr(pipe, "sample_identities", lambda *a, _real=pipe.sample_identities, **k: work.append("sample") or _real(*a, **k))
    with pytest.raises(InvalidInputError, match=message) as raised:
        call(pipe, vectors)
    assert isinstance(raised.value, ValueError)
    assert work in ([], ["sample"]) and "decode" not in work
    if work:  # only the direct sample_identities case reaches the method, which refuses at once
        assert "num_identities" in message
