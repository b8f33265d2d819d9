"""Tables sharded over MPI processes: mpi_worker.py's scenarios run under ``mpiexec -n 2``
and ``-n 4`` (each rank checks itself against one process's table given every rank's
batch in rank order), and the pieces that run in one process."""

import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import mtht
import mtht.feature_eviction
from mtht import sharded_checkpoint
from mtht.distributed import _Routed, _Scratch, owner_of
from mtht.multi_type_hash_table import MultiTypeHashTable

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi_worker.py")


def mpiexec() -> str:
    found = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    assert os.path.exists(found), "mpiexec not found: pip install 'mtht[mpi]'"
    return found


def run_ranks(n: int, scenario: str, directory, seed: int = 0) -> None:
    # Each rank one thread: four ranks share this machine's cores.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([mpiexec(), "-n", str(n), sys.executable, WORKER, scenario, str(seed), str(directory)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"{scenario} on {n} ranks failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert f"{scenario}: ok on {n} ranks" in done.stdout


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("scenario", ["train", "merged", "sgd_numpy", "errors", "hooks", "built_differently",
                                      "edges", "hook_errors", "wrapper_errors", "separate_directories",
                                      "interrupts", "lock_edges", "out_of_step", "let_go"])
def test_ranks_equal_one_process(ranks, scenario, tmp_path):
    for seed in (1, 2):
        run_ranks(ranks, scenario, tmp_path, seed)


def documented_program() -> str:
    """The ```python mpi block of docs/distributed.md (run here under mpiexec; test_docs runs
    the pages' plain python blocks in one process)."""
    page = os.path.join(os.path.dirname(WORKER), os.pardir, "docs", "distributed.md")
    if not os.path.exists(page):
        pytest.skip("no docs directory beside the tests (e.g. tests run from an installed sdist)")
    with open(page, encoding="utf-8") as f:
        found = re.search(r"^```python mpi\n(.*?)^```", f.read(), re.MULTILINE | re.DOTALL)
    assert found, "docs/distributed.md has no ```python mpi block"
    return found.group(1)


def test_a_restore_beside_another_jobs_saves_reads_one_whole_save(tmp_path):
    # An evaluation job restoring from the directory a training job saves into: the saving
    # job holds the directory's lock for each save, the restoring one shares it for each
    # restore, and its ranks read sharded.json once its rank 0 holds it.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    saver = subprocess.Popen([mpiexec(), "-n", "2", sys.executable, WORKER, "save_again_and_again", "0",
                              str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        run_ranks(2, "restore_beside_saves", tmp_path)
    finally:
        (tmp_path / "stop").touch()
        out, err = saver.communicate(timeout=300)
    assert saver.returncode == 0 and "save_again_and_again: ok" in out, err[-4000:]


_DIRECT_CALLS_BESIDE_PUSHES = """
import sys, threading
import numpy as np
import mtht
from mtht.distributed import DistributedMultiTypeHashTable
from mtht.testing import generate_test_hash_table_config

dist = DistributedMultiTypeHashTable({s: generate_test_hash_table_config(4) for s in "ab"},
                                     lambda s, c: mtht.hash_table_from_config(c, name_suffix=s))
push = mtht.AsyncPush(dist)
def direct_calls():
    for i in range(200):
        dist.size() if sys.argv[1] == "size" else dist.assign({"b": ([i], np.ones((1, 4), np.float32))})
thread = threading.Thread(target=direct_calls)
thread.start()
for i in range(2000):
    push.assign({"a": ([i], np.ones((1, 4), np.float32))})
thread.join()
push.end()
assert dist.size() == 2000 + (200 if sys.argv[1] == "assign" else 0)
print("done")
"""


@pytest.mark.parametrize("call", ["size", "assign"])
def test_direct_calls_of_another_thread_beside_pushes_do_not_wait_inside_their_turn(call):
    # A direct call waits for the queued calls, then holds the table's turn; the calls it
    # makes on the local tables inside must not wait again for a push queued meanwhile,
    # whose own call waits for that turn. (They did: the process hung every time.)
    done = subprocess.run([sys.executable, "-c", _DIRECT_CALLS_BESIDE_PUSHES, call], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-3000:]


