"""One table used from many Python threads at once, intra-call threading, and a large table."""

import ctypes
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import mtht
from mtht.hash_table import hash_table_from_config
from mtht.testing import generate_test_hash_table_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cgroups import limited_group, run_in  # noqa: E402
from reference_model import ReferenceTable, SegmentDesc, make_config  # noqa: E402

F32 = np.float32


@pytest.fixture(autouse=True)
def _restore_num_threads(restore_num_threads):
    """Every test here may change the thread count."""


def run_threads(targets, timeout=120):
    """Start one thread per callable, all released together; re-raise the first failure."""
    barrier = threading.Barrier(len(targets))
    errors = []

    def wrap(fn):
        def body():
            try:
                barrier.wait()
                fn()
            except BaseException as e:  # noqa: BLE001 - reported to the test below
                errors.append(e)
        return body

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout  # for all threads together
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a thread did not finish (deadlock?)"
    if errors:
        raise errors[0]


def test_concurrent_assign_add_loses_nothing():
    dim = 4
    t = hash_table_from_config(generate_test_hash_table_config(dim))
    n_threads, n_ids = 8, 20000
    plans = []
    for k in range(n_threads):
        rng = np.random.default_rng(k)
        batches = []
        for it in range(30):
            size = 6000 if it % 10 == 0 else int(rng.integers(1, 800))  # some take the multi-thread path
            batches.append(rng.integers(0, n_ids, size=size).astype(np.int64))
        plans.append(batches)

    def writer(batches):
        def fn():
            for ids in batches:
                t.assign_add(ids, np.ones((ids.size, dim), dtype=np.float32))
        return fn

    run_threads([writer(b) for b in plans])
    counts = np.zeros(n_ids, dtype=np.int64)
    for batches in plans:
        for ids in batches:
            counts += np.bincount(ids, minlength=n_ids)
    ids = np.arange(n_ids, dtype=np.int64)
    got = t.lookup(ids)
    np.testing.assert_array_equal(got, np.repeat(counts[:, None], dim, axis=1).astype(np.float32))
    assert t.size() == int((counts > 0).sum())
    np.testing.assert_array_equal(t.contains(ids), counts > 0)


def test_concurrent_apply_gradients_loses_nothing_with_dedup_and_without():
    t = hash_table_from_config(generate_test_hash_table_config(2, learning_rate=1.0))
    n_ids = 3000
    plans = [np.random.default_rng(100 + k).integers(0, n_ids, size=(20, 700)) for k in range(6)]

    def worker(k):
        def fn():
            for it, ids in enumerate(plans[k]):
                t.apply_gradients(ids, -np.ones((ids.size, 2), dtype=np.float32), global_step=it,
                                  enable_dedup=bool((k + it) % 2))
        return fn

    run_threads([worker(k) for k in range(len(plans))])
    counts = sum(np.bincount(p.ravel(), minlength=n_ids) for p in plans)
    np.testing.assert_array_equal(t.lookup(np.arange(n_ids)), np.repeat(counts[:, None], 2, axis=1))


