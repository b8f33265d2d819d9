"""Tests of mtht.learning_rate_functions against independent float64 math, and against
TensorFlow's float32 order of operations."""

import bisect
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtht.learning_rate_functions import (
    CosineDecay,
    ExponentialDecay,
    LearningRateFunction,
    LinearWarmup,
    PiecewiseConstantDecay,
    PolynomialDecay,
)

FAST = settings(max_examples=100, deadline=None)

rates = st.floats(min_value=-10.0, max_value=10.0, allow_nan=False)
positive_rates = st.floats(min_value=1e-4, max_value=10.0)
steps = st.integers(min_value=0, max_value=10**6)
decay_steps = st.integers(min_value=1, max_value=10**4)


def is_float32(x):
    return isinstance(x, float) and float(np.float32(x)) == x


# --------------------------------------------------------------------------
# Pinned numbers and Monolith's text form
# --------------------------------------------------------------------------


def test_polynomial_decay_pinned_values():
    decay = PolynomialDecay(
        initial_learning_rate=0.01, decay_steps=10, end_learning_rate=0.11
    )
    assert decay(1) == pytest.approx(0.02, rel=1e-6)
    assert decay(2) == pytest.approx(0.03, rel=1e-6)
    decay = PolynomialDecay(
        initial_learning_rate=0.1, decay_steps=10, end_learning_rate=1.1
    )
    assert decay(0) == pytest.approx(0.1, rel=1e-6)


def test_polynomial_decay_str_matches_monolith():
    decay = PolynomialDecay(
        initial_learning_rate=0.1, decay_steps=10, end_learning_rate=1.1
    )
    assert str(decay) == (
        'LearningRateFunction("PolynomialDecay",Params:cycle=False,'
        "decay_steps=10,end_learning_rate=1.1,initial_learning_rate=0.1,"
        "name=None,power=1.0)"
    )


def test_str_of_other_schedules_uses_the_same_format():
    assert str(ExponentialDecay(0.1, 100, 0.5, name="e")) == (
        'LearningRateFunction("ExponentialDecay",Params:decay_rate=0.5,'
        "decay_steps=100,initial_learning_rate=0.1,name=e,staircase=False)"
    )
    assert str(PiecewiseConstantDecay([10], [1.0, 0.5])) == (
        'LearningRateFunction("PiecewiseConstantDecay",Params:'
        "boundaries=[10],name=None,values=[1.0, 0.5])"
    )
    warmup = LinearWarmup(PolynomialDecay(0.1, 10), 5)
    assert str(warmup).startswith(
        'LearningRateFunction("LinearWarmup",Params:initial_learning_rate=0.0,'
        'learning_rate=LearningRateFunction("PolynomialDecay",'
    )


def test_schedules_are_learning_rate_functions():
    for fn in (
        PolynomialDecay(0.1, 10),
        ExponentialDecay(0.1, 10, 0.9),
        CosineDecay(0.1, 10),
        PiecewiseConstantDecay([1], [0.1, 0.2]),
        LinearWarmup(0.1, 3),
    ):
        assert isinstance(fn, LearningRateFunction)
        assert is_float32(fn(0))
        assert is_float32(fn(np.int64(7)))
    with pytest.raises(TypeError):
        LearningRateFunction()


# --------------------------------------------------------------------------
# Equality, hashing and canonical keys
# --------------------------------------------------------------------------


def test_equality_ignores_name_and_int_float_spelling():
    a = PolynomialDecay(0.01, 20, 0.05, name="a")
    b = PolynomialDecay(0.01, 20.0, 0.05, name="b")
    assert a == b
    assert hash(a) == hash(b)
    assert a.canonical_key() == b.canonical_key()
    assert "name" not in a.canonical_key()
    assert str(a) != str(b)  # Monolith's text keeps every attribute


def test_equality_uses_float32_values():
    a = PolynomialDecay(np.float32(0.1), 10)
    b = PolynomialDecay(0.1, 10)
    assert a == b


@pytest.mark.parametrize(
    "other",
    [
        PolynomialDecay(0.02, 20, 0.05),
        PolynomialDecay(0.01, 21, 0.05),
        PolynomialDecay(0.01, 20, 0.06),
        PolynomialDecay(0.01, 20, 0.05, power=2.0),
        PolynomialDecay(0.01, 20, 0.05, cycle=True),
        ExponentialDecay(0.01, 20, 0.05),
    ],
)
def test_different_schedules_differ(other):
    base = PolynomialDecay(0.01, 20, 0.05)
    assert base != other
    assert base.canonical_key() != other.canonical_key()


def test_nested_and_sequence_parameters_are_normalised():
    assert LinearWarmup(PolynomialDecay(0.1, 10, name="x"), 5) == LinearWarmup(
        PolynomialDecay(0.1, 10.0), 5
    )
    assert LinearWarmup(1, 5) == LinearWarmup(1.0, 5)
    assert PiecewiseConstantDecay([10, 20], [1, 2, 3]) == PiecewiseConstantDecay(
        (10.0, np.int64(20)), [1.0, 2.0, 3.0]
    )
    assert PiecewiseConstantDecay([10], [1, 2]) != PiecewiseConstantDecay(
        [11], [1, 2]
    )