_HOLD_THE_LOCK = """
import os, sys, time
from mtht.checkpoint import directory_lock
directory, exclusive = sys.argv[1], sys.argv[2] == "exclusive"
with directory_lock(directory, exclusive):
    open(os.path.join(directory, "held"), "w").close()
    while not os.path.exists(os.path.join(directory, "go")):
        time.sleep(0.01)
    open(os.path.join(directory, "released"), "w").close()
"""


@pytest.mark.parametrize("theirs, mine, waits", [("exclusive", True, True), ("exclusive", False, True),
                                                 ("shared", True, True), ("shared", False, False)])
def test_a_directory_lock_waits_for_the_other_processes_holders(tmp_path, theirs, mine, waits):
    # Two saves exclude each other and a save and a restore do; restores share the lock.
    with mtht.checkpoint.directory_lock(tmp_path, True):  # as a save makes its file
        pass
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_THE_LOCK, str(tmp_path), theirs])
    try:
        while not (tmp_path / "held").exists():
            assert holder.poll() is None, "the holder ended before it held the lock"
            time.sleep(0.01)
        if not waits:
            with mtht.checkpoint.directory_lock(tmp_path, mine):
                assert not (tmp_path / "released").exists()  # taken beside the holder's
            (tmp_path / "go").touch()
        else:
            threading.Timer(0.3, (tmp_path / "go").touch).start()
            with mtht.checkpoint.directory_lock(tmp_path, mine):
                assert (tmp_path / "released").exists()  # taken only once the holder let go
    finally:
        (tmp_path / "go").touch()
        holder.wait(timeout=60)
    assert sorted(os.listdir(tmp_path)) == [".mtht-lock", "go", "held", "released"]


def test_pushes_queued_at_exit_are_applied_on_every_rank(tmp_path):
    done = subprocess.run([mpiexec(), "-n", "2", sys.executable, WORKER, "exit_with_pushes", "0", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "exit_with_pushes: ok" in done.stdout, done.stderr[-4000:]
    assert "Invalid communicator" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-4000:]


def test_a_feature_evictor_needs_a_table_with_evict():
    with pytest.raises(TypeError, match="evict"):
        mtht.feature_eviction.FeatureEvictor(make_model(), 60)


@pytest.mark.parametrize("ranks", [2, 4])
def test_documented_program_runs(ranks, tmp_path):
    program = tmp_path / "train.py"
    program.write_text(documented_program())
    done = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, str(program)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-6000:]


def make_model():
    sys.path.insert(0, os.path.dirname(WORKER))
    try:
        import mpi_worker
    finally:
        sys.path.pop(0)
    return MultiTypeHashTable(mpi_worker.slot_to_config(), mpi_worker.factory)


@pytest.mark.parametrize("saved_by", [2, 4])
def test_checkpoints_restore_and_reshard(saved_by, tmp_path):
    """A save of one world size restores there, is refused by another, and rewritten by
    reshard for 1, 3 and 4 ranks restores each id on its owner with all its state."""
    run_ranks(saved_by, "checkpoint", tmp_path, seed=saved_by)
    other = 4 if saved_by == 2 else 2
    run_ranks(other, "wrong_world", tmp_path)
    for world in (1, 3, other):
        sharded_checkpoint.reshard(tmp_path / "sharded", tmp_path / f"resharded-{world}", world, make_model)
        body, parts = sharded_checkpoint.saved_parts(tmp_path / f"resharded-{world}", world)
        assert body["world_size"] == world and all(os.path.isdir(p) for p in parts)
        run_ranks(world, "restore_resharded", tmp_path)
    # Its part directories 0 and 1 swapped (a copy gone wrong): refused, not restored as
    # tables whose every id is on a rank that does not own it.
    shutil.copytree(tmp_path / "sharded", tmp_path / "swapped")
    (_, parts) = sharded_checkpoint.saved_parts(tmp_path / "swapped")
    os.rename(parts[0], parts[0] + ".x")
    os.rename(parts[1], parts[0])
    os.rename(parts[0] + ".x", parts[1])
    run_ranks(saved_by, "swapped_parts", tmp_path)


