"""TDS-CLIP: frozen CLIP ViT + temporal-difference side network for video action recognition."""

from tdsclip.model import TDSCLIP, ModelConfig, build_model, tiny_config, trainable_parameters
from tdsclip.weights import (
    CheckpointError,
    export_official,
    init_from_checkpoint,
    load_clip_weights,
    load_model,
    model_checkpoint,
    model_from_checkpoint,
    save_model,
)

__all__ = [
    "TDSCLIP",
    "CheckpointError",
    "ModelConfig",
    "build_model",
    "export_official",
    "init_from_checkpoint",
    "load_clip_weights",
    "load_model",
    "model_checkpoint",
    "model_from_checkpoint",
    "save_model",
    "tiny_config",
    "trainable_parameters",
]
