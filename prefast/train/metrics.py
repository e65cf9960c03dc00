"""The run's structured outputs: one JSON record per epoch and a summary in a JSONL file,
with the resolved config saved beside it."""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import IO, Any


class MetricsSink:
    """Appends JSON lines to ``path`` (``None``: discards them). On a fresh run the file is
    rewritten and ``STEM.config.json`` beside it holds the config; on resume it is appended."""

    def __init__(self, path: str | None, config: dict[str, Any], resume: bool) -> None:
        self.path = Path(path) if path else None
        self._f: IO[str] | None = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.path.parent / (self.path.stem + ".config.json")).write_text(
            json.dumps(config, indent=2) + "\n"
        )
        self._f = open(self.path, "a" if resume else "w")  # noqa: SIM115 (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
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


__all__ = ["MetricsSink"]
