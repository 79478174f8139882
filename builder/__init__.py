"""HSFace dataset builder: configs, the datasets builder, resumable sharded output, card and Hub upload."""

from .config import PRESETS, HSFaceConfig, get_config
from .hsface_builder import FEATURES, HSFace

__all__ = ["FEATURES", "PRESETS", "HSFace", "HSFaceConfig", "get_config"]
