"""Multi-type tables, the merged wrapper and the fused multi-table ops.

The first part ports every case of Monolith's ``multi_type_hash_table_test.py`` (and the
fused examples of ``hash_table_ops_test.py``) with the numbers those tests assert. The rest
checks properties: merging never changes results when slots do not share ids, the fused ops
equal per-table calls block by block, the merge key groups exactly the equal configs, and
bad input raises before anything changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import mtht
from mtht import entry
from mtht.hash_table import fused_apply_gradient, fused_lookup, hash_table_from_config
from mtht.learning_rate_functions import PolynomialDecay
from mtht.multi_type_hash_table import (
    BaseMultiTypeHashTable,
    MergedMultiTypeHashTable,
    MultiTypeHashTable,
    _IndexedValues,
)
from mtht.testing import generate_test_hash_table_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layouts import empty_at_odd_address, laid_out  # noqa: E402

F32 = np.float32


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def factory(slot, config):
    return hash_table_from_config(config, name_suffix=slot)


def multi_type_factory(merged_slot_to_config):
    return MultiTypeHashTable(merged_slot_to_config, factory)


def md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def three_slot_table() -> MultiTypeHashTable:
    return MultiTypeHashTable(
        {
            "slot0": generate_test_hash_table_config(1),
            "slot1": generate_test_hash_table_config(2),
            "slot2": generate_test_hash_table_config(2),
        },
        factory,
    )


def two_slot_table(**kwargs) -> MultiTypeHashTable:
    return MultiTypeHashTable(
        {
            "slot0": generate_test_hash_table_config(1, **kwargs),
            "slot1": generate_test_hash_table_config(2, **kwargs),
        },
        factory,
    )


def assert_dicts_equal(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for slot, value in expected.items():
        np.testing.assert_array_equal(got[slot], np.asarray(value, dtype=F32), err_msg=slot)


def assert_dicts_close(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for slot, value in expected.items():
        np.testing.assert_allclose(got[slot], np.asarray(value, dtype=F32), rtol=1e-6, atol=1e-6,
                                   err_msg=slot)


def make_config(segments, learning_rates, random_seed=0) -> entry.HashTableConfigInstance:
    """``segments``: (dim, optimizer name, initializer name) per segment."""
    built = []
    for dim, opt, init in segments:
        optimizer = {
            "sgd": lambda: entry.SgdOptimizer(),
            "adagrad": lambda: entry.AdagradOptimizer(initial_accumulator_value=0.5),
            "adam": lambda: entry.AdamOptimizer(),
            "ftrl": lambda: entry.FtrlOptimizer(l1_regularization=0.01, l2_regularization=0.1),
            "momentum": lambda: entry.MomentumOptimizer(use_nesterov=True),
            "fp16_sgd": lambda: entry.StochasticRoundingFloat16OptimizerWrapper(entry.SgdOptimizer()),
        }[opt]()
        initializer = {
            "zeros": entry.ZerosInitializer(),
            "ones": entry.OnesInitializer(),
            "random_uniform": entry.RandomUniformInitializer(-0.5, 0.5),
        }[init]
        built.append(entry.CombineAsSegment(dim, initializer, optimizer, entry.Fp32Compressor()))
    table_config = entry.EmbeddingHashTableConfig(entry_config=entry.EntryConfig(segments=built),
                                                  random_seed=random_seed)
    return entry.HashTableConfigInstance(table_config, list(learning_rates))


def table_state(table, ids) -> list:
    """Everything a table holds for ``ids``, comparable with ``==``."""
    out = []
    for dump in table.lookup_entry(ids):
        if dump is None:
            out.append(None)
        else:
            out.append((dump.values.tobytes(),
                        tuple(tuple((k, v.tobytes()) for k, v in sorted(seg.items()))
                              for seg in dump.optimizer_state),
                        dump.last_update_ts))
    return out


# ---------------------------------------------------------------------------------------------
# Monolith's multi_type_hash_table_test.py
# ---------------------------------------------------------------------------------------------


def test_basic():
    hash_table = three_slot_table()
    hash_table = hash_table.assign_add({
        "slot0": ([0], [[1]]),
        "slot1": ([1], [[2, 2]]),
        "slot2": ([2, 3], [[4, 4], [8, 8]]),
    })
    values = hash_table.lookup({"slot0": [0], "slot1": [1], "slot2": [2, 3]})
    assert_dicts_equal(values, {
        "slot0": [[1]],
        "slot1": [[2, 2]],
        "slot2": [[4, 4], [8, 8]],
    })


def test_apply_gradients():
    hash_table = two_slot_table()
    values = hash_table.lookup({"slot0": [0], "slot1": [1, 2]})
    assert_dicts_equal(values, {"slot0": [[0]], "slot1": [[0, 0], [0, 0]]})
    # A lookup never inserts.
    assert [len(hash_table._tables[s]) for s in ("slot0", "slot1")] == [0, 0]
    hash_table = hash_table.apply_gradients({
        "slot0": ([0], 2.0),
        "slot1": ([1, 2], [[1, 3], [2, 4]]),
    }, global_step=0)
    values = hash_table.lookup({"slot0": [0], "slot1": [1, 2]})
    assert_dicts_equal(values, {"slot0": [[-2]], "slot1": [[-1, -3], [-2, -4]]})


def test_apply_gradients_with_learning_rate_decay():
    decay = PolynomialDecay(initial_learning_rate=0.1, decay_steps=10, end_learning_rate=1.1)
    hash_table = two_slot_table(learning_rate=decay)
    np.testing.assert_allclose(hash_table.learning_rates(0), [0.1, 0.1], rtol=1e-6)
    values = hash_table.lookup({"slot0": [0], "slot1": [1, 2]})
    assert_dicts_equal(values, {"slot0": [[0]], "slot1": [[0, 0], [0, 0]]})
    hash_table = hash_table.apply_gradients({
        "slot0": ([0], 2.0),
        "slot1": ([1, 2], [[1, 3], [2, 4]]),
    }, global_step=0)
    values = hash_table.lookup({"slot0": [0], "slot1": [1, 2]})
    assert_dicts_close(values, {"slot0": [[-0.2]], "slot1": [[-0.1, -0.3], [-0.2, -0.4]]})


def test_apply_gradients_without_lookup():
    hash_table = two_slot_table()
    hash_table = hash_table.apply_gradients({
        "slot0": ([1], 3.0),
        "slot1": ([2, 2], [[1.1, 3.1], [2.2, 4.2]]),
    }, global_step=0)
    values = hash_table.lookup({"slot0": [1], "slot1": [1, 2]})
    assert_dicts_close(values, {"slot0": [[-3]], "slot1": [[0, 0], [-3.3, -7.3]]})


def _assign_fused_state(hash_table):
    return hash_table.assign_add({
        "slot0": ([0], [[1]]),
        "slot1": ([1], [[2, 2]]),
        "slot2": ([2, 3], [[4, 4], [8, 8]]),
    })


def test_fused_lookup():
    hash_table = _assign_fused_state(three_slot_table())
    embeddings, recv_splits, id_offsets, emb_offsets, indices = hash_table.fused_lookup(
        [0, 1, 2, 3], [1, 1, 2], 1)
    np.testing.assert_array_equal(embeddings, [1, 2, 2, 4, 4, 8, 8])
    np.testing.assert_array_equal(recv_splits, [7])
    np.testing.assert_array_equal(id_offsets, [0, 1, 2, 4])
    np.testing.assert_array_equal(emb_offsets, [0, 1, 3, 7])
    np.testing.assert_array_equal(indices, [0, 1, 2, 3])
    assert embeddings.dtype == np.float32
    assert recv_splits.dtype == id_offsets.dtype == emb_offsets.dtype == np.int32
    assert indices.dtype == np.int64


def test_fused_lookup_multi_shards():
    hash_table = _assign_fused_state(three_slot_table())
    embeddings, recv_splits, id_offsets, emb_offsets, indices = hash_table.fused_lookup(
        [0, 2, 1, 3], [1, 0, 1, 0, 1, 1], 2)
    np.testing.assert_array_equal(embeddings, [1, 4, 4, 2, 2, 8, 8])
    np.testing.assert_array_equal(recv_splits, [3, 4])
    np.testing.assert_array_equal(id_offsets, [0, 1, 1, 2, 2, 3, 4])
    np.testing.assert_array_equal(emb_offsets, [0, 1, 1, 3, 3, 5, 7])
    np.testing.assert_array_equal(indices, [0, 2, 1, 3])



def test_fused_lookup_writes_into_out():
    hash_table = _assign_fused_state(three_slot_table())
    tables = [hash_table._tables[s] for s in ("slot0", "slot1", "slot2")]
    for call in (lambda out: hash_table.fused_lookup([0, 2, 1, 3], [1, 0, 1, 0, 1, 1], 2, out=out),
                 lambda out: fused_lookup(tables, [0, 2, 1, 3], [1, 0, 1, 0, 1, 1], 2, out=out)):
        out = np.full(7, 99, np.float32)
        embeddings, recv_splits, *_ = call(out)
        assert embeddings is out
        np.testing.assert_array_equal(out, [1, 4, 4, 2, 2, 8, 8])
        np.testing.assert_array_equal(recv_splits, [3, 4])
        for bad, error in ((np.zeros(6, np.float32), "must have 7 floats, got 6"),
                           (np.zeros(8, np.float32), "must have 7 floats, got 8"),
                           (np.zeros(7, np.float64), r"float32 array of shape \(L,\), got float64"),
                           (np.zeros((7, 1), np.float32), r"shape \(L,\), got float32 \(7, 1\)"),
                           (np.zeros(14, np.float32)[::2], "not contiguous"),
                           (np.zeros(7, np.float32).tolist(), "must be a numpy array")):
            with pytest.raises((TypeError, ValueError), match=error):
                call(bad)
        read_only = np.zeros(7, np.float32)
        read_only.flags.writeable = False
        with pytest.raises(ValueError, match="writeable"):
            call(read_only)
    empty = np.zeros(0, np.float32)
    assert hash_table.fused_lookup([], [0, 0, 0], 1, out=empty)[0] is empty
    for call in (lambda ids, out: hash_table.fused_lookup(ids, [1, 0, 1, 0, 1, 1], 2, out=out),
                 lambda ids, out: fused_lookup(tables, ids, [1, 0, 1, 0, 1, 1], 2, out=out)):
        shared = np.zeros(8, np.float32)  # the ids in out's memory, as lookup(out=) takes them
        ids = shared.view(np.int64)
        ids[:] = [0, 2, 1, 3]
        embeddings, _, _, _, indices = call(ids, shared[:7])
        np.testing.assert_array_equal(shared[:7], [1, 4, 4, 2, 2, 8, 8])
        np.testing.assert_array_equal(indices, [0, 2, 1, 3])

def test_fused_apply_gradients():
    hash_table = two_slot_table()
    ids = [0, 1, 2]
    fused_slot_size = [1, 2]
    embeddings, recv_splits, id_offsets, emb_offsets, indices = hash_table.fused_lookup(
        ids, fused_slot_size, 1)
    np.testing.assert_array_equal(embeddings, [0, 0, 0, 0, 0])
    np.testing.assert_array_equal(id_offsets, [0, 1, 3])
    np.testing.assert_array_equal(emb_offsets, [0, 1, 5])
    assert [len(hash_table._tables[s]) for s in ("slot0", "slot1")] == [0, 0]
    grads = np.array([2, 1, 3, 2, 4], dtype=F32)
    hash_table = hash_table.fused_apply_gradient(ids, indices, fused_slot_size, grads, id_offsets,
                                                 emb_offsets, global_step=0, req_time=0,
                                                 num_of_shards=1)
    embeddings, recv_splits, id_offsets, emb_offsets, indices = hash_table.fused_lookup(
        ids, fused_slot_size, 1)
    np.testing.assert_array_equal(embeddings, [-2, -1, -3, -2, -4])
    np.testing.assert_array_equal(recv_splits, [5])
    np.testing.assert_array_equal(id_offsets, [0, 1, 3])
    np.testing.assert_array_equal(emb_offsets, [0, 1, 5])


def test_fused_apply_gradients_missing_tables():
    hash_table = two_slot_table()
    ids = [1, 1]
    fused_slot_size = [1, 0, 1, 0]
    embeddings, recv_splits, id_offsets, emb_offsets, indices = hash_table.fused_lookup(
        ids, fused_slot_size, 2)
    np.testing.assert_array_equal(embeddings, [0, 0])
    np.testing.assert_array_equal(recv_splits, [1, 1])
    np.testing.assert_array_equal(id_offsets, [0, 1, 1, 2, 2])
    np.testing.assert_array_equal(emb_offsets, [0, 1, 1, 2, 2])
    grads = np.array([1.0, 2.0], dtype=F32)
    hash_table = hash_table.fused_apply_gradient(ids, indices, fused_slot_size, grads, id_offsets,
                                                 emb_offsets, 0, 0, 2)
    embeddings, recv_splits, id_offsets, emb_offsets, indices = hash_table.fused_lookup(
        ids, fused_slot_size, 2)
    # Two separate SGD steps (1 then 2): accumulation never crosses shards.
    np.testing.assert_array_equal(embeddings, [-3, -3])
    np.testing.assert_array_equal(recv_splits, [1, 1])
    np.testing.assert_array_equal(id_offsets, [0, 1, 1, 2, 2])
    np.testing.assert_array_equal(emb_offsets, [0, 1, 1, 2, 2])


def test_fused_apply_gradients_with_grad_accumulation_keeps_shards_apart():
    # The same as above with enable_grad_accumulation: each block has one id, so nothing is
    # summed; with Adagrad the two steps differ from one step with the summed gradient.
    config = make_config([(1, "adagrad", "zeros")], [1.0])
    hash_table = MultiTypeHashTable({"slot0": config}, factory)
    hash_table.fused_apply_gradient([1, 1], [1, 1], [1, 1], [1.0, 2.0], [0, 1, 2], [0, 1, 2],
                                    0, 0, 2, enable_grad_accumulation=True)
    w = F32(0)
    norm = F32(0.5)
    for g in (F32(1), F32(2)):
        norm = F32(norm + g * g)
        w = F32(w - F32(F32(1) / np.sqrt(norm)) * g)
    np.testing.assert_allclose(hash_table.lookup({"slot0": [1]})["slot0"], [[w]], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Monolith's MergedMultiTypeHashTable tests
# ---------------------------------------------------------------------------------------------


def test_merged_basic():
    slot_to_config = {
        "slot0": generate_test_hash_table_config(1),
        "slot1": generate_test_hash_table_config(2),
        "slot2": generate_test_hash_table_config(2),
    }
    original = MergedMultiTypeHashTable(slot_to_config, multi_type_factory)
    assert original.slot_mapping == {
        "slot0": "3f6af58dff4cd9f4b93351586ed432e3",
        "slot1": "34dff150e9fcf28c6de40f4bb6b61cd8",
        "slot2": "34dff150e9fcf28c6de40f4bb6b61cd8",
    }
    hash_table = original.assign_add({
        "slot0": ([0], [[1]]),
        "slot1": ([1], [[2, 2]]),
        "slot2": ([1], [[4, 4]]),
    })
    assert hash_table is original
    values = hash_table.lookup({"slot0": [0], "slot1": [1], "slot2": [1]})
    # slot1 and slot2 share a table and both write id 1.
    assert_dicts_equal(values, {"slot0": [[1]], "slot1": [[6, 6]], "slot2": [[6, 6]]})
    original.apply_gradients({
        "slot0": ([0], [[-1]]),
        "slot1": ([1], [[1, 1]]),
        "slot2": ([1], [[1, 1]]),
    }, global_step=0)
    values = original.lookup({"slot0": [0], "slot1": [1]})
    assert_dicts_equal(values, {"slot0": [[2]], "slot1": [[4, 4]]})
    values = hash_table.lookup({"slot2": [1]})
    assert_dicts_equal(values, {"slot2": [[4, 4]]})


def test_reprs_show_the_slots_and_their_tables():
    table = two_slot_table()
    table.assign({"slot0": (np.array([1, 2]), np.ones((2, 1), np.float32))})
    assert repr(table) == ("MultiTypeHashTable({'slot0': HashTable(name='MonolithHashTable_slot0', dim_size=1, "
                           "size=2), 'slot1': HashTable(name='MonolithHashTable_slot1', dim_size=2, size=0)})")
    merged = MergedMultiTypeHashTable({"x": generate_test_hash_table_config(2), "y": generate_test_hash_table_config(2)},
                                      multi_type_factory)
    name = md5("x,y")
    assert repr(merged) == (f"MergedMultiTypeHashTable(slot_mapping={{'x': '{name}', 'y': '{name}'}}, "
                            f"table=MultiTypeHashTable({{'{name}': HashTable(name='MonolithHashTable_{name}', "
                            "dim_size=2, size=0)}))")


def test_indexed_values_has_monoliths_fields():
    merged = _IndexedValues(slots=["slot1", "slot2"], index=np.array([0, 1, 1]), value=np.array([[2.0], [4.0], [8.0]]))
    assert [f.name for f in dataclasses.fields(_IndexedValues)] == ["slots", "index", "value"]
    assert merged.value[merged.index == 1].tolist() == [[4.0], [8.0]] and merged.slots[1] == "slot2"


def test_merged_name_stability():
    received = []

    def recording_factory(merged_slot_to_config):
        received.append(dict(merged_slot_to_config))
        return None

    slot_to_config = {
        "slot0": generate_test_hash_table_config(1),
        "slot1": generate_test_hash_table_config(1),
    }
    MergedMultiTypeHashTable(slot_to_config, recording_factory)
    assert len(received) == 1
    assert list(received[0]) == ["e21904dd414d1780e5fc904866dc69c2"]
    assert md5("slot0,slot1") == "e21904dd414d1780e5fc904866dc69c2"


def test_merged_restore_name():
    received = []

    def recording_factory(merged_slot_to_config):
        received.append(dict(merged_slot_to_config))
        return None

    config = generate_test_hash_table_config(1)
    slot_to_config = {"fc_slot_0": config}
    MergedMultiTypeHashTable(slot_to_config, recording_factory)
    (merged,) = received
    assert list(merged) == ["1607be845c6c1cc0c52f208940ddba66"]
    merged_config = merged["1607be845c6c1cc0c52f208940ddba66"]
    assert merged_config.extra_restore_names == ["cde3ba88ba62b682f84241b273f8100c"]
    assert md5("slot_0") == "cde3ba88ba62b682f84241b273f8100c"
    # The caller's config is not changed ...
    assert config.extra_restore_names == []
    assert merged_config is not config
    assert str(merged_config) == str(config)
    # ... so building again does not append the old name twice.
    MergedMultiTypeHashTable(slot_to_config, recording_factory)
    assert received[1]["1607be845c6c1cc0c52f208940ddba66"].extra_restore_names == [
        "cde3ba88ba62b682f84241b273f8100c"]
    assert config.extra_restore_names == []


def test_merged_restore_name_keeps_existing_names_and_skips_new_style_slots():
    received = []

    def recording_factory(merged_slot_to_config):
        received.append(dict(merged_slot_to_config))
        return None

    with_names = generate_test_hash_table_config(1)
    with_names.extra_restore_names = ["previous"]
    MergedMultiTypeHashTable({"fc_slot_7": with_names, "slot_8": generate_test_hash_table_config(2)},
                             recording_factory)
    (merged,) = received
    assert merged[md5("fc_slot_7")].extra_restore_names == ["previous", md5("slot_7")]
    # A slot whose name has no old form gets no alias.
    assert merged[md5("slot_8")].extra_restore_names == []
    assert with_names.extra_restore_names == ["previous"]


# ---------------------------------------------------------------------------------------------
# hash_table_ops_test.py fused examples, through the module functions
# ---------------------------------------------------------------------------------------------


def test_hash_table_ops_fused_lookup():
    dims = [1, 1, 2]
    tables = []
    for x, dim in enumerate(dims):
        table = hash_table_from_config(generate_test_hash_table_config(dim), name_suffix=str(x))
        fill = 1.0 if x % 2 == 0 else 0.0
        table.assign([3 * x, 3 * x + 1], np.full((2, dim), fill, dtype=F32))
        tables.append(table)
    embeddings, recv_splits, id_offsets, emb_offsets, indices = fused_lookup(
        tables, [0, 4, 6, 1, 3, 7], [1, 1, 1, 1, 1, 1], 2)
    np.testing.assert_array_equal(embeddings, [1, 0, 1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(recv_splits, [4, 4])
    np.testing.assert_array_equal(id_offsets, [0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(emb_offsets, [0, 1, 2, 4, 5, 6, 8])
    np.testing.assert_array_equal(indices, [0, 4, 6, 1, 3, 7])


def test_hash_table_ops_fused_optimize():
    t0 = hash_table_from_config(generate_test_hash_table_config(1), name_suffix="t0")
    t1 = hash_table_from_config(generate_test_hash_table_config(2), name_suffix="t1")
    t0.assign([0, 1], [[1], [1]])
    t1.assign([3, 4], [[0, 0], [0, 0]])
    tables = [t0, t1]
    ids = [0, 4, 1, 3]
    fused_slot_size = [1, 1, 1, 1]
    grads = np.array([-1, -2, -2, -1, -2, -2], dtype=F32)
    result = fused_apply_gradient(tables, ids, ids, fused_slot_size, grads, [0, 1, 2, 3, 4],
                                  [0, 1, 3, 4, 6], np.array([0.1, 0.1], dtype=F32), 0, 0, 2)
    assert result == tables
    embeddings, recv_splits, id_offsets, emb_offsets, _ = fused_lookup(tables, ids, fused_slot_size, 2)
    np.testing.assert_allclose(embeddings, [1.1, 0.2, 0.2, 1.1, 0.2, 0.2], rtol=1e-6)
    np.testing.assert_array_equal(recv_splits, [3, 3])
    np.testing.assert_array_equal(id_offsets, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(emb_offsets, [0, 1, 3, 4, 6])


def test_hash_table_ops_fused_docstring_example():
    t0 = hash_table_from_config(generate_test_hash_table_config(1), name_suffix="t0")
    t1 = hash_table_from_config(generate_test_hash_table_config(2), name_suffix="t1")
    t0.assign([1, 2], [[1], [2]])
    t1.assign([3, 4], [[3, 3], [4, 4]])
    tables = [t0, t1]
    ids = [1, 3, 2, 4]
    fused_slot_size = [1, 1, 1, 1]
    embeddings, recv_splits, id_offsets, emb_offsets, indices = fused_lookup(
        tables, ids, fused_slot_size, 2)
    np.testing.assert_array_equal(embeddings, [1, 3, 3, 2, 4, 4])
    np.testing.assert_array_equal(recv_splits, [3, 3])
    np.testing.assert_array_equal(id_offsets, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(emb_offsets, [0, 1, 3, 4, 6])
    fused_apply_gradient(tables, ids, indices, fused_slot_size, [1, 2, 2, 1, 2, 2], id_offsets,
                         emb_offsets, [1.0, 1.0], 0, 0, 2)
    np.testing.assert_array_equal(t0.lookup([1, 2]), [[0], [1]])
    np.testing.assert_array_equal(t1.lookup([3, 4]), [[1, 1], [2, 2]])


# ---------------------------------------------------------------------------------------------
# Property: merging changes nothing when slots do not share ids
# ---------------------------------------------------------------------------------------------

# (segments, learning-rate kind). Every spec has its own merge key.
_SPECS = [
    ([(1, "sgd", "zeros")], "one"),
    ([(2, "sgd", "zeros")], "one"),
    ([(2, "sgd", "zeros")], "half"),
    ([(2, "adagrad", "ones")], "one"),
    ([(3, "adagrad", "random_uniform")], "decay"),
    ([(1, "sgd", "ones"), (2, "adagrad", "zeros")], "one"),
]


def _spec_config(index: int) -> entry.HashTableConfigInstance:
    segments, lr_kind = _SPECS[index]
    lrs = []
    for k in range(len(segments)):
        if lr_kind == "one":
            lrs.append(1.0 if k == 0 else 0.25)
        elif lr_kind == "half":
            lrs.append(0.5)
        else:
            lrs.append(PolynomialDecay(0.5, 10, end_learning_rate=0.05))
    return make_config(segments, lrs)


def _spec_dim(index: int) -> int:
    return sum(d for d, _, _ in _SPECS[index][0])


IDS_PER_SLOT = 6


def _slot_ids(slot_index: int):
    # Disjoint id ranges: slots never share an id, even in one merged table.
    return st.lists(st.integers(slot_index * 1000, slot_index * 1000 + IDS_PER_SLOT - 1), max_size=5)


_values = st.sampled_from([-2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 1.5, 3.0])


@st.composite
def _merge_scenarios(draw):
    n_slots = draw(st.integers(1, 5))
    spec_of_slot = [draw(st.integers(0, len(_SPECS) - 1)) for _ in range(n_slots)]
    names = draw(st.lists(st.sampled_from(["a", "b", "c", "slot0", "slot1", "fc_slot_3", "z"]),
                          min_size=n_slots, max_size=n_slots, unique=True))
    ops = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["assign_add", "assign", "apply_gradients", "lookup"]))
        chosen = draw(st.lists(st.integers(0, n_slots - 1), min_size=1, max_size=n_slots, unique=True))
        data = {}
        for i in chosen:
            ids = draw(_slot_ids(i))
            dim = _spec_dim(spec_of_slot[i])
            rows = draw(st.lists(_values, min_size=len(ids) * dim, max_size=len(ids) * dim))
            data[names[i]] = (ids, np.asarray(rows, dtype=F32).reshape(len(ids), dim))
        extra = {}
        if kind == "apply_gradients":
            extra = {"global_step": draw(st.integers(0, 20)), "enable_dedup": draw(st.booleans()),
                     "req_time": draw(st.integers(0, 100))}
        # The merged table also gets the slots' arrays as pieces of one array (its rows per
        # dim), in sorted slot order (which it joins without a copy) or another.
        cut_order = draw(st.one_of(st.none(), st.just(sorted(data)), st.permutations(sorted(data))))
        ops.append((kind, data, extra, cut_order))
    return names, spec_of_slot, ops


def _cut_from_one_array(data: dict, order: list) -> dict:
    """``data`` ({slot: (ids, rows)}) with each slot's ids a slice of one array and its rows
    a slice of one array per dim, the slots laid out in ``order``."""
    ids = np.concatenate([np.asarray(data[s][0], dtype=np.int64) for s in order])
    ends = np.cumsum([len(data[s][0]) for s in order]).tolist()
    rows = {}
    for dim in {data[s][1].shape[1] for s in order}:
        of_dim = [s for s in order if data[s][1].shape[1] == dim]
        whole = np.concatenate([data[s][1] for s in of_dim])
        row_ends = np.cumsum([len(data[s][1]) for s in of_dim]).tolist()
        rows.update({s: whole[e - len(data[s][1]):e] for s, e in zip(of_dim, row_ends)})
    return {s: (ids[e - len(data[s][0]):e], rows[s]) for s, e in zip(order, ends)}


def test_a_merged_write_of_one_id_in_two_slots_goes_in_sorted_slot_order():
    # Slots "a" and "b" share a table: whatever order the caller's mapping has, "a"'s rows
    # are written before "b"'s, so the last write of an id is "b"'s.
    table = MergedMultiTypeHashTable({"b": generate_test_hash_table_config(1), "a": generate_test_hash_table_config(1)},
                                     multi_type_factory)
    table.assign({"b": ([7], [[2.0]]), "a": ([7, 8], [[1.0], [3.0]])})
    assert table.lookup({"a": [7, 8]})["a"].tolist() == [[2.0], [3.0]]
    # Adagrad steps without dedup, one after another: their order shows in the result.
    adagrad = entry.HashTableConfigInstance(entry.EmbeddingHashTableConfig(entry_config=entry.EntryConfig(
        segments=[entry.CombineAsSegment(1, entry.ZerosInitializer(), entry.AdagradOptimizer(), None)])), [0.1])
    table = MergedMultiTypeHashTable({"b": adagrad, "a": adagrad}, multi_type_factory)
    grads = {"b": ([7], [[4.0]]), "a": ([7, 7], [[1.0], [-2.0]])}
    table.apply_gradients(grads, global_step=0)
    in_order = {}
    for order in (("a", "b"), ("b", "a")):
        one = hash_table_from_config(adagrad)
        for slot in order:
            one.apply_gradients(*grads[slot], global_step=0)
        in_order[order] = one.lookup([7]).tolist()
    assert in_order[("a", "b")] != in_order[("b", "a")]
    assert table.lookup({"b": [7]})["b"].tolist() == in_order[("a", "b")]


def test_a_batch_cut_by_slot_is_joined_without_a_copy():
    from mtht._arrays import joined

    grads = np.arange(65_536 * 16, dtype=np.float32).reshape(65_536, 16)
    ends = np.linspace(0, 65_536, 101).astype(int).tolist()
    slots = [grads[a:b] for a, b in zip(ends, ends[1:])]
    got = joined(slots)
    assert np.shares_memory(got, grads) and got.shape == grads.shape
    np.testing.assert_array_equal(got, grads)
    # Out of order, or with one slot's rows elsewhere: a copy, in the order given.
    for parts in (slots[1:] + slots[:1], slots[:50] + [slots[50].copy()] + slots[51:]):
        got = joined(parts)
        assert not np.shares_memory(got, grads)
        np.testing.assert_array_equal(got, np.concatenate(parts))
    # A merged table's steps from such slices (viewed, repeated ids and all) equal its steps
    # from copies of them.
    config = make_config([(16, "adagrad", "zeros")], [0.1])
    tables = [MergedMultiTypeHashTable({f"s{i:02d}": config for i in range(4)}, multi_type_factory) for _ in range(2)]
    ids, small = np.arange(8_192, dtype=np.int64) % 3_000, grads[:8_192] / 1e6
    cut = {f"s{i:02d}": (ids[i * 2_048:(i + 1) * 2_048], small[i * 2_048:(i + 1) * 2_048]) for i in range(4)}
    for step in range(2):
        tables[0].apply_gradients(cut, global_step=step)
        tables[1].apply_gradients({s: (i.copy(), g.copy()) for s, (i, g) in cut.items()}, global_step=step)
    looked_up = [t.lookup({s: i for s, (i, _) in cut.items()}) for t in tables]
    for slot in cut:
        np.testing.assert_array_equal(looked_up[0][slot], looked_up[1][slot])
    assert np.any(looked_up[0]["s00"] != 0)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_joined_equals_concatenate_and_copies_nothing_for_consecutive_pieces(data):
    from mtht._arrays import joined

    # Rows of 1 to 32 KiB: parts of 4 KiB on average and more are joined in place.
    rows, dim = data.draw(st.integers(0, 12)), data.draw(st.sampled_from([1, 256, 1024, 4096]))
    dtype = data.draw(st.sampled_from([np.float32, np.int64]))
    whole = np.arange(rows * dim + 4, dtype=dtype)[data.draw(st.integers(0, 4)):][:rows * dim].reshape(rows, dim)
    cuts = sorted(data.draw(st.lists(st.integers(0, rows), min_size=1, max_size=5)))
    pieces = [whole[a:b] for a, b in zip([0] + cuts, cuts + [rows])]
    if data.draw(st.booleans()):  # a run of the pieces, in order
        first = data.draw(st.integers(0, len(pieces) - 1))
        parts = pieces[first:data.draw(st.integers(first + 1, len(pieces)))]
    else:  # some of them, in any order
        shuffled = data.draw(st.permutations(pieces))
        kept = data.draw(st.lists(st.sampled_from(range(len(shuffled))), min_size=1, unique=True).map(sorted))
        parts = [shuffled[i] for i in kept]
    # A piece that is not one of whole's slices: a copy, another dtype, or every other row.
    nonempty = [i for i, p in enumerate(parts) if p.size]
    odd = data.draw(st.sampled_from([None, None, None, "copy", "dtype", "strided"])) if nonempty else None
    if odd is not None:
        at = data.draw(st.sampled_from(nonempty))
        parts[at] = {"copy": parts[at].copy(), "dtype": parts[at].astype(np.float64),
                     "strided": np.repeat(parts[at], 2, axis=0)[::2]}[odd]
    got = joined(parts)
    np.testing.assert_array_equal(got, np.concatenate(parts))
    assert got.dtype == np.concatenate(parts).dtype
    # Empty pieces add nothing, wherever they point; the others follow one another in whole.
    filled = [p for p in parts if p.size]
    consecutive = odd is None and all(b.ctypes.data == a.ctypes.data + a.nbytes for a, b in zip(filled, filled[1:]))
    if len(parts) == 1:
        assert got is parts[0]
    elif consecutive and filled and sum(p.nbytes for p in parts) >= len(parts) * 4096:
        event("joined in place")
        assert np.shares_memory(got, whole)  # no copy
    elif got.size:
        assert not np.shares_memory(got, whole)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_merge_scenarios())
def test_merged_equals_one_table_per_slot(scenario):
    names, spec_of_slot, ops = scenario
    # Fresh config objects for every slot, so equal specs merge through their text only.
    merged = MergedMultiTypeHashTable({n: _spec_config(s) for n, s in zip(names, spec_of_slot)},
                                      multi_type_factory)
    separate = MultiTypeHashTable({n: _spec_config(s) for n, s in zip(names, spec_of_slot)}, factory)
    assert len(set(merged.slot_mapping.values())) == len(set(spec_of_slot))
    for slot, name in merged.slot_mapping.items():
        group = sorted(s for s in names if spec_of_slot[names.index(s)] == spec_of_slot[names.index(slot)])
        assert name == md5(",".join(group))
    assert merged.get_table_dim_sizes() == [
        _spec_dim(spec_of_slot[names.index(sorted(s for s in names if merged.slot_mapping[s] == m)[0])])
        for m in sorted(set(merged.slot_mapping.values()))]
    all_ids = {n: np.arange(i * 1000, i * 1000 + IDS_PER_SLOT + 1) for i, n in enumerate(names)}
    for kind, data, extra, cut_order in ops:
        merged_data = data if cut_order is None else _cut_from_one_array(data, cut_order)
        if kind == "lookup":
            got = merged.lookup({slot: ids for slot, (ids, _) in merged_data.items()})
            expected = separate.lookup({slot: ids for slot, (ids, _) in data.items()})
            assert sorted(got) == sorted(expected)
            for slot in expected:
                assert got[slot].shape == expected[slot].shape
                np.testing.assert_array_equal(got[slot], expected[slot], err_msg=slot)
            continue
        assert getattr(merged, kind)(merged_data, **extra) is merged
        getattr(separate, kind)(data, **extra)
        got = merged.lookup(all_ids)
        expected = separate.lookup(all_ids)
        for slot in names:
            np.testing.assert_array_equal(got[slot], expected[slot], err_msg=f"{kind} {slot}")


# ---------------------------------------------------------------------------------------------
# Property: the fused ops equal per-table calls, block by block in [shard][table] order
# ---------------------------------------------------------------------------------------------


@st.composite
def _fused_scenarios(draw):
    k_tables = draw(st.integers(1, 8))
    n_shards = draw(st.integers(1, 4))
    table_specs = []
    for _ in range(k_tables):
        n_segments = draw(st.integers(1, 2))
        # Mostly SGD and Adagrad; the stateful optimizers make the order of steps visible.
        optimizers = st.sampled_from(["sgd", "adagrad", "sgd", "adagrad", "adam", "ftrl", "momentum",
                                      "fp16_sgd"])
        segments = [(draw(st.integers(1, 4)), draw(optimizers),
                     draw(st.sampled_from(["zeros", "ones", "random_uniform"])))
                    for _ in range(n_segments)]
        lrs = [draw(st.sampled_from([1.0, 0.5, 0.125, 0.03])) for _ in range(n_segments)]
        table_specs.append((segments, lrs, draw(st.integers(0, 3))))
    # Few distinct ids, so that ids repeat inside blocks and across shards.
    counts = [draw(st.integers(0, 4)) for _ in range(k_tables * n_shards)]
    ids = [draw(st.integers(0, 7)) for _ in range(sum(counts))]
    prefill = [draw(st.lists(st.integers(0, 7), max_size=4, unique=True)) for _ in range(k_tables)]
    global_step = draw(st.integers(0, 5))
    req_time = draw(st.integers(0, 10**12))
    accumulate = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return table_specs, n_shards, counts, ids, prefill, global_step, req_time, accumulate, seed


def _build_tables(table_specs, prefill):
    tables = []
    for k, (segments, lrs, seed) in enumerate(table_specs):
        table = hash_table_from_config(make_config(segments, lrs, random_seed=seed), name_suffix=str(k))
        ids = prefill[k]
        dim = table.dim_size
        table.assign_add(ids, (np.arange(len(ids) * dim, dtype=F32).reshape(len(ids), dim) - 3) / 4,
                         req_time=7)
        tables.append(table)
    return tables


def _blocks(counts, k_tables, n_shards):
    """(shard, table, start, stop) of every block in [shard][table] order."""
    out = []
    start = 0
    for n in range(n_shards):
        for k in range(k_tables):
            stop = start + counts[n * k_tables + k]
            out.append((n, k, start, stop))
            start = stop
    return out


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(_fused_scenarios())
def test_fused_ops_equal_per_table_calls(restore_num_threads, scenario):
    table_specs, n_shards, counts, ids, prefill, global_step, req_time, accumulate, seed = scenario
    k_tables = len(table_specs)
    ids = np.asarray(ids, dtype=np.int64)
    fused_runs = {threads: _build_tables(table_specs, prefill) for threads in (1, 2)}
    reference = _build_tables(table_specs, prefill)
    dims = [t.dim_size for t in reference]
    blocks = _blocks(counts, k_tables, n_shards)

    # Lookup: per-block lookups laid out block after block.
    expected_parts, expected_splits = [], [0] * n_shards
    expected_id_offsets, expected_emb_offsets = [0], [0]
    for n, k, start, stop in blocks:
        rows = reference[k].lookup(ids[start:stop])
        expected_parts.append(rows.reshape(-1))
        expected_splits[n] += rows.size
        expected_id_offsets.append(stop)
        expected_emb_offsets.append(expected_emb_offsets[-1] + rows.size)
    expected_embeddings = np.concatenate(expected_parts) if expected_parts else np.zeros(0, F32)
    for threads, tables in fused_runs.items():
        mtht.set_num_threads(threads)
        embeddings, recv_splits, id_offsets, emb_offsets, indices = fused_lookup(
            tables, ids, counts, n_shards)
        np.testing.assert_array_equal(embeddings, expected_embeddings)
        np.testing.assert_array_equal(recv_splits, expected_splits)
        np.testing.assert_array_equal(id_offsets, expected_id_offsets)
        np.testing.assert_array_equal(emb_offsets, expected_emb_offsets)
        np.testing.assert_array_equal(indices, ids)
        assert len(id_offsets) == len(emb_offsets) == k_tables * n_shards + 1

    # Update: one apply_gradients per block, in [shard][table] order.
    rng = np.random.default_rng(seed)
    grads = (rng.integers(-8, 9, size=expected_emb_offsets[-1]) / 4).astype(F32)
    learning_rates = np.concatenate([t.config.call_learning_rate_fns(global_step) for t in reference])
    for n, k, start, stop in blocks:
        g = grads[expected_emb_offsets[n * k_tables + k]:expected_emb_offsets[n * k_tables + k + 1]]
        reference[k].apply_gradients(ids[start:stop], g.reshape(stop - start, dims[k]), global_step,
                                     enable_dedup=accumulate, req_time=req_time)
    for threads, tables in fused_runs.items():
        mtht.set_num_threads(threads)
        fused_apply_gradient(tables, ids, ids, counts, grads, expected_id_offsets, expected_emb_offsets,
                             learning_rates, req_time, global_step, n_shards,
                             enable_grad_accumulation=accumulate)
    every_id = np.arange(0, 8)
    for k in range(k_tables):
        expected_state = table_state(reference[k], every_id)
        for threads, tables in fused_runs.items():
            assert table_state(tables[k], every_id) == expected_state, (threads, k)
            assert tables[k].max_update_ts == reference[k].max_update_ts


# Three tables of dims 4, 9 (two segments) and 16, for the large fused batches below.
_MIXED_SPECS = [([(4, "adagrad", "random_uniform")], [0.1], 1),
                ([(1, "sgd", "zeros"), (8, "adagrad", "ones")], [0.5, 0.05], 2),
                ([(16, "adagrad", "zeros")], [0.2], 3)]


def test_fused_large_batch_independent_of_thread_count(restore_num_threads):
    # Big enough for the work to be spread over threads; many ids repeat across shards.
    rng = np.random.default_rng(1234)
    specs = _MIXED_SPECS
    k_tables, n_shards = len(specs), 3
    counts = rng.integers(2000, 6000, size=k_tables * n_shards).tolist()
    ids = rng.integers(0, 3000, size=sum(counts)).astype(np.int64)
    dims = [4, 9, 16]
    id_offsets = np.concatenate([[0], np.cumsum(counts)])
    emb_offsets = np.concatenate([[0], np.cumsum([c * dims[i % k_tables] for i, c in enumerate(counts)])])
    grads = rng.standard_normal(emb_offsets[-1]).astype(F32)
    blocks = _blocks(counts, k_tables, n_shards)
    every_id = np.arange(3000)

    def run_fused(threads, accumulate):
        mtht.set_num_threads(threads)
        tables = _build_tables(specs, [[], [], []])
        lrs = np.concatenate([t.config.call_learning_rate_fns(3) for t in tables])
        for _ in range(2):
            fused_apply_gradient(tables, ids, ids, counts, grads, id_offsets, emb_offsets, lrs, 5, 3,
                                 n_shards, enable_grad_accumulation=accumulate)
        return [t.lookup(every_id) for t in tables]

    for accumulate in (False, True):
        mtht.set_num_threads(1)
        tables = _build_tables(specs, [[], [], []])
        for _ in range(2):
            for n, k, start, stop in blocks:
                g = grads[emb_offsets[n * k_tables + k]:emb_offsets[n * k_tables + k + 1]]
                tables[k].apply_gradients(ids[start:stop], g.reshape(-1, dims[k]), 3,
                                          enable_dedup=accumulate, req_time=5)
        expected = [t.lookup(every_id) for t in tables]
        for threads in (1, 2, 4):
            got = run_fused(threads, accumulate)
            for k in range(k_tables):
                np.testing.assert_array_equal(got[k], expected[k],
                                              err_msg=f"threads={threads} accumulate={accumulate} table={k}")


def test_fused_lookup_large_batch_matches_per_block_lookups(restore_num_threads):
    # Many shards (some blocks empty), tables of different dims, ids present and missing:
    # each block's rows must land in its own place, on any thread count.
    rng = np.random.default_rng(99)
    specs = _MIXED_SPECS
    k_tables, n_shards = len(specs), 16
    counts = rng.integers(0, 3000, size=k_tables * n_shards)
    counts[rng.choice(len(counts), size=12, replace=False)] = 0
    counts = counts.tolist()
    ids = rng.integers(0, 40_000, size=sum(counts)).astype(np.int64)
    prefill = [np.arange(k, 30_000, 2).tolist() for k in range(k_tables)]  # ids >= 30,000 are missing
    tables = _build_tables(specs, prefill)
    blocks = _blocks(counts, k_tables, n_shards)
    expected = np.concatenate([tables[k].lookup(ids[start:stop]).reshape(-1) for _, k, start, stop in blocks])
    assert np.count_nonzero(expected) > expected.size // 4
    for threads in (1, 2, 4):
        mtht.set_num_threads(threads)
        embeddings = fused_lookup(tables, ids, counts, n_shards)[0]
        np.testing.assert_array_equal(embeddings, expected, err_msg=f"threads={threads}")


def _fused_refusal_tables(second):
    """Two sgd tables of dim 2: the first unlimited, the second as ``second`` says."""
    first = hash_table_from_config(make_config([(2, "sgd", "ones")], [0.5]), name_suffix="a")
    if second == "batch_softmax":  # an sgd segment and a batch_softmax one (whose dim is 1)
        segments = [entry.CombineAsSegment(1, entry.ZerosInitializer(), entry.SgdOptimizer(), entry.Fp32Compressor()),
                    entry.CombineAsSegment(1, entry.ZerosInitializer(), entry.BatchSoftmaxOptimizer(learning_rate=0.1),
                                           entry.Fp32Compressor())]
        config = entry.EmbeddingHashTableConfig(entry_config=entry.EntryConfig(segments=segments))
    else:
        segments = [entry.CombineAsSegment(2, entry.OnesInitializer(), entry.SgdOptimizer(), entry.Fp32Compressor())]
        config = entry.EmbeddingHashTableConfig(entry_config=entry.EntryConfig(segments=segments), max_entries=3)
    other = hash_table_from_config(entry.HashTableConfigInstance(config, [0.5] * len(segments)), name_suffix="b")
    return first, other, len(segments)


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("case", ["too_many_new_ids", "too_many_distinct_ids", "negative_step_for_batch_softmax"])
@pytest.mark.parametrize("refusing_table_first", [False, True])
def test_fused_apply_gradient_refused_by_one_table_changes_no_table(case, refusing_table_first, accumulate):
    # A table that refuses its part of a fused update (capacity, step) must refuse before any
    # table changes, wherever it stands in the list.
    first, other, other_segments = _fused_refusal_tables(
        "batch_softmax" if case == "negative_step_for_batch_softmax" else "capped")
    first.assign([1, 2], np.full((2, 2), 3, F32), req_time=4)
    global_step = 1
    if case == "too_many_new_ids":
        other_ids = [10, 11, 12, 13]
    elif case == "too_many_distinct_ids":
        other.assign([10, 11], np.full((2, 2), 2, F32), req_time=4)
        other_ids = [10, 11, 12, 13]  # 2 present + 2 new > 3, with nothing left to evict
    else:
        other_ids = [10, 11]
        global_step = -1
    tables = [other, first] if refusing_table_first else [first, other]
    blocks = [[1, 2, 3], other_ids] if not refusing_table_first else [other_ids, [1, 2, 3]]
    ids = np.asarray(blocks[0] + blocks[1], np.int64)
    fss = [len(blocks[0]), len(blocks[1])]
    every_id = np.arange(0, 16)
    before = [(len(t), table_state(t, every_id)) for t in tables]
    with pytest.raises(ValueError):
        fused_apply_gradient(tables, ids, ids, fss, np.ones(2 * len(ids), F32), [0, fss[0], len(ids)],
                             [0, 2 * fss[0], 2 * len(ids)], np.full(1 + other_segments, 0.5, F32), 9, global_step, 1,
                             enable_grad_accumulation=accumulate)
    assert [(len(t), table_state(t, every_id)) for t in tables] == before


_REFUSED_WRITES = [(method, case) for method in ("assign", "assign_add", "apply_gradients", "apply_gradients_dedup")
                   for case in ("too_many_new_ids", "too_many_distinct_ids", "negative_step_for_batch_softmax")
                   if method.startswith("apply") or case != "negative_step_for_batch_softmax"]  # assign has no step


@pytest.mark.parametrize("method,case", _REFUSED_WRITES)
@pytest.mark.parametrize("merged", [False, True])
def test_multi_slot_write_refused_by_one_slot_changes_no_slot(method, case, merged):
    first, other, _ = _fused_refusal_tables("batch_softmax" if case == "negative_step_for_batch_softmax" else "capped")
    configs = {"a": first.config, "z": other.config}  # "z" comes after "a" in every order
    table = MergedMultiTypeHashTable(configs, multi_type_factory) if merged else MultiTypeHashTable(configs, factory)
    table.assign({"a": ([1, 2], np.full((2, 2), 3, F32))}, req_time=4)
    other_ids = [10, 11, 12, 13]
    if case == "too_many_distinct_ids":
        table.assign({"z": ([10, 11], np.full((2, 2), 2, F32))}, req_time=4)
    data = {"a": ([1, 2, 3], np.ones((3, 2), F32)), "z": (other_ids, np.ones((4, 2), F32))}
    before = table.lookup({"a": np.arange(16), "z": np.arange(16)})
    with pytest.raises(ValueError):
        if method.startswith("apply_gradients"):
            step = -1 if case == "negative_step_for_batch_softmax" else 1
            table.apply_gradients(data, step, enable_dedup=method.endswith("dedup"), req_time=9)
        else:
            getattr(table, method)(data, req_time=9)
    assert_dicts_equal(table.lookup({"a": np.arange(16), "z": np.arange(16)}), before)


@pytest.mark.parametrize("method", ["assign", "assign_add", "apply_gradients", "apply_gradients_dedup"])
@pytest.mark.parametrize("max_entries", [None, 300])
def test_slots_sharing_one_table_are_written_in_the_order_the_write_names_them(method, max_entries):
    # A factory may give two slots the same table. A write to both then writes that table
    # twice, one slot after the other, as two separate writes would; with a capacity limit the
    # second one evicts entries the first has just written.
    def build():
        segments = [entry.CombineAsSegment(3, entry.RandomUniformInitializer(-1, 1), entry.AdagradOptimizer(),
                                           entry.Fp32Compressor())]
        config = entry.EmbeddingHashTableConfig(entry_config=entry.EntryConfig(segments=segments),
                                                max_entries=max_entries)
        return hash_table_from_config(entry.HashTableConfigInstance(config, [0.3]))

    shared, reference = build(), build()
    table = MultiTypeHashTable({"a": shared.config, "b": shared.config}, lambda slot, config: shared)
    rng = np.random.default_rng(3)
    data = {"b": (rng.integers(200, 450, size=500), rng.standard_normal((500, 3)).astype(F32)),
            "a": (rng.integers(0, 250, size=400), rng.standard_normal((400, 3)).astype(F32))}
    for step in (1, 2):
        if method.startswith("apply_gradients"):
            dedup = method.endswith("dedup")
            table.apply_gradients(data, step, enable_dedup=dedup, req_time=step)
            for ids, grads in data.values():
                reference.apply_gradients(ids, grads, step, enable_dedup=dedup, req_time=step)
        else:
            getattr(table, method)(data, req_time=step)
            for ids, values in data.values():
                getattr(reference, method)(ids, values, req_time=step)
    distinct = np.union1d(data["a"][0], data["b"][0]).size
    assert len(shared) == len(reference) == (300 if max_entries else distinct)
    every_id = np.arange(450)
    assert table_state(shared, every_id) == table_state(reference, every_id)


@pytest.mark.parametrize("method", ["assign", "assign_add", "apply_gradients", "apply_gradients_dedup"])
@pytest.mark.parametrize("threads", [1, 2])
def test_multi_slot_write_equals_each_slots_own_write(restore_num_threads, method, threads):
    # Slots of under 4,096 ids are written a task each, the larger ones one after the other
    # spread over the threads: every slot must end as its own table's write leaves it.
    mtht.set_num_threads(threads)
    configs = {f"s{k}": make_config([(4, "adagrad", "random_uniform")], [0.1 * (k + 1)], random_seed=k)
               for k in range(6)}
    table = MultiTypeHashTable(configs, factory)
    twins = {slot: factory(slot, config) for slot, config in configs.items()}
    rng = np.random.default_rng(threads)
    sizes = {"s0": 9_000, "s1": 0, "s2": 1, "s3": 700, "s4": 4_096, "s5": 3_000}
    for step in (1, 2):
        data = {slot: (rng.integers(0, 6_000, size=n), rng.standard_normal((n, 4)).astype(F32))
                for slot, n in sizes.items()}
        if method.startswith("apply_gradients"):
            dedup = method.endswith("dedup")
            table.apply_gradients(data, step, enable_dedup=dedup, req_time=step)
            for slot, (ids, grads) in data.items():
                twins[slot].apply_gradients(ids, grads, step, enable_dedup=dedup, req_time=step)
        else:
            getattr(table, method)(data, req_time=step)
            for slot, (ids, values) in data.items():
                getattr(twins[slot], method)(ids, values, req_time=step)
    every_id = np.arange(6_000)
    for slot in configs:
        assert table_state(table._tables[slot], every_id) == table_state(twins[slot], every_id), slot


def test_write_all_refuses_gradient_steps_that_do_not_share_their_step_and_changes_nothing():
    t1, t2 = (hash_table_from_config(make_config([(2, "sgd", "zeros")], [1.0]), name_suffix=s) for s in "ab")
    writes = [t1.prepare_write("apply_gradients", [1], [[1, 1]], 1),
              t2.prepare_write("apply_gradients", [1], [[1, 1]], 2)]
    with pytest.raises(ValueError, match="gradient steps global_step"):
        mtht.hash_table.write_all(writes)
    assert len(t1) == len(t2) == 0
    mtht.hash_table.write_all([])  # nothing to write
    # An assign beside a gradient step at another step than 0 goes through.
    mtht.hash_table.write_all([t1.prepare_write("assign", [1], [[4, 4]], 9),
                               t2.prepare_write("apply_gradients", [1], [[1, 1]], 5, req_time=9)])
    np.testing.assert_array_equal(t1.lookup([1]), [[4, 4]])
    np.testing.assert_array_equal(t2.lookup([1]), [[-1, -1]])


def test_lookup_all_needs_one_ids_array_per_table():
    t = hash_table_from_config(make_config([(2, "sgd", "zeros")], [1.0]))
    with pytest.raises(ValueError, match="one ids array per table"):
        mtht.hash_table.lookup_all([t, t], [[1]])
    assert mtht.hash_table.lookup_all([], []) == []


def _unreadable_arrays(n: int, dim: int, item) -> list:
    """Arrays of n (rows of dim) that the core cannot read in place as ``item`` (int64 or
    float32): another type, another byte order, unaligned, another number of dims, a list,
    strided."""
    shape = (n,) if dim == 0 else (n, dim)
    other = np.float64 if item is np.int64 else np.int64
    unaligned = laid_out(np.zeros(shape, item), item, offset=1)
    arrays = [np.zeros(shape, other), np.zeros(shape, np.dtype(item).newbyteorder()), unaligned,
              np.zeros(shape + (1,), item), [0] * n]
    strided = np.zeros((2 * n,) + shape[1:], item)[::2]
    return arrays + [strided] if not strided.flags.c_contiguous else arrays  # one item is contiguous


@pytest.mark.parametrize("merged", [False, True])
def test_an_empty_slot_at_an_odd_address_is_an_empty_slot(merged):
    # An empty array may lie at any address and numpy calls it aligned: an empty slot of a
    # batch gathered from other processes (mpi4py's allgather unpickles them so) was refused
    # as unaligned. Such a slot now does what an ordinary empty array does.
    def run(empty_of):
        configs = {"a": make_config([(2, "adagrad", "zeros")], [0.1]), "b": make_config([(2, "adagrad", "zeros")], [0.1])}
        table = MergedMultiTypeHashTable(configs, multi_type_factory) if merged else MultiTypeHashTable(configs, factory)
        ids, grads = np.array([3, 4, 3]), np.full((3, 2), 0.5, F32)
        nothing, no_rows = empty_of((0,), np.int64), empty_of((0, 2), np.float32)
        table.assign({"a": (nothing, no_rows), "b": (ids, grads)})
        table.assign_add({"a": (nothing, no_rows), "b": (ids, grads)})
        for dedup in (False, True):
            table.apply_gradients({"a": (nothing, no_rows), "b": (ids, grads)}, 1, enable_dedup=dedup)
        looked_up = table.lookup({"a": nothing, "b": ids})
        return {slot: (rows.shape, rows.tobytes()) for slot, rows in looked_up.items()}

    assert run(empty_at_odd_address) == run(np.empty)


layout_strategy = st.tuples(st.sampled_from(["<i8", ">i8", "<i4", "u1", "<u8"]),  # ids
                            st.sampled_from(["<f4", ">f4", "<f2", ">f8"]),  # rows
                            st.integers(0, 9), st.integers(0, 9),  # their addresses
                            st.integers(1, 3), st.integers(1, 3), st.booleans())  # steps, rows in Fortran order


@given(merged=st.booleans(), sizes=st.tuples(st.integers(0, 5), st.integers(0, 5)),
       layouts=st.tuples(layout_strategy, layout_strategy), dedup=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=100, deadline=None)
def test_slots_in_any_layout_read_as_their_values(merged, sizes, layouts, dedup, seed):
    # Each slot's ids and rows are read as the numbers they hold, whatever their type, byte
    # order, address, stride or order: the same as plain int64 and float32 copies of them.
    rng = np.random.default_rng(seed)
    configs = {"a": make_config([(2, "adagrad", "zeros")], [0.1]), "b": make_config([(2, "sgd", "zeros")], [0.5])}
    plain, odd = {}, {}
    for slot, n, (id_type, row_type, id_at, row_at, id_step, row_step, fortran) in zip("ab", sizes, layouts):
        ids, rows = rng.integers(0, 50, n), rng.integers(-20, 20, (n, 2)).astype(F32)
        plain[slot] = (ids, rows)
        odd[slot] = (laid_out(ids, id_type, id_at, id_step), laid_out(rows, row_type, row_at, row_step, fortran))

    def run(batch):
        table = MergedMultiTypeHashTable(configs, multi_type_factory) if merged else MultiTypeHashTable(configs, factory)
        table.assign(batch)
        table.assign_add(batch)
        table.apply_gradients(batch, 1, enable_dedup=dedup)
        looked_up = table.lookup({slot: ids for slot, (ids, _) in batch.items()})
        everything = table.lookup({slot: np.arange(50) for slot in batch})
        return [{slot: (rows.shape, rows.tobytes()) for slot, rows in got.items()} for got in (looked_up, everything)]

    assert run(odd) == run(plain)


def test_the_core_calls_over_several_tables_refuse_arrays_they_cannot_read_and_change_nothing():
    # mtht.hash_table converts every argument before these calls; the binding still reads
    # each array's type, order, layout and shape itself, so a call that slipped past the
    # conversions raises instead of reading memory as what it is not.
    t1, t2 = (hash_table_from_config(make_config([(2, "adagrad", "zeros")], [0.1]), name_suffix=s) for s in "ab")
    ids, rows = np.array([1, 2, 3], np.int64), np.ones((3, 2), np.float32)
    rates = np.array([0.1], np.float32)
    out = np.zeros((3, 2), np.float32)
    first_out = np.zeros((3, 2), np.float32)

    def lookup(second_ids, second_out):  # a second part, after a good one
        mtht._core.lookup_tables([t1._core, t2._core], [ids, second_ids], [first_out, second_out])

    def write(second_ids, second_rows, second_rates):
        mtht._core.write_tables([(t1._core, "assign", ids, rows, None),
                                 (t2._core, "apply_gradients", second_ids, second_rows, second_rates)], 0, 0, False)

    refusals = ([(lookup, (bad, out)) for bad in _unreadable_arrays(3, 0, np.int64)]
                + [(write, (bad, rows, rates)) for bad in _unreadable_arrays(3, 0, np.int64)]
                + [(lookup, (ids, bad)) for bad in _unreadable_arrays(3, 2, np.float32)]
                + [(write, (ids, bad, rates)) for bad in _unreadable_arrays(3, 2, np.float32)]
                + [(write, (ids, rows, bad)) for bad in _unreadable_arrays(1, 0, np.float32)])
    for call, arguments in refusals:
        with pytest.raises((ValueError, TypeError, BufferError)):
            call(*arguments)
    read_only = np.zeros((3, 2), np.float32)
    read_only.flags.writeable = False
    with pytest.raises((ValueError, BufferError)):  # a lookup writes its rows there
        lookup(ids, read_only)
    with pytest.raises(ValueError, match=r"shape \(3, 2\)"):
        lookup(ids, np.zeros((2, 2), np.float32))
    assert len(t1) == len(t2) == 0
    # Read-only ids, rows and rates are read as they are; the same calls with good arrays work.
    for a in (ids, rows, rates):
        a.flags.writeable = False
    write(ids, rows, rates)
    lookup(ids, out)
    np.testing.assert_array_equal(first_out, rows)
    alone = hash_table_from_config(make_config([(2, "adagrad", "zeros")], [0.1]), name_suffix="c")
    np.testing.assert_array_equal(out, alone.apply_gradients(ids, rows, 0).lookup(ids))
    assert not np.array_equal(out, np.zeros_like(out))


@pytest.mark.parametrize("accumulate", [False, True])
def test_fused_apply_gradient_with_one_table_named_twice_updates_it_in_list_order(accumulate):
    # The same table as table 0 and table 1 of a fused update: its blocks as table 0 (in
    # shard order) are applied first, then its blocks as table 1, each block on its own when
    # gradients are accumulated.
    def build():
        return hash_table_from_config(make_config([(3, "adagrad", "random_uniform")], [0.3], random_seed=5))

    fused_table, reference = build(), build()
    rng = np.random.default_rng(17)
    k_tables, n_shards = 2, 2
    counts = [700, 300, 0, 900]  # [shard][table]
    ids = rng.integers(0, 400, size=sum(counts)).astype(np.int64)
    grads = rng.standard_normal(3 * ids.size).astype(F32)
    blocks = _blocks(counts, k_tables, n_shards)
    for k in range(k_tables):
        mine = [(start, stop) for n, kk, start, stop in blocks if kk == k]
        if accumulate:
            for start, stop in mine:
                reference.apply_gradients(ids[start:stop], grads[3 * start:3 * stop].reshape(-1, 3), 2,
                                          enable_dedup=True, req_time=8)
        else:
            rows = np.concatenate([np.arange(start, stop) for start, stop in mine])
            reference.apply_gradients(ids[rows], grads.reshape(-1, 3)[rows], 2, req_time=8)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    fused_apply_gradient([fused_table, fused_table], ids, ids, counts, grads, offsets, 3 * offsets,
                         [0.3, 0.3], 8, 2, n_shards, enable_grad_accumulation=accumulate)
    every_id = np.arange(400)
    assert table_state(fused_table, every_id) == table_state(reference, every_id)


def test_multi_type_fused_apply_gradient_uses_every_slots_learning_rates():
    decay = PolynomialDecay(0.1, 10, end_learning_rate=1.1)
    slot_to_config = {
        "b": make_config([(2, "sgd", "zeros"), (1, "adagrad", "ones")], [decay, 0.25]),
        "a": make_config([(1, "sgd", "zeros")], [2.0]),
    }
    fused = MultiTypeHashTable(slot_to_config, factory)
    separate = MultiTypeHashTable(slot_to_config, factory)
    np.testing.assert_allclose(fused.learning_rates(5), [2.0, 0.6, 0.25], rtol=1e-6)
    ids = [1, 2, 1, 2]
    fss = [1, 1, 1, 1]  # shard 0: a[1], b[2]; shard 1: a[1], b[2]
    _, _, id_offsets, emb_offsets, indices = fused.fused_lookup(ids, fss, 2)
    grads = np.array([1, 1, 2, 3, 0.5, -1, 1, 2], dtype=F32)
    fused.fused_apply_gradient(ids, indices, fss, grads, id_offsets, emb_offsets, global_step=5,
                               req_time=9, num_of_shards=2)
    separate.apply_gradients({"a": ([1], [[1]]), "b": ([2], [[1, 2, 3]])}, 5, req_time=9)
    separate.apply_gradients({"a": ([1], [[0.5]]), "b": ([2], [[-1, 1, 2]])}, 5, req_time=9)
    for slot in ("a", "b"):
        assert table_state(fused._tables[slot], [1, 2]) == table_state(separate._tables[slot], [1, 2])
    np.testing.assert_allclose(fused.lookup({"a": [1]})["a"], [[-3.0]])


# ---------------------------------------------------------------------------------------------
# Merge keys
# ---------------------------------------------------------------------------------------------


def _groups(slot_to_config) -> list:
    """The slots of each merged table, as sorted lists, sorted."""
    merged = MergedMultiTypeHashTable(slot_to_config, lambda d: None)
    by_name = {}
    for slot, name in merged.slot_mapping.items():
        by_name.setdefault(name, []).append(slot)
    return sorted(sorted(v) for v in by_name.values())


def _adagrad_config(optimizer, table_kwargs=None, lrs=(0.1,), names=None):
    segment = entry.CombineAsSegment(4, entry.ZerosInitializer(), optimizer, entry.Fp32Compressor())
    table_config = entry.EmbeddingHashTableConfig(entry_config=entry.EntryConfig(segments=[segment]),
                                                  **(table_kwargs or {}))
    return entry.HashTableConfigInstance(table_config, list(lrs), extra_restore_names=names)


def test_equal_configs_written_differently_merge():
    shared_fn = lambda step: 0.1  # noqa: E731
    slot_to_config = {
        "int_lr": generate_test_hash_table_config(2, learning_rate=1),
        "float_lr": generate_test_hash_table_config(2, learning_rate=1.0),
        "numpy_lr": generate_test_hash_table_config(2, learning_rate=np.float32(1.0)),
        "adagrad_omitted": _adagrad_config(entry.AdagradOptimizer()),
        "adagrad_explicit": _adagrad_config(
            entry.AdagradOptimizer(initial_accumulator_value=0.1, hessian_compression_times=1,
                                   warmup_steps=0, weight_decay_factor=0.0),
            table_kwargs=dict(initial_capacity=1000, random_seed=0, allow_non_finite=False,
                              slot_expire_time_config=entry.SlotExpireTimeConfig(
                                  default_expire_time=36500, slot_expire_times={5: 36500})),
            names=["another_name"]),
        "decay_a": generate_test_hash_table_config(
            3, learning_rate=PolynomialDecay(0.01, 20, 0.05)),
        "decay_b": generate_test_hash_table_config(
            3, learning_rate=PolynomialDecay(0.01, 20.0, end_learning_rate=0.05, power=1, name="x")),
        "fn_a": generate_test_hash_table_config(5, learning_rate=shared_fn),
        "fn_b": generate_test_hash_table_config(5, learning_rate=shared_fn),
    }
    assert _groups(slot_to_config) == [
        ["adagrad_explicit", "adagrad_omitted"],
        ["decay_a", "decay_b"],
        ["float_lr", "int_lr", "numpy_lr"],
        ["fn_a", "fn_b"],
    ]


@pytest.mark.parametrize("other", [
    lambda: generate_test_hash_table_config(2, learning_rate=0.5),
    lambda: generate_test_hash_table_config(3),
    lambda: generate_test_hash_table_config(2, learning_rate=PolynomialDecay(1.0, 10)),
    lambda: generate_test_hash_table_config(2, learning_rate=lambda: 1.0),
    lambda: entry.HashTableConfigInstance(entry.EmbeddingHashTableConfig(entry_config=entry.EntryConfig(
        segments=[entry.CombineAsSegment(2, entry.OnesInitializer(), entry.SgdOptimizer(),
                                         entry.Fp32Compressor())])), [1.0]),
    lambda: entry.HashTableConfigInstance(entry.EmbeddingHashTableConfig(entry_config=entry.EntryConfig(
        segments=[entry.CombineAsSegment(2, entry.ZerosInitializer(), entry.AdagradOptimizer(),
                                         entry.Fp32Compressor())])), [1.0]),
    lambda: entry.HashTableConfigInstance(entry.EmbeddingHashTableConfig(entry_config=entry.EntryConfig(
        segments=[entry.CombineAsSegment(2, entry.ZerosInitializer(), entry.SgdOptimizer(),
                                         entry.Fp32Compressor())]), random_seed=1), [1.0]),
    lambda: entry.HashTableConfigInstance(entry.EmbeddingHashTableConfig(entry_config=entry.EntryConfig(
        segments=[entry.CombineAsSegment(2, entry.ZerosInitializer(), entry.SgdOptimizer(),
                                         entry.Fp32Compressor())]),
        slot_expire_time_config=entry.SlotExpireTimeConfig(default_expire_time=7)), [1.0]),
    lambda: entry.HashTableConfigInstance(entry.EmbeddingHashTableConfig(entry_config=entry.EntryConfig(
        segments=[entry.CombineAsSegment(1, entry.ZerosInitializer(), entry.SgdOptimizer(),
                                         entry.Fp32Compressor()),
                  entry.CombineAsSegment(1, entry.ZerosInitializer(), entry.SgdOptimizer(),
                                         entry.Fp32Compressor())])), [1.0, 1.0]),
], ids=["lr", "dim", "schedule", "other_callable", "initializer", "optimizer", "seed", "expiry",
        "segments"])
def test_different_configs_do_not_merge(other):
    slot_to_config = {"base": generate_test_hash_table_config(2), "other": other()}
    assert _groups(slot_to_config) == [["base"], ["other"]]


def test_adagrad_parameters_are_part_of_the_key():
    slot_to_config = {
        "a": _adagrad_config(entry.AdagradOptimizer()),
        "b": _adagrad_config(entry.AdagradOptimizer(initial_accumulator_value=0.2)),
        "c": _adagrad_config(entry.AdagradOptimizer(weight_decay_factor=0.01)),
    }
    assert _groups(slot_to_config) == [["a"], ["b"], ["c"]]


def test_tables_of_other_kinds_from_the_factory_are_called_slot_by_slot():
    # The factory's tables are what the multi-type table reads and writes: a HashTable
    # subclass that overrides its methods, or another BaseHashTable altogether.
    calls = []

    class LoggingTable(mtht.HashTable):
        def apply_gradients(self, ids, grads, global_step, *args, **kwargs):
            calls.append("apply_gradients")
            return super().apply_gradients(ids, grads, global_step, *args, **kwargs)

        def lookup(self, ids, *args, **kwargs):
            calls.append("lookup")
            return super().lookup(ids, *args, **kwargs)

    logged = MultiTypeHashTable({"a": generate_test_hash_table_config(1)},
                                lambda slot, config: LoggingTable(config, name="MonolithHashTable_" + slot))
    logged.apply_gradients({"a": ([1], [1.0])}, 0)
    assert logged.lookup({"a": [1]})["a"].tolist() == [[-1.0]]
    assert calls == ["apply_gradients", "lookup"]

    class DictTable(mtht.BaseHashTable):
        def __init__(self):
            self.rows = {}

        dim_size = property(lambda self: 1)

        def lookup(self, ids, use_multi_threads=False, enable_dedup=False, out=None):
            return np.array([[self.rows.get(int(i), 0.0)] for i in ids], np.float32).reshape(-1, 1)

        def assign(self, ids, values, req_time=None):
            self.rows.update({int(i): float(v) for i, v in zip(ids, np.ravel(values))})
            return self

        def assign_add(self, ids, values, req_time=None):
            for i, v in zip(ids, np.ravel(values)):
                self.rows[int(i)] = self.rows.get(int(i), 0.0) + float(v)
            return self

        def apply_gradients(self, ids, grads, global_step, use_multi_threads=False, enable_dedup=False,
                            req_time=None):
            return self.assign_add(ids, -np.ravel(grads))

        def as_op(self):
            return self

    other = MultiTypeHashTable({"a": generate_test_hash_table_config(1), "b": generate_test_hash_table_config(1)},
                               lambda slot, config: DictTable())
    other.assign({"a": ([1], [2.0])}).assign_add({"a": ([1], [1.0]), "b": ([5], [4.0])})
    other.apply_gradients({"b": ([5], [1.0])}, 0)
    assert {k: v.tolist() for k, v in other.lookup({"a": [1], "b": [5]}).items()} == {"a": [[3.0]], "b": [[3.0]]}


def test_errors_of_multi_slot_and_fused_calls_say_what_and_where():
    t = MultiTypeHashTable({"a": generate_test_hash_table_config(1), "b": generate_test_hash_table_config(2)},
                           factory)
    merged = MergedMultiTypeHashTable({"a": generate_test_hash_table_config(1),
                                       "b": generate_test_hash_table_config(2)}, multi_type_factory)
    ids, fss = [1, 2], [1, 1]
    _, _, id_offsets, emb_offsets, indices = t.fused_lookup(ids, fss, 1)
    cases = [
        (lambda: t.fused_apply_gradient(ids, [2, 1], fss, [1, 1, 1], id_offsets, emb_offsets, 0, 0, 1),
         "indices does not match ids"),
        (lambda: t.fused_apply_gradient(ids, indices, fss, [1, 1, np.nan], id_offsets, emb_offsets, 0, 0, 1),
         r"block 1 \(shard 0, table 1: 'MonolithHashTable_b'\), row 0"),
        (lambda: t.lookup({"a": [1], "b": [[1, 2]]}), "slot 'b': ids must be a 1-D array"),
        (lambda: merged.apply_gradients({"b": ([1], [1.0, 2.0, 3.0])}, 0), "slot 'b': grads must have shape"),
        (lambda: MultiTypeHashTable({}, factory).fused_apply_gradient([], [], [], [], [0], [0], 0, 0, 1),
         "at least one table"),
        (lambda: t.fused_lookup(ids, fss, 2**62), "2 \\* 4611686018427387904 entries, got 2"),
        (lambda: t.fused_lookup([], [], 0), "num_of_shards must be at least 1, got 0"),
        (lambda: fused_lookup([hash_table_from_config(generate_test_hash_table_config(16384))],
                              np.zeros(2**31 // 16384 + 1, np.int64), [2**31 // 16384 + 1], 1),
         r"at most 2\^31 - 1 ids and 2\^31 - 1 floats of rows \(its offsets are int32\)"),
        (lambda: MultiTypeHashTable({}, factory).fused_lookup([], [], -1), "num_of_shards must be at least 1, got -1"),
        (lambda: t.apply_gradients({"a": ([1], [1.0], "extra")}, 0), r"slot 'a': expected a pair \(ids, grads\)"),
        (lambda: merged.apply_gradients({"a": ([1], [1.0], "extra")}, 0), r"slot 'a': expected a pair"),
        (lambda: merged.assign({"a": [1]}), r"slot 'a': expected a pair \(ids, values\), got 1 items"),
        # a vector of values is a column only for a slot of dim 1
        (lambda: t.assign({"a": ([1], [1.0]), "b": ([1, 2], np.array([1.0, 2.0]))}),
         r"slot 'b': values must have shape \(2, 2\) for 2 ids of dim 2, got shape \(2,\)"),
        (lambda: merged.assign({"a": ([1], [1.0]), "b": ([1, 2], np.array([1.0, 2.0]))}),
         r"slot 'b': values must have shape \(2, 2\)"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert t.lookup({"a": [1, 2]})["a"].tolist() == [[0], [0]]  # nothing changed


def test_arguments_of_the_wrong_kind_are_type_errors_naming_them(tmp_path):
    t = MultiTypeHashTable({"a": generate_test_hash_table_config(1)}, factory)
    merged = MergedMultiTypeHashTable({"a": generate_test_hash_table_config(1)}, multi_type_factory)
    cases = [
        (lambda: t.lookup([1, 2]), "slot_to_id must be a mapping {slot: ids}, got list"),
        (lambda: merged.lookup(["a"]), "slot_to_id must be a mapping"),
        (lambda: t.assign(None), "slot_to_id_and_value must be a mapping"),
        (lambda: merged.apply_gradients([([1], [1.0])], 0), "slot_to_id_and_grad must be a mapping"),
        (lambda: t.apply_gradients({"a": ([1], [[1.0]])}), r"apply_gradients\(slot_to_id_and_grad, global_step, "
                                                           r".*missing 1 required positional argument: 'global_step'"),
        (lambda: t.assign({"a": ([1], [[1.0]])}, bogus=1), r"assign\(slot_to_id_and_value, req_time=None\): got an "
                                                          "unexpected keyword argument 'bogus'"),
        (lambda: MergedMultiTypeHashTable({"a": 5}, multi_type_factory), "config of slot 'a' must be a "
                                                                         "HashTableConfigInstance, got int"),
        (lambda: MultiTypeHashTable({"a": generate_test_hash_table_config(1)}, lambda s, c: None),
         "hash_table_factory returned NoneType for slot 'a', not a table"),
        (lambda: MultiTypeHashTable([("a", 1)], factory), "slot_to_config must be a mapping"),
        (lambda: mtht.HashFilter(1, [1, 2]), "slot_occurrence_thresholds must be a mapping"),
        (lambda: mtht.checkpoint.save_multi_type(None, str(tmp_path)), "save_multi_type takes a MultiTypeHashTable"),
        (lambda: mtht.checkpoint.restore_multi_type([], str(tmp_path)), "restore_multi_type takes a MultiTypeHashTable"),
        (lambda: t.lookup({"a": {1, 2}}), "slot 'a': ids must be a 1-D array of integers, got set"),
    ]
    for call, message in cases:
        with pytest.raises(TypeError, match=message):
            call()
    assert t.lookup({"a": [1]})["a"].tolist() == [[0]]


def test_an_empty_batch_of_a_slot_may_come_as_empty_lists():
    t = MultiTypeHashTable({"a": generate_test_hash_table_config(2), "b": generate_test_hash_table_config(2)}, factory)
    t.apply_gradients({"a": ([], []), "b": ([1], [[1.0, 1.0]])}, global_step=0)
    with pytest.raises(ValueError, match=r"slot 'a': grads must have shape \(0, 2\)"):
        t.apply_gradients({"a": ([], np.zeros((0, 3))), "b": ([1], [[1.0, 1.0]])}, global_step=0)
    assert t.lookup({"a": [1], "b": [1]})["b"].tolist() == [[-1.0, -1.0]] and t._tables["a"].size() == 0


def test_learning_rates_given_as_arrays_merge_by_identity():
    # An array may be changed after the tables are built, as a callable may change what it
    # returns: two arrays of one value do not merge (merged, b would train at a's rate).
    rate_a, rate_b = np.array(0.1, np.float32), np.array(0.1, np.float32)
    slot_to_config = {"a": generate_test_hash_table_config(1, learning_rate=rate_a),
                      "b": generate_test_hash_table_config(1, learning_rate=rate_b),
                      "c": generate_test_hash_table_config(1, learning_rate=rate_a)}
    assert _groups(slot_to_config) == [["a", "c"], ["b"]]
    merged = MergedMultiTypeHashTable(slot_to_config, multi_type_factory)
    rate_b[...] = 1.0
    merged.apply_gradients({"a": ([1], [1.0]), "b": ([2], [1.0])}, 0)
    assert merged.lookup({"b": [2]})["b"].tolist() == [[-1.0]]


def test_groups_that_would_share_a_merged_name_are_refused():
    # The merged name is md5 of the slots joined by commas: slot "a,b" alone and slots "a"
    # and "b" together would share one table (and "a" would train at "a,b"'s rate).
    slot_to_config = {"a,b": generate_test_hash_table_config(1, learning_rate=1.0),
                      "a": generate_test_hash_table_config(1, learning_rate=0.1),
                      "b": generate_test_hash_table_config(1, learning_rate=0.1)}
    with pytest.raises(ValueError, match="same merged name"):
        MergedMultiTypeHashTable(slot_to_config, multi_type_factory)


def test_distinct_callables_do_not_merge_but_one_callable_does():
    def fn(step):
        return 0.1

    def same_body(step):
        return 0.1

    slot_to_config = {
        "x": generate_test_hash_table_config(2, learning_rate=fn),
        "y": generate_test_hash_table_config(2, learning_rate=fn),
        "z": generate_test_hash_table_config(2, learning_rate=same_body),
    }
    assert _groups(slot_to_config) == [["x", "y"], ["z"]]


# ---------------------------------------------------------------------------------------------
# Structure: dims, hooks, lookups with a bundle
# ---------------------------------------------------------------------------------------------


def test_get_table_dim_sizes_sorted_slot_order():
    hash_table = MultiTypeHashTable({
        "c": generate_test_hash_table_config(2),
        "a": generate_test_hash_table_config(1),
        "b": generate_test_hash_table_config(3),
    }, factory)
    assert hash_table.get_table_dim_sizes() == [1, 3, 2]


def test_factory_called_in_sorted_slot_order():
    calls = []

    def recording_factory(slot, config):
        calls.append(slot)
        return factory(slot, config)

    MultiTypeHashTable({"z": generate_test_hash_table_config(1), "a": generate_test_hash_table_config(1),
                        "m": generate_test_hash_table_config(1)}, recording_factory)
    assert calls == ["a", "m", "z"]


def test_a_merged_group_shares_what_its_table_keeps_for_all_entries(tmp_path):
    # What a table keeps for all its entries is one per merged group (as in Monolith), so a
    # slot that goes without ids follows its group's writes where a table of its own would
    # not: HashNet's scale, and the clock by which a save drops expired entries.
    from mtht.checkpoint import restore_multi_type, save_multi_type

    def one_bit():
        segment = entry.CombineAsSegment(1, entry.ZerosInitializer(), entry.SgdOptimizer(),
                                         entry.OneBitCompressor(step_size=200, amplitude=0.1))
        return entry.HashTableConfigInstance(
            entry.EmbeddingHashTableConfig(entry_config=entry.EntryConfig(segments=[segment])), [1.0])

    def expiring():
        segment = entry.CombineAsSegment(1, entry.ZerosInitializer(), entry.SgdOptimizer(), entry.Fp32Compressor())
        return entry.HashTableConfigInstance(entry.EmbeddingHashTableConfig(
            entry_config=entry.EntryConfig(segments=[segment]),
            slot_expire_time_config=entry.SlotExpireTimeConfig(default_expire_time=1)), [1.0])

    builds = {"merged": lambda slots: MergedMultiTypeHashTable(slots, multi_type_factory),
              "per slot": lambda slots: MultiTypeHashTable(slots, factory)}
    # HashNet: 0.1 * tanh(scale * 2), the scale sqrt(1 + 0.005 * 600) = 2 once a write at
    # step 600 reached the table (slot b's in the merged group, by slot a's write).
    expected_b = {"merged": 0.1 * math.tanh(2 * 2.0), "per slot": 0.1 * math.tanh(1 * 2.0)}
    for how, build in builds.items():
        model = build({"a": one_bit(), "b": one_bit()})
        model.assign({"a": ([1], [[2.0]]), "b": ([2], [[2.0]])})
        model.apply_gradients({"a": ([1], [[0.0]])}, global_step=600)
        got = model.lookup({"a": [1], "b": [2]})
        np.testing.assert_allclose(got["a"], [[0.1 * math.tanh(2 * 2.0)]], rtol=1e-6)
        np.testing.assert_allclose(got["b"], [[expected_b[how]]], rtol=1e-6, err_msg=how)
    # Expiry after a day: slot b's entry, last written at 100, expires by slot a's write at
    # 10,000,000 in the merged group only.
    for how, build in builds.items():
        model = build({"a": expiring(), "b": expiring()})
        model.assign({"a": ([1], [[1.0]])}, req_time=10_000_000)
        model.assign({"b": ([2], [[2.0]])}, req_time=100)
        save_multi_type(model, str(tmp_path / how))
        restored = build({"a": expiring(), "b": expiring()})
        restore_multi_type(restored, str(tmp_path / how))
        kept = restored.lookup({"a": [1], "b": [2]})
        assert kept["a"].tolist() == [[1.0]]
        assert kept["b"].tolist() == ([[0.0]] if how == "merged" else [[2.0]]), how


def test_merged_get_table_dim_sizes_in_merged_name_order():
    slot_to_config = {
        "slot0": generate_test_hash_table_config(1),
        "slot1": generate_test_hash_table_config(2),
        "slot2": generate_test_hash_table_config(2),
        "slot3": generate_test_hash_table_config(5),
    }
    merged = MergedMultiTypeHashTable(slot_to_config, lambda d: None)  # works without a table
    dims = {md5("slot0"): 1, md5("slot1,slot2"): 2, md5("slot3"): 5}
    assert merged.get_table_dim_sizes() == [dims[name] for name in sorted(dims)]
    inner = MergedMultiTypeHashTable(slot_to_config, multi_type_factory)._table
    assert inner.get_table_dim_sizes() == merged.get_table_dim_sizes()


class _Group(BaseMultiTypeHashTable):
    """A minimal multi-type table holding other multi-type tables in ``_tables``."""

    def __init__(self, tables):
        self._tables = tables

    def lookup(self, slot_to_id):
        return {}

    def assign(self, slot_to_id_and_value, *args, **kwargs):
        return self

    def assign_add(self, slot_to_id_and_value, *args, **kwargs):
        return self

    def reinitialize(self, slot, ids):
        raise NotImplementedError

    def apply_gradients(self, slot_to_id_and_grad, *args, **kwargs):
        return self

    def as_op(self, name=None):
        return self

    def get_table_dim_sizes(self):
        return []


def test_get_queue_hooks_through_nested_tables():
    merged = MergedMultiTypeHashTable({"slot0": generate_test_hash_table_config(1)}, multi_type_factory)
    plain = MultiTypeHashTable({"slot0": generate_test_hash_table_config(1)}, factory)
    group = _Group([merged, plain])
    assert group.get_queue_hooks() == []
    merged.add_queue_hook("outer")
    merged._table.add_queue_hook("inner")
    merged._table.add_queue_hook("inner2")
    plain.add_queue_hook("plain")
    group.add_queue_hook("group")
    assert merged.get_queue_hooks() == ["outer", "inner", "inner2"]
    assert group.get_queue_hooks() == ["group", "outer", "inner", "inner2", "plain"]
    # A copy: changing it changes no table.
    group.get_queue_hooks().append("x")
    merged.get_queue_hooks().clear()
    assert group.get_queue_hooks() == ["group", "outer", "inner", "inner2", "plain"]


def test_merged_lookup_returns_the_bundle_only_when_it_holds_something():
    merged = MergedMultiTypeHashTable({"slot0": generate_test_hash_table_config(1),
                                       "slot1": generate_test_hash_table_config(1)}, multi_type_factory)
    merged.assign({"slot0": ([1], [[1.0]]), "slot1": ([2, 3], [[2.0], [3.0]])})
    plain = merged.lookup({"slot1": [3, 2, 9]})
    assert isinstance(plain, dict)
    assert_dicts_equal(plain, {"slot1": [[3], [2], [0]]})
    empty_bundle = {}
    assert isinstance(merged.lookup({"slot0": [1]}, auxiliary_bundle=empty_bundle), dict)
    assert empty_bundle == {}
    bundle = {"step": 3}
    values, returned = merged.lookup({"slot0": [1], "slot1": [2]}, auxiliary_bundle=bundle)
    assert returned is bundle
    assert returned == {"step": 3}
    assert_dicts_equal(values, {"slot0": [[1]], "slot1": [[2]]})


def test_merged_lookup_of_a_slot_with_no_ids():
    merged = MergedMultiTypeHashTable({"slot0": generate_test_hash_table_config(2),
                                       "slot1": generate_test_hash_table_config(2)}, multi_type_factory)
    merged.assign_add({"slot0": ([1], [[1.0, 2.0]]), "slot1": ([], np.zeros((0, 2), F32))})
    values = merged.lookup({"slot0": [], "slot1": [1]})
    assert values["slot0"].shape == (0, 2)
    np.testing.assert_array_equal(values["slot1"], [[1, 2]])


def test_as_op_returns_the_table():
    hash_table = three_slot_table()
    assert hash_table.as_op() is hash_table
    assert hash_table.as_op("name") is hash_table
    merged = MergedMultiTypeHashTable({"slot0": generate_test_hash_table_config(1)}, multi_type_factory)
    assert merged.as_op() is merged


# ---------------------------------------------------------------------------------------------
# Errors: unknown slots, reinitialize, bad writes
# ---------------------------------------------------------------------------------------------


def _filled_multi_type():
    hash_table = two_slot_table()
    hash_table.assign({"slot0": ([1], [[5.0]]), "slot1": ([2], [[6.0, 7.0]])}, req_time=3)
    return hash_table


def _multi_type_snapshot(hash_table):
    return {slot: (len(t), table_state(t, np.arange(-1, 12))) for slot, t in hash_table._tables.items()}


_UNKNOWN_SLOT_CALLS = {
    "lookup": lambda t: t.lookup({"slot0": [1], "zzz_unknown": [1]}),
    "assign": lambda t: t.assign({"slot0": ([1], [[9.0]]), "zzz_unknown": ([1], [[1.0]])}),
    "assign_add": lambda t: t.assign_add({"slot0": ([1], [[9.0]]), "zzz_unknown": ([1], [[1.0]])}),
    "apply_gradients": lambda t: t.apply_gradients(
        {"slot0": ([1, 4], [[9.0], [1.0]]), "zzz_unknown": ([1], [[1.0]])}, global_step=0),
}


@pytest.mark.parametrize("call", sorted(_UNKNOWN_SLOT_CALLS))
def test_unknown_slot_raises_key_error_and_changes_nothing(call):
    hash_table = _filled_multi_type()
    before = _multi_type_snapshot(hash_table)
    with pytest.raises(KeyError, match="zzz_unknown"):
        _UNKNOWN_SLOT_CALLS[call](hash_table)
    assert _multi_type_snapshot(hash_table) == before


@pytest.mark.parametrize("call", sorted(_UNKNOWN_SLOT_CALLS))
def test_merged_unknown_slot_raises_key_error_and_changes_nothing(call):
    merged = MergedMultiTypeHashTable({"slot0": generate_test_hash_table_config(1),
                                       "slot1": generate_test_hash_table_config(2)}, multi_type_factory)
    merged.assign({"slot0": ([1], [[5.0]]), "slot1": ([2], [[6.0, 7.0]])}, req_time=3)
    before = _multi_type_snapshot(merged._table)
    with pytest.raises(KeyError, match="zzz_unknown"):
        _UNKNOWN_SLOT_CALLS[call](merged)
    assert _multi_type_snapshot(merged._table) == before


def test_reinitialize_is_not_supported():
    with pytest.raises(NotImplementedError):
        three_slot_table().reinitialize("slot0", [1])
    merged = MergedMultiTypeHashTable({"slot0": generate_test_hash_table_config(1)}, multi_type_factory)
    with pytest.raises(NotImplementedError):
        merged.reinitialize("slot0", [1])


_BAD_WRITES = {
    "wrong_shape": lambda t: t.apply_gradients(
        {"slot0": ([1], [[1.0]]), "slot1": ([2], [[1.0, 2.0, 3.0]])}, global_step=0),
    "transposed": lambda t: t.assign(
        {"slot0": ([1], [[1.0]]), "slot1": ([2, 3, 4], np.ones((3, 2), F32).T)}),
    "nan_grad": lambda t: t.apply_gradients(
        {"slot0": ([1], [[1.0]]), "slot1": ([2], [[np.nan, 2.0]])}, global_step=0),
    "inf_value": lambda t: t.assign_add({"slot0": ([1], [[1.0]]), "slot1": ([2], [[np.inf, 2.0]])}),
}


@pytest.mark.parametrize("call", sorted(_BAD_WRITES))
def test_bad_write_in_one_slot_changes_no_slot(call):
    hash_table = _filled_multi_type()
    before = _multi_type_snapshot(hash_table)
    with pytest.raises(ValueError):
        _BAD_WRITES[call](hash_table)
    assert _multi_type_snapshot(hash_table) == before


@pytest.mark.parametrize("call", sorted(_BAD_WRITES))
def test_merged_bad_write_in_one_slot_changes_nothing(call):
    merged = MergedMultiTypeHashTable({"slot0": generate_test_hash_table_config(1),
                                       "slot1": generate_test_hash_table_config(2)}, multi_type_factory)
    merged.assign({"slot0": ([1], [[5.0]]), "slot1": ([2], [[6.0, 7.0]])}, req_time=3)
    before = _multi_type_snapshot(merged._table)
    with pytest.raises(ValueError):
        _BAD_WRITES[call](merged)
    assert _multi_type_snapshot(merged._table) == before


@pytest.mark.parametrize("kwargs,error", [(dict(global_step=1.5), TypeError), (dict(global_step=True), TypeError),
                                          (dict(global_step=0, req_time=2**63), ValueError),
                                          (dict(global_step=0, unknown=1), TypeError), (dict(), TypeError)])
def test_bad_arguments_shared_by_the_slots_change_no_slot(kwargs, error):
    # The arguments after the rows are converted once for all the slots, before any write.
    hash_table = _filled_multi_type()
    before = _multi_type_snapshot(hash_table)
    with pytest.raises(error):
        hash_table.apply_gradients({"slot0": ([1], [[1.0]]), "slot1": ([2], [[1.0, 2.0]])}, **kwargs)
    assert _multi_type_snapshot(hash_table) == before


def _nan_after_step_5(step):
    return float("nan") if step > 5 else 0.1


def test_non_finite_learning_rate_in_one_slot_changes_no_slot():
    # "a" comes first; "b"'s learning rate is NaN at step 10. The ValueError must come
    # before "a" is stepped.
    hash_table = MultiTypeHashTable({"a": generate_test_hash_table_config(1),
                                     "b": generate_test_hash_table_config(1, learning_rate=_nan_after_step_5)},
                                    factory)
    hash_table.assign({"a": ([1], [[5.0]]), "b": ([1], [[5.0]])})
    before = _multi_type_snapshot(hash_table)
    with pytest.raises(ValueError, match="not finite"):
        hash_table.apply_gradients({"a": ([1, 2], [[1.0], [1.0]]), "b": ([1], [[1.0]])}, global_step=10)
    assert _multi_type_snapshot(hash_table) == before
    with pytest.raises(ValueError, match="not finite"):
        hash_table.fused_apply_gradient([1, 1], [1, 1], [1, 1], [1.0, 1.0], [0, 1, 2], [0, 1, 2], 10, 0, 1)
    assert _multi_type_snapshot(hash_table) == before


@pytest.mark.parametrize("merged", [False, True], ids=["multi_type", "merged"])
@pytest.mark.parametrize("method", ["assign", "assign_add", "apply_gradients"])
def test_a_bad_slot_is_named_with_its_own_row(merged, method):
    # NaN in "c"'s second row: the error names "c" and row 1 (not the row of the batch the
    # slots of a merged table make together), and no slot changes. A wrong shape names the
    # slot too.
    configs = {s: generate_test_hash_table_config(2) for s in ("a", "b", "c")}
    table = (MergedMultiTypeHashTable(configs, multi_type_factory) if merged
             else MultiTypeHashTable(configs, factory))
    args = (1,) if method == "apply_gradients" else ()
    what = "gradients" if method == "apply_gradients" else "values"
    data = {s: ([1, 2], [[1.0, 1.0], [2.0, 2.0]]) for s in ("a", "b")}
    with pytest.raises(ValueError, match=rf"slot 'c': {what} contain NaN or Inf \(row 1\)"):
        getattr(table, method)({**data, "c": ([3, 4], [[1.0, 1.0], [np.nan, 1.0]])}, *args)
    with pytest.raises(ValueError, match="slot 'c'.*shape"):
        getattr(table, method)({**data, "c": ([3, 4], [[1.0, 1.0, 1.0]] * 2)}, *args)
    assert all(rows.tolist() == [[0.0, 0.0]] * 4 for rows in table.lookup({s: [1, 2, 3, 4] for s in configs}).values())


def test_merged_rows_must_match_ids_slot_by_slot():
    # s1 has two ids and one row, s2 one id and two rows: three of each in the merged table,
    # but the rows do not belong to those ids. Must be a ValueError naming the slot.
    merged = MergedMultiTypeHashTable({"s1": generate_test_hash_table_config(1),
                                       "s2": generate_test_hash_table_config(1)}, multi_type_factory)
    for method in ("assign", "assign_add", "apply_gradients"):
        args = (0,) if method == "apply_gradients" else ()
        with pytest.raises(ValueError, match="s1"):
            getattr(merged, method)({"s1": ([1, 2], [[1.0]]), "s2": ([3], [[5.0], [6.0]])}, *args)
        assert len(merged._table._tables[merged.slot_mapping["s1"]]) == 0, method


# ---------------------------------------------------------------------------------------------
# Errors: bad fused inputs
# ---------------------------------------------------------------------------------------------

# Tables slot0 (D1), slot1 (D2), slot2 (D2); two shards:
# shard 0: slot0 [0], slot1 [], slot2 [2]; shard 1: slot0 [], slot1 [1], slot2 [3, 2].
_IDS = [0, 2, 1, 3, 2]
_FSS = [1, 0, 1, 0, 1, 2]
_ID_OFFSETS = [0, 1, 1, 2, 2, 3, 5]
_EMB_OFFSETS = [0, 1, 1, 3, 3, 5, 9]
_GRADS = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]


def _fused_table():
    return _assign_fused_state(three_slot_table())


def _good_apply_args():
    return dict(ids=list(_IDS), indices=list(_IDS), fused_slot_size=list(_FSS), id_grads=list(_GRADS),
                id_offsets=list(_ID_OFFSETS), grad_offsets=list(_EMB_OFFSETS), global_step=0, req_time=4,
                num_of_shards=2)


def test_fused_reference_layout_is_valid():
    hash_table = _fused_table()
    embeddings, recv_splits, id_offsets, emb_offsets, _ = hash_table.fused_lookup(_IDS, _FSS, 2)
    np.testing.assert_array_equal(embeddings, [1, 4, 4, 2, 2, 8, 8, 4, 4])
    np.testing.assert_array_equal(recv_splits, [3, 6])
    np.testing.assert_array_equal(id_offsets, _ID_OFFSETS)
    np.testing.assert_array_equal(emb_offsets, _EMB_OFFSETS)
    hash_table.fused_apply_gradient(**_good_apply_args())
    values = hash_table.lookup({"slot0": [0], "slot1": [1], "slot2": [2, 3]})
    assert_dicts_equal(values, {"slot0": [[0]], "slot1": [[-2, -3]],
                                "slot2": [[4 - 2 - 8, 4 - 3 - 9], [8 - 6, 8 - 7]]})


_BAD_FUSED_LOOKUPS = {
    "fss_too_short": ([0, 2, 1, 3, 2], [1, 0, 1, 0, 3], 2),
    "fss_too_long": ([0, 2, 1, 3, 2], [1, 0, 1, 0, 1, 2, 0], 2),
    "fss_for_other_shard_count": ([0, 2, 1, 3, 2], [1, 0, 1, 0, 1, 2], 3),
    "sum_below_len_ids": ([0, 2, 1, 3, 2], [1, 0, 1, 0, 1, 1], 2),
    "sum_above_len_ids": ([0, 2, 1, 3], [1, 0, 1, 0, 1, 2], 2),
    "negative_count": ([0, 2, 1, 3, 2], [1, 0, 2, 0, -1, 3], 2),
    "zero_shards": ([], [], 0),
}


@pytest.mark.parametrize("case", sorted(_BAD_FUSED_LOOKUPS))
def test_bad_fused_lookup_raises_value_error(case):
    hash_table = _fused_table()
    before = _multi_type_snapshot(hash_table)
    ids, fss, shards = _BAD_FUSED_LOOKUPS[case]
    with pytest.raises(ValueError):
        hash_table.fused_lookup(ids, fss, shards)
    with pytest.raises(ValueError):
        fused_lookup([hash_table._tables[s] for s in ("slot0", "slot1", "slot2")], ids, fss, shards)
    assert _multi_type_snapshot(hash_table) == before


def _bad(**changes):
    args = _good_apply_args()
    args.update(changes)
    return args


_BAD_FUSED_APPLIES = {
    "fss_too_short": _bad(fused_slot_size=[1, 0, 1, 0, 3]),
    "fss_too_long": _bad(fused_slot_size=_FSS + [0]),
    "sum_not_len_ids": _bad(ids=_IDS[:-1], indices=_IDS[:-1]),
    "negative_count": _bad(fused_slot_size=[1, 0, 2, 0, -1, 3]),
    "id_offsets_wrong": _bad(id_offsets=[0, 1, 1, 2, 3, 3, 5]),
    "id_offsets_short": _bad(id_offsets=_ID_OFFSETS[:-1]),
    "id_offsets_of_other_fss": _bad(fused_slot_size=[1, 0, 1, 0, 2, 1],
                                    grad_offsets=[0, 1, 1, 3, 3, 7, 9]),
    "grad_offsets_wrong": _bad(grad_offsets=[0, 1, 1, 2, 2, 3, 5]),
    "id_offsets_off_by_2_to_the_32": _bad(id_offsets=np.asarray(_ID_OFFSETS, np.int64) + (1 << 32)),
    "grad_offsets_long": _bad(grad_offsets=_EMB_OFFSETS + [9]),
    "indices_not_ids": _bad(indices=[0, 2, 1, 3, 3]),
    "indices_short": _bad(indices=_IDS[:-1]),
    "grads_too_short": _bad(id_grads=_GRADS[:-1]),
    "grads_too_long": _bad(id_grads=_GRADS + [1.0]),
    "grads_2d_wrong_size": _bad(id_grads=np.ones((3, 2), F32)),
    "nan_grad": _bad(id_grads=_GRADS[:8] + [float("nan")]),
    "inf_grad_first_block": _bad(id_grads=[float("inf")] + _GRADS[1:]),
    "zero_shards": _bad(num_of_shards=0),
}


def _assert_bad_fused_apply(hash_table, args):
    before = _multi_type_snapshot(hash_table)
    with pytest.raises(ValueError):
        hash_table.fused_apply_gradient(**args)
    assert _multi_type_snapshot(hash_table) == before
    tables = [hash_table._tables[s] for s in ("slot0", "slot1", "slot2")]
    with pytest.raises(ValueError):
        fused_apply_gradient(tables, args["ids"], args["indices"], args["fused_slot_size"], args["id_grads"],
                             args["id_offsets"], args["grad_offsets"], np.ones(3, F32), args["req_time"],
                             args["global_step"], args["num_of_shards"])
    assert _multi_type_snapshot(hash_table) == before


@pytest.mark.parametrize("case", sorted(_BAD_FUSED_APPLIES))
def test_bad_fused_apply_gradient_raises_value_error_and_changes_nothing(case):
    _assert_bad_fused_apply(_fused_table(), _BAD_FUSED_APPLIES[case])


@pytest.mark.parametrize("learning_rates", [np.ones(2, F32), np.ones(4, F32), np.zeros(0, F32),
                                            np.array([1.0, np.nan, 1.0], F32)],
                         ids=["too_few", "too_many", "empty", "nan"])
def test_fused_apply_gradient_learning_rate_count_checked(learning_rates):
    hash_table = _fused_table()
    before = _multi_type_snapshot(hash_table)
    tables = [hash_table._tables[s] for s in ("slot0", "slot1", "slot2")]
    with pytest.raises(ValueError):
        fused_apply_gradient(tables, _IDS, _IDS, _FSS, _GRADS, _ID_OFFSETS, _EMB_OFFSETS, learning_rates,
                             4, 0, 2)
    assert _multi_type_snapshot(hash_table) == before
    # The same call with the right count works.
    fused_apply_gradient(tables, _IDS, _IDS, _FSS, _GRADS, _ID_OFFSETS, _EMB_OFFSETS, np.ones(3, F32), 4, 0, 2)
    assert _multi_type_snapshot(hash_table) != before


def test_fused_learning_rates_are_sliced_per_table_by_segments():
    two_segments = make_config([(1, "sgd", "zeros"), (1, "sgd", "zeros")], [1.0, 1.0])
    t0 = hash_table_from_config(two_segments, name_suffix="t0")
    t1 = hash_table_from_config(generate_test_hash_table_config(1), name_suffix="t1")
    # Three learning rates: t0's two segments, then t1's one.
    fused_apply_gradient([t0, t1], [5, 6], [5, 6], [1, 1], [1, 1, 1], [0, 1, 2], [0, 2, 3],
                         [0.5, 0.25, 2.0], 0, 0, 1)
    np.testing.assert_array_equal(t0.lookup([5]), [[-0.5, -0.25]])
    np.testing.assert_array_equal(t1.lookup([6]), [[-2.0]])


def test_fused_nan_grads_accepted_when_the_config_allows_them():
    segment = entry.CombineAsSegment(1, entry.ZerosInitializer(), entry.SgdOptimizer(), entry.Fp32Compressor())
    config = entry.HashTableConfigInstance(
        entry.EmbeddingHashTableConfig(entry_config=entry.EntryConfig(segments=[segment]),
                                       allow_non_finite=True), [1.0])
    hash_table = MultiTypeHashTable({"slot0": config}, factory)
    hash_table.fused_apply_gradient([3], [3], [1], [np.nan], [0, 1], [0, 1], 0, 0, 1)
    assert math.isnan(hash_table.lookup({"slot0": [3]})["slot0"][0, 0])


def test_fused_req_time_stamps_entries():
    hash_table = two_slot_table()
    hash_table.fused_apply_gradient([4, 5], [4, 5], [1, 1], [1, 1, 1], [0, 1, 2], [0, 1, 3],
                                    global_step=0, req_time=2**40, num_of_shards=1)
    (dump,) = hash_table._tables["slot1"].lookup_entry([5])
    assert dump.last_update_ts == 2**40
    assert hash_table._tables["slot0"].max_update_ts == 2**40


def test_fused_empty_batch():
    hash_table = _fused_table()
    before = _multi_type_snapshot(hash_table)
    embeddings, recv_splits, id_offsets, emb_offsets, indices = hash_table.fused_lookup([], [0] * 6, 2)
    assert embeddings.shape == (0,) and indices.shape == (0,)
    np.testing.assert_array_equal(recv_splits, [0, 0])
    np.testing.assert_array_equal(id_offsets, [0] * 7)
    np.testing.assert_array_equal(emb_offsets, [0] * 7)
    hash_table.fused_apply_gradient([], [], [0] * 6, np.zeros(0, F32), id_offsets, emb_offsets, 0, 0, 2)
    assert _multi_type_snapshot(hash_table) == before


def test_an_error_of_a_merged_tables_inner_table_names_the_callers_slots():
    """The inner table knows a merged table by its md5 name, which it calls a slot: the
    caller is told which of its own slots the merged table holds."""
    config = generate_test_hash_table_config(1, learning_rate=PolynomialDecay(0.1, 100))
    merged = MergedMultiTypeHashTable({"user": config, "item": config, "other": generate_test_hash_table_config(2)},
                                      multi_type_factory)
    md5 = merged.slot_mapping["user"]
    with pytest.raises(ValueError, match=rf"^slots 'item', 'user' \(merged table '{md5}'\): global_step must be "
                                         r">= 0, got -1$"):
        merged.apply_gradients({"user": ([1], [[1.0]]), "item": ([2], [[1.0]])}, -1)
    with pytest.raises(ValueError, match=rf"^slot 'user' \(merged table '{md5}'\): global_step must be >= 0"):
        merged.apply_gradients({"user": ([1], [[1.0]]), "other": ([2], [[1.0, 1.0]])}, -1)  # the call's slots
    assert merged.lookup({"user": [1]})["user"].tolist() == [[0.0]]  # nothing changed


def test_gradients_of_none_are_named_as_none():
    """A framework tensor's .grad is None when the loss did not use it."""
    t = MultiTypeHashTable({"a": generate_test_hash_table_config(2)}, factory)
    with pytest.raises(TypeError, match=r"^slot 'a': grads must be an array of numbers, got None$"):
        t.apply_gradients({"a": ([1], None)}, 0)
    with pytest.raises(TypeError, match=r"^grads must be an array of numbers, got None$"):
        hash_table_from_config(generate_test_hash_table_config(2)).apply_gradients([1], None, 0)
    assert t.lookup({"a": [1]})["a"].tolist() == [[0.0, 0.0]]