def test_fused_updates_of_capped_tables_in_any_order_do_not_deadlock():
    # A fused update holds the capacity locks of all its capacity-limited tables until it has
    # written them all; updates naming the same tables in other orders, and plain writes to
    # one of them, must still all finish, and the caps must hold.
    mtht.set_num_threads(2)
    cap, dim = 8000, 2
    seg = mtht.CombineAsSegment(dim, mtht.ZerosInitializer(), mtht.SgdOptimizer(), None)
    config = mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[seg]), max_entries=cap)
    a, b = (hash_table_from_config(mtht.HashTableConfigInstance(config, [0.1]), name_suffix=s) for s in "ab")

    def fused(order, seed):
        def fn():
            rng = np.random.default_rng(seed)
            for it in range(25):
                sizes = [int(rng.integers(1, 3000)), int(rng.integers(1, 3000))]
                ids = rng.integers(0, 30_000, size=sum(sizes)).astype(np.int64)
                offsets = [0, sizes[0], sum(sizes)]
                mtht.hash_table.fused_apply_gradient(order, ids, ids, sizes, np.ones(dim * ids.size, np.float32),
                                                     offsets, [dim * o for o in offsets], [0.1, 0.1], it, it, 1,
                                                     enable_grad_accumulation=bool(it % 2))
        return fn

    def plain(table, seed):
        def fn():
            rng = np.random.default_rng(seed)
            for it in range(25):
                ids = rng.integers(0, 30_000, size=int(rng.integers(1, 6000))).astype(np.int64)
                table.apply_gradients(ids, np.ones((ids.size, dim), np.float32), it, req_time=it)
        return fn

    run_threads([fused([a, b], 1), fused([b, a], 2), fused([a, b], 3), fused([b, a], 4), plain(a, 5), plain(b, 6)],
                timeout=60)
    assert 0 < a.size() <= cap and 0 < b.size() <= cap


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_expiry_during_capacity_limited_writes_keeps_the_limit(policy):
    # evict() removes expired entries while writes to a capacity-limited table choose their
    # victims: a write that counted an entry present and then found it removed inserts it
    # again, and must still leave the table within max_entries. (Writes that counted the
    # new ids before reading the table's size went past it: by up to 200 entries in every
    # run of this workload.)
    cap = 5000
    seg = mtht.CombineAsSegment(1, mtht.ZerosInitializer(), mtht.SgdOptimizer(), None)
    config = mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[seg]), max_entries=cap,
                                           eviction_policy=policy)
    t = hash_table_from_config(mtht.HashTableConfigInstance(config, [0.1]))
    done = threading.Event()
    sizes = []

    def writer():
        rng = np.random.default_rng(7)
        stop = time.monotonic() + 1.5
        try:
            while time.monotonic() < stop:
                ids = rng.integers(0, 20_000, int(rng.integers(1, 3000))).astype(np.int64)
                t.apply_gradients(ids, np.ones((ids.size, 1), F32), 1, req_time=int(rng.integers(0, 100)))
                sizes.append(t.size())  # only the evictor runs beside: nothing adds entries
        finally:
            done.set()

    def evictor():
        while not done.is_set():  # about half the entries, by their random timestamps
            t.evict(max_update_time=100 + 36500 * 86400 - 50)
            time.sleep(0.0001)

    run_threads([writer, evictor], timeout=60)
    assert len(sizes) > 100 and max(sizes) <= cap
    assert t.stats()["evictions"] > 0


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_size_during_capacity_limited_writes_never_passes_the_limit(policy):
    # A write evicts in every shard before it inserts in any. size() read shard by shard
    # could count a shard before the evictions and another after the inserts, and so see
    # the table past max_entries in the middle of a write.
    cap = 20_000
    seg = mtht.CombineAsSegment(1, mtht.ZerosInitializer(), mtht.SgdOptimizer(), None)
    config = mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[seg]), max_entries=cap,
                                           eviction_policy=policy, num_shards=64)
    t = hash_table_from_config(mtht.HashTableConfigInstance(config, [0.1]))
    done = threading.Event()
    seen = []

    def writer(seed):
        rng = np.random.default_rng(seed)
        stop = time.monotonic() + 1.0
        try:
            while time.monotonic() < stop:
                ids = rng.integers(0, 200_000, int(rng.integers(1, 8000))).astype(np.int64)
                t.apply_gradients(ids, np.ones((ids.size, 1), F32), 1)
        finally:
            done.set()

    def watcher():
        while not done.is_set():
            seen.append(t.size())
            seen.append(t.stats()["size"])

    run_threads([lambda: writer(1), lambda: writer(2), watcher], timeout=60)
    assert len(seen) > 1000 and t.size() == cap
    assert max(seen) <= cap


