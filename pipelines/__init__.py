"""DALI data pipelines: shards -> decode (GPU or CPU) -> TSN sampling -> augmentation -> clips on the device."""

from pipelines.loader import Loader, loader
from pipelines.reader import ShardReadError

__all__ = ["Loader", "ShardReadError", "loader"]