def test_table_of_gives_the_table_that_holds_a_slots_entries():
    t = MultiTypeHashTable({"a": generate_test_hash_table_config(1), "b": generate_test_hash_table_config(2)}, factory)
    t.assign({"a": ([5], [[1.5]]), "b": ([6, 7], [[1, 2], [3, 4]])})
    assert t.table_of("a").lookup([5]).tolist() == [[1.5]]
    assert t.table_of("b").contains([5, 6, 7]).tolist() == [False, True, True]
    assert t.table_of("a") is not t.table_of("b")
    with pytest.raises(KeyError, match="unknown slot 'c'"):
        t.table_of("c")

    config = generate_test_hash_table_config(2)
    merged = MergedMultiTypeHashTable({"user": config, "item": config, "other": generate_test_hash_table_config(1)},
                                      multi_type_factory)
    merged.assign({"user": ([1], [[1, 1]]), "item": ([2], [[2, 2]]), "other": ([1], [[9]])})
    shared = merged.table_of("user")
    assert shared is merged.table_of("item")  # one group: one table
    assert shared.size() == 2 and shared.lookup([1, 2]).tolist() == [[1, 1], [2, 2]]
    assert merged.table_of("other").lookup([1]).tolist() == [[9]]
    with pytest.raises(KeyError, match="unknown slot 'c'"):
        merged.table_of("c")


@pytest.mark.parametrize("format", ["mtht", "monolith"])
def test_a_missing_merged_table_is_named_with_its_slots(tmp_path, format):
    # A merged table is named by the md5 of its slots; the error says which slots it holds.
    from mtht.checkpoint import restore_multi_type, save_multi_type

    def merged(configs):
        return MergedMultiTypeHashTable(configs, lambda group: MultiTypeHashTable(
            group, lambda name, cfg: hash_table_from_config(cfg, name_suffix=name)))

    save_multi_type(merged({"c": generate_test_hash_table_config(3)}), tmp_path, format=format)
    model = merged({"a": generate_test_hash_table_config(2), "b": generate_test_hash_table_config(2),
                    "c": generate_test_hash_table_config(3)})
    missing = model.slot_mapping["a"]
    with pytest.raises(FileNotFoundError, match=rf"merged table '{missing}' holds slots 'a', 'b'\)"):
        restore_multi_type(model, tmp_path, format=format)