def test_reshard_keeps_admission_counts(tmp_path):
    """Counts of ids not yet admitted go to their new owner: one more occurrence there
    admits an id seen threshold times before the reshard."""
    ids = np.arange(-6, 6, dtype=np.int64)
    parts = [make_model(), make_model()]
    for rank, model in enumerate(parts):
        mine = ids[owner_of(ids, 2) == rank]
        for _ in range(3):  # threshold 3: counted, not admitted
            model.apply_gradients({"filtered": (mine, np.ones((mine.size, 2), np.float32))}, 1)
        assert not model._tables["filtered"].contains(mine).any()
    save_parts(tmp_path / "two", parts)
    sharded_checkpoint.reshard(tmp_path / "two", tmp_path / "three", 3, make_model)
    _, parts = sharded_checkpoint.saved_parts(tmp_path / "three", 3)
    for rank, part in enumerate(parts):
        model = make_model()
        mtht.checkpoint.restore_multi_type(model, part)
        mine = ids[owner_of(ids, 3) == rank]
        model.apply_gradients({"filtered": (mine, np.ones((mine.size, 2), np.float32))}, 1)
        assert model._tables["filtered"].contains(mine).all()
        assert model._tables["filtered"].size() == mine.size


def save_parts(directory, parts):
    """A sharded save in ``directory`` of the models ``parts`` (one per rank)."""
    generation = sharded_checkpoint.begin_save(directory)
    for rank, model in enumerate(parts):
        mtht.checkpoint.save_multi_type(model, sharded_checkpoint.part_directory(directory, generation, rank,
                                                                                 len(parts)))
    sharded_checkpoint.commit_save(directory, generation, len(parts), sorted(parts[0]._tables))


def expiring_model():
    segment = mtht.CombineAsSegment(2, mtht.ZerosInitializer(), mtht.SgdOptimizer(), mtht.Fp32Compressor())
    table = mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[segment]),
                                          slot_expire_time_config=mtht.SlotExpireTimeConfig(default_expire_time=1))
    return MultiTypeHashTable({"a": mtht.HashTableConfigInstance(table, [1.0])},
                              lambda slot, cfg: mtht.hash_table_from_config(cfg, name_suffix=slot))


def test_reshard_keeps_every_entry_saved(tmp_path):
    """Parts whose clocks differ (saved by another build, or written apart): every entry a
    part holds is rewritten, although the new part's clock, the latest, would expire it."""
    day = 86400
    parts = [expiring_model(), expiring_model()]
    parts[0].assign({"a": (np.array([0, 2, 4]), np.ones((3, 2), np.float32))}, req_time=1000)
    parts[1].assign({"a": (np.array([1, 3]), np.ones((2, 2), np.float32))}, req_time=1000 + 2 * day)
    save_parts(tmp_path / "two", parts)
    for world in (1, 2):
        sharded_checkpoint.reshard(tmp_path / "two", tmp_path / f"to{world}", world, expiring_model)
        _, new_parts = sharded_checkpoint.saved_parts(tmp_path / f"to{world}", world)
        held = []
        for part in new_parts:
            model = expiring_model()
            mtht.checkpoint.restore_multi_type(model, part)
            held += [int(i) for i in np.arange(5) if model._tables["a"].contains([i])[0]]
            assert model._tables["a"]._core.max_update_ts == 1000 + 2 * day
        assert sorted(held) == [0, 1, 2, 3, 4]


def test_reshard_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sharded checkpoint"):
        sharded_checkpoint.reshard(tmp_path / "none", tmp_path / "out", 2, make_model)
    assert not (tmp_path / "out").exists() and not (tmp_path / "none").exists()  # made nothing
    with pytest.raises(ValueError, match="target other than the source"):
        sharded_checkpoint.reshard(tmp_path / "x", tmp_path / "x", 2, make_model)
    with pytest.raises(ValueError, match="world_size"):
        sharded_checkpoint.reshard(tmp_path / "x", tmp_path / "y", 0, make_model)
    # A target that is the source under another name (a link to it).
    save_parts(tmp_path / "src", [expiring_model(), expiring_model()])
    os.symlink(tmp_path / "src", tmp_path / "alias")
    with pytest.raises(ValueError, match="target other than the source"):
        sharded_checkpoint.reshard(tmp_path / "src", tmp_path / "alias", 3, expiring_model)
    assert sharded_checkpoint.read_sharded_manifest(tmp_path / "src")["world_size"] == 2
    sharded_checkpoint.reshard(tmp_path / "src", tmp_path / "out", 3, expiring_model)
    assert ".mtht-lock" not in os.listdir(tmp_path / "src")  # the source is only read
    # A model without one of the tables saved: the new save would lack it.
    def two_tables():
        model = expiring_model()
        return MultiTypeHashTable({"a": model._tables["a"].config, "b": model._tables["a"].config},
                                  lambda slot, cfg: mtht.hash_table_from_config(cfg, name_suffix=slot))
    save_parts(tmp_path / "ab", [two_tables(), two_tables()])
    with pytest.raises(ValueError, match=r"holds tables \['b'\] that make_model\(\) does not build"):
        sharded_checkpoint.reshard(tmp_path / "ab", tmp_path / "a-only", 3, expiring_model)
    assert sharded_checkpoint.current_generation(tmp_path / "a-only") is None  # nothing named
    sharded_checkpoint.reshard(tmp_path / "ab", tmp_path / "a-and-b", 3, two_tables)


