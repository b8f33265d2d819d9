"""Pipelining hooks: a table's writes applied on a background thread (``AsyncPush``) and the
next batch's lookups run ahead (``Prefetch``), so that sparse work overlaps the trainer's
dense work. (Monolith does this with queue hooks around its sessions.)

Every hook of one table runs its calls on that table's one background thread, in the order
the trainer made them: a lookup prefetched before a push reads the table as it was before
that push, whatever the timing, so results do not depend on how the threads are scheduled.
The core releases the GIL for every batch, so the background thread runs beside Python.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import queue
import threading
import weakref
from typing import Any, Callable, Deque, Optional, Tuple

import numpy as np

__all__ = ["QueueHooks", "AsyncPush", "Prefetch"]


class QueueHooks:
    """What a table offers its hooks: ``add_queue_hook``, ``get_queue_hooks``, and a wait
    for the calls they have queued."""

    def add_queue_hook(self, hook) -> None:
        """Attach a pipelining hook to this table."""
        if not hasattr(self, "_local_queue_hooks"):
            self._local_queue_hooks = []
        self._local_queue_hooks.append(hook)

    def get_queue_hooks(self) -> list:
        """This table's hooks followed by those of the tables it wraps (``_table``, ``_tables``)."""
        hooks = list(getattr(self, "_local_queue_hooks", []))
        inner = getattr(self, "_table", None)
        if isinstance(inner, QueueHooks):
            hooks.extend(inner.get_queue_hooks())
        tables = getattr(self, "_tables", None)
        if tables is not None:
            for t in (tables.values() if isinstance(tables, dict) else tables):
                if isinstance(t, QueueHooks):
                    hooks.extend(t.get_queue_hooks())
        return hooks

    def _wait_for_hooks(self) -> None:
        """Every call queued by a hook of this table (or of a table it wraps) is done; the
        first error among them is raised."""
        for hook in self.get_queue_hooks():
            if isinstance(hook, _TableHook):
                hook.wait()


class _Stop:
    pass


_STOP = _Stop()


def _run(tasks: "queue.SimpleQueue", state: "_PipelineState") -> None:
    """The background thread: runs tasks in order until told to stop. It holds the queue and
    the state, not the pipeline, so that a pipeline nobody holds is collected (and stops it)."""
    while True:
        task = tasks.get()
        if task is _STOP:
            return
        fn, future, is_write = task
        try:
            if state.failed_write is not None and is_write:
                state.dropped += 1  # a write after a failed one: not applied (reported with the error)
                future.cancel()
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the trainer, never swallowed
                future.set_exception(e)
                if is_write:
                    state.failed_write = e
        finally:
            del task, fn, future  # the table they hold may be dropped while the thread waits
            with state.idle:
                state.pending -= 1
                if state.pending == 0:
                    state.idle.notify_all()


class _PipelineState:
    def __init__(self):
        self.idle = threading.Condition()
        self.pending = 0
        self.failed_write: Optional[BaseException] = None
        self.dropped = 0


