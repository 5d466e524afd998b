"""TDS-CLIP: frozen CLIP ViT + temporal-difference side network for video action recognition.

The names below are imported on first use (PEP 562), so `import tdsclip.config` stays quick: a run's
config is checked before torch and open_clip are loaded.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tdsclip.checkpoint_file import CheckpointError
    from tdsclip.model import TDSCLIP, build_model, tiny_config, trainable_parameters
    from tdsclip.model_config import ModelConfig
    from tdsclip.weights import (export_official, init_from_checkpoint, load_clip_weights, load_model,
                                 model_checkpoint, model_from_checkpoint, save_model)

_LAZY = {
    "CheckpointError": "tdsclip.checkpoint_file",
    "ModelConfig": "tdsclip.model_config",
    **{name: "tdsclip.model" for name in ("TDSCLIP", "build_model", "tiny_config", "trainable_parameters")},
    **{name: "tdsclip.weights" for name in ("export_official", "init_from_checkpoint", "load_clip_weights",
                                             "load_model", "model_checkpoint", "model_from_checkpoint", "save_model")},
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'tdsclip' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # found directly next time
    return value
