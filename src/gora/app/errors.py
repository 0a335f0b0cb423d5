"""The application's one error for bad input."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user (path, column, data, model type): the message says what to change."""
