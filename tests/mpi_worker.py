"""The ranks' side of test_distributed.py: ``mpiexec -n W python mpi_worker.py SCENARIO
SEED DIRECTORY``. Each rank checks what it sees and exits non-zero (an assertion) when a
check fails.

The reference is one process's MultiTypeHashTable (or merged table) given every rank's
batch one after another, in rank order: every rank builds it from the batches gathered
from all ranks, and compares its own lookups and the entries it owns with it, bit for bit.
"""

import gc
import os
import signal
import sys
import threading
import time
import traceback

import numpy as np
from mpi4py import MPI

import mtht
import mtht.distributed
from mtht.distributed import DistributedError, DistributedMultiTypeHashTable
from mtht.multi_type_hash_table import MergedMultiTypeHashTable, MultiTypeHashTable

COMM = MPI.COMM_WORLD
RANK, WORLD = COMM.Get_rank(), COMM.Get_size()
F32 = np.float32

# slot: (dim, optimizer, admission threshold). "sgd" is also checked against plain numpy.
SLOTS = {
    "sgd": (1, lambda: mtht.SgdOptimizer(learning_rate=0.5), 0),
    "adagrad": (4, lambda: mtht.AdagradOptimizer(initial_accumulator_value=0.1), 0),
    "adam": (3, lambda: mtht.AdamOptimizer(), 0),
    "filtered": (2, lambda: mtht.AdagradOptimizer(), 3),
    "bfloat16": (3, lambda: mtht.AdagradOptimizer(), 0),
    "float16": (2, lambda: mtht.MomentumOptimizer(), 2),
}
# Slots whose tables keep their values in 16 bits (stochastic rounding is a function of
# the seed, id, step and position, so the sharded table still equals one process).
EMBEDDING_DTYPES = {"bfloat16": "bfloat16", "float16": "float16"}


def config(dim, optimizer, embedding_dtype="float32"):
    segment = mtht.CombineAsSegment(dim, mtht.RandomUniformInitializer(-0.1, 0.1), optimizer(), mtht.Fp32Compressor())
    table = mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[segment]),
                                          embedding_dtype=embedding_dtype)
    return mtht.HashTableConfigInstance(table, [0.05] if dim != 1 else [1.0])


def slot_to_config(slots=SLOTS):
    return {slot: config(dim, optimizer, EMBEDDING_DTYPES.get(slot, "float32"))
            for slot, (dim, optimizer, _) in slots.items()}


def factory(slot, cfg):
    threshold = SLOTS[slot][2] if slot in SLOTS else 0
    hash_filter = mtht.HashFilter(default_occurrence_threshold=threshold) if threshold else None
    return mtht.hash_table_from_config(cfg, hash_filter=hash_filter, name_suffix=slot)


def distributed(merged=False, timeout=None):
    if merged:
        return MergedMultiTypeHashTable(merged_configs(),
                                        lambda c: DistributedMultiTypeHashTable(c, factory, timeout=timeout))
    return DistributedMultiTypeHashTable(slot_to_config(), factory, timeout=timeout)


def single(merged=False):
    if merged:
        return MergedMultiTypeHashTable(merged_configs(), lambda c: MultiTypeHashTable(c, factory))
    return MultiTypeHashTable(slot_to_config(), factory)


def merged_configs():
    """Two slots sharing a config (merged into one table), and "sgd" alone."""
    shared = config(4, SLOTS["adagrad"][1])
    return {"user": shared, "item": shared, "sgd": config(1, SLOTS["sgd"][1])}


def dims_of(slots):
    return {slot: (SLOTS[slot][0] if slot in SLOTS else 4) for slot in slots}


def random_ids(rng, n):
    """Ids with duplicates, negative ones, and some past 2^62 (their owner by their modulo)."""
    ids = rng.integers(-60, 60, n)
    big = rng.random(n) < 0.1
    ids[big] = rng.integers(2 ** 62, 2 ** 62 + 40, int(big.sum()))
    return ids


def batch(rng, dims, with_rows=True):
    """One rank's batch: some slots left out, some empty."""
    out = {}
    for slot, dim in dims.items():
        if rng.random() < 0.15:
            continue
        n = int(rng.integers(0, 40)) if rng.random() > 0.1 else 0
        ids = random_ids(rng, n)
        out[slot] = (ids, rng.normal(size=(n, dim)).astype(F32)) if with_rows else ids
    return out


def same_lookups(got, expected, what):
    assert set(got) == set(expected), (what, set(got), set(expected))
    for slot in expected:
        assert got[slot].dtype == F32 and np.array_equal(got[slot], expected[slot], equal_nan=True), \
            f"rank {RANK}: {what}: slot {slot} differs\n{got[slot]}\n{expected[slot]}"


def local_tables(model):
    inner = model._table if isinstance(model, MergedMultiTypeHashTable) else model
    return inner.local_table._tables if isinstance(inner, DistributedMultiTypeHashTable) else inner._tables


