"""Tests of the pipelining hooks (mtht.hooks): AsyncPush applies a table's writes on a
background thread, Prefetch runs lookups ahead. Expectations come from the same calls made
one after another on a second table."""

import gc
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import mtht
from mtht import entry
from mtht.hash_table import hash_table_from_config
from mtht.multi_type_hash_table import MergedMultiTypeHashTable, MultiTypeHashTable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from producers import DLPackOnly  # noqa: E402

F32 = np.float32


def config(dim=4, optimizer=None):
    segment = entry.CombineAsSegment(dim, entry.ZerosInitializer(), optimizer or entry.AdagradOptimizer(),
                                     entry.Fp32Compressor())
    return entry.HashTableConfigInstance(entry.EmbeddingHashTableConfig(entry_config=entry.EntryConfig(
        segments=[segment])), [0.1])


def table():
    return hash_table_from_config(config())


def pipeline_threads():
    return [t for t in threading.enumerate() if t.name.startswith("mtht-pipeline")]


def no_new_threads_after_collection(before: set, seconds: float = 10) -> bool:
    """Whether, once garbage is collected, every pipeline thread not in ``before`` ends."""
    gc.collect()
    deadline = time.monotonic() + seconds
    while set(pipeline_threads()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    return not set(pipeline_threads()) - before


def batches(count, n=500, keys=2000, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, keys, n), rng.standard_normal((n, 4)).astype(F32)) for _ in range(count)]


def test_a_hook_shows_its_table_and_capacity():
    t = table()
    assert repr(mtht.hooks.AsyncPush(t, 3)) == f"AsyncPush(table={t!r}, capacity=3)"
    assert repr(mtht.hooks.Prefetch(t)) == f"Prefetch(table={t!r}, capacity=1)"


@pytest.mark.parametrize("threads", [1, 2])
def test_pushed_writes_are_applied_in_order(threads):
    mtht.set_num_threads(threads)
    try:
        pushed, direct = table(), table()
        push = mtht.AsyncPush(pushed, capacity=3)
        grads = np.empty((500, 4), F32)  # one buffer, reused: each push must copy it
        for step, (ids, g) in enumerate(batches(30)):
            grads[:] = g
            kind = step % 4
            if kind == 0:
                push.apply_gradients(ids, grads, global_step=step)
                direct.apply_gradients(ids, g, global_step=step)
            elif kind == 1:
                push.apply_gradients(ids, grads, global_step=step, enable_dedup=True, req_time=step)
                direct.apply_gradients(ids, g, global_step=step, enable_dedup=True, req_time=step)
            elif kind == 2:
                push.assign_add(ids, grads, req_time=step)
                direct.assign_add(ids, g, req_time=step)
            else:
                push.assign(ids[:50].tolist(), grads[:50], req_time=step)  # a list of ids too
                direct.assign(ids[:50], g[:50], req_time=step)
            grads[:] = np.nan  # the trainer reuses its buffer at once
        assert pushed.as_op() is pushed
        every = np.arange(2000)
        assert pushed.lookup(every).tobytes() == direct.lookup(every).tobytes()
        assert pushed.max_update_ts == direct.max_update_ts
        push.end()
    finally:
        mtht.set_num_threads(2)


def test_prefetched_lookups_read_the_table_as_the_calls_queued_before_them_left_it():
    # The usual pipeline: the next batch is prefetched, then this batch's gradients pushed.
    # The prefetch is queued before the push, so it reads the values from before it.
    pushed, direct = table(), table()
    push, prefetch = mtht.AsyncPush(pushed), mtht.Prefetch(pushed)
    data = batches(25)
    prefetch.prefetch(data[0][0])
    expected = direct.lookup(data[0][0])
    for step, (ids, g) in enumerate(data):
        got = prefetch.lookup(ids)
        assert got.tobytes() == expected.tobytes(), step
        if step + 1 < len(data):
            prefetch.prefetch(data[step + 1][0])
            expected = direct.lookup(data[step + 1][0])
        push.apply_gradients(ids, g * 0.5 + got[:, :1], global_step=step)  # gradients from the lookup
        direct.apply_gradients(ids, g * 0.5 + got[:, :1], global_step=step)
    assert prefetch.misses == 0
    pushed.as_op()
    assert pushed.lookup(np.arange(2000)).tobytes() == direct.lookup(np.arange(2000)).tobytes()
    prefetch.end()
    push.end()


def test_a_lookup_of_other_ids_drops_the_prefetched_batch():
    t = table()
    t.assign([1, 2], np.ones((2, 4), F32))
    prefetch = mtht.Prefetch(t)
    prefetch.prefetch(np.array([1]))
    with pytest.raises(ValueError, match="prefetched already"):
        prefetch.prefetch(np.array([2]))
    assert prefetch.lookup([2, 3]).tolist() == [[1] * 4, [0] * 4]
    assert prefetch.misses == 1
    assert prefetch.lookup([1]).tolist() == [[1] * 4]  # nothing prefetched now: looked up in order