def test_lookups_during_writes_never_see_torn_rows():
    dim = 16
    t = hash_table_from_config(generate_test_hash_table_config(dim))
    counted = np.arange(1000, dtype=np.int64)
    stamped = np.arange(5000, 5100, dtype=np.int64)
    fresh = (np.arange(60000, dtype=np.int64) * 1000003 + 10**9)
    n_add_writers, add_rounds, stamp_rounds = 3, 400, 3000
    done = threading.Event()
    failures = []
    reads = []

    def adder():
        rng = np.random.default_rng(threading.get_ident() % 2**32)
        for _ in range(add_rounds):
            ids = rng.permutation(counted)
            t.assign_add(ids, np.ones((ids.size, dim), dtype=np.float32))

    def stamper():
        for k in range(1, stamp_rounds + 1):
            t.assign(stamped, np.full((stamped.size, dim), k, dtype=np.float32), req_time=k)

    def grower():
        # new ids force the index to grow (rehash) while readers probe it
        for chunk in np.array_split(fresh, 300):
            t.assign(chunk, np.full((chunk.size, dim), 7.0, dtype=np.float32))

    def reader(seed):
        def fn():
            rng = np.random.default_rng(seed)
            last_count = np.zeros(counted.size, dtype=np.float32)
            last_stamp = np.zeros(stamped.size, dtype=np.float32)
            seen_fresh = np.zeros(fresh.size, dtype=bool)
            max_count = n_add_writers * add_rounds
            while not done.is_set():
                rows = t.lookup(counted)
                if not (rows == rows[:, :1]).all():
                    failures.append("torn counted row")
                c = rows[:, 0]
                if not ((c == np.round(c)) & (c >= 0) & (c <= max_count)).all():
                    failures.append("counted row out of range")
                if (c < last_count).any():
                    failures.append("counted row went backwards")
                last_count = c
                for d in t.lookup_entry(stamped[rng.integers(0, stamped.size, size=10)]):
                    if d is not None and not (d.values == d.last_update_ts).all():
                        failures.append(f"values {d.values[:2]} with timestamp {d.last_update_ts}")
                s = t.lookup(stamped)
                if not (s == s[:, :1]).all() or (s[:, 0] < last_stamp).any():
                    failures.append("torn or regressing stamped row")
                last_stamp = s[:, 0]
                pick = rng.integers(0, fresh.size, size=2000)
                f = t.lookup(fresh[pick])
                ok = ((f == 0).all(axis=1) & ~seen_fresh[pick]) | (f == 7.0).all(axis=1)
                if not ok.all():
                    failures.append("fresh row neither absent nor 7, or disappeared")
                seen_fresh[pick] |= (f == 7.0).all(axis=1)
                reads.append(1)
                if failures:
                    return
        return fn

    def writers_then_done():
        try:
            run_threads([adder] * n_add_writers + [stamper, grower])
        finally:
            done.set()

    run_threads([writers_then_done, reader(1), reader(2)])
    assert failures == []
    assert len(reads) >= 20  # the readers really ran while the writers wrote
    np.testing.assert_array_equal(t.lookup(counted), np.full((counted.size, dim), n_add_writers * add_rounds))
    np.testing.assert_array_equal(t.lookup(stamped), np.full((stamped.size, dim), stamp_rounds))
    np.testing.assert_array_equal(t.lookup(fresh), np.full((fresh.size, dim), 7.0))
    assert t.size() == counted.size + stamped.size + fresh.size