def owned_entries_match(model, reference, ids_seen, what):
    """Each table of this rank holds exactly the reference's entries of the ids it owns:
    values, optimizer state and timestamp."""
    mine, theirs = local_tables(model), local_tables(reference)
    # table_of names this rank's part of each table, by slot.
    names = model.slot_mapping if isinstance(model, MergedMultiTypeHashTable) else {key: key for key in mine}
    assert all(model.table_of(slot) is mine[key] for slot, key in names.items()), f"rank {RANK}: {what}: table_of"
    for key, table in mine.items():
        ids = np.array(sorted(ids_seen), dtype=np.int64)
        owned = ids[np.remainder(ids, WORLD) == RANK]
        others = ids[np.remainder(ids, WORLD) != RANK]
        assert not table.contains(others).any(), f"rank {RANK}: {what}: table {key} holds ids it does not own"
        expected = theirs[key].lookup_entry(owned)
        got = table.lookup_entry(owned)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert (g is None) == (e is None), f"rank {RANK}: {what}: {key} id {owned[i]} present {g is not None}"
            if g is None:
                continue
            assert np.array_equal(g.values, e.values) and g.last_update_ts == e.last_update_ts, (what, key, g, e)
            for seg_g, seg_e in zip(g.optimizer_state, e.optimizer_state):
                for name in seg_e:
                    assert np.array_equal(seg_g[name], seg_e[name]), (what, key, name, g, e)
        assert table.size() == sum(e is not None for e in expected), (what, key)
        # Every rank's part moves its clock as one process's table would (expiry goes by it).
        assert table._core.max_update_ts == theirs[key]._core.max_update_ts, \
            (what, key, table._core.max_update_ts, theirs[key]._core.max_update_ts)


def all_ids(batches):
    seen = set()
    for b in batches:
        for value in b.values():
            ids = value[0] if isinstance(value, tuple) else value
            seen.update(int(i) for i in ids)
    return seen


def scenario_train(seed, directory, merged=False):
    """Writes of every kind, lookups after each, against the reference."""
    rng = np.random.default_rng([seed, RANK])
    model, reference = distributed(merged), single(merged)
    slots = list(merged_configs() if merged else SLOTS)
    dims = dims_of(slots)
    seen = set()
    for step in range(1, 9):
        method = ["apply_gradients", "apply_gradients", "assign_add", "assign"][step % 4]
        mine = batch(rng, dims)
        batches = COMM.allgather(mine)
        seen |= all_ids(batches)
        req_time = 1_000 + step
        if method == "apply_gradients":
            dedup = step % 3 != 0
            model.apply_gradients(mine, step, enable_dedup=dedup, req_time=req_time)
            for b in batches:  # rank order
                reference.apply_gradients(b, step, enable_dedup=dedup, req_time=req_time)
        else:
            getattr(model, method)(mine, req_time=req_time)
            for b in batches:  # rank order
                getattr(reference, method)(b, req_time=req_time)
        asked = batch(rng, dims, with_rows=False)
        same_lookups(model.lookup(asked), reference.lookup(asked), f"step {step} lookup")
        owned_entries_match(model, reference, seen, f"step {step}")
    return model, reference, seen


def scenario_merged(seed, directory):
    scenario_train(seed, directory, merged=True)


def scenario_sgd_numpy(seed, directory):
    """SGD steps against plain numpy: each id ends at its initial value minus lr times the
    sum of every rank's gradients for it."""
    rng = np.random.default_rng([seed, RANK])
    model = DistributedMultiTypeHashTable({"sgd": config(1, SLOTS["sgd"][1])}, factory)
    total = {}
    for step in range(5):
        ids = random_ids(rng, 30)
        grads = rng.normal(size=(30, 1)).astype(F32)
        model.apply_gradients({"sgd": (ids, grads)}, step)
        for b_ids, b_grads in COMM.allgather((ids, grads)):
            for i, g in zip(b_ids.tolist(), b_grads[:, 0].astype(np.float64)):
                total[i] = total.get(i, 0.0) + g
    ids = np.array(sorted(total), np.int64)
    got = model.lookup({"sgd": ids})["sgd"][:, 0].astype(np.float64)
    expected = single_initial(ids) - 1.0 * np.array([total[i] for i in ids.tolist()])
    assert np.allclose(got, expected, rtol=1e-4, atol=1e-4), np.abs(got - expected).max()


def single_initial(ids):
    """The initializer's value of each id (a deterministic function of the id)."""
    probe = mtht.hash_table_from_config(config(1, SLOTS["sgd"][1]))
    probe.apply_gradients(ids, np.zeros((ids.size, 1), F32), 0)
    return probe.lookup(ids)[:, 0].astype(np.float64)


def expect_failure(call, own_error, what):
    try:
        call()
    except own_error as e:
        return e
    raise AssertionError(f"rank {RANK}: {what} did not raise")


def trained_one_step(seed, timeout=None):
    """(rng, model, reference, ids seen): a sharded model and one process's, after one step
    of every rank's batch."""
    rng = np.random.default_rng([seed, RANK])
    model, reference = distributed(timeout=timeout), single()
    mine = batch(rng, dims_of(SLOTS))
    batches = COMM.allgather(mine)
    model.apply_gradients(mine, 1, req_time=7)
    for b in batches:
        reference.apply_gradients(b, 1, enable_dedup=True, req_time=7)
    return rng, model, reference, all_ids(batches)


