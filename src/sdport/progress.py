"""Progress reporting on a terminal, nothing otherwise: a byte-counting bar (weights streamed, downloads) whose label
names the stage (weights of one file, its graph written), and a stage bar over named steps (components traced).

A bar appears only when stderr is a TTY and its step has taken ``THRESHOLD`` seconds; from then a
ticker thread redraws it every ``TICK`` seconds, so a long step with no count to report (one
component traced) still shows its label and elapsed time. With stderr not a TTY no bar, no thread.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

#: seconds a step runs before its bar appears
THRESHOLD = 1.0
#: seconds between redraws of a shown bar (its elapsed time moves while nothing is counted)
TICK = 0.5


class _Bar:
    """A tqdm bar made lazily once ``THRESHOLD`` has passed (on a TTY only), redrawn by a ticker thread."""

    def __init__(self, label: str, enabled: bool, **tqdm_args: Any):
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.monotonic()
        self.bar = None
        self._args = tqdm_args
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._ticker = None
        if self.enabled:
            self._ticker = threading.Thread(target=self._tick, name="sdport-progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._closed.wait(TICK):
            with self._lock:
                if not self._closed.is_set() and self._shown():
                    self.bar.refresh()

    def _shown(self) -> bool:
        """Whether the bar is on screen, making it if its time has come (call with the lock held)."""
        if self.bar is None and self.enabled and time.monotonic() - self.start > THRESHOLD:
            from tqdm import tqdm

            self.bar = tqdm(desc=self.label, leave=False, file=sys.stderr, **self._args, **self._counts())
        return self.bar is not None

    def _counts(self) -> dict[str, int | None]:
        return {}

    def stage(self, label: str) -> None:
        """Name what is being done now: the bar's label."""
        self.label = label
        if not self.enabled:
            return
        with self._lock:
            if self._shown():
                self.bar.set_description_str(label)

    def close(self) -> None:
        self._closed.set()
        if self._ticker is not None:
            self._ticker.join()
        if self.bar is not None:
            self.bar.close()


class Progress(_Bar):
    """Counts bytes; shows a tqdm bar (bytes, rate; a total when known) only on a TTY, once the work has taken
    ``THRESHOLD`` seconds. ``stage`` relabels it (which file, weights or graph)."""

    def __init__(self, total: int | None, label: str, *, enabled: bool = True):
        self.total = total
        self.done = 0
        super().__init__(label, enabled, unit="B", unit_scale=True, unit_divisor=1024)

    def _counts(self) -> dict[str, int | None]:
        return {"total": self.total, "initial": self.done}

    def update(self, n: int) -> None:
        if not self.enabled:
            self.done += n
            return
        with self._lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
            else:
                self._shown()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Stages(_Bar):
    """Steps of a stage (components traced): each says ``VERB NAME`` on stderr as it starts, as a line wherever
    stderr goes and, on a TTY once ``THRESHOLD`` has passed, as a bar ``VERB NAME (2/4)`` with elapsed time."""

    def __init__(self, verb: str, *, enabled: bool = True):
        self.verb = verb
        self.index, self.total = 0, 0
        self.say = enabled
        super().__init__(verb, enabled, bar_format="{desc} |{bar}| [{elapsed}]")

    def _counts(self) -> dict[str, int | None]:
        return {"total": self.total, "initial": max(self.index - 1, 0)}

    def step(self, name: str, index: int, total: int) -> None:
        """Step ``index`` of ``total`` (from 1), ``name``, begins; the previous one is done."""
        if not self.say:
            return
        line = f"{self.verb} {name}"
        if self.bar is None:
            print(line, file=sys.stderr)
        else:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)
        self.index, self.total = index, total
        if self.enabled:
            with self._lock:
                if self.bar is not None:
                    self.bar.total = total
                    self.bar.n = index - 1
            self.stage(f"{line} ({index}/{total})")

    def __enter__(self) -> Stages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
