"""Progress lines for long stages: counts, rate and ETA; quiet on request; plain in CI logs.

On a terminal the line is redrawn in place; when output is not a terminal (CI logs, files) a new
line is printed at most every 10% of the work, with no control characters.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def read_epoch_log(path: Path) -> list[dict[str, Any]]:
    """The per-epoch metrics a training run appends to ``progress.jsonl`` (none yet: empty)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def epoch_history(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per epoch, in epoch order: a worker group restarted from an earlier checkpoint
    logs the epochs after it again, and the later record is the one the run continued from."""
    return sorted({record["epoch"]: record for record in records}.values(), key=lambda record: record["epoch"])


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _rate(per_second: float, unit: str) -> str:
    """``12.5 videos/s``, or for slow work the time per item: ``26.4 s/trial``."""
    if 0 < per_second < 1:
        return f"{1 / per_second:.1f} s/{unit.removesuffix('s')}"
    return f"{per_second:.1f} {unit}/s"


class Progress:
    """``Progress(total, "videos")``; call ``update(n)`` as work completes and ``close()`` at the end.

    Without a ``stream`` it writes to whatever ``sys.stdout`` is when it writes, and holds no
    reference to it: Tune pickles its callbacks, and a notebook's or pytest's stdout cannot be
    pickled."""

    def __init__(self, total: int, unit: str, label: str = "", quiet: bool = False,
                 stream: TextIO | None = None) -> None:
        self.total, self.unit, self.label, self.quiet = total, unit, label, quiet
        self._stream = stream
        self.done = 0
        self.skipped = 0            # work found already done: counted, but not in the rate
        self.start = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._next_tenth = 1        # without a terminal, the next line comes at this many tenths

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return (self.done - self.skipped) / elapsed if elapsed > 0 else 0.0

    def skip(self, n: int) -> None:
        """Count ``n`` units of work that were already done (a resumed stage)."""
        self.done += n
        self.skipped += n

    def line(self) -> str:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else (0.0 if self.done >= self.total else float("nan"))
        eta_text = _duration(eta) if eta == eta else "?"
        return (f"{self.label}{self.done}/{self.total} {self.unit} "
                f"({_rate(rate, self.unit)}, elapsed {_duration(time.perf_counter() - self.start)}, ETA {eta_text})")

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.quiet:
            return
        if self.tty:
            self.stream.write("\r" + self.line())
            self.stream.flush()
        elif self.total and self.done * 10 >= self._next_tenth * self.total:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._next_tenth = self.done * 10 // self.total + 1

    def close(self) -> None:
        if not self.quiet and self.tty:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()