def test_a_batch_of_the_same_length_but_other_ids_is_looked_up_afresh():
    # Training batches have one size: only the same ids in the same order may take the
    # prefetched rows, whatever the length.
    t = table()
    t.assign([1, 2, 5, 6], np.arange(16, dtype=F32).reshape(4, 4))
    prefetch = mtht.Prefetch(t)
    for other, misses in (([2, 1], 1), ([5, 6], 2), ([1, 2], 2)):
        prefetch.prefetch(np.array([1, 2]))
        assert prefetch.lookup(other).tolist() == t.lookup(other).tolist(), other
        assert prefetch.misses == misses, other
    prefetch.end()
    slot_configs = {"a": config(), "b": config()}
    multi = MultiTypeHashTable(slot_configs, lambda slot, cfg: hash_table_from_config(cfg, name_suffix=slot))
    multi.assign({"a": ([1, 2], np.ones((2, 4), F32)), "b": ([1, 2], np.full((2, 4), 2, F32))})
    prefetch = mtht.Prefetch(multi)
    prefetch.prefetch({"a": [1, 2], "b": [1, 2]})
    other = {"a": [1, 2], "b": [2, 7]}
    got = prefetch.lookup(other)
    assert {s: got[s].tolist() for s in got} == {s: multi.lookup(other)[s].tolist() for s in other}
    assert prefetch.misses == 1
    prefetch.prefetch({"a": [1, 2]})  # a lookup of more slots than prefetched: every slot, a miss
    more = {"a": [1, 2], "b": [1]}
    got = prefetch.lookup(more)
    assert {s: got[s].tolist() for s in got} == {s: multi.lookup(more)[s].tolist() for s in more}
    assert prefetch.misses == 2
    prefetch.end()


def test_an_argument_a_hook_cannot_read_is_named_as_the_table_names_it():
    class Unreadable:
        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("this array was deleted")

    t = table()
    push, prefetch = mtht.AsyncPush(t), mtht.Prefetch(t)
    for call, name in [(lambda x: push.apply_gradients([1], x, global_step=0), "grads"),
                       (lambda x: push.apply_gradients([1], np.ones((1, 4), F32), x), "global_step"),
                       (lambda x: push.assign(x, np.ones((1, 4), F32)), "ids"),
                       (lambda x: push.assign_add([1], values=x), "values"),
                       (lambda x: prefetch.prefetch(x), "ids"),
                       (lambda x: prefetch.lookup(x), "ids")]:
        with pytest.raises(TypeError, match=rf"^{name} cannot be read as an array: this array was deleted"):
            call(Unreadable())
    push.end()
    prefetch.end()
    multi = MultiTypeHashTable({"a": config(), "b": config()},
                               lambda slot, cfg: hash_table_from_config(cfg, name_suffix=slot))
    push = mtht.AsyncPush(multi)
    with pytest.raises(TypeError, match=r"^slot_to_id_and_grad\['b'\]\[1\] cannot be read as an array"):
        push.apply_gradients({"a": ([1], np.ones((1, 4), F32)), "b": ([2], Unreadable())}, global_step=0)
    push.end()
    assert t.size() == 0 and multi.lookup({"a": [1]})["a"].tolist() == [[0] * 4]


def test_a_prefetched_batch_is_taken_for_ids_the_table_takes_only():
    # Float or bool ids equal in value to the batch prefetched are refused as the table's
    # lookup refuses them; int ids after float ones prefetched are looked up.
    t = table()
    t.assign([0, 1, 2], np.arange(12, dtype=F32).reshape(3, 4))
    prefetch = mtht.Prefetch(t)
    for bad in (np.array([1.0, 2.0]), np.array([True, False])):
        prefetch.prefetch(np.array([1, 0]) if bad.dtype == bool else np.array([1, 2]))
        with pytest.raises(TypeError, match="ids must be integers"):
            prefetch.lookup(bad)
    prefetch.prefetch(np.array([1.0, 2.0]))
    assert prefetch.lookup(np.array([1, 2], np.int32)).tolist() == t.lookup([1, 2]).tolist()
    assert prefetch.misses == 3
    prefetch.prefetch(np.array([2, 1], np.uint8))  # other integer types are the same ids
    assert prefetch.lookup([2, 1]).tolist() == t.lookup([2, 1]).tolist() and prefetch.misses == 3
    prefetch.end()


