"""Stateful property test: random sequences of table operations against the reference model.

Values are compared for exact float32 equality: the library and the reference model do the
same float32 operations in the same order (no FMA contraction), so any difference is a bug.
"""

import os
import sys

import numpy as np
import hypothesis.extra.numpy as hnp
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mtht.hash_table import hash_table_from_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_model import ReferenceTable, SegmentDesc, make_config  # noqa: E402
from stateful import state_machine_settings  # noqa: E402

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
SPECIAL_IDS = [0, 1, -1, INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1, 2**32, -(2**32)]

segment_strategy = st.builds(
    SegmentDesc,
    dim=st.sampled_from([1, 1, 2, 3, 4, 5, 8, 9, 16, 17]),
    init=st.sampled_from(["zeros", "ones", "constants"]),
    constant=st.sampled_from([0.0, -0.5, 0.3, 2.0]),
    opt=st.sampled_from(["sgd", "adagrad"]),
    initial_accumulator_value=st.sampled_from([0.1, 1.0, 0.01, 2.5]),
    weight_decay_factor=st.sampled_from([0.0, 0.0, 0.1, 0.001, 1.5]),
)

finite_f32 = st.one_of(
    st.floats(-8, 8, width=32, allow_subnormal=False),
    st.sampled_from([0.0, 1.0, -1.0, 0.5, -0.25, 3.0]),
)

req_times = st.one_of(st.none(), st.integers(-5, 2**40), st.sampled_from([0, 1, 100]))


def available_kernels():
    """Every optimizer kernel set this build can run here (MTHT_KERNEL values)."""
    from mtht import _core

    names = getattr(_core, "available_kernels", lambda: [])()
    return sorted(set(names)) or ["auto"]


def as_ids(ids):
    return np.array(ids, dtype=np.int64)


