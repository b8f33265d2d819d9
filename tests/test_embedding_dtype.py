"""Embeddings kept in 16 bits (``embedding_dtype="float16"`` or ``"bfloat16"``).

Checked against models written here in numpy, independent of the core: rounding to nearest
(numpy's own float16 conversion; bfloat16 by comparing the two neighbours in float64),
the two neighbours a stochastic rounding may land on, and the float32 optimizer steps of
``optimizer_reference`` applied to the widened values.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mtht
from mtht.hash_table import fused_lookup
from mtht.multi_type_hash_table import MergedMultiTypeHashTable, MultiTypeHashTable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import optimizer_reference as ref  # noqa: E402
from test_optimizers import OPTIMIZERS, model_segment  # noqa: E402

F32 = np.float32
DTYPES = ("float16", "bfloat16")
BF16_MAX = np.uint32(0x7F7F0000).view(F32)


def bits(x):
    return np.ascontiguousarray(x, dtype=F32).view(np.uint32)


# ---------------------------------------------------------------------------------------
# Models of the roundings
# ---------------------------------------------------------------------------------------

def nearest(x, dtype):
    """x rounded to the nearest value of ``dtype`` (ties to even), finite magnitudes past
    the largest saturating to it, as float32."""
    x = np.asarray(x, dtype=F32)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            out = x.astype(np.float16).astype(F32)
        return np.where(np.isfinite(x) & (np.abs(x) > 65504), np.sign(x) * F32(65504), out).astype(F32)
    down, up = bf16_neighbours_toward(x)
    x64, d64, u64 = x.astype(np.float64), down.astype(np.float64), up.astype(np.float64)
    even_down = (bits(down) >> 16) % 2 == 0
    pick_down = (np.abs(x64 - d64) < np.abs(u64 - x64)) | ((np.abs(x64 - d64) == np.abs(u64 - x64)) & even_down)
    out = np.where(pick_down, down, up)
    out = np.where(np.isfinite(x) & ~np.isfinite(out), np.sign(x) * BF16_MAX, out)
    return np.where(np.isfinite(x), out, x).astype(F32)


def bf16_neighbours_toward(x):
    """(toward zero, away from zero): the bfloat16 values of x's magnitude below and above."""
    b = bits(x)
    down = (b & np.uint32(0xFFFF0000)).view(F32)
    exact = (b & np.uint32(0xFFFF)) == 0
    up = np.where(exact, b & np.uint32(0xFFFF0000), (b & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).astype(np.uint32)
    return down, up.view(F32)


def neighbours(x, dtype):
    """(low, high): the values of ``dtype`` around x (equal when x is one), saturated."""
    x = np.asarray(x, dtype=F32)
    if dtype == "float16":
        return ref.fp16_neighbours(np.clip(x, -65504, 65504))
    a, b = bf16_neighbours_toward(x)
    b = np.where(np.isfinite(b), b, np.sign(x) * BF16_MAX).astype(F32)
    return np.minimum(a, b), np.maximum(a, b)


def is_value_of(x, dtype):
    return np.array_equal(bits(nearest(x, dtype)), bits(x))


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------

def config(dtype, segments, learning_rates=None, **table_kwargs):
    table_config = mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=list(segments)),
                                                 embedding_dtype=dtype, **table_kwargs)
    return mtht.HashTableConfigInstance(table_config, learning_rates or [0.1] * len(segments))


def segment(dim, optimizer=None, initializer=None, compressor=None):
    return mtht.CombineAsSegment(dim, initializer or mtht.ZerosInitializer(), optimizer or mtht.SgdOptimizer(),
                                 compressor or mtht.Fp32Compressor())


def table(dtype, segments=None, learning_rates=None, **table_kwargs):
    return mtht.hash_table_from_config(config(dtype, segments or [segment(8)], learning_rates, **table_kwargs))


finite_floats = hnp.arrays(F32, st.tuples(st.integers(1, 40), st.just(5)),
                           elements=st.floats(width=32, allow_nan=False, allow_infinity=False))