def scenario_errors(seed, directory):
    """Bad input on one rank: every rank raises and no table changes anywhere."""
    rng, model, reference, seen = trained_one_step(seed)
    dims, bad_rank = dims_of(SLOTS), WORLD - 1
    cases = [
        ("a NaN gradient", lambda: {"adagrad": (np.array([1, 2]), np.array([[0, 0, 0, np.nan], [1, 1, 1, 1]], F32))},
         ValueError, "NaN"),
        ("an unknown slot", lambda: {"nope": (np.array([1]), np.ones((1, 4), F32))}, KeyError, "nope"),
        ("a transposed grad", lambda: {"adam": (np.array([1, 2]), np.ones((3, 2), F32))}, ValueError, "shape"),
    ]
    for what, bad, error, word in cases:
        good = batch(rng, dims)
        data = bad() if RANK == bad_rank else good
        e = expect_failure(lambda: model.apply_gradients(data, 2, req_time=8),
                           error if RANK == bad_rank else DistributedError, what)
        assert word in str(e) and (RANK == bad_rank or f"rank {bad_rank}" in str(e)), (what, str(e))
        owned_entries_match(model, reference, seen, what)
    # Ranks that disagree on the step.
    e = expect_failure(lambda: model.apply_gradients(batch(rng, dims), 3 + (RANK == bad_rank)), ValueError,
                       "different steps")
    assert "every rank must make the same call" in str(e), str(e)
    owned_entries_match(model, reference, seen, "different steps")
    # Bad arguments after the rows (converted in the guarded part: they hung the others).
    for what, call in [("a float step",
                        lambda: model.apply_gradients(batch(rng, dims), 1.5 if RANK == bad_rank else 1)),
                       ("a float req_time", lambda: model.assign(batch(rng, dims),
                                                                 req_time=0.5 if RANK == bad_rank else 1)),
                       ("an array for enable_dedup", lambda: model.apply_gradients(
                           batch(rng, dims), 1, enable_dedup=np.ones(2) if RANK == bad_rank else True))]:
        expect_failure(call, (TypeError, ValueError) if RANK == bad_rank else DistributedError, what)
        owned_entries_match(model, reference, seen, what)
    # A bad lookup on one rank raises everywhere; the next call works.
    e = expect_failure(lambda: model.lookup({"sgd": np.array([1.5])} if RANK == bad_rank else {"sgd": [1]}),
                       TypeError if RANK == bad_rank else DistributedError, "float ids")
    asked = batch(rng, dims, with_rows=False)
    same_lookups(model.lookup(asked), reference.lookup(asked), "after the errors")


def scenario_interrupts(seed, directory):
    """A Ctrl-C that reaches one rank while it waits in an exchange for the others, and an
    allocation that fails on one rank as the exchanges' buffers are taken: every rank
    raises, no table changes, and the next call works. (Both left that rank out of step,
    and the others waiting for ever.) The same with a timeout, whose waits poll: one Ctrl-C
    is still raised on every rank, in step; and again with every outcome gathered in two
    rounds (one that does not fit the first)."""
    first_round = mtht.distributed._FIRST_ROUND_BYTES
    for timeout, first_round_bytes in [(None, first_round), (600, first_round), (600, 1)]:
        mtht.distributed._FIRST_ROUND_BYTES = first_round_bytes
        try:
            interrupted_in_step(seed, timeout)
        finally:
            mtht.distributed._FIRST_ROUND_BYTES = first_round


def interrupted_in_step(seed, timeout):
    rng, model, reference, seen = trained_one_step(seed, timeout)
    dims, bad_rank = dims_of(SLOTS), WORLD - 1
    main = threading.main_thread().ident
    for what, call in [("a lookup", lambda: model.lookup(batch(rng, dims, with_rows=False))),
                       ("an update", lambda: model.apply_gradients(batch(rng, dims), 2))]:
        interrupt = threading.Timer(0.2, lambda: signal.pthread_kill(main, signal.SIGINT))
        if RANK == bad_rank:
            interrupt.start()  # while it waits for rank 0, which comes late
        elif RANK == 0:
            time.sleep(0.6)
        expect_failure(call, KeyboardInterrupt if RANK == bad_rank else DistributedError, f"Ctrl-C in {what}")
        if RANK == bad_rank:
            interrupt.join()
        owned_entries_match(model, reference, seen, f"Ctrl-C in {what}")
    take = mtht.distributed._Scratch.take

    def no_room_for_rows(scratch, key, dtype, *shape):
        if key == "sent rows":
            raise MemoryError("no room for the rows to send")
        return take(scratch, key, dtype, *shape)

    if RANK == bad_rank:
        mtht.distributed._Scratch.take = no_room_for_rows
    try:
        expect_failure(lambda: model.apply_gradients(batch(rng, dims), 2),
                       MemoryError if RANK == bad_rank else DistributedError, "out of memory")
    finally:
        mtht.distributed._Scratch.take = take
    owned_entries_match(model, reference, seen, "out of memory")
    asked = batch(rng, dims, with_rows=False)
    same_lookups(model.lookup(asked), reference.lookup(asked), "after the interrupts")