def test_comparison_with_other_types():
    assert PolynomialDecay(0.1, 10) != 0.1
    assert PolynomialDecay(0.1, 10) != "x"


# --------------------------------------------------------------------------
# Formulas against independent float64 references
# --------------------------------------------------------------------------


def polynomial_reference(initial, steps_, end, power, cycle, step):
    if cycle:
        multiplier = 1.0 if step == 0 else math.ceil(step / steps_)
        p = step / (steps_ * multiplier)
    else:
        p = min(step, steps_) / steps_
    return (initial - end) * (1.0 - p) ** power + end


@FAST
@given(
    initial=rates,
    end=rates,
    decay=decay_steps,
    power=st.floats(min_value=0.5, max_value=3.0),
    cycle=st.booleans(),
    step=steps,
)
def test_polynomial_decay_matches_formula(initial, end, decay, power, cycle,
                                          step):
    fn = PolynomialDecay(initial, decay, end, power=power, cycle=cycle)
    got = fn(step)
    expected = polynomial_reference(initial, decay, end, power, cycle, step)
    assert is_float32(got)
    assert got == pytest.approx(
        expected, abs=1e-5 * (abs(initial) + abs(end)) + 1e-12
    )


def test_polynomial_decay_cycle_restarts():
    fn = PolynomialDecay(1.0, 10, 0.0, cycle=True)
    assert fn(0) == 1.0
    assert fn(10) == 0.0
    assert fn(11) == pytest.approx(1 - 11 / 20)
    no_cycle = PolynomialDecay(1.0, 10, 0.0)
    assert no_cycle(11) == 0.0
    assert no_cycle(10**9) == 0.0


@FAST
@given(
    initial=positive_rates,
    decay=decay_steps,
    rate=st.floats(min_value=0.1, max_value=1.0),
    staircase=st.booleans(),
    step=st.integers(min_value=0, max_value=10**5),
)
def test_exponential_decay_matches_formula(initial, decay, rate, staircase,
                                           step):
    # TF's schedule works in float32: the rate and the step fraction are float32 values, so
    # the expectation raises the float32-rounded rate (a rate near 1 to a large power
    # magnifies its rounding, which is TF's behaviour and not an error).
    p = float(np.float32(step) / np.float32(decay))
    if staircase:
        p = math.floor(p)
    expected = float(np.float32(initial)) * float(np.float32(rate)) ** p
    got = ExponentialDecay(initial, decay, rate, staircase=staircase)(step)
    assert is_float32(got)
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-37)


@FAST
@given(
    initial=rates,
    decay=decay_steps,
    alpha=st.floats(min_value=0.0, max_value=1.0),
    step=steps,
)
def test_cosine_decay_matches_formula(initial, decay, alpha, step):
    p = min(step, decay) / decay
    expected = initial * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * p)) + alpha)
    got = CosineDecay(initial, decay, alpha=alpha)(step)
    assert is_float32(got)
    assert got == pytest.approx(expected, abs=1e-5 * abs(initial) + 1e-12)


# TensorFlow computes these schedules in float32, op by op, in this order (its
# polynomial_decay, exponential_decay and CosineDecay); a float64 step anywhere moves the
# result by an ulp in about half the cases.
F = np.float32


def tf_float32_polynomial(initial, decay, end, power, cycle, step):
    s, d = F(step), F(decay)
    if cycle:
        d = d * (F(1) if step == 0 else np.ceil(s / d))
    else:
        s = np.minimum(s, d)
    return (F(initial) - F(end)) * np.power(F(1) - s / d, F(power)) + F(end)


def tf_float32_exponential(initial, decay, rate, staircase, step):
    p = F(step) / F(decay)
    return F(initial) * np.power(F(rate), np.floor(p) if staircase else p)


def tf_float32_cosine(initial, decay, alpha, step):
    p = np.minimum(F(step), F(decay)) / F(decay)
    cosine = F(0.5) * (F(1) + np.cos(F(math.pi) * p))
    return F(initial) * ((F(1) - F(alpha)) * cosine + F(alpha))


def test_schedules_compute_in_float32_as_tensorflow_pinned():
    assert PolynomialDecay(0.01, 3, 0.11)(1) == 0.04333333671092987  # float64 math: 0.04333333298563957
    assert PolynomialDecay(0.01, 3, 0.11)(1) == tf_float32_polynomial(0.01, 3, 0.11, 1.0, False, 1)


@FAST
@given(initial=rates, end=rates, decay=decay_steps, power=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
       cycle=st.booleans(), rate=st.floats(min_value=0.1, max_value=1.0), staircase=st.booleans(),
       alpha=st.floats(min_value=0.0, max_value=1.0), step=steps)
