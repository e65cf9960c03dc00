"""The run's structured outputs: one JSON record per epoch and a summary in a JSONL file,
with the run's config (defaults filled in) saved beside it."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from store.tools.inspect import strict_json


def config_path(metrics: str | os.PathLike[str]) -> Path:
    """Where the config of a run with metrics file ``metrics`` is saved: ``STEM.config.json``
    beside it."""
    p = Path(metrics)
    return p.parent / (p.stem + ".config.json")


class MetricsSink:
    """Writes JSON lines to ``path`` (``None``: discards them), with ``STEM.config.json``
    beside it holding the config. The file starts with ``records`` (a resumed run's epochs,
    as its checkpoint holds them), so a resume after a crash never repeats an epoch's line."""

    def __init__(
        self, path: str | None, config: dict[str, Any], records: Sequence[dict[str, Any]] = ()
    ) -> None:
        self.path = Path(path) if path else None
        self._f: IO[str] | None = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        config_path(self.path).write_text(json.dumps(config, indent=2) + "\n")
        self._f = open(self.path, "w")  # noqa: SIM115 (closed in close())
        for r in records:
            self.write(r)

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> MetricsSink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["MetricsSink", "config_path"]
