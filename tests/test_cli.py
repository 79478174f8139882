"""The ``hsface`` command line: starts without torch, documents every flag, one-line errors only for
hsface's own error types, and a plug-in hook for more subcommands."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from builder import cli

PROJECT_ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
from builder.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in ("torch", "datasets", "diffusers", "accelerate", "vec2face_model", "pyarrow") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [
    ["--help"], ["build", "--help"], ["push", "--help"], ["convert", "--help"], ["analyze", "--help"],
    [], ["build"], ["build", "5k"], ["build", "tiny", "--batch-size", "0"], ["build", "tiny", "--seed", "x"],
    ["push", "only-a-dir"], ["frobnicate"],
])
def test_help_and_argument_errors_import_no_heavy_module(argv):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    probe = json.loads(result.stderr.strip().splitlines()[-1])
    assert probe["heavy"] == [], probe
    assert probe["code"] == (0 if "--help" in argv else 2)
    if "--help" in argv:
        assert "usage: hsface" in result.stdout


def test_unknown_config_and_bad_numbers_are_argument_errors(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.parser().parse_args(["build", "5k"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "unknown HSFace config '5k'" in err and "10k" in err
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["build", "tiny", "--shard-size", "-3"])
    assert "must be a positive integer" in capsys.readouterr().err


def test_static_names_match_the_library():
    from builder.config import HSFACE_CONFIGS
    from vec2face_model.pipeline_vec2face import PRECISIONS

    assert cli.PRESET_NAMES == tuple(HSFACE_CONFIGS)
    assert set(cli.PRECISION_NAMES) == set(PRECISIONS)


def test_presets_is_a_deprecated_alias_of_hsface_configs():
    import builder
    from builder import config

    with pytest.warns(DeprecationWarning, match="HSFACE_CONFIGS"):
        assert config.PRESETS is config.HSFACE_CONFIGS
    with pytest.warns(DeprecationWarning):
        assert builder.PRESETS is config.HSFACE_CONFIGS


def _actions(parser: argparse.ArgumentParser, path: str = "hsface"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_flag_and_argument_has_help_text():
    missing = [f"{path} {action.dest}" for path, action in _actions(cli.parser()) if not action.help]
    assert missing == []
    build_help = cli.parser()._subparsers._group_actions[0].choices["build"].format_help()
    assert "--seed" in build_help and "another seed is another dataset" in build_help


@pytest.fixture
def failing_command(monkeypatch):
    """A subcommand registered through the SUBCOMMAND_MODULES hook (as `hsface demo` would be)."""
    from vec2face_model.errors import InvalidInputError

    errors = {"hsface": InvalidInputError("the input is bad; pass a good one"), "bug": RuntimeError("a real bug")}
    module = types.ModuleType("fake_subcommand")

    def add_parser(subparsers):
        p = subparsers.add_parser("fail", help="fails on purpose")
        p.add_argument("kind", choices=sorted(errors), help="which error")

        def run(args):
            raise errors[args.kind]

        p.set_defaults(run=run)
        return p

    module.add_parser = add_parser
    monkeypatch.setitem(sys.modules, "fake_subcommand", module)
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", (*cli.SUBCOMMAND_MODULES, "fake_subcommand"))


def test_hsface_errors_print_one_line_and_exit_2(failing_command, capsys):
    assert cli.main(["fail", "hsface"]) == 2
    assert capsys.readouterr().err == "hsface fail: error: the input is bad; pass a good one\n"


def test_other_exceptions_keep_their_traceback(failing_command):
    with pytest.raises(RuntimeError, match="a real bug"):
        cli.main(["fail", "bug"])


@pytest.mark.parametrize("argv", [["--debug", "fail", "hsface"], ["fail", "hsface", "--debug"]])
def test_debug_shows_the_traceback_of_hsface_errors_too(failing_command, capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("hsface fail: error: the input is bad; pass a good one\n")


@pytest.mark.parametrize("args, says", [
    (["convert", "/nonexistent-hsface", "/tmp/hsface-convert-out"], "expected the official Vec2Face layout"),
    (["build", "tiny", "--model", "/nonexistent-hsface", "--out", "/tmp/hsface-never-written"], "no such folder"),
    (["build", "tiny", "--model", "no-such-folder", "--out", "/tmp/hsface-never-written"], "no such folder"),
    (["analyze", "/nonexistent-hsface", "--recognizer", "random-tiny"], "no such folder"),
])
def test_missing_inputs_are_one_line_errors(args, says):
    result = subprocess.run([sys.executable, "-m", "builder.cli", *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=PROJECT_ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and says in result.stderr
    assert not Path("/tmp/hsface-never-written").exists() and not Path("/tmp/hsface-convert-out").exists()
