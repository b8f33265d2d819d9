"""Tests of the single-table API (mtht.hash_table.HashTable).

The first part ports the numbers Monolith's own tests pin; the rest covers input forms,
error handling (a bad call raises and changes nothing), lookup_entry, deterministic random
initialisation, reinitialize and the small accessors.
"""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mtht
from mtht import entry, learning_rate_functions
from mtht.hash_table import EntryDump, HashTable, hash_table_from_config
from mtht.testing import generate_test_hash_table_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_model import ReferenceTable, SegmentDesc, make_config  # noqa: E402
from observed import entry_rows  # noqa: E402
from producers import DLPackOnly  # noqa: E402
from layouts import empty_at_odd_address, laid_out  # noqa: E402

F32 = np.float32
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def sgd_table(dim, learning_rate=1.0):
    return hash_table_from_config(generate_test_hash_table_config(dim, learning_rate=learning_rate))


def table_of(segments, learning_rates, **kwargs):
    return hash_table_from_config(make_config(segments, learning_rates, **kwargs))


def snapshot(table, ids):
    """Everything observable about ``ids`` in ``table``, in a comparable form."""
    return table.size(), table.max_update_ts, entry_rows(table, ids)


def assert_matches_reference(table, ref, ids):
    ids = np.asarray(ids, dtype=np.int64)
    np.testing.assert_array_equal(table.lookup(ids), ref.lookup(ids))
    for dump, want in zip(table.lookup_entry(ids), ref.lookup_entry(ids)):
        if want is None:
            assert dump is None
            continue
        assert dump is not None
        np.testing.assert_array_equal(dump.values, want.values)
        assert dump.last_update_ts == want.ts
        assert len(dump.optimizer_state) == len(want.state)
        for got_seg, want_seg in zip(dump.optimizer_state, want.state):
            assert set(got_seg) == set(want_seg)
            for name in want_seg:
                np.testing.assert_array_equal(got_seg[name], want_seg[name])
    assert table.size() == ref.size()


# ----------------------------------------------------------------------------------------
# 1. Numbers pinned by Monolith's tests
# ----------------------------------------------------------------------------------------

def test_basic():
    t = sgd_table(1)
    t = t.assign_add(np.array([0, 1], dtype=np.int64), np.ones([2, 1], dtype=np.float32))
    np.testing.assert_array_equal(t.lookup(np.array([0, 1, 2], dtype=np.int64)), [[1], [1], [0]])
    assert t.size() == 2


def test_assign():
    t = sgd_table(1)
    t = t.assign([0, 1], np.ones([2, 1], dtype=np.float32))
    t = t.assign([1], [[5.0]])
    np.testing.assert_array_equal(t.lookup([0, 1, 2]), [[1], [5], [0]])


def test_lookup_entry_values():
    t = sgd_table(1)
    t.assign([0, 1, 2], np.array([[0.1], [0.2], [0.3]], dtype=np.float32))
    dumps = t.lookup_entry([0, 1, 2, 3])
    assert [d.values.tolist() for d in dumps[:3]] == [[F32(0.1)], [F32(0.2)], [F32(0.3)]]
    assert dumps[3] is None
    assert all(d.optimizer_state == [{}] for d in dumps[:3])
    assert all(d.last_update_ts == 0 for d in dumps[:3])


def test_gradients():
    t = sgd_table(1, learning_rate=0.1)
    ids = np.array([0, 0, 1], dtype=np.int64)
    emb = t.lookup(ids)
    np.testing.assert_array_equal(emb, np.zeros((3, 1)))
    t = t.apply_gradients(ids, -np.ones_like(emb), global_step=0)
    np.testing.assert_allclose(t.lookup([0, 1]), [[0.2], [0.1]], rtol=1e-6)


def test_gradients_with_dedup():
    t = sgd_table(10, learning_rate=0.1)
    ids = np.array([0, 1, 0, 1, 0], dtype=np.int64)
    t = t.apply_gradients(ids, -np.ones((5, 10), dtype=np.float32), global_step=0, enable_dedup=True)
    got = t.lookup([0, 1])
    np.testing.assert_allclose(got[0], np.full(10, 0.3), rtol=1e-6)
    np.testing.assert_allclose(got[1], np.full(10, 0.2), rtol=1e-6)
    # one step of the summed gradient, exactly: 0 - 0.1f * (-3)
    assert got[0, 0] == F32(0) - F32(0.1) * F32(-3)


def test_gradients_with_different_ids():
    t = sgd_table(1, learning_rate=0.1)
    emb = t.lookup(np.array([0, 0, 1], dtype=np.int64))
    t = t.apply_gradients(np.array([1, 0, 1], dtype=np.int64), -np.ones_like(emb), global_step=0)
    np.testing.assert_allclose(t.lookup([0, 1]), [[0.1], [0.2]], rtol=1e-6)


def test_gradients_with_learning_rate_function():
    t = sgd_table(1, learning_rate=lambda: 0.1)
    t = t.apply_gradients([0, 0, 1], -np.ones((3, 1), dtype=np.float32), global_step=0)
    np.testing.assert_allclose(t.lookup([0, 1]), [[0.2], [0.1]], rtol=1e-6)


def test_gradients_with_learning_rate_decay():
    fn = learning_rate_functions.PolynomialDecay(initial_learning_rate=0.01, decay_steps=10,
                                                 end_learning_rate=0.11)
    t = sgd_table(1, learning_rate=fn)
    t = t.apply_gradients([0, 0, 1], -np.ones((3, 1), dtype=np.float32), global_step=1)
    np.testing.assert_allclose(t.lookup([0, 1]), [[0.04], [0.02]], rtol=1e-6)


def test_sgd_cpp_number():
    t = sgd_table(1, learning_rate=0.1)
    t.apply_gradients([7], [[1.0]], global_step=0)
    assert t.lookup([7])[0, 0] == F32(0) - F32(0.1) * F32(1)
    np.testing.assert_allclose(t.lookup([7]), [[-0.1]], rtol=1e-7)


def test_scalar_gradient_on_one_id_of_dim_one():
    for grad in (2.0, np.float32(2.0), np.array(2.0), np.array(2, dtype=np.int32)):
        t = sgd_table(1)
        t.apply_gradients(np.array([0], dtype=np.int64), grad, global_step=0)
        np.testing.assert_array_equal(t.lookup([0]), [[-2.0]])


def test_adagrad_pinned(kernel):
    seg = SegmentDesc(2, opt="adagrad", initial_accumulator_value=1.0)
    t = table_of([seg], [0.1])
    t.apply_gradients([0], [[1.0, 2.0]], global_step=0)
    np.testing.assert_allclose(t.lookup([0])[0], [-0.07071067, -0.08944272], rtol=1e-6)
    np.testing.assert_allclose(t.lookup_entry([0])[0].optimizer_state[0]["norm"], [2.0, 5.0], rtol=0)


def test_adagrad_weight_decay_pinned(kernel):
    seg = SegmentDesc(2, opt="adagrad", initial_accumulator_value=1.0, weight_decay_factor=0.1)
    t = table_of([seg], [0.1])
    ref = ReferenceTable([seg])
    for _ in range(2):
        t.apply_gradients([0], [[1.0, 2.0]], global_step=0)
        ref.apply_gradients([0], [[1.0, 2.0]], [0.1])
    np.testing.assert_allclose(t.lookup([0])[0], [-0.128173, -0.155943], rtol=0, atol=1e-6)
    assert_matches_reference(t, ref, [0])


def available_kernels():
    from mtht import _core

    names = getattr(_core, "available_kernels", lambda: [])()
    return sorted(set(names)) or ["auto"]


@pytest.fixture(params=available_kernels())
def kernel(request, monkeypatch):
    """Build the tables of a test with each optimizer kernel set this machine can run."""
    monkeypatch.setenv("MTHT_KERNEL", request.param)
    return request.param


def test_adagrad_weight_decay_same_rule_for_every_dim(kernel):
    # The SIMD-width part of a row must follow the scalar rule too (no raw-g update).
    seg = SegmentDesc(19, opt="adagrad", initial_accumulator_value=1.0, weight_decay_factor=0.1)
    t = table_of([seg], [0.1])
    ref = ReferenceTable([seg])
    g = np.tile(np.array([1.0, 2.0], dtype=F32), 10)[:19][None, :]
    for _ in range(3):
        t.apply_gradients([0], g, global_step=0)
        ref.apply_gradients([0], g, [0.1])
    got = t.lookup([0])[0]
    np.testing.assert_allclose(got[0::2], np.full(10, got[0]), rtol=0)
    np.testing.assert_allclose(got[1::2], np.full(9, got[1]), rtol=0)
    assert_matches_reference(t, ref, [0])


def test_adagrad_accessor_pinned():
    seg = SegmentDesc(1, opt="adagrad", initial_accumulator_value=0.1)
    t = table_of([seg], [1.0])
    t.apply_gradients([3], [[1.0]], global_step=0)
    np.testing.assert_allclose(t.lookup([3]), [[-0.95346254]], rtol=1e-6)


def test_combined_adagrad_segments_pinned(kernel):
    segs = [SegmentDesc(1, opt="adagrad", initial_accumulator_value=1.0),
            SegmentDesc(2, opt="adagrad", initial_accumulator_value=2.0)]
    t = table_of(segs, [1.0, 2.0])
    t.apply_gradients([0], [[1.0, 2.0, 3.0]], global_step=0)
    np.testing.assert_allclose(t.lookup([0])[0], [-0.70710677, -1.6329931, -1.8090681], rtol=1e-6)
    ref = ReferenceTable(segs)
    ref.apply_gradients([0], [[1.0, 2.0, 3.0]], [1.0, 2.0])
    assert_matches_reference(t, ref, [0])


def test_combined_sgd_segments_pinned():
    segs = [SegmentDesc(1), SegmentDesc(2)]
    t = table_of(segs, [1.0, 2.0])
    t.apply_gradients([0], [[1.0, 2.0, 3.0]], global_step=0)
    np.testing.assert_array_equal(t.lookup([0])[0], [-1.0, -4.0, -6.0])


def test_pinned_numbers_match_reference_exactly(kernel):
    cases = [
        ([SegmentDesc(2, opt="adagrad", initial_accumulator_value=1.0)], [0.1], [[1.0, 2.0]]),
        ([SegmentDesc(1, opt="adagrad", initial_accumulator_value=0.1)], [1.0], [[1.0]]),
        ([SegmentDesc(1), SegmentDesc(2)], [1.0, 2.0], [[1.0, 2.0, 3.0]]),
    ]
    for segs, lrs, g in cases:
        t = table_of(segs, lrs)
        ref = ReferenceTable(segs)
        t.apply_gradients([0], g, global_step=0)
        ref.apply_gradients([0], g, lrs)
        assert_matches_reference(t, ref, [0])


