"""Model loading and per-architecture adapters."""

from metake.models.adapters import ADAPTERS, ArchAdapter, get_adapter
from metake.models.load import BUILTIN_MODELS, DEFAULT_MODEL, load_model

__all__ = [
    "ADAPTERS",
    "ArchAdapter",
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "get_adapter",
    "load_model",
]
