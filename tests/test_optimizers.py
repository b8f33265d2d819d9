"""Numerics of every optimizer, retriever and float16 stochastic rounding, on every kernel.

* The numbers Monolith's C++ and Python tests pin (optimizers, the entry accessor, the
  combined optimizer, group AdaGrad, HashNet, FakeQuant), on every kernel path this CPU
  can run (``MTHT_KERNEL``).
* Every optimizer against the numpy model in optimizer_reference.py over many random steps,
  dims that are and are not multiples of the SIMD width, duplicate ids and dedup. The
  kernels are compiled with -ffp-contract=off and the model performs the same float32
  operations in the same order, so the comparison is exact, bit for bit, for every
  optimizer; so is the comparison of every kernel path with the scalar one. HashNet's tanh
  is the one function numpy may not have bit for bit: the model calls the C library's
  double tanh (the function the extension calls) and is then exact too; without it,
  HashNet results are compared within a few ulp.
* Multi-segment entries, stochastic rounding, the named optimizer state, Monolith's
  batch-softmax test, and configurations that must be refused.
"""

from __future__ import annotations

import os
import sys
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mtht
from mtht.learning_rate_functions import LinearWarmup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import optimizer_reference as ref  # noqa: E402
from optimizer_reference import EntryModel, SegmentModel  # noqa: E402

F32 = np.float32
KERNELS = mtht._core.available_kernels()
# 1..128 specialised loops (1, 2, 4, 8, 16, 32, 64, 128) and the generic one, at sizes that are
# and are not multiples of the SSE2/AVX2/AVX-512 widths.
DIMS = (1, 2, 3, 4, 7, 8, 16, 17, 32, 33, 64, 100, 128)
STEPS = 20

# Tolerance (in ulp) for comparisons whose result went through HashNet's tanh: 0 when the
# model uses the C library's tanh, like the extension; a few ulp otherwise, growing with
# the number of steps the difference can propagate through.
TANH_ULPS = 0 if ref.TANH_FROM_LIBM else 64


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

def segment(dim, optimizer, compressor=None, initializer=None):
    return mtht.CombineAsSegment(dim, initializer or mtht.ZerosInitializer(), optimizer,
                                 compressor or mtht.Fp32Compressor())


def config_of(segments, learning_rates, **table_kwargs):
    table_config = mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=list(segments)),
                                                 **table_kwargs)
    return mtht.HashTableConfigInstance(table_config, list(learning_rates))


def build(monkeypatch, kernel, segments, learning_rates, **table_kwargs):
    """A table on kernel path ``kernel`` (MTHT_KERNEL is read when a table is built)."""
    monkeypatch.setenv("MTHT_KERNEL", kernel)
    table = mtht.hash_table_from_config(config_of(segments, learning_rates, **table_kwargs))
    assert table._core.kernel == kernel
    return table


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=F32).view(np.uint32)


def assert_bits_equal(got, want, what=""):
    got, want = np.asarray(got, dtype=F32), np.asarray(want, dtype=F32)
    assert got.shape == want.shape, what
    if not np.array_equal(bits(got), bits(want)):
        bad = np.flatnonzero(bits(got).ravel() != bits(want).ravel())
        raise AssertionError(f"{what}: {bad.size} of {got.size} floats differ, first at flat index {bad[0]}: "
                             f"{got.ravel()[bad[0]]!r} != {want.ravel()[bad[0]]!r}")


def ulp_distance(a, b) -> np.ndarray:
    """Number of float32 values between a and b (0 when bitwise equal; +0 and -0 are 0 apart)."""
    def ordered(x):
        i = np.ascontiguousarray(x, dtype=F32).view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)
    return np.abs(ordered(a) - ordered(b))


def assert_ulps(got, want, ulps, what=""):
    if ulps == 0:
        assert_bits_equal(got, want, what)
        return
    d = ulp_distance(got, want)
    assert d.max(initial=0) <= ulps, f"{what}: {d.max()} ulp apart (allowed {ulps}): {got!r} vs {want!r}"


def one_step(table, grads, global_step=0, ids=(1,)):
    """One apply_gradients call; returns the new lookup of ``ids``."""
    table.apply_gradients(list(ids), np.asarray(grads, dtype=F32).reshape(len(ids), -1), global_step=global_step)
    return table.lookup(list(ids))


@pytest.fixture(params=KERNELS)
def kernel(request):
    return request.param


# ---------------------------------------------------------------------------------------
# (a) Numbers pinned by Monolith's tests, on every kernel path
# ---------------------------------------------------------------------------------------

def pinned(monkeypatch, kernel, dim, optimizer, lr):
    return build(monkeypatch, kernel, [segment(dim, optimizer)], [lr])


def close(got, want, atol=1e-6):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64).ravel(), np.asarray(want, dtype=np.float64).ravel(),
                               rtol=0, atol=atol)


def test_sgd(monkeypatch, kernel):
    t = pinned(monkeypatch, kernel, 1, mtht.SgdOptimizer(), 0.1)
    close(one_step(t, [1.0]), [-0.1])


def test_adagrad(monkeypatch, kernel):
    t = pinned(monkeypatch, kernel, 2, mtht.AdagradOptimizer(initial_accumulator_value=1.0), 0.1)
    close(one_step(t, [1, 2]), [-0.07071067, -0.08944272])


def test_adagrad_weight_decay(monkeypatch, kernel):
    # Monolith's scalar rule (pinned); its AVX block would give [-0.128582, -0.156242].
    opt = mtht.AdagradOptimizer(initial_accumulator_value=1.0, weight_decay_factor=0.1)
    t = pinned(monkeypatch, kernel, 2, opt, 0.1)
    close(one_step(t, [1, 2]), [-0.07071067, -0.08944272])
    close(one_step(t, [1, 2]), [-0.128173, -0.155943])


def test_adagrad_accessor(monkeypatch, kernel, tmp_path):
    t = pinned(monkeypatch, kernel, 1, mtht.AdagradOptimizer(initial_accumulator_value=0.1), 1.0)
    t.apply_gradients([1], [1.0], global_step=0, req_time=100)
    close(t.lookup([1]), [-0.95346254])
    # Saved, restored into a new table, and stepped once more.
    t.save(str(tmp_path / "ckpt"))
    restored = pinned(monkeypatch, kernel, 1, mtht.AdagradOptimizer(initial_accumulator_value=0.1), 1.0)
    restored.restore(str(tmp_path / "ckpt"))
    assert restored.lookup_entry([1])[0].last_update_ts == 100
    restored.apply_gradients([1], [1.0], global_step=1, req_time=100)
    close(restored.lookup([1]), [-1.643528])


def test_combined_adagrad(monkeypatch, kernel, tmp_path):
    segs = [segment(1, mtht.AdagradOptimizer(initial_accumulator_value=1.0)),
            segment(2, mtht.AdagradOptimizer(initial_accumulator_value=2.0))]
    t = build(monkeypatch, kernel, segs, [1.0, 2.0])
    close(one_step(t, [1, 2, 3]), [-0.70710677, -1.6329931, -1.8090681])
    # Monolith restores the optimizer dump next to values of zero and takes the same step:
    # here, restore the checkpoint into a new table, zero the values (assign keeps the
    # optimizer state) and step.
    t.save(str(tmp_path / "ckpt"))
    restored = build(monkeypatch, kernel, segs, [1.0, 2.0]).restore(str(tmp_path / "ckpt"))
    restored.assign([1], [[0, 0, 0]])
    close(one_step(restored, [1, 2, 3]), [-0.57735026, -1.264911, -1.3416407])