@pytest.mark.parametrize("dtype", DTYPES)
@given(values=finite_floats)
@settings(max_examples=60, deadline=None)
def test_assign_rounds_to_nearest(dtype, values):
    t = table(dtype, [segment(5)])
    ids = np.arange(values.shape[0])
    t.assign(ids, values)
    got = t.lookup(ids)
    assert np.array_equal(bits(got), bits(nearest(values, dtype)))
    # What lookup_entry and contains see is the same stored value.
    assert np.array_equal(bits(t.lookup_entry([0])[0].values), bits(got[0]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rounding_at_the_edges(dtype):
    """Ties go to even, the smallest magnitudes to subnormals or zero (keeping the sign),
    finite values past the range saturate, and NaN and Inf pass where they are allowed."""
    if dtype == "float16":
        w = [1 + 2**-11, 1 + 3 * 2**-11, 2**-24, 2**-25, 3 * 2**-26, -2**-26, 65519, 65520, 1e9, -3e38]
        want = [1.0, 1 + 2**-9, 2**-24, 0.0, 2**-24, -0.0, 65504, 65504, 65504, -65504]
    else:
        w = [1 + 2**-8, 1 + 3 * 2**-8, 2**-133, 1e-45, 3.4e38, -3.4028235e38, 2.0**127 * 1.99, -0.0, 5.877e-39, 1.5]
        want = [1.0, 1 + 2**-6, 2**-133, 0.0, BF16_MAX, -BF16_MAX, BF16_MAX, -0.0, nearest([5.877e-39], dtype)[0],
                1.5]
    t = table(dtype, [segment(len(w))])
    t.assign([1], np.array([w], dtype=F32))
    got = t.lookup([1])[0]
    assert np.array_equal(bits(got), bits(np.array(want, dtype=F32))), (got, want)
    assert np.array_equal(bits(got), bits(nearest(np.array(w, dtype=F32), dtype)))
    t = table(dtype, [segment(3)], allow_non_finite=True)
    t.assign([1], np.array([[np.nan, np.inf, -np.inf]], dtype=F32))
    got = t.lookup([1])[0]
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
@pytest.mark.parametrize("width", [7, 16])  # the general path, and a kernel set's fused step
def test_a_step_lands_on_a_neighbour_of_the_float32_step(dtype, kind, width):
    """Every optimizer: the step is taken in float32 on the stored (widened) values, its
    state is exactly the float32 model's, and the new values are one of the two 16-bit
    neighbours of the float32 result."""
    dim = 1 if kind == "batch_softmax" else width
    seg = segment(dim, OPTIMIZERS[kind](dim))
    t = table(dtype, [seg], [0.05], random_seed=3)
    model = model_segment(seg)
    rng = np.random.default_rng(11)
    ids = np.arange(40)
    w = nearest(rng.uniform(-2, 2, size=(40, dim)).astype(F32), dtype)
    t.assign(ids, w)
    state = ref.init_state(model.kind, model.params, 40, dim)
    moved = 0
    for step in range(1, 6):
        g = rng.standard_normal((40, dim)).astype(F32)
        t.apply_gradients(ids, g, global_step=step)
        want = ref.step(model.kind, model.params, w, state, g, 0.05, step)
        got = t.lookup(ids)
        low, high = neighbours(want, dtype)
        assert ((got == low) | (got == high)).all(), (kind, step)
        assert is_value_of(got, dtype)
        moved += int((low != high).sum())
        for i in (0, 17, 39):
            for name, arr in t.lookup_entry([i])[0].optimizer_state[0].items():
                assert np.array_equal(np.asarray(arr).view(np.uint8), np.asarray(state[name][i]).view(np.uint8)), name
        w = got
    if kind not in ("group_ftrl_sparse", "group_adagrad_sparse", "batch_softmax"):
        assert moved > 0  # the steps did need rounding


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_steps_move_the_embedding_on_average(dtype):
    """Steps far below the 16-bit spacing: rounding to nearest would never leave 1.0;
    stochastic rounding follows the float32 sum on average."""
    n, dim, steps, delta = 4000, 4, 100, 1e-4
    t = table(dtype, [segment(dim, mtht.SgdOptimizer(), mtht.OnesInitializer())], [1.0], random_seed=5)
    ids = np.arange(n)
    for step in range(steps):
        t.apply_gradients(ids, np.full((n, dim), -delta, dtype=F32), global_step=step)
    got = t.lookup(ids).astype(np.float64)
    spacing = 2.0**-10 if dtype == "float16" else 2.0**-7
    # Each step goes up one spacing with probability p = delta / spacing, else stays: the
    # number of ups of a value is binomial, and the mean over n * dim values is within 5
    # standard deviations of its expectation. (Rounding to nearest would stay at 1.0.)
    p = delta / spacing
    sigma = spacing * np.sqrt(steps * p * (1 - p) / (n * dim))
    assert abs(got.mean() - (1 + steps * delta)) < 5 * sigma, (got.mean(), sigma)
    assert 5 * sigma < 0.2 * steps * delta
    assert got.min() >= 1.0 and (got > 1.0).mean() > 0.5


@pytest.mark.parametrize("dtype", DTYPES)
def test_rounding_is_reproducible(dtype, monkeypatch):
    """A function of (seed, id, step, position): two tables, one and two threads, every
    kernel set, agree;
    another step or seed draws again; the same value in every row rounds differently."""
    rng = np.random.default_rng(2)
    ids = np.arange(3000)
    w = rng.uniform(-1, 1, size=(3000, 8)).astype(F32)
    g = rng.standard_normal((3000, 8)).astype(F32)

    def run(seed, step, threads):
        before = mtht.get_num_threads()
        mtht.set_num_threads(threads)
        try:
            t = table(dtype, random_seed=seed)
            t.assign(ids, w)
            t.apply_gradients(ids, g, global_step=step, use_multi_threads=True)
            t.apply_gradients(ids[::-1], g, global_step=step + 1, use_multi_threads=True, enable_dedup=True)
            return t.lookup(ids)
        finally:
            mtht.set_num_threads(before)

    first = run(1, 10, 1)
    assert np.array_equal(bits(run(1, 10, 2)), bits(first))
    for kernel in mtht._core.available_kernels():  # each kernel set's copy of the conversions
        monkeypatch.setenv("MTHT_KERNEL", kernel)
        assert np.array_equal(bits(run(1, 10, 1)), bits(first)), kernel
    monkeypatch.delenv("MTHT_KERNEL")
    assert (run(1, 11, 1) != first).mean() > 0.1
    assert (run(2, 10, 1) != first).mean() > 0.1
    # From 1.0 half a spacing up: each value goes either way with probability 1/2, so the
    # 3,000 rows spread over most of the 256 patterns of 8 values.
    spacing = 2.0**-10 if dtype == "float16" else 2.0**-7
    t = table(dtype, [segment(8)], [1.0], random_seed=1)
    t.assign(ids, np.ones((3000, 8), dtype=F32))
    t.apply_gradients(ids, np.full((3000, 8), -spacing / 2, dtype=F32), global_step=4)
    assert len({row.tobytes() for row in t.lookup(ids)}) > 200


@pytest.mark.parametrize("dtype", DTYPES)
def test_assign_add_and_initializers_round_to_nearest(dtype):
    seed = 9
    init = mtht.RandomUniformInitializer(-1.0, 1.0)
    t = table(dtype, [segment(6, initializer=init)], random_seed=seed)
    wide = table("float32", [segment(6, initializer=init)], random_seed=seed)
    ids = np.arange(500)
    rng = np.random.default_rng(4)
    v = rng.standard_normal((500, 6)).astype(F32)
    t.assign_add(ids, v)
    wide.reinitialize(ids)
    assert np.array_equal(bits(t.lookup(ids)), bits(nearest(nearest(wide.lookup(ids), dtype) + v, dtype)))
    status = t.reinitialize(ids[:10])
    assert status.tolist() == [1] * 10
    assert np.array_equal(bits(t.lookup(ids[:10])), bits(nearest(wide.lookup(ids[:10]), dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_assign_add_rounds_each_occurrence(dtype):
    """Duplicates in one assign_add add one after another, each rounded, as separate calls:
    100 additions of a tenth of the spacing leave the value where it was; ten of a spacing
    and a half land where ten separate calls do."""
    spacing = 2.0**-10 if dtype == "float16" else 2.0**-7
    t = table(dtype, [segment(4, initializer=mtht.OnesInitializer())])
    t.assign_add(np.zeros(100, np.int64), np.full((100, 4), spacing / 10, dtype=F32))
    assert np.array_equal(t.lookup([0]), np.ones((1, 4), F32))
    calls = table(dtype, [segment(4, initializer=mtht.OnesInitializer())])
    t.assign_add(np.full(10, 5), np.full((10, 4), 1.5 * spacing, dtype=F32))
    for _ in range(10):
        calls.assign_add([5], np.full((1, 4), 1.5 * spacing, dtype=F32))
    assert np.array_equal(bits(t.lookup([5])), bits(calls.lookup([5])))
    want = F32(1.0)
    for _ in range(10):
        want = nearest(np.array([want + F32(1.5 * spacing)], F32), dtype)[0]
    assert t.lookup([5])[0, 0] == want


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_take_less_memory(dtype):
    """The values take 2 bytes each (padded to 4 bytes), the state stays float32."""
    cases = [([segment(16)], 64, 32),                                          # SGD: 64 -> 32 bytes
             ([segment(16, mtht.AdagradOptimizer())], 128, 96),                 # 128 -> 32 + 64
             ([segment(64, mtht.AdagradOptimizer())], 512, 384),               # 512 -> 128 + 256
             ([segment(3), segment(4, mtht.AdagradOptimizer())], 64, 32)]       # 28 + 16 bytes
    for segments, wide_stride, narrow_stride in cases:
        ids = np.arange(1000)
        tables = {d: table(d, segments, [0.1] * len(segments)) for d in ("float32", dtype)}
        for t in tables.values():
            t.apply_gradients(ids, np.ones((1000, sum(s.dim_size for s in segments)), dtype=F32), global_step=1)
        assert tables["float32"].stats()["row_stride"] == wide_stride
        assert tables[dtype].stats()["row_stride"] == narrow_stride
        assert tables[dtype].stats()["row_bytes"] * wide_stride == tables["float32"].stats()["row_bytes"] * narrow_stride


@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_widths_keep_each_segment_apart(dtype):
    """Segments of odd dims: the state sits after the padded values, each segment with its
    own optimizer, and a lookup returns each segment's values."""
    segs = [segment(3, mtht.AdagradOptimizer()), segment(5, mtht.MomentumOptimizer()), segment(1)]
    t = table(dtype, segs, [0.1, 0.2, 0.3], random_seed=1)
    models = [model_segment(s) for s in segs]
    rng = np.random.default_rng(6)
    w = nearest(rng.uniform(-1, 1, size=(20, 9)).astype(F32), dtype)
    t.assign(np.arange(20), w)
    g = rng.standard_normal((20, 9)).astype(F32)
    t.apply_gradients(np.arange(20), g, global_step=1)
    got = t.lookup(np.arange(20))
    offsets = [0, 3, 8, 9]
    for k, (m, lr) in enumerate(zip(models, (0.1, 0.2, 0.3))):
        a, b = offsets[k], offsets[k + 1]
        state = ref.init_state(m.kind, m.params, 20, b - a)
        want = ref.step(m.kind, m.params, w[:, a:b], state, g[:, a:b], lr, 1)
        low, high = neighbours(want, dtype)
        assert ((got[:, a:b] == low) | (got[:, a:b] == high)).all()
        dump = t.lookup_entry([4])[0]
        for name, arr in dump.optimizer_state[k].items():
            assert np.array_equal(np.asarray(arr), state[name][4]), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_float16_wrapper_keeps_its_values_float16_values_in_16_bit_tables(dtype):
    # The wrapper saturates at 65504, which bfloat16 does not hold: rounded to bfloat16 a
    # value went to 65536 (7 times in 8), no float16 value, and a float16 export made it Inf.
    # It is kept at 65280, the largest value of both formats; the other segment rounds as
    # its table's values do.
    wrapped = segment(8, mtht.StochasticRoundingFloat16OptimizerWrapper(mtht.SgdOptimizer()))
    t = table(dtype, [wrapped, segment(8)], [1.0, 1.0])
    ids = np.arange(64)
    for sign in (1, -1):
        t.assign(ids, np.full((64, 16), sign * 65000.0, F32))
        t.apply_gradients(ids, np.full((64, 16), -sign * 1000.0, F32), global_step=1)  # 66000 -> 65504
        got = t.lookup(ids)
        biggest = 65280.0 if dtype == "bfloat16" else 65504.0
        assert (got[:, :8] == sign * biggest).all()
        assert (got[:, :8].astype(np.float16).astype(F32) == got[:, :8]).all()
        with np.errstate(over="ignore"):  # float16's neighbour above 65504 is Inf
            assert np.isin(got[:, 8:], neighbours(np.float32(sign * 66000.0), dtype)).all()
    if dtype == "bfloat16":  # Inf passes the wrapper (allow_non_finite) and stays Inf
        t = table(dtype, [wrapped, segment(8)], [1.0, 1.0], allow_non_finite=True)
        t.apply_gradients(ids, np.full((64, 16), -np.inf, F32), global_step=1)
        assert (t.lookup(ids) == np.inf).all()
    t.assign(ids, np.full((64, 16), 1.0, F32))  # values below it keep the float16 wrapper's rounding
    t.apply_gradients(ids, np.full((64, 16), 1e-3, F32), global_step=2)
    assert (t.lookup(ids)[:, :8].astype(np.float16).astype(F32) == t.lookup(ids)[:, :8]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["mtht", "monolith"])
def test_checkpoints_hold_float32_values(tmp_path, dtype, fmt):
    """A save holds the values widened: it restores unchanged into a table of the same
    kind, exactly into a float32 one, and a float32 save restores rounded to nearest."""
    if fmt == "monolith":
        pytest.importorskip("google.protobuf")
    segs = [segment(5, mtht.AdagradOptimizer())]
    rng = np.random.default_rng(1)
    ids = np.arange(300)
    t = table(dtype, segs)
    t.assign(ids, rng.uniform(-3, 3, size=(300, 5)).astype(F32), req_time=7)
    t.apply_gradients(ids, rng.standard_normal((300, 5)).astype(F32), global_step=1, req_time=9)
    t.save(str(tmp_path / "narrow"), format=fmt)
    back = table(dtype, segs).restore(str(tmp_path / "narrow"), format=fmt)
    wide = table("float32", segs).restore(str(tmp_path / "narrow"), format=fmt)
    for i in (0, 150, 299):
        a, b, c = t.lookup_entry([i])[0], back.lookup_entry([i])[0], wide.lookup_entry([i])[0]
        assert np.array_equal(bits(a.values), bits(b.values)) and np.array_equal(bits(a.values), bits(c.values))
        assert np.array_equal(a.optimizer_state[0]["norm"], c.optimizer_state[0]["norm"])
        assert a.last_update_ts == b.last_update_ts == c.last_update_ts == 9
    w32 = rng.uniform(-3, 3, size=(300, 5)).astype(F32)
    source = table("float32", segs)
    source.assign(ids, w32)
    source.save(str(tmp_path / "wide"), format=fmt)
    narrowed = table(dtype, segs).restore(str(tmp_path / "wide"), format=fmt)
    assert np.array_equal(bits(narrowed.lookup(ids)), bits(nearest(w32, dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_and_multi_slot_ops(dtype):
    """The fused ops and a multi-type table read and write 16-bit tables as single calls do."""
    cfgs = {"a": config(dtype, [segment(4, mtht.AdagradOptimizer())], random_seed=2),
            "b": config(dtype, [segment(3)], random_seed=2)}
    model = MultiTypeHashTable(cfgs, lambda slot, c: mtht.hash_table_from_config(c))
    single = {s: mtht.hash_table_from_config(c) for s, c in cfgs.items()}
    rng = np.random.default_rng(3)
    ids = {"a": np.array([1, 2, 3, 2]), "b": np.array([5, 6])}
    grads = {"a": rng.standard_normal((4, 4)).astype(F32), "b": rng.standard_normal((2, 3)).astype(F32)}
    model.apply_gradients({s: (ids[s], grads[s]) for s in ids}, global_step=3)
    for s in ids:
        single[s].apply_gradients(ids[s], grads[s], global_step=3)
    got = model.lookup(ids)
    for s in ids:
        assert np.array_equal(bits(got[s]), bits(single[s].lookup(ids[s])))
    all_ids = np.array([1, 5, 2, 6], dtype=np.int64)
    emb, splits, *_ = fused_lookup([single["a"], single["b"]], all_ids, [1, 1, 1, 1], 2)
    assert np.array_equal(bits(emb[:4]), bits(single["a"].lookup([1])[0]))
    assert splits.tolist() == [7, 7]


def test_config_checks_and_merge_key():
    base = config("float32", [segment(4)])
    narrow = config("bfloat16", [segment(4)])
    assert "embedding_dtype" not in str(base)
    assert "embedding_dtype='bfloat16'" in str(narrow) and str(narrow) != str(config("float16", [segment(4)]))
    merged = MergedMultiTypeHashTable(
        {"x": base, "y": narrow, "z": config("bfloat16", [segment(4)])},
        lambda slot_to_config: MultiTypeHashTable(slot_to_config, lambda slot, c: mtht.hash_table_from_config(c)))
    assert len(set(merged.slot_mapping.values())) == 2  # y and z share a table, x has its own
    with pytest.raises(ValueError, match="embedding_dtype must be one of"):
        mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[segment(4)]), embedding_dtype="int8")
    with pytest.raises(ValueError, match="at most 4096"):
        mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[segment(4000), segment(97)]),
                                      embedding_dtype="float16")
    # A numpy dtype (or a str subclass) is taken by its name, so configs compare by it.
    for given, name in ((np.float16, "float16"), (np.dtype("float32"), "float32"), (np.str_("bfloat16"), "bfloat16")):
        c = mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[segment(4)]), embedding_dtype=given)
        assert type(c.embedding_dtype) is str and c.embedding_dtype == name
        assert str(mtht.HashTableConfigInstance(c, [0.1])) == str(config(name, [segment(4)]))
        mtht.hash_table_from_config(mtht.HashTableConfigInstance(c, [0.1]))
    for bad in (np.int8, np.dtype("float64"), None, b"float16", 16):
        with pytest.raises(ValueError, match="embedding_dtype must be one of"):
            mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[segment(4)]), embedding_dtype=bad)
    one_bit = mtht.CombineAsSegment(2049, mtht.ZerosInitializer(), mtht.SgdOptimizer(), mtht.OneBitCompressor())
    with pytest.raises(ValueError, match="one_bit segment's counted twice; got 2049 \\+ 2049"):
        mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[one_bit]), embedding_dtype="float16")
    with pytest.raises(ValueError, match="counted twice"):  # the core checks it too
        mtht._core.Table([{"dim": 2049, "init": 0, "opt": 0, "retriever": 2}], embedding_dtype="bfloat16")
    wide = mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[segment(4097)]))
    assert wide.embedding_dtype == "float32"
    with pytest.raises(ValueError, match="16 bits"):  # the core checks it too
        mtht._core.Table([{"dim": 4097, "init": 0, "opt": 0}], embedding_dtype="float16")


