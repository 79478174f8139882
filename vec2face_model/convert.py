"""Kept for old imports: the weight reading and verification moved to :mod:`vec2face_model.weights`.

``from vec2face_model.convert import X`` keeps working for every name it offered.
"""

from .weights import *  # noqa: F401,F403
from .weights import __all__  # noqa: F401
from .weights import _torch_load_restricted  # noqa: F401  (private, re-exported for old imports only)
