"""The progress bar of ``tallytrain run / compare / pareto``, on stderr."""

from __future__ import annotations

import sys
import time

from .. import report


class Progress:
    """One line per state of the runs: on a terminal, a bar redrawn in place;
    without one (a CI log, ``nohup``, a pipe), a plain line every ``every``
    rounds and whenever a run finishes, so that a log shows a slow run
    moving and does not fill up with a fast one."""

    def __init__(self, total: int, enabled: bool = True, stream=None, every: int = 5):
        self.total, self.done = max(total, 1), 0
        self.skipped = 0  # rounds finished by an earlier invocation (resume)
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = max(1, int(every))
        self.since_line = 0  # rounds advanced since the last plain line
        self.start = time.perf_counter()

    def advance(
        self, label: str, n: int = 1, run_finished: bool = False, skipped: bool = False
    ) -> None:
        self.done += n
        self.since_line += n
        if skipped:
            self.skipped += n
        if not self.enabled:
            return
        if not self.tty and not (run_finished or self.since_line >= self.every):
            return
        self.since_line = 0
        elapsed = time.perf_counter() - self.start
        worked = self.done - self.skipped
        eta = elapsed / worked * (self.total - self.done) if worked else 0.0
        frac = self.done / self.total
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        line = (
            f"[{bar}] {100 * frac:5.1f}% {self.done}/{self.total} rounds  {label}  "
            f"elapsed {report.fmt_seconds(elapsed)} eta {report.fmt_seconds(eta)}"
        )
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