def test_a_save_beside_a_damaged_manifest_removes_no_generation(tmp_path):
    """A sharded.json that cannot be read: the next save keeps every generation on disk (one
    of them may be the only copy), and removes the temporaries killed saves left."""
    save_parts(tmp_path, [expiring_model(), expiring_model()])
    manifest = tmp_path / sharded_checkpoint.SHARDED_FILE
    manifest.write_bytes(manifest.read_bytes().replace(b'"world_size": 2', b'"world_size": 3'))
    (tmp_path / "sharded.json.tmp-12-0123abcd").write_text("left by a killed save")
    (tmp_path / "sharded.json.tmp-keep").write_text("not a temporary of ours")
    with pytest.raises(mtht.CheckpointError):
        sharded_checkpoint.read_sharded_manifest(tmp_path)
    assert sharded_checkpoint.begin_save(tmp_path) == 2
    assert sorted(os.listdir(tmp_path)) == ["g000001", "sharded.json", "sharded.json.tmp-keep"]


def test_owner_is_the_non_negative_modulo():
    ids = np.array([-7, -1, 0, 1, 7, 2 ** 63 - 1, -2 ** 63], dtype=np.int64)
    assert owner_of(ids, 4).tolist() == [1, 3, 0, 1, 3, 3, 0]
    assert owner_of(np.array([2 ** 64 - 1], dtype=np.uint64), 4).tolist() == [3]  # the bits of -1


def _routed(ids_per_table, dedup, dims):
    """A _Routed of the given tables' ids, with buffers of its own."""
    return _Routed(ids_per_table, 2, dedup, _Scratch(), dims, with_rows=True)


def test_routed_sums_each_ids_rows_in_the_order_given():
    """A rank sends each id once with its rows summed left to right from the first
    occurrence's (float32), grouped by owner, in the order of first occurrence."""
    ids = np.array([5, -3, 5, 2, 5, -3], dtype=np.int64)
    rows = np.array([[1e8], [1.0], [1.0], [2.0], [-1e8], [-0.0]], dtype=np.float32)
    routed = _routed([ids], [True], [1])
    assert routed.sent(0).tolist() == [2, 5, -3] and routed.counts.tolist() == [[1], [2]]
    summed, finite = routed.rows_sent(0, rows)
    assert finite
    # 5: (1e8 + 1) + -1e8 in float32 is 0 (1 is lost), not 1; -3: 1 + -0 is 1.
    assert summed[:, 0].tolist() == [2.0, 0.0, 1.0]
    assert routed.sent(0)[routed.position(0)].tolist() == ids.tolist()
    plain = _routed([ids], [False], [1])
    assert plain.sent(0).tolist() == [2, 5, -3, 5, 5, -3]
    assert plain.rows_sent(0, rows)[0][:, 0].tolist()[:2] == [2.0, 1e8]
    # A sum past the float range is reported (the rank then sends the rows as given).
    huge = np.full((6, 1), 3e38, np.float32)
    assert not routed.rows_sent(0, huge)[1] and plain.rows_sent(0, huge)[1]
    routed.send_each_occurrence(0)
    assert routed.sent(0).tolist() == plain.sent(0).tolist() and routed.counts.tolist() == [[1], [5]]
    assert routed.rows_sent(0, huge)[1]


