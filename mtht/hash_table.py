"""One embedding hash table: Monolith's ``BaseHashTable`` / ``HashTable`` API over the C++ core.

Writes change the table in place and return it, so Monolith-style chains
(``t = t.assign_add(...)``) work unchanged.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from typing import Dict, List, Optional

import numpy as np

from mtht import _core
from mtht._arrays import as_ids, as_int64_scalar, as_out, as_rows
from mtht._spec import core_segments, split_state

__all__ = ["BaseHashTable", "HashTable", "EntryDump", "hash_table_from_config"]


@dataclasses.dataclass
class EntryDump:
    """What a table stores for one id (``lookup_entry``)."""

    id: int
    values: np.ndarray
    optimizer_state: List[Dict[str, np.ndarray]]
    last_update_ts: int


class BaseHashTable(abc.ABC):
    """The interface every single table offers (Monolith's ``BaseHashTable``)."""

    @abc.abstractmethod
    def assign(self, ids, values, req_time=None) -> "BaseHashTable":
        ...

    @abc.abstractmethod
    def assign_add(self, ids, values, req_time=None) -> "BaseHashTable":
        ...

    @abc.abstractmethod
    def lookup(self, ids, use_multi_threads=False, enable_dedup=False, out=None) -> np.ndarray:
        ...

    @property
    @abc.abstractmethod
    def dim_size(self) -> int:
        ...

    @abc.abstractmethod
    def apply_gradients(self, ids, grads, global_step, use_multi_threads=False, enable_dedup=False,
                        req_time=None) -> "BaseHashTable":
        ...

    @abc.abstractmethod
    def as_op(self):
        ...


def _req_time(req_time) -> int:
    return 0 if req_time is None else as_int64_scalar(req_time, "req_time")


class HashTable(BaseHashTable):
    """An embedding table from int64 id to [values | optimizer state | timestamp].

    Build it with :func:`hash_table_from_config`. Every batch call releases the GIL and is
    safe to call from many threads at once.
    """

    def __init__(self, config, name: str, saver_parallel: int = -1):
        config.validate()
        table_config = config.table_config
        self._config = config
        self._name = name
        self._saver_parallel = saver_parallel
        self._core = _core.Table(
            core_segments(table_config),
            random_seed=int(table_config.random_seed),
            allow_non_finite=bool(table_config.allow_non_finite),
            initial_capacity=int(table_config.initial_capacity),
        )
        self._dim = self._core.dim

    # -- properties ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def dim_size(self) -> int:
        return self._dim

    @property
    def extra_restore_names(self) -> List[str]:
        return self._config.extra_restore_names

    @property
    def config(self):
        return self._config

    @property
    def max_update_ts(self) -> int:
        """The largest ``req_time`` any write has used (0 before the first write)."""
        return self._core.max_update_ts

    def __repr__(self) -> str:
        return f"HashTable(name={self._name!r}, dim_size={self._dim}, size={self.size()})"

    # -- reads -----------------------------------------------------------------------------
    def lookup(self, ids, use_multi_threads=False, enable_dedup=False, out=None) -> np.ndarray:
        """float32 ``[N, dim]``: the stored values; a missing id reads as zeros and is not
        inserted. ``use_multi_threads`` and ``enable_dedup`` are accepted for Monolith
        compatibility; threading follows :func:`mtht.set_num_threads` and never changes
        results."""
        ids = as_ids(ids)
        n = ids.shape[0]
        if out is None:
            out = np.empty((n, self._dim), dtype=np.float32)
        else:
            out = as_out(out, n, self._dim)
        self._core.lookup(ids, out)
        return out

    def contains(self, ids) -> np.ndarray:
        """bool ``[N]``: whether each id has an entry."""
        return self._core.contains(as_ids(ids))

    def size(self) -> int:
        """Number of entries."""
        return self._core.size()

    def __len__(self) -> int:
        return self.size()

    def stats(self) -> dict:
        """Size, index capacity, memory and layout figures of the table."""
        st = self._core.stats()
        st["load_factor"] = st["size"] / st["capacity"] if st["capacity"] else 0.0
        st["bytes"] = st["index_bytes"] + st["row_bytes"]
        st["dim"] = self._dim
        st["state_floats"] = self._core.state_dim
        return st

    def lookup_entry(self, ids) -> List[Optional[EntryDump]]:
        """Per id: an :class:`EntryDump` (raw values, optimizer state by segment, timestamp),
        or ``None`` when the id has no entry."""
        ids = as_ids(ids)
        values, state, ts, found = self._core.lookup_entries(ids)
        table_config = self._config.table_config
        return [
            EntryDump(int(ids[k]), values[k].copy(), split_state(table_config, state[k]), int(ts[k]))
            if found[k] else None
            for k in range(ids.shape[0])
        ]

    # -- writes ----------------------------------------------------------------------------
    def assign(self, ids, values, req_time=None) -> "HashTable":
        """Set rows (upsert; the last duplicate wins). Optimizer state is kept for existing
        ids and initialised for new ones. The timestamp becomes ``req_time`` (default 0)."""
        ids = as_ids(ids)
        rows = as_rows(values, ids.shape[0], self._dim, "values")
        self._core.assign(ids, rows, _req_time(req_time))
        return self

    def assign_add(self, ids, values, req_time=None) -> "HashTable":
        """Add rows (upsert; a new entry is initialised first; duplicates accumulate)."""
        ids = as_ids(ids)
        rows = as_rows(values, ids.shape[0], self._dim, "values")
        self._core.assign_add(ids, rows, _req_time(req_time))
        return self

    def apply_gradients(self, ids, grads, global_step, use_multi_threads=False, enable_dedup=False,
                        req_time=None) -> "HashTable":
        """One optimizer step per occurrence in input order, or with ``enable_dedup`` one
        step per unique id with its gradients summed left to right. Missing ids are created
        with the initializer, then stepped. Learning rates come from the config's
        learning-rate functions at ``global_step``."""
        ids = as_ids(ids)
        rows = as_rows(grads, ids.shape[0], self._dim, "grads")
        step = as_int64_scalar(global_step, "global_step")
        lrs = self._config.call_learning_rate_fns(step)
        self._core.apply_gradients(ids, rows, np.ascontiguousarray(lrs, dtype=np.float32), step,
                                   _req_time(req_time), bool(enable_dedup))
        return self

    def reinitialize(self, ids, req_time=None) -> np.ndarray:
        """Reset values and optimizer state to their initial values (inserting new ids).
        Returns int32 status per id: 0 inserted, 1 existed. The timestamp becomes
        ``req_time``, or the wall clock when it is None."""
        ids = as_ids(ids)
        ts = int(time.time()) if req_time is None else as_int64_scalar(req_time, "req_time")
        return self._core.reinitialize(ids, ts)

    def as_op(self) -> "HashTable":
        """Every write has been applied when this returns; returns the table."""
        return self


def hash_table_from_config(config, hash_filter=None, name_suffix: str = "", saver_parallel: int = -1) -> HashTable:
    """Build a :class:`HashTable` from a ``HashTableConfigInstance``.

    Raises ValueError for an invalid config (e.g. the number of learning-rate functions
    differs from the number of segments) and NotImplementedError for a feature this version
    cannot train with.
    """
    if hash_filter is not None:
        raise NotImplementedError("hash filters are not available in this version of mtht")
    return HashTable(config, name="MonolithHashTable_" + str(name_suffix), saver_parallel=saver_parallel)
