"""Wall-clock time by phase, kept out of the algorithm it measures."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from .device import synchronize


class Stopwatch:
    """Seconds per named phase; a phase may run several times (once per scale) and adds up.

    With a `device`, a phase waits for the device's queued work before it stops the clock, so
    a GPU's asynchronous work is charged to the phase that queued it.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self._started: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str, *, sync: bool = False) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            if sync and self.device is not None:
                synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def start(self, name: str) -> None:
        """Start a phase that spans others (the optimisation, over every scale), once."""
        if name not in self._started:
            if self.device is not None:
                synchronize(self.device)
            self._started[name] = time.perf_counter()

    def since(self, name: str) -> float:
        """Seconds since `start(name)`; 0 if it never started."""
        return time.perf_counter() - self._started[name] if name in self._started else 0.0

    def stop(self, name: str) -> None:
        """End a phase begun with `start` (0 seconds if it never started)."""
        self.seconds[name] = self.since(name)


__all__ = ["Stopwatch"]