def test_combined_sgd(monkeypatch, kernel):
    t = build(monkeypatch, kernel, [segment(1, mtht.SgdOptimizer()), segment(2, mtht.SgdOptimizer())], [1.0, 2.0])
    close(one_step(t, [1, 2, 3]), [-1, -4, -6])


def test_adadelta(monkeypatch, kernel):
    t = pinned(monkeypatch, kernel, 2, mtht.AdadeltaOptimizer(), 0.01)
    close(one_step(t, [10, 1]), [-0.0031607, -0.0030151])
    close(t.lookup_entry([1])[0].optimizer_state[0]["accum"], [10, 0.1], atol=1e-5)
    close(one_step(t, [10, 1]), [-0.0064035, -0.0061047])


@pytest.mark.parametrize("optimizer", [mtht.AdamOptimizer, mtht.AmsgradOptimizer])
def test_adam_and_amsgrad(monkeypatch, kernel, optimizer):
    t = pinned(monkeypatch, kernel, 2, optimizer(), 0.01)
    close(one_step(t, [10, 1]), [-0.00990099, -0.00909091])
    close(t.lookup_entry([1])[0].optimizer_state[0]["m"], [1, 0.1], atol=1e-6)
    close(one_step(t, [10, 1]), [-0.01983060, -0.01842895])


def test_ftrl(monkeypatch, kernel):
    t = pinned(monkeypatch, kernel, 2, mtht.FtrlOptimizer(), 0.01)
    close(one_step(t, [10, 1]), [-0.009995, -0.00953463])
    close(one_step(t, [10, 1]), [-0.0170643, -0.0164353])


@pytest.mark.parametrize("optimizer", [
    mtht.FtrlOptimizer(), mtht.FTRLWithGroupSparsityOptimizer(),
    mtht.AdaGradWithGroupLassoOptimizer(beta=1.0, initial_accumulator_value=0.0)],
    ids=["ftrl", "group_ftrl", "group_lasso"])
def test_a_step_at_learning_rate_zero_is_left_out(monkeypatch, kernel, optimizer):
    # These steps divide by the learning rate. At 0 (a LinearWarmup's first step) the step
    # changes nothing; the entry is the one the initializer made, and the next step at a
    # positive rate gives what it gives on that entry.
    warm = build(monkeypatch, kernel, [segment(2, optimizer, initializer=mtht.ConstantsInitializer(0.5))],
                 [LinearWarmup(0.1, 100)])
    cold = build(monkeypatch, kernel, [segment(2, optimizer, initializer=mtht.ConstantsInitializer(0.5))], [0.001])
    warm.apply_gradients([1], [[1.0, -2.0]], global_step=0)
    (entry,) = warm.lookup_entry([1])
    assert entry.values.tolist() == [0.5, 0.5]
    cold.assign([1], [[0.5, 0.5]])  # the same fresh entry, made by a write that steps nothing
    (fresh,) = cold.lookup_entry([1])
    for name, state in fresh.optimizer_state[0].items():
        assert_bits_equal(entry.optimizer_state[0][name], state, name)
    for t in (warm, cold):
        t.apply_gradients([1], [[1.0, -2.0]], global_step=1)  # LinearWarmup(0.1, 100) at 1: 0.001
    assert_bits_equal(warm.lookup([1]), cold.lookup([1]), "after a step at 0.001")


def test_group_ftrl_value_with_no_gradient_yet_reads_zero(monkeypatch, kernel):
    # beta, the initial accumulator and l2 all 0: a value whose gradients were all 0 has a
    # denominator of 0 and a z of 0, and reads 0 (it was NaN).
    t = build(monkeypatch, kernel, [segment(2, mtht.FTRLWithGroupSparsityOptimizer(
        beta=0.0, initial_accumulator_value=0.0))], [0.1])
    got = one_step(t, [1.0, 0.0])
    assert np.isfinite(got).all() and got[0, 1] == 0.0 and got[0, 0] != 0.0
    assert np.isfinite(one_step(t, [1.0, 1.0], global_step=1)).all()


def group_lasso(lam):
    return mtht.AdaGradWithGroupLassoOptimizer(beta=1.0, initial_accumulator_value=0.0, l2_regularization=lam)


def test_group_adagrad_dim1(monkeypatch, kernel):
    t = pinned(monkeypatch, kernel, 1, group_lasso(1.0), 0.01)
    close(one_step(t, [10]), [-0.008182])
    close(one_step(t, [10]), [-0.014125])


def test_group_adagrad_dim2(monkeypatch, kernel):
    t = pinned(monkeypatch, kernel, 2, group_lasso(0.5), 0.01)
    close(one_step(t, [10, 1]), [-0.008639, -0.000864])
    close(one_step(t, [1, 5]), [-0.009096, -0.004778])


@pytest.mark.parametrize("lam, want", [(0.0, [-0.009091, -0.000909]), (1000.0, [0.0, 0.0])])
def test_group_adagrad_lambda(monkeypatch, kernel, lam, want):
    t = pinned(monkeypatch, kernel, 2, group_lasso(lam), 0.01)
    close(one_step(t, [10, 1]), want)


def test_momentum(monkeypatch, kernel):
    t = pinned(monkeypatch, kernel, 2, mtht.MomentumOptimizer(momentum=0.9), 0.01)
    close(one_step(t, [10, 1]), [-0.1, -0.01])
    close(one_step(t, [10, 1]), [-0.29, -0.029])


def test_moving_average(monkeypatch, kernel):
    t = pinned(monkeypatch, kernel, 2, mtht.MovingAverageOptimizer(), 0.01)
    close(one_step(t, [10, 1]), [1.0, 0.1])
    close(one_step(t, [10, 1]), [1.9, 0.19])


def test_rmsprop(monkeypatch, kernel):
    # Monolith steps RMSProp v1 with the config's learning_rate (0.01); mtht with the
    # segment's learning rate, here the same 0.01.
    t = pinned(monkeypatch, kernel, 1, mtht.RmspropOptimizer(), 0.01)
    close(one_step(t, [10]), [-0.024025])
    close(t.lookup_entry([1])[0].optimizer_state[0]["n"], [10], atol=1e-5)
    close(one_step(t, [10]), [-0.042686])


def test_rmspropv2(monkeypatch, kernel):
    t = pinned(monkeypatch, kernel, 2, mtht.RmspropV2Optimizer(), 0.01)
    close(one_step(t, [10, 1]), [-0.0090909, -0.005])
    close(t.lookup_entry([1])[0].optimizer_state[0]["n"], [100, 1], atol=1e-5)
    close(one_step(t, [10, 1]), [-0.0158549, -0.0092045])


def test_batch_softmax_one_step(monkeypatch, kernel):
    t = pinned(monkeypatch, kernel, 1, mtht.BatchSoftmaxOptimizer(), 0.1)
    close(one_step(t, [0.0], global_step=1), [0.1])
    assert t.lookup_entry([1])[0].optimizer_state[0]["global_step"].tolist() == [1]


def assert_float_eq(got, want):
    """gtest's EXPECT_FLOAT_EQ: within 4 ulp."""
    assert_ulps(np.float32(got), np.float32(want), 4, f"{got!r} vs {want!r}")


