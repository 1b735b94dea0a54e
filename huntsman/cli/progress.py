"""The one progress display of the command-line tools: ``[#####     ] 12/40 stage`` on stderr.

Written here because neither ``rich`` nor ``tqdm`` is a dependency; 30 lines, shown only when
stderr is a terminal (logs, pipes and tests see nothing).
"""

from __future__ import annotations

import sys
from typing import IO

__all__ = ["Progress"]


class Progress:
    """``\\r[#####     ] 12/40 stage`` on a terminal; silent otherwise."""

    def __init__(self, total: int, label: str, stream: IO[str] | None = None, width: int = 30) -> None:
        self.total, self.label, self.width, self.done = total, label, width, 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = total > 0 and self.stream.isatty()
        self.show()

    def show(self) -> None:
        if not self.enabled:
            return
        filled = int(self.width * self.done / self.total)
        bar = "#" * filled + " " * (self.width - filled)
        print(f"\r[{bar}] {self.done}/{self.total} {self.label}", end="", file=self.stream, flush=True)

    def advance(self) -> None:
        self.done += 1
        self.show()

    def update(self, done: int) -> None:
        """Set the count (when items are counted elsewhere, e.g. a queue draining)."""
        done = max(0, min(done, self.total))
        if done != self.done:
            self.done = done
            self.show()

    def close(self) -> None:
        if self.enabled:
            print(file=self.stream, flush=True)
