"""Progress of a run: what the running LLM call has done, reported by the LLM step and shown by a
live line per stage that also counts Spark's tasks."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass


@dataclass
class CallProgress:
    call: str
    chunk: int
    chunks: int
    rows_in: int
    rows_written: int = 0


class Progress:
    """The running LLM call's progress: the LLM step writes it, the progress line reads it (from
    another thread, so every read and write holds the lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._call: CallProgress | None = None

    def start_call(self, call: str, chunks: int, rows_in: int) -> None:
        with self._lock:
            self._call = CallProgress(call, 0, chunks, rows_in)

    def chunk(self, index: int) -> None:
        with self._lock:
            if self._call is not None:
                self._call.chunk = index

    def rows_written(self, rows: int) -> None:
        with self._lock:
            if self._call is not None:
                self._call.rows_written = rows

    def current(self) -> CallProgress | None:
        with self._lock:
            return None if self._call is None else CallProgress(**vars(self._call))


class ProgressLine:
    """A live line per stage: tasks done of total in the running Spark stages, and rows committed
    of the rows to do in the current LLM call."""

    def __init__(self, spark, stage: str, progress: Progress, every_s: float | None = None) -> None:
        self.spark, self.stage, self.progress = spark, stage, progress
        self.tty = sys.stderr.isatty()
        self.every_s = every_s or (2.0 if self.tty else 15.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def line(self) -> str | None:
        tracker = self.spark.sparkContext.statusTracker()
        done = total = 0
        for stage_id in tracker.getActiveStageIds():
            info = tracker.getStageInfo(stage_id)
            if info is not None:
                done += info.numCompletedTasks
                total += info.numTasks
        parts = [f"[{self.stage}]"]
        call = self.progress.current()
        if call is not None:
            parts.append(f"{call.call} chunk {call.chunk}/{call.chunks}, "
                         f"rows committed {call.rows_written}/{call.rows_in}")
        if total:
            parts.append(f"tasks {done}/{total}")
        return " ".join(parts) if len(parts) > 1 else None

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                text = self.line()
            except Exception:  # noqa: BLE001 - progress must never break a run
                text = None
            if text:
                print(("\r" + text.ljust(100)) if self.tty else text, end="" if self.tty else "\n",
                      file=sys.stderr, flush=True)

    def __enter__(self) -> ProgressLine:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.tty:
            print("\r" + " " * 100 + "\r", end="", file=sys.stderr, flush=True)
