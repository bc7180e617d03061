"""Optional per-stage timing of case generation, for the benchmark (off unless collected)."""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager

_SINK: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("synth_timings", default=None)


@contextmanager
def stage(name: str) -> Iterator[None]:
    sink = _SINK.get()
    if sink is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        sink[name] = sink.get(name, 0.0) + time.perf_counter() - start


@contextmanager
def collect() -> Iterator[dict[str, float]]:
    """Collect stage durations (seconds) of everything generated inside the block."""
    sink: dict[str, float] = {}
    token = _SINK.set(sink)
    try:
        yield sink
    finally:
        _SINK.reset(token)