def test_shards_split_while_other_threads_read_write_and_save(tmp_path):
    # A table with an automatic shard count splits its shards as writers fill it, between
    # batches of other threads: adds are never lost, reads never see a row torn or going
    # back, and saves made meanwhile restore to counts each within what had been added.
    dim = 4
    t = hash_table_from_config(generate_test_hash_table_config(dim))
    assert t.stats()["num_shards"] == 1
    counted = np.arange(2000, dtype=np.int64) * 7
    n_writers, rounds = 3, 60
    done = threading.Event()
    failures, shard_counts, saves = [], set(), []

    def writer(k):
        def fn():
            rng = np.random.default_rng(k)
            for r in range(rounds):
                fresh = (np.arange(600, dtype=np.int64) + (k * rounds + r) * 600) * 7 + 1  # new ids
                ids = rng.permutation(np.concatenate([counted, fresh]))
                t.assign_add(ids, np.ones((ids.size, dim), dtype=np.float32))
        return fn

    def reader():
        last = np.zeros(counted.size, dtype=np.float32)
        while not done.is_set():
            rows = t.lookup(counted)
            c = rows[:, 0]
            if not ((rows == rows[:, :1]).all() and (c == np.round(c)).all() and (c >= last).all()
                    and (c <= n_writers * rounds).all()):
                failures.append("torn, fractional, regressing or excessive count")
                return
            last = c
            shard_counts.add(t.stats()["num_shards"])

    def saver():
        while not done.is_set() and len(saves) < 5:
            path = str(tmp_path / f"save{len(saves)}")
            t.save(path)
            saves.append(path)

    def writers_then_done():
        try:
            run_threads([writer(k) for k in range(n_writers)])
        finally:
            done.set()

    run_threads([writers_then_done, reader, reader, saver])
    assert failures == []
    total = n_writers * rounds
    assert t.size() == counted.size + total * 600
    np.testing.assert_array_equal(t.lookup(counted), np.full((counted.size, dim), total, np.float32))
    assert len(shard_counts) >= 2 and t.stats()["num_shards"] >= 8  # 110,000 entries: 8 or more
    assert saves
    for path in saves:
        back = hash_table_from_config(generate_test_hash_table_config(dim)).restore(path)
        c = back.lookup(counted)
        assert ((c == c[:, :1]).all() and (c >= 0).all() and (c <= total).all())


def test_sgd_and_assign_add_commute_across_threads():
    """Monolith's MultiThread test: assign_add(i, i) and an SGD step with g = -200 i and
    lr 0.01, from many threads in any order, give 3 i."""
    dim = 2
    lr = 0.01
    t = hash_table_from_config(generate_test_hash_table_config(dim, learning_rate=lr))
    ids = np.arange(1, 2001, dtype=np.int64)
    chunks = np.array_split(ids, 8)

    def adder(chunk):
        def fn():
            for i in chunk:  # one id per call, as in the C++ test
                t.assign_add([i], np.full((1, dim), i, dtype=np.float32))
        return fn

    def stepper(chunk):
        def fn():
            for part in np.array_split(chunk, 25):
                t.apply_gradients(part, np.repeat((-200.0 * part)[:, None], dim, axis=1).astype(np.float32),
                                  global_step=0)
        return fn

    run_threads([adder(c) for c in chunks] + [stepper(c) for c in chunks[::-1]])
    got = t.lookup(ids)
    i = ids.astype(np.float32)
    step = F32(lr) * (F32(-200) * i)
    add_first = (F32(0) + i) - step
    step_first = (F32(0) - step) + i
    ok = (got == add_first[:, None]) | (got == step_first[:, None])
    assert ok.all()
    np.testing.assert_allclose(got, np.repeat(3.0 * ids[:, None], dim, axis=1), rtol=1e-6)


def _adagrad_run(num_threads, use_multi_threads):
    mtht.set_num_threads(num_threads)
    assert mtht.get_num_threads() == num_threads
    segs = [SegmentDesc(3, init="ones", opt="adagrad", initial_accumulator_value=0.1, weight_decay_factor=0.01),
            SegmentDesc(9, opt="adagrad", initial_accumulator_value=1.0)]
    lrs = [0.05, 0.2]
    t = hash_table_from_config(make_config(segs, lrs))
    rng = np.random.default_rng(2024)
    pool = rng.integers(-(2**63), 2**63 - 1, size=3000, dtype=np.int64)
    for it in range(6):
        ids = pool[rng.integers(0, pool.size, size=12000)]  # about 4 occurrences per id
        grads = rng.standard_normal((ids.size, 12)).astype(np.float32)
        if it == 2:
            t.assign_add(ids, grads, req_time=it)
        else:
            t.apply_gradients(ids, grads, global_step=it, use_multi_threads=use_multi_threads,
                              enable_dedup=bool(it % 2), req_time=it)
    return t, pool, segs, lrs