@pytest.mark.parametrize("dims", [(1, 3), (7, 8), (15, 16), (17, 31), (33,), (64, 5)])
def test_every_dim_matches_reference_exactly(kernel, dims):
    segs = [SegmentDesc(d, init=("ones", "constants")[k % 2], constant=-0.75, opt=("adagrad", "sgd")[k % 2],
                        initial_accumulator_value=0.2, weight_decay_factor=0.05) for k, d in enumerate(dims)]
    segs.append(SegmentDesc(dims[0], opt="adagrad", initial_accumulator_value=1.5, weight_decay_factor=0.0))
    lrs = [0.3, 0.07, 1.0][:len(segs)]
    t = table_of(segs, lrs)
    ref = ReferenceTable(segs)
    rng = np.random.default_rng(sum(dims))
    for it in range(6):
        ids = rng.integers(0, 40, size=120).astype(np.int64)
        g = (rng.standard_normal((ids.size, ref.dim)) * 3).astype(np.float32)
        if it == 3:
            t.assign_add(ids, g, req_time=it)
            ref.assign_add(ids, g, req_time=it)
        else:
            t.apply_gradients(ids, g, global_step=it, enable_dedup=bool(it % 2), req_time=it)
            ref.apply_gradients(ids, g, lrs, enable_dedup=bool(it % 2), req_time=it)
    assert_matches_reference(t, ref, np.arange(-1, 41))


def test_missing_id_is_created_then_stepped():
    seg = SegmentDesc(2, init="constants", constant=0.5, opt="sgd")
    t = table_of([seg], [0.5])
    t.apply_gradients([11], [[1.0, -1.0]], global_step=0)
    np.testing.assert_array_equal(t.lookup([11]), [[0.0, 1.0]])


def test_writes_return_the_same_table():
    t = sgd_table(2)
    assert t.assign([1], [[1.0, 2.0]]) is t
    assert t.assign_add([1], [[1.0, 2.0]]) is t
    assert t.apply_gradients([1], [[1.0, 2.0]], global_step=0) is t
    assert t.as_op() is t
    assert isinstance(t, HashTable) and isinstance(t, mtht.BaseHashTable)
    assert t.dim_size == 2
    assert isinstance(t.name, str)


def test_assign_keeps_state_and_initialises_new():
    seg = SegmentDesc(2, init="ones", opt="adagrad", initial_accumulator_value=0.5)
    t = table_of([seg], [0.1])
    ref = ReferenceTable([seg])
    t.apply_gradients([1], [[1.0, 1.0]], global_step=0)
    ref.apply_gradients([1], [[1.0, 1.0]], [0.1])
    t.assign([1, 2, 1], [[3, 3], [4, 4], [5, 5]], req_time=9)
    ref.assign([1, 2, 1], [[3, 3], [4, 4], [5, 5]], req_time=9)
    assert_matches_reference(t, ref, [1, 2, 3])
    np.testing.assert_array_equal(t.lookup([1, 2]), [[5, 5], [4, 4]])
    np.testing.assert_array_equal(t.lookup_entry([2])[0].optimizer_state[0]["norm"], [0.5, 0.5])
    assert t.lookup_entry([1])[0].optimizer_state[0]["norm"][0] > F32(0.5)


def test_assign_add_initialises_then_accumulates():
    seg = SegmentDesc(3, init="constants", constant=0.25)
    t = table_of([seg], [1.0])
    t.assign_add([5, 5, 6], [[1, 2, 3], [10, 20, 30], [1, 1, 1]])
    np.testing.assert_array_equal(t.lookup([5, 6, 7]), [[11.25, 22.25, 33.25], [1.25, 1.25, 1.25], [0, 0, 0]])


def test_apply_gradients_without_dedup_is_sequential_for_adagrad():
    seg = SegmentDesc(1, opt="adagrad", initial_accumulator_value=1.0)
    t1 = table_of([seg], [1.0])
    t2 = table_of([seg], [1.0])
    t1.apply_gradients([0, 0], [[1.0], [1.0]], global_step=0)
    t2.apply_gradients([0], [[1.0]], global_step=0)
    t2.apply_gradients([0], [[1.0]], global_step=0)
    np.testing.assert_array_equal(t1.lookup([0]), t2.lookup([0]))
    t3 = table_of([seg], [1.0])
    t3.apply_gradients([0, 0], [[1.0], [1.0]], global_step=0, enable_dedup=True)
    # dedup: one step with g = 2: -2/sqrt(5)
    np.testing.assert_allclose(t3.lookup([0]), [[-2 / np.sqrt(5)]], rtol=1e-6)
    assert t3.lookup([0])[0, 0] != t1.lookup([0])[0, 0]


def test_dedup_sums_left_to_right_in_float32():
    # (1e8 + 1) + (-1e8) is 0 in float32 summed left to right, 1 in exact arithmetic.
    t = sgd_table(1)
    t.apply_gradients([4, 4, 4], [[1e8], [1.0], [-1e8]], global_step=0, enable_dedup=True)
    ref = ReferenceTable([SegmentDesc(1)])
    ref.apply_gradients([4, 4, 4], [[1e8], [1.0], [-1e8]], [1.0], enable_dedup=True)
    assert_matches_reference(t, ref, [4])
    assert t.lookup([4])[0, 0] == F32(0)


# ----------------------------------------------------------------------------------------
# 2. Input forms
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                   np.uint32, np.uint64, np.intp, np.longlong])
def test_ids_of_every_integer_width(dtype):
    t = sgd_table(2)
    ids = np.array([0, 3, 100, 3], dtype=dtype)
    t.assign_add(ids, np.ones((4, 2), dtype=np.float32))
    np.testing.assert_array_equal(t.lookup(np.array([0, 3, 100, 4], dtype=np.int64)),
                                  [[1, 1], [2, 2], [1, 1], [0, 0]])
    np.testing.assert_array_equal(t.lookup(ids), [[1, 1], [2, 2], [1, 1], [2, 2]])
    np.testing.assert_array_equal(t.contains(ids), [True] * 4)


def test_negative_ids_of_small_widths():
    t = sgd_table(1)
    t.assign(np.array([-1, -128], dtype=np.int8), [[1.0], [2.0]])
    t.assign(np.array([-32768], dtype=np.int16), [[3.0]])
    np.testing.assert_array_equal(t.lookup(np.array([-1, -128, -32768], dtype=np.int64)), [[1], [2], [3]])


def test_unsigned_ids_are_not_sign_extended_below_64_bits():
    t = sgd_table(1)
    t.assign(np.array([255], dtype=np.uint8), [[1.0]])
    t.assign(np.array([2**32 - 1], dtype=np.uint32), [[2.0]])
    np.testing.assert_array_equal(t.lookup(np.array([255, 2**32 - 1, -1], dtype=np.int64)), [[1], [2], [0]])


def test_uint64_ids_are_reinterpreted_as_int64_bits():
    t = sgd_table(1)
    u = np.array([2**64 - 1, 2**63, 2**63 - 1, 5], dtype=np.uint64)
    t.assign(u, [[1.0], [2.0], [3.0], [4.0]])
    signed = np.array([-1, INT64_MIN, INT64_MAX, 5], dtype=np.int64)
    np.testing.assert_array_equal(t.lookup(signed), [[1], [2], [3], [4]])
    assert [d.id for d in t.lookup_entry(signed)] == [-1, INT64_MIN, INT64_MAX, 5]
    np.testing.assert_array_equal(t.lookup(u), [[1], [2], [3], [4]])
    # a Python list of big unsigned values goes the same way, mixed with small ones too
    # (for which NumPy alone would give float64), and NumPy int64 and uint64 scalars
    np.testing.assert_array_equal(t.lookup([2**64 - 1, 2**63]), [[1], [2]])
    np.testing.assert_array_equal(t.lookup([2**64 - 1, 5]), [[1], [4]])
    np.testing.assert_array_equal(t.lookup([np.int64(5), np.uint64(2**63)]), [[4], [2]])
    with pytest.raises(TypeError, match="position 1"):
        t.lookup([2**64 - 1, 5.0])


def test_non_native_byte_order_ids_and_values():
    t = sgd_table(1)
    t.assign(np.array([5, -7], dtype=">i8"), np.array([[1.0], [2.0]], dtype=">f4"))
    t.assign(np.array([6], dtype=">u8"), np.array([[3.0]], dtype=">f8"))
    t.assign(np.array([2**64 - 2], dtype=">u8"), [[4.0]])
    t.assign(np.array([8], dtype=">u4"), [[5.0]])
    np.testing.assert_array_equal(t.lookup([5, -7, 6, -2, 8]), [[1], [2], [3], [4], [5]])
    assert t.size() == 5
    np.testing.assert_array_equal(t.lookup(np.array([6, 2**64 - 2], dtype=">u8")), [[3], [4]])


def test_extreme_int64_ids():
    t = sgd_table(2)
    ids = np.array([INT64_MIN, INT64_MAX, -1, 0, 1], dtype=np.int64)
    vals = np.arange(10, dtype=np.float32).reshape(5, 2)
    t.assign(ids, vals)
    np.testing.assert_array_equal(t.lookup(ids), vals)
    assert t.size() == 5
    np.testing.assert_array_equal(t.contains(ids), [True] * 5)


def test_python_lists_and_tuples():
    t = sgd_table(2)
    t.assign([1, 2], [[1, 2], [3, 4]])
    t.assign_add((1,), ((1.5, 1.5),))
    t.apply_gradients([2], [[1, 1]], global_step=0)
    np.testing.assert_array_equal(t.lookup((1, 2)), [[2.5, 3.5], [2, 3]])


def test_value_dtypes_are_converted_to_float32():
    t = sgd_table(2)
    t.assign([1], np.array([[0.1, 0.2]], dtype=np.float64))
    t.assign([2], np.array([[3, 4]], dtype=np.int32))
    t.assign([3], np.array([[0.5, 0.25]], dtype=np.float16))
    np.testing.assert_array_equal(t.lookup([1, 2, 3]), np.array([[0.1, 0.2], [3, 4], [0.5, 0.25]], dtype=F32))


@pytest.mark.parametrize("allow_non_finite", [False, True])
def test_a_finite_value_past_float32s_range_is_refused_not_made_inf(allow_non_finite):
    config = generate_test_hash_table_config(2)
    config.table_config.allow_non_finite = allow_non_finite
    t = hash_table_from_config(config)
    t.assign([1], [[1.0, 2.0]])
    before = snapshot(t, [1, 2])
    for write in (lambda v: t.assign([1, 2], v), lambda v: t.assign_add([1, 2], v),
                  lambda v: t.apply_gradients([1, 2], v, global_step=1)):
        with pytest.raises(ValueError, match=r"past float32's range.*1e\+39"):
            write(np.array([[0.5, 0.5], [-1e39, 0.0]]))
    assert snapshot(t, [1, 2]) == before
    t.assign([2], np.array([[np.finfo(np.float32).max, -np.finfo(np.float32).max]], dtype=np.float64))
    np.testing.assert_array_equal(t.lookup([2]), [[np.finfo(F32).max, -np.finfo(F32).max]])


