"""Pipelining hooks: a table's writes applied on a background thread (``AsyncPush``) and the
next batch's lookups run ahead (``Prefetch``), so that sparse work overlaps the trainer's
dense work. (Monolith does this with queue hooks around its sessions.)

Every hook of one table runs its calls on that table's one background thread, in the order
the trainer made them: a lookup prefetched before a push reads the table as it was before
that push, whatever the timing, so results do not depend on how the threads are scheduled.
The core releases the GIL for every batch, so the background thread runs beside Python.
"""

from __future__ import annotations

import array
import atexit
import collections
import collections.abc
import concurrent.futures
import contextlib
import inspect
import numbers
import os
import queue
import sys
import threading
import traceback
import weakref
from typing import Any, Callable, Deque, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from mtht._arrays import ArrayInput, as_ids, as_numpy

__all__ = ["QueueHooks", "AsyncPush", "Prefetch"]


class QueueHooks:
    """What a table offers its hooks: ``add_queue_hook``, ``get_queue_hooks``, and a wait
    for the calls they have queued."""

    def add_queue_hook(self, hook: Any) -> None:
        """Attach a pipelining hook to this table. mtht's own hooks are held weakly: one the
        trainer drops, say one per ``with`` block, is gone from the table too (they piled up,
        and every wait went through them). A hook the table holds already is not added again
        (mtht's hooks attach themselves to the table they are made for)."""
        with _ATTACHING:
            refs = [r for r in getattr(self, "_local_queue_hooks", []) if r() is not None]
            if any(r() is hook for r in refs):
                return
            refs.append(weakref.ref(hook) if isinstance(hook, _TableHook) else _Held(hook))
            self._local_queue_hooks = refs

    def _wrapped(self) -> list:
        """The tables this one wraps directly (``_table``, ``_tables``)."""
        inner = getattr(self, "_table", None)
        tables = getattr(self, "_tables", None)
        found = [inner] if inner is not None else []
        if tables is not None:
            found.extend(tables.values() if isinstance(tables, dict) else tables)
        return [t for t in found if isinstance(t, QueueHooks)]

    def get_queue_hooks(self) -> list:
        """This table's hooks followed by those of the tables it wraps (``_table``, ``_tables``)."""
        hooks = [h for h in (r() for r in getattr(self, "_local_queue_hooks", [])) if h is not None]
        for t in self._wrapped():
            hooks.extend(t.get_queue_hooks())
        return hooks

    _mtht_pipeline: Optional["_Pipeline"] = None  # of the family, once a hook is made (_pipeline_of)

    def _after_queued_calls(self) -> None:
        """A call made on the table directly (not through a hook) first waits for the calls
        that hooks queued before it, so that it reads and writes the table in the trainer's
        order. The error of a failed one stays for the hooks' next call, wait() or as_op()."""
        pipeline = self._mtht_pipeline
        if pipeline is not None:
            pipeline.wait_for_queued()

    def _wait_for_hooks(self) -> None:
        """Every call queued by a hook of this table, of a table it wraps, or of a table that
        wraps it (a slot table of a multi-type table with hooks) is done; the first error
        among them is raised. (Once per thread: the hooks of a family share one.)"""
        pipelines = {id(h._pipeline): h._pipeline for h in self.get_queue_hooks() if isinstance(h, _TableHook)}
        for pipeline in pipelines.values():
            pipeline.wait()
            pipeline.take_error()
        # The hooks of a table that wraps this one: their error is the trainer's to take
        # where it takes that table's (on a table whose calls are collective, at wait(),
        # end() or as_op(), which every process reaches).
        shared = self._mtht_pipeline  # set on every table of a family with hooks
        if shared is not None and id(shared) not in pipelines:
            shared.wait()
            shared.take_error_at_call()


    def _drop_prefetched(self) -> None:
        """Drop the batches prefetched by the hooks of this table, of the tables it wraps and
        of those that wrap it (a slot table's model): a restore replaced what they read, so
        their lookups read the table again."""
        hooks = {id(h): h for h in self.get_queue_hooks() if isinstance(h, Prefetch)}
        shared = self._mtht_pipeline
        if shared is not None:
            hooks.update((id(h), h) for h in list(shared.hooks) if isinstance(h, Prefetch))
        for hook in hooks.values():
            with hook._lock:
                hook._ahead.clear()