def _state_of(t, ids):
    dumps = t.lookup_entry(ids)
    values = np.stack([d.values for d in dumps])
    norms = np.concatenate([np.stack([d.optimizer_state[k]["norm"] for d in dumps]) for k in range(2)], axis=1)
    ts = np.array([d.last_update_ts for d in dumps])
    return values, norms, ts


def test_results_do_not_depend_on_thread_count():
    runs = {}
    for n, multi in ((1, False), (2, True), (4, True), (2, False)):
        t, pool, segs, lrs = _adagrad_run(n, multi)
        runs[(n, multi)] = _state_of(t, pool)
    base = runs[(1, False)]
    for key, got in runs.items():
        for a, b in zip(got, base):
            assert a.tobytes() == b.tobytes(), f"num_threads={key} differs from single-threaded"

    # and the single-threaded result is the reference model's, exactly
    ref = ReferenceTable(segs)
    rng = np.random.default_rng(2024)
    pool = rng.integers(-(2**63), 2**63 - 1, size=3000, dtype=np.int64)
    for it in range(6):
        ids = pool[rng.integers(0, pool.size, size=12000)]
        grads = rng.standard_normal((ids.size, 12)).astype(np.float32)
        if it == 2:
            ref.assign_add(ids, grads, req_time=it)
        else:
            ref.apply_gradients(ids, grads, lrs, enable_dedup=bool(it % 2), req_time=it)
    want = ref.lookup_entry(pool)
    np.testing.assert_array_equal(base[0], np.stack([w.values for w in want]))
    np.testing.assert_array_equal(base[1], np.stack([np.concatenate([s["norm"] for s in w.state]) for w in want]))
    np.testing.assert_array_equal(base[2], [w.ts for w in want])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_the_default_thread_count_is_the_cores_the_process_may_run_on():
    # Bound to one core (taskset, a container's cpuset, an MPI launcher's binding), a
    # process that took all the machine's cores as its default ran two threads on one core.
    cores = sorted(os.sched_getaffinity(0))
    for allowed in ({cores[0]}, set(cores)):
        script = ("import os, sys; os.sched_setaffinity(0, {%s}); import mtht; print(mtht.get_num_threads())"
                  % ", ".join(map(str, allowed)))
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert int(out.stdout) == min(len(allowed), 64)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="control groups are Linux's")
def test_the_default_thread_count_is_at_most_the_cpus_of_a_cpu_limit():
    # A container's CPU limit (a control group's quota of CPU time) leaves the process all
    # the machine's cores in its affinity; threads beyond the limit ran in turns, stopped
    # for the rest of each period once they had used it (Adagrad steps of 16 threads under
    # a limit of one CPU on two cores: half the speed of one thread).
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: a limit of one CPU changes nothing")
    for cpus in (1, 0.5):
        quota = str(int(cpus * 100_000))
        with limited_group("cpu", {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": quota},
                           {"cpu.max": f"{quota} 100000"}) as group:
            script = ("import mtht, mtht.bench; print(mtht.get_num_threads(), mtht.build_info()['num_threads'], "
                      "mtht.bench.default_threads(), mtht.bench.machine_info()['cpu_limit'])")
            out = run_in(group, [sys.executable, "-c", script])
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["1", "1", "1", "1"]  # the benchmark's default too
    # A count named by MTHT_NUM_THREADS is taken as it is.
    with limited_group("cpu", {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "100000"},
                       {"cpu.max": "100000 100000"}) as group:
        out = run_in(group, [sys.executable, "-c", "import mtht; print(mtht.get_num_threads())"],
                     env={**os.environ, "MTHT_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2"]


def _threads_in_a_process(value, *argv_before):
    env = {k: v for k, v in os.environ.items() if k != "MTHT_NUM_THREADS"}
    if value is not None:
        env["MTHT_NUM_THREADS"] = value
    script = "import mtht, mtht.bench; print(mtht.get_num_threads(), mtht.bench.default_threads())"
    return subprocess.run([*argv_before, sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env)


def test_the_thread_count_variable_sets_the_default():
    # MTHT_NUM_THREADS sets the default for processes a launcher starts (one thread a rank,
    # say) without a change to the trainer's code; beyond the cores too, as set_num_threads.
    unset = _threads_in_a_process(None)
    assert unset.returncode == 0, unset.stderr
    detected = int(unset.stdout.split()[0])
    assert unset.stdout.split() == [str(detected)] * 2 and 1 <= detected <= 64
    for value, want in (("1", 1), ("3", 3), ("0017", 17), ("", detected)):
        out = _threads_in_a_process(value)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [str(want)] * 2


@pytest.mark.parametrize("value", ["0", "1025", "-1", "abc", " 2", "+2", "2 ", "2.0", "\uff12", "9" * 20])
def test_a_bad_thread_count_variable_is_refused_at_import(value):
    out = _threads_in_a_process(value)
    assert out.returncode != 0
    assert f"ValueError: MTHT_NUM_THREADS={value!r} must be a whole number from 1 to 1024" in out.stderr


def test_set_num_threads_validation():
    mtht.set_num_threads(3)
    # A count meant as something else would start threads until the system has none left.
    for bad in (0, -1, 1025, 10**6, 2**40):
        with pytest.raises(ValueError, match="from 1 to 1024"):
            mtht.set_num_threads(bad)
    for bad in (1.9, "3", True, None):
        with pytest.raises(TypeError):
            mtht.set_num_threads(bad)
    assert mtht.get_num_threads() == 3
    mtht.set_num_threads(np.int64(2))
    assert mtht.get_num_threads() == 2


_NO_THREADS_TO_GIVE = r"""
import resource
import numpy as np
import mtht
from mtht.testing import generate_test_hash_table_config

t = mtht.hash_table_from_config(generate_test_hash_table_config(4))
# Address space for no more thread stacks: the helpers cannot start.
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 4 * 2**20, resource.RLIM_INFINITY))
t.assign(np.arange(10), np.ones((10, 4), np.float32))  # the first call builds the pool
assert mtht.get_num_threads() == 1, mtht.get_num_threads()
try:
    mtht.set_num_threads(2)
    raise AssertionError("set_num_threads(2) did not raise")
except RuntimeError as e:
    assert "could not start the threads for num_threads = 2" in str(e) and "go on with 1" in str(e), str(e)
assert mtht.get_num_threads() == 1
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
mtht.set_num_threads(2)
t.assign(np.arange(10_000), np.ones((10_000, 4), np.float32))
assert mtht.get_num_threads() == 2 and (t.lookup(np.arange(10_000)) == 1).all()
print("ok")
"""


def test_a_pool_whose_threads_cannot_start_runs_calls_on_the_calling_thread():
    # When the first call could not start the helpers, every call raised and
    # get_num_threads() aborted the interpreter. In a child, which owns its address space.
    import subprocess
    proc = subprocess.run([sys.executable, "-c", _NO_THREADS_TO_GIVE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stdout, proc.stderr[-2000:])


def test_set_num_threads_while_other_threads_write():
    t = hash_table_from_config(generate_test_hash_table_config(2))
    ids = np.arange(8000, dtype=np.int64)

    def writer():
        for _ in range(15):
            t.assign_add(ids, np.ones((ids.size, 2), dtype=np.float32))

    def switcher():
        for k in range(30):
            mtht.set_num_threads(1 + k % 4)

    run_threads([writer, writer, switcher])
    np.testing.assert_array_equal(t.lookup(ids), np.full((ids.size, 2), 30.0))


def test_large_table():
    n, dim = 1_000_000, 8
    t = hash_table_from_config(generate_test_hash_table_config(dim, learning_rate=1.0))
    k = np.arange(n, dtype=np.uint64)
    ids = (k * np.uint64(0x9E3779B97F4A7C15) + np.uint64(12345)).view(np.int64)  # distinct, spread over int64
    values = (np.arange(n * dim, dtype=np.int64).reshape(n, dim)).astype(np.float32)  # exact below 2**24
    t.assign(ids, values, req_time=3)
    del values
    assert t.size() == n
    perm = np.random.default_rng(0).permutation(n)
    got = t.lookup(ids[perm])
    want = perm[:, None].astype(np.int64) * dim + np.arange(dim)
    np.testing.assert_array_equal(got, want.astype(np.float32))
    del got
    t.apply_gradients(ids[perm], np.ones((n, dim), dtype=np.float32), global_step=0, enable_dedup=True)
    got = t.lookup(ids)
    np.testing.assert_array_equal(got, (np.arange(n * dim).reshape(n, dim) - 1).astype(np.float32))
    del got
    missing = ids[:100000] + 1
    missing = missing[~np.isin(missing, ids)]
    assert missing.size > 99000
    assert not t.contains(missing).any()
    assert (t.lookup(missing) == 0).all()
    assert t.size() == n
    st = t.stats()
    assert st["size"] == n
    assert st["bytes"] < 512 * 2**20


def _sgd_table():
    seg = mtht.CombineAsSegment(8, mtht.ZerosInitializer(), mtht.SgdOptimizer(), None)
    return mtht.hash_table_from_config(mtht.HashTableConfigInstance(
        mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[seg])), [0.1]))


def _wait_for_child(pid: int, hung: str) -> int:
    """The exit status of child ``pid``; the test fails with ``hung`` after a minute."""
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail(hung)
        time.sleep(0.01)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_while_another_thread_allocates_does_not_deadlock_the_child():
    # Mid-size arrays and the memory of batch plans come from process-wide pools behind
    # locks, held across fork so that a child never inherits one locked. The window is a few
    # microseconds, so this rarely lands in it; it checks that children forked while another
    # thread builds tables can build and fill their own (a hang fails at the deadline).
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            t = _sgd_table()
            t.assign(np.arange(200_000), np.ones((200_000, 8), np.float32))
            del t

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(10):
            pid = os.fork()
            if pid == 0:  # the child: build a table with pooled arrays, then leave at once
                t = _sgd_table()
                t.assign(np.arange(200_000), np.ones((200_000, 8), np.float32))
                os._exit(0 if t.size() == 200_000 else 3)
            status = _wait_for_child(pid, "the forked child hung building a table")
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        stop.set()
        worker.join()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("parent", ["lookup", "apply_gradients", "save"])
@pytest.mark.parametrize("child", ["lookup", "apply_gradients", "save"])
def test_a_child_forked_while_a_thread_is_inside_a_call_uses_that_table(tmp_path, parent, child):
    # Another thread is inside a call on the table when the process forks: the fork waits
    # for it, so the child inherits none of the locks the call held, and its own call on
    # the same table returns (it hung: the locks stayed held in the child).
    n = 200_000
    t = _sgd_table()
    ids = np.arange(n)
    rows = np.ones((n, 8), np.float32)
    t.assign(ids, rows)
    calls = {"lookup": lambda base: t.lookup(ids),
             "apply_gradients": lambda base: t.apply_gradients(ids, rows, global_step=1),
             "save": lambda base: t.save(str(base))}
    stop = threading.Event()
    busy = threading.Thread(target=lambda: [calls[parent](tmp_path / "p") for _ in iter(stop.is_set, True)])
    busy.start()
    try:
        for k in range(3):
            time.sleep(0.05)
            pid = os.fork()
            if pid == 0:
                calls[child](tmp_path / f"c{k}")
                os._exit(0 if t.size() == n else 3)
            status = _wait_for_child(pid, f"the child's {child} hung after a fork during the parent's {parent}")
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        stop.set()
        busy.join()


FORK_WHILE_A_WRITE_WAITS_FOR_A_SAVE = """
import os, tempfile, threading, time
import numpy as np
import mtht.checkpoint as checkpoint
from mtht.hash_table import hash_table_from_config
from mtht.testing import generate_test_hash_table_config
t = hash_table_from_config(generate_test_hash_table_config(4))
t.assign(np.arange(10), np.ones((10, 4), np.float32))
original, saving = checkpoint._write_generation, threading.Event()
def slow(*args, **kwargs):
    saving.set()
    time.sleep(0.5)
    return original(*args, **kwargs)
checkpoint._write_generation = slow
directory = tempfile.mkdtemp()
saver = threading.Thread(target=lambda: t.save(directory + "/t"))
saver.start()
saving.wait()
writer = threading.Thread(target=lambda: t.assign([1], np.zeros((1, 4), np.float32)))
writer.start()
time.sleep(0.1)  # the write waits for the save
pid = os.fork()
if pid == 0:
    checkpoint._write_generation = original
    t.assign([2], np.zeros((1, 4), np.float32))
    t.save(directory + "/child")
    os._exit(0)
_, status = os.waitpid(pid, 0)
saver.join()
writer.join()
print("ok" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else "the child failed")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_fork_while_a_write_waits_for_a_save():
    # A save holds the write gate between its calls; a write of another thread waits for it.
    # A fork then neither waits for the waiting write (whose thread held the fork gate, and
    # the save needs the forking thread's interpreter lock to give the gate back: the parent
    # hung) nor leaves the gate held in the child, which writes and saves.
    import subprocess
    out = subprocess.run([sys.executable, "-c", FORK_WHILE_A_WRITE_WAITS_FOR_A_SAVE], capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == "ok", (out.returncode, out.stderr[-2000:])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_during_a_restore_uses_the_model():
    # The lock a model's restore holds while it swaps its tables' contents (and that a
    # multi-slot call takes to pick them up) is new in a forked child.
    import mtht.hash_table as hash_table_module
    from mtht.multi_type_hash_table import MultiTypeHashTable
    model = MultiTypeHashTable({"a": generate_test_hash_table_config(2), "b": generate_test_hash_table_config(2)},
                               lambda slot, c: hash_table_from_config(c, name_suffix=slot))
    with hash_table_module._CONTENTS:  # as a restore's swap holds it
        pid = os.fork()
        if pid == 0:
            code = 0 if model.lookup({"a": [1], "b": [1]})["a"].shape == (1, 2) else 3
            os._exit(code)
    status = _wait_for_child(pid, "the child's lookup hung on the lock a restore held at the fork")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("child", ["exit", "write", "threads"])
def test_a_forked_child_uses_the_table_and_exits(restore_num_threads, child):
    # The parent's helper threads do not exist in a child: its calls, its set_num_threads and
    # its exit (which destroys the pool) must not wait for them.
    mtht.set_num_threads(2)
    t = _sgd_table()
    t.assign(np.arange(200_000), np.ones((200_000, 8), np.float32))  # the helper has worked
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if child == "threads":  # helpers of the child's own
                mtht.set_num_threads(2)
            if child != "exit":
                t.assign_add(np.arange(200_000), np.ones((200_000, 8), np.float32))
                code = 0 if (t.lookup(np.arange(200_000)) == 2).all() else 3
        except BaseException:
            code = 4
        ctypes.CDLL(None).exit(code)  # C's exit, not os._exit: the C++ statics are destroyed
    status = _wait_for_child(pid, "the forked child hung")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