def test_non_contiguous_and_fortran_inputs():
    t = sgd_table(3)
    ids_full = np.array([10, -1, 11, -1, 12, -1], dtype=np.int64)
    ids = ids_full[::2]
    vals = np.asfortranarray(np.arange(9, dtype=np.float32).reshape(3, 3))
    t.assign(ids, vals)
    np.testing.assert_array_equal(t.lookup([10, 11, 12]), np.arange(9).reshape(3, 3))
    big = np.arange(18, dtype=np.float32).reshape(3, 6)
    t.assign_add(ids, big[:, ::2])
    np.testing.assert_array_equal(t.lookup([10, 11, 12]), np.arange(9).reshape(3, 3) + big[:, ::2])
    assert t.size() == 3


def _unaligned(a):
    u = laid_out(a, a.dtype, offset=1)
    assert not u.flags.aligned
    return u


def test_unaligned_inputs_and_out(kernel):
    segs = [SegmentDesc(16, opt="adagrad", weight_decay_factor=0.1), SegmentDesc(3)]
    t = table_of(segs, [0.1, 0.5])
    ref = ReferenceTable(segs)
    ids = np.arange(100, dtype=np.int64) % 37
    g = np.random.default_rng(0).standard_normal((100, 19)).astype(np.float32)
    t.apply_gradients(_unaligned(ids), _unaligned(g), global_step=0)
    ref.apply_gradients(ids, g, [0.1, 0.5])
    t.assign_add(_unaligned(ids), _unaligned(g))
    ref.assign_add(ids, g)
    out = _unaligned(np.zeros((100, 19), dtype=np.float32))
    t.lookup(_unaligned(ids), out=out)
    np.testing.assert_array_equal(out, ref.lookup(ids))
    assert_matches_reference(t, ref, np.arange(40))
    # The core reads ids and rows and writes rows through typed pointers: what it is given is
    # aligned (a load from an odd address is undefined behaviour, which a sanitizer reports),
    # and the binding refuses anything else.
    from mtht._arrays import as_ids, as_rows
    assert as_ids(_unaligned(ids)).flags.aligned and as_rows(_unaligned(g), 100, 19, "g").flags.aligned
    with pytest.raises(ValueError, match="aligned"):
        t._core.lookup(ids, out)


def test_empty_arrays_at_odd_addresses_are_empty_calls():
    # Every call with them does what it does with ordinary empty arrays (the binding's read
    # of a lookup's or a write's arrays refused them as unaligned).
    def run(empty):
        t = table_of([SegmentDesc(3, opt="adagrad")], [0.1])
        t.assign([1, 2], np.ones((2, 3), F32), req_time=5)
        twin = table_of([SegmentDesc(3, opt="adagrad")], [0.1])
        ids, rows = empty((0,), np.int64), empty((0, 3), np.float32)
        got = [t.lookup(ids), t.lookup(ids, out=empty((0, 3), np.float32)), t.contains(ids),
               t.lookup_entry(ids), t.reinitialize(ids), t.export_serving(ids)]
        t.assign(ids, rows, req_time=9)
        t.assign_add(ids, rows, req_time=9)
        for dedup in (False, True):
            t.apply_gradients(ids, rows, global_step=3, enable_dedup=dedup, req_time=9)
        got += mtht.hash_table.lookup_all([t, twin], [ids, ids])
        counts = np.zeros(2, np.int32)
        got += list(mtht.hash_table.fused_lookup([t, twin], ids, counts, 1))
        mtht.hash_table.fused_apply_gradient([t, twin], ids, ids, counts, empty((0,), np.float32), [0, 0, 0],
                                             [0, 0, 0], [0.1, 0.1], 9, 3, 1)
        return got, snapshot(t, [1, 2]), len(twin)

    (got, state, twin_size), (want, want_state, want_twin_size) = run(empty_at_odd_address), run(np.empty)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert type(g) is type(w)
        if isinstance(w, np.ndarray):
            assert g.dtype == w.dtype and g.shape == w.shape and np.array_equal(g, w)
    assert state == want_state and state[0] == 2 and twin_size == want_twin_size == 0


@given(n=st.integers(0, 6), dim=st.integers(1, 3), id_dtype=st.sampled_from(
           ["<i8", ">i8", "<i4", ">i2", "i1", "<u8", ">u8", "<u4", "u1"]),
       row_dtype=st.sampled_from(["<f4", ">f4", "<f2", "<f8", ">f8", "<i4"]),
       offsets=st.tuples(st.integers(0, 9), st.integers(0, 9), st.integers(0, 9)),
       steps=st.tuples(st.integers(1, 3), st.integers(1, 3)), fortran=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=150, deadline=None)
def test_any_layout_of_ids_and_rows_reads_as_its_values(n, dim, id_dtype, row_dtype, offsets, steps, fortran, seed):
    # Whatever the type, byte order, address, stride or order of an array, a table reads the
    # numbers it holds: the same as from a plain int64 or float32 copy of them.
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 100, n)  # fit every id type
    rows = rng.integers(-20, 20, (n, dim)).astype(F32)  # exact in every row type
    odd_ids = laid_out(ids, id_dtype, offsets[0], steps[0], False)
    odd_rows = laid_out(rows, row_dtype, offsets[1], steps[1], fortran)
    odd_table, plain_table = sgd_table(dim), sgd_table(dim)
    for table, i, r in ((odd_table, odd_ids, odd_rows), (plain_table, ids, rows)):
        table.assign(i, r)
        table.assign_add(i, r)
        table.apply_gradients(i, r, global_step=1, enable_dedup=bool(seed % 2))
    out = laid_out(np.zeros((n, dim), F32), F32, offsets[2], 1, False)  # at any address
    assert odd_table.lookup(odd_ids, out=out) is out
    np.testing.assert_array_equal(out, plain_table.lookup(ids))
    everything = np.arange(100)
    np.testing.assert_array_equal(odd_table.lookup(everything), plain_table.lookup(everything))
    assert odd_table.size() == plain_table.size() == np.unique(ids).size


def test_object_arrays_of_python_ints():
    t = sgd_table(1)
    t.assign(np.array([1, 2**64 - 1, -5, 2**63], dtype=object), [[1.0], [2.0], [3.0], [4.0]])
    np.testing.assert_array_equal(t.lookup([1, -1, -5, INT64_MIN]), [[1], [2], [3], [4]])


def test_read_only_inputs():
    t = sgd_table(2)
    ids = np.array([1, 2], dtype=np.int64)
    vals = np.array([[1, 2], [3, 4]], dtype=np.float32)
    ids.flags.writeable = False
    vals.flags.writeable = False
    t.assign(ids, vals)
    t.assign_add(ids, vals)
    t.apply_gradients(ids, vals, global_step=0)
    assert t.reinitialize(ids, req_time=0).tolist() == [1, 1]
    t.assign(ids, vals)
    np.testing.assert_array_equal(t.lookup(ids), vals)
    np.testing.assert_array_equal(t.contains(ids), [True, True])
    assert len(t.lookup_entry(ids)) == 2
    # a read-only broadcast view (stride 0) is read-only and non-contiguous
    bids = np.broadcast_to(np.array([7], dtype=np.int64), (3,))
    t.assign_add(bids, np.broadcast_to(np.ones(2, dtype=np.float32), (3, 2)))
    np.testing.assert_array_equal(t.lookup([7]), [[3, 3]])


def test_lookup_out():
    t = sgd_table(2)
    t.assign([1, 2], [[1, 2], [3, 4]])
    out = np.full((3, 2), 99, dtype=np.float32)
    got = t.lookup([2, 1, 5], out=out)
    assert got is out
    np.testing.assert_array_equal(out, [[3, 4], [1, 2], [0, 0]])
    empty = np.empty((0, 2), dtype=np.float32)
    assert t.lookup([], out=empty) is empty


@pytest.mark.parametrize("make_out", [
    lambda: np.zeros((3, 2), dtype=np.float64),
    lambda: np.zeros((3, 2), dtype=np.float16),
    lambda: np.zeros((2, 3), dtype=np.float32),
    lambda: np.zeros((3, 3), dtype=np.float32),
    lambda: np.zeros((4, 2), dtype=np.float32),
    lambda: np.zeros(6, dtype=np.float32),
    lambda: np.zeros((3, 2, 1), dtype=np.float32),
    lambda: np.zeros((3, 4), dtype=np.float32)[:, ::2],
    lambda: np.asfortranarray(np.zeros((3, 2), dtype=np.float32)),
    lambda: [[0.0, 0.0]] * 3,
], ids=["f64", "f16", "transposed", "wide", "long", "flat", "3d", "strided", "fortran", "list"])
def test_lookup_wrong_out(make_out):
    t = sgd_table(2)
    t.assign([1, 2], [[1, 2], [3, 4]])
    before = snapshot(t, [1, 2, 5])
    out = make_out()
    with pytest.raises((TypeError, ValueError)):
        t.lookup([2, 1, 5], out=out)
    assert snapshot(t, [1, 2, 5]) == before


def test_lookup_read_only_out():
    t = sgd_table(2)
    out = np.zeros((1, 2), dtype=np.float32)
    out.flags.writeable = False
    with pytest.raises((TypeError, ValueError)):
        t.lookup([1], out=out)


@pytest.mark.parametrize("dim", [2, 4, 8])
def test_lookup_out_over_the_ids_buffer(dim):
    # The ids are stored in the memory of out itself: every id is read before its row is
    # written over it.
    rows = np.arange(300 * dim, dtype=np.float32).reshape(300, dim)
    t = sgd_table(dim)
    t.assign(np.arange(1, 301), rows)
    out = np.zeros((300, dim), dtype=np.float32)
    ids = out.reshape(-1).view(np.int64)[:300]
    ids[:] = np.arange(300, 0, -1)
    assert t.lookup(ids, out=out) is out
    np.testing.assert_array_equal(out, rows[::-1])


def test_table_arguments_of_the_wrong_kind():
    config = generate_test_hash_table_config(2)
    for bad in (None, config.table_config, {"dim": 2}):
        with pytest.raises(TypeError, match="HashTableConfigInstance"):
            hash_table_from_config(bad)
    with pytest.raises(TypeError, match="HashFilter"):
        hash_table_from_config(config, hash_filter="x")
    for bad in ("x", 1.5, True):
        with pytest.raises(TypeError, match="saver_parallel"):
            hash_table_from_config(config, saver_parallel=bad)
    with pytest.raises(ValueError, match="saver_parallel"):
        hash_table_from_config(config, saver_parallel=100_000)
    assert hash_table_from_config(config, saver_parallel=np.int64(3)).size() == 0


def test_the_builder_takes_monolith_s_arguments_in_monolith_s_order():
    # (config, hash_filter, name_suffix, sync_client, saver_parallel), as Monolith's.
    config = generate_test_hash_table_config(2)
    t = hash_table_from_config(config, None, "user", None, 3)
    assert t.name == "MonolithHashTable_user" and t._saver_parallel == 3
    with pytest.raises(NotImplementedError, match="sync_client"):
        hash_table_from_config(config, sync_client=object())


