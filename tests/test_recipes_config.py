"""recipes/config.py: one config system for train_fr and train_vec2face (YAML file + flags, same rules)."""

from __future__ import annotations

import dataclasses

import pytest

from recipes import train_fr, train_vec2face
from recipes.config import config_to_dict, parse_config, parse_or_exit, save_config

RECIPES = [(train_fr.TrainConfig, train_fr.PRESETS, "train_fr"), (train_vec2face.TrainConfig, train_vec2face.PRESETS, "train_vec2face")]


@pytest.mark.parametrize("config_cls, presets, prog", RECIPES)
def test_precedence_defaults_then_file_then_flags(tmp_path, config_cls, presets, prog):
    path = tmp_path / "run.yaml"
    path.write_text("# a hand-written YAML file\nbatch_size: 3\nseed: 7\nnum_workers: 1\n")
    from_file = parse_config(config_cls, [f"--config={path}"], presets)
    assert (from_file.batch_size, from_file.seed, from_file.num_workers) == (3, 7, 1)
    assert from_file.epochs == config_cls().epochs  # untouched fields keep the default
    flagged = parse_config(config_cls, [f"--config={path}", "--seed=9"], presets)
    assert (flagged.batch_size, flagged.seed) == (3, 9)  # a flag beats the file, whatever the order
    assert parse_config(config_cls, ["--seed=9", "--config", str(path)], presets) == flagged
    # a preset is a file's equivalent; the resolved config saved by a run reads back identically
    tiny = parse_config(config_cls, ["--config=tiny", "--epochs=2"], presets)
    save_config(tiny, tmp_path / "config.json")
    assert parse_config(config_cls, [f"--config={tmp_path / 'config.json'}"], presets) == tiny
    assert config_to_dict(tiny)["epochs"] == 2


@pytest.mark.parametrize("config_cls, presets, prog", RECIPES)
def test_unknown_and_repeated_keys_are_rejected_everywhere(tmp_path, config_cls, presets, prog):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 2\nepoch: 3\n")
    with pytest.raises(ValueError, match=rf"{path}: unknown config field\(s\) \['epoch'\]; valid fields: dataset"):
        parse_config(config_cls, [f"--config={path}"], presets)
    with pytest.raises(ValueError, match=r"command line: unknown config field\(s\) \['epoch'\]"):
        parse_config(config_cls, ["--epoch=3"], presets)  # no argparse abbreviation of --epochs
    with pytest.raises(ValueError, match="--seed given twice"):
        parse_config(config_cls, ["--seed=1", "--seed=2"], presets)
    with pytest.raises(ValueError, match="expected a YAML/JSON mapping"):
        path.write_text("- 1\n- 2\n")
        parse_config(config_cls, [f"--config={path}"], presets)
    with pytest.raises(ValueError, match="an int"):
        parse_config(config_cls, ["--seed=1.5"], presets)


def test_values_are_typed_by_the_annotations():
    config = train_fr.parse_config(["--lr=1e-3", "--hflip=no", "--lr_milestones=[2, 4]", "--max_identities=null",
                                    "--backbone_kwargs={depth: 2}", "--eval_sets=lfw,agedb_30"])
    assert config.lr == 1e-3 and config.hflip is False and config.lr_milestones == (2, 4)
    assert config.max_identities is None and config.backbone_kwargs == {"depth": 2} and config.eval_sets == ("lfw", "agedb_30")
    assert train_fr.parse_config(["--hflip"]).hflip is True  # a bare boolean flag
    assert train_fr.parse_config(["--max-identities=5"]).max_identities == 5  # hyphenated spelling
    with pytest.raises(TypeError, match="epochs"):
        train_fr.TrainConfig(epochs="26")  # built in code: the same type check
    with pytest.raises(TypeError, match="batch_size"):
        train_vec2face.TrainConfig(batch_size=2.0)


@pytest.mark.parametrize("config_cls, presets, prog", RECIPES)
def test_help_lists_every_field_with_its_default(capsys, config_cls, presets, prog):
    with pytest.raises(SystemExit) as exited:
        parse_or_exit(config_cls, ["--help"], presets, prog=prog, description="doc")
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(config_cls):
        assert f"--{field.name} " in text or f"--{field.name}\n" in text or f"--{field.name}," in text, field.name
    assert "[float, default: 0.1]" in text if prog == "train_fr" else "[float, default: 4e-05]" in text
    assert "per process" in text  # the field's own comment (batch_size) is its help text
    assert "presets: " in text and all(name in text for name in presets)


def test_both_recipes_fail_the_same_way_on_the_command_line(capsys):
    for main in (train_fr.main, train_vec2face.main):
        with pytest.raises(SystemExit) as exited:
            main(["--bogus=1"])
        assert exited.value.code == 2
        assert "error: command line: unknown config field(s) ['bogus']" in capsys.readouterr().err
