"""The prefast error family, and the few validators that raise from it.

Every error a user can cause subclasses ``PrefastError(ValueError)``; the CLI turns each into
one line on stderr and exit code 2 (``DistributedError``, a failed rank rather than bad input,
exits 1). Messages name the option or field and say what to do.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable
from typing import Any


def shown(value: Any) -> str:
    """``value`` as an error quotes it (``store.errors.shown``: an array or tensor by its
    shape and dtype, anything else by its repr cut to 80 characters). The store package is
    imported only for an array: it imports torch, which ``prefast --t0 2`` need not wait for."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        from store.errors import shown as store_shown

        return store_shown(value)
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


class PrefastError(ValueError):
    """Base of prefast's errors."""


class ConfigError(PrefastError):
    """A bad option value; the message names the option (``--t0: ...``)."""


class DataError(PrefastError):
    """A dataset is unknown, missing, corrupt or has the wrong size; the message says what to do."""


class ModelError(PrefastError):
    """A model was asked for by an unknown name or with bad arguments, or built inconsistently."""


class ScheduleError(PrefastError):
    """A schedule was configured or queried with a bad value."""


class CacheError(PrefastError):
    """A cache that cannot be used: another model's store in --cache-dir, a stale fingerprint."""


class CheckpointError(PrefastError):
    """A checkpoint that is missing, unreadable, unsafe or from another configuration."""


class DistributedError(PrefastError):
    """A collective failed: another rank died, or the process group timed out."""


class RefusedByRankZero(PrefastError):
    """Under torchrun, rank 0 refused the run in a check only it makes (an output path, the
    cache folder's lock); the other ranks stop with this, quoting its reason."""


# ---- validators: one definition for config, models and the schedule ----------------------------
def check_choice(
    what: str, value: object, allowed: Iterable[object], error: type[PrefastError] = ConfigError
) -> None:
    """Raise ``error`` naming ``what`` unless ``value`` is one of ``allowed``; a string that
    differs from one only in case and separators (``fashion_mnist``, ``CIFAR-10``) is named."""
    allowed = list(allowed)
    # bool is an int, and 16.0 == 16: a choice among ints takes an int only (a float depth
    # recorded 16.0 in a model's config, so in every cache's fingerprint)
    inexact = isinstance(value, float) and not any(isinstance(a, float) for a in allowed)
    if isinstance(value, bool) or inexact or value not in allowed:
        hint = ""
        if isinstance(value, str):
            key = _letters(value)
            close = [a for a in allowed if isinstance(a, str) and _letters(a) == key]
            hint = f"; did you mean {close[0]!r}?" if len(close) == 1 else ""
        raise error(f"{what}: {value!r} is not one of {', '.join(map(str, allowed))}{hint}")


def _letters(s: str) -> str:
    """``s`` in lower case without separators: ``FashionMNIST`` and ``fashion-mnist`` alike."""
    return "".join(c for c in s.lower() if c.isalnum())


def integer(value: object) -> int | None:
    """``value`` as an int if it is an integer (a numpy one too; bools refused), else None."""
    return (
        int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else None
    )


def check_int(
    what: str,
    value: object,
    minimum: int = 1,
    error: type[PrefastError] = ConfigError,
    *,
    maximum: int | None = None,
) -> int:
    """``value`` as an int if it is an integer (a numpy one too; bools refused) >= ``minimum``
    (and <= ``maximum``, if given), else raise ``error``."""
    n = integer(value)
    if n is None or n < minimum or (maximum is not None and n > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise error(f"{what}: must be an integer {allowed}, got {shown(value)}")
    return n


def env_int(name: str, default: int, minimum: int) -> int:
    """The integer in environment variable ``name`` (``default`` where it is unset), at least
    ``minimum``, else ``ConfigError``: torchrun's variables, which a job script may set itself
    (``export WORLD_SIZE=$SLURM_NTASKS`` with the variable unset: empty)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ConfigError(
            f"{name}={raw!r} in the environment: must be an integer >= {minimum} (torchrun "
            "sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; unset them to train in "
            "one process)"
        )
    return value


def check_number(
    what: str,
    value: object,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    error: type[PrefastError] = ConfigError,
) -> float:
    """``value`` as a float if it is a finite number in [low, high] (``(low, high]`` with
    ``low_open``; a numpy one too, bools refused), else raise ``error`` naming ``what``."""
    v = math.nan
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            v = float(value)
        except OverflowError:  # an int past float's range
            v = math.inf
    ok = math.isfinite(v) and (v > low if low_open else v >= low) and v <= high
    if not ok:
        lo = "(" if low_open else "["
        rng = (
            f"in {lo}{low:g}, {high:g}]"
            if math.isfinite(high)
            else f"{'>' if low_open else '>='} {low:g}"
        )
        raise error(f"{what}: must be a finite number {rng}, got {shown(value)}")
    return v


def check_bool(what: str, value: Any, error: type[PrefastError] = ConfigError) -> bool:
    if not isinstance(value, bool):
        raise error(f"{what}: must be True or False, got {shown(value)}")
    return value


__all__ = [
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DistributedError",
    "ModelError",
    "PrefastError",
    "ScheduleError",
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
    "integer",
]
