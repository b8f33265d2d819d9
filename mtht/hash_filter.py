"""Occurrence-threshold admission (Monolith's hash filter), with exact counts."""

from __future__ import annotations

import numbers
import threading
from typing import Dict, Mapping, Optional, Tuple

from mtht._arrays import Integer, as_mapping

__all__ = ["HashFilter", "MAX_SLOT", "DEFAULT_CAPACITY"]

MAX_SLOT = 0x7FFF  # slot of an id = (id >> 48) & 0x7FFF
DEFAULT_CAPACITY = 300_000_000  # Monolith's filter's default capacity
_MAX_CAPACITY = 2**62


def _threshold(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) < 2**32:
        raise ValueError(f"{what} must be an integer in [0, 2^32), got {value!r}")
    return int(value)


class HashFilter:
    """Keeps a new id out of its table until it has been seen often enough.

    An id that is not in the table is admitted at the occurrence where at least
    ``threshold`` occurrences have been seen before (``threshold`` of the id's slot
    ``(id >> 48) & 0x7FFF``, else ``default_occurrence_threshold``; 0 admits at once). An id
    already in the table is never filtered. Counts are exact (Monolith's saturate at 15).
    The counts live with the table the filter is attached to and are saved and restored
    with it; a filter serves one table.

    The filter keeps about ``capacity`` counts at most (each takes 32 to 64 bytes): past
    that, the counts of the ids counted least recently are forgotten (their ids count from
    0 again), in two generations: a count is kept while fewer than about half of
    ``capacity`` ids have been counted since its id was last seen, and forgotten once about
    ``capacity`` have. ``stats()["filter_forgotten"]`` of the table says how many went.
    """

    def __init__(self, default_occurrence_threshold: Integer = 0,
                 slot_occurrence_thresholds: Optional[Mapping[Integer, Integer]] = None,
                 capacity: Integer = DEFAULT_CAPACITY) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral):
            raise TypeError(f"capacity must be an integer, got {type(capacity).__name__}")
        if not 1 <= int(capacity) <= _MAX_CAPACITY:
            raise ValueError(f"capacity must be in [1, 2^62], got {capacity!r}")
        self._capacity: int = int(capacity)
        self._default: int = _threshold(default_occurrence_threshold, "default_occurrence_threshold")
        self._slots: Dict[int, int] = {}
        thresholds = as_mapping(slot_occurrence_thresholds or {}, "slot_occurrence_thresholds", "{slot: threshold}")
        for slot, threshold in thresholds.items():
            if isinstance(slot, bool) or not isinstance(slot, numbers.Integral) or not 0 <= int(slot) <= MAX_SLOT:
                raise ValueError(f"slot must be an integer in [0, {MAX_SLOT}], got {slot!r}")
            self._slots[int(slot)] = _threshold(threshold, f"threshold of slot {slot}")
        self._owner: Optional[str] = None
        self._lock: threading.Lock = threading.Lock()

    @property
    def default_occurrence_threshold(self) -> int:
        """Occurrences an absent id of a slot without its own threshold needs before it is
        admitted (0: at once)."""
        return self._default

    @property
    def slot_occurrence_thresholds(self) -> Dict[int, int]:
        """A new dict of the slots' own thresholds, ``{slot: occurrences}``."""
        return dict(self._slots)

    @property
    def capacity(self) -> int:
        """About the most counts the filter keeps."""
        return self._capacity

    def thresholds(self) -> Tuple[int, Dict[int, int]]:
        """(default threshold, {slot: threshold}) as the core takes them."""
        return self._default, dict(self._slots)

    def attach(self, table_name: str) -> None:
        """Bind the filter to one table; a second table raises ValueError."""
        with self._lock:
            if self._owner is not None:
                raise ValueError(f"this HashFilter already serves table {self._owner!r}; "
                                 "give each table its own filter")
            self._owner = table_name

    def __reduce__(self):
        """A copy (copy, deepcopy, pickle) has the settings and serves no table yet: a filter
        serves one table, and its counts live with that table."""
        return type(self), (self._default, dict(self._slots), self._capacity)

    def __repr__(self) -> str:
        return (f"HashFilter(default_occurrence_threshold={self._default}, "
                f"slot_occurrence_thresholds={self._slots}, capacity={self._capacity})")