def test_multi_type_tables_take_hooks_and_wait_for_them():
    slot_configs = {"a": config(), "b": config(), "c": config(dim=2)}
    make = lambda: MergedMultiTypeHashTable(slot_configs, lambda merged: MultiTypeHashTable(
        merged, lambda slot, cfg: hash_table_from_config(cfg, name_suffix=slot)))
    pushed, direct = make(), make()
    push, prefetch = mtht.AsyncPush(pushed), mtht.Prefetch(pushed)
    assert push in pushed.get_queue_hooks() and prefetch in pushed.get_queue_hooks()
    rng = np.random.default_rng(1)
    for step in range(10):
        ids = {slot: rng.integers(0, 300, 100) for slot in "abc"}
        grads = {slot: rng.standard_normal((100, 2 if slot == "c" else 4)).astype(F32) for slot in "abc"}
        prefetch.prefetch(ids)
        looked_up = prefetch.lookup({slot: ids[slot].copy() for slot in "abc"})
        expected = direct.lookup(ids)
        assert all(looked_up[s].tobytes() == expected[s].tobytes() for s in "abc")
        push.apply_gradients({s: (ids[s], grads[s]) for s in "abc"}, global_step=step)
        direct.apply_gradients({s: (ids[s], grads[s]) for s in "abc"}, global_step=step)
    pushed.as_op()
    every = {s: np.arange(300) for s in "abc"}
    assert all(pushed.lookup(every)[s].tobytes() == direct.lookup(every)[s].tobytes() for s in "abc")
    assert prefetch.misses == 0
    push.end()


def held_back(t, method):
    """Makes ``t``'s ``method`` wait on the event returned, set 0.2 s later: a write pushed
    now is still queued when the test's next call comes."""
    release = threading.Event()
    original = getattr(t, method)
    setattr(t, method, lambda *a, **k: (release.wait(), original(*a, **k))[1])
    threading.Timer(0.2, release.set).start()
    return release


ONES = np.ones((1, 4), F32)
DIRECT_CALLS = {  # a call made on the table itself, and whether it saw the pushed assign of id 1
    "lookup": lambda t: t.lookup([1]).tolist() == ONES.tolist(),
    "contains": lambda t: t.contains([1]).tolist() == [True],
    "len": lambda t: len(t) == 1,
    "stats": lambda t: t.stats()["size"] == 1,
    "lookup_entry": lambda t: t.lookup_entry([1])[0] is not None,
    "export_serving": lambda t: t.export_serving([1]).view(F32).tolist() == ONES.tolist(),
    "evict": lambda t: t.evict(10**12) == 1,
    "max_update_ts": lambda t: t.max_update_ts == 5,
    "reinitialize": lambda t: t.reinitialize([1], req_time=0).tolist() == [1],  # 1: it existed
    "fused_lookup": lambda t: mtht.hash_table.fused_lookup([t], [1], [1], 1)[0].tolist() == [1.0] * 4,
    # a write: after the pushed assign, not before it (which would leave 1, not 2)
    "assign_add": lambda t: t.assign_add([1], ONES).as_op().lookup([1]).tolist() == (2 * ONES).tolist(),
}


@pytest.mark.parametrize("call", DIRECT_CALLS)
def test_a_call_made_on_the_table_directly_comes_after_the_calls_queued_before_it(call):
    seg = entry.CombineAsSegment(4, entry.ZerosInitializer(), entry.SgdOptimizer(), entry.Fp32Compressor())
    t = hash_table_from_config(entry.HashTableConfigInstance(entry.EmbeddingHashTableConfig(
        entry_config=entry.EntryConfig(segments=[seg]),
        slot_expire_time_config=entry.SlotExpireTimeConfig(default_expire_time=1)), [0.1]))
    push = mtht.AsyncPush(t)
    release = held_back(t, "assign")
    push.assign([1], ONES, req_time=5)
    assert DIRECT_CALLS[call](t)
    assert release.is_set()
    push.end()


def test_calls_made_on_a_model_or_its_slot_tables_directly_come_after_the_queued_ones():
    # Hooks on the model: a slot table's own lookup waits; hooks on a slot table only: the
    # model's write waits (it goes through the slot table's write).
    for hooked in ("model", "slot table"):
        model = MultiTypeHashTable({"a": config(), "b": config()},
                                   lambda slot, cfg: hash_table_from_config(cfg, name_suffix=slot))
        a = model.table_of("a")
        push = mtht.AsyncPush(model if hooked == "model" else a)
        if hooked == "model":
            held_back(model, "assign")
            push.assign({"a": ([1], ONES)})
            assert a.lookup([1]).tolist() == ONES.tolist(), hooked
        else:
            held_back(a, "assign")
            push.assign([1], ONES)
            model.assign_add({"a": ([1], ONES), "b": ([1], ONES)})
            assert model.as_op().lookup({"a": [1]})["a"].tolist() == (2 * ONES).tolist(), hooked
        push.end()