def scenario_out_of_step(seed, directory):
    """A rank that does not make a call (its data ran out, say) left the others waiting for
    ever. With a timeout, they raise DistributedError once it has passed, and so does that
    rank when it makes the call late (its first exchange meets theirs, given up, and its
    next one nobody); a second Ctrl-C ends such a wait too. The tables are out of step from
    then on: every call raises at once, and each rank's entries are as they were."""
    late, dims = WORLD - 1, dims_of(SLOTS)
    for bad, error in [(0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                       ("1", TypeError), (True, TypeError)]:
        e = expect_failure(lambda: DistributedMultiTypeHashTable(slot_to_config(), factory,
                                                                 timeout=bad if RANK == late else 5.0),
                           error if RANK == late else DistributedError, f"timeout={bad!r}")
        assert "timeout" in str(e) and (RANK == late or f"rank {late}" in str(e)), str(e)
    # A timeout on some ranks only: their collectives would not match the others'.
    e = expect_failure(lambda: distributed(timeout=None if RANK == late else 5.0), ValueError,
                       "a timeout on some ranks")
    assert f"rank 0 gave a timeout and rank {late} none" in str(e), str(e)
    main = threading.main_thread().ident

    def two_interrupts():
        timers = [threading.Timer(delay, lambda: signal.pthread_kill(main, signal.SIGINT)) for delay in (0.3, 0.6)]
        for timer in timers:
            timer.start()
        return timers

    for ending in ("a timeout", "a second Ctrl-C"):
        # The model and the steps of its first calls with a timeout: they give what they
        # gave without.
        rng, model, reference, seen = trained_one_step(seed, timeout=0.5 if ending == "a timeout" else 600)
        assert model.timeout == (0.5 if ending == "a timeout" else 600.0)
        mine = batch(rng, dims)
        batches = COMM.allgather(mine)
        model.apply_gradients(mine, 2, req_time=8)
        for b in batches:
            reference.apply_gradients(b, 2, enable_dedup=True, req_time=8)
        seen |= all_ids(batches)
        owned_entries_match(model, reference, seen, f"with {ending}")
        asked = batch(rng, dims, with_rows=False)
        same_lookups(model.lookup(asked), reference.lookup(asked), f"with {ending}")
        expected, raised = (DistributedError, "within 0.5 s") if ending == "a timeout" else (KeyboardInterrupt, "")
        for turn in ("the others", "the late rank"):
            if (RANK == late) == (turn == "the late rank"):
                timers = two_interrupts() if ending == "a second Ctrl-C" else []
                start = time.monotonic()
                e = expect_failure(lambda: model.lookup(asked), expected, f"{ending}: the call of {turn}")
                waited = time.monotonic() - start
                assert raised in str(e) and 0.5 <= waited < 60, (ending, turn, waited, str(e))
                for timer in timers:
                    timer.join()
            COMM.Barrier()  # the world's, not the table's
        start = time.monotonic()
        e = expect_failure(lambda: model.apply_gradients(batch(rng, dims), 3), DistributedError, f"after {ending}")
        assert "out of step" in str(e) and time.monotonic() - start < 1.0, str(e)
        e = expect_failure(lambda: model.size(), DistributedError, f"size after {ending}")
        owned_entries_match(model, reference, seen, f"after {ending}")


def scenario_let_go(seed, directory):
    """A table the garbage collector finds on one rank before the others frees its
    communicator only once every rank has let go of it, while a later table is built (a
    rank whose collector freed one inside the collective that built the next table waited
    there for ever). The next tables work as they should, and building one after every
    rank has let go of the others frees all of theirs."""
    gc.disable()  # the collector runs where this says only
    try:
        for round in range(3):
            dropped = distributed()
            dropped.itself = dropped  # a cycle: only the garbage collector finds it
            del dropped
            if RANK == 0:
                gc.collect()  # rank 0 lets go of it now, the others at the end
            rng, model, reference, seen = trained_one_step(seed + round)
            owned_entries_match(model, reference, seen, f"round {round}")
            asked = batch(rng, dims_of(SLOTS), with_rows=False)
            same_lookups(model.lookup(asked), reference.lookup(asked), f"round {round}")
            del model
    finally:
        gc.enable()
    gc.collect()  # every rank lets go of every table
    let_go = mtht.distributed._LetGo.of(COMM).let_go
    # Those of the last round at least (the others may have been freed while a table was built).
    assert {4, 5} <= {serial for serial, _ in let_go}, let_go
    kept = distributed()
    assert let_go == [], let_go
    assert kept.size() == 0


def scenario_checkpoint(seed, directory):
    """Save, train on, restore: the saved state comes back on every rank. A save that fails
    on one rank leaves the previous save. The state saved is also written by rank 0 as one
    process's checkpoint (``reference``), for the reshard test."""
    rng = np.random.default_rng([seed, RANK])
    model, reference = distributed(), single()
    dims = dims_of(SLOTS)
    seen = set()
    for step in range(1, 4):
        mine = batch(rng, dims)
        batches = COMM.allgather(mine)
        seen |= all_ids(batches)
        model.apply_gradients(mine, step, req_time=100 + step)
        for b in batches:
            reference.apply_gradients(b, step, enable_dedup=True, req_time=100 + step)
    saved = os.path.join(directory, "sharded")
    mtht.checkpoint.save_multi_type(model, saved)  # the helper hands it to the table
    if RANK == 0:
        mtht.checkpoint.save_multi_type(reference, os.path.join(directory, "reference"))
        with open(os.path.join(directory, "seen.txt"), "w") as f:
            f.write("\n".join(str(i) for i in sorted(seen)))
    COMM.Barrier()
    model.apply_gradients(batch(rng, dims), 9, req_time=200)
    # A save that fails on the last rank: every rank raises, the previous save stays whole.
    real = mtht.checkpoint.save_multi_type
    if RANK == WORLD - 1:
        def failing(*args, **kwargs):
            raise OSError("disk full")
        mtht.checkpoint.save_multi_type = failing
    try:
        expect_failure(lambda: model.save(saved), OSError if RANK == WORLD - 1 else DistributedError, "failing save")
    finally:
        mtht.checkpoint.save_multi_type = real
    COMM.Barrier()
    assert sorted(os.listdir(saved)) == [".mtht-lock", "g000001", "sharded.json"], os.listdir(saved)
    mtht.checkpoint.restore_multi_type(model, saved)
    owned_entries_match(model, reference, seen, "after restore")
    asked = batch(rng, dims, with_rows=False)
    same_lookups(model.lookup(asked), reference.lookup(asked), "after restore")
    # A second save replaces the first.
    model.save(saved)
    COMM.Barrier()
    assert sorted(os.listdir(saved)) == [".mtht-lock", "g000002", "sharded.json"], os.listdir(saved)


def scenario_restore_resharded(seed, directory):
    """Restore a checkpoint rewritten for this many ranks: it holds what the reference
    checkpoint holds, each id on its owner."""
    model, reference = distributed(), single()
    mtht.checkpoint.restore_multi_type(model, os.path.join(directory, f"resharded-{WORLD}"))
    mtht.checkpoint.restore_multi_type(reference, os.path.join(directory, "reference"))
    with open(os.path.join(directory, "seen.txt")) as f:
        seen = {int(line) for line in f if line.strip()}
    owned_entries_match(model, reference, seen, "resharded")
    assert model.size() == sum(t.size() for t in reference._tables.values())


def scenario_swapped_parts(seed, directory):
    """A save whose part directories 0 and 1 were swapped: the ranks whose part holds
    another's ids refuse it, every rank raises, and no table changes on any rank."""
    rng, model, reference, seen = trained_one_step(seed)
    own = mtht.checkpoint.CheckpointError if RANK < 2 else DistributedError
    e = expect_failure(lambda: model.restore(os.path.join(directory, "swapped")), own, "swapped parts")
    assert RANK >= 2 or "another part" in str(e), str(e)
    owned_entries_match(model, reference, seen, "after a refused restore")


def scenario_wrong_world(seed, directory):
    model = distributed()
    e = expect_failure(lambda: model.restore(os.path.join(directory, "sharded")), ValueError, "another world size")
    assert "reshard" in str(e), str(e)


def scenario_hooks(seed, directory):
    """Pushes through AsyncPush on a merged sharded table run their exchanges on the hook's
    thread; they equal the same writes made one after another."""
    rng = np.random.default_rng([seed, RANK])
    model, reference = distributed(merged=True), single(merged=True)
    dims = dims_of(merged_configs())
    with mtht.AsyncPush(model, capacity=2) as push:
        for step in range(1, 6):
            mine = batch(rng, dims)
            batches = COMM.allgather(mine)
            push.apply_gradients(mine, step, req_time=step)
            for b in batches:
                reference.apply_gradients(b, step, enable_dedup=True, req_time=step)
        model.as_op()
    asked = batch(rng, dims, with_rows=False)
    same_lookups(model.lookup(asked), reference.lookup(asked), "after pushes")


def scenario_built_differently(seed, directory):
    """A rank whose slot has another learning rate, or another filter: every rank refuses."""
    for what, slots in [("learning rate", {"a": (2, lambda: mtht.AdagradOptimizer(), 0)}),
                        ("filter", {"a": (2, lambda: mtht.AdagradOptimizer(), 3 if RANK == WORLD - 1 else 0)})]:
        cfg = config(2, slots["a"][1])
        if what == "learning rate" and RANK == WORLD - 1:
            cfg = mtht.HashTableConfigInstance(cfg.table_config, [0.5])
        threshold = slots["a"][2]

        def made(slot, c):
            return mtht.hash_table_from_config(c, hash_filter=mtht.HashFilter(threshold) if threshold else None)

        e = expect_failure(lambda: DistributedMultiTypeHashTable({"a": cfg}, made), ValueError, what)
        assert f"rank {WORLD - 1} built other tables" in str(e) and what.split()[-1] in str(e), str(e)
    # Learning-rate functions are alike although each process names them by address.
    DistributedMultiTypeHashTable({"a": mtht.HashTableConfigInstance(config(2, SLOTS["adam"][1]).table_config,
                                                                      [lambda step: 0.1])}, factory)


def scenario_edges(seed, directory):
    """Sums that overflow to Inf (the owner sums them, as one process), the HashNet scale of
    a part that gets no ids of a step, a model without tables, and many tables built and
    dropped (each talks on its own communicator)."""
    big = np.array([[3e38, 1.0], [3e38, 1.0]], F32)
    model, reference = distributed(), single()
    data = {"filtered": (np.array([5, 5]), big), "adagrad": (np.array([7, 7]), np.full((2, 4), 3e38, F32))} \
        if RANK == 0 else {}
    model.apply_gradients(data, 1)
    for b in COMM.allgather(data):
        reference.apply_gradients(b, 1, enable_dedup=True)
    asked = {"filtered": np.array([5]), "adagrad": np.array([7])}
    same_lookups(model.lookup(asked), reference.lookup(asked), "sums past the float range")
    segment = mtht.CombineAsSegment(2, mtht.RandomUniformInitializer(-0.1, 0.1), mtht.SgdOptimizer(),
                                    mtht.OneBitCompressor(step_size=1))
    hashnet = {"h": mtht.HashTableConfigInstance(
        mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[segment])), [1.0])}
    model = DistributedMultiTypeHashTable(hashnet, factory)
    reference = MultiTypeHashTable(hashnet, factory)
    for step, ids in [(1, [0, 1, 2, 3]), (1000, [0])]:  # the second step's id has one owner
        data = {"h": (np.array(ids), np.full((len(ids), 2), 0.01, F32))} if RANK == 0 else {}
        model.apply_gradients(data, step)
        for b in COMM.allgather(data):
            reference.apply_gradients(b, step, enable_dedup=True)
    asked = {"h": np.arange(4)}
    same_lookups(model.lookup(asked), reference.lookup(asked), "HashNet scales")
    empty = DistributedMultiTypeHashTable({}, factory)
    assert empty.lookup({}) == {} and empty.apply_gradients({}, 1) is empty and empty.size() == 0
    empty.save(os.path.join(directory, "no tables"))  # its part directories are made all the same
    empty.restore(os.path.join(directory, "no tables"))
    for _ in range(2100):  # past the communicators MPI has when none is freed
        DistributedMultiTypeHashTable({"sgd": config(1, SLOTS["sgd"][1])}, factory)