class _Pipeline:
    """One table's background thread and its queue of calls."""

    def __init__(self, name: str):
        self._name = name
        self._tasks: "queue.SimpleQueue" = queue.SimpleQueue()
        self._state = _PipelineState()
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()
        weakref.finalize(self, self._tasks.put, _STOP)  # the thread ends with the pipeline
        _PIPELINES.add(self)

    def start(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=_run, args=(self._tasks, self._state),
                                                name=f"mtht-pipeline-{self._name}", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Waits for the queued calls, then ends the thread (a later call starts another)."""
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._tasks.put(_STOP)
            thread.join()

    def submit(self, fn: Callable[[], Any], is_write: bool) -> concurrent.futures.Future:
        self.start()
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._state.idle:
            self._state.pending += 1
        self._tasks.put((fn, future, is_write))
        return future

    def on_own_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def wait(self) -> None:
        """Blocks until every queued call is done (at once on the pipeline's own thread: a
        call it runs may ask for the table's writes to be done)."""
        if self.on_own_thread():
            return
        with self._state.idle:
            self._state.idle.wait_for(lambda: self._state.pending == 0)

    def take_error(self) -> None:
        """Raises the error of a failed write, once, saying how many later writes were not
        applied because of it (all those queued before this call: it waits for them)."""
        state = self._state
        with state.idle:
            if state.failed_write is None:
                return
            if not self.on_own_thread():
                state.idle.wait_for(lambda: state.pending == 0)
            error, dropped = state.failed_write, state.dropped
            state.failed_write, state.dropped = None, 0
        note = (f"raised by a write queued on table {self._name!r}, on its background thread"
                + (f"; the {dropped} write(s) queued after it were not applied" if dropped else ""))
        if hasattr(error, "add_note"):  # Python 3.11
            error.add_note(note)
        else:
            error.args = (f"{error.args[0] if error.args else ''} ({note})", *error.args[1:])
        raise error


_PIPELINES: "weakref.WeakSet[_Pipeline]" = weakref.WeakSet()


@atexit.register
def _finish_queued_writes() -> None:
    """Writes queued when the interpreter exits are applied, not lost with the thread."""
    for pipeline in list(_PIPELINES):
        pipeline.wait()


def _pipeline_of(table) -> _Pipeline:
    pipeline = getattr(table, "_mtht_pipeline", None)
    if pipeline is None:
        pipeline = _Pipeline(str(getattr(table, "name", type(table).__name__)))
        table._mtht_pipeline = pipeline
    return pipeline


def _snapshot(value):
    """A copy of the arrays in ``value`` (nested in dicts, lists and tuples), so that the
    trainer may reuse its buffers as soon as a call is queued. Anything with ``__array__``
    (a NumPy array, a PyTorch, JAX or TensorFlow tensor) becomes a NumPy copy."""
    if isinstance(value, np.ndarray) or (hasattr(value, "__array__") and not np.isscalar(value)):
        return np.array(value, copy=True)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_snapshot(v) for v in value]
    if isinstance(value, tuple):
        items = [_snapshot(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)  # a named tuple keeps its type
    return value


class _TableHook:
    """A hook of one table: queues calls on the table's pipeline."""

    def __init__(self, table, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        if not isinstance(table, QueueHooks):
            raise TypeError(f"a hook needs an mtht table, got {type(table).__name__}")
        self._table = table
        self._capacity = capacity
        self._pipeline = _pipeline_of(table)
        table.add_queue_hook(self)

    @property
    def table(self):
        return self._table

    def begin(self) -> None:
        """Starts the table's background thread (the first queued call also does)."""
        self._pipeline.take_error()
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

    def __enter__(self):
        self.begin()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end()
        else:  # the trainer's own error goes first; the queued writes are still applied
            self._pipeline.wait()
            self._pipeline.stop()


class AsyncPush(_TableHook):
    """Applies a table's writes on a background thread: ``push.apply_gradients(...)`` takes
    the arguments of ``table.apply_gradients`` (likewise ``assign``, ``assign_add`` and
    ``fused_apply_gradient``), copies the arrays among them and returns at once, so the
    trainer goes on with its next step while the table is written. At most ``capacity``
    writes wait at a time: a push beyond them blocks until the oldest is applied.

    Writes are applied in the order they were pushed. ``wait()``, ``end()`` and the table's
    ``as_op()`` return once they are. A write that fails (a NaN gradient, a wrong shape)
    changes nothing; its exception is raised again by the next call of a hook of the table
    (or ``as_op()``), with a note saying so, and the writes queued after it are not applied
    (the note says how many).
    """

    def __init__(self, table, capacity: int = 2):
        super().__init__(table, capacity)
        self._slots = threading.BoundedSemaphore(capacity)

    def _push(self, method: str, args: Tuple, kwargs: dict) -> None:
        fn = getattr(self._table, method, None)
        if fn is None:
            raise AttributeError(f"{type(self._table).__name__} has no {method}")
        self._pipeline.take_error()
        args, kwargs = _snapshot(args), _snapshot(kwargs)
        self._slots.acquire()
        try:
            future = self._pipeline.submit(lambda: fn(*args, **kwargs), is_write=True)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())

    def apply_gradients(self, *args, **kwargs) -> None:
        self._push("apply_gradients", args, kwargs)

    def assign(self, *args, **kwargs) -> None:
        self._push("assign", args, kwargs)

    def assign_add(self, *args, **kwargs) -> None:
        self._push("assign_add", args, kwargs)

    def fused_apply_gradient(self, *args, **kwargs) -> None:
        self._push("fused_apply_gradient", args, kwargs)


def _same_ids(a, b) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                and all(_same_ids(a[k], b[k]) for k in a))
    return np.array_equal(np.asarray(a), np.asarray(b))


class Prefetch(_TableHook):
    """Runs lookups ahead on the table's background thread: ``prefetch(ids)`` queues the
    lookup of a coming batch, and ``lookup(ids)`` returns it (waiting if it is not done),
    so the lookup overlaps the trainer's work on the batch before. ``ids`` are what the
    table's ``lookup`` takes (a multi-type table's: a dict of slot to ids).

    A prefetched lookup reads the table as the calls queued before it left it: a batch
    prefetched before the previous batch's gradients were pushed (with ``AsyncPush`` on the
    same table) reads the values from before that push, as in Monolith's pipelines. Up to
    ``capacity`` batches may be prefetched ahead; ``lookup(ids)`` of ids other than the
    oldest prefetched batch's drops that batch (counted by ``misses``) and looks up ``ids``
    in order with the queued calls.
    """

    def __init__(self, table, capacity: int = 1):
        super().__init__(table, capacity)
        self._ahead: Deque[Tuple[Any, concurrent.futures.Future]] = collections.deque()
        self._lock = threading.Lock()
        self.misses = 0

    def prefetch(self, ids) -> None:
        self._pipeline.take_error()
        with self._lock:
            if len(self._ahead) >= self._capacity:
                raise ValueError(f"{len(self._ahead)} batch(es) are prefetched already (capacity "
                                 f"{self._capacity}): look them up first")
            ids = _snapshot(ids)
            lookup = self._table.lookup
            self._ahead.append((ids, self._pipeline.submit(lambda: lookup(ids), is_write=False)))

    def lookup(self, ids):
        self._pipeline.take_error()
        with self._lock:
            ahead = self._ahead.popleft() if self._ahead else None
        if ahead is not None:
            if _same_ids(ahead[0], ids):
                return ahead[1].result()
            self.misses += 1
        ids = _snapshot(ids)
        lookup = self._table.lookup
        return self._pipeline.submit(lambda: lookup(ids), is_write=False).result()

    def end(self) -> None:
        """Drops the batches prefetched and not looked up, then as ``_TableHook.end``."""
        with self._lock:
            self._ahead.clear()
        super().end()