def test_a_call_from_another_tables_thread_comes_after_the_calls_queued_before_it():
    # A learning-rate function of one table's queued step reads another table that has a
    # push queued: the read comes after that push, as on the trainer's thread.
    source = table()
    seen = []
    stepped = hash_table_from_config(entry.HashTableConfigInstance(
        config().table_config, [lambda: seen.append(source.lookup([1])[0, 0]) or 0.1]))
    source_push, stepped_push = mtht.AsyncPush(source), mtht.AsyncPush(stepped)
    held_back(source, "assign")
    source_push.assign([1], ONES)
    stepped_push.apply_gradients([5], ONES, global_step=0)
    stepped_push.wait()
    assert seen == [1.0]
    source_push.end()
    stepped_push.end()


def test_a_direct_call_after_a_failed_write_leaves_its_error_to_the_hook():
    t = table()
    push = mtht.AsyncPush(t)
    held_back(t, "apply_gradients")
    push.apply_gradients([1], np.full((1, 4), np.nan, F32), global_step=0)
    push.assign([2], ONES)  # dropped: queued after the failed write
    assert t.lookup([1, 2]).tolist() == [[0.0] * 4] * 2
    with pytest.raises(ValueError, match="NaN"):
        push.wait()
    push.end()


def test_a_failed_write_is_raised_by_the_next_call_and_the_writes_after_it_are_not_applied():
    t = table()
    push = mtht.AsyncPush(t, capacity=4)
    t.assign([1], np.ones((1, 4), F32))
    before = t.lookup(np.arange(5)).tobytes()
    release = threading.Event()
    original = t.apply_gradients
    t.apply_gradients = lambda *a, **k: (release.wait(), original(*a, **k))[1]  # holds the first write back
    push.apply_gradients([1], np.full((1, 4), np.nan, F32), global_step=0)  # NaN: refused, changes nothing
    push.apply_gradients([2], np.ones((1, 4), F32), global_step=0)
    push.assign_add([3], np.ones((1, 4), F32))
    release.set()
    with pytest.raises(ValueError, match="NaN") as raised:
        push.wait()
    # A note to the error (Python 3.11 and later), or the end of its message (3.10).
    told = "\n".join([str(raised.value), *getattr(raised.value, "__notes__", [])])
    assert "the 2 write(s) queued after it were not applied" in told
    assert t.lookup(np.arange(5)).tobytes() == before
    push.wait()  # raised once
    push.assign_add([3], np.ones((1, 4), F32))  # and the hook goes on
    assert t.as_op().lookup([3]).tolist() == [[1] * 4]
    push.end()


def test_the_error_of_a_failed_write_is_raised_by_as_op_and_by_the_next_push():
    for next_call in ("as_op", "push"):
        t = table()
        push = mtht.AsyncPush(t)
        push.apply_gradients([1], np.ones((1, 3), F32), global_step=0)  # the wrong dim
        t._mtht_pipeline.wait()  # the failed write has run; its error is not taken yet
        with pytest.raises(ValueError):
            if next_call == "as_op":
                t.as_op()
            else:
                push.assign([2], np.ones((1, 4), F32))
        assert t.size() == 0
        push.end()


def test_an_error_of_a_prefetched_lookup_is_raised_by_its_lookup():
    t = table()
    prefetch = mtht.Prefetch(t)
    prefetch.prefetch(np.array([[1, 2]]))  # 2-D ids: the table refuses them
    with pytest.raises(ValueError):
        prefetch.lookup(np.array([[1, 2]]))
    assert prefetch.lookup([1]).shape == (1, 4)
    prefetch.end()


def test_a_push_beyond_capacity_waits_for_the_oldest():
    t = table()
    push = mtht.AsyncPush(t, capacity=2)
    release = threading.Event()
    original = t.assign_add
    t.assign_add = lambda *a, **k: (release.wait(), original(*a, **k))[1]
    try:
        push.assign_add([1], np.ones((1, 4), F32))
        push.assign_add([1], np.ones((1, 4), F32))
        third = threading.Thread(target=push.assign_add, args=([1], np.ones((1, 4), F32)))
        third.start()
        third.join(0.5)
        assert third.is_alive()  # two writes wait: the third push blocks
    finally:  # a failed check must not leave the writes waiting for ever
        release.set()
    third.join(10)
    assert not third.is_alive()
    assert t.as_op().lookup([1]).tolist() == [[3] * 4]
    push.end()