def scenario_hook_errors(seed, directory):
    """A push that fails on every rank while the ranks queue at different paces: every rank
    applies every later push (a rank that dropped some would leave the others waiting), and
    end() raises the error everywhere. A prefetched batch that one rank looks up with other
    ids: every rank looks its ids up again."""
    import time

    model, reference = distributed(), single()
    good = [{"sgd": (np.array([k, k + 1]), np.full((2, 1), float(k), F32))} for k in (10, 20, 30, 40)]
    bad = {"sgd": (np.array([1]), np.array([[np.nan]], F32))} if RANK == WORLD - 1 else good[1]
    with_error = None
    push = mtht.AsyncPush(model, capacity=4)
    for k, data in enumerate([good[0], bad, good[2], good[3]]):
        if RANK == WORLD - 1:
            time.sleep(0.2)
        push.apply_gradients(data, 1)
    try:
        push.end()
    except (ValueError, DistributedError) as e:
        with_error = e
    assert with_error is not None, "end() did not raise the failed push"
    assert "NaN" in str(with_error) or isinstance(with_error, DistributedError), str(with_error)
    for data in (good[0], good[2], good[3]):
        for b in COMM.allgather(data):
            reference.apply_gradients(b, 1, enable_dedup=True)
    asked = {"sgd": np.arange(9, 45)}
    same_lookups(model.lookup(asked), reference.lookup(asked), "pushes after a failed one")
    # The error of a failed push taken on one rank only (as_op is not collective): a save on
    # every rank then goes ahead (it raised on the others before the collective, which hung).
    push = mtht.AsyncPush(model)
    push.apply_gradients(bad, 1)
    if RANK == 0:
        try:
            model.as_op()
        except (ValueError, DistributedError):
            pass
    mtht.checkpoint.save_multi_type(model, os.path.join(directory, "after-a-failed-push"))
    try:
        push.end()
    except (ValueError, DistributedError):
        assert RANK != 0, "the error rank 0 took came back"
    prefetch = mtht.Prefetch(model)
    mine = {"sgd": np.array([10, 11, RANK])}
    prefetch.prefetch(mine)
    asked = {"sgd": np.array([30, 31])} if RANK == 0 else mine  # rank 0 misses
    same_lookups(prefetch.lookup(asked), reference.lookup(asked), "a prefetch one rank misses")
    assert prefetch.misses == (1 if RANK == 0 else 0)
    prefetch.end()