def test_hashnet(monkeypatch, kernel):
    """Monolith's HashNet test (step_size 1000, amplitude 0.1, init scale 1).

    Backward(num=2, grad) is observed through two one_bit segments stepped with learning
    rate 1 and reset to w = 2 before each step: SGD gives w_new = 2 - g' (its rounding to
    the float spacing near 2 still tells the fused 1 - y*y from the unfused one, 3e-7 apart
    at t = 1000), and Momentum with momentum 0 keeps n = -g' exactly in its state.
    """
    one_bit = mtht.OneBitCompressor(step_size=1000, amplitude=0.1)
    segs = [segment(1, mtht.SgdOptimizer(), one_bit),
            segment(1, mtht.MomentumOptimizer(momentum=0.0), one_bit)]
    t = build(monkeypatch, kernel, segs, [1.0, 1.0])
    t.assign([1, 2], [[2, 2], [1, 1]])
    emb = t.lookup([1, 2])  # scale 1
    for v in emb[0]:
        assert_float_eq(v, 0.09640275)
    for v in emb[1]:
        assert_float_eq(v, 0.07615941)

    for step, grad, want in [(0, 1.0, 0.00706508), (999, 2.0, 0.01413016),
                             (1000, 100.0, 0.005442613), (1001, 200.0, 0.01088523)]:
        t.assign([1], [[2, 2]])
        t.apply_gradients([1], [[grad, grad]], global_step=step)
        sgd_w, _ = t.lookup_entry([1])[0].values
        n = t.lookup_entry([1])[0].optimizer_state[1]["n"][0]
        assert abs((2.0 - float(sgd_w)) - want) < 1e-7, (step, sgd_w)
        assert_float_eq(-n, want)
        # Exactly the model's fused backward.
        scale = ref.hashnet_scale(1.0, 10000.0, step - step % 1000)
        g = ref.hashnet_backward(F32(2), F32(grad), scale, 0.1)
        assert_ulps(-n, g, TANH_ULPS, f"step {step}")
        assert_ulps(sgd_w, F32(2) - g, TANH_ULPS, f"step {step}")

    scale = ref.hashnet_scale(1.0, 10000.0, 1000)
    assert scale == F32(2.44948974)
    t.assign([1, 2], [[2, 2], [0.25, -0.25]])
    emb = t.lookup([1, 2])
    assert_float_eq(emb[0, 0], 0.09998888)
    assert_ulps(emb[1], ref.hashnet_forward([0.25, -0.25], scale, 0.1), TANH_ULPS)


def test_hashnet_fma_matters():
    """The fused 1 - y*y gives Monolith's t = 1000 number; separate float32 operations do not."""
    scale = ref.hashnet_scale(1.0, 10000.0, 1000)
    y = ref.tanh32(scale * F32(2))
    fused = F32(100) * ((F32(0.1) * scale) * ref.one_minus_square(y))
    unfused = F32(100) * ((F32(0.1) * scale) * (F32(1) - y * y))
    assert ulp_distance(fused, F32(0.005442613)) <= 4
    assert ulp_distance(unfused, F32(0.005442613)) > 4


def test_fake_quant(monkeypatch, kernel):
    r = 5.0
    step = F32(r) / F32(128)
    t = build(monkeypatch, kernel, [segment(10, mtht.SgdOptimizer(), mtht.FixedR8Compressor(r))], [0.1],
              allow_non_finite=True)
    raw = np.array([100, 0, 3.5, 1.4 * step, -1.4 * step, 1.6 * step, -1.6 * step, np.nan, -100, 1.0],
                   dtype=F32)
    t.assign([1], raw[None, :])
    q = t.lookup([1])[0]
    assert q[0] < 5 and q[0] == F32(127 * 5 / 128)
    assert q[1] == 0
    assert abs(q[2] - 3.5) < step
    assert q[3] == step and q[4] == -step
    assert q[5] == 2 * step and q[6] == -2 * step
    assert q[7] == 0  # NaN
    assert q[8] == -128 * step
    assert_bits_equal(q, ref.fake_quantize(raw, r))
    # Ties between two steps go away from zero (Monolith's FakeQuant), the sign of zero kept.
    ties = np.array([0.5, -0.5, 2.5, -2.5, 126.5, -127.5, 0.0, -0.0, 0.25, -0.25], dtype=F32) * step
    t.assign([2], ties[None, :])
    tied = t.lookup([2])[0]
    np.testing.assert_array_equal(tied[:6] / step, [1, -1, 3, -3, 127, -128])
    assert_bits_equal(tied, ref.fake_quantize(ties, r))
    # The stored floats stay as assigned.
    assert_bits_equal(t.lookup_entry([1])[0].values, raw)
    # Gradients pass straight through: a step moves the stored float, not the quantised one.
    t.apply_gradients([1], np.ones((1, 10), dtype=F32), global_step=0)
    stored = t.lookup_entry([1])[0].values
    assert_bits_equal(stored[:7], raw[:7] - F32(0.1))


_ANY_FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)


@settings(max_examples=40, deadline=None)
@given(r=st.floats(min_value=0.0009765625, max_value=16384.0, width=32), data=st.data())
def test_fake_quant_of_any_floats_matches_the_model_on_every_kernel(r, data):
    """Rows of any length (vector bodies and their tails) and any floats (ties, NaN, Inf,
    subnormals, values past the clamp) read as the model's fixed_r8 on every kernel path."""
    step = F32(r) / F32(128)
    dim = data.draw(st.integers(1, 40), label="dim")
    ties = st.integers(-300, 300).map(lambda n: F32(n) * (step / F32(2)))
    rows = data.draw(hnp.arrays(F32, (3, dim), elements=st.one_of(_ANY_FLOAT32, ties)), label="rows")
    want = ref.fake_quantize(rows, r)
    with pytest.MonkeyPatch.context() as mp:
        for kernel in KERNELS:
            t = build(mp, kernel, [segment(dim, mtht.SgdOptimizer(), mtht.FixedR8Compressor(r))], [0.1],
                      allow_non_finite=True)
            t.assign([1, 2, 3], rows)
            assert_bits_equal(t.lookup([1, 2, 3]), want, f"kernel {kernel}")


@settings(max_examples=30, deadline=None)
@given(t=st.integers(0, 10**7), amplitude=st.floats(min_value=0.0009765625, max_value=16.0, width=32),
       data=st.data())
def test_hashnet_of_any_floats_matches_the_model_on_every_kernel(t, amplitude, data):
    """HashNet lookups and steps through it, for rows of any length (vector bodies and their
    tails) and any floats, on every kernel path: the model's bits (its tanh is the C
    library's double tanh rounded once), and lookups within an ulp of numpy's tanh."""
    dim = data.draw(st.integers(1, 40), label="dim")
    rows = data.draw(hnp.arrays(F32, (3, dim), elements=st.floats(width=32, allow_nan=False)), label="rows")
    grads = data.draw(hnp.arrays(F32, (3, dim), elements=st.floats(-1e3, 1e3, width=32)), label="grads")
    scale = ref.hashnet_scale(1.0, 10000.0, t)
    want_lookup = ref.hashnet_forward(rows, scale, amplitude)
    with np.errstate(invalid="ignore", over="ignore"):
        numpy_tanh = np.tanh((scale * rows).astype(np.float64)).astype(F32)
    assert_ulps(want_lookup, F32(amplitude) * numpy_tanh, 1, "the model against numpy")
    want_values = rows - ref.hashnet_backward(rows, grads, scale, amplitude)  # SGD, learning rate 1
    compressor = mtht.OneBitCompressor(step_size=1, amplitude=amplitude)
    with pytest.MonkeyPatch.context() as mp:
        for kernel in KERNELS:
            table = build(mp, kernel, [segment(dim, mtht.SgdOptimizer(), compressor)], [1.0], allow_non_finite=True)
            table.assign([1, 2, 3], rows)
            table.apply_gradients([9], np.zeros((1, dim), F32), global_step=t)  # the scale of step t, for all
            assert_ulps(table.lookup([1, 2, 3]), want_lookup, TANH_ULPS, f"kernel {kernel}: lookup")
            table.apply_gradients([1, 2, 3], grads, global_step=t)
            values = np.stack([e.values for e in table.lookup_entry([1, 2, 3])])
            assert_ulps(values, want_values, TANH_ULPS, f"kernel {kernel}: step")


