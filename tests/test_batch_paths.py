"""Tests of the batch engine's fast paths against the reference model.

A write is split by shard and its ids are visited in four stages, each a loop over a block
of 2 to 16 positions (fewer for wider rows), a block apart: home buckets prefetched, then the
next bucket when an id may lie past home, then the row, then the work; each shard is locked
from the first stage to the last. A read goes through the same stages in input order, each
block sized by the rows the last one found, in pieces that hold the shared locks of their
shards. These tests drive the edges of those pipelines: shards holding a
number of ids around the block sizes, reads around the block and piece sizes, batches spread
over 1 to 4,096 shards, rows of every width, probe chains many buckets long (ids chosen to
share one home bucket), ids that the grouping of a deduplicated write can tell apart only by
the ids themselves, growth in the middle of a batch, writes at the load bound, batches
larger than the table, and a batch of one id. The last part checks that the index's load bound
(max_load_factor) changes memory and the number of shards speed, never results; that arrays
reused from the shared huge-page blocks come back zeroed; and that room reserved ahead of
need is not touched.
"""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import mtht

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import optimizer_reference as ref  # noqa: E402
from reference_model import ReferenceTable, SegmentDesc, make_config  # noqa: E402

SEG = SegmentDesc(4, init="constants", constant=0.25, opt="adagrad", initial_accumulator_value=0.1)
LR = 0.05
MASK64 = (1 << 64) - 1


def _table_and_reference():
    # 64 shards, fixed: the tests below place ids in shards (_shard) and count them per shard.
    cfg = make_config([SEG], [LR])
    cfg.table_config.num_shards = 64
    return mtht.hash_table_from_config(cfg), ReferenceTable([SEG])


