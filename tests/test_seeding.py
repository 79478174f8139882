"""The stream-id registry: one id per use of a seed, and the ids every recipe draws with."""

from __future__ import annotations

import importlib

import pytest

from vec2face_model import seeding


def test_stream_ids_are_unique():
    streams = seeding.registered_streams()
    assert len(streams) >= 16
    clashes = {value: [n for n, v in streams.items() if v == value] for value in streams.values()}
    assert {v: names for v, names in clashes.items() if len(names) > 1} == {}


def test_stream_ids_keep_their_values():
    # The ids are part of the results: changing one changes every dataset / training run drawn with it.
    assert seeding.registered_streams() == {
        "STREAM_IDENTITIES": 1, "STREAM_PERTURB": 2, "STREAM_MASK": 3, "STREAM_ATTROP_MASK": 4, "STREAM_REFINE_MASK": 5,
        "STREAM_HEAD_CENTRES": 101, "STREAM_HEAD_NEGATIVES": 102,
        "STREAM_FR_ORDER": 201, "STREAM_FR_AUGMENT": 202, "STREAM_FR_LOADER": 203,
        "STREAM_FR_INIT": 301, "STREAM_FR_DROPOUT": 302,
        "STREAM_VEC2FACE_INIT": 401, "STREAM_VEC2FACE_DATA_ORDER": 402, "STREAM_VEC2FACE_MASK": 403, "STREAM_VEC2FACE_DROPOUT": 404,
    }


@pytest.mark.parametrize("module", ["recipes.fr_data", "recipes.margin_head", "recipes.train_fr", "recipes.vec2face_data",
                                    "recipes.vec2face_step", "recipes.train_vec2face", "vec2face_model.pipeline_vec2face"])
def test_no_module_defines_its_own_stream_ids(module):
    mod = importlib.import_module(module)
    own = {name for name, value in vars(mod).items() if name.startswith("STREAM_") and isinstance(value, int)}
    assert all(getattr(seeding, name, None) == getattr(mod, name) for name in own), own