def scenario_wrapper_errors(seed, directory):
    """Arguments the merged wrapper refuses before it calls the sharded table, on one rank:
    every rank raises, and the next call works. A learning-rate function that looks the
    table up, inside an update, works as in one process."""
    rng = np.random.default_rng([seed, RANK])
    model, reference = distributed(merged=True), single(merged=True)
    dims = dims_of(merged_configs())
    bad_rank = WORLD - 1
    for what, bad in [("an unknown slot", {"nope": (np.array([1]), np.ones((1, 4), F32))}),
                      ("2-D ids", {"user": (np.ones((2, 2), np.int64), np.ones((2, 4), F32))}),
                      ("rows of another shape", {"user": (np.array([1, 2]), np.ones((2, 3), F32))})]:
        calls = [lambda d: model.apply_gradients(d, 1)]
        if what != "rows of another shape":
            calls.append(lambda d: model.lookup({s: v[0] for s, v in d.items()}))
        for call in calls:
            data = bad if RANK == bad_rank else batch(rng, dims)
            expect_failure(lambda: call(data), (KeyError, ValueError) if RANK == bad_rank else DistributedError, what)
    # What the sharded table refuses on one rank names the wrapper's slot on every rank (the
    # others' DistributedError named the merged table's md5 alone).
    rows = np.full((1, 4), np.nan if RANK == bad_rank else 1.0, F32)
    e = expect_failure(lambda: model.apply_gradients({"user": (np.array([5]), rows)}, 1),
                       ValueError if RANK == bad_rank else DistributedError, "NaN in one rank's slot")
    assert "slot 'user'" in str(e) and "NaN" in str(e), str(e)
    asked = batch(rng, dims, with_rows=False)
    same_lookups(model.lookup(asked), reference.lookup(asked), "after the wrapper's errors")
    # A learning rate that reads the table: a lookup inside the update, on every rank (of
    # ids other than the update's: it once took the memory holding the update's ids).
    holder = {}

    def rate(step):
        holder["table"].lookup({"sgd": np.array([999])})
        return 0.5

    cfg = config(1, SLOTS["sgd"][1])
    cfg = {"sgd": mtht.HashTableConfigInstance(cfg.table_config, [rate])}
    holder["table"] = model = DistributedMultiTypeHashTable(cfg, factory)
    model.apply_gradients({"sgd": (np.array([10 + RANK]), np.ones((1, 1), F32))}, 1)
    holder["table"] = reference = MultiTypeHashTable(cfg, factory)
    for r in range(WORLD):
        reference.apply_gradients({"sgd": (np.array([10 + r]), np.ones((1, 1), F32))}, 1, enable_dedup=True)
    asked = {"sgd": np.array([999] + list(range(10, 10 + WORLD)))}
    holder["table"] = model
    same_lookups(model.lookup(asked), reference.lookup(asked), "a learning rate that looks up")
    # Ctrl-C inside the update on one rank (its learning-rate function): every rank raises,
    # and the ranks stay in step.
    def interrupted(step):
        if RANK == WORLD - 1:
            raise KeyboardInterrupt
        return 0.5

    model = DistributedMultiTypeHashTable({"sgd": mtht.HashTableConfigInstance(cfg["sgd"].table_config,
                                                                               [interrupted])}, factory)
    expect_failure(lambda: model.apply_gradients({"sgd": (np.array([RANK]), np.ones((1, 1), F32))}, 1),
                   KeyboardInterrupt if RANK == WORLD - 1 else DistributedError, "Ctrl-C")
    assert model.lookup({"sgd": np.arange(WORLD)})["sgd"].shape == (WORLD, 1)


