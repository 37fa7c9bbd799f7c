"""Exceptions metake raises for problems a user can fix (bad input, missing package, ...)."""

from __future__ import annotations


class MetakeError(Exception):
    """Base class: a problem with the user's input or environment, with a readable message."""


class InvalidRequestError(MetakeError, ValueError):
    """An edit request (or a file of them) is malformed."""


class UnsupportedModelError(MetakeError, ValueError):
    """The model's architecture has no adapter."""


class ModelNotAvailableError(MetakeError, FileNotFoundError):
    """A model name or path cannot be loaded here (missing package, no hub access, bad path)."""


class CorpusError(MetakeError, ValueError):
    """A statistics corpus is missing, empty or malformed."""


class NonFiniteError(MetakeError, FloatingPointError):
    """A computation produced NaN or infinity (the batch is rolled back; nothing is cached)."""
