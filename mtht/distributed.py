"""A multi-type table sharded over the processes of an MPI job (``pip install mtht[mpi]``).

Each process (rank) keeps, for every table, the entries of the ids it owns: those with
``id mod world_size == rank`` (the modulo non-negative, so negative ids are owned too).
Every call is collective: each rank makes the same calls in the same order, each with its
own batch. A call exchanges the ids with ``Alltoallv`` laid out ``[rank][table]`` as the
fused ops' ``fused_slot_size``, each owner serves them with one fused lookup or update,
and the rows go back to the ranks that asked.

What a call computes equals one process's :class:`~mtht.multi_type_hash_table.MultiTypeHashTable`
given the ranks' batches one after another, in rank order (see
:class:`DistributedMultiTypeHashTable`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import os
import pickle
import re
import signal
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, cast

import numpy as np

from mtht import _core
from mtht import checkpoint as _checkpoint
from mtht import hash_table as _hash_table
from mtht import sharded_checkpoint as _sharded
from mtht._arrays import ArrayInput, IntegerInput, Switch, as_ids, as_rows
from mtht.entry import HashTableConfigInstance
from mtht.hooks import turn_taken
from mtht.multi_type_hash_table import (BaseMultiTypeHashTable, MultiTypeHashTable, SlotIds, SlotRows, _pair,
                                        _rows_name, _unknown_slot, refuse_non_finite)

__all__ = ["DistributedMultiTypeHashTable", "DistributedError", "owner_of"]


class DistributedError(RuntimeError):
    """A collective call failed on another rank (that rank raised the error itself).
    ``slot`` and ``reason``: those of that rank's error where it named the slot of its
    arguments that was bad, else None."""

    def __init__(self, message: str, slot: Optional[str] = None, reason: Optional[str] = None) -> None:
        super().__init__(message)
        self.slot, self.reason = slot, reason
        self._slot_text = f"slot {slot!r}: {reason}"

    def naming_the_slot_as(self, text: str) -> "DistributedError":
        """The same error with the text that named its slot (``slot 'x': reason``) replaced
        by ``text``: a wrapper's own name for what it gave this table as that slot."""
        return DistributedError(str(self).replace(self._slot_text, text, 1), self.slot, self.reason)


def owner_of(ids: ArrayInput, world_size: int) -> np.ndarray:
    """The rank that owns each id: ``id mod world_size``, in ``[0, world_size)``."""
    return np.remainder(as_ids(ids), world_size)


def _world_comm():
    try:
        from mpi4py import MPI
    except ImportError:
        raise ImportError("a DistributedMultiTypeHashTable needs mpi4py and an MPI library: "
                          "pip install 'mtht[mpi]'") from None
    return MPI.COMM_WORLD


class _LetGo:
    """How many tables were built on one communicator, and the communicators of those this
    rank has let go of (their tables collected), by the serial each table got when it was
    built: the same on every rank, whose tables on that communicator are built in the same
    order. Freeing a communicator is collective, so none is freed when the garbage
    collector happens to pass, at another moment on each rank (a rank whose collector freed
    one inside the collective that built the next table waited there for ever): a table
    being built frees those that every rank has let go of (_free_let_go)."""

    def __init__(self) -> None:
        self.built = 0
        self.let_go: List[Tuple[int, Any]] = []  # appended to by finalizers: no MPI there

    @staticmethod
    def of(comm) -> "_LetGo":
        """The _LetGo kept on ``comm`` (as an MPI attribute)."""
        from mpi4py import MPI

        global _LET_GO_KEY
        if _LET_GO_KEY is None:
            _LET_GO_KEY = MPI.Comm.Create_keyval()
        kept = comm.Get_attr(_LET_GO_KEY)
        if kept is None:
            kept = _LetGo()
            comm.Set_attr(_LET_GO_KEY, kept)
        return kept


_LET_GO_KEY: Optional[int] = None  # the MPI attribute key of every communicator's _LetGo


# With a timeout, the bytes of each rank's part of an object gathered in one round (the
# outcomes of a call's steps: a few dozen bytes, more with many slots or an error).
_FIRST_ROUND_BYTES = 240

# Collectives given up on (a timeout, or a second Ctrl-C) with their buffers: MPI may still
# write into those when the ranks that did not come arrive, so they live as long as the process.
_ABANDONED: list = []


def _checked_timeout(timeout) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds or None, got {type(timeout).__name__}")
    seconds = float(timeout)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"timeout must be a positive, finite number of seconds or None, got {timeout!r}")
    return seconds


def _config_text(config) -> str:
    """A config's canonical text, but for the learning-rate functions, named there by their
    address in this process."""
    return re.sub(r"(callable|array)@[0-9]+", r"\1", str(config))


def _filter_settings(table) -> Optional[tuple]:
    f = table._hash_filter
    return None if f is None else (f.default_occurrence_threshold, sorted(f.slot_occurrence_thresholds.items()),
                                   f.capacity)


def _first_difference(ours: list, theirs: list) -> str:
    """What differs first between two ranks' (slot, config text, filter) lists."""
    if [slot for slot, _, _ in ours] != [slot for slot, _, _ in theirs]:
        return f"slots {[slot for slot, _, _ in theirs]} against {[slot for slot, _, _ in ours]}"
    for (slot, config, hash_filter), (_, their_config, their_filter) in zip(ours, theirs):
        if config != their_config:
            at = next(i for i, (a, b) in enumerate(zip(config + "\0", their_config + "\0")) if a != b)
            return f"slot {slot!r} has config ...{their_config[max(0, at - 40):at + 40]}... against " \
                   f"...{config[max(0, at - 40):at + 40]}..."
        if hash_filter != their_filter:
            return (f"slot {slot!r} has filter {their_filter} against {hash_filter} (threshold, slot thresholds, "
                    "capacity)")
    return "?"