def test_end_and_with_blocks_stop_the_thread():
    t = table()
    with mtht.AsyncPush(t) as push:
        push.assign([5], np.ones((1, 4), F32))
        assert len(pipeline_threads()) >= 1
    assert t.lookup([5]).tolist() == [[1] * 4]
    assert t._mtht_pipeline._thread is None
    push.assign([6], np.ones((1, 4), F32))  # a later push starts the thread again
    push.end()
    assert t.contains([6]).tolist() == [True]
    with pytest.raises(ValueError):
        mtht.AsyncPush(t, capacity=0)
    mtht.AsyncPush(t, capacity=np.int64(3)).end()  # a NumPy integer is an integer
    with pytest.raises(TypeError):
        mtht.AsyncPush(object())


def test_pushes_from_threads_beside_end_are_all_applied():
    # end() stops the thread while other threads push: every push still runs, once, on one
    # thread at a time (a push queued behind the stop was never run, and two threads took
    # the queue's calls).
    t = table()
    push = mtht.AsyncPush(t, capacity=4)

    def pusher():
        for _ in range(200):
            push.assign_add([1], np.ones((1, 4), F32))

    def ender():
        for _ in range(50):
            push.end()

    threads = [threading.Thread(target=f) for f in (pusher, pusher, ender)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    waiter = threading.Thread(target=t.as_op)
    waiter.start()
    waiter.join(60)
    assert not waiter.is_alive()
    assert t.lookup([1]).tolist() == [[400] * 4]
    push.end()
    assert t._mtht_pipeline._thread is None


def hold_back(t, method):
    """Holds the table's ``method`` calls back until the returned event is set (a busy table)."""
    release, original = threading.Event(), getattr(t, method)
    setattr(t, method, lambda *a, **k: (release.wait(), original(*a, **k))[1])
    return release


def test_buffers_and_mappings_are_copied_too():
    import array
    import collections.abc

    class Slots(collections.abc.Mapping):
        def __init__(self, d):
            self.d = d

        def __getitem__(self, k):
            return self.d[k]

        def __iter__(self):
            return iter(self.d)

        def __len__(self):
            return len(self.d)

    t = table()
    release = hold_back(t, "assign")
    push = mtht.AsyncPush(t, capacity=4)
    values = np.ones((3, 4), F32)
    ids = array.array("q", [1, 2, 3])
    push.assign(ids, memoryview(values))
    values[:] = 7
    ids[0] = 5
    dlpack_only = np.full((1, 4), 2, F32)  # a DLPack producer without __array__ too
    push.assign([9], DLPackOnly(dlpack_only))
    dlpack_only[:] = 7
    release.set()
    assert t.as_op().lookup([1, 2, 3, 5, 9])[:, 0].tolist() == [1, 1, 1, 0, 2]
    merged = MergedMultiTypeHashTable({"a": config()}, lambda m: MultiTypeHashTable(
        m, lambda slot, c: hash_table_from_config(c, name_suffix=slot)))
    release = hold_back(merged, "assign")
    push = mtht.AsyncPush(merged)
    values = np.ones((2, 4), F32)
    push.assign(Slots({"a": (np.array([1, 2]), values)}))
    values[:] = 7
    release.set()
    assert merged.as_op().lookup({"a": [1, 2]})["a"][:, 0].tolist() == [1, 1]
    push.end()


def test_a_merged_table_and_its_slot_tables_share_one_thread():
    # Hooks on a merged table and on the slot table inside it run in the trainer's order
    # (on two threads a later push to the slot table went first), and a learning-rate
    # function that waits for the merged table's writes does not wait for itself.
    make = lambda lr: MergedMultiTypeHashTable({"a": config(), "b": config()}, lambda m: MultiTypeHashTable(
        m, lambda slot, c: hash_table_from_config(c if lr is None else entry.HashTableConfigInstance(
            c.table_config, [lr]), name_suffix=slot)))
    merged = make(None)
    inner = list(merged._table._tables.values())[0]  # "a" and "b" share it
    push_merged, push_inner = mtht.AsyncPush(merged), mtht.AsyncPush(inner)
    release = hold_back(merged, "assign")
    push_merged.assign({"a": ([0], np.full((1, 4), 1, F32))})
    push_inner.assign([0], np.full((1, 4), 2, F32))
    release.set()
    assert inner.as_op().lookup([0]).tolist() == [[2] * 4]
    holder = {}

    def rate(step):
        holder["table"].as_op()
        return 0.1

    holder["table"] = waiting = make(rate)
    push = mtht.AsyncPush(waiting)
    mtht.AsyncPush(list(waiting._table._tables.values())[0]).assign([1], np.ones((1, 4), F32))
    for step in range(5):
        push.apply_gradients({"a": (np.arange(10), np.ones((10, 4), F32))}, global_step=step)
    done = threading.Thread(target=waiting.as_op)
    done.start()
    done.join(30)
    assert not done.is_alive()
    push.end()


def test_a_forked_child_waits_for_nothing_its_parent_queued():
    # Nor do its hooks: the push's one slot, taken by the parent's queued write, is free in
    # the child; the batch prefetched behind it is not (the child looks it up itself); and
    # the prefetch's lock, held by another thread of the parent at the fork, is not held.
    # (Before, each of the three hung the child.)
    t = table()
    release = hold_back(t, "assign_add")
    push = mtht.AsyncPush(t, capacity=1)
    push.assign_add([1], np.ones((1, 4), F32))
    prefetch = mtht.Prefetch(t)
    prefetch.prefetch([1])
    locked, unlock = threading.Event(), threading.Event()
    holder = threading.Thread(target=lambda: (prefetch._lock.acquire(), locked.set(), unlock.wait(30),
                                              prefetch._lock.release()))
    holder.start()
    assert locked.wait(30)
    pid = os.fork()
    if pid == 0:  # the child: no thread, and none of the parent's calls
        signal.alarm(30)  # a hang ends the child (and fails the test)
        try:
            ok = t.as_op() is t and t.lookup([1]).tolist() == [[0] * 4]
            ok = ok and prefetch.lookup([1]).tolist() == [[0] * 4]
            del t.assign_add  # the child's own pushes are not held back
            push.assign_add([1], np.ones((1, 4), F32))
            ok = ok and t.as_op().lookup([1]).tolist() == [[1] * 4]
        finally:
            os._exit(0 if ok else 1)
    unlock.set()
    holder.join()
    release.set()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert prefetch.lookup([1]).tolist() == [[1] * 4]  # prefetched behind the push
    assert t.as_op().lookup([1]).tolist() == [[1] * 4]
    prefetch.end()
    push.end()


def test_the_error_of_a_dropped_table_is_printed_and_its_thread_ends(capfd):
    before = set(pipeline_threads())  # threads of earlier tests may still be ending
    t = table()
    push = mtht.AsyncPush(t)
    push.apply_gradients([1], np.ones((1, 3), F32), global_step=0)  # fails; no call takes the error
    t._mtht_pipeline.wait()
    del t, push
    assert no_new_threads_after_collection(before)
    assert "dropped before a call raised the error" in capfd.readouterr().err


def test_the_error_of_a_dropped_model_is_printed_and_its_thread_ends(capfd):
    # A multi-type table's error is raised from another (``from None`` keeps it as the
    # context), whose traceback held the table too: the model stayed alive, and its thread
    # ran on, until the interpreter's exit.
    before = set(pipeline_threads())
    model = MultiTypeHashTable({"a": config()}, lambda slot, c: hash_table_from_config(c, name_suffix=slot))
    push = mtht.AsyncPush(model)
    push.apply_gradients({"zz": ([1], np.ones((1, 4), F32))}, global_step=0)  # an unknown slot: fails
    model._mtht_pipeline.wait()
    del model, push
    assert no_new_threads_after_collection(before)
    assert "dropped before a call raised the error" in capfd.readouterr().err


class _InterruptWhenDropped(int):
    """A req_time whose last reference goes on the background thread, once its write is
    done and its slot given back: it then interrupts the main thread, which a push has left
    waiting for that slot (the moment a Ctrl-C lost it)."""

    main = threading.get_ident()
    sent = threading.Event()

    def __del__(self):
        # Busy, holding the GIL: the main thread, woken with the slot, waits for it to
        # return from the slot queue's get, and sees the interrupt as it does.
        _spin(0.002)
        signal.pthread_kill(self.main, signal.SIGINT)
        self.sent.set()
        _spin(0.05)


def _spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_an_interrupt_as_a_push_gets_its_slot_loses_no_slot():
    t = table()
    push = mtht.AsyncPush(t, capacity=1)
    ids, rows = np.arange(4), np.ones((4, 4), F32)
    for step in range(3):
        _InterruptWhenDropped.sent.clear()
        push.assign_add(ids, rows, req_time=_InterruptWhenDropped(step))  # takes the one slot
        try:
            push.assign_add(ids, rows)  # waits for the slot, interrupted as it gets it (or after)
            _InterruptWhenDropped.sent.wait(30)  # the interrupt comes by here at the latest
            sum(range(10_000))
        except KeyboardInterrupt:
            pass
        t.as_op()
        assert push._slots.qsize() == 1, "an interrupted push kept its slot for good"
    other = threading.Thread(target=lambda: push.assign_add(ids, rows))
    other.start()
    other.join(30)
    assert not other.is_alive(), "a push waited for a slot no write holds"
    push.end()


def test_an_interrupted_end_starts_no_second_thread_on_the_queue():
    # end() interrupted while it stops the thread (busy with a held-back write): a push
    # afterwards waits for that thread's calls, and runs after them, on one thread at a
    # time. (Before, it started a second thread on the same queue, which ran it at once.)
    t = table()
    release, original = threading.Event(), t.assign
    t.assign = lambda ids, *a, **k: (release.wait() if list(ids) == [1] else None, original(ids, *a, **k))[1]
    push = mtht.AsyncPush(t, capacity=4)
    push.assign([1], np.full((1, 4), 1, F32))  # held back
    push.assign([2], np.full((1, 4), 2, F32))  # queued behind it
    interrupt = threading.Timer(0.2, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT))
    interrupt.start()
    with pytest.raises(KeyboardInterrupt):
        push._pipeline.stop()  # end()'s last step, once its wait is done: here the thread is busy
    interrupt.join()
    push.assign([3], np.full((1, 4), 3, F32))
    time.sleep(0.3)
    # Read from the core: the table's own lookup would wait for the queued writes.
    assert t._core.contains(np.array([2, 3])).tolist() == [False, False], \
        "writes ran beside the one queued before them"
    release.set()
    push.wait()
    assert t.lookup([1, 2, 3])[:, 0].tolist() == [1, 2, 3]
    push.end()


