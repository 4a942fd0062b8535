"""Progress reporting: a byte-counting bar on a terminal, nothing otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    """Counts bytes; shows a tqdm bar (bytes, rate; a total when known) only on a TTY, once the work has taken a
    second."""

    def __init__(self, total: int | None, label: str, *, enabled: bool = True):
        self.total, self.label = total, label
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.monotonic()
        self.done = 0
        self.bar = None

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is None and time.monotonic() - self.start > 1.0:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.done - n, desc=self.label, unit="B",
                            unit_scale=True, unit_divisor=1024, leave=False, file=sys.stderr)
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