def test_schedules_compute_in_float32_as_tensorflow(initial, end, decay, power, cycle, rate, staircase, alpha, step):
    assert PolynomialDecay(initial, decay, end, power=power, cycle=cycle)(step) == float(
        tf_float32_polynomial(initial, decay, end, power, cycle, step))
    assert ExponentialDecay(abs(initial), decay, rate, staircase=staircase)(step) == float(
        tf_float32_exponential(abs(initial), decay, rate, staircase, step))
    assert CosineDecay(initial, decay, alpha=alpha)(step) == float(tf_float32_cosine(initial, decay, alpha, step))


@FAST
@given(
    boundaries=st.lists(
        st.integers(min_value=0, max_value=1000), min_size=0, max_size=6,
        unique=True,
    ).map(sorted),
    data=st.data(),
    step=st.integers(min_value=0, max_value=1100),
)
def test_piecewise_constant_matches_definition(boundaries, data, step):
    values = data.draw(
        st.lists(rates, min_size=len(boundaries) + 1,
                 max_size=len(boundaries) + 1)
    )
    expected = values[bisect.bisect_left(boundaries, step)]
    got = PiecewiseConstantDecay(boundaries, values)(step)
    assert got == float(np.float32(expected))


def test_piecewise_constant_boundary_is_inclusive():
    fn = PiecewiseConstantDecay([10, 20], [1.0, 0.5, 0.25])
    assert [fn(s) for s in (0, 10, 11, 20, 21)] == [1.0, 1.0, 0.5, 0.5, 0.25]


@FAST
@given(
    target=positive_rates,
    initial=st.floats(min_value=0.0, max_value=1.0),
    warmup=st.integers(min_value=0, max_value=1000),
    step=st.integers(min_value=0, max_value=2000),
)
def test_linear_warmup_to_a_constant(target, initial, warmup, step):
    got = LinearWarmup(target, warmup, initial_learning_rate=initial)(step)
    if step >= warmup:
        expected = target
    else:
        expected = initial + (target - initial) * step / warmup
    assert is_float32(got)
    assert got == pytest.approx(expected, abs=1e-5 * (target + initial) + 1e-12)


@FAST
@given(warmup=st.integers(min_value=1, max_value=100),
       step=st.integers(min_value=0, max_value=300))
def test_linear_warmup_delegates_to_a_schedule(warmup, step):
    schedule = PolynomialDecay(0.1, 200, 0.001)
    fn = LinearWarmup(schedule, warmup)
    if step >= warmup:
        assert fn(step) == schedule(step)
    else:
        expected = schedule(warmup) * step / warmup
        assert fn(step) == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_linear_warmup_is_continuous_at_the_end_of_warmup():
    schedule = CosineDecay(1.0, 100)
    fn = LinearWarmup(schedule, 10)
    assert fn(10) == schedule(10)
    assert fn(9) < fn(10)
    assert LinearWarmup(0.5, 0)(0) == 0.5


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: PolynomialDecay(0.1, 0),
        lambda: PolynomialDecay(0.1, -5),
        lambda: PolynomialDecay(float("nan"), 10),
        lambda: PolynomialDecay(0.1, 10, end_learning_rate=float("inf")),
        lambda: PolynomialDecay(0.1, 10, cycle="yes"),
        lambda: PolynomialDecay("0.1", 10),
        lambda: PolynomialDecay(True, 10),
        lambda: ExponentialDecay(0.1, 0, 0.5),
        lambda: ExponentialDecay(0.1, 10, -0.5),
        lambda: CosineDecay(0.1, 0),
        lambda: PiecewiseConstantDecay([10], [1.0]),
        lambda: PiecewiseConstantDecay([10, 10], [1.0, 2.0, 3.0]),
        lambda: PiecewiseConstantDecay([10, 5], [1.0, 2.0, 3.0]),
        lambda: PiecewiseConstantDecay([1.5], [1.0, 2.0]),
        lambda: PiecewiseConstantDecay([1], [1.0, float("nan")]),
        lambda: LinearWarmup(0.1, -1),
        lambda: LinearWarmup(0.1, 2.5),
        lambda: LinearWarmup("x", 2),
    ],
)
def test_invalid_parameters_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


def test_global_step_validation():
    fn = PolynomialDecay(0.1, 10)
    with pytest.raises(ValueError):
        fn(-1)
    with pytest.raises(TypeError):
        fn(1.5)
    with pytest.raises(TypeError):
        fn(True)
    with pytest.raises(TypeError):
        fn(np.array([1, 2]))
    assert fn(np.array(3)) == fn(3) == fn(np.uint32(3))


def test_global_step_of_a_framework_tensor():
    torch = pytest.importorskip("torch")
    fn = PolynomialDecay(0.1, 10)
    assert fn(torch.tensor(3)) == fn(3)
    for bad in (torch.tensor(True), torch.tensor(1.0), torch.tensor([1, 2])):
        with pytest.raises(TypeError, match="global_step must be an integer"):
            fn(bad)
