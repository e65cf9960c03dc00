"""Stopping a run from outside, at a point where nothing is half done.

A signal handler that raised at once could stop the main thread anywhere: while it waits for
zarr's I/O thread to create a store, say, which then goes on writing files after the run has
removed its folder. So ``request_stop`` (what ``prefast train``'s SIGTERM and Ctrl-C handlers
call; a program driving ``train`` may call it too) only records the request, and the run raises
``Stopped`` at its next safe point: before a training step, an evaluation batch, a batch of a
cache pass or a round of the planner's probes. The run's clean-up then runs as for any error: a
store being written stays incomplete, a temporary cache folder is removed.
"""

from __future__ import annotations

import signal

from prefast.errors import PrefastError


class Stopped(BaseException):
    """The run stopped at a safe point because ``request_stop(signum)`` was called. A
    ``BaseException``, like ``KeyboardInterrupt``: ``except Exception`` does not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


_requested: int | None = None


class StoppedAtOnce(Stopped, KeyboardInterrupt):
    """A second stop signal, raised at once wherever the run is. Also a ``KeyboardInterrupt``,
    which code that catches every other exception lets through: tqdm's logging handler took a
    plain ``Stopped`` raised while it wrote a line for an error of its own (a "--- Logging
    error ---" traceback), and the run went on."""


def request_stop(signum: int = signal.SIGTERM) -> None:
    """Ask the run to stop at its next safe point (safe to call from a signal handler).
    ``signum`` is a signal (``signal.SIGTERM``, or its number): the stop says which."""
    global _requested
    try:
        _requested = int(signal.Signals(signum))
    except (ValueError, TypeError):  # failed later, where the run stopped, with no hint
        raise PrefastError(
            f"request_stop: {signum!r} is not a signal (e.g. signal.SIGTERM)"
        ) from None


def requested() -> int | None:
    """The signal a stop was requested with, or None."""
    return _requested


def clear() -> None:
    """Forget a request (before a new run in the same process)."""
    global _requested
    _requested = None


def check() -> None:
    """Raise ``Stopped`` where a stop was requested."""
    if _requested is not None:
        raise Stopped(_requested)


__all__ = ["Stopped", "StoppedAtOnce", "check", "clear", "request_stop", "requested"]