def test_a_prefetch_block_left_by_an_error_drops_its_batches():
    t = table()
    t.assign([1], np.full((1, 4), 7, F32))
    prefetch = mtht.Prefetch(t)
    with pytest.raises(RuntimeError):
        with prefetch:
            prefetch.prefetch([1])
            raise RuntimeError("the trainer's step failed")
    with prefetch:  # entered again: nothing left over (it refused the next prefetch)
        prefetch.prefetch([1])
        assert prefetch.lookup([1]).tolist() == [[7] * 4]


def test_a_table_holds_its_hooks_weakly():
    t = table()
    for _ in range(3):
        with mtht.AsyncPush(t) as push:
            push.assign([1], np.ones((1, 4), F32))
    del push
    kept = mtht.Prefetch(t)
    gc.collect()
    assert t.get_queue_hooks() == [kept]
    assert t.as_op().lookup([1]).tolist() == [[1] * 4]


def test_a_hook_attached_again_is_listed_once():
    # A hook attaches itself to its table; attaching it again the Monolith way must not list
    # it twice (a trainer calling begin() and end() on each listed hook would call them twice).
    t = table()
    push, other = mtht.AsyncPush(t), object()
    t.add_queue_hook(push)
    t.add_queue_hook(other)
    t.add_queue_hook(other)
    assert t.get_queue_hooks() == [push, other]


