"""Progress of long steps: a tqdm bar for a person at a terminal, periodic log lines everywhere else.

Why both: ``feda2v cache build`` or ``feda2v generate`` run in a terminal, where a bar is right. AST
extraction or rendering inside a ClientApp or the ServerApp runs in a worker whose output reaches
the user as streamed log lines (``flwr run --stream``), where a bar becomes garbage; there a line
every few seconds says how far it got and how fast.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, total: int, desc: str, unit: str, bar: bool = False, every_s: float = 10.0) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done = 0
        self.t0 = self._last = time.perf_counter()
        self._bar = None
        if bar and total:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix({f"{self.unit}/s": f"{self.rate:.2f}"})
            return
        now = time.perf_counter()
        if now - self._last >= self.every_s and self.done < self.total:
            self._last = now
            left = (self.total - self.done) / self.rate if self.rate > 0 else float("nan")
            log.info("%s: %d/%d %s (%.0f%%), %.2f %s/s, about %.0fs left", self.desc, self.done, self.total, self.unit,
                     100 * self.done / max(self.total, 1), self.rate, self.unit, left)

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.t0, 1e-9)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