def test_a_call_switch_is_a_bool_and_nothing_read_by_its_truth():
    def adagrad():
        return table_of([SegmentDesc(2, opt="adagrad", initial_accumulator_value=1.0)], [1.0])

    table = adagrad()
    ids, grads = np.array([7, 7], np.int64), np.ones((2, 2), np.float32)
    for bad in ("no", "False", 2, 0.0, [True], np.array([True]), np.array(2)):
        for flag in ("enable_dedup", "use_multi_threads"):
            with pytest.raises(TypeError, match=flag):
                table.apply_gradients(ids, grads, global_step=1, **{flag: bad})
            with pytest.raises(TypeError, match=flag):
                table.lookup(ids, **{flag: bad})
        with pytest.raises(TypeError, match="enable_grad_accumulation"):
            mtht.hash_table.fused_apply_gradient(
                [table], ids, ids, [2], grads.ravel(), [0, 2], [0, 4], [1.0], None, 1, 1,
                enable_grad_accumulation=bad)
    assert table.size() == 0  # every refusal came before any change
    # 1 and numpy's True mean what True does: one Adagrad step of the summed gradient.
    one_step, two_steps = adagrad(), adagrad()
    one_step.apply_gradients(ids[:1], 2 * grads[:1], global_step=1)
    two_steps.apply_gradients(ids, grads, global_step=1)
    assert not np.array_equal(one_step.lookup(ids[:1]), two_steps.lookup(ids[:1]))
    for on, off in ((1, 0), (np.bool_(True), np.bool_(False)), (np.array(True), None), (np.array(1), np.array(0))):
        deduplicated, stepped = adagrad(), adagrad()
        deduplicated.apply_gradients(ids, grads, global_step=1, enable_dedup=on, use_multi_threads=off)
        stepped.apply_gradients(ids, grads, global_step=1, enable_dedup=off, use_multi_threads=on)
        np.testing.assert_array_equal(deduplicated.lookup(ids[:1]), one_step.lookup(ids[:1]))
        np.testing.assert_array_equal(stepped.lookup(ids[:1]), two_steps.lookup(ids[:1]))


def test_an_initial_capacity_past_the_machines_memory_is_refused():
    # Its index would be reserved at once and touched page by page by the inserts that
    # follow, until the process is killed: refused up front instead.
    config = generate_test_hash_table_config(2)
    config.table_config.initial_capacity = 2**50
    with pytest.raises(MemoryError, match="initial_capacity"):
        hash_table_from_config(config)
    config.table_config.initial_capacity = 1000
    assert hash_table_from_config(config).size() == 0