def test_routed_tables_each_as_if_alone():
    """The tables of one call are routed in one call of the core: each table's sent ids,
    counts, positions and summed rows are those of the table routed on its own, empty
    tables and tables sent as given among them."""
    rng = np.random.default_rng(5)
    for _ in range(50):
        k = int(rng.integers(1, 6))
        ids = [rng.integers(-30, 30, int(rng.integers(0, 40))) for _ in range(k)]
        dedup = [bool(rng.integers(0, 2)) for _ in range(k)]
        dims = [int(rng.integers(1, 4)) for _ in range(k)]
        together = _routed(ids, dedup, dims)
        assert together.counts.shape == (2, k)
        for t in range(k):
            alone = _routed([ids[t]], [dedup[t]], [dims[t]])
            assert together.sent(t).tolist() == alone.sent(0).tolist()
            assert together.counts[:, t].tolist() == alone.counts[:, 0].tolist()
            assert together.position(t).tolist() == alone.position(0).tolist()
            rows = rng.standard_normal((len(ids[t]), dims[t])).astype(np.float32)
            assert np.array_equal(together.rows_sent(t, rows)[0], alone.rows_sent(0, rows)[0])


def test_routing_kernels_refuse_what_would_read_out_of_bounds():
    from mtht import _core

    ids = np.arange(8, dtype=np.int64)
    shared = np.empty(8, np.int64)
    with pytest.raises(ValueError, match="must not share memory"):
        _core.route_ids(ids, 2, True, shared, shared)
    with pytest.raises(ValueError, match="must not share memory"):
        _core.route_tables([ids[:4], ids[4:]], 2, [True, True], shared, shared)
    with pytest.raises(ValueError, match="must not share memory"):
        _core.route_tables([ids], 2, [True], ids, np.empty(8, np.int64))
    with pytest.raises(ValueError, match="room for 8 ids"):
        _core.route_tables([ids], 2, [True], np.empty(7, np.int64), np.empty(8, np.int64))
    with pytest.raises(ValueError, match="one flag per table"):
        _core.route_tables([ids], 2, [True, False], np.empty(8, np.int64), np.empty(8, np.int64))
    with pytest.raises(ValueError, match="world size"):
        _core.route_tables([ids], 0, [True], np.empty(8, np.int64), np.empty(8, np.int64))
    with pytest.raises(ValueError, match="must not share memory"):
        _core.route_ids(ids, 2, True, ids, np.empty(8, np.int64))
    one = np.empty(16, np.int64)
    with pytest.raises(ValueError, match="must not share memory"):  # half over each other
        _core.route_ids(ids, 2, True, one[:8], one[4:12])
    sent, _, position = _core.route_ids(ids, 2, True, one[:8], one[8:])  # side by side: apart
    assert sorted(sent.tolist()) == ids.tolist() and sorted(position.tolist()) == list(range(8))
    _, counts, position = _core.route_ids(ids, 2, True)
    flat = np.zeros(10, np.float32)

    def gather(starts, dim=1, positions=position, outs=None):
        starts, per_owner = np.array([starts], np.int64), counts.reshape(1, -1)
        outs = [np.empty((len(positions), dim), np.float32)] if outs is None else outs
        _core.gather_tables(flat, starts, per_owner, [positions], outs)
        return outs[0]

    assert gather([2, 6])[:, 0].tolist() == [0.0] * 8  # within the buffer: gathered
    with pytest.raises(ValueError, match="out of range"):  # rows before the buffer
        gather([-1, 4])
    with pytest.raises(ValueError, match="out of range"):  # rows past its end
        gather([0, 4], dim=2)
    with pytest.raises(ValueError, match="out of range"):  # a position past the rows
        gather([0, 4], positions=np.full(8, 8, np.int64))
    with pytest.raises(ValueError, match="8 rows"):  # an output of the wrong length
        gather([0, 4], outs=[np.empty((7, 1), np.float32)])
    with pytest.raises(ValueError, match="must not share memory"):  # rows gathered over themselves
        gather([0, 4], outs=[flat[:8].reshape(8, 1)])
    rows = np.ones((8, 2), np.float32)
    with pytest.raises(ValueError, match="must not share memory"):
        _core.sum_rows(rows, position, 8, rows)
    with pytest.raises(ValueError, match="out of range"):
        _core.sum_rows(rows, np.full(8, -1, np.int64), 8)
    table = make_model()._tables["sgd"]
    space = np.zeros(16, np.int64)  # ids in the first half, the output over the second
    with pytest.raises(ValueError, match="must not share memory"):
        _core.fused_lookup([table._core], space[:8], np.array([8], np.int32), 1, space[4:].view(np.float32)[:8])