def test_save_and_restore_apply_the_queued_writes_first(tmp_path):
    # A write pushed before a restore is replaced by it, and one pushed before a save is in
    # the checkpoint, however late the thread applies it (here: held back, then let go).
    basename = str(tmp_path / "t")
    t = table()
    t.assign([1], np.zeros((1, 4), F32))
    t.save(basename)
    push = mtht.AsyncPush(t)
    for step in ("restore", "save"):
        release = hold_back(t, "assign")
        push.assign([1], np.full((1, 4), 5, F32))
        threading.Timer(0.2, release.set).start()
        if step == "restore":
            t.restore(basename)
            assert t.as_op().lookup([1]).tolist() == [[0] * 4]
        else:
            t.save(basename)
            assert table().restore(basename).lookup([1]).tolist() == [[5] * 4]
        del t.assign
    slot_configs = {"a": config(), "b": config()}
    model = MultiTypeHashTable(slot_configs, lambda slot, c: hash_table_from_config(c, name_suffix=slot))
    mtht.checkpoint.save_multi_type(model, str(tmp_path / "model"))
    push = mtht.AsyncPush(model)
    release = hold_back(model, "assign")
    push.assign({"a": ([1], np.ones((1, 4), F32)), "b": ([1], np.ones((1, 4), F32))})
    threading.Timer(0.2, release.set).start()
    mtht.checkpoint.restore_multi_type(model, str(tmp_path / "model"))
    assert all(v.tolist() == [[0] * 4] for v in model.as_op().lookup({"a": [1], "b": [1]}).values())
    push.end()


def test_a_slot_table_waits_for_the_writes_pushed_on_its_model(tmp_path):
    # Hooks on a multi-type table run its slot tables' writes: a slot table's own save,
    # restore and as_op wait for them too (they looked only at hooks of the slot table).
    model = MultiTypeHashTable({"a": config(), "b": config()}, lambda slot, c: hash_table_from_config(c, name_suffix=slot))
    slot_tables = model._tables
    push = mtht.AsyncPush(model)
    basename = str(tmp_path / "a")
    for step in ("save", "as_op", "restore"):
        release = hold_back(model, "assign")
        push.assign({"a": ([7], np.full((1, 4), 3, F32))})
        threading.Timer(0.2, release.set).start()
        if step == "save":
            slot_tables["a"].save(basename)
            assert table().restore(basename).lookup([7]).tolist() == [[3] * 4]
        elif step == "as_op":
            assert slot_tables["a"].as_op().lookup([7]).tolist() == [[3] * 4]
        else:
            slot_tables["a"].restore(str(tmp_path / "empty"))  # saved below, before this step
            assert slot_tables["a"].lookup([7]).tolist() == [[0] * 4]
        del model.assign
        if step == "as_op":
            table().save(str(tmp_path / "empty"))
    push.end()