def _hash(ids: np.ndarray) -> np.ndarray:
    """The table's id hash (murmur3's fmix64 of id + 2^64/phi), in numpy uint64 arithmetic."""
    x = ids.astype(np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return x


def _shard(ids: np.ndarray) -> np.ndarray:
    return (_hash(ids) >> np.uint64(58)).astype(np.int64)  # 64 shards: the top 6 bits


def _ids_in_one_shard(n: int, shard: int = 5, start: int = 0) -> np.ndarray:
    """The first n ids from `start` on whose hash falls in `shard`."""
    out = []
    lo = start
    while len(out) < n:
        cand = np.arange(lo, lo + 100_000, dtype=np.int64)
        out.extend(cand[_shard(cand) == shard].tolist())
        lo += 100_000
    return np.asarray(out[:n], dtype=np.int64)


def _colliding_ids(n: int, home_bits: int = 10, start: int = 0) -> np.ndarray:
    """n ids with one shard and one home bucket in any shard index of up to 2^home_bits
    buckets (a power of two). The home bucket among nb is the hash's bits below the top 12
    (those that may choose a shard), as a fraction of 2^52, times nb: for nb = 2^k, the top
    k of those bits."""
    out = []
    lo = start
    target = None
    while len(out) < n:
        cand = np.arange(lo, lo + 1_000_000, dtype=np.int64)
        h = _hash(cand)
        home = (h >> np.uint64(52 - home_bits)) & np.uint64((1 << home_bits) - 1)
        key = (h >> np.uint64(58)) << np.uint64(home_bits) | home
        if target is None:
            target = key[0]
        out.extend(cand[key == target].tolist())
        lo += 1_000_000
    return np.asarray(out[:n], dtype=np.int64)


def _step_both(t, ref, ids, rng, ts, dedup=False):
    g = rng.standard_normal((len(ids), SEG.dim)).astype(np.float32)
    t.apply_gradients(ids, g, global_step=1, enable_dedup=dedup, req_time=ts)
    ref.apply_gradients(ids, g, [LR], enable_dedup=dedup, req_time=ts)


def _assert_same(t, ref, ids):
    ids = np.asarray(ids, dtype=np.int64)
    np.testing.assert_array_equal(t.lookup(ids), ref.lookup(ids))
    np.testing.assert_array_equal(t.contains(ids), ref.contains(ids))
    for dump, want in zip(t.lookup_entry(ids), ref.lookup_entry(ids)):
        assert (dump is None) == (want is None)
        if dump is not None:
            np.testing.assert_array_equal(dump.values, want.values)
            np.testing.assert_array_equal(dump.optimizer_state[0]["norm"], want.state[0]["norm"])
            assert dump.last_update_ts == want.ts
    assert t.size() == ref.size()


def test_hash_model_matches_the_table():
    # The helpers above are only useful if they agree with the table: ids they put in one
    # home bucket must make a probe sequence as long as they are many (4 to a bucket).
    t, _ = _table_and_reference()
    ids = _colliding_ids(30)
    t.assign(ids, np.ones((30, SEG.dim), np.float32))
    assert t.stats(probe_lengths=True)["max_probe_groups"] >= -(-30 // 4)


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 32, 33, 47, 100])
def test_shard_sizes_around_the_block_sizes(n):
    # Every id of these batches is in one shard, so the shard's loop sees exactly n ids.
    t, ref = _table_and_reference()
    rng = np.random.default_rng(n)
    ids = _ids_in_one_shard(n)
    half = ids[: n // 2]
    t.assign(half, np.full((half.size, SEG.dim), 2.0, np.float32), req_time=1)
    ref.assign(half, np.full((half.size, SEG.dim), 2.0, np.float32), req_time=1)
    mixed = rng.permutation(np.concatenate([ids, ids[::3]]))
    _step_both(t, ref, mixed, rng, 2)
    _step_both(t, ref, mixed, rng, 3, dedup=True)
    missing = _ids_in_one_shard(n, start=10_000_000)
    _assert_same(t, ref, np.concatenate([ids, missing]))


def _ids_with_one_grouping_slot() -> np.ndarray:
    """Two ids whose hashes agree in their top 32 bits (what the grouping of a deduplicated
    write keeps of a hash, and the shard) and their low 6 bits (its first slot in a table of
    64 slots, a shard's of 9 to 16 ids)."""
    cand = np.arange(4_000_000, dtype=np.int64)
    h = _hash(cand)
    key = (h >> np.uint64(32)) << np.uint64(6) | (h & np.uint64(63))
    order = np.argsort(key, kind="stable")
    same = np.flatnonzero(key[order][1:] == key[order][:-1])
    return cand[order[same[0]:same[0] + 2]]


def test_dedup_keeps_apart_ids_whose_hashes_share_the_grouping_slot():
    # The grouping keeps 32 bits of each hash and compares the ids themselves when those
    # match: ids that also share the first slot must still be grouped (and stepped) apart.
    t, ref = _table_and_reference()
    rng = np.random.default_rng(4)
    pair = _ids_with_one_grouping_slot()
    hashes = _hash(pair)
    assert hashes[0] != hashes[1] and hashes[0] >> np.uint64(32) == hashes[1] >> np.uint64(32)
    others = _ids_in_one_shard(10, shard=int(_shard(pair)[0]), start=50_000_000)  # > 8 ids: a hash table
    batch = rng.permutation(np.concatenate([pair, pair, pair, others]))
    _step_both(t, ref, batch, rng, 1, dedup=True)
    _assert_same(t, ref, np.concatenate([pair, others]))
    assert t.size() == 12


@pytest.mark.parametrize("threads", [1, 2])
def test_deduplicated_steps_grouped_over_the_batch_or_by_shard_match_the_model(restore_num_threads, threads):
    # A deduplicated batch under 4,096 ids groups its ids over the whole batch and writes the
    # runs in input order; a larger one groups them shard by shard (its plan), on one thread
    # or two. Batches of a few ids to tens of thousands, ids repeated a few times or very
    # often, new and stored, an id alone in its batch, every id the same.
    mtht.set_num_threads(threads)
    t, ref = _table_and_reference()
    rng = np.random.default_rng(threads)
    seen = []
    for step, n in enumerate([3, 40, 500, 4095, 4097, 30_000, 1]):
        for ids in (rng.integers(0, 3 * n, n), (rng.zipf(1.3, n) - 1) % 50_000, np.full(n, 7)):
            _step_both(t, ref, ids.astype(np.int64), rng, step, dedup=True)
            seen.append(ids)
    _assert_same(t, ref, np.unique(np.concatenate(seen + [np.arange(100_000, 100_010)])))


@pytest.mark.parametrize("dedup", [False, True])
def test_long_probe_chains(dedup):
    # 60 ids with one home bucket: a chain of 15 full buckets, so most ids lie far past home,
    # further than any prefetch stage looks; ids that are absent walk the whole chain.
    t, ref = _table_and_reference()
    rng = np.random.default_rng(1)
    chain = _colliding_ids(90)
    present = chain[:60]  # chain[60:] is never written: those ids stay absent
    others = _ids_in_one_shard(200, start=50_000_000)
    for step in range(4):
        batch = rng.permutation(np.concatenate([present[: 20 * (step + 1)], others[: 50 * step]]))
        _step_both(t, ref, batch, rng, step, dedup=dedup)
    assert t.stats(probe_lengths=True)["max_probe_groups"] >= 15
    _assert_same(t, ref, rng.permutation(np.concatenate([chain, others])))


def test_removal_inside_a_probe_chain_keeps_the_rest_reachable():
    t, ref = _table_and_reference()
    chain = _colliding_ids(45)
    rng = np.random.default_rng(2)
    first, second = chain[::2], chain[1::2]
    expiry = 36500 * 86400                      # the default: 36,500 days
    _step_both(t, ref, first, rng, 1)           # written at time 1: expired at 1 + expiry
    _step_both(t, ref, second, rng, 1 + expiry)
    removed = t.evict(max_update_time=1 + expiry)
    assert removed == first.size
    for i in first.tolist():
        del ref.entries[i]
    _assert_same(t, ref, chain)
    _step_both(t, ref, first[::-1], rng, 2 + expiry)   # reinserted into the freed slots
    _assert_same(t, ref, chain)


def test_growth_in_the_middle_of_a_batch_with_duplicates():
    t, ref = _table_and_reference()
    rng = np.random.default_rng(3)
    t.assign([7], np.ones((1, SEG.dim), np.float32))
    ref.assign([7], np.ones((1, SEG.dim), np.float32))
    grows = t.stats()["capacity"]
    ids = rng.integers(0, 20_000, 60_000).astype(np.int64)   # many new ids, each about 3 times
    _step_both(t, ref, ids, rng, 1)
    assert t.stats()["capacity"] > 100 * grows
    _step_both(t, ref, ids[::-1], rng, 2, dedup=True)
    _assert_same(t, ref, np.arange(-5, 20_005))


def test_batch_much_larger_than_the_table():
    t, ref = _table_and_reference()
    rng = np.random.default_rng(4)
    _step_both(t, ref, np.arange(10, dtype=np.int64), rng, 1)
    big = rng.integers(-(2**62), 2**62, 100_000).astype(np.int64)
    big[::1000] = np.arange(100) % 10                      # a few ids of the table among them
    out = t.lookup(big)
    np.testing.assert_array_equal(out, ref.lookup(big))
    assert t.size() == 10
    _step_both(t, ref, big, rng, 2)
    _assert_same(t, ref, np.concatenate([np.arange(10), big[:2000]]))


@pytest.mark.parametrize("dedup", [False, True])
def test_a_batch_of_one_id(dedup):
    t, ref = _table_and_reference()
    rng = np.random.default_rng(5)
    ids = np.full(50_000, -123456789, dtype=np.int64)
    _step_both(t, ref, ids, rng, 1, dedup=dedup)
    _step_both(t, ref, ids, rng, 2, dedup=dedup)
    _assert_same(t, ref, [-123456789, 0])


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_batches_planned_range_by_range_on_several_threads(threads):
    # With several threads, a batch's plan is built over consecutive ranges of the batch (a
    # range per thread, of at least 2,048 ids) and a read is done range by range. An id
    # whose occurrences fall in different ranges must still be updated in input order, and
    # every position must be read back in its place.
    before = mtht.get_num_threads()
    mtht.set_num_threads(threads)
    try:
        t, ref = _table_and_reference()
        rng = np.random.default_rng(threads)
        n = 4 * 2048 + 3  # ranges of uneven length with 3 and 4 threads
        pool = rng.integers(-(2**63), 2**63 - 1, 700, dtype=np.int64)
        ids = pool[rng.integers(0, pool.size, n)]
        ids[[0, n // 3, n // 2, n - 1]] = pool[0]  # one id at both ends and inside
        for step, dedup in ((1, False), (2, True), (3, False)):
            _step_both(t, ref, ids, rng, step, dedup=dedup)
        values = rng.standard_normal((n, SEG.dim)).astype(np.float32)
        t.assign_add(ids, values, req_time=4)
        ref.assign_add(ids, values, req_time=4)
        missing = rng.integers(-(2**63), 2**63 - 1, 3000, dtype=np.int64)
        _assert_same(t, ref, rng.permutation(np.concatenate([ids, missing])))
    finally:
        mtht.set_num_threads(before)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 32, 33, 48, 63, 64, 65, 97, 129, 200, 1000, 1023, 1024, 1025,
                               16383, 16384, 16385, 40000])
def test_reads_in_blocks_over_many_shards(n):
    # Reads go over a batch in input order, in blocks of 16 positions, four stages a block
    # apart, in pieces of 16,384 ids, each piece holding the shards its ids fall in (all 64
    # from 1,024 ids on): batch lengths around the block, piece and all-shards sizes, ids
    # spread over the 64 shards, a third of them missing.
    t, ref = _table_and_reference()
    rng = np.random.default_rng(n)
    ids = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    stored = ids[rng.random(n) < 2 / 3]
    values = rng.standard_normal((stored.size, SEG.dim)).astype(np.float32)
    t.assign(stored, values, req_time=7)
    ref.assign(stored, values, req_time=7)
    _assert_same(t, ref, ids)
    _assert_same(t, ref, np.repeat(ids[: max(1, n // 10)], 40))  # runs of one id across blocks


@pytest.mark.parametrize("dim", [4, 64])
def test_reads_whose_blocks_change_size_with_the_stored_share(dim):
    # A read sizes each block by the rows the last one found: more ids per block where few
    # are stored (an absent id fetches no row), fewer where all are, and fewer still for wide
    # rows. Runs of stored and of absent ids, 1 to 150 long, make the size change at every
    # point of the pipeline; every id's row must come back all the same.
    seg = SegmentDesc(dim, init="zeros", opt="sgd")
    cfg = make_config([seg], [LR])
    t, ref = mtht.hash_table_from_config(cfg), ReferenceTable([seg])
    rng = np.random.default_rng(dim)
    runs = []
    for k in range(400):
        length = int(rng.integers(1, 151))
        runs.append(np.full(length, k % 2 == 0))
    stored_mask = np.concatenate(runs)
    ids = rng.permutation(10 * stored_mask.size)[: stored_mask.size].astype(np.int64)
    values = rng.standard_normal((int(stored_mask.sum()), dim)).astype(np.float32)
    t.assign(ids[stored_mask], values, req_time=3)
    ref.assign(ids[stored_mask], values, req_time=3)
    want = np.zeros((ids.size, dim), np.float32)
    want[stored_mask] = values
    np.testing.assert_array_equal(t.lookup(ids), want)
    np.testing.assert_array_equal(t.lookup(ids), ref.lookup(ids))
    np.testing.assert_array_equal(t.lookup(ids[::-1]), want[::-1])


def _blocks_of(dim, opt):
    t = mtht.hash_table_from_config(make_config([SegmentDesc(dim, init="zeros", opt=opt)], [LR]))
    st = t.stats()
    return st["read_block"], st["write_block"]


def _fetches_ahead():
    """stats()["fetches_ahead"] of a table built now: the variable's value, read when it is built."""
    return mtht.hash_table_from_config(make_config([SegmentDesc(16, init="zeros", opt="sgd")], [LR])).stats()[
        "fetches_ahead"]


def test_blocks_hold_about_sixteen_fetches(monkeypatch):
    # A block holds about 16 fetches: a bucket and a row per id (a row of n lines counts
    # (n + 1) / 2), and for a write the caller's row too; from 2 to 16 ids.
    monkeypatch.delenv("MTHT_FETCHES_AHEAD", raising=False)
    assert _blocks_of(16, "adagrad") == (8, 5)    # bucket + 64-B values; + 128-B row + 64-B gradient
    assert _blocks_of(64, "adagrad") == (5, 2)    # bucket + 256-B values; + 512-B row + 256-B gradient
    assert _blocks_of(1, "sgd") == (8, 5)
    assert _blocks_of(128, "sgd") == (3, 2)       # bucket + 512-B values; + 512-B row + 512-B values
    assert _fetches_ahead() == 16
    monkeypatch.setenv("MTHT_FETCHES_AHEAD", "64")
    assert _blocks_of(16, "adagrad") == (16, 16)  # at most 16
    assert _fetches_ahead() == 64
    monkeypatch.setenv("MTHT_FETCHES_AHEAD", "1")
    assert _blocks_of(16, "adagrad") == (2, 2)    # at least 2
    assert _fetches_ahead() == 1


@pytest.mark.parametrize("bad", ["0", "257", "-3", "8x", "many"])
def test_a_bad_fetches_ahead_is_refused(monkeypatch, bad):
    monkeypatch.setenv("MTHT_FETCHES_AHEAD", bad)
    with pytest.raises(ValueError, match="MTHT_FETCHES_AHEAD"):
        _blocks_of(16, "adagrad")


@pytest.mark.parametrize("fetches, blocks", [("1", (2, 2)), ("6", (3, 2)), ("9", (5, 3)), ("256", (16, 16))])
def test_results_do_not_depend_on_the_block_length(monkeypatch, fetches, blocks):
    # Blocks of 2 to 16 ids (reads, writes) over writes (plain, deduplicated, with new ids
    # among stored ones) and reads of stored and absent ids give the reference model's results.
    monkeypatch.setenv("MTHT_FETCHES_AHEAD", fetches)
    t, ref = _table_and_reference()
    assert (t.stats()["read_block"], t.stats()["write_block"]) == blocks
    rng = np.random.default_rng(int(fetches))
    for step in range(4):
        ids = rng.integers(0, 3000, 2000).astype(np.int64)
        grads = rng.standard_normal((ids.size, SEG.dim)).astype(np.float32)
        dedup = step % 2 == 1
        t.apply_gradients(ids, grads, global_step=step, req_time=step, enable_dedup=dedup)
        ref.apply_gradients(ids, grads, [LR], enable_dedup=dedup, req_time=step)
    _assert_same(t, ref, rng.integers(0, 4000, 3000).astype(np.int64))


@pytest.mark.parametrize("dim", [1, 3, 7, 8, 16, 24, 32, 33, 40, 64])
def test_lookups_copy_rows_of_every_width(dim):
    # A lookup copies rows of up to 128 bytes that are a multiple of 32 in 32-byte steps, and
    # other rows whole: widths below, at and above those bounds, stored next to each other.
    cfg = make_config([SegmentDesc(dim, init="zeros", opt="sgd")], [LR])
    t = mtht.hash_table_from_config(cfg)
    rng = np.random.default_rng(dim)
    ids = rng.permutation(5000).astype(np.int64)
    values = rng.standard_normal((ids.size, dim)).astype(np.float32)
    t.assign(ids, values)
    probe = np.concatenate([ids[::-3], [10**9, -1]])
    want = np.concatenate([values[::-3], np.zeros((2, dim), np.float32)])
    np.testing.assert_array_equal(t.lookup(probe), want)


STREAMED_OUTPUT_BYTES = 16 << 20  # from this output size on, a lookup writes with streaming stores


@pytest.mark.parametrize("dim", [4, 6, 64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("out_offset", [None, 0, 1])
def test_lookups_with_a_large_output_return_the_same_rows(restore_num_threads, dim, threads, out_offset):
    # A lookup whose output reaches STREAMED_OUTPUT_BYTES writes rows of a multiple of 16
    # bytes into a 16-byte aligned output with streaming stores: 16-byte rows, 256-byte rows,
    # and (written the usual way) 24-byte rows and an output 4 bytes off alignment (out=).
    mtht.set_num_threads(threads)
    t = mtht.hash_table_from_config(make_config([SegmentDesc(dim, init="zeros", opt="sgd")], [LR]))
    rng = np.random.default_rng(dim)
    stored = rng.permutation(60_000).astype(np.int64)
    values = rng.standard_normal((stored.size, dim)).astype(np.float32)
    t.assign(stored, values)
    n = STREAMED_OUTPUT_BYTES // (4 * dim) + 1001
    pick = rng.integers(0, stored.size + 5_000, size=n)  # about 8% missing
    ids = np.where(pick < stored.size, stored[np.minimum(pick, stored.size - 1)], 10**9 + pick)
    want = np.zeros((n, dim), np.float32)
    want[pick < stored.size] = values[pick[pick < stored.size]]
    if out_offset is None:
        got = t.lookup(ids)
    else:
        got = np.empty(n * dim + out_offset, np.float32)[out_offset:].reshape(n, dim)
        assert t.lookup(ids, out=got) is got
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(t.lookup(ids[:1000]), want[:1000])  # and below the size


@pytest.mark.parametrize("compressor", ["fixed_r8", "one_bit"])
@pytest.mark.parametrize("dim", [6, 64, 260])
@pytest.mark.parametrize("threads", [1, 2])
def test_compressed_lookups_with_a_large_output_return_the_compressed_rows(restore_num_threads, compressor, dim,
                                                                          threads):
    # A compressor's rows in an output of STREAMED_OUTPUT_BYTES or more: changed in a buffer
    # on the stack, then streamed (rows of 64 floats), or written the usual way (rows of 6
    # floats, not a multiple of 16 bytes, and of 260, wider than the buffer).
    mtht.set_num_threads(threads)
    comp = mtht.FixedR8Compressor(2.0) if compressor == "fixed_r8" else mtht.OneBitCompressor(amplitude=0.5)
    segment = mtht.CombineAsSegment(dim, mtht.ZerosInitializer(), mtht.SgdOptimizer(), comp)
    config = mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[segment]))
    t = mtht.hash_table_from_config(mtht.HashTableConfigInstance(config, [LR]))
    rng = np.random.default_rng(dim)
    stored = rng.permutation(max(400, 120_000 // dim)).astype(np.int64)
    values = (rng.standard_normal((stored.size, dim)) * 2).astype(np.float32)
    t.assign(stored, values)
    rows = ref.fake_quantize(values, 2.0) if compressor == "fixed_r8" else ref.hashnet_forward(values, 1.0, 0.5)
    n = STREAMED_OUTPUT_BYTES // (4 * dim) + 1001
    pick = rng.integers(0, stored.size + stored.size // 10, size=n)  # about 9% missing
    found = pick < stored.size
    ids = np.where(found, stored[np.minimum(pick, stored.size - 1)], 10**9 + pick)
    want = np.zeros((n, dim), np.float32)
    want[found] = rows[pick[found]]
    np.testing.assert_array_equal(t.lookup(ids), want)
    np.testing.assert_array_equal(t.lookup(ids[:1000]), want[:1000])  # and below the size


def test_fused_lookup_with_a_large_output_matches_per_table_lookups(restore_num_threads):
    mtht.set_num_threads(2)
    dims = [64, 4]
    tables = [mtht.hash_table_from_config(make_config([SegmentDesc(d, init="zeros", opt="sgd")], [LR]))
              for d in dims]
    rng = np.random.default_rng(8)
    for t, d in zip(tables, dims):
        t.assign(np.arange(50_000), rng.standard_normal((50_000, d)).astype(np.float32))
    fss = np.array([40_000, 30_000, 30_000, 10_000], np.int32)  # [shard][table], 2 shards
    ids = rng.integers(0, 55_000, size=int(fss.sum())).astype(np.int64)
    emb, _, id_offsets, emb_offsets, _ = mtht.hash_table.fused_lookup(tables, ids, fss, 2)
    assert emb.nbytes >= STREAMED_OUTPUT_BYTES
    for block in range(4):
        k = block % 2
        a, b = id_offsets[block], id_offsets[block + 1]
        np.testing.assert_array_equal(emb[emb_offsets[block]:emb_offsets[block + 1]],
                                      tables[k].lookup(ids[a:b]).reshape(-1))


@pytest.mark.parametrize("dims", [(16, 3, 16, 3, 16), (16, 16, 16, 16, 16)])  # rows of one width: one 2-D array
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_lookups_of_several_tables_in_one_call_match_each_tables_lookup(restore_num_threads, threads, dims):
    # The tables' ids are cut into pieces shared out over the threads: tables with no ids, one
    # id, fewer than a piece and several pieces' worth, one table twice, rows of 3 and 16 floats.
    mtht.set_num_threads(threads)
    rng = np.random.default_rng(threads)
    tables = []
    for dim in dims:
        t = mtht.hash_table_from_config(make_config([SegmentDesc(dim, init="zeros", opt="sgd")], [LR]))
        t.assign(np.arange(30_000), rng.standard_normal((30_000, dim)).astype(np.float32))
        tables.append(t)
    tables.append(tables[0])
    sizes = [40_000, 0, 1, 3_000, 9_000, 5_000]
    id_lists = [rng.integers(-100, 32_000, size=n) for n in sizes]  # some ids missing
    got = mtht.hash_table.lookup_all(tables, id_lists)
    for t, ids, rows in zip(tables, id_lists, got):
        np.testing.assert_array_equal(rows, t.lookup(ids))
    # The results share one array: each is still its own writable C-contiguous float32 rows,
    # starting on a cache line, overlapping no other.
    for k, (t, ids, rows) in enumerate(zip(tables, id_lists, got)):
        assert rows.dtype == np.float32 and rows.shape == (len(ids), t.dim_size)
        assert rows.flags.c_contiguous and rows.flags.writeable
        assert rows.ctypes.data % 64 == 0
        rows[...] = k
    for k, rows in enumerate(got):
        assert (rows == k).all()


@pytest.mark.parametrize("shards", [1, 4, 32, 128])
def test_reads_over_few_shards_lock_what_they_read(shards):
    # A read locks the shards its ids fall in, or every shard once it has 2 ids per shard:
    # below, at and above that size, with fewer shards than one word of the shard set, and
    # with more.
    from mtht._spec import core_segments

    cfg = make_config([SEG], [LR])
    core = mtht._core.Table(core_segments(cfg.table_config), num_shards=shards)
    rng = np.random.default_rng(shards)
    pool = rng.integers(-(2**63), 2**63 - 1, 40 * shards, dtype=np.int64)
    stored = np.ascontiguousarray(pool[::2])
    values = rng.standard_normal((stored.size, SEG.dim)).astype(np.float32)
    core.assign(stored, values, 5)
    for n in (1, 2 * shards - 1, 2 * shards, 2 * shards + 1, 40 * shards):
        pick = rng.integers(0, pool.size, n)
        out = np.empty((n, SEG.dim), np.float32)
        core.lookup(np.ascontiguousarray(pool[pick]), out)
        want = np.where((pick % 2 == 0)[:, None], values[pick // 2], 0)
        np.testing.assert_array_equal(out, want)
    # Every lock a read took was given back: a write to every shard can take them.
    writer = threading.Thread(target=core.assign, args=(stored, values, 6), daemon=True)
    writer.start()
    writer.join(timeout=30)
    assert not writer.is_alive(), "a read left a shard locked"


def test_reads_over_4096_shards_with_one_id_each():
    # With the most shards a table may have, nearly every id of a read has a shard of its own,
    # so a read holds as many shards at once as it ever does.
    from mtht._spec import core_segments

    cfg = make_config([SEG], [LR])
    core = mtht._core.Table(core_segments(cfg.table_config), num_shards=4096)
    rng = np.random.default_rng(3)
    ids = rng.integers(-(2**63), 2**63 - 1, 3000, dtype=np.int64)
    stored = np.ascontiguousarray(ids[::2])
    values = rng.standard_normal((stored.size, SEG.dim)).astype(np.float32)
    core.assign(stored, values, 5)
    out = np.empty((ids.size, SEG.dim), np.float32)
    core.lookup(ids, out)
    want = np.zeros_like(out)
    want[::2] = values
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(core.contains(ids), np.arange(ids.size) % 2 == 0)
    got_values, _, got_ts, found = core.lookup_entries(ids)
    np.testing.assert_array_equal(got_values, want)
    np.testing.assert_array_equal(found, np.arange(ids.size) % 2 == 0)
    np.testing.assert_array_equal(got_ts, np.where(found, 5, 0))
    assert core.stats()["num_shards"] == 4096


@pytest.mark.parametrize("dedup", [False, True])
def test_writes_over_4096_shards_match_64_shards(dedup):
    # Writes hold each shard of their run from the first stage to the last too. The shard
    # count changes where entries live, never the numbers.
    from mtht._spec import core_segments

    cfg = make_config([SEG], [LR])
    tables = [mtht._core.Table(core_segments(cfg.table_config), num_shards=s) for s in (64, 4096)]
    rng = np.random.default_rng(4)
    pool = rng.integers(-(2**63), 2**63 - 1, 2500, dtype=np.int64)
    lrs = np.array([LR], np.float32)
    for step in range(1, 4):
        ids = pool[rng.integers(0, pool.size, 3000)]
        grads = rng.standard_normal((ids.size, SEG.dim)).astype(np.float32)
        rows = rng.standard_normal((ids.size, SEG.dim)).astype(np.float32)
        for core in tables:
            core.apply_gradients(ids, grads, lrs, step, step, dedup)
            core.assign_add(ids, rows, step)
    a, b = (core.lookup_entries(pool) for core in tables)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert tables[0].size() == tables[1].size() == np.unique(pool[a[3]]).size > 2000


# ----------------------------------------------------------------------------------------
# max_load_factor: the index's load bound changes speed and memory, never results
# ----------------------------------------------------------------------------------------

def _table_with_load(max_load_factor, **kwargs):
    cfg = make_config([SEG], [LR])
    cfg.table_config.max_load_factor = max_load_factor
    for k, v in kwargs.items():
        setattr(cfg.table_config, k, v)
    cfg.table_config.validate()
    return mtht.hash_table_from_config(cfg)


@pytest.mark.parametrize("bad", [0.2, 0.95, 1.0, 0.0, -0.5, float("nan"), float("inf"), True, "0.5", None])
def test_max_load_factor_out_of_range_is_refused(bad):
    seg = mtht.CombineAsSegment(4, mtht.ZerosInitializer(), mtht.SgdOptimizer(), None)
    with pytest.raises(ValueError, match="max_load_factor"):
        mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[seg]), max_load_factor=bad)


@pytest.mark.parametrize("max_load_factor", [0.25, 0.5, 2 / 3, 0.9])
def test_load_stays_within_its_bound_as_the_table_grows(max_load_factor):
    t = _table_with_load(max_load_factor)
    rng = np.random.default_rng(6)
    loads = []
    for _ in range(12):
        t.assign(rng.integers(-(2**63), 2**63 - 1, 20_000, dtype=np.int64), np.ones((20_000, SEG.dim), np.float32))
        loads.append(t.stats()["load_factor"])
    assert max(loads) <= max_load_factor
    # Past the shards' first allocations the index doubles only when full to the bound.
    assert min(loads[4:]) >= max_load_factor / 2 * 0.9


def test_a_large_index_grows_by_half_and_keeps_its_entries():
    # One shard: its index is a pooled piece of up to 2 MiB (32,768 buckets, 131,072 slots),
    # a power of two that doubles; past that it grows by half (rounded up to whole 2 MiB
    # pages), so its load stays above 2/3 of the bound instead of falling to half. Entries stay
    # reachable through every growth, and through removals from an index whose bucket count
    # is not a power of two.
    bound, page_slots = 0.5, 131_072
    t = _table_with_load(bound, num_shards=1)
    ref = ReferenceTable([SEG])
    rng = np.random.default_rng(12)
    written = np.unique(rng.integers(-(2**63), 2**63 - 1, 420_000, dtype=np.int64))
    rng.shuffle(written)
    capacities, loads = [], []
    for step, batch in enumerate(np.array_split(written, 42)):
        _step_both(t, ref, batch, rng, step)
        st = t.stats()
        capacities.append(st["capacity"])
        loads.append(st["load_factor"])
    assert max(loads) <= bound
    grown = [(a, b) for a, b in zip(capacities, capacities[1:]) if b != a]
    large = [(a, b) for a, b in grown if a >= page_slots]
    assert len(large) >= 4
    for a, b in large:
        assert b % page_slots == 0 and b <= -(-a * 3 // 2 // page_slots) * page_slots
    assert min(l for c, l in zip(capacities, loads) if c >= 4 * page_slots) >= 2 / 3 * bound * 0.9
    _assert_same(t, ref, rng.permutation(written)[:20_000])
    expiry = 36500 * 86400  # the default: 36,500 days
    removed = t.evict(max_update_time=20 + expiry)  # the batches written at times 0 to 20
    gone = [i for i, e in ref.entries.items() if e.ts <= 20]
    assert removed == len(gone) > 0
    for i in gone:
        del ref.entries[i]
    _assert_same(t, ref, rng.permutation(written)[:20_000])
    _step_both(t, ref, rng.permutation(written)[:50_000], rng, 50)  # reinserted into the freed slots
    _assert_same(t, ref, rng.permutation(written)[:20_000])


def test_rewriting_stored_ids_at_the_load_bound_does_not_grow_the_index():
    # A batch that could take a shard past its bound if its ids were new has them counted
    # (in blocks of 16 whose home buckets are fetched ahead): all stored, the index stays;
    # one new id beyond the bound, it doubles.
    from mtht._spec import core_segments

    core = mtht._core.Table(core_segments(make_config([SEG], [LR]).table_config), num_shards=1)
    rng = np.random.default_rng(8)
    stored = rng.integers(-(2**63), 2**63 - 1, 1000, dtype=np.int64)
    core.assign(stored, np.ones((stored.size, SEG.dim), np.float32), 1)
    capacity = core.stats()["capacity"]
    fill = rng.integers(-(2**63), 2**63 - 1, capacity // 2 - stored.size, dtype=np.int64)
    core.assign(fill, np.ones((fill.size, SEG.dim), np.float32), 1)
    stored = np.concatenate([stored, fill])
    assert core.stats()["size"] == capacity // 2 == stored.size  # at the bound
    for n in (stored.size, 17, 16 * 7 + 5):
        core.assign(np.ascontiguousarray(rng.permutation(stored)[:n]), np.full((n, SEG.dim), 2, np.float32), 2)
        assert core.stats()["capacity"] == capacity
    batch = np.concatenate([rng.permutation(stored)[:100], [12345]]).astype(np.int64)
    core.assign(batch, np.full((batch.size, SEG.dim), 3, np.float32), 3)
    assert core.stats()["capacity"] == 2 * capacity
    assert core.stats()["size"] == stored.size + 1


@pytest.mark.parametrize("max_load_factor", [0.25, 0.5, 0.9])
def test_writes_that_pass_the_bound_a_little_grow_the_index_after_them(max_load_factor):
    # A shard's share of a write that could take its index past the bound, but not past the
    # slack above it, goes in without its ids being counted; if its new ids do pass the
    # bound, the index grows when the write is done. Steps of stored ids with a few new ones
    # each (plain and deduplicated, repeated ids among them), from just under the bound:
    # every result as the reference's, the load within the bound after every write.
    t = _table_with_load(max_load_factor, num_shards=1)
    ref = ReferenceTable([SEG])
    rng = np.random.default_rng(9)
    stored = rng.integers(-(2**63), 2**63 - 1, 500, dtype=np.int64)
    _step_both(t, ref, stored, rng, 1)
    capacity = t.stats()["capacity"]
    fresh = rng.integers(-(2**63), 2**63 - 1, int(capacity * max_load_factor) - stored.size - 3, dtype=np.int64)
    _step_both(t, ref, fresh, rng, 2)
    stored = np.concatenate([stored, fresh])
    assert t.stats()["capacity"] == capacity  # 3 entries under the bound
    grew = 0
    for step in range(12):
        new = rng.integers(-(2**63), 2**63 - 1, 2, dtype=np.int64)
        batch = np.concatenate([rng.choice(stored, 40), new, new[:1]]).astype(np.int64)
        _step_both(t, ref, rng.permutation(batch), rng, 3 + step, dedup=bool(step % 2))
        stored = np.concatenate([stored, new])
        stats = t.stats()
        assert stats["size"] <= stats["capacity"] * max_load_factor
        grew += stats["capacity"] != capacity
        capacity = stats["capacity"]
    assert grew == 1
    _assert_same(t, ref, np.concatenate([stored, rng.integers(0, 100, 10)]))


def test_results_do_not_depend_on_the_load_bound():
    tables = [_table_with_load(f) for f in (0.25, 0.5, 0.9)]
    ref = ReferenceTable([SEG])
    rng = np.random.default_rng(7)
    for step in range(8):
        ids = rng.integers(0, 30_000, 20_000).astype(np.int64)
        g = rng.standard_normal((ids.size, SEG.dim)).astype(np.float32)
        for t in tables:
            t.apply_gradients(ids, g, global_step=1, enable_dedup=bool(step % 2), req_time=step)
        ref.apply_gradients(ids, g, [LR], enable_dedup=bool(step % 2), req_time=step)
    probe = np.arange(-10, 30_010, dtype=np.int64)
    for t in tables:
        _assert_same(t, ref, probe[::7])
        np.testing.assert_array_equal(t.lookup(probe), tables[0].lookup(probe))
    assert [t.stats()["capacity"] for t in tables] == sorted((t.stats()["capacity"] for t in tables), reverse=True)


def test_max_bytes_counts_the_index_at_the_lowest_load_of_the_bound():
    # An Adagrad dim-4 entry: a 32-byte row, 16 bytes of bookkeeping, and a quarter of a
    # 64-byte bucket at half the bound: 64 / 4 / 0.45 = 35.6 -> 36 bytes at 0.9, 64 at 0.5.
    # (One shard: no rows are left to other shards by evictions.)
    assert _table_with_load(0.9, max_bytes=96_000, num_shards=1).stats()["max_entries"] == 96_000 // (32 + 16 + 36)
    assert _table_with_load(0.5, max_bytes=96_000, num_shards=1).stats()["max_entries"] == 96_000 // (32 + 16 + 64)


def test_the_load_bound_is_part_of_the_config_key():
    seg = mtht.CombineAsSegment(4, mtht.ZerosInitializer(), mtht.SgdOptimizer(), None)
    keys = {mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[seg]), max_load_factor=f).canonical_key()
            for f in (0.5, 0.8)}
    assert len(keys) == 2


# ----------------------------------------------------------------------------------------
# num_shards: how a table is cut changes speed, never results
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, 3, 48, 8192, -4, 2.0, True, "8"])
def test_num_shards_must_be_a_power_of_two_in_range(bad):
    seg = mtht.CombineAsSegment(4, mtht.ZerosInitializer(), mtht.SgdOptimizer(), None)
    with pytest.raises(ValueError, match="num_shards"):
        mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[seg]), num_shards=bad)


def test_results_and_checkpoints_do_not_depend_on_the_number_of_shards(tmp_path):
    tables = [_table_with_load(0.5, num_shards=n) for n in (1, 4, 64, 256)]
    assert [t.stats()["num_shards"] for t in tables] == [1, 4, 64, 256]
    ref = ReferenceTable([SEG])
    rng = np.random.default_rng(9)
    for step in range(6):
        ids = rng.integers(0, 20_000, [50, 5_000, 9_000][step % 3]).astype(np.int64)
        g = rng.standard_normal((ids.size, SEG.dim)).astype(np.float32)
        for t in tables:
            t.apply_gradients(ids, g, global_step=1, enable_dedup=bool(step % 2), req_time=step)
            t.assign_add(ids[:100], g[:100], req_time=step)
        ref.apply_gradients(ids, g, [LR], enable_dedup=bool(step % 2), req_time=step)
        ref.assign_add(ids[:100], g[:100], req_time=step)
    probe = np.arange(-10, 20_010, dtype=np.int64)
    for t in tables:
        _assert_same(t, ref, probe[::5])
        np.testing.assert_array_equal(t.lookup(probe), tables[0].lookup(probe))
    # A checkpoint of one shard count restores into another, both ways.
    tables[0].save(str(tmp_path / "one"))
    tables[3].save(str(tmp_path / "many"))
    many_from_one = _table_with_load(0.5, num_shards=256).restore(str(tmp_path / "one"))
    one_from_many = _table_with_load(0.5, num_shards=1).restore(str(tmp_path / "many"))
    for t in (many_from_one, one_from_many):
        np.testing.assert_array_equal(t.lookup(probe), tables[0].lookup(probe))
        assert len(t) == len(tables[0])


def test_the_shard_count_is_not_part_of_the_config_key():
    # It only changes speed, so slots that differ in it still share a merged table.
    seg = mtht.CombineAsSegment(4, mtht.ZerosInitializer(), mtht.SgdOptimizer(), None)
    keys = {mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[seg]), num_shards=n).canonical_key()
            for n in (1, 64)}
    assert len(keys) == 1


# ----------------------------------------------------------------------------------------
# The automatic shard count (num_shards=None, the default): shards split as the table and
# its write batches grow
# ----------------------------------------------------------------------------------------

def _auto_shards(stored_ids, largest_batch):
    """The documented rule: the fewest shards, a power of two up to 64, leaving no shard (by
    the top bits of the id hash) with more than 16,384 entries and no write batch with more
    than 4,096 ids per shard."""
    hashes = _hash(np.unique(np.asarray(stored_ids, dtype=np.int64)))
    for bits in range(6):
        per_shard = np.bincount((hashes >> np.uint64(64 - bits)).astype(np.int64), minlength=1 << bits) if bits \
            else np.array([hashes.size])
        if per_shard.max() <= 16_384 and largest_batch <= 4_096 << bits:
            return 1 << bits
    return 64


def _write_new(t, ids, rng, step):
    t.apply_gradients(ids, rng.standard_normal((ids.size, SEG.dim)).astype(np.float32), global_step=1,
                      req_time=step)


def test_an_automatic_shard_count_follows_the_entries_and_the_batches():
    t = _table_with_load(0.5)
    assert t.config.table_config.num_shards is None
    assert t.stats()["num_shards"] == 1
    rng = np.random.default_rng(11)
    pool = rng.permutation(np.arange(-300_000, 300_000, dtype=np.int64) * 7919)
    stored, largest = 0, 0

    def touch_every_shard(step):
        # A shard over the bound is split after the next write that reaches it.
        _write_new(t, pool[:stored][rng.integers(0, stored, 4_000)], rng, step)

    # Batches of new ids too small to split anything by themselves: the entries decide.
    for size in (1_000, 4_096, 4_096, 4_096, 4_000):
        _write_new(t, pool[stored:stored + size], rng, 1)
        stored += size
        largest = max(largest, size)
    assert stored > 16_384
    touch_every_shard(2)
    assert t.stats()["num_shards"] == _auto_shards(pool[:stored], largest) == 2
    while stored < 150_000:
        _write_new(t, pool[stored:stored + 3_000], rng, 3)
        stored += 3_000
    touch_every_shard(4)
    assert t.stats()["num_shards"] == _auto_shards(pool[:stored], largest) == 16
    # One large batch splits right after it: 40,000 ids want 16 shards; 100,000 want 32.
    _write_new(t, pool[stored:stored + 40_000], rng, 5)
    stored += 40_000
    assert t.stats()["num_shards"] == _auto_shards(pool[:stored], 40_000) == 16
    _write_new(t, pool[:100_000], rng, 6)
    assert t.stats()["num_shards"] == _auto_shards(pool[:stored], 100_000) == 32
    # Never more than 64.
    _write_new(t, pool[:300_000], rng, 7)
    stored = max(stored, 300_000)
    assert t.stats()["num_shards"] == 64
    _write_new(t, pool, rng, 8)
    touch_every_shard(9)
    assert t.stats()["num_shards"] == 64
    assert len(t) == pool.size


def test_initial_capacity_and_a_fixed_count_set_the_shards():
    # As many shards as a table of initial_capacity entries spread evenly would need.
    assert _table_with_load(0.5, initial_capacity=16_384).stats()["num_shards"] == 1
    assert _table_with_load(0.5, initial_capacity=100_000).stats()["num_shards"] == 8
    assert _table_with_load(0.5, initial_capacity=10_000_000).stats()["num_shards"] == 64
    fixed = _table_with_load(0.5, num_shards=4)
    rng = np.random.default_rng(12)
    _write_new(fixed, rng.integers(0, 1 << 40, 100_000), rng, 1)
    _write_new(fixed, rng.integers(0, 1 << 40, 1_000), rng, 2)
    assert fixed.stats()["num_shards"] == 4


def _filtered_or_limited(kind, num_shards):
    cfg = make_config([SEG], [LR])
    cfg.table_config.num_shards = num_shards
    hash_filter = None
    if kind == "filter":
        hash_filter = mtht.HashFilter(default_occurrence_threshold=2)
    elif kind in ("lru", "lfu"):
        cfg.table_config.max_entries = 30_000
        cfg.table_config.eviction_policy = kind
    cfg.table_config.validate()
    return mtht.hash_table_from_config(cfg, hash_filter=hash_filter)


@pytest.mark.parametrize("kind", ["plain", "filter", "lru", "lfu"])
def test_splitting_changes_no_result(kind, tmp_path):
    # The same writes into a table that splits its shards (1, 2, 4, then 8 here, as its
    # batches grow) and into tables of 1 and 64 fixed shards: every entry, its optimizer
    # state and timestamp, the admission
    # filter's counts (which decide when an id gets in) and the capacity limit's choice of
    # entries to evict (by write clock and write count, both moved with the entries) agree.
    tables = {n: _filtered_or_limited(kind, n) for n in (None, 1, 64)}
    rng = np.random.default_rng(13)
    probe = np.arange(0, 60_000, dtype=np.int64) * 31
    seen = []
    for step, size in enumerate([3_000, 5_000, 1_500, 9_000, 2_000, 20_000] * 2):
        ids = probe[rng.integers(0, probe.size if kind == "filter" else 30_000 + 2_500 * step, size)]
        g = rng.standard_normal((size, SEG.dim)).astype(np.float32)
        for t in tables.values():
            t.apply_gradients(ids, g, global_step=1, enable_dedup=bool(step % 3 == 1), req_time=step)
            t.assign_add(ids[:500], g[:500], req_time=step)
        seen.append(tables[None].stats()["num_shards"])
    auto, one = tables[None], tables[1]
    assert seen[:6] == [1, 2, 2, 4, 4, 8]
    assert [t.stats()["num_shards"] for t in tables.values()] == [_auto_shards(probe[auto.contains(probe)], 20_000),
                                                                 1, 64]
    if kind in ("lru", "lfu"):
        assert auto.stats()["evictions"] > 10_000
    if kind == "filter":
        assert len(auto) < 0.5 * probe.size
    assert len(auto) == len(one) == len(tables[64])
    np.testing.assert_array_equal(auto.contains(probe), one.contains(probe))
    np.testing.assert_array_equal(auto.lookup(probe), tables[64].lookup(probe))
    for a, b in zip(auto.lookup_entry(probe[::7]), one.lookup_entry(probe[::7])):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a.values, b.values)
            np.testing.assert_array_equal(a.optimizer_state[0]["norm"], b.optimizer_state[0]["norm"])
            assert a.last_update_ts == b.last_update_ts
    # A checkpoint of the split table holds what one of the single shard holds.
    auto.save(str(tmp_path / "auto"))
    one.save(str(tmp_path / "one"))
    again = {name: _filtered_or_limited(kind, None).restore(str(tmp_path / name)) for name in ("auto", "one")}
    np.testing.assert_array_equal(again["auto"].lookup(probe), again["one"].lookup(probe))
    ids = probe[:2_000]
    for t in again.values():  # the filter's counts came back alike: the same ids get in
        t.apply_gradients(ids, np.ones((ids.size, SEG.dim), np.float32), global_step=1, req_time=20)
    np.testing.assert_array_equal(again["auto"].contains(probe), again["one"].contains(probe))



def test_a_table_made_after_another_is_freed_starts_empty():
    # Mid-size arrays (here each shard's index: 8,192 buckets, 512 KiB) are pieces of shared
    # huge-page blocks, reused once freed: they must come back zeroed, or the second table
    # would find the first one's ids in its index.
    first, _ = _table_and_reference()
    ids = np.arange(400_000, dtype=np.int64)
    first.assign(ids, np.full((ids.size, SEG.dim), 3.0, np.float32))
    assert first.stats()["index_bytes"] >= 64 * (256 << 10)
    del first
    second, ref = _table_and_reference()
    others = ids + 10_000_000
    _step_both(second, ref, others, np.random.default_rng(8), 1)
    assert second.stats()["index_bytes"] >= 64 * (256 << 10)
    assert not second.contains(ids).any()
    assert second.size() == others.size
    _assert_same(second, ref, np.concatenate([ids[::997], others[::101]]))


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc/self/statm")
def test_room_reserved_ahead_is_not_resident():
    # initial_capacity reserves rows and index up front, and every write batch reserves rows
    # for all its ids as if they were new; such room must cost address space only. Pieces of
    # the shared huge-page blocks never handed out before are already zero and must not be
    # written when handed out (writing them made a fresh 300,000-id table resident at once).
    seg = mtht.CombineAsSegment(32, mtht.ZerosInitializer(), mtht.AdagradOptimizer(), None)
    config = mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[seg]), initial_capacity=300_000)
    before = _resident_bytes()
    table = mtht.hash_table_from_config(mtht.HashTableConfigInstance(config, learning_rate_fns=[0.1]))
    grown = _resident_bytes() - before
    stats = table.stats()
    reserved = stats["row_bytes_reserved"] + stats["index_bytes"]
    assert reserved > 100e6
    assert grown < 0.1 * reserved, (grown, reserved)
    table.assign(np.arange(1000), np.ones((1000, 32), np.float32))  # the table works as usual
    np.testing.assert_array_equal(table.lookup([0, 999, 1000]), [[1.0] * 32, [1.0] * 32, [0.0] * 32])


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc/self/statm")
@pytest.mark.parametrize("filtered", [False, True])
def test_a_small_table_takes_little_memory(filtered):
    # A model may have a table for each of hundreds of small slots: 300 tables of 200 ids,
    # dim 16, Adagrad (a row of 128 bytes), must not take more than 100 KB each. A table of
    # all 32,768 slots' expiry (256 KB) or admission thresholds (128 KB), or 64 shards with
    # their own index and first rows, used to take more than that by themselves.
    seg = mtht.CombineAsSegment(16, mtht.ZerosInitializer(), mtht.AdagradOptimizer(), None)
    config = mtht.HashTableConfigInstance(mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[seg])),
                                          learning_rate_fns=[0.1])
    rng = np.random.default_rng(14)
    batches = [rng.integers(0, 1 << 40, 200) for _ in range(300)]
    grads = np.ones((200, 16), np.float32)
    before = _resident_bytes()
    tables = []
    for ids in batches:
        hash_filter = mtht.HashFilter(default_occurrence_threshold=0) if filtered else None
        t = mtht.hash_table_from_config(config, hash_filter=hash_filter)
        t.apply_gradients(ids, grads, global_step=1)
        tables.append(t)
    per_table = (_resident_bytes() - before) / len(tables)
    assert per_table < 100_000, per_table
    assert all(len(t) == 200 for t in tables)