class _Held:
    """A hook held as given, called like a weak reference."""

    __slots__ = ("_hook",)

    def __init__(self, hook):
        self._hook = hook

    def __call__(self):
        return self._hook


class _Stop:
    pass


_STOP = _Stop()
_RUNNING = threading.local()  # .state: the _PipelineState of the pipeline whose thread this is
_IN_TURN = threading.local()  # .depth: calls under way on this thread that have waited their turn


@contextlib.contextmanager
def turn_taken() -> Iterator[None]:
    """Within: this thread's call has waited for the queued calls and holds its turn (a
    sharded table's call holds a lock a queued call needs), so the calls it makes on tables
    do not wait again: a call queued meanwhile by another thread waits for it instead."""
    depth = getattr(_IN_TURN, "depth", 0)
    _IN_TURN.depth = depth + 1
    try:
        yield
    finally:
        _IN_TURN.depth = depth


class _PipelineState:
    """What the thread and the trainer share: the error of a failed write, and how many
    writes were dropped after it."""

    def __init__(self, collective: bool = False):
        self.lock = threading.Lock()
        self.consumer = threading.Lock()  # held by the thread taking the queue's calls
        self.failed_write: Optional[BaseException] = None
        self.failed_where = ""  # its traceback on the thread, as text
        self.dropped = 0
        self.failed_later = 0  # writes that failed after it (on a collective table, which goes on)
        self.finished = 0  # the number of the call the thread finished last (numbered as queued)
        # The table's calls are collective over processes (mtht.distributed): each process
        # must run the calls its trainer queued, all of them, whatever failed before.
        self.collective = collective


def _run(tasks: "queue.SimpleQueue", state: _PipelineState) -> None:
    """The background thread: runs tasks in order until told to stop. It holds the queue and
    the state, not the pipeline, so that a pipeline nobody holds is collected (and stops it).
    One thread at a time takes the queue's calls (state.consumer): a thread started while
    the one told to stop still runs the calls queued before (a stop whose wait an interrupt
    cut short) starts after it."""
    with state.consumer:
        _run_tasks(tasks, state)


def _run_tasks(tasks: "queue.SimpleQueue", state: _PipelineState) -> None:
    _RUNNING.state = state
    while True:
        task = tasks.get()
        if task is _STOP:
            return
        fn, future, is_write, on_done, number = task
        try:
            with state.lock:
                drop = is_write and state.failed_write is not None and not state.collective
                if drop:
                    state.dropped += 1  # a write after a failed one: not applied (reported with the error)
            if drop:
                future.cancel()
            elif future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - handed to the trainer, never swallowed
                    future.set_exception(e)
                    if is_write:
                        # Kept as text: the traceback's frames hold the table (and the thread would
                        # keep it alive until the error was taken).
                        where = "".join(traceback.format_tb(e.__traceback__))
                        with state.lock:
                            if state.failed_write is None:  # the first is raised (collective tables go on)
                                state.failed_write, state.failed_where = _without_tracebacks(e), where
                            else:
                                state.failed_later += 1
        finally:
            state.finished = number
            if on_done is not None:
                try:
                    on_done()
                except BaseException:  # noqa: BLE001 - the thread must go on with the queue
                    traceback.print_exc()
            del task, fn, future, on_done  # the table they hold may be dropped while the thread waits


