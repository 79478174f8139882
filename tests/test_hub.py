"""Publishing: the dataset card (huggingface_hub DatasetCard, datasets-readable metadata) and
``push_dataset`` (what goes up, options, dry run, unreachable Hub) with recorded clients, no network."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from builder.build import build
from builder.card import size_category, write_card
from builder.config import get_config
from builder.hub import push_dataset, push_pipeline, upload_plan
from vec2face_model.errors import HubUnreachableError, InvalidInputError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY = get_config("tiny", model="random-tiny")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A real tiny build plus what `hsface analyze` and an interrupted build leave behind."""
    out = tmp_path_factory.mktemp("hsface")
    build(TINY, out, progress=False)
    analysis = out / "tiny" / "analysis"
    analysis.mkdir()
    for name in ("report.json", "summary.md", "intra_class.png", "sample_grid.png"):
        (analysis / name).write_bytes(b"x" * 10)
    (out / "tiny" / ".incomplete" / "train-00001.parquet.tmp").write_bytes(b"half a shard")
    (out / ".README.md.123.tmp").write_text("half a card")
    (out / "tiny" / ".lock").write_text("")
    (out / ".cache" / "huggingface").mkdir(parents=True)
    (out / ".cache" / "huggingface" / "upload.json").write_text("{}")
    return out


EXPECTED = {
    "README.md", "tiny/train-00000-of-00002.parquet", "tiny/train-00001-of-00002.parquet", "tiny/generation.json",
    "tiny/identities.safetensors", "tiny/manifest.json", "tiny/sample_grid.png", "tiny/analysis/report.json",
    "tiny/analysis/summary.md", "tiny/analysis/intra_class.png", "tiny/analysis/sample_grid.png",
}