_FAILED_BUILDS = """
import resource, mtht
from mtht.testing import generate_test_hash_table_config
def vm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) // 1024
config = generate_test_hash_table_config(16)
config.table_config.initial_capacity = 6_000_000  # rows reserved: 768 MB
start = vm_mb()
resource.setrlimit(resource.RLIMIT_AS, ((start + 700) << 20, resource.RLIM_INFINITY))
failures = 0
for _ in range(5):
    try:
        mtht.hash_table_from_config(config)
    except MemoryError:
        failures += 1
print(failures, vm_mb() - start)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmSize from /proc")
def test_a_table_that_cannot_get_its_memory_gives_back_what_it_took():
    # Under an address-space limit, a table whose reservation does not fit raises
    # MemoryError, and what its constructor had reserved is freed (each failure kept about
    # 700 MB of address space).
    proc = subprocess.run([sys.executable, "-c", _FAILED_BUILDS], capture_output=True, text=True, timeout=120)
    failures, growth_mb = map(int, proc.stdout.split())
    assert failures == 5 and growth_mb < 100, proc.stdout + proc.stderr


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_tables_cannot_be_copied_or_pickled(how):
    # A copy would share the core's entries without saying so; refused with a clear error.
    import copy
    import pickle
    from mtht.multi_type_hash_table import MultiTypeHashTable
    t = sgd_table(2)
    multi = MultiTypeHashTable({"a": generate_test_hash_table_config(2)},
                               lambda slot, c: hash_table_from_config(c, name_suffix=slot))
    for obj in (t, multi):
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            {"copy": copy.copy, "deepcopy": copy.deepcopy, "pickle": pickle.dumps}[how](obj)


def test_dlpack_producers():
    t = sgd_table(2)
    ids = DLPackOnly(np.array([4, 5, 4], dtype=np.int64))
    vals = DLPackOnly(np.array([[1, 2], [3, 4], [5, 6]], dtype=np.float32))
    t.assign_add(ids, vals)
    np.testing.assert_array_equal(t.lookup(DLPackOnly(np.array([4, 5], dtype=np.int64))), [[6, 8], [3, 4]])
    t.apply_gradients(DLPackOnly(np.array([5], dtype=np.int32)),
                      DLPackOnly(np.array([[1, 1]], dtype=np.float64)), global_step=0)
    np.testing.assert_array_equal(t.lookup([5]), [[2, 3]])
    t.assign(ids, DLPackOnly(np.zeros((3, 2), dtype=np.float32)))
    np.testing.assert_array_equal(t.contains(DLPackOnly(np.array([4, 5, 6], dtype=np.int64))),
                                  [True, True, False])
    assert [d.id for d in t.lookup_entry(DLPackOnly(np.array([4], dtype=np.int64)))] == [4]


def test_step_and_time_as_0_d_tensors():
    # A framework's 0-d integer tensor (a JAX or torch step counter) is an integer step or
    # time; its bool or float tensors are not, and nothing changes then.
    t = sgd_table(1)
    t.assign([4], [[1.0]], req_time=DLPackOnly(np.array(7, dtype=np.int32)))
    t.apply_gradients([4], [[1.0]], global_step=DLPackOnly(np.array(3, dtype=np.int64)),
                      req_time=DLPackOnly(np.array(9, dtype=np.uint32)))
    (dump,) = t.lookup_entry([4])
    assert dump.last_update_ts == 9 and dump.values.tolist() == [0.0]
    for bad in (np.array(True), np.array(3.0), np.array([3])):
        with pytest.raises(TypeError):
            t.apply_gradients([4], [[1.0]], global_step=DLPackOnly(bad))
    assert t.lookup([4]).tolist() == [[0.0]]


@pytest.mark.skipif(np.lib.NumpyVersion(np.__version__) < "2.1.0",
                    reason="numpy before 2.1 cannot export a read-only array over DLPack")
def test_dlpack_read_only_producer():
    t = sgd_table(1)
    a = np.array([1, 2], dtype=np.int64)
    a.flags.writeable = False
    v = np.array([[1.0], [2.0]], dtype=np.float32)
    v.flags.writeable = False
    t.assign(DLPackOnly(a), DLPackOnly(v))
    np.testing.assert_array_equal(t.lookup([1, 2]), [[1], [2]])


def test_dlpack_bad_values_still_rejected():
    t = sgd_table(2)
    t.assign([1], [[1, 1]])
    before = snapshot(t, [1, 2])
    with pytest.raises(ValueError):
        t.assign(DLPackOnly(np.array([1, 2], dtype=np.int64)), DLPackOnly(np.zeros((2, 3), dtype=np.float32)))
    with pytest.raises((TypeError, ValueError)):
        t.assign(DLPackOnly(np.array([1.0, 2.0])), DLPackOnly(np.zeros((2, 2), dtype=np.float32)))
    assert snapshot(t, [1, 2]) == before


def test_bfloat16_and_float8_values_as_jax_gives_them():
    """JAX hands numpy arrays of ml_dtypes' bfloat16 (and float8): they convert to float32
    exactly, as values, gradients and fused gradients; a raw void dtype is refused."""
    ml_dtypes = pytest.importorskip("ml_dtypes")  # a test dependency: present in CI
    half = np.array([[1.5, -2.25], [3e38, 2.0**-133]], dtype=ml_dtypes.bfloat16)
    wide = half.astype(np.float32)
    t, u = sgd_table(2), sgd_table(2)
    t.assign([1, 2], half)
    u.assign([1, 2], wide)
    assert np.array_equal(t.lookup([1, 2]).view(np.uint32), u.lookup([1, 2]).view(np.uint32))
    t.apply_gradients([1], np.array([[0.5, 1.0]], dtype=ml_dtypes.float8_e4m3fn), global_step=0)
    u.apply_gradients([1], np.array([[0.5, 1.0]], dtype=np.float32), global_step=0)
    np.testing.assert_array_equal(t.lookup([1]), u.lookup([1]))
    before = snapshot(t, [1, 2])
    with pytest.raises(TypeError, match="must be numbers"):
        t.assign([1, 2], np.zeros((2, 2), dtype="V4"))
    assert snapshot(t, [1, 2]) == before


def test_torch_tensors():
    torch = pytest.importorskip("torch")
    t = sgd_table(2)
    ids = torch.tensor([3, 4, 3], dtype=torch.int64)
    vals = torch.tensor([[1, 2], [3, 4], [5, 6]], dtype=torch.float32)
    t.assign_add(ids, vals)
    np.testing.assert_array_equal(t.lookup(torch.tensor([3, 4], dtype=torch.int32)), [[6, 8], [3, 4]])
    t.apply_gradients(torch.tensor([4]), torch.ones(1, 2, dtype=torch.float64), global_step=torch.tensor(0).item())
    np.testing.assert_array_equal(t.lookup([4]), [[2, 3]])
    t.assign(ids[::2], vals[1:])
    np.testing.assert_array_equal(t.lookup([3]), [[5, 6]])
    w = torch.zeros(2, 2, requires_grad=True)
    t.assign(torch.tensor([8, 9]), w.detach())
    np.testing.assert_array_equal(t.lookup([8, 9]), np.zeros((2, 2)))
    with pytest.raises(ValueError):
        t.assign(torch.tensor([1, 2]), torch.zeros(2, 2).T.contiguous()[:, :1])


def test_torch_tensors_are_read_as_the_numbers_they_hold():
    # What DLPack alone would drop or refuse: a lazy negation (its export passes the memory
    # without the sign), a tensor that needs grad, bfloat16 (numpy has no such type), also
    # as the rows of a list. The same through a push, which copies what it queues.
    torch = pytest.importorskip("torch")
    negated = torch.tensor([[1 + 2j, 3 + 4j]]).conj().imag  # -2, -4, as a view with the negative bit
    assert negated.is_neg() and negated.tolist() == [[-2, -4]]
    needs_grad = torch.tensor([[0.5, -1.5]], requires_grad=True)
    bf16 = torch.tensor([[1.5, -0.25]], dtype=torch.bfloat16)  # exact in bfloat16
    direct, pushed = sgd_table(2), sgd_table(2)
    push = mtht.AsyncPush(pushed)
    for target in (direct, push):
        target.assign([1], negated)
        target.assign([2], needs_grad)
        target.assign([3], bf16)
        target.apply_gradients([4], negated, global_step=0)
        target.apply_gradients([5], needs_grad, global_step=0)
        target.apply_gradients([6], bf16, global_step=0)
        target.assign([7, 8, 9], [needs_grad[0], bf16[0], negated[0]])  # rows given as a list of tensors
    push.end()
    want = [[-2, -4], [0.5, -1.5], [1.5, -0.25], [2, 4], [-0.5, 1.5], [-1.5, 0.25], [0.5, -1.5], [1.5, -0.25],
            [-2, -4]]
    for t in (direct, pushed):
        np.testing.assert_array_equal(t.lookup(np.arange(1, 10)), want)
    assert needs_grad.grad is None and negated.is_neg()  # the caller's tensors as they were


def test_the_package_exports_its_public_names_only():
    import types
    assert len(mtht.__all__) == len(set(mtht.__all__))
    for name in mtht.__all__:
        assert not name.startswith("_") and not isinstance(getattr(mtht, name), types.ModuleType), name
    public = {n for n in dir(mtht) if not n.startswith("_") and not isinstance(getattr(mtht, n), types.ModuleType)}
    assert public == set(mtht.__all__)


def test_an_input_that_cannot_be_read_is_a_type_error_naming_it():
    class OnAnotherDevice:
        def __dlpack__(self, **kwargs):
            raise BufferError("the data is on a device the CPU cannot read")

        def __dlpack_device__(self):
            return (2, 0)

    t = sgd_table(2)
    with pytest.raises(TypeError, match="ids cannot be read as an array: the data is on a device"):
        t.lookup(OnAnotherDevice())
    with pytest.raises(TypeError, match="values cannot be read as an array"):
        t.assign([1], OnAnotherDevice())
    with pytest.raises(TypeError, match="grads cannot be read as an array"):
        t.apply_gradients([1], OnAnotherDevice(), global_step=0)
    assert t.size() == 0


class _CpuTensor:
    """A framework's CPU tensor: asarray reads its array; DLPack is each subclass's own."""

    def __init__(self, array):
        self._array = array

    def __dlpack_device__(self):
        return (1, 0)

    def __array__(self, dtype=None, copy=None):
        return self._array


class _TensorOfStrings(_CpuTensor):
    """As TensorFlow's string tensors: a DLPack export of one ends the process, and asarray
    reads its strings."""

    dtype = type("DType", (), {"name": "string"})()

    def __init__(self, strings):
        super().__init__(np.array(strings, dtype=object))
        self.exported = False

    def __dlpack__(self, **kwargs):
        self.exported = True
        raise AssertionError("exported a tensor of strings")


class _FrameworkError(Exception):
    """A framework's own error type, derived from none of Python's TypeError, ValueError..."""


class _Float16Exported(_CpuTensor):
    """As TensorFlow's float8 tensors: DLPack refuses the type with the framework's own
    error, and asarray reads it (here as float16)."""

    def __init__(self, array):
        super().__init__(np.asarray(array, dtype=np.float16))

    def __dlpack__(self, **kwargs):
        raise _FrameworkError("this type is not supported by dlpack")


class _Unreadable(_Float16Exported):
    def __array__(self, dtype=None, copy=None):
        raise _FrameworkError("cannot convert a tensor of this type to a NumPy array")


def test_a_tensor_of_strings_is_never_exported_and_is_a_type_error():
    t = sgd_table(2)
    for call, message in [(lambda x: t.lookup(x), "ids must be integers, got bytes"),
                          (lambda x: t.contains(x), "ids must be integers, got bytes"),
                          (lambda x: t.assign([1], x), "values must be numbers, got dtype object"),
                          (lambda x: t.apply_gradients([1], np.ones((1, 2)), global_step=x),
                           "global_step must be an integer, got bytes")]:
        strings = _TensorOfStrings([b"1001", b"1002"] if "ids" in message else
                                   [[b"a", b"b"]] if "values" in message else b"3")
        with pytest.raises(TypeError, match=message):
            call(strings)
        assert not strings.exported
    assert t.size() == 0


def test_a_framework_error_of_dlpack_falls_back_to_asarray():
    t = sgd_table(2)
    t.assign([1], _Float16Exported([[1.5, -2.0]]))
    t.apply_gradients([1], _Float16Exported([[0.5, 0.25]]), global_step=0)
    np.testing.assert_array_equal(t.lookup([1]), [[1.0, -2.25]])
    for call, name in [(lambda x: t.lookup(x), "ids"), (lambda x: t.assign([1], x), "values"),
                       (lambda x: t.apply_gradients([1], x, global_step=0), "grads")]:
        with pytest.raises(TypeError, match=f"{name} cannot be read as an array: cannot convert"):
            call(_Unreadable([[1.0, 2.0]]))
    np.testing.assert_array_equal(t.lookup([1]), [[1.0, -2.25]])


class _Unconvertible:
    """As JAX's typed PRNG keys: no DLPack, and an __array__ that raises the framework's own
    error."""

    def __array__(self, dtype=None, copy=None):
        raise _FrameworkError("an array of keys cannot be converted to a NumPy array")


def test_an_array_that_refuses_numpy_is_a_type_error_naming_the_argument():
    t = sgd_table(2)
    for call, name in [(lambda x: t.lookup(x), "ids"), (lambda x: t.lookup([x, x]), "ids"),
                       (lambda x: t.assign([1], x), "values"),
                       (lambda x: t.apply_gradients([1], np.ones((1, 2)), global_step=x), "global_step")]:
        with pytest.raises(TypeError, match=f"^{name} cannot be read as an array: an array of keys"):
            call(_Unconvertible())
    from mtht.multi_type_hash_table import MergedMultiTypeHashTable, MultiTypeHashTable
    merged = MergedMultiTypeHashTable({"a": generate_test_hash_table_config(2), "b": generate_test_hash_table_config(2)},
                                      lambda c: MultiTypeHashTable(c, lambda slot, cc: hash_table_from_config(
                                          cc, name_suffix=slot)))
    with pytest.raises(TypeError, match="slot 'b': ids cannot be read as an array"):
        merged.lookup({"a": [1], "b": _Unconvertible()})
    assert t.size() == 0


def test_ids_of_narrow_integer_types_widen():
    ml_dtypes = pytest.importorskip("ml_dtypes")  # a test dependency: present in CI
    t = sgd_table(2)
    t.assign([1, -1, 7, 0], [[1, 1], [2, 2], [3, 3], [4, 4]])
    for dtype, ids, want in [(ml_dtypes.int4, [1, -1, 7], [[1, 1], [2, 2], [3, 3]]),
                             (ml_dtypes.uint4, [7, 0], [[3, 3], [4, 4]]),
                             (ml_dtypes.int2, [1, -1], [[1, 1], [2, 2]])]:
        assert t.lookup(np.array(ids, dtype=dtype)).tolist() == want, dtype
    with pytest.raises(TypeError, match="ids must be integers, got dtype bfloat16"):
        t.lookup(np.array([1, 2], dtype=ml_dtypes.bfloat16))


def test_rows_of_an_object_that_is_no_array_name_its_type():
    class IndexedSlices:  # what a framework's gradient of a gather is: indices and values
        indices, values, dense_shape = np.array([0]), np.ones((1, 2)), np.array([2, 2])

    t = sgd_table(2)
    with pytest.raises(TypeError, match="grads must be an array of numbers, got IndexedSlices"):
        t.apply_gradients([1, 2], IndexedSlices(), global_step=0)
    from mtht.multi_type_hash_table import MultiTypeHashTable
    multi = MultiTypeHashTable({"a": generate_test_hash_table_config(2), "b": generate_test_hash_table_config(2)},
                               lambda slot, c: hash_table_from_config(c, name_suffix=slot))
    with pytest.raises(TypeError, match="slot 'b'.*got IndexedSlices"):
        multi.apply_gradients({"a": ([1], np.ones((1, 2))), "b": ([2], IndexedSlices())}, global_step=0)
    assert multi.lookup({"a": [1]})["a"].tolist() == [[0.0, 0.0]] and t.size() == 0


def test_a_step_of_shape_one_is_refused_with_its_shape():
    t = sgd_table(2)
    with pytest.raises(TypeError, match=r"global_step must be an integer, got ndarray of shape \(1,\)"):
        t.apply_gradients([1], np.ones((1, 2)), global_step=np.array([3]))
    assert t.size() == 0


def test_vector_values_when_dim_is_one():
    t = sgd_table(1)
    t.assign([1, 2, 3], np.array([1.0, 2.0, 3.0], dtype=np.float32))
    t.assign_add([1, 2], [10.0, 20.0])
    t.apply_gradients([3], np.array([1.0]), global_step=0)
    np.testing.assert_array_equal(t.lookup([1, 2, 3]), [[11], [22], [2]])


def test_scalar_values_when_one_id_of_dim_one():
    t = sgd_table(1)
    t.assign([1], 4.0)
    t.assign_add([1], np.float32(1.0))
    t.apply_gradients([1], np.array(1.0), global_step=0)
    np.testing.assert_array_equal(t.lookup([1]), [[4.0]])


def test_empty_batches():
    seg = SegmentDesc(3, opt="adagrad")
    t = table_of([seg], [0.1])
    t.assign([1], [[1, 2, 3]])
    before = snapshot(t, [1])
    for ids in ([], np.array([], dtype=np.int64), np.array([], dtype=np.int32), np.array([], dtype=np.uint64),
                np.array([], dtype=np.float64)):
        out = t.lookup(ids)
        assert out.shape == (0, 3) and out.dtype == np.float32
        t.assign(ids, np.zeros((0, 3), dtype=np.float32))
        t.assign_add(ids, np.zeros((0, 3), dtype=np.float32))
        t.apply_gradients(ids, np.zeros((0, 3), dtype=np.float32), global_step=0)
        t.apply_gradients(ids, np.zeros((0, 3), dtype=np.float32), global_step=0, enable_dedup=True)
        st = t.reinitialize(ids, req_time=0)
        assert st.shape == (0,) and st.dtype == np.int32
        c = t.contains(ids)
        assert c.shape == (0,) and c.dtype == np.bool_
        assert t.lookup_entry(ids) == []
    assert snapshot(t, [1]) == before


def test_empty_batch_wrong_width_is_rejected():
    t = sgd_table(3)
    with pytest.raises(ValueError):
        t.assign([], np.zeros((0, 2), dtype=np.float32))
    with pytest.raises(ValueError):
        t.apply_gradients([], np.zeros((1, 3), dtype=np.float32), global_step=0)
    assert t.size() == 0


def test_outputs_are_fresh_numpy_arrays():
    t = sgd_table(2)
    t.assign([1], [[1, 2]])
    a = t.lookup([1])
    a[:] = 7
    np.testing.assert_array_equal(t.lookup([1]), [[1, 2]])
    d = t.lookup_entry([1])[0]
    d.values[:] = 7
    np.testing.assert_array_equal(t.lookup([1]), [[1, 2]])
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous


# ----------------------------------------------------------------------------------------
# 3. Errors: the right exception, and the table exactly unchanged
# ----------------------------------------------------------------------------------------

KNOWN_IDS = [0, 1, 2, 3, 4, 5, 6, 7, -1, INT64_MAX, INT64_MIN]


def populated_adagrad_table(dim=2, allow_non_finite=False):
    seg = SegmentDesc(dim, init="ones", opt="adagrad", initial_accumulator_value=0.5, weight_decay_factor=0.01)
    t = table_of([seg], [0.1], allow_non_finite=allow_non_finite)
    t.assign_add([0, 1, 2, -1], np.ones((4, dim), dtype=np.float32), req_time=5)
    t.apply_gradients([1, 2, 2], np.full((3, dim), 0.5, dtype=np.float32), global_step=3, req_time=11)
    return t


def _bad_calls(dim):
    D = dim
    good_ids = np.array([1, 3, 4], dtype=np.int64)
    good = np.ones((3, D), dtype=np.float32)
    nan = good.copy()
    nan[2, D - 1] = np.nan
    inf = good.copy()
    inf[0, 0] = np.inf
    ninf = good.copy()
    ninf[1, 0] = -np.inf
    calls = {}
    for name, kw in (("assign", {}), ("assign_add", {}), ("apply_gradients", {"global_step": 0}),
                     ("apply_gradients_dedup", {"global_step": 0, "enable_dedup": True})):
        method = name.replace("_dedup", "")
        bad_values = {
            "transposed": (good_ids, np.ones((D, 3), dtype=np.float32)),
            "too_few_rows": (good_ids, np.ones((2, D), dtype=np.float32)),
            "too_many_rows": (good_ids, np.ones((4, D), dtype=np.float32)),
            "too_wide": (good_ids, np.ones((3, D + 1), dtype=np.float32)),
            "too_narrow": (good_ids, np.ones((3, D - 1), dtype=np.float32)),
            "flat": (good_ids, np.ones(3 * D, dtype=np.float32)),
            "3d": (good_ids, np.ones((3, D, 1), dtype=np.float32)),
            "scalar": (good_ids, 1.0),
            "ragged_list": (good_ids, [[1.0] * D, [1.0] * D, [1.0] * (D + 1)]),
            "float_ids": (np.array([1.0, 3.0, 4.0]), good),
            "fractional_ids": (np.array([1.5, 3.0, 4.0]), good),
            "float_id_list": ([1.0, 3.0, 4.0], good),
            "bool_ids": (np.array([True, False, True]), good),
            "bool_id_list": ([True, False, True], good),
            "2d_ids": (good_ids.reshape(3, 1), good),
            "2d_ids_row": (good_ids.reshape(1, 3), good),
            "0d_id": (np.array(1, dtype=np.int64), good[:1]),
            "string_ids": (np.array(["1", "3", "4"]), good),
            "object_float_ids": (np.array([1, 2.5, 3], dtype=object), good),
            "huge_python_id": ([1, 2**64, 3], good),
            "nan": (good_ids, nan),
            "inf": (good_ids, inf),
            "minus_inf": (good_ids, ninf),
        }
        for case, (ids, vals) in bad_values.items():
            calls[f"{name}-{case}"] = (method, (ids, vals), kw)
        calls[f"{name}-req_time_float"] = (method, (good_ids, good), dict(kw, req_time=1.5))
        calls[f"{name}-req_time_str"] = (method, (good_ids, good), dict(kw, req_time="10"))
        calls[f"{name}-req_time_list"] = (method, (good_ids, good), dict(kw, req_time=[10]))
        calls[f"{name}-req_time_bool"] = (method, (good_ids, good), dict(kw, req_time=True))
        calls[f"{name}-req_time_too_big"] = (method, (good_ids, good), dict(kw, req_time=2**63))
        calls[f"{name}-req_time_too_small"] = (method, (good_ids, good), dict(kw, req_time=-(2**63) - 1))
    for step in (1.5, "3", None, [1], np.array([1, 2]), 2.0**70, 2**63, -(2**63) - 1, True):
        calls[f"apply_gradients-global_step-{step!r}"] = ("apply_gradients", (good_ids, good), {"global_step": step})
    calls["reinitialize-float_ids"] = ("reinitialize", (np.array([1.0, 2.0]),), {"req_time": 0})
    calls["reinitialize-2d_ids"] = ("reinitialize", (np.array([[1, 2]]),), {"req_time": 0})
    calls["reinitialize-req_time_float"] = ("reinitialize", (good_ids,), {"req_time": 0.5})
    return calls


BAD_CALLS = _bad_calls(2)


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_raises_and_changes_nothing(case):
    method, args, kwargs = BAD_CALLS[case]
    t = populated_adagrad_table(2)
    before = snapshot(t, KNOWN_IDS)
    expected = (ValueError,) if any(k in case for k in ("transposed", "rows", "too_", "flat", "3d", "nan", "inf",
                                                      "2d_ids", "0d_id", "scalar", "ragged")) \
        else (TypeError, ValueError, OverflowError)
    with pytest.raises(expected):
        getattr(t, method)(*args, **kwargs)
    assert snapshot(t, KNOWN_IDS) == before


def test_shape_error_names_expected_and_received_shapes():
    t = sgd_table(4)
    with pytest.raises(ValueError) as info:
        t.assign([1, 2, 3], np.zeros((4, 3), dtype=np.float32))
    msg = str(info.value)
    assert "(3, 4)" in msg and "(4, 3)" in msg
    with pytest.raises(ValueError) as info:
        t.apply_gradients([1, 2], np.zeros((2, 5), dtype=np.float32), global_step=0)
    msg = str(info.value)
    assert "(2, 4)" in msg and "(2, 5)" in msg


def test_a_ragged_list_is_named_in_its_error():
    # numpy's own error for a ragged list names neither the argument nor what is wrong.
    t = sgd_table(2)
    calls = {"values": lambda: t.assign([1, 2], [[1.0, 2.0], [3.0]]),
             "grads": lambda: t.apply_gradients([1, 2], [[1.0, 2.0], [3.0]], global_step=0),
             "ids": lambda: t.lookup([[1], [2, 3]]),
             "learning_rate_tensors": lambda: mtht.hash_table.fused_apply_gradient(
                 [t], ids=[1], indices=[1], fused_slot_size=[1], id_grads=[1.0, 1.0], id_offsets=[0, 1],
                 grad_offsets=[0, 2], learning_rate_tensors=[np.array([0.1]), np.array([0.2, 0.3])],
                 req_time=0, global_step=0, num_of_shards=1)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"^{name} is ragged: its nested sequences have different lengths"):
            call()
    assert t.size() == 0


def test_transposed_square_is_indistinguishable_but_non_square_is_caught():
    # [D, N] with D == N has the right shape; with D != N it must be rejected.
    t = sgd_table(3)
    with pytest.raises(ValueError):
        t.assign([1, 2], np.zeros((2, 3), dtype=np.float32).T)
    assert t.size() == 0


def test_dim_one_values_of_wrong_length():
    t = sgd_table(1)
    t.assign([1], [[1.0]])
    before = snapshot(t, [1, 2, 3])
    for vals in (np.ones(3, dtype=np.float32), np.ones((1, 2), dtype=np.float32), np.ones((2, 1), dtype=np.float32).T):
        with pytest.raises(ValueError):
            t.assign([1, 2], vals)
    with pytest.raises(ValueError):
        t.assign([1, 2], 1.0)  # a scalar only stands for one id of dim 1
    assert snapshot(t, [1, 2, 3]) == before


def test_single_row_given_as_vector_needs_dim_one():
    t = sgd_table(2)
    with pytest.raises(ValueError):
        t.assign([1], np.array([1.0, 2.0], dtype=np.float32))
    with pytest.raises(ValueError):
        t.apply_gradients([1], [1.0, 2.0], global_step=0)
    assert t.size() == 0


def test_values_that_overflow_float32_are_non_finite():
    t = populated_adagrad_table(2)
    before = snapshot(t, KNOWN_IDS)
    with pytest.raises(ValueError):
        with np.errstate(over="ignore"):
            t.assign([1, 9], np.array([[1.0, 1e39], [0.0, 0.0]]))
    with pytest.raises(ValueError):
        with np.errstate(over="ignore"):
            t.apply_gradients([1, 9], np.array([[1.0, -1e300], [0.0, 0.0]]), global_step=0)
    assert snapshot(t, KNOWN_IDS) == before


def test_a_step_whose_float32_arithmetic_overflows_stores_what_it_gives():
    # The non-finite check is of a write's inputs (docs: Errors): finite inputs whose sum or
    # step passes float32's largest value give Inf, as IEEE arithmetic (and Monolith) does.
    big = np.full((2, 2), 3e38, np.float32)
    t = sgd_table(2)
    t.assign_add([1, 1], big)
    t.apply_gradients([2], big[:1], global_step=0)  # learning rate 1: 0 - 3e38 stays finite
    t.apply_gradients([2], big[:1], global_step=0)  # -3e38 - 3e38
    np.testing.assert_array_equal(t.lookup([1, 2]), [[np.inf, np.inf], [-np.inf, -np.inf]])


def test_nan_in_one_row_of_a_big_batch_changes_nothing():
    t = populated_adagrad_table(4)
    ids = np.arange(100, 10100, dtype=np.int64)
    vals = np.ones((ids.size, 4), dtype=np.float32)
    vals[-1, 3] = np.nan
    before = snapshot(t, KNOWN_IDS + [100, 5000, 10099])
    for method, kw in (("assign", {}), ("assign_add", {}), ("apply_gradients", {"global_step": 0}),
                       ("apply_gradients", {"global_step": 0, "enable_dedup": True})):
        with pytest.raises(ValueError):
            getattr(t, method)(ids, vals, **kw)
        assert snapshot(t, KNOWN_IDS + [100, 5000, 10099]) == before


def test_the_first_non_finite_row_is_named_whatever_the_thread_count(restore_num_threads):
    # Big enough that the check runs over several threads; every range holds a culprit.
    t = populated_adagrad_table(16)
    ids = np.arange(300_000, dtype=np.int64)
    vals = np.ones((ids.size, 16), dtype=np.float32)
    for row in (70_001, 150_000, 299_999):
        vals[row, 5] = np.inf
    size = t.size()
    for threads in (1, 2, 4):
        mtht.set_num_threads(threads)
        with pytest.raises(ValueError, match=r"\(row 70001\)"):
            t.assign(ids, vals)
    assert t.size() == size


NON_FINITE = {"nan": np.float32(np.nan), "-nan": -np.float32(np.nan), "inf": np.float32(np.inf),
              "-inf": np.float32(-np.inf),
              "nan_payload": np.array([0x7FC00123], dtype=np.uint32).view(np.float32)[0],
              "signalling_nan": np.array([0x7F800001], dtype=np.uint32).view(np.float32)[0]}


def test_every_kernel_finds_a_non_finite_value_wherever_it_is(kernel):
    # Rows of 3 floats, 700 rows: the check goes over blocks of 1,024 floats, each in vectors
    # of 4 to 16 with a tail. One bad value at each place where a vector, a tail or a block
    # begins or ends must be found and its row named; the largest finite floats, subnormals
    # and negative zeros beside it must not be taken for one.
    t = populated_adagrad_table(3)
    ids = np.arange(100, 800, dtype=np.int64)
    edge = np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max, np.finfo(np.float32).smallest_subnormal,
                     -0.0], dtype=np.float32)
    finite = np.resize(edge, ids.size * 3).reshape(ids.size, 3)
    t.assign(ids, finite)  # nothing taken for non-finite
    np.testing.assert_array_equal(t.lookup(ids), finite)
    before = snapshot(t, KNOWN_IDS + [100, 555, 799])
    for pos in (0, 1, 3, 4, 7, 8, 15, 16, 17, 31, 63, 64, 1023, 1024, 1025, 2047, 2048, 2099):
        for value in NON_FINITE.values():
            vals = finite.copy()
            vals.reshape(-1)[pos] = value
            with pytest.raises(ValueError, match=rf"\(row {pos // 3}\)"):
                t.assign(ids, vals)
            with pytest.raises(ValueError, match=rf"\(row {pos // 3}\)"):
                t.apply_gradients(ids, vals, global_step=0)
    assert snapshot(t, KNOWN_IDS + [100, 555, 799]) == before


def test_non_finite_learning_rate_changes_nothing():
    seg = SegmentDesc(2)
    t = table_of([seg], [lambda step: float("nan") if step == 7 else 1.0])
    t.assign([1], [[1, 1]])
    before = snapshot(t, [1, 2])
    with pytest.raises(ValueError):
        t.apply_gradients([1, 2], np.ones((2, 2), dtype=np.float32), global_step=7)
    assert snapshot(t, [1, 2]) == before
    t.apply_gradients([1, 2], np.ones((2, 2), dtype=np.float32), global_step=8)
    np.testing.assert_array_equal(t.lookup([1, 2]), [[0, 0], [-1, -1]])


def test_allow_non_finite_accepts_nan_and_inf():
    t = populated_adagrad_table(2, allow_non_finite=True)
    t.assign([10], [[np.nan, np.inf]])
    got = t.lookup([10])[0]
    assert np.isnan(got[0]) and got[1] == np.inf
    t.assign_add([11], [[-np.inf, 1.0]])
    assert t.lookup([11])[0, 0] == -np.inf
    t.apply_gradients([12], [[np.nan, 1.0]], global_step=0)
    got = t.lookup([12])[0]
    assert np.isnan(got[0]) and np.isfinite(got[1])
    assert t.size() == 7


def test_good_integer_scalars_for_step_and_time():
    t = sgd_table(1)
    for step in (0, np.int32(3), np.int64(4), np.uint8(5), np.array(6)):
        t.apply_gradients([1], [[1.0]], global_step=step)
    for rt in (7, np.int16(8), np.int64(2**40), np.array(9, dtype=np.int64)):
        t.assign([1], [[1.0]], req_time=rt)
        assert t.lookup_entry([1])[0].last_update_ts == int(rt)
    assert t.max_update_ts == 2**40


def test_learning_rate_count_must_match_segments_at_build():
    segs = [SegmentDesc(1), SegmentDesc(2)]
    with pytest.raises(ValueError):
        hash_table_from_config(make_config(segs, [1.0]))
    with pytest.raises(ValueError):
        hash_table_from_config(make_config(segs[:1], [1.0, 2.0]))
    hash_table_from_config(make_config(segs, [1.0, 2.0]))


def _optimizer_builders():
    return {
        "adadelta": entry.AdadeltaOptimizer,
        "adam": entry.AdamOptimizer,
        "amsgrad": entry.AmsgradOptimizer,
        "ftrl": entry.FtrlOptimizer,
        "momentum": entry.MomentumOptimizer,
        "moving_average": entry.MovingAverageOptimizer,
        "rmsprop": entry.RmspropOptimizer,
        "rmspropv2": entry.RmspropV2Optimizer,
        "batch_softmax": entry.BatchSoftmaxOptimizer,
        "group_adagrad": entry.AdaGradWithGroupLassoOptimizer,
        "dynamic_wd_adagrad": entry.DynamicWdAdagradOptimizer,
        "group_ftrl": entry.FTRLWithGroupSparsityOptimizer,
        "fp16_sgd": lambda: entry.StochasticRoundingFloat16OptimizerWrapper(entry.SgdOptimizer()),
    }


@pytest.mark.parametrize("name", sorted(_optimizer_builders()))
def test_other_optimizers_build_or_raise_not_implemented(name):
    """Optimizers beyond SGD/Adagrad raise NotImplementedError when a table is built (until
    they are implemented; then the table must work)."""
    opt = _optimizer_builders()[name]()
    seg = entry.CombineAsSegment(1, entry.ZerosInitializer(), opt, entry.Fp32Compressor())
    config = entry.HashTableConfigInstance(
        entry.EmbeddingHashTableConfig(entry_config=entry.EntryConfig(segments=[seg])), [0.1])
    try:
        t = hash_table_from_config(config)
    except NotImplementedError as e:
        assert str(e)
        return
    t.apply_gradients([1, 1, 2], np.ones((3, 1), dtype=np.float32), global_step=1)
    assert np.all(np.isfinite(t.lookup([1, 2])))
    assert t.size() == 2


def test_unimplemented_optimizer_in_second_segment_fails_at_build():
    # Whatever the segment, an optimizer that cannot be trained must fail with
    # NotImplementedError when the table is built, not with another error or later.
    segs = [entry.CombineAsSegment(1, entry.ZerosInitializer(), entry.SgdOptimizer()),
            entry.CombineAsSegment(1, entry.ZerosInitializer(), entry.AdamOptimizer())]
    config = entry.HashTableConfigInstance(
        entry.EmbeddingHashTableConfig(entry_config=entry.EntryConfig(segments=segs)), [0.1, 0.1])
    try:
        hash_table_from_config(config)
    except NotImplementedError:
        pass


# ----------------------------------------------------------------------------------------
# 4. lookup_entry
# ----------------------------------------------------------------------------------------

def test_lookup_entry_state_names_and_timestamps():
    segs = [SegmentDesc(1, opt="sgd"), SegmentDesc(2, opt="adagrad", initial_accumulator_value=0.25),
            SegmentDesc(3, init="ones", opt="adagrad", initial_accumulator_value=1.0, weight_decay_factor=0.5)]
    t = table_of(segs, [1.0, 0.5, 0.25])
    ref = ReferenceTable(segs)
    g = np.arange(12, dtype=np.float32).reshape(2, 6) / 4
    t.assign_add([1, 2], np.ones((2, 6), dtype=np.float32), req_time=100)
    ref.assign_add([1, 2], np.ones((2, 6), dtype=np.float32), req_time=100)
    t.apply_gradients([2, 3], g, global_step=0, req_time=50)
    ref.apply_gradients([2, 3], g, [1.0, 0.5, 0.25], req_time=50)
    dumps = t.lookup_entry([1, 2, 3, 4])
    assert dumps[3] is None
    for d, i in zip(dumps[:3], (1, 2, 3)):
        assert isinstance(d, EntryDump)
        assert d.id == i
        assert d.values.dtype == np.float32 and d.values.shape == (6,)
        assert len(d.optimizer_state) == 3
        assert d.optimizer_state[0] == {}
        assert set(d.optimizer_state[1]) == {"norm"} and d.optimizer_state[1]["norm"].shape == (2,)
        assert set(d.optimizer_state[2]) == {"norm"} and d.optimizer_state[2]["norm"].shape == (3,)
        assert d.optimizer_state[1]["norm"].dtype == np.float32
    assert [d.last_update_ts for d in dumps[:3]] == [100, 50, 50]
    np.testing.assert_array_equal(dumps[0].optimizer_state[1]["norm"], [0.25, 0.25])
    np.testing.assert_array_equal(dumps[0].optimizer_state[2]["norm"], [1.0, 1.0, 1.0])
    assert t.max_update_ts == 100
    assert_matches_reference(t, ref, [1, 2, 3, 4])


def test_timestamps_follow_req_time_default_zero():
    t = sgd_table(1)
    assert t.max_update_ts == 0
    t.assign([1], [[1.0]], req_time=30)
    assert t.lookup_entry([1])[0].last_update_ts == 30
    t.assign_add([1], [[1.0]])
    assert t.lookup_entry([1])[0].last_update_ts == 0
    t.apply_gradients([1], [[1.0]], global_step=0, req_time=20)
    assert t.lookup_entry([1])[0].last_update_ts == 20
    t.apply_gradients([1], [[1.0]], global_step=0, req_time=10, enable_dedup=True)
    assert t.lookup_entry([1])[0].last_update_ts == 10  # overwritten even when smaller
    assert t.max_update_ts == 30
    t.assign([2], [[1.0]], req_time=2**40)  # 64-bit timestamps
    assert t.lookup_entry([2])[0].last_update_ts == 2**40
    assert t.max_update_ts == 2**40
    t.lookup([1, 2, 3])
    assert t.max_update_ts == 2**40


def test_req_time_takes_the_whole_int64_range():
    t = sgd_table(1)
    for ts in (INT64_MIN, INT64_MAX, np.int64(INT64_MAX), np.int32(-7)):  # Python or numpy integers
        t.assign([4], [[1.0]], req_time=ts)
        assert t.lookup_entry([4])[0].last_update_ts == ts
    assert t.max_update_ts == INT64_MAX


def test_lookup_entry_of_missing_and_duplicates():
    t = sgd_table(2)
    assert t.lookup_entry([1, 2]) == [None, None]
    t.assign([1], [[1, 2]])
    dumps = t.lookup_entry([1, 5, 1])
    assert dumps[1] is None
    assert dumps[0].id == dumps[2].id == 1
    np.testing.assert_array_equal(dumps[0].values, dumps[2].values)
    assert t.size() == 1


# ----------------------------------------------------------------------------------------
# 5. Random uniform initialisation
# ----------------------------------------------------------------------------------------

def random_config(seed, segs=((16, -0.05, 0.05),), opt=None, lrs=None):
    segments = [entry.CombineAsSegment(d, entry.RandomUniformInitializer(lo, hi),
                                       opt() if opt else entry.SgdOptimizer(), entry.Fp32Compressor())
                for d, lo, hi in segs]
    tc = entry.EmbeddingHashTableConfig(entry_config=entry.EntryConfig(segments=segments), random_seed=seed)
    return entry.HashTableConfigInstance(tc, lrs or [1.0] * len(segments))


def test_random_uniform_range_and_spread():
    t = hash_table_from_config(random_config(0))
    ids = np.arange(-10000, 10000, dtype=np.int64) * 7919
    t.assign_add(ids, np.zeros((ids.size, 16), dtype=np.float32))
    v = t.lookup(ids)
    assert v.min() >= F32(-0.05) and v.max() < F32(0.05)
    assert v.min() < -0.0499 and v.max() > 0.0499
    assert abs(float(v.mean())) < 1e-3
    assert abs(float(v.std()) - 0.1 / np.sqrt(12)) < 1e-3
    # rows differ from each other and positions within a row differ
    assert np.unique(v[:, 0]).size > 0.99 * ids.size
    assert np.mean(v[:, 0] == v[:, 1]) < 0.01


def test_random_uniform_per_segment_ranges():
    t = hash_table_from_config(random_config(3, segs=((3, -1.0, 1.0), (5, 10.0, 11.0), (2, 0.0, 1e-3))))
    ids = np.arange(5000, dtype=np.int64)
    t.assign_add(ids, np.zeros((ids.size, 10), dtype=np.float32))
    v = t.lookup(ids)
    assert (v[:, :3] >= -1).all() and (v[:, :3] < 1).all()
    assert (v[:, 3:8] >= 10).all() and (v[:, 3:8] < 11).all()
    assert (v[:, 8:] >= 0).all() and (v[:, 8:] < F32(1e-3)).all()


def test_random_uniform_is_deterministic_per_seed_and_id(restore_num_threads):
    rng = np.random.default_rng(1)
    ids = np.unique(rng.integers(INT64_MIN, INT64_MAX, size=20000, dtype=np.int64))
    ids = np.concatenate([ids, [INT64_MIN, INT64_MAX, -1, 0]])
    zeros = np.zeros((ids.size, 16), dtype=np.float32)

    mtht.set_num_threads(1)
    a = hash_table_from_config(random_config(42))
    a.assign_add(ids, zeros)
    va = a.lookup(ids)

    mtht.set_num_threads(2)
    b = hash_table_from_config(random_config(42))
    perm = rng.permutation(ids.size)
    for chunk in np.array_split(perm, 7):
        b.apply_gradients(ids[chunk], zeros[chunk], global_step=0)  # created, then a zero step
    np.testing.assert_array_equal(b.lookup(ids), va)

    mtht.set_num_threads(4)
    c = hash_table_from_config(random_config(42))
    status = c.reinitialize(ids[::-1], req_time=1)
    assert (status == 0).all()
    np.testing.assert_array_equal(c.lookup(ids), va)
    # reinitialize of existing entries gives the same rows again
    c.assign_add(ids, np.ones_like(zeros))
    assert (c.reinitialize(ids, req_time=2) == 1).all()
    np.testing.assert_array_equal(c.lookup(ids), va)

    # ids inserted one at a time into a table with other content
    d = hash_table_from_config(random_config(42))
    d.assign_add(np.arange(10**6, 10**6 + 3000, dtype=np.int64), np.zeros((3000, 16), dtype=np.float32))
    for k in range(0, ids.size, 997):
        d.assign_add(ids[k:k + 1], zeros[:1])
        np.testing.assert_array_equal(d.lookup(ids[k:k + 1]), va[k:k + 1])

    other = hash_table_from_config(random_config(43))
    other.assign_add(ids, zeros)
    vo = other.lookup(ids)
    assert np.mean(vo == va) < 0.01


def test_random_uniform_does_not_depend_on_table_name():
    a = hash_table_from_config(random_config(7), name_suffix="a")
    b = hash_table_from_config(random_config(7), name_suffix="b")
    ids = np.arange(100, dtype=np.int64)
    a.assign_add(ids, np.zeros((100, 16), dtype=np.float32))
    b.assign_add(ids, np.zeros((100, 16), dtype=np.float32))
    np.testing.assert_array_equal(a.lookup(ids), b.lookup(ids))


def test_random_init_then_sgd_step_and_lookup_does_not_initialise():
    t = hash_table_from_config(random_config(5, segs=((4, -1.0, 1.0),)))
    assert (t.lookup([9]) == 0).all() and t.size() == 0
    t.assign_add([9], np.zeros((1, 4), dtype=np.float32))
    init = t.lookup([9])[0].copy()
    t2 = hash_table_from_config(random_config(5, segs=((4, -1.0, 1.0),)))
    t2.apply_gradients([9], np.ones((1, 4), dtype=np.float32), global_step=0)
    np.testing.assert_array_equal(t2.lookup([9])[0], init - F32(1.0) * F32(1.0))


# ----------------------------------------------------------------------------------------
# 6. reinitialize
# ----------------------------------------------------------------------------------------

def test_reinitialize_statuses_and_reset():
    seg = SegmentDesc(2, opt="adagrad", initial_accumulator_value=0.3)
    t = table_of([seg], [0.1])
    ref = ReferenceTable([seg])
    t.assign_add([2, 3], [[5, 5], [6, 6]], req_time=4)
    ref.assign_add([2, 3], [[5, 5], [6, 6]], req_time=4)
    t.apply_gradients([2, 3], [[1, 1], [2, 2]], global_step=0, req_time=4)
    ref.apply_gradients([2, 3], [[1, 1], [2, 2]], [0.1], req_time=4)
    status = t.reinitialize([1, 2, 3], req_time=42)
    assert status.dtype == np.int32
    assert status.tolist() == [0, 1, 1]
    assert ref.reinitialize([1, 2, 3], req_time=42).tolist() == [0, 1, 1]
    np.testing.assert_array_equal(t.lookup([1, 2, 3]), [[0, 0]] * 3)
    for d in t.lookup_entry([1, 2, 3]):
        np.testing.assert_array_equal(d.optimizer_state[0]["norm"], np.full(2, F32(0.3)))
        assert d.last_update_ts == 42
    assert_matches_reference(t, ref, [1, 2, 3, 4])


def test_reinitialize_duplicates_and_constants():
    seg = SegmentDesc(3, init="constants", constant=-2.5)
    t = table_of([seg], [1.0])
    assert t.reinitialize([7, 7, 8, 7], req_time=0).tolist() == [0, 1, 0, 1]
    np.testing.assert_array_equal(t.lookup([7, 8]), np.full((2, 3), -2.5))
    assert t.size() == 2


def test_reinitialize_default_time_is_wall_clock():
    t = sgd_table(1)
    before = int(time.time())
    t.reinitialize([1])
    after = int(time.time())
    ts = t.lookup_entry([1])[0].last_update_ts
    assert before - 1 <= ts <= after + 1


# ----------------------------------------------------------------------------------------
# 7. contains / size / len / stats
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("initial_capacity", [0, 1, 1000, 100000])
def test_initial_capacity_does_not_change_results(initial_capacity):
    tc = make_config([SegmentDesc(3, opt="adagrad")], [0.1]).table_config
    tc.initial_capacity = initial_capacity
    t = hash_table_from_config(entry.HashTableConfigInstance(tc, [0.1]))
    ref = ReferenceTable([SegmentDesc(3, opt="adagrad")])
    ids = np.random.default_rng(initial_capacity).integers(-(2**63), 2**63 - 1, size=5000, dtype=np.int64)
    g = np.ones((ids.size, 3), dtype=np.float32)
    t.apply_gradients(ids, g, global_step=0)
    ref.apply_gradients(ids, g, [0.1])
    assert_matches_reference(t, ref, ids[:300])
    assert t.size() == np.unique(ids).size
    assert t.stats()["capacity"] >= max(initial_capacity, t.size())


def test_contains_size_len_stats():
    t = sgd_table(4)
    assert t.size() == 0 and len(t) == 0
    st = t.stats()
    assert st["size"] == 0
    ids = np.arange(0, 3000, 3, dtype=np.int64)
    t.assign(ids, np.ones((ids.size, 4), dtype=np.float32))
    assert t.size() == len(t) == ids.size
    mask = t.contains(np.arange(3000, dtype=np.int64))
    assert mask.dtype == np.bool_ and mask.shape == (3000,)
    np.testing.assert_array_equal(mask, np.arange(3000) % 3 == 0)
    # lookups never insert
    t.lookup(np.arange(5000, 6000, dtype=np.int64))
    t.lookup_entry([5000, 5001])
    t.contains([7000])
    assert t.size() == ids.size
    st = t.stats()
    assert st["size"] == ids.size
    assert st["capacity"] >= ids.size
    assert 0 < st["load_factor"] <= 1
    assert st["dim"] == 4
    assert st["state_floats"] == 0
    assert all(isinstance(v, (int, float)) for v in st.values())


def test_size_counts_distinct_ids_of_all_writes():
    seg = SegmentDesc(1, opt="adagrad")
    t = table_of([seg], [0.1])
    t.assign([1, 1, 2], [[1], [2], [3]])
    t.assign_add([2, 3, 3], [[1], [1], [1]])
    t.apply_gradients([3, 4, 4], [[1], [1], [1]], global_step=0)
    t.apply_gradients([5, 5], [[1], [1]], global_step=0, enable_dedup=True)
    t.reinitialize([6, 1], req_time=0)
    assert t.size() == len(t) == 6
    np.testing.assert_array_equal(t.contains([0, 1, 2, 3, 4, 5, 6, 7]), [False] + [True] * 6 + [False])


def test_growth_keeps_every_entry():
    t = sgd_table(2)
    ref = {}
    rng = np.random.default_rng(7)
    for batch in range(20):
        ids = rng.integers(INT64_MIN, INT64_MAX, size=2000, dtype=np.int64)
        vals = rng.standard_normal((2000, 2)).astype(np.float32)
        t.assign(ids, vals)
        for i, v in zip(ids.tolist(), vals):
            ref[i] = v
    all_ids = np.array(list(ref), dtype=np.int64)
    np.testing.assert_array_equal(t.lookup(all_ids), np.array([ref[i] for i in all_ids.tolist()]))
    assert t.size() == len(ref)
    assert t.stats()["capacity"] >= len(ref)


def test_prepared_writes_apply_as_the_methods_do():
    # prepare_write converts a write's arguments without applying it; write_all applies it.
    # The arguments after the rows can be converted once (write_arguments) for many tables.
    from mtht.hash_table import write_all, write_arguments
    t, ref = sgd_table(2), sgd_table(2)
    writes = [t.prepare_write("assign", [1, 2], [[1, 2], [3, 4]], req_time=5),
              t.prepare_write_with("assign_add", [1], [[0.5, 0.5]], write_arguments("assign_add", 6)),
              t.prepare_write("apply_gradients", [2], [[1, 1]], 3, enable_dedup=True)]
    assert len(t) == 0  # nothing applied yet
    for w in writes:
        write_all([w])
    ref.assign([1, 2], [[1, 2], [3, 4]], req_time=5)
    ref.assign_add([1], [[0.5, 0.5]], req_time=6)
    ref.apply_gradients([2], [[1, 1]], 3, enable_dedup=True)
    np.testing.assert_array_equal(t.lookup([1, 2]), ref.lookup([1, 2]))
    assert [d.last_update_ts for d in t.lookup_entry([1, 2])] == [6, 0]
    for bad in (lambda: t.prepare_write("erase", [1], [[1, 1]]),
                lambda: t.prepare_write_with("erase", [1], [[1, 1]], write_arguments("assign")),
                lambda: write_arguments("erase")):
        with pytest.raises(ValueError, match="unknown write"):
            bad()
    with pytest.raises(TypeError):
        write_arguments("apply_gradients")  # global_step is required
