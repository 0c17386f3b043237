"""A progress bar for long commands: on stderr, and only when stderr is a terminal.

Piped or logged output never gets carriage returns: without a TTY the bar
prints nothing, so ``hsmbridge bench --json > out.json 2> log`` stays clean.
"""

from __future__ import annotations

import sys
from typing import IO

WIDTH = 30


class Progress:
    """``[#####.....] 5/10 text`` redrawn in place; ``close()`` ends the line."""

    def __init__(self, total: int, *, stream: IO[str] | None = None) -> None:
        self.total = max(0, total)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self._shown = False

    def update(self, done: int, text: str = "") -> None:
        """Show ``done`` of ``total`` finished, with what runs now."""
        self.done = min(done, self.total)
        if not self.enabled:
            return
        filled = WIDTH * self.done // self.total if self.total else WIDTH
        bar = "#" * filled + "." * (WIDTH - filled)
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} {text[:48]:<48}")
        self.stream.flush()
        self._shown = True

    def advance(self, n: int = 1, text: str = "") -> None:
        self.update(self.done + n, text)

    def close(self) -> None:
        """Erase the bar, so what the command prints next starts on a clean line."""
        if self.enabled and self._shown:
            self.stream.write("\r" + " " * (WIDTH + 2 * len(str(self.total)) + 53) + "\r")
            self.stream.flush()
            self._shown = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
