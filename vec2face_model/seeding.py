"""Counter-based seeding: every random draw in hsface is keyed by *what* it is for, not by *when* it happens.

An image's randomness is derived from (config seed, stream, identity index, image index, ...), so
it does not depend on batch size, processing order, the number of processes or on resuming.
"""

from __future__ import annotations

import numpy as np
import torch

# Stream names keep independent uses of one seed apart.
STREAM_IDENTITIES = 1
STREAM_PERTURB = 2
STREAM_MASK = 3
STREAM_ATTROP_MASK = 4
STREAM_REFINE_MASK = 5


def derive_seed(*keys: int) -> int:
    """A 64-bit seed that is a pure function of the integer keys (numpy's SeedSequence hashing)."""
    if any(k < 0 for k in keys):
        raise ValueError(f"seed keys must be non-negative integers, got {keys}")
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0])


def keyed_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))
