"""Errors meant for users: each message names the input, what was wrong, and how to fix it.

The CLI prints any `UserError` as one line without a stack trace; the server maps them to 4xx.
"""

from __future__ import annotations


class UserError(ValueError):
    """Base class for errors caused by user input."""


class ConfigError(UserError):
    """A configuration value is unknown, of the wrong type, or impossible."""


class DataError(UserError):
    """Input data is missing columns, has invalid rows, or does not match the catalogue."""


class UnknownIdError(UserError):
    """Raw ids not present in a vocabulary; `.unknown` lists them."""

    def __init__(self, message: str, unknown: list):
        super().__init__(message)
        self.unknown = unknown