class TableMachine(RuleBasedStateMachine):
    """Drives one HashTable and one ReferenceTable with the same calls."""

    @initialize(
        segments=st.lists(segment_strategy, min_size=1, max_size=2),
        lrs=st.lists(st.sampled_from([1.0, 0.1, 0.5, 0.01, 0.003, 2.0]), min_size=2, max_size=2),
        pool_extra=st.lists(st.integers(INT64_MIN, INT64_MAX), min_size=0, max_size=4),
        kernel=st.sampled_from(available_kernels()),
    )
    def setup(self, segments, lrs, pool_extra, kernel):
        self.segments = segments
        self.lrs = np.array(lrs[:len(segments)], dtype=np.float32)
        saved = os.environ.get("MTHT_KERNEL")
        os.environ["MTHT_KERNEL"] = kernel  # read when a table is built
        try:
            self.table = hash_table_from_config(make_config(segments, list(self.lrs)))
        finally:
            if saved is None:
                del os.environ["MTHT_KERNEL"]
            else:
                os.environ["MTHT_KERNEL"] = saved
        self.ref = ReferenceTable(segments)
        self.dim = self.ref.dim
        self.pool = list(range(8)) + SPECIAL_IDS[2:5] + pool_extra
        self.touched = set()
        self.grown = 0

    # -- strategies that depend on the state ------------------------------------------
    def draw_ids(self, data, max_size=24):
        one_id = st.one_of(
            st.sampled_from(self.pool), st.sampled_from(self.pool), st.sampled_from(self.pool),
            st.sampled_from(SPECIAL_IDS), st.integers(INT64_MIN, INT64_MAX),
        )
        return data.draw(st.lists(one_id, min_size=0, max_size=max_size), label="ids")

    def draw_rows(self, data, n, label):
        rows = data.draw(hnp.arrays(np.float32, (n, self.dim), elements=finite_f32), label=label)
        return rows

    def _record(self, ids):
        self.touched.update(int(i) for i in ids)

    # -- rules -------------------------------------------------------------------------
    @rule(data=st.data())
    def lookup(self, data):
        ids = self.draw_ids(data)
        size = self.table.size()
        got = self.table.lookup(as_ids(ids))
        np.testing.assert_array_equal(got, self.ref.lookup(ids))
        assert self.table.size() == size  # lookups never insert

    @rule(data=st.data(), req_time=req_times)
    def assign(self, data, req_time):
        ids = self.draw_ids(data)
        rows = self.draw_rows(data, len(ids), "values")
        self.table.assign(as_ids(ids), rows, req_time=req_time)
        self.ref.assign(ids, rows, req_time=req_time)
        self._record(ids)

    @rule(data=st.data(), req_time=req_times)
    def assign_add(self, data, req_time):
        ids = self.draw_ids(data)
        rows = self.draw_rows(data, len(ids), "values")
        self.table.assign_add(as_ids(ids), rows, req_time=req_time)
        self.ref.assign_add(ids, rows, req_time=req_time)
        self._record(ids)

    @rule(data=st.data(), dedup=st.booleans(), req_time=req_times, step=st.integers(0, 10**6))
    def apply_gradients(self, data, dedup, req_time, step):
        ids = self.draw_ids(data)
        grads = self.draw_rows(data, len(ids), "grads")
        self.table.apply_gradients(as_ids(ids), grads, global_step=step, enable_dedup=dedup, req_time=req_time)
        self.ref.apply_gradients(ids, grads, self.lrs, enable_dedup=dedup, req_time=req_time)
        self._record(ids)

    @rule(data=st.data(), req_time=st.integers(0, 2**40))
    def reinitialize(self, data, req_time):
        ids = self.draw_ids(data, max_size=8)
        status = self.table.reinitialize(as_ids(ids), req_time=req_time)
        want = self.ref.reinitialize(ids, req_time=req_time)
        np.testing.assert_array_equal(status, want)
        self._record(ids)

    @rule(data=st.data())
    def contains(self, data):
        ids = self.draw_ids(data)
        np.testing.assert_array_equal(self.table.contains(as_ids(ids)), self.ref.contains(ids))

    @precondition(lambda self: self.grown < 2)
    @rule(seed=st.integers(0, 2**32 - 1), n=st.sampled_from([300, 700, 2500, 5000]),
          op=st.sampled_from(["assign", "assign_add", "apply_gradients", "apply_gradients_dedup"]))
    def grow(self, seed, n, op):
        """A batch of mostly fresh random ids (with some repeats and pool ids), enough to
        make the index grow and, for the big ones, to take the multi-threaded path."""
        self.grown += 1
        event(f"grow {op} {n}")
        rng = np.random.default_rng(seed)
        ids = rng.integers(INT64_MIN, INT64_MAX, size=n, dtype=np.int64, endpoint=True)
        ids[rng.integers(0, n, size=n // 10)] = rng.choice(np.array(self.pool, dtype=np.int64), size=n // 10)
        ids[: n // 20] = ids[n // 20: n // 10]  # repeats inside the batch
        rows = (rng.standard_normal((n, self.dim)) * 2).astype(np.float32)
        if op == "assign":
            self.table.assign(ids, rows, req_time=n)
            self.ref.assign(ids, rows, req_time=n)
        elif op == "assign_add":
            self.table.assign_add(ids, rows, req_time=n)
            self.ref.assign_add(ids, rows, req_time=n)
        else:
            dedup = op.endswith("dedup")
            self.table.apply_gradients(ids, rows, global_step=0, enable_dedup=dedup, req_time=n)
            self.ref.apply_gradients(ids, rows, self.lrs, enable_dedup=dedup, req_time=n)
        self.touched.update(ids[:50].tolist())
        self.compare_all()

    @rule()
    def compare_all(self):
        ids = np.array(list(self.ref.entries), dtype=np.int64)
        np.testing.assert_array_equal(self.table.lookup(ids), self.ref.lookup(ids))
        assert bool(self.table.contains(ids).all())
        self._compare_entries(ids)

    # -- invariants --------------------------------------------------------------------
    def _compare_entries(self, ids):
        """lookup_entry of ``ids`` equals the reference, compared array-wise."""
        ids = [int(i) for i in ids]
        dumps = self.table.lookup_entry(as_ids(ids))
        assert len(dumps) == len(ids)
        wants = [self.ref.entries.get(i) for i in ids]
        present = [w is not None for w in wants]
        assert [d is not None for d in dumps] == present, "present/absent ids differ"
        got = [d for d in dumps if d is not None]
        want = [w for w in wants if w is not None]
        if not want:
            return
        assert [d.id for d in got] == [i for i, p in zip(ids, present) if p]
        np.testing.assert_array_equal(np.stack([d.values for d in got]), np.stack([w.values for w in want]),
                                      err_msg="values")
        np.testing.assert_array_equal([d.last_update_ts for d in got], [w.ts for w in want], err_msg="timestamps")
        for k, seg in enumerate(self.segments):
            names = {"sgd": set(), "adagrad": {"norm"}}[seg.opt]
            assert all(set(d.optimizer_state[k]) == names for d in got)
            assert all(len(d.optimizer_state) == len(self.segments) for d in got)
            for name in names:
                np.testing.assert_array_equal(np.stack([d.optimizer_state[k][name] for d in got]),
                                              np.stack([w.state[k][name] for w in want]),
                                              err_msg=f"{name} of segment {k}")

    @invariant()
    def same_size_and_max_ts(self):
        if not hasattr(self, "table"):
            return
        assert self.table.size() == self.ref.size() == len(self.table)
        assert self.table.max_update_ts == self.ref.max_update_ts

    @invariant()
    def pool_and_touched_entries_agree(self):
        if not hasattr(self, "table"):
            return
        ids = sorted(set(self.pool) | set(SPECIAL_IDS) | set(list(self.touched)[-200:]))
        self._compare_entries(ids)


TableMachine.TestCase.settings = state_machine_settings(30)
test_table_matches_reference = TableMachine.TestCase
