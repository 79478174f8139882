"""HSFace dataset builder: configs, the datasets builder, resumable sharded output, card and Hub upload.

The names below are imported on first use (PEP 562), so ``hsface --help`` does not import torch.
"""

import importlib

_EXPORTS = {
    "HSFACE_CONFIGS": ".config",
    "PRESETS": ".config",  # deprecated alias of HSFACE_CONFIGS
    "HSFaceConfig": ".config",
    "get_config": ".config",
    "HSFace": ".hsface_builder",
    "hsface_features": ".hsface_builder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