_LIST_IDS = """
import numpy as np
import mtht

def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

seg = mtht.CombineAsSegment(1, mtht.ZerosInitializer(), mtht.SgdOptimizer(), None)
t = mtht.hash_table_from_config(mtht.HashTableConfigInstance(
    mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[seg])), [0.1]))
for start in range(0, 4_000_000, 500_000):
    t.assign_add(np.arange(start, start + 500_000, dtype=np.int64) * 7, np.ones((500_000, 1), np.float32))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak starts again from what is resident now
before = kib("VmRSS")
ids = t.ids()
print((kib("VmHWM") - before) * 1024, ids.nbytes, np.array_equal(np.sort(ids), np.arange(4_000_000) * 7))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_listing_the_ids_takes_the_memory_of_the_list_once():
    """``ids()`` lists the ids straight into the array it returns. Listed into a buffer of the
    core and copied, the 32 MB of a table's 4M ids took 64 MB at the peak, which for a table
    of a billion ids is 8 GB more."""
    out = subprocess.run([sys.executable, "-c", _LIST_IDS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    peak, ids_bytes, ids_right = out.stdout.split()
    assert ids_right == "True"
    assert int(ids_bytes) <= int(peak) < 1.25 * int(ids_bytes), (peak, ids_bytes)


_EXPORT = """
import numpy as np
import mtht

