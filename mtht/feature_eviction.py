"""Background eviction of expired entries, as Monolith's ``enable_feature_eviction``."""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

__all__ = ["FeatureEvictor"]


class FeatureEvictor:
    """Calls ``table.evict()`` (expiry judged at the table's ``max_update_ts``) every
    ``period_seconds`` on a daemon thread. The first poll only records the time, as in
    Monolith. The thread holds the table weakly and ends when the table is gone or
    :meth:`stop` is called."""

    def __init__(self, table: Any, period_seconds: float, poll_seconds: float = 10.0) -> None:
        if not period_seconds > 0:
            raise ValueError(f"period_seconds must be > 0, got {period_seconds}")
        if not poll_seconds > 0:  # 0 would spin the thread
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        if not callable(getattr(table, "evict", None)):  # a multi-type table: one evictor per slot table
            raise TypeError(f"a FeatureEvictor needs a table with evict(), got {type(table).__name__} (give it "
                            "each slot's table)")
        self._table = weakref.ref(table)
        self._period = float(period_seconds)
        self._poll = min(float(poll_seconds), self._period)
        self._stop = threading.Event()
        self.evicted = 0  # entries removed so far
        self.runs = 0
        self._thread = threading.Thread(target=self._loop, name="mtht-feature-eviction", daemon=True)
        self._thread.start()
        # The thread ends as soon as the table is gone, not at its next poll: a loop that
        # builds and drops tables would otherwise keep a thread for each for seconds.
        weakref.finalize(table, self._stop.set)

    def _loop(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self._poll):
            table = self._table()
            if table is None:
                return
            if time.monotonic() - last >= self._period:
                self.evicted += table.evict()
                self.runs += 1
                last = time.monotonic()
            del table

    def stop(self) -> None:
        """End the thread, waiting for an eviction under way."""
        self._stop.set()
        self._thread.join()
