"""The one error type of model and tokenizer loading (kept apart so every loading module can raise it)."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says what was tried and how to fix it."""
