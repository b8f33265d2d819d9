"""Tables sharded over MPI processes: mpi_worker.py's scenarios run under ``mpiexec -n 2``
and ``-n 4`` (each rank checks itself against one process's table given every rank's
batch in rank order), and the pieces that run in one process."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mtht
from mtht import sharded_checkpoint
from mtht.distributed import _Routed, owner_of
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
@pytest.mark.parametrize("scenario", ["train", "merged", "sgd_numpy", "errors", "hooks"])
def test_ranks_equal_one_process(ranks, scenario, tmp_path):
    for seed in (1, 2):
        run_ranks(ranks, scenario, tmp_path, seed)


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


def test_reshard_keeps_admission_counts(tmp_path):
    """Counts of ids not yet admitted go to their new owner: one more occurrence there
    admits an id seen threshold times before the reshard."""
    saved = tmp_path / "two"
    generation = sharded_checkpoint.begin_save(saved)
    ids = np.arange(-6, 6, dtype=np.int64)
    for rank in range(2):
        model = make_model()
        mine = ids[owner_of(ids, 2) == rank]
        for _ in range(3):  # threshold 3: counted, not admitted
            model.apply_gradients({"filtered": (mine, np.ones((mine.size, 2), np.float32))}, 1)
        assert not model._tables["filtered"].contains(mine).any()
        mtht.checkpoint.save_multi_type(model, sharded_checkpoint.part_directory(saved, generation, rank, 2))
    sharded_checkpoint.commit_save(saved, generation, 2, ["filtered"])
    sharded_checkpoint.reshard(saved, tmp_path / "three", 3, make_model)
    _, parts = sharded_checkpoint.saved_parts(tmp_path / "three", 3)
    for rank, part in enumerate(parts):
        model = make_model()
        mtht.checkpoint.restore_multi_type(model, part)
        mine = ids[owner_of(ids, 3) == rank]
        model.apply_gradients({"filtered": (mine, np.ones((mine.size, 2), np.float32))}, 1)
        assert model._tables["filtered"].contains(mine).all()
        assert model._tables["filtered"].size() == mine.size


def test_reshard_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sharded checkpoint"):
        sharded_checkpoint.reshard(tmp_path / "none", tmp_path / "out", 2, make_model)
    with pytest.raises(ValueError, match="target other than the source"):
        sharded_checkpoint.reshard(tmp_path / "x", tmp_path / "x", 2, make_model)
    with pytest.raises(ValueError, match="world_size"):
        sharded_checkpoint.reshard(tmp_path / "x", tmp_path / "y", 0, make_model)


def test_owner_is_the_non_negative_modulo():
    ids = np.array([-7, -1, 0, 1, 7, 2 ** 63 - 1, -2 ** 63], dtype=np.int64)
    assert owner_of(ids, 4).tolist() == [1, 3, 0, 1, 3, 3, 0]
    assert owner_of(np.array([2 ** 64 - 1], dtype=np.uint64), 4).tolist() == [3]  # the bits of -1


def test_routed_sums_each_ids_rows_in_the_order_given():
    """A rank sends each id once with its rows summed left to right from the first
    occurrence's (float32), grouped by owner in the order of the ids."""
    ids = np.array([5, -3, 5, 2, 5, -3], dtype=np.int64)
    rows = np.array([[1e8], [1.0], [1.0], [2.0], [-1e8], [-0.0]], dtype=np.float32)
    routed = _Routed(ids, 2, dedup=True)
    assert routed.sent.tolist() == [2, -3, 5] and routed.counts.tolist() == [1, 2]
    summed = routed.rows_sent(rows)
    # 5: (1e8 + 1) + -1e8 in float32 is 0 (1 is lost), not 1; -3: 1 + -0 is 1.
    assert summed[:, 0].tolist() == [2.0, 1.0, 0.0]
    assert routed.sent[routed.position].tolist() == ids.tolist()
    plain = _Routed(ids, 2, dedup=False)
    assert plain.sent.tolist() == [2, 5, -3, 5, 5, -3] and plain.rows_sent(rows)[:, 0].tolist()[:2] == [2.0, 1e8]