class RecordingHub:
    """Records the HfApi calls of a push; ``upload_folder`` selects files with huggingface_hub's own
    filter, as the real method does, so the test sees what would really go up."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, allow_patterns, ignore_patterns, **kwargs):
        from huggingface_hub.utils import filter_repo_objects
        from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

        root = Path(folder_path)
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        selected = set(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns + DEFAULT_IGNORE_PATTERNS))
        self.calls.append(("upload_folder", repo_id, selected, kwargs))
        return type("CommitInfo", (), {"pr_url": "https://huggingface.co/datasets/me/x/discussions/1" if kwargs.get("create_pr") else None})()


def test_push_uploads_everything_the_card_links_and_keeps_bookkeeping_local(built):
    hub = RecordingHub()
    push_dataset(built, "me/hsface-tiny", api=hub, progress=False)
    (_, repo, create), (upload, _, uploaded, options) = hub.calls
    assert repo == "me/hsface-tiny" and create == {"repo_type": "dataset", "private": False, "exist_ok": True}
    assert upload == "upload_folder" and options["repo_type"] == "dataset" and options["revision"] is None and not options["create_pr"]
    assert uploaded == EXPECTED
    card = (built / "README.md").read_text()
    for link in re.findall(r"\]\(([^)]+)\)", card):  # every relative link of the card goes up
        if not link.startswith("http"):
            assert link in uploaded, link
    assert set(upload_plan(built).files) == uploaded  # the dry-run list is what upload_folder selects


def test_push_options_reach_the_hub_calls(built):
    hub = RecordingHub()
    push_dataset(built, "me/x", api=hub, private=True, revision="v2", commit_message="hello", progress=False)
    assert [c[0] for c in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[0][2]["private"] is True
    assert hub.calls[1][2] == {"repo_type": "dataset", "branch": "v2", "exist_ok": True}
    assert hub.calls[2][3]["revision"] == "v2" and hub.calls[2][3]["commit_message"] == "hello"

    hub = RecordingHub()
    info = push_dataset(built, "me/x", api=hub, create_pr=True, progress=False)
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"] and hub.calls[1][3]["create_pr"] is True
    assert info.pr_url.endswith("/discussions/1")
    with pytest.raises(InvalidInputError, match="not both"):
        push_dataset(built, "me/x", api=hub, create_pr=True, revision="v2")


def test_dry_run_touches_no_client_and_reports_count_and_size(built):
    class NoNetwork:
        def __getattr__(self, name):
            raise AssertionError(f"dry run called {name}")

    plan = push_dataset(built, "me/x", api=NoNetwork(), dry_run=True)
    assert set(plan.files) == EXPECTED
    assert plan.total_bytes == sum((built / f).stat().st_size for f in EXPECTED)
    summary = plan.summary()
    assert summary.startswith(f"{len(EXPECTED)} files, ") and "README.md" in summary


def test_push_refuses_a_folder_without_a_build(tmp_path):
    (tmp_path / "README.md").write_text("# mine")
    with pytest.raises(InvalidInputError, match="run `hsface build` first"):
        push_dataset(tmp_path, "me/x", api=RecordingHub())
    with pytest.raises(InvalidInputError, match="no such folder"):
        push_dataset(tmp_path / "missing", "me/x", api=RecordingHub())


def test_unreachable_hub_is_one_hub_error_saying_what_to_do(built, monkeypatch):
    from huggingface_hub import HfApi, constants

    # offline mode (the test environment's HF_HUB_OFFLINE=1), through the real client
    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE is set") as offline:
        push_dataset(built, "me/x", api=HfApi(token="hf_fake"))
    assert "\n" not in str(offline.value) and "create the repository" in str(offline.value)
    # network down: nothing listens on the endpoint's port
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubUnreachableError, match="run the same command again") as down:
        push_dataset(built, "me/x", api=HfApi(endpoint="http://127.0.0.1:9", token="hf_fake"))
    assert "\n" not in str(down.value) and isinstance(down.value, OSError)


def test_cli_push_network_down_prints_one_line_and_fails(built):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_fake"}
    result = subprocess.run([sys.executable, "-m", "builder.cli", "push", str(built), "me/x", "--no-progress"], cwd=PROJECT_ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hsface push: error: push of ") and "Traceback" not in result.stderr


def test_cli_dry_run_lists_the_files(built):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run([sys.executable, "-m", "builder.cli", "push", str(built), "me/x", "--dry-run"], cwd=PROJECT_ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{len(EXPECTED)} files" in result.stdout and "nothing was uploaded" in result.stdout


def test_push_pipeline_is_a_deprecated_alias_of_push_to_hub():
    class Pipe:
        def push_to_hub(self, repo_id, **kwargs):
            self.pushed = (repo_id, kwargs)
            return "commit"

    pipe = Pipe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert push_pipeline(pipe, "me/vec2face", private=True) == "commit"
    assert pipe.pushed == ("me/vec2face", {"private": True})
    assert any(issubclass(w.category, FutureWarning) for w in caught)


# --- the card ------------------------------------------------------------------------------------


def test_card_is_a_valid_dataset_card_that_datasets_reads(built):
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    from builder.hsface_builder import hsface_features

    card = DatasetCard.load(built / "README.md")
    data = card.data
    assert data.license == "other" and data.license_name and data.license_link.startswith("https://")
    assert data.size_categories == ["n<1K"] and "synthetic" in data.tags and "face-recognition" in data.tags
    assert data.task_categories and data.pretty_name
    infos = DatasetInfosDict.from_dataset_card_data(data)
    assert infos["tiny"].features == hsface_features(4)
    assert infos["tiny"].splits["train"].num_examples == 20 and infos["tiny"].splits["train"].num_bytes > 0
    assert MetadataConfigs.from_dataset_card_data(data)["tiny"]["data_files"] == [{"split": "train", "path": "tiny/train-*.parquet"}]
    text = card.text
    assert "## Uses and limitations" in text and "Glint360K" in text and "MIT" in text and "BooBooWu/Vec2Face" in text
    assert "load_dataset('<user>/hsface', 'tiny'" in text


def test_card_holds_no_local_path_and_keeps_analysis_sections(built, tmp_path):
    import shutil

    from builder.analyze import replace_card_section

    out = tmp_path / "copy"
    shutil.copytree(built, out)
    generation = json.loads((out / "tiny" / "generation.json").read_text())
    generation["parameters"]["model"] = str(tmp_path / "my-weights")  # a local --model folder
    generation["execution"] = {"precision": "bf16", "speed_up": 2.1}
    (out / "tiny" / "generation.json").write_text(json.dumps(generation))
    card_path = out / "README.md"
    card_path.write_text(replace_card_section(card_path.read_text(), "tiny", "## Analysis (`tiny`)\n\nkept\n"))
    write_card(out)
    card = card_path.read_text()
    assert str(tmp_path) not in card and "/tmp" not in card and str(Path.home()) not in card
    assert "local 'my-weights'" in card
    assert "| precision | `\"bf16\"` |" in card and "| speed_up | `2.1` |" in card
    assert "## Analysis (`tiny`)\n\nkept" in card
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") and p.name != ".README.md.123.tmp"]


def test_configs_above_the_class_label_limit_keep_an_int_label_and_show_the_cast(built, tmp_path, monkeypatch):
    import shutil

    from datasets import ClassLabel, Value, load_dataset

    import builder.hsface_builder as hsface_builder

    monkeypatch.setattr(hsface_builder, "CLASS_LABEL_MAX_IDENTITIES", 3)  # tiny's 4 identities are "too many"
    assert hsface_builder.hsface_features(3)["label"] == ClassLabel(num_classes=3)
    out = tmp_path / "big"
    shutil.copytree(built, out)
    write_card(out)
    card = (out / "README.md").read_text()
    assert "class_label" not in card and "ClassLabel(num_classes=4)" in card
    ds = load_dataset(str(out), "tiny", split="train")
    assert ds.features["label"] == Value("int64")
    cast = ds.cast_column("label", ClassLabel(num_classes=4))  # what the card tells users to run
    assert cast.features["label"].num_classes == 4 and cast["label"] == ds["label"]
    assert len(cast.train_test_split(test_size=0.4, stratify_by_column="label", seed=0)["test"]) == 8


def test_card_renders_no_execution_block_without_one(built):
    assert "| execution | value |" not in (built / "README.md").read_text()


@pytest.mark.parametrize("rows, category", [(0, "n<1K"), (999, "n<1K"), (1_000, "1K<n<10K"), (20, "n<1K"),
                                            (500_000, "100K<n<1M"), (15_000_000, "10M<n<100M"), (10**9, "1B<n<10B"), (10**13, "n>1T")])
def test_size_category_follows_the_row_count(rows, category):
    assert size_category(rows) == category


def test_paper_configs_up_to_20k_get_a_class_label_larger_ones_the_int_index():
    from builder.config import HSFACE_CONFIGS
    from builder.hsface_builder import features

    kinds = {name: type(features(config)["label"]).__name__ for name, config in HSFACE_CONFIGS.items()}
    assert kinds == {"10k": "ClassLabel", "20k": "ClassLabel", "100k": "Value", "200k": "Value", "300k": "Value", "tiny": "ClassLabel"}
    assert features(HSFACE_CONFIGS["20k"])["label"].num_classes == 20_000


def test_public_model_names_hide_local_paths(tmp_path, monkeypatch):
    from builder.card import public_model_name

    (tmp_path / "weights").mkdir()
    monkeypatch.chdir(tmp_path)
    assert public_model_name(str(tmp_path / "weights")) == "local 'weights'"
    assert public_model_name("weights") == "local 'weights'"  # relative, but a folder here
    assert public_model_name("/gone/arcface.pth") == "local 'arcface.pth'"
    assert public_model_name("BooBooWu/Vec2Face") == "BooBooWu/Vec2Face" and public_model_name("random-tiny") == "random-tiny"


@pytest.mark.parametrize("status, advice", [(401, "hf auth login"), (403, "cannot write to me/x"), (404, "namespace of me/x"),
                                            (413, "refused the request"), (503, "server error")])
def test_hub_answers_become_hub_errors_with_advice_for_the_status(built, status, advice):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    class Refusing(RecordingHub):
        def create_repo(self, repo_id, **kwargs):
            response = httpx2.Response(status, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))
            raise HfHubHTTPError(f"{status} Client Error", response=response)

    with pytest.raises(HubUnreachableError, match=advice) as caught:
        push_dataset(built, "me/x", api=Refusing())
    assert f"HfHubHTTPError: {status} Client Error" in str(caught.value)
