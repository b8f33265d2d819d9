"""One embedding hash table: Monolith's ``BaseHashTable`` / ``HashTable`` API over the C++ core.

Writes change the table in place and return it, so Monolith-style chains
(``t = t.assign_add(...)``) work unchanged.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import numbers
import os
import threading
import time
from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np

from mtht import _core
from mtht._arrays import (ArrayInput, IntegerInput, StrPath, Switch, as_flag, as_ids, as_int64_scalar,
                          as_numpy_floats, as_out, as_rows)
from mtht._spec import core_segments, split_state
from mtht.entry import HashTableConfigInstance
from mtht.feature_eviction import FeatureEvictor
from mtht.hash_filter import HashFilter
from mtht.hooks import QueueHooks

__all__ = ["BaseHashTable", "HashTable", "EntryDump", "TableWrite", "WriteArguments", "lookup_all", "write_all",
           "write_parts", "write_arguments", "hash_table_from_config", "fused_lookup", "fused_apply_gradient"]


@dataclasses.dataclass
class EntryDump:
    """What a table stores for one id (``lookup_entry``)."""

    id: int
    values: np.ndarray
    optimizer_state: List[Dict[str, np.ndarray]]
    last_update_ts: int


class NotCopyable:
    """A table's entries live in the C++ core: a shallow copy would share them without
    saying so, and a deep copy or a pickle would have to write them all. Both are refused;
    a checkpoint is the way to copy a table."""

    def _refuse(self, *_):
        raise TypeError(f"a {type(self).__name__} cannot be copied or pickled: save it and restore the checkpoint "
                        "into a new table (mtht.checkpoint.save_multi_type for a multi-type table)")

    __copy__ = __deepcopy__ = __reduce__ = __reduce_ex__ = _refuse


class BaseHashTable(NotCopyable, QueueHooks, abc.ABC):
    """The interface every single table offers (Monolith's ``BaseHashTable``)."""

    @abc.abstractmethod
    def assign(self, ids: ArrayInput, values: ArrayInput, req_time: Optional[IntegerInput] = None) -> "BaseHashTable":
        """Set the values of ``ids`` (inserting the absent ones); returns the table."""

    @abc.abstractmethod
    def assign_add(self, ids: ArrayInput, values: ArrayInput,
                   req_time: Optional[IntegerInput] = None) -> "BaseHashTable":
        """Add ``values`` to the values of ``ids`` (inserting the absent ones); returns the
        table."""

    @abc.abstractmethod
    def lookup(self, ids: ArrayInput, use_multi_threads: Switch = False, enable_dedup: Switch = False,
               out: Optional[np.ndarray] = None) -> np.ndarray:
        """float32 ``[len(ids), dim_size]``: the values of ``ids``, zeros for absent ones."""

    @property
    @abc.abstractmethod
    def dim_size(self) -> int:
        """Values per entry: the dims of all segments."""

    @abc.abstractmethod
    def apply_gradients(self, ids: ArrayInput, grads: ArrayInput, global_step: IntegerInput,
                        use_multi_threads: Switch = False, enable_dedup: Switch = False,
                        req_time: Optional[IntegerInput] = None) -> "BaseHashTable":
        """One optimizer step of ``ids`` with ``grads`` at ``global_step``; returns the
        table."""

    @abc.abstractmethod
    def as_op(self) -> Any:
        """Wait until every write issued has been applied."""


def _req_time(req_time=None) -> int:
    return 0 if req_time is None else as_int64_scalar(req_time, "req_time")


class WriteArguments(NamedTuple):
    """What a write's arguments after the ids and the rows come to (write_arguments)."""

    global_step: int
    dedup: bool
    req_time: int


def _assign_arguments(req_time=None) -> WriteArguments:
    return WriteArguments(0, False, _req_time(req_time))


def _apply_arguments(global_step, use_multi_threads=False, enable_dedup=False, req_time=None) -> WriteArguments:
    as_flag(use_multi_threads, "use_multi_threads")
    return WriteArguments(as_int64_scalar(global_step, "global_step"), as_flag(enable_dedup, "enable_dedup"),
                          _req_time(req_time))


_WRITE_SIGNATURES = {
    "assign": "(slot_to_id_and_value, req_time=None)",
    "assign_add": "(slot_to_id_and_value, req_time=None)",
    "apply_gradients": "(slot_to_id_and_grad, global_step, use_multi_threads=False, enable_dedup=False, "
                       "req_time=None)",
}


def write_arguments(method: str, *args: Any, **kwargs: Any) -> WriteArguments:
    """The arguments of ``method`` (``"assign"``, ``"assign_add"`` or ``"apply_gradients"``)
    after the ids and the rows, converted: once for all the tables of a multi-slot write."""
    if method not in _WRITE_SIGNATURES:
        raise ValueError(f"unknown write {method!r}")
    convert = _apply_arguments if method == "apply_gradients" else _assign_arguments
    try:
        return convert(*args, **kwargs)
    except TypeError as e:
        if e.__traceback__ is not None and e.__traceback__.tb_next is None:  # the call's own arguments
            raise TypeError(f"{method}{_WRITE_SIGNATURES[method]}: "
                            f"{str(e).split('() ', 1)[-1]}") from None
        raise


@dataclasses.dataclass
class TableWrite:
    """One table's write, its arguments converted (:meth:`HashTable.prepare_write`). NaN/Inf,
    the capacity and the step are checked when it is applied (:func:`write_all`)."""

    core: _core.Table
    method: str  # "assign", "assign_add" or "apply_gradients"
    ids: np.ndarray
    rows: np.ndarray  # values, or gradients
    learning_rates: Optional[np.ndarray]  # apply_gradients: one per segment
    global_step: int
    req_time: int
    dedup: bool

    def apply(self) -> None:
        """Make the write (its arguments checked already)."""
        _apply_one(self.core, self.method, self.ids, self.rows, self.learning_rates, self.global_step,
                   self.req_time, self.dedup)


def _apply_one(core, method: str, ids, rows, learning_rates, global_step: int, req_time: int, dedup: bool) -> None:
    if method == "apply_gradients":
        core.apply_gradients(ids, rows, learning_rates, global_step, req_time, dedup)
    else:
        getattr(core, method)(ids, rows, req_time)


# Held while the tables of a model take new contents together (a restore) and while a call
# over several tables picks up theirs, so that such a call reaches every table as it was
# before the restore, or every table as the restore left it (never some of each).
_CONTENTS = threading.Lock()


def _new_contents_lock() -> None:
    # A forked child has none of its parent's other threads, which may have held it.
    global _CONTENTS
    _CONTENTS = threading.Lock()


os.register_at_fork(after_in_child=_new_contents_lock)


def swap_contents(pairs) -> None:
    """Give each table of the ``(table, core)`` pairs its new contents, at once for the calls
    over several tables, once the writes under way and a save of the old contents are done
    (writes_held)."""
    pairs = list(pairs)
    held: List[Any] = []
    with _CONTENTS:
        try:
            _core.hold_writes([table._core for table, _ in pairs], held)
            for table, core in pairs:
                table._swap_core(core)
        finally:
            _core.release_writes(held)


def _contents_of(tables) -> list:
    """The cores of ``tables``, all before or all after any swap_contents."""
    with _CONTENTS:
        return [t._core for t in tables]


@contextlib.contextmanager
def writes_held(tables) -> Iterator[None]:
    """Within: no write to any of ``tables`` is under way or starts, and their contents stay
    (a save of them holds each write whole or not at all). The writes wait; reads go on."""
    held: List[Any] = []
    try:
        while True:
            cores = _contents_of(tables)
            _core.hold_writes(cores, held)
            # A restore that swapped a table's contents before its gate was held: again, with
            # the new ones (a swap waits for the gates held here: swap_contents).
            if all(t._core is core for t, core in zip(tables, cores)):
                break
            _core.release_writes(held)
        yield
    finally:
        _core.release_writes(held)


def lookup_all(tables: List["HashTable"], ids_list: List) -> List[np.ndarray]:
    """``table.lookup(ids)`` for each table and its ids, in one call of the core (the tables'
    lookups share the threads). The results are views of one array, each starting on a
    64-byte boundary."""
    if len(tables) != len(ids_list):
        raise ValueError(f"lookup_all needs one ids array per table: {len(tables)} tables, {len(ids_list)} arrays")
    _after_queued_calls_of(tables)
    ids_list = [as_ids(ids) for ids in ids_list]
    outs = rows_in_one_array([(ids.shape[0], t._dim) for t, ids in zip(tables, ids_list)])
    _core.lookup_tables(_contents_of(tables), ids_list, outs)
    return outs


def _after_queued_calls_of(tables) -> None:
    """Each table's _after_queued_calls, once for a run of tables that share a pipeline (the
    slot tables of a model)."""
    checked = None
    for table in tables:
        if table._mtht_pipeline is not checked:
            table._after_queued_calls()
            checked = table._mtht_pipeline


def rows_in_one_array(shapes) -> List[np.ndarray]:
    """Uninitialised float32 arrays of the given (rows, dim) shapes, as views of one array.

    Many separate arrays of a few KB each come from the top of the C heap, which glibc gives
    back to the system once they are all freed, and every page then faults in again at the
    next call: 100 lookups of 200 ids, dim 16, took 0.9 ms that way against 0.45 ms in one
    array, which glibc keeps (its threshold for giving memory back follows the largest
    block freed)."""
    floats = 64 // np.dtype(np.float32).itemsize
    dims = {dim for _, dim in shapes}
    if len(dims) == 1 and next(iter(dims)) % floats == 0:
        # Rows of whole cache lines, all of one width: row slices of one 2-D array, which
        # numpy makes twice as fast as a reshaped slice each (100 slots of 10 ids: the
        # views took as long as the lookups).
        dim = next(iter(dims))
        table = _aligned_floats(sum(rows for rows, _ in shapes) * dim).reshape(-1, dim)
        views, start = [], 0
        for rows, _ in shapes:
            views.append(table[start:start + rows])
            start += rows
        return views
    starts, end = [], 0
    for rows, dim in shapes:
        starts.append(end)
        end += -(-rows * dim // floats) * floats
    buffer = _aligned_floats(end)
    return [buffer[start:start + rows * dim].reshape(rows, dim) for start, (rows, dim) in zip(starts, shapes)]


def _aligned_floats(n: int) -> np.ndarray:
    """Uninitialised float32 [n], starting on a 64-byte boundary."""
    raw = np.empty(n * 4 + 64, dtype=np.uint8)
    skip = -raw.ctypes.data % 64
    return raw[skip:skip + n * 4].view(np.float32)


def write_parts(parts: List[tuple], arguments: WriteArguments) -> None:
    """Apply the :meth:`HashTable.write_part` tuples of writes that share ``arguments`` (the
    tables of one multi-slot write): all of them, or (raising) none. :func:`write_all`
    without a :class:`TableWrite` per table, whose making cost as much as writing a few ids
    (100 slots of 10 ids: half the call was Python)."""
    if len(parts) == 1:
        table, method, ids, rows, learning_rates = parts[0]
        _write_cores([(table._core, method, ids, rows, learning_rates)], arguments)
        return
    with _CONTENTS:  # as _contents_of, without a list of the tables first
        cores = [(p[0]._core, p[1], p[2], p[3], p[4]) for p in parts]
    _write_cores(cores, arguments)


def _write_cores(parts: List[tuple], arguments: WriteArguments) -> None:
    """write_parts with each table's core in place of the table."""
    if len(parts) == 1:
        core, method, ids, rows, learning_rates = parts[0]
        _apply_one(core, method, ids, rows, learning_rates, arguments.global_step, arguments.req_time,
                   arguments.dedup)
    elif parts:
        _core.write_tables(parts, arguments.global_step, arguments.req_time, arguments.dedup)


def write_all(writes: List[TableWrite]) -> None:
    """Apply writes to one or several tables: all of them, or (raising) none. Every write is
    checked, and given the room and the memory it needs, before the first table changes. The
    writes share their ``req_time``, and the ``apply_gradients`` ones their ``global_step`` and
    ``dedup``."""
    if not writes:
        return
    steps = [w for w in writes if w.method == "apply_gradients"]
    if len({w.req_time for w in writes}) > 1 or len({(w.global_step, w.dedup) for w in steps}) > 1:
        raise ValueError("writes applied together must share req_time, and gradient steps global_step "
                         "and dedup")
    step, dedup = (steps[0].global_step, steps[0].dedup) if steps else (0, False)
    _write_cores([(w.core, w.method, w.ids, w.rows, w.learning_rates) for w in writes],
                 WriteArguments(step, dedup, writes[0].req_time))


# The ids export_serving packs at a time.
_EXPORT_BLOCK = 65_536

# The most data files a save writes: file names hold their count in 5 digits.
_MAX_FILES = 99_999


def _check_index_fits(initial_capacity: int, max_load_factor: float) -> None:
    """MemoryError when the index that room for ``initial_capacity`` entries takes (a 16-byte
    slot an entry at the load bound) is larger than this machine's memory: it is only
    reserved at first, but the inserts that follow touch all of it."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not known here: nothing to check against
        return
    index_bytes = initial_capacity * 16 / max_load_factor
    if memory > 0 and index_bytes > memory:
        raise MemoryError(f"initial_capacity={initial_capacity} needs an index of {index_bytes / 2**30:.1f} GiB, "
                          f"more than this machine's {memory / 2**30:.1f} GiB of memory")


class HashTable(BaseHashTable):
    """An embedding table from int64 id to [values | optimizer state | timestamp].

    Build it with :func:`hash_table_from_config`. Every batch call releases the GIL and is
    safe to call from many threads at once.
    """

    def __init__(self, config: HashTableConfigInstance, name: str, saver_parallel: int = -1,
                 hash_filter: Optional[HashFilter] = None) -> None:
        if not isinstance(config, HashTableConfigInstance):
            raise TypeError(f"config must be a HashTableConfigInstance, got {type(config).__name__}")
        if hash_filter is not None and not isinstance(hash_filter, HashFilter):
            raise TypeError(f"hash_filter must be a HashFilter or None, got {type(hash_filter).__name__}")
        if isinstance(saver_parallel, bool) or not isinstance(saver_parallel, numbers.Integral):
            raise TypeError(f"saver_parallel must be an integer, got {type(saver_parallel).__name__}")
        if saver_parallel > _MAX_FILES:  # a file name holds the count in 5 digits
            raise ValueError(f"saver_parallel must be at most {_MAX_FILES}, got {saver_parallel}")
        config.validate()
        # The table's own copy of what it is built from: its core keeps the layout of the
        # config of this moment, and so must its saves, exports and restores.
        self._config: HashTableConfigInstance = config._copy_for_a_table()
        self._name: str = name
        self._saver_parallel: int = int(saver_parallel)
        self._hash_filter: Optional[HashFilter] = hash_filter
        self._core: _core.Table = self._new_core()
        if hash_filter is not None:
            hash_filter.attach(name)
        self._dim: int = self._core.dim
        table_config = self._config.table_config
        self._evictor = None
        if table_config.enable_feature_eviction:
            self._evictor = FeatureEvictor(self, table_config.feature_evict_every_n_hours * 3600.0)

    def _new_core(self, initial_capacity: Optional[int] = None, initial_shards: int = 0) -> "_core.Table":
        """An empty core table built from this table's config (and filter thresholds), with
        room for ``initial_capacity`` entries (default: the config's), and, with an automatic
        shard count, ``initial_shards`` shards when given (else as many as the capacity asks)."""
        table_config = self._config.table_config
        expiry = table_config.slot_expire_time_config
        initial_capacity = int(table_config.initial_capacity if initial_capacity is None else initial_capacity)
        _check_index_fits(initial_capacity, float(table_config.max_load_factor))
        return _core.Table(
            core_segments(table_config),
            random_seed=int(table_config.random_seed),
            allow_non_finite=bool(table_config.allow_non_finite),
            initial_capacity=initial_capacity,
            default_expire_days=int(expiry.default_expire_time),
            slot_expire_days={int(k): int(v) for k, v in expiry.slot_expire_times.items()},
            occurrence_thresholds=self._hash_filter.thresholds() if self._hash_filter is not None else None,
            filter_capacity=self.filter_capacity or 0,
            max_entries=int(table_config.max_entries or 0),
            max_bytes=int(table_config.max_bytes or 0),
            eviction_policy=str(table_config.eviction_policy),
            max_load_factor=float(table_config.max_load_factor),
            num_shards=int(table_config.num_shards or 0),
            initial_shards=int(initial_shards),
            embedding_dtype=table_config.embedding_dtype,
        )

    @property
    def filter_capacity(self) -> Optional[int]:
        """The capacity of the table's admission filter, or None without one."""
        return self._hash_filter.capacity if self._hash_filter is not None else None

    def _swap_core(self, core) -> None:
        """Only through swap_contents, which waits for a save of the old contents."""
        self._core = core

    @property
    def layout(self) -> str:
        """The entry layout a checkpoint must match: optimizer and dim of every segment."""
        return ",".join(f"{seg.optimizer.kind}/{int(seg.dim_size)}"
                        for seg in self._config.table_config.entry_config.segments)

    # -- properties ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The table's name: its checkpoints' basename within a model's directory."""
        return self._name

    @property
    def dim_size(self) -> int:
        """Values per entry: the dims of all segments."""
        return self._dim

    @property
    def extra_restore_names(self) -> List[str]:
        """Other names a restore may find the table's checkpoint under (the config's)."""
        return self._config.extra_restore_names

    @property
    def config(self) -> HashTableConfigInstance:
        """The config the table was built from: its own copy, made when it was built (the
        table config copied whole, the learning-rate fns shared). Changes to the caller's
        config objects after that do not reach the table."""
        return self._config

    @property
    def max_update_ts(self) -> int:
        """The largest ``req_time`` any write has used, or 0 if none was larger: the clock
        starts at 0."""
        self._after_queued_calls()
        return self._core.max_update_ts

    def __repr__(self) -> str:
        # The size of this moment: a repr (a debugger's) does not wait for the hooks' calls.
        return f"HashTable(name={self._name!r}, dim_size={self._dim}, size={self._core.size()})"

    # -- reads -----------------------------------------------------------------------------
    def lookup(self, ids: ArrayInput, use_multi_threads: Switch = False, enable_dedup: Switch = False,
               out: Optional[np.ndarray] = None) -> np.ndarray:
        """float32 ``[N, dim]``: the stored values; a missing id reads as zeros and is not
        inserted. ``use_multi_threads`` and ``enable_dedup`` are accepted for Monolith
        compatibility; threading follows :func:`mtht.set_num_threads` and never changes
        results."""
        self._after_queued_calls()
        as_flag(use_multi_threads, "use_multi_threads")
        as_flag(enable_dedup, "enable_dedup")
        id_array = as_ids(ids)
        n = id_array.shape[0]
        if out is None:
            out = np.empty((n, self._dim), dtype=np.float32)
        else:
            out = as_out(out, n, self._dim)
            if not out.flags.aligned:  # the core stores whole floats, which an odd address cannot take
                out[...] = self.lookup(id_array)
                return out
            if np.may_share_memory(id_array, out):  # the core reads ids while it writes rows
                id_array = id_array.copy()
        self._core.lookup(id_array, out)
        return out

    def contains(self, ids: ArrayInput) -> np.ndarray:
        """bool ``[N]``: whether each id has an entry."""
        self._after_queued_calls()
        return self._core.contains(as_ids(ids))

    def ids(self) -> np.ndarray:
        """int64 array of every id the table holds, in no order to rely on: those of one
        moment, as a save sees them (writes queued by hooks are applied first, and writes wait
        meanwhile, so a write of another thread is in it whole or not at all). Entries expired
        but not yet evicted are among them. With :meth:`export_serving` it exports the whole
        table; with :meth:`lookup_entry`, every entry."""
        self._wait_for_hooks()
        with writes_held([self]):
            return self._core.stored_ids()

    def size(self) -> int:
        """Number of entries."""
        self._after_queued_calls()
        return self._core.size()

    def __len__(self) -> int:
        return self.size()

    def stats(self, probe_lengths: bool = False) -> Dict[str, Any]:
        """Size, index capacity, memory and layout figures of the table, and the evictions
        made to respect ``max_entries``. ``bytes`` counts the index and the rows handed out
        (``row_bytes_reserved`` also counts address space reserved but never touched);
        ``probe_lengths=True`` also scans the index for the longest probe sequence (in
        buckets of 4 slots). ``read_block`` and ``write_block`` are the ids per block of the
        batch loops, ``fetches_ahead`` the fetches a block holds, which sets them (see "How long
        a block" in docs/design.md). ``timestamps_apart`` counts
        the entries whose timestamp is outside [0, 2**32 - 1), which the index keeps apart
        (their memory is part of ``index_bytes``). ``filter_counts``, ``filter_bytes`` and
        ``filter_forgotten``: the admission filter's counts, their memory (not part of
        ``bytes``) and the counts forgotten to stay within its capacity."""
        self._after_queued_calls()
        core = self._core  # once: a restore on another thread may swap it
        st: Dict[str, Any] = core.stats(probe_lengths)
        st["row_bytes_reserved"] = st.pop("row_bytes")
        st["row_bytes"] = st["rows_in_use"] * st["row_stride"]
        st["load_factor"] = st["size"] / st["capacity"] if st["capacity"] else 0.0
        st["bytes"] = st["index_bytes"] + st["row_bytes"]
        st["bytes_per_entry"] = st["bytes"] / st["size"] if st["size"] else 0.0
        st["dim"] = self._dim
        st["max_entries"] = core.max_entries
        st["state_floats"] = core.state_dim
        return st

    def lookup_entry(self, ids: ArrayInput) -> List[Optional[EntryDump]]:
        """Per id: an :class:`EntryDump` (raw values, optimizer state by segment, timestamp),
        or ``None`` when the id has no entry."""
        self._after_queued_calls()
        ids = as_ids(ids)
        values, state, ts, found = self._core.lookup_entries(ids)
        table_config = self._config.table_config
        return [
            EntryDump(int(ids[k]), values[k].copy(), split_state(table_config, state[k]), int(ts[k]))
            if found[k] else None
            for k in range(ids.shape[0])
        ]

    # -- writes ----------------------------------------------------------------------------
    # Each write is split in two: prepare_write() converts its arguments into a TableWrite,
    # and write_all() applies one or several of them, so that a multi-slot write changes
    # every slot's table or none.
    def prepare_write(self, method: str, ids: ArrayInput, tensor: ArrayInput, *args: Any,
                      **kwargs: Any) -> "TableWrite":
        """Convert the arguments of a write (``"assign"``, ``"assign_add"`` or
        ``"apply_gradients"``, with that method's arguments) without applying it; see
        :func:`write_all`."""
        return self.prepare_write_with(method, ids, tensor, write_arguments(method, *args, **kwargs))

    def prepare_write_with(self, method: str, ids: ArrayInput, tensor: ArrayInput,
                           arguments: WriteArguments) -> "TableWrite":
        """:meth:`prepare_write` with the arguments after the rows already converted
        (:func:`write_arguments`)."""
        table, method, id_array, rows, learning_rates = self.write_part(method, ids, tensor, arguments)
        core = table._core
        if method == "apply_gradients":
            return TableWrite(core, method, id_array, rows, learning_rates, arguments.global_step, arguments.req_time,
                              arguments.dedup)
        return TableWrite(core, method, id_array, rows, None, 0, arguments.req_time, False)

    def write_part(self, method: str, ids: ArrayInput, tensor: ArrayInput,
                   arguments: WriteArguments) -> Tuple["HashTable", str, np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """``(table, method, ids, rows, learning_rates)``: a write's arguments converted, as
        :func:`write_parts` applies them (``learning_rates`` is None but for
        ``apply_gradients``)."""
        self._after_queued_calls()
        id_array = as_ids(ids)
        if method == "apply_gradients":
            return (self, method, id_array, as_rows(tensor, id_array.shape[0], self._dim, "grads"),
                    self._config.learning_rates(arguments.global_step))
        if method in ("assign", "assign_add"):
            return self, method, id_array, as_rows(tensor, id_array.shape[0], self._dim, "values"), None
        raise ValueError(f"unknown write {method!r}")

    def assign(self, ids: ArrayInput, values: ArrayInput, req_time: Optional[IntegerInput] = None) -> "HashTable":
        """Set rows (upsert; the last duplicate wins). Optimizer state is kept for existing
        ids and initialised for new ones. The timestamp becomes ``req_time`` (default 0)."""
        self._write("assign", ids, values, _assign_arguments(req_time))
        return self

    def assign_add(self, ids: ArrayInput, values: ArrayInput, req_time: Optional[IntegerInput] = None) -> "HashTable":
        """Add rows (upsert; a new entry is initialised first; duplicates accumulate)."""
        self._write("assign_add", ids, values, _assign_arguments(req_time))
        return self

    def apply_gradients(self, ids: ArrayInput, grads: ArrayInput, global_step: IntegerInput,
                        use_multi_threads: Switch = False, enable_dedup: Switch = False,
                        req_time: Optional[IntegerInput] = None) -> "HashTable":
        """One optimizer step per occurrence in input order, or with ``enable_dedup`` one
        step per unique id with its gradients summed left to right. Missing ids are created
        with the initializer, then stepped. Learning rates come from the config's
        learning-rate functions at ``global_step``."""
        self._write("apply_gradients", ids, grads,
                    _apply_arguments(global_step, use_multi_threads, enable_dedup, req_time))
        return self

    def _write(self, method: str, ids, tensor, arguments: WriteArguments) -> None:
        # One table's write goes straight to the core, without the TableWrite that write_all
        # checks against the others: a write of one id took 4.9 us that way, 1 us of it
        # in the core, and takes 2.8.
        write_parts([self.write_part(method, ids, tensor, arguments)], arguments)

    def reinitialize(self, ids: ArrayInput, req_time: Optional[IntegerInput] = None) -> np.ndarray:
        """Reset values and optimizer state to their initial values (inserting new ids).
        Returns int32 status per id: 0 inserted, 1 existed. The timestamp becomes
        ``req_time``, or the wall clock when it is None."""
        self._after_queued_calls()
        ids = as_ids(ids)
        ts = int(time.time()) if req_time is None else as_int64_scalar(req_time, "req_time")
        return self._core.reinitialize(ids, ts)

    def as_op(self) -> "HashTable":
        """Every write has been applied when this returns (those queued by hooks too:
        :mod:`mtht.hooks`); returns the table."""
        self._wait_for_hooks()
        return self

    def export_serving(self, ids: ArrayInput) -> np.ndarray:
        """The rows of ``ids`` in serving form: uint8 ``[N, row_bytes]``, each segment packed
        by its compressor (fp32, fp16, fixed_r8 or one_bit; see :mod:`mtht.serving`). A
        missing id packs as a row of zeros does (one_bit keeps signs only, and packs 0 as -1,
        which serving reads as ``-amplitude``)."""
        from mtht.serving import compress, row_bytes
        self._after_queued_calls()
        ids = as_ids(ids)
        core = self._core  # once: a restore on another thread may swap it
        table_config, scales = self._config.table_config, core.hashnet_scales()
        out = np.empty((ids.shape[0], row_bytes(table_config)), dtype=np.uint8)
        # A block at a time: the entries' state and the compressor's copies of a whole
        # table's values took twice the rows returned on top of them.
        for start in range(0, ids.shape[0], _EXPORT_BLOCK):
            values, _, _, _ = core.lookup_entries(ids[start:start + _EXPORT_BLOCK])
            out[start:start + values.shape[0]] = compress(table_config, values, scales)
        return out

    # -- lifecycle -------------------------------------------------------------------------
    def evict(self, max_update_time: Optional[IntegerInput] = None) -> int:
        """Remove the entries expired at ``max_update_time`` (default: the table's
        ``max_update_ts``): those with ``max_update_time - last_update_ts >= expire days of
        their slot * 86400``. Returns how many; their memory is reused by later inserts."""
        self._after_queued_calls()
        core = self._core  # once: a restore on another thread may swap it (and its max_update_ts)
        now = core.max_update_ts if max_update_time is None else as_int64_scalar(max_update_time, "max_update_time")
        return core.evict(now)

    def save(self, basename: StrPath, format: str = "mtht") -> "HashTable":
        """Write a checkpoint at ``basename`` (crash-safe; see :mod:`mtht.checkpoint`).
        ``format="monolith"`` writes Monolith's single-table files instead. Writes queued by
        hooks (:mod:`mtht.hooks`) are applied first."""
        from mtht.checkpoint import check_format, save_table
        check_format(format)
        self._wait_for_hooks()
        if format == "monolith":
            from mtht.monolith_checkpoint import save_monolith
            save_monolith(self, basename)
        else:
            save_table(self, basename)
        return self

    def restore(self, basename: StrPath, format: str = "mtht") -> "HashTable":
        """Replace the table's contents with the checkpoint at ``basename``. The checkpoint is
        verified first; on any error the table is left exactly as it was. Writes queued by
        hooks (:mod:`mtht.hooks`) are applied first (and so replaced)."""
        from mtht.checkpoint import check_format, restore_table
        check_format(format)
        self._wait_for_hooks()
        if format == "monolith":
            from mtht.monolith_checkpoint import restore_monolith
            restore_monolith(self, basename)
        else:
            restore_table(self, basename)
        self._drop_prefetched()
        return self


# The name of a table built by hash_table_from_config: this, then its name_suffix.
TABLE_NAME_PREFIX = "MonolithHashTable_"


def hash_table_from_config(config: HashTableConfigInstance, hash_filter: Optional[HashFilter] = None,
                           name_suffix: str = "", sync_client: None = None, saver_parallel: int = -1) -> HashTable:
    """Build a :class:`HashTable` from a ``HashTableConfigInstance``, with Monolith's
    arguments in Monolith's order. ``sync_client`` must be None: Monolith's client that
    pushes updates to serving parameter servers has no counterpart here.

    Raises ValueError for an invalid config (e.g. the number of learning-rate functions
    differs from the number of segments) and NotImplementedError for a feature this version
    cannot train with.
    """
    if sync_client is not None:
        raise NotImplementedError("sync_client is not supported: mtht has no client that pushes updates to "
                                  "serving parameter servers; pass None (export rows with export_serving instead)")
    return HashTable(config, name=TABLE_NAME_PREFIX + str(name_suffix), saver_parallel=saver_parallel,
                     hash_filter=hash_filter)


def _core_tables(tables) -> list:
    tables = list(tables)
    for t in tables:
        if not isinstance(t, HashTable):
            raise TypeError(f"fused ops take HashTable objects, got {type(t).__name__}")
    _after_queued_calls_of(tables)
    return _contents_of(tables)


def _counts(fused_slot_size) -> np.ndarray:
    fss = as_ids(fused_slot_size, "fused_slot_size")
    if fss.size and (fss.min() < 0 or fss.max() > np.iinfo(np.int32).max):
        raise ValueError("fused_slot_size must hold counts in [0, 2^31)")
    return fss.astype(np.int32)


def _check_equal(name: str, given, expected: np.ndarray, source: str = "fused_slot_size") -> None:
    got = as_ids(given, name)  # int64, compared by value (no narrowing cast, no copy)
    if got.shape != expected.shape or not np.array_equal(got, expected):
        raise ValueError(f"{name} does not match {source}: expected {expected.tolist()}, got {got.tolist()}")


def _check_shards(num_of_shards, num_tables: int, fss: np.ndarray) -> int:
    """num_of_shards, checked against the blocks of fused_slot_size (in Python's integers:
    a count past int64 is reported as it is)."""
    shards = as_int64_scalar(num_of_shards, "num_of_shards")
    if shards < 1:
        raise ValueError(f"num_of_shards must be at least 1, got {shards}")
    if num_tables * shards != fss.size:
        raise ValueError(f"fused_slot_size must have num_tables * num_of_shards = {num_tables} * {shards} entries, "
                         f"got {fss.size}")
    return shards


def fused_lookup(tables: Iterable["HashTable"], ids: ArrayInput, fused_slot_size: ArrayInput,
                 num_of_shards: IntegerInput, req_time: Optional[IntegerInput] = None,
                 out: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Look up K tables for N shards in one call (Monolith's fused lookup).

    ``fused_slot_size[n*K + k]`` ids of shard n belong to table k; ``ids`` holds these blocks
    in that ``[shard][table]`` order. Returns ``(embeddings float32[L], recv_splits int32[N],
    id_offsets int32[K*N+1], emb_offsets int32[K*N+1], indices int64[M])``: block (n, k) of
    the embeddings starts at ``emb_offsets[n*K + k]``; ``recv_splits[n]`` floats belong to
    shard n; ``indices`` is ``ids``. ``req_time`` is accepted and unused (lookups do not
    touch timestamps). ``out``, a writeable C-contiguous float32 array of the L floats, takes
    the embeddings in place (and is returned as them).
    """
    id_array = as_ids(ids)
    if req_time is not None:
        as_int64_scalar(req_time, "req_time")
    core_tables = _core_tables(tables)
    fss = _counts(fused_slot_size)
    if out is not None:  # its length is the layout's, which the core checks
        out = as_out(out, None)
        if np.may_share_memory(id_array, out):  # the core reads ids while it writes rows (as lookup)
            id_array = id_array.copy()
    embeddings, recv_splits, id_offsets, emb_offsets = _core.fused_lookup(
        core_tables, id_array, fss, _check_shards(num_of_shards, len(core_tables), fss), out)
    return embeddings, recv_splits, id_offsets, emb_offsets, id_array.copy()


def fused_apply_gradient(tables: Iterable["HashTable"], ids: ArrayInput, indices: ArrayInput,
                         fused_slot_size: ArrayInput, id_grads: ArrayInput, id_offsets: ArrayInput,
                         grad_offsets: ArrayInput, learning_rate_tensors: ArrayInput,
                         req_time: Optional[IntegerInput], global_step: IntegerInput, num_of_shards: IntegerInput,
                         enable_grad_accumulation: Switch = False) -> List["HashTable"]:
    """Apply gradients to K tables for N shards in one call (Monolith's fused optimize).

    ``id_grads`` is laid out like the fused lookup's embeddings; ``learning_rate_tensors``
    holds every table's per-segment learning rates, table after table. Each (shard, table)
    block is one batch update; blocks of one table are applied in shard order, and
    ``enable_grad_accumulation`` sums duplicate ids inside a block only. Every argument is
    validated before any table changes. Returns the list of tables.
    """
    tables = list(tables)
    core_tables = _core_tables(tables)
    ids = as_ids(ids)
    fss = _counts(fused_slot_size)
    shards = _check_shards(num_of_shards, len(core_tables), fss)
    _, expected_id_offsets, expected_emb_offsets = _core.fused_offsets(core_tables, fss, shards, ids.shape[0])
    _check_equal("id_offsets", id_offsets, expected_id_offsets)
    _check_equal("grad_offsets", grad_offsets, expected_emb_offsets)
    _check_equal("indices", indices, ids, "ids")
    grads = as_numpy_floats(id_grads, "id_grads")
    lrs = as_numpy_floats(learning_rate_tensors, "learning_rate_tensors")
    accumulate = as_flag(enable_grad_accumulation, "enable_grad_accumulation")
    try:
        fused_apply_checked(tables, ids, fss, grads, lrs, shards, as_int64_scalar(global_step, "global_step"),
                            _req_time(req_time), [accumulate] * len(core_tables))
    except ValueError as e:
        if "NaN or Inf" not in str(e):
            raise
        raise ValueError(_non_finite_block(tables, grads, expected_emb_offsets) or str(e)) from None
    return tables


def fused_apply_checked(tables, ids: np.ndarray, fused_slot_size, grads: np.ndarray, learning_rates: np.ndarray,
                        num_of_shards: int, global_step: int, req_time: int, accumulate: List[bool]) -> None:
    """The fused update with its arguments already converted (int64 ids, float32 grads and
    learning rates, ints), ``accumulate`` one flag per table: duplicates of table k are
    summed inside a block when ``accumulate[k]``."""
    _core.fused_apply_gradient(_core_tables(tables), ids, _counts(fused_slot_size), grads, learning_rates,
                               num_of_shards, global_step, req_time, list(accumulate))


def _non_finite_block(tables, grads: np.ndarray, emb_offsets: np.ndarray) -> Optional[str]:
    """Where the first NaN or Inf of a fused update's gradients is, among the blocks of the
    tables that refuse them: the core reports a row of a block it does not name."""
    k = len(tables)
    flat = grads.reshape(-1)
    for b in range(len(emb_offsets) - 1):
        table = tables[b % k]
        if table.config.table_config.allow_non_finite:
            continue
        block = flat[emb_offsets[b]:emb_offsets[b + 1]]
        bad = ~np.isfinite(block)
        if bad.any():
            row = int(np.argmax(bad)) // table.dim_size
            return (f"id_grads contain NaN or Inf in block {b} (shard {b // k}, table {b % k}: {table.name!r}), "
                    f"row {row} of the block; set allow_non_finite=True in the table config to accept them")
    return None
