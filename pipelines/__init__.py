"""DALI data pipelines: shards -> frame sampling (the official Something-Something / Kinetics schemes)
-> decode (GPU or CPU) -> augmentation -> clips on the device."""

from pipelines.loader import Loader, loader
from pipelines.reader import ShardReadError

__all__ = ["Loader", "ShardReadError", "loader"]