def _attempt(fn: Callable[[], object]) -> tuple:
    """``(fn(), None)``, or ``(None, the exception it raised)``: a rank's part of a collective
    call, whose error _settle then raises on every rank (an interrupt too)."""
    try:
        return fn(), None
    except BaseException as e:  # noqa: BLE001 - raised on every rank by _settle
        return None, e


def _describe(error: BaseException) -> Tuple[str, Optional[str], Optional[str]]:
    """What the other ranks are told of ``error``: its text, and the slot and reason it
    names (_naming_the_slot), if it does."""
    return f"{type(error).__name__}: {error}", getattr(error, "slot", None), getattr(error, "reason", None)


class _Scratch:
    """Memory a table reuses from call to call for what a call holds only while it runs. A
    fresh large array takes a page fault per 4 KiB where it is first written: that was half
    the time of a lookup of 65,536 ids on two ranks."""

    def __init__(self) -> None:
        self._buffers: Dict[object, np.ndarray] = {}

    def take(self, key, dtype, *shape: int) -> np.ndarray:
        """An array of ``shape`` for ``key`` (its contents are left over from earlier). A
        buffer grows by doubling; one over 64 MiB and 4 times what is asked is let go (a
        single huge batch does not keep its memory for good)."""
        size = math.prod(shape)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.dtype != dtype or buffer.size < size:
            buffer = np.empty(max(size, 2 * buffer.size if buffer is not None else 0), dtype)
            self._buffers[key] = buffer
        elif buffer.nbytes > 64 << 20 and buffer.size > 4 * size:
            buffer = self._buffers[key] = np.empty(2 * size, dtype)
        return buffer[:size].reshape(shape)


class _Routed:
    """The ids of a call's tables as this rank sends them (route.h): ``sent(t)``, table t's,
    grouped by owner, each id once (``dedup[t]``) or as given; ``counts[w, t]`` of them go
    to rank w; ``position(t)[i]``: where its id i went in ``sent(t)``. Every table's sent
    ids and positions are pieces of one buffer each from ``scratch``, and so are the rows of
    rows_sent (tables of ``dims``; none when not ``with_rows``), and one call of the core
    routes all the tables: a buffer, or a call, per table cost more than routing a few ids."""

    __slots__ = ("counts", "_sent_of", "_ids", "_world", "_ends", "_row_ends", "_sent_all", "_position_all",
                 "_rows_all")

    def __init__(self, ids: List[np.ndarray], world: int, dedup: List[bool], scratch: _Scratch,
                 dims: Sequence[int], with_rows: bool):
        sizes = [a.shape[0] for a in ids]
        self._ids, self._world = ids, world
        self._ends = list(itertools.accumulate(sizes, initial=0))
        self._row_ends = list(itertools.accumulate((n * dim for n, dim in zip(sizes, dims)), initial=0))
        self._sent_all = scratch.take("sent", np.int64, self._ends[-1])
        self._position_all = scratch.take("position", np.int64, self._ends[-1])
        self._rows_all = scratch.take("rows", np.float32, self._row_ends[-1]) if with_rows else None
        self.counts, self._sent_of = _core.route_tables(ids, world, dedup, self._sent_all, self._position_all)

    def sent(self, t: int) -> np.ndarray:
        start = self._ends[t]
        return self._sent_all[start:start + int(self._sent_of[t])]

    def position(self, t: int) -> np.ndarray:
        return self._position_all[self._ends[t]:self._ends[t + 1]]

    def send_each_occurrence(self, t: int) -> None:
        """Routes table t's ids again, each occurrence on its own (its sums left to the
        owner)."""
        start, end = self._ends[t], self._ends[t + 1]
        _, counts, _ = _core.route_ids(self._ids[t], self._world, False, self._sent_all[start:end],
                                       self._position_all[start:end])
        self.counts[:, t] = counts
        self._sent_of[t] = end - start

    def rows_sent(self, t: int, rows: np.ndarray) -> Tuple[np.ndarray, bool]:
        """The rows to send with table t's ids: per sent id, the sum of its rows left to
        right in the order given (the first occurrence's row, then the others added one by
        one), as one process's deduplicated update sums them; and whether every sum is
        finite."""
        m, dim = int(self._sent_of[t]), rows.shape[1]
        start = self._row_ends[t]
        out = self._rows_all[start:start + m * dim].reshape(m, dim) if self._rows_all is not None else None
        return _core.sum_rows(rows, self.position(t), m, out)


class _Prepared(NamedTuple):
    """A rank's arguments of a collective call, checked: per table ``(ids, rows or None)``
    (empty for a slot left out), whether its ids go once each, what every rank must give
    alike, and which slots the call named."""

    per_table: List[tuple]
    dedup: List[bool]
    same: object
    named: tuple


class _Call:
    """What the first half of a collective call (_route) leaves for the second: this rank's
    routed ids and rows, the counts ``[rank][table]`` sent and received, the ids and rows
    received, the buffer the rows looked up come back into, and per table whether any rank
    named it, sent it ids, or left their sum to the owner."""

    __slots__ = ("routed", "sent_rows", "send_counts", "recv_counts", "ids", "rows", "back", "named",
                 "nonempty", "summed_by_owner")
    routed: _Routed
    sent_rows: List[np.ndarray]
    send_counts: np.ndarray  # [rank][table]
    recv_counts: np.ndarray
    ids: np.ndarray
    rows: np.ndarray  # writes only
    back: np.ndarray  # lookups only
    named: np.ndarray  # per table: bool
    nonempty: np.ndarray
    summed_by_owner: np.ndarray

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, None)


