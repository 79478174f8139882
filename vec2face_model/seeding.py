"""Counter-based seeding: every random draw in hsface is keyed by *what* it is for, not by *when* it happens.

An image's randomness is derived from (config seed, stream, identity index, image index, ...), so
it does not depend on batch size, processing order, the number of processes or on resuming.
"""

from __future__ import annotations

import numpy as np
import torch

# The registry of stream ids: every independent use of one seed has its own id, so that two uses
# never draw the same numbers. All of hsface's streams are here (the recipes' too), so that a new
# one is given a free id; the ids are part of the results (same seed, same bytes) and never change.
# Ranges: 1-99 the pipeline (dataset generation), 101-199 the margin head, 201-299 the face
# recognition data, 301-399 train_fr, 401-499 train_vec2face.

# pipeline (vec2face_model.pipeline_vec2face). Identity sampling (seeded with the config seed alone)
# and perturbation (keyed by (seed, identity, attempt)) predate the registry and keep those keys so
# that datasets keep their bytes; ids 1 and 2 stay reserved for them.
STREAM_IDENTITIES = 1
STREAM_PERTURB = 2
STREAM_MASK = 3
STREAM_ATTROP_MASK = 4
STREAM_REFINE_MASK = 5

# recipes.margin_head: class-centre initialisation, sampled negative classes (partial FC)
STREAM_HEAD_CENTRES = 101
STREAM_HEAD_NEGATIVES = 102

# recipes.fr_data: epoch order, augmentation, DataLoader worker seeds
STREAM_FR_ORDER = 201
STREAM_FR_AUGMENT = 202
STREAM_FR_LOADER = 203

# recipes.train_fr: backbone initialisation, dropout
STREAM_FR_INIT = 301
STREAM_FR_DROPOUT = 302

# recipes.train_vec2face: model initialisation, data order, token masks, dropout
STREAM_VEC2FACE_INIT = 401
STREAM_VEC2FACE_DATA_ORDER = 402
STREAM_VEC2FACE_MASK = 403
STREAM_VEC2FACE_DROPOUT = 404


def registered_streams() -> dict[str, int]:
    """``{name: id}`` of every stream above (tests check that the ids are unique)."""
    return {name: value for name, value in globals().items() if name.startswith("STREAM_") and isinstance(value, int)}


def derive_seed(*keys: int) -> int:
    """A 64-bit seed that is a pure function of the integer keys (numpy's SeedSequence hashing)."""
    if any(k < 0 for k in keys):
        raise ValueError(f"seed keys must be non-negative integers, got {keys}")
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0])


def keyed_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))
