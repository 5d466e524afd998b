"""DALI data pipelines: shards -> frame sampling (the official Something-Something / Kinetics schemes)
-> decode (GPU or CPU) -> augmentation -> clips on the device.

`DataConfig` (pipelines.config) declares the options; `build_loader(data, mode, ...)` makes a Loader.
The package imports DALI and torch only when a loader is asked for (PEP 562 module __getattr__), so
`pipelines.config` stays quick to import for a run's config loader.
"""

import importlib
from typing import TYPE_CHECKING

from pipelines.config import DataConfig

if TYPE_CHECKING:
    from pipelines.batches import Loader
    from pipelines.build import build_loader
    from pipelines.reader import ShardReadError

_LAZY = {"Loader": "pipelines.batches", "build_loader": "pipelines.build",
         "ShardReadError": "pipelines.reader"}

__all__ = ["DataConfig", "Loader", "ShardReadError", "build_loader"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # found directly next time
    return value