def _blocks(per_table: List[np.ndarray], counts: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The rows (or ids, dims all 1) of each table, in blocks ``[rank][table]``, flat, into
    ``out``."""
    world, k = counts.shape
    starts = np.zeros((world + 1, k), dtype=np.int64)
    np.cumsum(counts, axis=0, out=starts[1:])
    starts = starts.tolist()  # Python ints slice faster
    flat = [rows.reshape(-1) for rows in per_table]
    widths = [rows.shape[1] if rows.ndim == 2 else 1 for rows in per_table]
    pieces = [flat[t][starts[w][t] * widths[t]:starts[w + 1][t] * widths[t]] for w in range(world) for t in range(k)]
    return np.concatenate(pieces, out=out) if pieces else out


def _unblock(flat: np.ndarray, counts: np.ndarray, dims: Sequence[int]) -> List[np.ndarray]:
    """The inverse of :func:`_blocks`: each table's rows ``[n, dim]``, ranks in order."""
    world, k = counts.shape
    sizes = (counts * np.asarray(dims, dtype=np.int64)[None, :]).reshape(-1)
    ends = np.cumsum(sizes)
    out = []
    for t in range(k):
        parts = [flat[ends[w * k + t] - sizes[w * k + t]:ends[w * k + t]] for w in range(world)]
        out.append(np.concatenate(parts).reshape(-1, dims[t]) if parts else np.zeros((0, dims[t]), flat.dtype))
    return out


def _free_let_go(built_on: _LetGo, each_rank: List[List[int]]) -> None:
    """Frees the communicators that every rank has let go of (``each_rank``: the serials
    each has), in the order of their serials, on every rank alike."""
    everywhere = set(each_rank[0]).intersection(*each_rank[1:])
    for serial, comm in sorted((entry for entry in list(built_on.let_go) if entry[0] in everywhere),
                               key=lambda entry: entry[0]):
        built_on.let_go.remove((serial, comm))
        comm.Free()


class DistributedMultiTypeHashTable(BaseMultiTypeHashTable):
    """One table per slot (``hash_table_factory(slot, config)``, sorted slot order), each
    sharded over the ranks of ``comm`` (default ``MPI.COMM_WORLD``; the table talks on its
    own duplicate of it, so it never mixes with the trainer's messages).

    Every method is collective: every rank calls it, in the same order, with its own batch
    (the same slots' tables on every rank; a slot a rank has no ids for may be left out).
    ``global_step`` and ``req_time`` must be the same on every rank.

    * ``lookup({slot: ids})``: each rank's ids, looked up where they live; each id is asked
      for once per rank (ids deduplicated per table).
    * ``apply_gradients({slot: (ids, grads)}, global_step, enable_dedup=True, req_time=None)``:
      each owner applies, per table, the batch of rank 0, then that of rank 1, and so on. So
      the tables end as one process's would after
      ``apply_gradients(batch_of_rank_r, global_step, enable_dedup=..., req_time=...)`` for
      r = 0, 1, ...: with ``enable_dedup`` (the default here), one step per distinct id of a
      rank, its gradients summed in the order given (a rank sends each id once, with its
      summed gradient; for a table with an admission filter, whose counts are per
      occurrence, it sends every occurrence and the owner sums them); without it, one step
      per occurrence.
    * ``assign`` / ``assign_add({slot: (ids, values)}, req_time=None)``: likewise, as one
      process's writes of the ranks' batches in rank order (the last rank's duplicate wins
      an assign).

    Bad input (an unknown slot, a shape, NaN, ranks that disagree on ``global_step``) is
    found before anything is sent: every rank raises (the others a :class:`DistributedError`
    naming the rank) and no table changes. A write that fails where it is applied (memory,
    ``max_entries``) changes nothing on that rank's tables and is raised on every rank; the
    other ranks' parts of it are applied. Every rank must build the tables alike (slots,
    configs, filters); this is checked when they are built.

    ``timeout`` (seconds, or None to wait for ever as MPI does; given on every rank or on
    none): how long each exchange of a call waits for every rank to take part. Past it, or
    at a second Ctrl-C while it waits, the call raises (DistributedError, or
    KeyboardInterrupt), and the ranks are out of step for good: every later call raises
    DistributedError; end the job.

    ``max_entries`` (capacity eviction) holds for each rank's part of a table: the table
    keeps up to ``world_size`` times as many entries, and its evictions are those of each
    part, not one process's.

    ``save(directory)`` / ``restore(directory)`` (also through
    :func:`mtht.checkpoint.save_multi_type`): each rank saves its part;
    :mod:`mtht.sharded_checkpoint` describes the files, and its ``reshard`` rewrites them for
    another number of ranks.
    """

    saves_its_parts = True  # mtht.checkpoint hands save_multi_type and restore_multi_type here
    calls_are_collective = True  # mtht.hooks keeps every rank's calls alike

    def __init__(self, slot_to_config: Mapping[str, HashTableConfigInstance],
                 hash_table_factory: Callable[[str, HashTableConfigInstance], Any], comm: Any = None,
                 timeout: Optional[float] = None) -> None:
        comm = _world_comm() if comm is None else comm
        self._rank, self._world = comm.Get_rank(), comm.Get_size()
        self._pending_interrupts: Optional[list] = None  # within a call: _interrupts_deferred
        self._out_of_step: Optional[str] = None  # why, once a collective was given up on
        # Building waits as MPI does: a timeout makes the table's collectives nonblocking
        # ones, which match only those of ranks with a timeout too, and this is where the
        # ranks find out whether each has one. A bad one is raised on every rank, below.
        self._timeout = None
        timeout_given, timeout_error = _attempt(lambda: _checked_timeout(timeout))
        built_on = _LetGo.of(comm)
        serial, built_on.built = built_on.built, built_on.built + 1
        let_go_before = [s for s, _ in list(built_on.let_go)]  # finalizers may append meanwhile
        self._comm = comm.Dup()
        # Not at exit: the writes hooks left queued are applied then, on this communicator
        # (MPI frees it when it ends).
        weakref.finalize(self, built_on.let_go.append, (serial, self._comm)).atexit = False
        # Reentrant: a learning-rate function may call the table (on every rank alike).
        self._one_call = threading.RLock()
        self._scratch = _Scratch()  # used under _one_call
        self._depth = 0  # calls under way on the thread holding _one_call
        error, signature = timeout_error, None
        try:
            if error is not None:
                raise error
            self._table = MultiTypeHashTable(slot_to_config, hash_table_factory)
            if not self._table._through_core:
                raise TypeError("a DistributedMultiTypeHashTable needs mtht's own tables (HashTable, not "
                                "overriding its reads or writes) from its factory")
            self._slots = list(self._table._slots)
            self._slot_index = {slot: k for k, slot in enumerate(self._slots)}
            tables = [self._table._tables[s] for s in self._slots]
            self._dims = [t.dim_size for t in tables]
            # Admission counts are per occurrence: such tables are sent every occurrence.
            self._counts_occurrences = [bool(t._core.has_filter) for t in tables]
            # What must be alike on every rank: each slot's config (optimizer settings,
            # learning rates, expiry, ... as its canonical text) and admission filter.
            signature = [(slot, _config_text(t.config), _filter_settings(t)) for slot, t in zip(self._slots, tables)]
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            error = e
        infos = self._settle(error, "building the table", info=(signature, timeout_given is not None, let_go_before))
        _free_let_go(built_on, [let_go for _, _, let_go in infos])
        with_timeout = [r for r, (_, given, _) in enumerate(infos) if given]
        if with_timeout and len(with_timeout) < self._world:
            without = next(r for r in range(self._world) if r not in with_timeout)
            raise ValueError(f"rank {with_timeout[0]} gave a timeout and rank {without} none: every rank must give "
                             "one, or none")
        signatures = [theirs for theirs, _, _ in infos]
        self._timeout = timeout_given
        for r, theirs in enumerate(signatures):
            if theirs != signatures[0]:
                raise ValueError(f"rank {r} built other tables than rank 0: "
                                 f"{_first_difference(signatures[0], theirs)}; every rank must build the same slots "
                                 "with the same configs and filters")

    # ---- collective plumbing ----------------------------------------------------------

    @contextlib.contextmanager
    def _turn(self):
        """Held through each collective call. A call made directly while hooks
        (:mod:`mtht.hooks`) have calls of this table queued on their thread first waits for
        them: every rank then makes its collective calls in the order its trainer issued
        them, whichever thread runs them (two orders would pair one rank's lookup with
        another's update). Within it the calls on the local tables do not wait again (a
        call queued meanwhile by another thread waits for this one's lock). A call made
        inside another (by a learning-rate function) takes memory of its own: the outer
        call's is in use."""
        if self._out_of_step is not None:
            raise DistributedError(f"this table's ranks are out of step ({self._out_of_step}): end the job; the "
                                   "last checkpoint on disk is whole")
        self._after_queued_calls()
        if threading.current_thread() is not threading.main_thread():
            self._check_threads_allowed()
        with self._one_call, turn_taken():
            outer = self._scratch
            if self._depth:
                self._scratch = _Scratch()
            self._depth += 1
            try:
                if self._depth == 1:
                    with self._interrupts_deferred():
                        yield
                else:
                    yield
            finally:
                self._depth -= 1
                self._scratch = outer

    @contextlib.contextmanager
    def _interrupts_deferred(self):
        """Within: a Ctrl-C (SIGINT) is not raised where it lands (inside an exchange with
        the other ranks, it left this rank out of step with them) but at the call's next
        _settle, on every rank, or once the call is done. Only on the main thread, which
        alone receives signals, and only over Python's own handler or the trainer's."""
        previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
        if not callable(previous):
            yield
            return
        pending = self._pending_interrupts = []
        signal.signal(signal.SIGINT, lambda signum, frame: pending.append((signum, frame)))
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
            self._pending_interrupts = None
            if pending:  # after the call's last _settle: the call is done on every rank
                previous(*pending[0])

    def _check_threads_allowed(self) -> None:
        """A call from a thread other than the main one (a hook's) needs an MPI library that
        takes calls from several threads at once (the trainer's own may run meanwhile)."""
        from mpi4py import MPI

        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError("this table is called from a thread other than the main one (a hook's), and MPI "
                               "was initialised without MPI_THREAD_MULTIPLE: leave mpi4py.rc.thread_level at its "
                               "default, 'multiple'")

    def _settle(self, error: Optional[BaseException], what: str, same=None, info=None) -> list:
        """Every rank learns whether every rank got here without an error (and holds the
        same ``same``); if not, every rank raises: its own error, or DistributedError.
        Returns every rank's ``info``. A Ctrl-C deferred since the last one is this rank's
        error (_interrupts_deferred)."""
        pending = self._pending_interrupts
        if pending:
            pending.clear()
            if error is None:
                error = KeyboardInterrupt()
        outcomes = self._allgather((None if error is None else _describe(error), same, info), what)
        if error is not None:
            raise error
        failed = [(r, described) for r, (described, _, _) in enumerate(outcomes) if described is not None]
        if failed:
            r, (message, slot, reason) = failed[0]
            raise DistributedError(f"{what} failed on rank {r}: {message}", slot, reason)
        differ = [r for r, (_, theirs, _) in enumerate(outcomes) if theirs != outcomes[0][1]]
        if differ:
            raise ValueError(f"{what}: rank {differ[0]} differs from rank 0 ({outcomes[differ[0]][1]!r} against "
                             f"{outcomes[0][1]!r}); every rank must make the same call")
        return [i for _, _, i in outcomes]

    def _exchange(self, what: str, send: np.ndarray, send_counts: np.ndarray, recv: np.ndarray,
                  recv_counts: np.ndarray) -> np.ndarray:
        """Alltoallv: ``send_counts[r]`` items to rank r, ``recv_counts[r]`` from it into
        ``recv`` (allocated before every rank agreed to go on: an allocation that fails
        there is raised on every rank instead of leaving the others waiting)."""
        send_displs = np.cumsum(send_counts) - send_counts
        recv_displs = np.cumsum(recv_counts) - recv_counts
        self._collective("Alltoallv", what, [send, (send_counts.tolist(), send_displs.tolist())],
                         [recv, (recv_counts.tolist(), recv_displs.tolist())])
        return recv

    def _collective(self, name: str, what: str, *buffers) -> None:
        """MPI's collective ``name`` (``"Alltoall"``, ...) of the table's communicator on
        ``buffers``: as it is without a timeout; with one, its nonblocking form, which
        _wait waits for. (Used without a timeout too, the nonblocking forms made calls 4% to
        17% slower: they take other paths in MPI. And a nonblocking collective matches only
        nonblocking ones: every rank must have a timeout, or none.)"""
        if self._timeout is None:
            getattr(self._comm, name)(*buffers)
        else:
            self._wait(getattr(self._comm, "I" + name.lower())(*buffers), what, buffers, self._timeout)

    def _allgather(self, value: Any, what: str) -> list:
        """Every rank's ``value`` (picklable), in rank order. With a timeout: a first round
        of fixed size carries each rank's pickle's length and, when every one fits, the
        pickles themselves; a second round, only if not, the pickles."""
        if self._timeout is None:
            return self._comm.allgather(value)
        mine = np.frombuffer(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
        first = np.zeros(8 + _FIRST_ROUND_BYTES, np.uint8)
        first[:8] = np.array([mine.size], np.int64).view(np.uint8)
        if mine.size <= _FIRST_ROUND_BYTES:
            first[8:8 + mine.size] = mine
        firsts = np.empty((self._world, first.size), np.uint8)
        self._collective("Allgather", what, first, firsts)
        sizes = firsts[:, :8].copy().view(np.int64).ravel()
        if sizes.max() <= _FIRST_ROUND_BYTES:
            return [pickle.loads(firsts[r, 8:8 + n].tobytes()) for r, n in enumerate(sizes.tolist())]
        everything = np.empty(int(sizes.sum()), np.uint8)
        starts = np.cumsum(sizes) - sizes
        self._collective("Allgatherv", what, mine, [everything, (sizes.tolist(), starts.tolist())])
        return [pickle.loads(everything[a:a + n].tobytes()) for a, n in zip(starts.tolist(), sizes.tolist())]

    def _sum(self, value: int, what: str) -> int:
        """The sum of every rank's ``value``."""
        mine, total = np.array([value], np.int64), np.empty(1, np.int64)
        self._collective("Allreduce", what, mine, total)
        return int(total[0])

    def _wait(self, request: Any, what: str, buffers: tuple, timeout: float) -> None:
        """Wait for a nonblocking collective started on ``buffers`` until every rank has
        taken part, polling it: it is given up past ``timeout`` seconds or at a second
        Ctrl-C while it waits (the first is raised on every rank at the call's next _settle,
        if the others come). The ranks are then out of step for good (the others are in
        another collective of this communicator, or in none): this table raises from then on."""
        # Spun, as MPI's own wait spins: each test moves the exchange on (a large one is sent
        # in pieces; sleeping between tests slowed 65,536-id calls 4x), yielding the core
        # between tests to ranks that share it (spinning alone slowed 4 ranks on 2 cores 2.7x).
        start = time.monotonic()
        while not request.Test():
            os.sched_yield()
            if time.monotonic() - start > timeout:
                self._give_up(request, buffers, f"{what} waited more than {timeout:g} s for the other ranks")
                raise DistributedError(f"{what}: not every rank took part within {timeout:g} s (one has "
                                       "left the job, hangs, or makes other calls of this table); the ranks are "
                                       "out of step: end the job; the last checkpoint on disk is whole")
            pending = self._pending_interrupts
            if pending is not None and len(pending) > 1:
                self._give_up(request, buffers, f"a second Ctrl-C while {what} waited for the other ranks")
                pending.clear()
                raise KeyboardInterrupt

    def _give_up(self, request: Any, buffers: tuple, why: str) -> None:
        _ABANDONED.append((request, buffers))
        self._out_of_step = why

    def _route(self, what: str, prepare: Callable[[], "_Prepared"], lookup: bool = False) -> "_Call":
        """The first half of a collective call. ``prepare()`` checks this rank's arguments.
        The ids of table k are routed to their owners, each once when ``dedup[k]``, with its
        rows summed (or as given, when a sum would overflow to Inf: the owner sums them then,
        as one process would). Every rank learns whether every rank got this far, and holds
        the same ``same``; then the ids and rows are sent. ``lookup``: rows come back."""
        k, world = len(self._slots), self._world
        call, scratch = _Call(), self._scratch
        error, same, info = None, None, None
        send_counts = np.zeros((world, k), dtype=np.int64)
        try:
            prepared = prepare()
            same = prepared.same
            call.routed = _Routed([ids for ids, _ in prepared.per_table], world, prepared.dedup, scratch, self._dims,
                                  with_rows=not lookup)
            summed_by_owner = [False] * k
            if not lookup:
                call.sent_rows = []
                for t, ((ids, rows), d) in enumerate(zip(prepared.per_table, prepared.dedup)):
                    sent, finite = call.routed.rows_sent(t, rows)
                    if d and not finite:
                        call.routed.send_each_occurrence(t)
                        summed_by_owner[t] = True
                        sent, _ = call.routed.rows_sent(t, rows)
                    call.sent_rows.append(sent)
            send_counts = call.routed.counts
            info = (prepared.named, tuple(bool(ids.size) for ids, _ in prepared.per_table), tuple(summed_by_owner))
        except BaseException as e:  # noqa: BLE001 - raised on every rank by _settle (Ctrl-C too)
            error = e
        recv_counts = np.empty_like(send_counts)
        self._collective("Alltoall", what, send_counts, recv_counts)
        try:
            # Every buffer of the exchanges, before the ranks agree to go on: one that fails
            # after would leave the others waiting in an exchange.
            if error is None:
                sent_ids = scratch.take("sent ids", np.int64, int(send_counts.sum()))
                call.ids = scratch.take("received ids", np.int64, int(recv_counts.sum()))
                if lookup:
                    call.back = scratch.take("rows back", np.float32, int(self._float_counts(send_counts).sum()))
                else:
                    sent_rows = scratch.take("sent rows", np.float32, int(self._float_counts(send_counts).sum()))
                    call.rows = scratch.take("received rows", np.float32, int(self._float_counts(recv_counts).sum()))
        except BaseException as e:  # noqa: BLE001 - raised on every rank by _settle (Ctrl-C too)
            error = e
        infos = self._settle(error, what, same, info)
        call.send_counts, call.recv_counts = send_counts, recv_counts
        # Per table, whether any rank named it, sent it ids, or left their sum to the owner.
        flags = np.logical_or.reduce(np.array(infos, dtype=bool).reshape(-1, 3, k), axis=0)
        call.named, call.nonempty, call.summed_by_owner = flags[0], flags[1], flags[2]
        self._exchange(what, _blocks([call.routed.sent(t) for t in range(k)], send_counts, sent_ids),
                       send_counts.sum(axis=1), call.ids, recv_counts.sum(axis=1))
        if not lookup:
            self._exchange(what, _blocks(call.sent_rows, send_counts, sent_rows),
                           self._float_counts(send_counts), call.rows, self._float_counts(recv_counts))
        return call

    def _float_counts(self, counts: np.ndarray) -> np.ndarray:
        """Floats per rank of rows laid out ``[rank][table]``."""
        return counts @ np.asarray(self._dims, dtype=np.int64) if self._dims else np.zeros(self._world, np.int64)

    def _local_tables(self) -> list:
        return [self._table._tables[s] for s in self._slots]

    def _ids_of(self, slot_to_value: Mapping, method: Optional[str] = None):
        """Per table, ``(ids, rows or None)`` of a call (empty for a slot left out)."""
        per_table: List[Optional[tuple]] = [None] * len(self._slots)
        for slot, value in slot_to_value.items():
            k = self._slot_index.get(slot)
            if k is None:
                raise _unknown_slot(slot)
            if method is None:
                per_table[k] = (as_ids(value, f"slot {slot!r}: ids"), None)
                continue
            given_ids, given_rows = _pair(slot, value, method)
            ids = as_ids(given_ids, f"slot {slot!r}: ids")
            rows = as_rows(given_rows, ids.shape[0], self._dims[k], f"slot {slot!r}: {_rows_name(method)}")
            try:
                self._table._tables[slot]._core.check_finite(rows, _rows_name(method))
            except ValueError:
                refuse_non_finite(slot, method, rows)  # names the slot and the row
                raise
            per_table[k] = (ids, rows)
        empty_ids = np.zeros(0, np.int64)
        return [p if p is not None else (empty_ids, None if method is None else np.zeros((0, d), np.float32))
                for p, d in zip(per_table, self._dims)]

    # ---- reads and writes -------------------------------------------------------------

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self._rank}, world_size={self._world}, local_table={self._table!r})"

    @property
    def rank(self) -> int:
        """This process's rank in the table's communicator."""
        return self._rank

    @property
    def world_size(self) -> int:
        """How many processes the table is sharded over."""
        return self._world

    @property
    def timeout(self) -> Optional[float]:
        """Seconds each exchange of a call waits for the other ranks before it raises
        DistributedError (None: for ever), as given when the table was built."""
        return self._timeout

    @property
    def local_table(self) -> MultiTypeHashTable:
        """This rank's part: a MultiTypeHashTable holding the entries of the ids it owns."""
        return self._table

    def table_of(self, slot: str) -> Any:
        """This rank's part of the table of ``slot``: the entries of the ids it owns (not
        collective)."""
        return self._table.table_of(slot)

    def lookup(self, slot_to_id: SlotIds) -> Dict[str, np.ndarray]:
        """``{slot: float32 [n, dim]}`` for this rank's ids; missing ids read as zeros."""
        with self._turn():
            return self._lookup(slot_to_id)

    def _lookup(self, slot_to_id: Mapping) -> Dict[str, np.ndarray]:
        k = len(self._slots)

        def prepare():
            return _Prepared(self._ids_of(slot_to_id), [True] * k, None, tuple(s in slot_to_id for s in self._slots))

        if not k:  # every rank has no table: nothing to exchange
            prepare()
            return {}
        call = self._route("lookup", prepare, lookup=True)
        # The cores as they are now: a restore swaps them.
        looked_up, error = _attempt(lambda: _core.fused_lookup(
            [t._core for t in self._local_tables()], call.ids, call.recv_counts.reshape(-1).astype(np.int32),
            self._world, self._scratch.take("rows looked up", np.float32,
                                            int(self._float_counts(call.recv_counts).sum()))))
        self._settle(error, "lookup")
        rows, recv_splits = looked_up[0], looked_up[1]
        back = self._exchange("lookup", rows, recv_splits.astype(np.int64), call.back,
                              self._float_counts(call.send_counts))
        # Block (owner w, table t) of `back` starts at float starts[w, t]; the rows of a
        # table's sent ids are in its blocks, owners in order.
        sizes = (call.send_counts * np.asarray(self._dims, dtype=np.int64)[None, :]).reshape(-1)
        starts = np.ascontiguousarray((np.cumsum(sizes) - sizes).reshape(call.send_counts.shape).T)
        named = [self._slot_index[slot] for slot in slot_to_id]
        positions = [call.routed.position(t) for t in named]
        # The slots' rows are views of one array, as a MultiTypeHashTable's lookup gives them.
        outs = _hash_table.rows_in_one_array([(p.shape[0], self._dims[t]) for p, t in zip(positions, named)])
        _core.gather_tables(back, starts[named], np.ascontiguousarray(call.send_counts.T[named]), positions, outs)
        return dict(zip(slot_to_id, outs))

    def _write(self, method: str, data: Mapping, convert: Callable[[], "_hash_table.WriteArguments"]) -> None:
        """A collective write of ``data``, its arguments after the rows converted by
        ``convert()`` (on every rank in the guarded part: a bad step raises everywhere)."""
        with self._turn():
            self._write_in_turn(method, data, convert)

    def _write_in_turn(self, method: str, data: Mapping, convert: Callable[[], "_hash_table.WriteArguments"]):
        k = len(self._slots)
        arguments, dedup = None, False

        def prepare():
            nonlocal arguments, dedup
            arguments = convert()
            dedup = method == "apply_gradients" and arguments.dedup
            # Sent once per id: the tables whose ids are summed per id and counted once.
            once = [dedup and not counts for counts in self._counts_occurrences]
            return _Prepared(self._ids_of(data, method), once, (method, tuple(arguments)),
                             tuple(s in data for s in self._slots))

        if not k:  # every rank has no table: nothing to write
            prepare()
            return
        call = self._route(method, prepare)
        accumulate = [dedup and (counts or by_owner)
                      for counts, by_owner in zip(self._counts_occurrences, call.summed_by_owner)]
        # Every rank writes the tables that any rank named (those with no ids too: as one
        # process's write, it moves their max_update_ts, which expiry goes by).
        written = [t for t in range(k) if call.named[t]]
        converted = cast(_hash_table.WriteArguments, arguments)  # by prepare, which _route called
        if method == "apply_gradients":
            _, error = _attempt(lambda: self._apply_received(written, call, converted, accumulate))
        else:
            _, error = _attempt(lambda: self._assign_received(method, written, call, converted.req_time))
        self._settle(error, method)

    def _assign_received(self, method: str, written: List[int], call: "_Call", req_time: int) -> None:
        """``assign`` or ``assign_add`` of the tables ``written`` from the blocks received,
        ranks in order."""
        per_ids = _unblock(call.ids, call.recv_counts, [1] * len(self._slots))
        per_rows = _unblock(call.rows, call.recv_counts, self._dims)
        self._table._update(method, {self._slots[t]: (per_ids[t].reshape(-1), per_rows[t]) for t in written},
                            req_time=req_time)

    def _apply_received(self, written: List[int], call: "_Call", arguments, accumulate: List[bool]) -> None:
        """The fused update of the tables ``written`` from the blocks ``[rank][table]``
        received, ranks in order (the other tables received no ids)."""
        if not written:
            return
        slots = [self._slots[t] for t in written]
        tables = [self._table._tables[s] for s in slots]
        _hash_table.fused_apply_checked(tables, call.ids, call.recv_counts[:, written].reshape(-1), call.rows,
                                        self._table.learning_rates(arguments.global_step, slots), self._world,
                                        arguments.global_step, arguments.req_time, [accumulate[t] for t in written])
        for t, table in zip(written, tables):
            if call.nonempty[t] and not call.recv_counts[:, t].any():  # written elsewhere only
                table._core.advance_hashnet_scales(arguments.global_step)

    def assign(self, slot_to_id_and_value: SlotRows,
               req_time: Optional[IntegerInput] = None) -> "DistributedMultiTypeHashTable":
        """``{slot: (ids, values)}``: upsert (the last duplicate wins, ranks in order)."""
        self._write("assign", slot_to_id_and_value, lambda: _hash_table.write_arguments("assign", req_time))
        return self

    def assign_add(self, slot_to_id_and_value: SlotRows,
                   req_time: Optional[IntegerInput] = None) -> "DistributedMultiTypeHashTable":
        """``{slot: (ids, values)}``: upsert and add (duplicates accumulate, ranks in order)."""
        self._write("assign_add", slot_to_id_and_value, lambda: _hash_table.write_arguments("assign_add", req_time))
        return self

    def apply_gradients(self, slot_to_id_and_grad: SlotRows, global_step: IntegerInput,
                        use_multi_threads: Switch = False, enable_dedup: Switch = True,
                        req_time: Optional[IntegerInput] = None) -> "DistributedMultiTypeHashTable":
        """``{slot: (ids, grads)}``: see the class. ``use_multi_threads`` is accepted for
        Monolith's signature (the owners use ``mtht.set_num_threads`` threads)."""
        self._write("apply_gradients", slot_to_id_and_grad,
                    lambda: _hash_table.write_arguments("apply_gradients", global_step, use_multi_threads,
                                                        enable_dedup, req_time))
        return self

    def reinitialize(self, slot: str, ids: ArrayInput) -> np.ndarray:
        """Not supported, as in Monolith's multi-type tables: raises NotImplementedError."""
        raise NotImplementedError("DistributedMultiTypeHashTable does not support reinitialize")

    def as_op(self, name: Optional[str] = None) -> "DistributedMultiTypeHashTable":
        """Wait until every write issued to this rank's tables has been applied (not
        collective)."""
        self._wait_for_hooks()
        self._table.as_op(name)
        return self

    def get_table_dim_sizes(self) -> List[int]:
        """Dims of the slots' tables, in sorted slot order."""
        return list(self._dims)

    def raise_on_every_rank(self, error: BaseException, what: str) -> None:
        """Raise ``error`` here and DistributedError on the other ranks, which are making a
        call of this table (``what``): for a wrapper that found its arguments bad before it
        could call (the others would wait for ever)."""
        def prepare():
            raise error

        with self._turn():
            self._route(what, prepare)

    def all_ranks(self, flag: bool) -> bool:
        """Whether ``flag`` is true on every rank (collective)."""
        with self._turn():
            return self._sum(int(bool(flag)), "all_ranks") == self._world

    def size(self) -> int:
        """Entries over every rank (collective)."""
        with self._turn():
            return self._sum(sum(t.size() for t in self._local_tables()), "size")

    # ---- checkpoints ------------------------------------------------------------------

    def save(self, directory: str) -> None:
        """Save every rank's part under ``directory`` (collective; see
        :mod:`mtht.sharded_checkpoint`): a job killed during the save leaves the previous
        save whole, or the new one."""
        with self._turn():  # waits for the calls hooks queued (their errors stay for wait() or as_op())
            self._save(directory)

    @contextlib.contextmanager
    def _directory_lock(self, directory: str, exclusive: bool, what: str):
        """Within: process 0 holds the directory's lock between jobs
        (checkpoint.directory_lock), every rank knowing it does; a Ctrl-C while it
        waits for another job ends the wait, and is raised on every rank."""
        with contextlib.ExitStack() as held:
            _, error = _attempt(lambda: held.enter_context(_checkpoint.directory_lock(
                directory, exclusive, lambda: bool(self._pending_interrupts)))) if self._rank == 0 else (None, None)
            self._settle(error, what)
            yield

    def _save(self, directory: str) -> None:
        with self._directory_lock(directory, True, "save (waiting for the directory's lock)"):
            self._save_locked(directory)

    def _save_locked(self, directory: str) -> None:
        generation, error = _attempt(lambda: _sharded.begin_save(directory)) if self._rank == 0 else (None, None)
        generation = self._settle(error, "save (preparing the directory)", info=generation)[0]  # rank 0's
        _, error = _attempt(lambda: _sharded.save_part(self._table, directory, generation, self._rank, self._world))
        try:
            self._settle(error, "save")
            _, error = _attempt(lambda: _sharded.commit_save(directory, generation, self._world, list(self._slots))) \
                if self._rank == 0 else (None, None)
            self._settle(error, "save (naming the new checkpoint)")
        except BaseException:
            # Each rank removes what it sees of the new generation, unless sharded.json names
            # it there (a directory that some ranks do not share has their part only).
            if _sharded.current_generation(directory) != generation:
                _sharded.abandon_save(directory, generation)
            raise

    def restore(self, directory: str) -> None:
        """Restore every rank's part from ``directory`` (collective), saved by as many ranks.
        Every rank's part is verified before any table of any rank changes."""
        with self._turn():  # waits for the calls hooks queued (their errors stay for wait() or as_op())
            self._restore(directory)
        self._drop_prefetched()

    def _restore(self, directory: str) -> None:
        # Every rank reads sharded.json once process 0 holds the lock: a save of another job
        # cannot name another generation between two ranks' reads.
        with self._directory_lock(directory, False, "restore (waiting for the directory's lock)"):
            saved, error = _attempt(lambda: _sharded.saved_parts(directory, self._world))
            generations = self._settle(error, "restore", info=saved[0]["generation"] if saved else None)
            if len(set(generations)) > 1:  # a job that saved without the lock (one on a file system without locks)
                raise _checkpoint.CheckpointError(
                    f"the processes read different saves in {directory!r} (generations {sorted(set(generations))}): "
                    "another job saved there meanwhile; restore again")
            loaded, error = _attempt(lambda: _checkpoint.load_multi_type(self._table, saved[1][self._rank],
                                                                         self._world, self._rank))
            self._settle(error, "restore")
        _hash_table.swap_contents(loaded)