def scenario_separate_directories(seed, directory):
    """Ranks that save into directories the others do not see: the save fails on every rank
    and names no checkpoint."""
    model = distributed()
    mine = os.path.join(directory, f"rank{RANK}")
    e = expect_failure(lambda: model.save(mine), mtht.CheckpointError if RANK == 0 else DistributedError, "save")
    assert "one directory that all of them see" in str(e), str(e)
    assert os.listdir(mine) == ([".mtht-lock"] if RANK == 0 else []), os.listdir(mine)  # rank 0's lock file
    # Other directories than rank 0's, holding a save of the generation rank 0 chose from its
    # own: that save must not be written over (it was, and restored mixed).
    ahead, behind = (os.path.join(directory, f"{name} {seed}") for name in ("ahead", "behind"))
    model.assign({"sgd": (np.arange(8), np.full((8, 1), 1.0, F32))})
    model.save(behind)
    model.save(ahead)
    model.save(ahead)  # its generation 2 is the one rank 0 takes next in "behind"
    model.assign({"sgd": (np.arange(8), np.full((8, 1), 2.0, F32))})
    expect_failure(lambda: model.save(behind if RANK == 0 else ahead),
                   DistributedError if RANK == 0 else mtht.CheckpointError, "save")
    for saved in (ahead, behind):
        fresh = distributed()
        fresh.restore(saved)
        assert fresh.lookup({"sgd": np.arange(8)})["sgd"].tolist() == [[1.0]] * 8, saved