def test_fp16_round_trip(monkeypatch, kernel):
    # Training tables store float32 whatever the compressor: fp16/fp32 only describe an
    # export format, so lookups return the stored values unchanged.
    values = np.array([[0.1, 0.2, 10000]], dtype=F32)
    for comp in (mtht.Fp16Compressor(), mtht.Fp32Compressor()):
        t = build(monkeypatch, kernel, [segment(3, mtht.SgdOptimizer(), comp)], [0.1])
        t.assign([1], values)
        assert_bits_equal(t.lookup([1]), values)
    # Monolith's fp16 round trip: within 1e-4, and so is a stochastically rounded value.
    np.testing.assert_allclose(values.astype(np.float16).astype(F32), values, rtol=0, atol=1e-4)
    opt = mtht.StochasticRoundingFloat16OptimizerWrapper(mtht.SgdOptimizer())
    t = build(monkeypatch, kernel, [segment(3, opt)], [0.1])
    t.assign([1], values)
    t.apply_gradients([1], np.zeros((1, 3), dtype=F32), global_step=0)
    got = t.lookup([1])
    assert ref.is_fp16_value(got).all()
    np.testing.assert_allclose(got, values, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------
# (b) Every optimizer against the numpy model, on every kernel path
# ---------------------------------------------------------------------------------------

# name -> builder for a segment of `dim` values (the sparse variants scale their threshold
# with the segment so that rows are zeroed sometimes, not always or never).
OPTIMIZERS = {
    "sgd": lambda dim: mtht.SgdOptimizer(),
    "adagrad": lambda dim: mtht.AdagradOptimizer(initial_accumulator_value=0.1),
    "adagrad_wd": lambda dim: mtht.AdagradOptimizer(initial_accumulator_value=0.5, weight_decay_factor=0.1),
    "dynamic_wd_adagrad_coupled": lambda dim: mtht.DynamicWdAdagradOptimizer(weight_decay_factor=0.05,
                                                                         decouple_weight_decay=False),
    "dynamic_wd_adagrad_decoupled": lambda dim: mtht.DynamicWdAdagradOptimizer(weight_decay_factor=0.05),
    "adadelta": lambda dim: mtht.AdadeltaOptimizer(),
    "adadelta_wd": lambda dim: mtht.AdadeltaOptimizer(weight_decay_factor=0.05, averaging_ratio=0.8, epsilon=0.001),
    "adam": lambda dim: mtht.AdamOptimizer(),
    "adam_nesterov": lambda dim: mtht.AdamOptimizer(use_nesterov=True),
    "adam_nesterov_wd": lambda dim: mtht.AdamOptimizer(beta1=0.8, beta2=0.95, use_nesterov=True,
                                                   weight_decay_factor=0.01, epsilon=1e-3),
    "amsgrad": lambda dim: mtht.AmsgradOptimizer(),
    "amsgrad_nesterov_wd": lambda dim: mtht.AmsgradOptimizer(use_nesterov=True, weight_decay_factor=0.01),
    "ftrl": lambda dim: mtht.FtrlOptimizer(),
    "ftrl_l1_l2": lambda dim: mtht.FtrlOptimizer(initial_accumulator_value=0.2, beta=0.5, l1_regularization=0.05,
                                                 l2_regularization=0.1),
    "ftrl_sparse": lambda dim: mtht.FtrlOptimizer(l1_regularization=1.0),
    "group_ftrl": lambda dim: mtht.FTRLWithGroupSparsityOptimizer(initial_accumulator_value=0.1,
                                                                  l1_regularization=0.05, l2_regularization=0.1),
    "group_ftrl_sparse": lambda dim: mtht.FTRLWithGroupSparsityOptimizer(l1_regularization=8 * dim ** 0.5),
    "group_adagrad": lambda dim: mtht.AdaGradWithGroupLassoOptimizer(beta=1.0, l2_regularization=0.01),
    "group_adagrad_wd": lambda dim: mtht.AdaGradWithGroupLassoOptimizer(beta=0.5, initial_accumulator_value=0.0,
                                                                         l2_regularization=0.05,
                                                                         weight_decay_factor=0.1),
    "group_adagrad_sparse": lambda dim: mtht.AdaGradWithGroupLassoOptimizer(beta=0.5, initial_accumulator_value=0.0,
                                                                             l2_regularization=8 * dim ** 0.5),
    "momentum": lambda dim: mtht.MomentumOptimizer(),
    "momentum_nesterov_wd": lambda dim: mtht.MomentumOptimizer(use_nesterov=True, momentum=0.8,
                                                           weight_decay_factor=0.05),
    "moving_average": lambda dim: mtht.MovingAverageOptimizer(momentum=0.7),
    "rmsprop": lambda dim: mtht.RmspropOptimizer(),
    "rmsprop_wd": lambda dim: mtht.RmspropOptimizer(weight_decay_factor=0.05, momentum=0.8),
    "rmspropv2": lambda dim: mtht.RmspropV2Optimizer(),
    "rmspropv2_wd": lambda dim: mtht.RmspropV2Optimizer(weight_decay_factor=0.05, momentum=0.5),
    "batch_softmax": lambda dim: mtht.BatchSoftmaxOptimizer(),
}


def schedule(step):
    """A learning rate that changes every step (exercises the per-step learning rate)."""
    return 0.05 / (1.0 + 0.1 * step)


def model_segment(seg) -> SegmentModel:
    """The numpy model of a config segment (constant initializers only)."""
    init = seg.initializer.params()
    comp = seg.compressor.params()
    return SegmentModel(seg.dim_size, seg.optimizer.kind, seg.optimizer.params(),
                        init_value=init.get("constant", 1.0 if seg.initializer.kind == "ones" else 0.0),
                        retriever=seg.compressor.kind if seg.compressor.kind in ("fixed_r8", "one_bit") else "raw",
                        fixed_range=comp.get("r", 1.0), step_size=comp.get("step_size", 200),
                        amplitude=comp.get("amplitude", 0.05), init_scale=comp.get("init_scale", 1.0),
                        max_scale=comp.get("max_scale", 10000.0))


def assert_table_matches(tables, model, ids, ulps, what):
    """Each table equals the model (within ``ulps``) and the first table (the scalar path)
    bit for bit: lookups, raw values and every named state array."""
    want_lookup = model.lookup(ids)
    scalar = tables[0]
    scalar_lookup = scalar.lookup(ids)
    scalar_dumps = scalar.lookup_entry(ids)
    for table in tables:
        where = f"{what}, kernel {table._core.kernel}"
        got_lookup = table.lookup(ids)
        assert_bits_equal(got_lookup, scalar_lookup, where + ": lookup vs scalar")
        assert_ulps(got_lookup, want_lookup, ulps, where + ": lookup vs model")
        for i, dump, scalar_dump in zip(ids, table.lookup_entry(ids), scalar_dumps):
            if not model.contains(i):
                assert dump is None, where
                continue
            assert_bits_equal(dump.values, scalar_dump.values, f"{where}: id {i} values vs scalar")
            assert_ulps(dump.values, model.values(i), ulps, f"{where}: id {i} values vs model")
            want_state = model.state(i)
            assert len(dump.optimizer_state) == len(want_state)
            for k, (got_seg, scalar_seg, want_seg) in enumerate(zip(dump.optimizer_state, scalar_dump.optimizer_state,
                                                                  want_state)):
                assert list(got_seg) == list(want_seg), f"{where}: segment {k} state names"
                for name, want in want_seg.items():
                    got = got_seg[name]
                    assert got.dtype == want.dtype and got.shape == want.shape, f"{where}: {name}"
                    if got.dtype == np.int64:
                        assert np.array_equal(got, want), f"{where}: id {i} {name}"
                        continue
                    assert_bits_equal(got, scalar_seg[name], f"{where}: id {i} segment {k} {name} vs scalar")
                    assert_ulps(got, want, ulps, f"{where}: id {i} segment {k} {name} vs model")


def run_random_sequence(monkeypatch, segments, learning_rate_fns, seed, steps=STEPS, ulps=0, pool=10, batch=12,
                        value_scale=1.0, grad_scale=1.0, first_step=3):
    """Apply the same random assigns and gradient batches to one table per kernel path and
    to the model, comparing everything after every call."""
    rng = np.random.default_rng(seed)
    tables = [build(monkeypatch, k, segments, learning_rate_fns) for k in KERNELS]
    cfg = tables[0].config
    model = EntryModel([model_segment(s) for s in segments])
    dim = model.dim
    ids = np.arange(100, 100 + pool, dtype=np.int64)
    # Most ids start from assigned random values; the rest are created by their first
    # gradient (initializer, then a step).
    assigned = ids[: pool - 3]
    start = (rng.uniform(-1, 1, size=(len(assigned), dim)) * value_scale).astype(F32)
    for table in tables:
        table.assign(assigned, start)
    model.assign(assigned, start)
    assert_table_matches(tables, model, ids, ulps, "after assign")
    for n in range(steps):
        t = first_step + n
        batch_ids = rng.choice(ids, size=batch)  # duplicates are likely
        grads = (rng.standard_normal(size=(batch, dim)) * grad_scale).astype(F32)
        dedup = n % 3 == 2
        lrs = cfg.call_learning_rate_fns(t)
        for table in tables:
            table.apply_gradients(batch_ids, grads, global_step=t, enable_dedup=dedup)
        model.apply_gradients(batch_ids, grads, lrs, t, dedup=dedup)
        assert_table_matches(tables, model, ids, ulps, f"step {n} (global_step {t}, dedup={dedup})")
    return tables, model


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_matches_model(monkeypatch, name):
    dims = (1,) if name == "batch_softmax" else DIMS
    zeros = nonzeros = 0
    for dim in dims:
        init = mtht.ConstantsInitializer(0.25)
        segs = [segment(dim, OPTIMIZERS[name](dim), initializer=init)]
        _, model = run_random_sequence(monkeypatch, segs, [schedule], seed=[dim, zlib.crc32(name.encode())])
        values = np.concatenate([model.values(i) for i in range(100, 110)])
        zeros += int(np.sum(values == 0))
        nonzeros += int(np.sum(values != 0))
    if name.endswith("_sparse"):  # both sides of the L1 / group threshold were reached
        assert zeros > 0 and nonzeros > 0, (zeros, nonzeros)


@pytest.mark.parametrize("name", ["adagrad_wd", "adam_nesterov_wd", "group_adagrad_wd", "rmsprop_wd"])
def test_optimizer_large_batch(monkeypatch, name):
    """A batch big enough to be spread over threads gives the same (exact) results."""
    segs = [segment(17, OPTIMIZERS[name](17))]
    run_random_sequence(monkeypatch, segs, [0.03], seed=7, steps=2, pool=2000, batch=5000)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_checkpoint_keeps_optimizer_state(monkeypatch, tmp_path, name):
    """Save, restore into a new table, keep training: bit for bit the same as never stopping
    (for Adam, both bias-correction counters come back, each from its own slot)."""
    dim = 1 if name == "batch_softmax" else 7
    segs = [segment(dim, OPTIMIZERS[name](dim))]
    rng = np.random.default_rng(21)
    ids = np.array([1, 2, 3, 2])
    a = build(monkeypatch, KERNELS[-1], segs, [schedule])
    for step in range(4):
        a.apply_gradients(ids, rng.standard_normal((4, dim)).astype(F32), global_step=step, req_time=50 + step)
    a.save(str(tmp_path / "ckpt"))
    b = build(monkeypatch, KERNELS[-1], segs, [schedule]).restore(str(tmp_path / "ckpt"))
    for step in range(4, 8):
        g = rng.standard_normal((4, dim)).astype(F32)
        for table in (a, b):
            table.apply_gradients(ids, g, global_step=step, req_time=50 + step)
    for x, y in zip(a.lookup_entry([1, 2, 3]), b.lookup_entry([1, 2, 3])):
        assert_bits_equal(y.values, x.values)
        assert y.last_update_ts == x.last_update_ts
        assert list(y.optimizer_state[0]) == list(x.optimizer_state[0])
        for key, arr in x.optimizer_state[0].items():
            assert np.array_equal(y.optimizer_state[0][key].view(np.uint8), arr.view(np.uint8)), key
        if name.startswith("adam"):
            params = OPTIMIZERS[name](dim).params()
            steps = {1: 8, 2: 16, 3: 8}[y.id]
            for counter, beta in (("beta1_power", F32(params["beta1"])), ("beta2_power", F32(params["beta2"]))):
                want = beta
                for _ in range(steps):
                    want = want * beta
                assert y.optimizer_state[0][counter].tolist() == [want], counter


def test_dedup_sums_left_to_right(monkeypatch, kernel):
    """enable_dedup: one step with the gradients of an id summed in input order (float32)."""
    g = np.array([[1e8], [1.0], [-1e8]], dtype=F32)  # (1e8 + 1) - 1e8 = 0 in float32
    t = build(monkeypatch, kernel, [segment(1, mtht.SgdOptimizer())], [1.0])
    t.apply_gradients([5, 5, 5], g, global_step=0, enable_dedup=True)
    assert t.lookup([5])[0, 0] == -((F32(1e8) + F32(1)) + F32(-1e8))
    t = build(monkeypatch, kernel, [segment(1, mtht.AdagradOptimizer())], [1.0])
    t.apply_gradients([5, 5], np.array([[1.0], [2.0]], dtype=F32), global_step=0, enable_dedup=True)
    assert t.lookup_entry([5])[0].optimizer_state[0]["norm"][0] == F32(0.1) + F32(9)


# ---------------------------------------------------------------------------------------
# (c) Multi-segment entries: optimizers and retrievers combined positionally
# ---------------------------------------------------------------------------------------

def test_segments_combine_positionally(monkeypatch):
    one_bit = mtht.OneBitCompressor(step_size=3, amplitude=0.5)
    segs = [
        segment(3, mtht.AdagradOptimizer(weight_decay_factor=0.01)),
        segment(1, mtht.SgdOptimizer(), mtht.FixedR8Compressor(2.0)),
        segment(5, mtht.AdamOptimizer(use_nesterov=True), one_bit),
        segment(8, mtht.FtrlOptimizer(l1_regularization=0.01), initializer=mtht.ConstantsInitializer(0.5)),
        segment(17, mtht.MomentumOptimizer(use_nesterov=True), mtht.OneBitCompressor(step_size=4, amplitude=0.1)),
        segment(2, mtht.MovingAverageOptimizer(), mtht.FixedR8Compressor(0.5)),
    ]
    lrs = [0.1, 0.5, 0.01, 0.05, lambda step: 0.02 + 0.001 * step, 0.3]
    run_random_sequence(monkeypatch, segs, lrs, seed=11, ulps=TANH_ULPS)


def test_segments_combine_positionally_all_kinds(monkeypatch):
    segs = [
        segment(4, mtht.AdaGradWithGroupLassoOptimizer(beta=1.0, l2_regularization=0.01),
                mtht.OneBitCompressor(step_size=5, amplitude=0.2)),
        segment(7, mtht.FTRLWithGroupSparsityOptimizer(l1_regularization=0.02), mtht.FixedR8Compressor(1.0)),
        segment(2, mtht.RmspropOptimizer(weight_decay_factor=0.01)),
        segment(1, mtht.BatchSoftmaxOptimizer(), initializer=mtht.BatchSoftmaxInitializer(1.0)),
        segment(9, mtht.RmspropV2Optimizer()),
        segment(16, mtht.AmsgradOptimizer()),
        segment(5, mtht.DynamicWdAdagradOptimizer(weight_decay_factor=0.02)),
        segment(6, mtht.AdadeltaOptimizer(), initializer=mtht.OnesInitializer()),
    ]
    lrs = [0.05, 0.1, 0.01, 0.2, 0.02, 0.01, 0.1, 1.0]
    run_random_sequence(monkeypatch, segs, lrs, seed=12, ulps=TANH_ULPS)


def test_per_segment_learning_rates(monkeypatch, kernel):
    """Segment k steps with learning rate k (and only its own gradient slice)."""
    segs = [segment(2, mtht.SgdOptimizer()), segment(3, mtht.SgdOptimizer()), segment(1, mtht.SgdOptimizer())]
    t = build(monkeypatch, kernel, segs, [1.0, 0.5, lambda step: 0.25 * step])
    t.apply_gradients([1], [[1, 2, 4, 6, 8, 16]], global_step=2)
    assert t.lookup([1]).tolist() == [[-1, -2, -2, -3, -4, -8]]


def test_hashnet_scale_is_per_segment_and_table_wide(monkeypatch, kernel):
    """The scale moves at the start of a call whose step is a multiple of the segment's
    step size, for every entry, including entries the call does not touch."""
    segs = [segment(1, mtht.SgdOptimizer(), mtht.OneBitCompressor(step_size=10, amplitude=1.0)),
            segment(1, mtht.SgdOptimizer(), mtht.OneBitCompressor(step_size=7, amplitude=1.0))]
    t = build(monkeypatch, kernel, segs, [0.0, 0.0])
    t.assign([1, 2], [[0.5, 0.5], [0.25, 0.25]])

    def expect(s0, s1):
        want = np.stack([ref.hashnet_forward(np.array([0.5, 0.25], dtype=F32), s0, 1.0),
                         ref.hashnet_forward(np.array([0.5, 0.25], dtype=F32), s1, 1.0)], axis=1)
        assert_ulps(t.lookup([1, 2]), want, TANH_ULPS)

    expect(1.0, 1.0)
    t.apply_gradients([1], [[0.0, 0.0]], global_step=9)  # neither step size divides 9
    expect(1.0, 1.0)
    t.apply_gradients([1], [[0.0, 0.0]], global_step=70)  # both
    expect(ref.hashnet_scale(1, 10000, 70), ref.hashnet_scale(1, 10000, 70))
    t.apply_gradients([1], [[0.0, 0.0]], global_step=140)
    t.apply_gradients([1], [[0.0, 0.0]], global_step=147)  # only the second segment
    expect(ref.hashnet_scale(1, 10000, 140), ref.hashnet_scale(1, 10000, 147))
    t.apply_gradients([], np.zeros((0, 2), dtype=F32), global_step=200)  # an empty call changes nothing
    expect(ref.hashnet_scale(1, 10000, 140), ref.hashnet_scale(1, 10000, 147))
    t.apply_gradients([1], [[0.0, 0.0]], global_step=-70)  # a negative step leaves it (docs: not negative)
    expect(ref.hashnet_scale(1, 10000, 140), ref.hashnet_scale(1, 10000, 147))
    # The scale saturates at max_scale (10000): sqrt(1 + 0.005 t) * 1 reaches it at t ~ 2e10.
    assert ref.hashnet_scale(1, 10000, 10**12) == F32(10000)


# ---------------------------------------------------------------------------------------
# (d) Stochastic rounding to float16
# ---------------------------------------------------------------------------------------

def rounded(opt):
    return mtht.StochasticRoundingFloat16OptimizerWrapper(opt)


def sr_table(monkeypatch, kernel, dim, seed=0, opt=None):
    return build(monkeypatch, kernel, [segment(dim, rounded(opt or mtht.SgdOptimizer()))], [0.1],
                 random_seed=seed)


def test_stochastic_rounding_lands_on_a_neighbour(monkeypatch, kernel):
    rng = np.random.default_rng(3)
    t = sr_table(monkeypatch, kernel, 33)
    ids = np.arange(200)
    # Normal, large and float16-subnormal magnitudes.
    w = (rng.standard_normal((200, 33)) * np.exp(rng.uniform(-18, 9, size=(200, 33)))).astype(F32)
    w = np.clip(w, -60000, 60000)
    g = rng.standard_normal((200, 33)).astype(F32)
    t.assign(ids, w)
    t.apply_gradients(ids, g, global_step=4)
    got = t.lookup(ids)
    exact = w - F32(0.1) * g
    down, up = ref.fp16_neighbours(exact)
    assert ref.is_fp16_value(got).all()
    assert ((got == down) | (got == up)).all()
    assert (down != up).sum() > 6000  # almost every value needed rounding
    # Values that are already float16 values stay as they are.
    halves = np.float16(rng.standard_normal((200, 33))).astype(F32)
    t.assign(ids, halves)
    t.apply_gradients(ids, np.zeros((200, 33), dtype=F32), global_step=5)
    assert_bits_equal(t.lookup(ids), halves)


def test_stochastic_rounding_keeps_optimizer_state_exact(monkeypatch, kernel):
    """Only the values are rounded: the state follows the unrounded arithmetic on the
    (rounded) values the entry really had."""
    t = sr_table(monkeypatch, kernel, 7, opt=mtht.AdamOptimizer())
    seg = model_segment(segment(7, mtht.AdamOptimizer()))
    rng = np.random.default_rng(5)
    state = ref.init_state("adam", seg.params, 1, 7)
    w = np.zeros((1, 7), dtype=F32)
    for step in range(10):
        g = rng.standard_normal((1, 7)).astype(F32)
        t.apply_gradients([9], g, global_step=step)
        want = ref.step("adam", seg.params, w, state, g, 0.1, step)
        got = t.lookup([9])
        down, up = ref.fp16_neighbours(want)
        assert ((got == down) | (got == up)).all()
        for name, arr in t.lookup_entry([9])[0].optimizer_state[0].items():
            assert_bits_equal(arr, state[name][0], name)
        w = got


def test_stochastic_rounding_is_unbiased(monkeypatch):
    """E[round(x)] = x: over many ids, the mean rounding error is a tiny fraction of the
    float16 spacing (Monolith's generator rounded up about 3 times in 4)."""
    kernel = KERNELS[-1]
    n, dim = 20000, 8
    ids = np.arange(n)
    for fraction in (0.1, 0.3, 0.5, 0.9):
        for base in (1.0, -3.0, 1000.0):
            t = sr_table(monkeypatch, kernel, dim, seed=17)
            down = F32(base)
            up = np.nextafter(np.float16(base), np.float16(np.inf)).astype(F32)
            x = F32(down + F32(fraction) * (up - down))
            t.assign(ids, np.full((n, dim), x, dtype=F32))
            t.apply_gradients(ids, np.zeros((n, dim), dtype=F32), global_step=1)
            got = t.lookup(ids)
            assert ((got == down) | (got == up)).all()
            p_up = float(np.mean(got == up))
            want = float((x - down) / (up - down))
            # 160000 draws: the standard deviation of p_up is <= 0.00125.
            assert abs(p_up - want) < 0.01, (fraction, base, p_up, want)
    # Random values: the mean error in units of the spacing is ~0.
    rng = np.random.default_rng(8)
    t = sr_table(monkeypatch, kernel, dim, seed=18)
    w = rng.uniform(-4, 4, size=(n, dim)).astype(F32)
    t.assign(ids, w)
    t.apply_gradients(ids, np.zeros((n, dim), dtype=F32), global_step=2)
    got = t.lookup(ids)
    down, up = ref.fp16_neighbours(w)
    need = down != up
    rel = (got[need].astype(np.float64) - w[need]) / (up[need].astype(np.float64) - down[need])
    assert abs(rel.mean()) < 0.01


def test_stochastic_rounding_is_deterministic(monkeypatch):
    ids = np.arange(500)
    rng = np.random.default_rng(4)
    w = rng.uniform(-2, 2, size=(500, 16)).astype(F32)

    def run(kernel, seed, step):
        t = sr_table(monkeypatch, kernel, 16, seed=seed)
        t.assign(ids, w)
        t.apply_gradients(ids, np.zeros((500, 16), dtype=F32), global_step=step)
        return t.lookup(ids)

    first = run(KERNELS[0], 1, 10)
    for kernel in KERNELS:  # same seed, id, step and position: the same result everywhere
        assert_bits_equal(run(kernel, 1, 10), first, kernel)
    assert (run(KERNELS[0], 1, 11) != first).mean() > 0.2  # another step draws again
    assert (run(KERNELS[0], 2, 10) != first).mean() > 0.2  # another seed too
    # Each id draws its own numbers: the same value in every row rounds differently.
    t = sr_table(monkeypatch, KERNELS[0], 16, seed=1)
    t.assign(ids, np.full((500, 16), 1.0 + 2.0**-12, dtype=F32))
    t.apply_gradients(ids, np.zeros((500, 16), dtype=F32), global_step=10)
    assert len({row.tobytes() for row in t.lookup(ids)}) > 400


@pytest.mark.parametrize("rounded_segment", [0, 1, 2])
def test_stochastic_rounding_touches_only_its_segment(monkeypatch, kernel, rounded_segment):
    dims = [5, 9, 3]
    segs = [segment(d, rounded(mtht.SgdOptimizer()) if k == rounded_segment else mtht.SgdOptimizer())
            for k, d in enumerate(dims)]
    t = build(monkeypatch, kernel, segs, [0.1, 0.2, 0.3])
    rng = np.random.default_rng(rounded_segment)
    w = rng.uniform(-1, 1, size=(50, 17)).astype(F32)
    g = rng.standard_normal((50, 17)).astype(F32)
    t.assign(np.arange(50), w)
    t.apply_gradients(np.arange(50), g, global_step=3)
    got = t.lookup(np.arange(50))
    lrs = np.repeat(np.array([0.1, 0.2, 0.3], dtype=F32), dims)
    exact = w - lrs * g
    a, b = int(np.sum(dims[:rounded_segment])), int(np.sum(dims[:rounded_segment + 1]))
    down, up = ref.fp16_neighbours(exact[:, a:b])
    assert ((got[:, a:b] == down) | (got[:, a:b] == up)).all()
    assert (got[:, a:b] != exact[:, a:b]).any()
    assert_bits_equal(np.delete(got, np.s_[a:b], axis=1), np.delete(exact, np.s_[a:b], axis=1))


def test_stochastic_rounding_saturates(monkeypatch, kernel):
    t = sr_table(monkeypatch, kernel, 8)
    w = np.array([[70000, -70000, 65504, -65504, 65510, -65519, 3e38, 60000]], dtype=F32)
    t.assign([1], w)
    t.apply_gradients([1], np.zeros((1, 8), dtype=F32), global_step=0)
    got = t.lookup([1])[0]
    assert got[:7].tolist() == [65504, -65504, 65504, -65504, 65504, -65504, 65504]
    assert got[7] in (59968.0, 60000.0, 60032.0) and ref.is_fp16_value(got[7])
    # A step that overshoots also saturates, on both sides.
    before = t.lookup([1])
    t.apply_gradients([1], -np.sign(before) * F32(1e6), global_step=1)
    assert_bits_equal(t.lookup([1]), np.sign(before) * F32(65504))


def test_stochastic_rounding_passes_the_global_step(monkeypatch, kernel):
    """Monolith's wrapper dropped global_step (batch softmax then saw 0); here it is passed."""
    opt = rounded(mtht.BatchSoftmaxOptimizer())
    t = build(monkeypatch, kernel, [segment(1, opt)], [0.1])
    t.apply_gradients([1], [0.0], global_step=10)
    assert t.lookup([1]).tolist() == [[1.0]]  # 0.9 * 0 + 0.1 * 10, a float16 value
    assert t.lookup_entry([1])[0].optimizer_state[0]["global_step"].tolist() == [10]


# ---------------------------------------------------------------------------------------
# (e) Named optimizer state and memory per entry
# ---------------------------------------------------------------------------------------

D = 5
STATE = {
    # optimizer: (builder, [(name, shape, dtype, initial value)])
    "sgd": (mtht.SgdOptimizer(), []),
    "adagrad": (mtht.AdagradOptimizer(initial_accumulator_value=0.3), [("norm", (D,), F32, 0.3)]),
    "dynamic_wd_adagrad": (mtht.DynamicWdAdagradOptimizer(initial_accumulator_value=0.2),
                           [("norm", (D,), F32, 0.2), ("last_update_step", (1,), np.int64, 0)]),
    "adadelta": (mtht.AdadeltaOptimizer(), [("accum", (D,), F32, 0), ("accum_update", (D,), F32, 0)]),
    "adam": (mtht.AdamOptimizer(beta1=0.8, beta2=0.95),
             [("m", (D,), F32, 0), ("v", (D,), F32, 0), ("beta1_power", (1,), F32, 0.8),
              ("beta2_power", (1,), F32, 0.95)]),
    "amsgrad": (mtht.AmsgradOptimizer(),
                [("m", (D,), F32, 0), ("v", (D,), F32, 0), ("vhat", (D,), F32, 0),
                 ("beta1_power", (1,), F32, 0.9), ("beta2_power", (1,), F32, 0.99)]),
    "ftrl": (mtht.FtrlOptimizer(initial_accumulator_value=0.4), [("zero", (D,), F32, 0), ("norm", (D,), F32, 0.4)]),
    "group_ftrl": (mtht.FTRLWithGroupSparsityOptimizer(), [("zero", (D,), F32, 0), ("norm", (D,), F32, 0.0)]),
    "group_adagrad": (mtht.AdaGradWithGroupLassoOptimizer(), [("grad_square_sum", (1,), F32, 0.1)]),
    "momentum": (mtht.MomentumOptimizer(), [("n", (D,), F32, 0)]),
    "moving_average": (mtht.MovingAverageOptimizer(), []),
    "rmsprop": (mtht.RmspropOptimizer(), [("n", (D,), F32, 0)]),
    "rmspropv2": (mtht.RmspropV2Optimizer(), [("n", (D,), F32, 0)]),
    "batch_softmax": (mtht.BatchSoftmaxOptimizer(), [("global_step", (1,), np.int64, 0)]),
}


def state_words(layout):
    return sum(int(np.prod(shape)) * (2 if dtype is np.int64 else 1) for _, shape, dtype, _ in layout)


@pytest.mark.parametrize("name", sorted(STATE))
def test_state_names_sizes_and_memory(monkeypatch, name):
    builder, layout = STATE[name]
    dim = 1 if name == "batch_softmax" else D
    layout = [(n, (dim,) if shape == (D,) else shape, dtype, v) for n, shape, dtype, v in layout]
    t = build(monkeypatch, KERNELS[-1], [segment(dim, builder)], [0.1])
    t.assign([1], np.ones((1, dim), dtype=F32))
    (state,) = t.lookup_entry([1])[0].optimizer_state
    assert list(state) == [n for n, *_ in layout]
    for n, shape, dtype, value in layout:
        assert state[n].shape == shape and state[n].dtype == dtype, n
        assert (state[n] == dtype(value)).all(), (n, state[n])
    # Row = 4 * (values + state words), padded as the design note says.
    words = dim + state_words(layout)
    stats = t.stats()
    assert stats["state_floats"] == state_words(layout)
    assert stats["row_stride"] == expected_stride(4 * words)
    # A step keeps names and shapes; step counters record the global step.
    t.apply_gradients([1], np.ones((1, dim), dtype=F32), global_step=42)
    (after,) = t.lookup_entry([1])[0].optimizer_state
    assert {n: (a.shape, a.dtype) for n, a in after.items()} == {n: (a.shape, a.dtype) for n, a in state.items()}
    for counter in ("last_update_step", "global_step"):
        if counter in after:
            assert after[counter].tolist() == [42]


def expected_stride(nbytes):
    """Row padding of docs/design.md: a power of two (>= 8) up to 64 bytes; beyond, a multiple
    of 64 when that wastes at most 1/8 of it, else a multiple of 16."""
    if nbytes <= 64:
        return max(8, 1 << (nbytes - 1).bit_length())
    line = -(-nbytes // 64) * 64
    return line if (line - nbytes) * 8 <= line else -(-nbytes // 16) * 16


def test_expected_stride_examples():
    assert [expected_stride(b) for b in (4, 8, 12, 40, 64, 72, 128, 136, 200, 232)] == \
        [8, 8, 16, 64, 64, 80, 128, 144, 208, 256]


def test_state_of_multi_segment_entry(monkeypatch):
    segs = [segment(2, mtht.AdamOptimizer()), segment(1, mtht.SgdOptimizer()),
            segment(3, mtht.AdaGradWithGroupLassoOptimizer()), segment(1, mtht.BatchSoftmaxOptimizer())]
    t = build(monkeypatch, KERNELS[-1], segs, [0.1, 0.1, 0.1, 0.1])
    t.apply_gradients([1], np.ones((1, 7), dtype=F32), global_step=6)
    state = t.lookup_entry([1])[0].optimizer_state
    assert [list(s) for s in state] == [["m", "v", "beta1_power", "beta2_power"], [], ["grad_square_sum"],
                                        ["global_step"]]
    assert state[3]["global_step"].tolist() == [6]
    assert t.stats()["state_floats"] == (2 * 2 + 2) + 0 + 1 + 2
    assert t.stats()["row_stride"] == expected_stride(4 * (7 + 9))


# ---------------------------------------------------------------------------------------
# (f) Monolith's test_batch_softmax_optimizer
# ---------------------------------------------------------------------------------------

def test_batch_softmax_optimizer(monkeypatch, kernel):
    t = build(monkeypatch, kernel, [segment(1, mtht.BatchSoftmaxOptimizer())], [0.1])
    for step in range(1000):
        ids = [i for i, every in ((0, 5), (1, 10)) if step % every == 0]
        if ids:
            t.apply_gradients(ids, np.zeros((len(ids), 1), dtype=F32), global_step=step)
    interval = t.lookup([0, 1])
    np.testing.assert_allclose(1.0 / np.maximum(interval, 1.0), [[0.2], [0.1]], atol=0.01)


# ---------------------------------------------------------------------------------------
# (g) Configurations and calls that are refused
# ---------------------------------------------------------------------------------------

def test_batch_softmax_needs_dim_1():
    with pytest.raises(ValueError, match="dim"):
        segment(2, mtht.BatchSoftmaxOptimizer())


def test_batch_softmax_needs_non_negative_step(monkeypatch, kernel):
    t = build(monkeypatch, kernel, [segment(1, mtht.BatchSoftmaxOptimizer())], [0.1])
    t.apply_gradients([1], [0.0], global_step=3)
    before = t.lookup_entry([1])[0]
    with pytest.raises(ValueError, match="global_step"):
        t.apply_gradients([1, 2], [0.0, 0.0], global_step=-1)
    after = t.lookup_entry([1])[0]
    assert_bits_equal(after.values, before.values)
    assert after.optimizer_state[0]["global_step"].tolist() == [3]
    assert len(t) == 1  # id 2 was not created


def test_negative_step_is_fine_without_batch_softmax(monkeypatch, kernel):
    t = build(monkeypatch, kernel, [segment(1, mtht.SgdOptimizer())], [1.0])
    t.apply_gradients([1], [1.0], global_step=-5)
    assert t.lookup([1]).tolist() == [[-1.0]]


def test_unknown_kernel_is_refused(monkeypatch):
    monkeypatch.setenv("MTHT_KERNEL", "nonsense")
    with pytest.raises(ValueError, match="MTHT_KERNEL"):
        mtht.hash_table_from_config(config_of([segment(2, mtht.SgdOptimizer())], [0.1]))


@pytest.mark.parametrize("value", ["auto", ""])
def test_auto_kernel_is_the_fastest(monkeypatch, value):
    monkeypatch.setenv("MTHT_KERNEL", value)
    t = mtht.hash_table_from_config(config_of([segment(2, mtht.SgdOptimizer())], [0.1]))
    assert t._core.kernel == KERNELS[-1]
    assert mtht.build_info()["active_kernel"] == KERNELS[-1]
    monkeypatch.delenv("MTHT_KERNEL")
    assert mtht.hash_table_from_config(config_of([segment(2, mtht.SgdOptimizer())], [0.1]))._core.kernel == KERNELS[-1]


def test_scalar_kernel_always_available():
    assert KERNELS[0] == "scalar"
