"""smartload: load PyTorch checkpoints into models safely, and say what was done.

``import smartload`` imports neither torch nor any framework; :func:`load` and :func:`diff`
import torch when first called, so ``smartload inspect`` starts instantly.
"""

from ._api import diff, load
from ._heads import class_map_by_names
from ._inspect import CheckpointInfo, inspect
from ._report import LoadPlan, LoadReport, PlanEntry
from .errors import (
    CheckpointFormatError,
    IncompatibleCheckpointError,
    InvalidArgumentError,
    SmartloadError,
    UnsafeCheckpointError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointFormatError",
    "CheckpointInfo",
    "IncompatibleCheckpointError",
    "InvalidArgumentError",
    "LoadPlan",
    "LoadReport",
    "PlanEntry",
    "SmartloadError",
    "UnsafeCheckpointError",
    "__version__",
    "class_map_by_names",
    "diff",
    "inspect",
    "load",
]