def _marked(value):
    """A model whose every id holds ``value``, on every rank."""
    model = distributed()
    model.assign({"sgd": (np.arange(64), np.full((64, 1), float(value), F32))})
    return model


def scenario_save_again_and_again(seed, directory):
    """Saves 1, 2, ... into ``directory/shared`` (every id holding the save's number) until
    ``directory/stop`` is there: the job that test_distributed runs beside a restoring one."""
    saved, k = os.path.join(directory, "shared"), 1
    while True:
        model = _marked(k)
        model.save(saved)
        if COMM.bcast(os.path.exists(os.path.join(directory, "stop")), root=0):
            return
        k += 1


def scenario_restore_beside_saves(seed, directory):
    """Restores from the directory another job keeps saving into, the ranks arriving up to
    50 ms apart: every restore gives one save on every rank (the ranks read sharded.json
    apart, and a save of the other job came between their reads: a rank held one save and
    another the next, with no error)."""
    saved = os.path.join(directory, "shared")
    rng = np.random.default_rng([seed, RANK])
    while not os.path.exists(os.path.join(saved, "sharded.json")):
        time.sleep(0.01)
    for _ in range(40):
        model = distributed()
        time.sleep(rng.uniform(0, 0.05))
        model.restore(saved)
        mine = set(model.lookup({"sgd": np.arange(64)})["sgd"].ravel().tolist())
        every = COMM.allgather(mine)
        assert all(len(m) == 1 for m in every) and len(set().union(*every)) == 1, every
    if RANK == 0:
        open(os.path.join(directory, "stop"), "w").close()


_HOLD_THE_LOCK = """
import os, sys, time
from mtht.checkpoint import directory_lock
with directory_lock(sys.argv[1], True):
    open(sys.argv[2], "w").close()
    time.sleep(60)
"""


def scenario_lock_edges(seed, directory):
    """A save into a directory that cannot be made raises on every rank (rank 0 alone
    raised, the others waited for ever); a Ctrl-C while rank 0 waits for another job's lock
    ends the wait on every rank; a learning rate given as an array builds on every rank (its
    key named its address, which differs between processes)."""
    import subprocess

    model = _marked(1)
    a_file = os.path.join(directory, f"a file {seed}")
    if RANK == 0:
        open(a_file, "w").close()
    COMM.Barrier()
    expect_failure(lambda: model.save(os.path.join(a_file, "ckpt")), OSError if RANK == 0 else DistributedError,
                   "save under a file")
    locked = os.path.join(directory, f"locked {seed}")
    model.save(locked)
    holder = None
    if RANK == 0:
        held = os.path.join(directory, f"held {seed}")
        holder = subprocess.Popen([sys.executable, "-c", _HOLD_THE_LOCK, locked, held])
        while not os.path.exists(held):
            time.sleep(0.01)
    COMM.Barrier()
    if RANK == 0:  # a Ctrl-C half a second into the save, while rank 0 waits for the lock
        threading.Timer(0.5, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)).start()
    began = time.monotonic()
    expect_failure(lambda: model.save(locked), KeyboardInterrupt if RANK == 0 else DistributedError,
                   "save waiting for another job's lock")
    assert time.monotonic() - began < 20, time.monotonic() - began
    if holder is not None:
        holder.kill()
        holder.wait()
    COMM.Barrier()
    model.save(locked)  # the lock is free again
    configs = {"sgd": config(1, lambda: mtht.SgdOptimizer())}
    configs["sgd"] = mtht.HashTableConfigInstance(configs["sgd"].table_config, [np.array(0.5)])
    rated = DistributedMultiTypeHashTable(configs, factory)
    rated.assign({"sgd": (np.arange(4), np.zeros((4, 1), F32))})
    rated.apply_gradients({"sgd": (np.arange(4), np.ones((4, 1), F32))}, 1)
    assert rated.lookup({"sgd": np.arange(4)})["sgd"].tolist() == [[-0.5 * WORLD]] * 4


def scenario_exit_with_pushes(seed, directory):
    """Pushes still queued when the program ends are applied at exit on every rank (the
    table's communicator, freed at exit first, made them fail and the other rank hang)."""
    model = distributed()
    push = mtht.AsyncPush(model, capacity=8)
    for step in range(1, 6):
        push.apply_gradients({"sgd": (np.array([step, RANK]), np.ones((2, 1), F32))}, step)


if __name__ == "__main__":
    name, seed, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    try:
        globals()[f"scenario_{name}"](seed, directory)
    except BaseException:
        # A check failed on this rank: the others may be waiting for it in a collective call,
        # so the job ends now, with this rank's traceback, instead of at the test's timeout.
        traceback.print_exc()
        sys.stderr.flush()
        COMM.Abort(1)
    COMM.Barrier()
    if RANK == 0:
        print(f"{name}: ok on {WORLD} ranks")
