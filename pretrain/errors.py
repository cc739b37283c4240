"""Errors every layer raises; a leaf module, so the data layer and the config share them without importing
each other."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config problem, always naming the offending key."""