SMALL_STACK = """
import sys, threading
import numpy as np
import mtht
dtype, dim, one_bit = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
threading.stack_size(32768)  # the least Python allows
compressor = mtht.OneBitCompressor() if one_bit else mtht.Fp32Compressor()
seg = mtht.CombineAsSegment(dim, mtht.ZerosInitializer(), mtht.AdagradOptimizer(), compressor)
table = mtht.hash_table_from_config(mtht.HashTableConfigInstance(
    mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[seg]), embedding_dtype=dtype), [0.1]))
mtht.set_num_threads(1)  # the write runs on the small thread itself

def train():
    ids = np.arange(10)
    table.assign_add(ids, np.ones((10, dim), np.float32))
    table.apply_gradients(ids, np.ones((10, dim), np.float32), global_step=1)
    table.reinitialize(ids[:2])

thread = threading.Thread(target=train)
thread.start()
thread.join()
print("done")
"""


@pytest.mark.parametrize("dtype, dim, one_bit", [("bfloat16", 65, False), ("float16", 4096, False),
                                                 ("float32", 4096, True), ("bfloat16", 600, True),
                                                 ("float16", 2048, True), ("bfloat16", 1025, True)])
def test_writes_on_a_thread_with_a_small_stack(dtype, dim, one_bit):
    """A write widens a row on the stack: on a thread of 32 KiB, the least Python lets one
    have, it runs (in a process of its own, in case it does not)."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", SMALL_STACK, dtype, str(dim), "1" if one_bit else "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "done", (out.returncode, out.stderr[-2000:])
