"""What ``encode`` shows while it runs: a bar on a terminal, a plain line every few seconds elsewhere.

Discovery streams (a folder of millions of files is never listed up front), so the total is counted beside the
job: a background thread walks the same inputs again (``count_inputs``) and hands the total over when it is done.
The first image never waits for the count, a listing costs far less than encoding, and a stream on standard input,
which can be read only once, gets no total (done and the rate only).

Where stderr is not a terminal (nohup, CI, a pipe into a file) a bar would write a carriage return per update, so
a plain line is printed instead, at most every ``GEMMA3_VISION_PROGRESS_SECONDS`` (5 by default):
``progress: 120/400 inputs (30%), 3.2 images/s, about 1 min 27 s left``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from .pipeline import JobSummary, speed_text

DEFAULT_INTERVAL_S = 5.0
INTERVAL_VARIABLE = "GEMMA3_VISION_PROGRESS_SECONDS"


def processed(summary: JobSummary) -> int:
    """Inputs the job is through with, of every kind (encoded, failed, skipped, already done)."""
    return summary.encoded + summary.failed + summary.failed_before + summary.skipped + summary.done_before


def duration(seconds: float) -> str:
    """``1 h 02 min``, ``3 min 07 s``, ``12 s``."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


class Progress:
    """Fed the job's summary after each input (``update``, from the job's writer thread); told the total whenever
    the count finishes (``set_total``, from the counting thread)."""

    def __init__(self, stream: TextIO, *, terminal: bool | None = None, interval: float | None = None):
        self.stream = stream
        self.terminal = stream.isatty() if terminal is None else terminal
        if interval is None:
            try:
                interval = float(os.environ.get(INTERVAL_VARIABLE, DEFAULT_INTERVAL_S))
            except ValueError:
                interval = DEFAULT_INTERVAL_S
        self.interval = interval
        self.total: int | None = None
        self.start = time.monotonic()
        self._last_line = self.start
        self._lock = threading.Lock()
        self._bar: Any = None
        if self.terminal:
            from tqdm import tqdm

            self._bar = tqdm(unit="img", desc="encoding", file=stream, dynamic_ncols=True)

    def set_total(self, total: int) -> None:
        with self._lock:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
                self._bar.refresh()

    def update(self, summary: JobSummary) -> None:
        done = processed(summary)
        with self._lock:
            if self._bar is not None:
                self._bar.update(done - self._bar.n)
                return
            now = time.monotonic()
            if now - self._last_line >= self.interval:
                self._last_line = now
                print(self.line(summary, now - self.start), file=self.stream, flush=True)

    def line(self, summary: JobSummary, elapsed: float) -> str:
        """``progress: DONE/TOTAL inputs (P%), R images/s, about T left`` (no total yet: ``DONE inputs``)."""
        done = processed(summary)
        rate = summary.encoded / elapsed if elapsed > 0 else 0.0
        speed = speed_text(rate)
        if self.total is None:
            return f"progress: {done} inputs, {speed}"
        text = f"progress: {done}/{self.total} inputs ({100 * done / max(self.total, 1):.0f}%), {speed}"
        if 0 < done < self.total:
            text += f", about {duration((self.total - done) * elapsed / done)} left"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def count_inputs(arguments: Callable[[], Iterable[Any]], on_total: Callable[[int], None]) -> threading.Event:
    """Count ``arguments()`` (discovered inputs) on a daemon thread and call ``on_total(n)`` when done. Returns an
    event that stops the count early (the job ended first)."""
    stop = threading.Event()

    def run() -> None:
        n = 0
        try:
            for _ in arguments():
                if stop.is_set():
                    return
                n += 1
        except Exception:  # the job itself reports what cannot be read; the bar just gets no total
            return
        on_total(n)

    threading.Thread(target=run, name="gemma3-vision-count", daemon=True).start()
    return stop

