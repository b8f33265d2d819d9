"""The ranks' side of test_distributed.py: ``mpiexec -n W python mpi_worker.py SCENARIO
SEED DIRECTORY``. Each rank checks what it sees and exits non-zero (an assertion) when a
check fails.

The reference is one process's MultiTypeHashTable (or merged table) given every rank's
batch one after another, in rank order: every rank builds it from the batches gathered
from all ranks, and compares its own lookups and the entries it owns with it, bit for bit.
"""

import os
import sys

import numpy as np
from mpi4py import MPI

import mtht
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
}


def config(dim, optimizer):
    segment = mtht.CombineAsSegment(dim, mtht.RandomUniformInitializer(-0.1, 0.1), optimizer(), mtht.Fp32Compressor())
    table = mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[segment]))
    return mtht.HashTableConfigInstance(table, [0.05] if dim != 1 else [1.0])


def slot_to_config(slots=SLOTS):
    return {slot: config(dim, optimizer) for slot, (dim, optimizer, _) in slots.items()}


def factory(slot, cfg):
    threshold = SLOTS[slot][2] if slot in SLOTS else 0
    hash_filter = mtht.HashFilter(default_occurrence_threshold=threshold) if threshold else None
    return mtht.hash_table_from_config(cfg, hash_filter=hash_filter, name_suffix=slot)


def distributed(merged=False):
    if merged:
        return MergedMultiTypeHashTable(merged_configs(), lambda c: DistributedMultiTypeHashTable(c, factory))
    return DistributedMultiTypeHashTable(slot_to_config(), factory)


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
        assert got[slot].dtype == F32 and np.array_equal(got[slot], expected[slot]), \
            f"rank {RANK}: {what}: slot {slot} differs\n{got[slot]}\n{expected[slot]}"


def local_tables(model):
    inner = model._table if isinstance(model, MergedMultiTypeHashTable) else model
    return inner.local_table._tables if isinstance(inner, DistributedMultiTypeHashTable) else inner._tables


def owned_entries_match(model, reference, ids_seen, what):
    """Each table of this rank holds exactly the reference's entries of the ids it owns:
    values, optimizer state and timestamp."""
    mine, theirs = local_tables(model), local_tables(reference)
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


def scenario_errors(seed, directory):
    """Bad input on one rank: every rank raises and no table changes anywhere."""
    rng = np.random.default_rng([seed, RANK])
    model, reference = distributed(), single()
    dims = dims_of(SLOTS)
    mine = batch(rng, dims)
    batches = COMM.allgather(mine)
    model.apply_gradients(mine, 1, req_time=7)
    for b in batches:
        reference.apply_gradients(b, 1, enable_dedup=True, req_time=7)
    seen = all_ids(batches)
    bad_rank = WORLD - 1
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
    # A bad lookup on one rank raises everywhere; the next call works.
    e = expect_failure(lambda: model.lookup({"sgd": np.array([1.5])} if RANK == bad_rank else {"sgd": [1]}),
                       TypeError if RANK == bad_rank else DistributedError, "float ids")
    asked = batch(rng, dims, with_rows=False)
    same_lookups(model.lookup(asked), reference.lookup(asked), "after the errors")


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
    assert sorted(os.listdir(saved)) == ["g000001", "sharded.json"], os.listdir(saved)
    mtht.checkpoint.restore_multi_type(model, saved)
    owned_entries_match(model, reference, seen, "after restore")
    asked = batch(rng, dims, with_rows=False)
    same_lookups(model.lookup(asked), reference.lookup(asked), "after restore")
    # A second save replaces the first.
    model.save(saved)
    COMM.Barrier()
    assert sorted(os.listdir(saved)) == ["g000002", "sharded.json"], os.listdir(saved)


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


if __name__ == "__main__":
    name, seed, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    globals()[f"scenario_{name}"](seed, directory)
    COMM.Barrier()
    if RANK == 0:
        print(f"{name}: ok on {WORLD} ranks")