def test_a_restore_drops_the_batches_prefetched_before_it(tmp_path):
    # A batch prefetched before a restore read the contents the restore replaced: its
    # lookup after the restore reads the table again (of one table and of a model).
    t = table()
    t.assign([1], np.ones((1, 4), F32))
    t.save(str(tmp_path / "t"))
    t.assign([1], np.full((1, 4), 2, F32))
    prefetch = mtht.Prefetch(t)
    prefetch.prefetch([1])
    t.restore(str(tmp_path / "t"))
    assert prefetch.lookup([1]).tolist() == [[1] * 4] and prefetch.misses == 0
    prefetch.end()
    model = MultiTypeHashTable({"a": config(), "b": config()}, lambda slot, c: hash_table_from_config(c, name_suffix=slot))
    mtht.checkpoint.save_multi_type(model, str(tmp_path / "model"))
    model.assign({"a": ([1], np.ones((1, 4), F32))})
    prefetch = mtht.Prefetch(model)
    prefetch.prefetch({"a": [1]})
    mtht.checkpoint.restore_multi_type(model, str(tmp_path / "model"))
    assert prefetch.lookup({"a": [1]})["a"].tolist() == [[0] * 4]
    # A slot table restored alone drops its model's prefetched batches too.
    model.assign({"a": ([1], np.ones((1, 4), F32))})
    model._tables["a"].save(str(tmp_path / "a"))
    model.assign({"a": ([1], np.full((1, 4), 2, F32))})
    prefetch.prefetch({"a": [1]})
    model._tables["a"].restore(str(tmp_path / "a"))
    assert prefetch.lookup({"a": [1]})["a"].tolist() == [[1] * 4] and prefetch.misses == 0
    prefetch.end()


def test_a_dropped_table_leaves_no_thread():
    before = set(pipeline_threads())  # threads of earlier tests may still be ending
    for _ in range(5):
        t = table()
        push = mtht.AsyncPush(t)
        push.assign([1], np.ones((1, 4), F32))
        t.as_op()
        del t, push
    assert no_new_threads_after_collection(before)


def test_writes_queued_when_the_interpreter_exits_are_applied_and_their_errors_printed(tmp_path):
    script = f"""
import atexit, numpy as np
def report():  # registered before mtht's own exit handler, so it runs after it
    print(t.lookup([1]).tolist())
atexit.register(report)
import mtht
from mtht import entry
from mtht.hash_table import hash_table_from_config
segment = entry.CombineAsSegment(2, entry.ZerosInitializer(), entry.SgdOptimizer(), entry.Fp32Compressor())
t = hash_table_from_config(entry.HashTableConfigInstance(entry.EmbeddingHashTableConfig(
    entry_config=entry.EntryConfig(segments=[segment])), [1.0]))
release = __import__("threading").Event()
original = t.assign_add
t.assign_add = lambda *a, **k: (release.wait(), original(*a, **k))[1]
push = mtht.AsyncPush(t, capacity=8)
for _ in range(5):
    push.assign_add([1], np.ones((1, 2), np.float32))
push.assign_add([2], np.full((1, 2), np.nan, np.float32))  # fails with no call left to raise it
release.set()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[[5.0, 5.0]]"
    assert "ValueError" in out.stderr and "NaN" in out.stderr  # printed, not swallowed


def test_hooks_made_on_one_table_by_threads_at_once_share_its_one_thread():
    # Made at once without a lock, two hooks could each make a background thread for the
    # table (their writes then ran in no order) or miss its list of hooks.
    interval = sys.getswitchinterval()
    try:
        for _ in range(100):
            t = table()
            hooks = []
            start = threading.Barrier(4)

            def make(kind):
                start.wait()
                hooks.append(kind(t))

            threads = [threading.Thread(target=make, args=(kind,)) for kind in [mtht.AsyncPush, mtht.Prefetch] * 2]
            sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            sys.setswitchinterval(interval)
            assert len({id(h._pipeline) for h in hooks}) == 1
            assert sorted(map(id, t.get_queue_hooks())) == sorted(map(id, hooks))
    finally:
        sys.setswitchinterval(interval)