def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

seg = mtht.CombineAsSegment(16, mtht.ZerosInitializer(), mtht.AdagradOptimizer(), mtht.Fp32Compressor())
t = mtht.hash_table_from_config(mtht.HashTableConfigInstance(
    mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[seg])), [0.1]))
ids = np.arange(1_000_000, dtype=np.int64)
for start in range(0, ids.size, 250_000):
    t.assign(ids[start:start + 250_000], np.ones((250_000, 16), np.float32))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = kib("VmRSS")
rows = t.export_serving(ids)
print((kib("VmHWM") - before) * 1024, rows.nbytes, bool((rows.view(np.float32) == 1).all()))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_an_export_of_a_whole_table_takes_little_more_than_its_rows():
    """``export_serving`` packs a block of ids at a time. Packed at once, the 64 MB of a
    table's 1M rows took 192 MB at the peak: the entries' optimizer state and the
    compressor's copies came on top of them."""
    out = subprocess.run([sys.executable, "-c", _EXPORT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    peak, rows_bytes, rows_right = out.stdout.split()
    assert rows_right == "True"
    assert int(rows_bytes) <= int(peak) < int(rows_bytes) + 32 * 2**20, (peak, rows_bytes)


_FIRST_BIG_WRITE = """
import sys
import numpy as np
import mtht

def kib(field):  # of this process's memory (getrusage's peak also counts the parent's, from the fork)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

seg = mtht.CombineAsSegment(16, mtht.ZerosInitializer(), mtht.AdagradOptimizer(), None)
config = mtht.HashTableConfigInstance(mtht.EmbeddingHashTableConfig(
    entry_config=mtht.EntryConfig(segments=[seg]), num_shards=None if sys.argv[1] == "auto" else 64), [0.1])
t = mtht.hash_table_from_config(config)
ids = np.arange(2_000_000, dtype=np.int64) * 11
grads = np.full((ids.size, 16), 0.01, np.float32)
before = kib("VmRSS")
assert kib("VmHWM") <= 1.1 * before  # nothing before took more than the inputs hold now
t.apply_gradients(ids, grads, global_step=1)
print((kib("VmHWM") - before) * 1024, t.stats()["bytes"], t.stats()["num_shards"])
"""


def test_a_first_big_write_to_an_automatically_sharded_table_takes_its_shards_first():
    """A batch with more ids per shard than the bound splits the shards before it is written.
    Written into the one shard of a new table and split after, 2M new ids took the memory of
    the table twice over (688 MB at the peak for a table of 308 MB, against 362 with 64
    shards from the start) and 5 to 8 times the time."""
    peaks = {}
    for shards in ("auto", "64"):
        out = subprocess.run([sys.executable, "-c", _FIRST_BIG_WRITE, shards], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        peak, table_bytes, num_shards = (int(v) for v in out.stdout.split())
        assert num_shards == 64
        peaks[shards] = peak
        assert peak >= table_bytes // 2, (shards, peak, table_bytes)  # the peak is the table's
    assert peaks["auto"] < 1.25 * peaks["64"], peaks
