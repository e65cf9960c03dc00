"""The prefast error family. The CLI turns each into one line on stderr and exit code 2."""

from __future__ import annotations


class PrefastError(ValueError):
    """Base of prefast's errors."""


class ConfigError(PrefastError):
    """A bad option value; the message names the option (``--t0: ...``)."""


class CacheError(PrefastError):
    """A cache that cannot be used: another model's store in --cache-dir, a stale fingerprint."""


class CheckpointError(PrefastError):
    """A checkpoint that is missing, unreadable or from another configuration."""


__all__ = ["CacheError", "CheckpointError", "ConfigError", "PrefastError"]