def _without_tracebacks(error: BaseException) -> BaseException:
    """``error`` with no traceback on it or on the errors it was raised from or during
    (``__cause__``, ``__context__``: ``raise ... from None`` keeps the latter): their
    frames hold the table, which the thread would keep alive until the error was taken."""
    seen: set = set()
    todo: List[Optional[BaseException]] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += [e.__cause__, e.__context__]
    return error


class _Pipeline:
    """The background thread of a table (and of the tables it wraps) and its queue of calls.

    The thread is started, calls are queued and the thread is stopped under one lock: one
    thread at a time takes the queue's calls (two would run them out of order), and no call
    is queued behind the stop of the last thread. Waiting is a call of its own at the end of
    the queue, not a count of calls: a count that an interrupt (Ctrl-C) cut between two
    steps would never come back to zero."""

    def __init__(self, name: str):
        self._name = name
        self.hooks: "weakref.WeakSet" = weakref.WeakSet()  # the hooks of the family
        self._new_state()
        # The thread ends with the pipeline; at exit, only after the queued calls (_finish_queued_writes).
        weakref.finalize(self, _end_of, self._box).atexit = False
        _PIPELINES.add(self)

    def _new_state(self) -> None:
        self._tasks: "queue.SimpleQueue" = queue.SimpleQueue()
        self._state: _PipelineState = _PipelineState(self._state.collective if hasattr(self, "_state") else False)
        self._thread: Optional[threading.Thread] = None
        self._queued = 0  # the calls queued so far, which number them
        self._lock = threading.Lock()
        self._box: List[Any] = getattr(self, "_box", [None, None, self._name])  # for the finalizer
        self._box[:2] = [self._tasks, self._state]

    def reset_in_child(self) -> None:
        """After a fork: the child has no thread, and does not run the calls its parent queued
        (the parent does); nor do its hooks wait for them."""
        self._new_state()
        for hook in list(self.hooks):
            hook._reset_in_child()

    def _start_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=_run, args=(self._tasks, self._state),
                                            name=f"mtht-pipeline-{self._name}", daemon=True)
            self._thread.start()

    def start(self) -> None:
        with self._lock:
            self._start_locked()

    def stop(self) -> None:
        """Waits for the queued calls, then ends the thread (a later call starts another). On
        the thread itself, only asks it to end after the calls queued so far."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._tasks.put(_STOP)
            if not self.on_own_thread():
                thread.join()

    def submit(self, fn: Callable[[], Any], is_write: bool,
               on_done: Optional[Callable[[], None]] = None) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._start_locked()
            self._queued += 1
            self._tasks.put((fn, future, is_write, on_done, self._queued))
        return future

    def on_own_thread(self) -> bool:
        return getattr(_RUNNING, "state", None) is self._state

    def wait(self) -> None:
        """Blocks until every call queued so far is done (at once on the pipeline's own
        thread: a call it runs may ask for the table's writes to be done)."""
        if self.on_own_thread():
            return
        with self._lock:
            # Nothing queued: no thread, not even one told to stop still running calls.
            if self._thread is None and not self._state.consumer.locked():
                return
        self.submit(lambda: None, is_write=False).result()

    def wait_for_queued(self) -> None:
        """wait(), for a call made on a table directly: at no cost once the thread has
        finished the call queued last (two reads of ints; a Future's done() takes its lock,
        0.3 us), at once on the pipeline's own thread and within a call that holds its turn
        (turn_taken). It waits through wait(), not for that call: an interrupt may have cut
        a submit short after it counted the call, which then never runs."""
        if (self._state.finished >= self._queued or self.on_own_thread()
                or getattr(_IN_TURN, "depth", 0) > 0):
            return
        self.wait()

    def take_error_at_call(self) -> None:
        """take_error, where a hook's call may raise an earlier write's error: not on a
        table whose calls are collective, where every process must queue the same calls
        (the error comes out of wait(), end() and as_op(), which every process reaches)."""
        if not self._state.collective:
            self.take_error()

    def take_error(self) -> None:
        """Raises the error of a failed write, once, saying how many later writes were not
        applied because of it (all those queued before this call: it waits for them)."""
        state = self._state
        with state.lock:
            if state.failed_write is None:
                return
        self.wait()
        with state.lock:
            error, where, dropped, later = state.failed_write, state.failed_where, state.dropped, state.failed_later
            state.failed_write, state.failed_where, state.dropped, state.failed_later = None, "", 0, 0
        if error is None:  # taken meanwhile by another thread
            return
        note = (f"raised by a write queued on table {self._name!r}, on its background thread"
                + (f"; the {dropped} write(s) queued after it were not applied" if dropped else "")
                + (f"; {later} write(s) queued after it failed too" if later else "")
                + f"; where it was raised there:\n{where}")
        if hasattr(error, "add_note"):  # Python 3.11
            error.add_note(note)
        else:
            error.args = (f"{error.args[0] if error.args else ''} ({note})", *error.args[1:])
        raise error


def _end_of(box: list) -> None:
    """A pipeline nobody holds: its thread ends after the calls queued; the error of a
    failed write that no call raised is printed rather than lost."""
    tasks, state, name = box
    tasks.put(_STOP)
    if state.failed_write is not None:
        print(f"mtht: a write queued on table {name!r} failed, and the table was dropped before a call raised "
              f"the error:\n{state.failed_where}{type(state.failed_write).__name__}: {state.failed_write}",
              file=sys.stderr)


_PIPELINES: "weakref.WeakSet[_Pipeline]" = weakref.WeakSet()
# Held while a hook finds or makes its table's pipeline and joins the table's hooks: hooks
# made on one table by two threads at once each made a pipeline, whose threads then ran
# their writes in no order, and one could miss the table's list of hooks.
_ATTACHING = threading.RLock()


def _reset_in_child() -> None:
    global _ATTACHING
    _ATTACHING = threading.RLock()  # a thread of the parent may have held it at the fork
    for pipeline in list(_PIPELINES):
        pipeline.reset_in_child()


os.register_at_fork(after_in_child=_reset_in_child)


@atexit.register
def _finish_queued_writes() -> None:
    """Writes queued when the interpreter exits are applied, not lost with the thread; the
    error of one that failed, which no call is left to raise, is printed."""
    for pipeline in list(_PIPELINES):
        try:
            pipeline.wait()
            pipeline.take_error()
        except BaseException:  # noqa: BLE001 - reported here: the trainer has no call left
            traceback.print_exc()


def _wrapped_tables(table) -> list:
    """The tables a multi-type table wraps, at every depth."""
    return [t for inner in table._wrapped() for t in [inner] + _wrapped_tables(inner)]


def _pipeline_of(table) -> _Pipeline:
    """The pipeline of ``table``, shared with the tables it wraps: hooks on a merged table and
    on one of its slot tables run their calls on one thread, in the trainer's order (on two,
    the order between them was lost, and each thread could wait for the other)."""
    family = [table] + _wrapped_tables(table)
    found = {id(p): p for p in (getattr(t, "_mtht_pipeline", None) for t in family) if p is not None}
    if len(found) > 1:
        raise ValueError(f"tables wrapped by this {type(table).__name__} already have hooks running on separate "
                         "threads: attach hooks to the outer table before those of the tables it wraps")
    pipeline = next(iter(found.values())) if found else _Pipeline(str(getattr(table, "name", type(table).__name__)))
    if any(getattr(t, "calls_are_collective", False) for t in family):
        pipeline._state.collective = True
    for t in family:
        t._mtht_pipeline = pipeline
    return pipeline


def _collective_table(table):
    """The table of ``table``'s family whose calls are collective over processes, or None."""
    return next((t for t in [table] + _wrapped_tables(table) if getattr(t, "calls_are_collective", False)), None)


def _snapshot(value, name: str):
    """A copy of the arrays in ``value`` (nested in mappings, lists and tuples), so that the
    trainer may reuse its buffers as soon as a call is queued. Anything with ``__array__`` (a
    NumPy array, a PyTorch, JAX or TensorFlow tensor) or a buffer (a memoryview, an
    ``array.array``) or a DLPack producer becomes a NumPy copy. ``name`` names the argument
    in the TypeError of one that cannot be read (``grads``, ``slot_to_id['a'][0]``)."""
    if isinstance(value, (np.ndarray, memoryview, array.array, bytearray)):
        return np.array(value, copy=True)
    if (hasattr(value, "__array__") or hasattr(value, "__dlpack__")) and not np.isscalar(value):
        return np.array(as_numpy(value, name), copy=True)  # read as the table's own calls read it
    if isinstance(value, collections.abc.Mapping):
        return {k: _snapshot(v, f"{name}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list):
        return [_snapshot(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        items = [_snapshot(v, f"{name}[{i}]") for i, v in enumerate(value)]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)  # a named tuple keeps its type
    return value


_POSITIONAL_NAMES: Dict[Tuple[type, str], Tuple[str, ...]] = {}


def _positional_names(table_type: type, method: str) -> Tuple[str, ...]:
    """The names of the positional parameters of ``table_type.method`` (self left out),
    worked out once per class and method."""
    names = _POSITIONAL_NAMES.get((table_type, method))
    if names is None:
        try:
            parameters = list(inspect.signature(getattr(table_type, method)).parameters.values())
        except (TypeError, ValueError):
            parameters = []
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = _POSITIONAL_NAMES[(table_type, method)] = tuple(p.name for p in parameters if p.kind in positional)[1:]
    return names


def _snapshot_call(table: Any, method: str, args: Tuple, kwargs: dict) -> Tuple[Tuple, dict]:
    """``_snapshot`` of a call's arguments, each named as the table's method names it."""
    names = _positional_names(type(table), method)
    return (tuple(_snapshot(a, names[i] if i < len(names) else f"argument {i + 1}") for i, a in enumerate(args)),
            {k: _snapshot(v, k) for k, v in kwargs.items()})


class _TableHook:
    """A hook of one table: queues calls on the table's pipeline."""

    def __init__(self, table, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        capacity = int(capacity)
        if not isinstance(table, QueueHooks):
            raise TypeError(f"a hook needs an mtht table, got {type(table).__name__}")
        self._table: Any = table
        self._capacity: int = capacity
        with _ATTACHING:
            self._pipeline: _Pipeline = _pipeline_of(table)
            self._pipeline.hooks.add(self)
            table.add_queue_hook(self)

    def _reset_in_child(self) -> None:
        """After a fork, in the child: forget the parent's calls under way."""

    @property
    def table(self) -> Any:
        """The table the hook queues calls on."""
        return self._table

    def begin(self) -> None:
        """Starts the table's background thread (the first queued call also does)."""
        self._pipeline.take_error_at_call()
        self._pipeline.start()

    def wait(self) -> None:
        """Every call queued on the table so far is done; raises the error of a failed write."""
        self._pipeline.wait()
        self._pipeline.take_error()

    def end(self) -> None:
        """Waits for the queued calls and ends the background thread; raises the error of a
        failed write."""
        self._pipeline.wait()
        self._pipeline.stop()
        self._pipeline.take_error()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(table={self._table!r}, capacity={self._capacity})"

    def __enter__(self):
        self.begin()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end()
        else:  # the trainer's own error goes first; the queued writes are still applied
            self._pipeline.wait()
            self._pipeline.stop()


class _Slot:
    """One of a push's slots, given back once however many paths give it back. The slots
    are tokens in a SimpleQueue, whose get and put are single steps in C: an interrupt
    (Ctrl-C) in a push cannot leave them half taken, as it could a threading.Semaphore's
    lock, which the background thread then waited for for ever."""

    def __init__(self, slots: "queue.SimpleQueue"):
        self._slots = slots
        self._held: list = []  # the token, once taken

    def take(self) -> None:
        """Waits for a free slot and holds it. The token lands in ``_held`` within one call
        in C (list.extend over a map that calls get): Python looks for an interrupt only
        between its own steps, so a Ctrl-C cannot come between taking the token and keeping
        it (it was lost there, and after as many interrupts as slots every push hung)."""
        self._held.extend(map(queue.SimpleQueue.get, (self._slots,)))

    def release(self) -> None:
        try:
            token = self._held.pop()  # one step: of two threads giving it back, one gets it
        except IndexError:
            return
        self._slots.put(token)


class AsyncPush(_TableHook):
    """Applies a table's writes on a background thread: ``push.apply_gradients(...)`` takes
    the arguments of ``table.apply_gradients`` (likewise ``assign``, ``assign_add`` and
    ``fused_apply_gradient``), copies the arrays among them and returns at once, so the
    trainer goes on with its next step while the table is written. At most ``capacity``
    writes wait at a time: a push beyond them blocks until the oldest is applied.

    Writes are applied in the order they were pushed. ``wait()``, ``end()`` and the table's
    ``as_op()`` return once they are; any other call made on the table directly waits for
    the writes pushed before it. A write that fails (a NaN gradient, a wrong shape)
    changes nothing; its exception is raised again by the next call of a hook of the table
    (or ``as_op()``), with a note saying so, and the writes queued after it are not applied
    (the note says how many). On a table sharded over processes (:mod:`mtht.distributed`),
    whose writes every process must make alike, the writes after a failed one are applied,
    and its error is raised by ``wait()``, ``end()`` or ``as_op()`` only.
    """

    def __init__(self, table: Any, capacity: int = 2) -> None:
        super().__init__(table, capacity)
        self._reset_in_child()

    def _reset_in_child(self) -> None:
        # Every slot free: the writes that held some are the parent's to apply.
        self._slots: "queue.SimpleQueue" = queue.SimpleQueue()
        for token in range(self._capacity):
            self._slots.put(token)

    def _push(self, method: str, args: Tuple, kwargs: dict) -> None:
        fn = getattr(self._table, method, None)
        if fn is None:
            raise AttributeError(f"{type(self._table).__name__} has no {method}")
        self._pipeline.take_error_at_call()
        args, kwargs = _snapshot_call(self._table, method, args, kwargs)
        slot = _Slot(self._slots)
        try:  # the thread gives the slot back once the write is done (or dropped)
            slot.take()  # blocks while `capacity` writes wait
            self._pipeline.submit(lambda: fn(*args, **kwargs), is_write=True, on_done=slot.release)
        except BaseException:  # an interrupt (Ctrl-C) may come after the call was queued: once only
            slot.release()
            raise

    def apply_gradients(self, *args: Any, **kwargs: Any) -> None:
        """Queue ``table.apply_gradients(*args, **kwargs)``, its arrays copied."""
        self._push("apply_gradients", args, kwargs)

    def assign(self, *args: Any, **kwargs: Any) -> None:
        """Queue ``table.assign(*args, **kwargs)``, its arrays copied."""
        self._push("assign", args, kwargs)

    def assign_add(self, *args: Any, **kwargs: Any) -> None:
        """Queue ``table.assign_add(*args, **kwargs)``, its arrays copied."""
        self._push("assign_add", args, kwargs)

    def fused_apply_gradient(self, *args: Any, **kwargs: Any) -> None:
        """Queue ``table.fused_apply_gradient(*args, **kwargs)``, its arrays copied."""
        self._push("fused_apply_gradient", args, kwargs)


def _same_ids(a, b) -> bool:
    mappings = isinstance(a, collections.abc.Mapping), isinstance(b, collections.abc.Mapping)
    if any(mappings):
        return all(mappings) and a.keys() == b.keys() and all(_same_ids(a[k], b[k]) for k in a)
    # As the table's lookup reads them: float or bool ids equal in value to the batch
    # prefetched raise here (a miss), and so does their lookup then.
    return np.array_equal(as_ids(a), as_ids(b))


class Prefetch(_TableHook):
    """Runs lookups ahead on the table's background thread: ``prefetch(ids)`` queues the
    lookup of a coming batch, and ``lookup(ids)`` returns it (waiting if it is not done),
    so the lookup overlaps the trainer's work on the batch before. ``ids`` are what the
    table's ``lookup`` takes (a multi-type table's: a dict of slot to ids).

    A prefetched lookup reads the table as the calls queued before it left it: a batch
    prefetched before the previous batch's gradients were pushed (with ``AsyncPush`` on the
    same table) reads the values from before that push, as in Monolith's pipelines. A
    restore of the table drops the batches prefetched before it. Up to
    ``capacity`` batches may be prefetched ahead; ``lookup(ids)`` of ids other than the
    oldest prefetched batch's drops that batch (counted by ``misses``) and looks up ``ids``
    in order with the queued calls. On a table sharded over processes, every process takes
    its prefetched batch only if no process missed; otherwise each looks its ids up again.
    """

    def __init__(self, table: Any, capacity: int = 1) -> None:
        super().__init__(table, capacity)
        self._reset_in_child()
        self._collective = _collective_table(table)  # whose calls every process makes alike, or None
        self.misses = 0

    def _reset_in_child(self) -> None:
        # Nothing prefetched (the parent's thread completes those lookups), and a lock that
        # no thread of the parent holds.
        self._ahead: Deque[Tuple[Any, concurrent.futures.Future]] = collections.deque()
        self._lock = threading.Lock()

    def prefetch(self, ids: Union[ArrayInput, Mapping[str, ArrayInput]]) -> None:
        """Queue the lookup of ``ids`` (copied), for a later ``lookup(ids)`` to take. A
        ``ValueError`` when ``capacity`` batches are prefetched already."""
        self._pipeline.take_error_at_call()
        with self._lock:
            if len(self._ahead) >= self._capacity:
                raise ValueError(f"{len(self._ahead)} batch(es) are prefetched already (capacity "
                                 f"{self._capacity}): look them up first")
            ids = _snapshot(ids, "ids")
            self._ahead.append((ids, self._queue_lookup(ids)))

    def lookup(self, ids: Union[ArrayInput, Mapping[str, ArrayInput]]) -> Any:
        """The rows of ``ids`` as the table's ``lookup`` returns them: the oldest prefetched
        batch's if ``ids`` are its ids, else looked up in order with the queued calls."""
        self._pipeline.take_error_at_call()
        with self._lock:
            ahead = self._ahead.popleft() if self._ahead else None
        try:
            hit = ahead is not None and _same_ids(ahead[0], ids)
        except Exception:  # noqa: BLE001 - ids NumPy cannot compare: the lookup of them raises
            hit = False
        if ahead is not None and not hit:
            self.misses += 1
        collective = self._collective
        if collective is not None and ahead is not None:
            # Every process takes its prefetched batch, or every one looks its ids up again:
            # a lookup on some processes only would wait for ever for the others.
            lookup, fresh = self._table.lookup, _snapshot(ids, "ids")
            taken = ahead[1]
            return self._pipeline.submit(lambda: taken.result() if collective.all_ranks(hit) else lookup(fresh),
                                         is_write=False).result()
        if hit and ahead is not None:
            return ahead[1].result()
        return self._queue_lookup(_snapshot(ids, "ids")).result()

    def _queue_lookup(self, ids) -> concurrent.futures.Future:
        lookup = self._table.lookup
        return self._pipeline.submit(lambda: lookup(ids), is_write=False)

    def end(self) -> None:
        """Drops the batches prefetched and not looked up, then as ``_TableHook.end``."""
        with self._lock:
            self._ahead.clear()
        super().end()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # as end() does: a block entered again starts with none
            with self._lock:
                self._ahead.clear()
        super().__exit__(exc_type, exc, tb)
