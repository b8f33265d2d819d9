"""Learning-rate schedules evaluated at an integer global step.

Every schedule is a :class:`LearningRateFunction`: an object called with the
global step that returns the learning rate as a Python ``float`` whose value is
exactly representable in float32. The arithmetic follows TensorFlow's
schedules of the same names step by step in float32, so a model ported from
Monolith (which evaluates these schedules with TensorFlow) sees the same
learning rates.

A schedule is a plain value object:

* ``str(schedule)`` is Monolith's text form,
  ``LearningRateFunction("<ClassName>",Params:k1=v1,k2=v2,...)``;
* two schedules of the same class with the same parameters compare equal and
  hash equal whatever their ``name``; :meth:`LearningRateFunction.canonical_key`
  is the normalised text used for that comparison and for the table merge key
  (see :class:`mtht.entry.HashTableConfigInstance`).

Examples
--------
>>> from mtht.learning_rate_functions import PolynomialDecay
>>> decay = PolynomialDecay(initial_learning_rate=0.01, decay_steps=10,
...                         end_learning_rate=0.11)
>>> round(decay(1), 6), round(decay(2), 6)
(0.02, 0.03)
"""

from __future__ import annotations

import abc
import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np

from mtht._arrays import Integer, RealNumber, as_numpy

__all__ = [
    "LearningRateFunction",
    "PolynomialDecay",
    "ExponentialDecay",
    "CosineDecay",
    "PiecewiseConstantDecay",
    "LinearWarmup",
]

_F32 = np.float32


def _is_real(value: Any) -> bool:
    """Return True for int/float-like numbers, excluding booleans."""
    return isinstance(value, (numbers.Real, np.number)) and not isinstance(
        value, (bool, np.bool_)
    )


def _check_real(value: Any, name: str, *, positive: bool = False,
                non_negative: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite real number in range."""
    if not _is_real(value):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    with np.errstate(over="ignore"):
        as_f32 = _F32(value)
    if not np.isfinite(as_f32):
        raise ValueError(f"{name} must be finite in float32, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if non_negative and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _check_bool(value: Any, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def integer_step(global_step: Any) -> int:
    """A global step as a Python int: Python and numpy integers and integer arrays of size
    one are accepted, and so is a framework's integer tensor of one element (torch, JAX);
    anything else (bools, floats) raises TypeError."""
    if not isinstance(global_step, (numbers.Number, np.ndarray)) and (
            hasattr(global_step, "__dlpack__") or hasattr(global_step, "__array__")):
        global_step = as_numpy(global_step, "global_step")
    if isinstance(global_step, (bool, np.bool_)):
        raise TypeError(f"global_step must be an integer, got {global_step!r}")
    if isinstance(global_step, np.ndarray):
        if global_step.size != 1 or global_step.dtype.kind not in "iu":
            raise TypeError(
                "global_step must be an integer scalar, got an array of shape "
                f"{global_step.shape} and dtype {global_step.dtype}"
            )
        global_step = global_step.reshape(()).item()
    try:
        return operator.index(global_step)
    except TypeError:
        raise TypeError(
            f"global_step must be an integer, got {global_step!r}"
        ) from None


def _as_step(global_step: Any) -> int:
    """A global step as a non-negative Python int (schedules are defined from step 0)."""
    step = integer_step(global_step)
    if step < 0:
        raise ValueError(f"global_step must be >= 0, got {step}")
    return step


def _result(value: Any) -> float:
    """Round a schedule result through float32 and return a Python float."""
    return float(_F32(value))


def _canonical_value(value: Any) -> str:
    """Normalised text of one schedule parameter.

    Numbers are compared as the float32 values the schedule computes with,
    so ``1``, ``1.0`` and ``np.float32(1)`` are the same; nested schedules use
    their own canonical key; sequences are normalised element-wise; any other
    callable is keyed by identity.
    """
    if value is None:
        return "None"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if _is_real(value):
        return repr(float(_F32(value)) + 0.0)  # -0.0 and 0.0 are the same
    if isinstance(value, LearningRateFunction):
        return value.canonical_key()
    if isinstance(value, np.ndarray):
        return _canonical_value(value.tolist())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_canonical_value(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value)
    if callable(value):
        return f"callable@{id(value)}"
    return repr(value)


class LearningRateFunction(abc.ABC):
    """Base class of learning-rate schedules.

    Subclasses store their constructor arguments, and only those, as instance
    attributes (they make up :meth:`__str__` and :meth:`canonical_key`) and
    implement :meth:`__call__`.
    """

    @abc.abstractmethod
    def __call__(self, global_step: int) -> float:
        """Return the learning rate at ``global_step``.

        Parameters
        ----------
        global_step : int
            The training step (a Python or numpy integer, >= 0).

        Returns
        -------
        float
            The learning rate, a value exactly representable in float32.
        """

    def __str__(self) -> str:
        params = ",".join(
            "%s=%s" % (key, self.__dict__[key]) for key in sorted(self.__dict__)
        )
        return 'LearningRateFunction("%s",Params:%s)' % (
            type(self).__name__,
            params,
        )

    def __repr__(self) -> str:
        args = ", ".join(
            f"{key}={value!r}" for key, value in self.__dict__.items()
        )
        return f"{type(self).__name__}({args})"

    def _canonical_params(self) -> dict[str, str]:
        """Normalised parameters, ``name`` excluded; subclasses may refine."""
        return {
            key: _canonical_value(value)
            for key, value in self.__dict__.items()
            if key != "name"
        }

    def canonical_key(self) -> str:
        """Return a canonical text of the schedule's class and parameters.

        The ``name`` parameter is excluded and numbers are normalised to the
        float32 values used by the computation, so two schedules that compute
        the same learning rates under the same class get the same key.

        Returns
        -------
        str
            For example
            ``"mtht.learning_rate_functions.PolynomialDecay(cycle=False, ...)"``.
        """
        cls = type(self)
        params = self._canonical_params()
        body = ", ".join(f"{key}={params[key]}" for key in sorted(params))
        return f"{cls.__module__}.{cls.__qualname__}({body})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LearningRateFunction):
            return NotImplemented
        return type(self) is type(other) and (
            self.canonical_key() == other.canonical_key()
        )

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        if result is NotImplemented:
            return result
        return not result

    def __hash__(self) -> int:
        return hash(self.canonical_key())


class PolynomialDecay(LearningRateFunction):
    """Polynomial decay from ``initial_learning_rate`` to ``end_learning_rate``.

    With ``s`` the global step (TensorFlow's ``polynomial_decay``, float32)::

        no cycle:  s' = min(s, decay_steps);  p = s' / decay_steps
        cycle:     D  = decay_steps * (1 if s == 0 else ceil(s / decay_steps))
                   p  = s / D
        lr = (initial_learning_rate - end_learning_rate) * (1 - p) ** power
             + end_learning_rate

    Parameters
    ----------
    initial_learning_rate : float
        Learning rate at step 0.
    decay_steps : int or float
        Number of steps over which to decay; must be > 0.
    end_learning_rate : float, default 0.0001
        Learning rate reached at ``decay_steps``.
    power : float, default 1.0
        Exponent of the polynomial.
    cycle : bool, default False
        Whether to restart the decay after ``decay_steps``, stretching each
        cycle to the next multiple of ``decay_steps``.
    name : str, optional
        A label; not part of the schedule's identity.

    Examples
    --------
    >>> str(PolynomialDecay(initial_learning_rate=0.1, decay_steps=10,
    ...                     end_learning_rate=1.1))  # doctest: +NORMALIZE_WHITESPACE
    'LearningRateFunction("PolynomialDecay",Params:cycle=False,decay_steps=10,end_learning_rate=1.1,initial_learning_rate=0.1,name=None,power=1.0)'
    """

    def __init__(self, initial_learning_rate: RealNumber, decay_steps: RealNumber,
                 end_learning_rate: RealNumber = 0.0001, power: RealNumber = 1.0, cycle: bool = False,
                 name: Optional[str] = None) -> None:
        _check_real(initial_learning_rate, "initial_learning_rate")
        _check_real(decay_steps, "decay_steps", positive=True)
        _check_real(end_learning_rate, "end_learning_rate")
        _check_real(power, "power")
        _check_bool(cycle, "cycle")
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.end_learning_rate = end_learning_rate
        self.power = power
        self.cycle = cycle
        self.name = name

    def __call__(self, global_step: int) -> float:
        step = _as_step(global_step)
        initial = _F32(self.initial_learning_rate)
        end = _F32(self.end_learning_rate)
        power = _F32(self.power)
        step_f = _F32(step)
        decay_steps = _F32(self.decay_steps)
        if self.cycle:
            if step == 0:
                multiplier = _F32(1.0)
            else:
                multiplier = np.ceil(step_f / decay_steps)
            decay_steps = decay_steps * multiplier
        else:
            step_f = np.minimum(step_f, decay_steps)
        fraction = step_f / decay_steps
        one = _F32(1.0)
        return _result((initial - end) * np.power(one - fraction, power) + end)


class ExponentialDecay(LearningRateFunction):
    """Exponential decay (TensorFlow's ``exponential_decay``, float32)::

        p = s / decay_steps            (floor(p) when staircase)
        lr = initial_learning_rate * decay_rate ** p

    Parameters
    ----------
    initial_learning_rate : float
        Learning rate at step 0.
    decay_steps : int or float
        Steps per decay period; must be > 0.
    decay_rate : float
        Factor applied per period; must be >= 0.
    staircase : bool, default False
        Decay in discrete intervals.
    name : str, optional
        A label; not part of the schedule's identity.
    """

    def __init__(self, initial_learning_rate: RealNumber, decay_steps: RealNumber, decay_rate: RealNumber,
                 staircase: bool = False, name: Optional[str] = None) -> None:
        _check_real(initial_learning_rate, "initial_learning_rate")
        _check_real(decay_steps, "decay_steps", positive=True)
        _check_real(decay_rate, "decay_rate", non_negative=True)
        _check_bool(staircase, "staircase")
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.decay_rate = decay_rate
        self.staircase = staircase
        self.name = name

    def __call__(self, global_step: int) -> float:
        step = _as_step(global_step)
        fraction = _F32(step) / _F32(self.decay_steps)
        if self.staircase:
            fraction = np.floor(fraction)
        return _result(
            _F32(self.initial_learning_rate)
            * np.power(_F32(self.decay_rate), fraction)
        )


class CosineDecay(LearningRateFunction):
    """Cosine decay (TensorFlow's ``CosineDecay`` without warm-up, float32)::

        p = min(s, decay_steps) / decay_steps
        decayed = (1 - alpha) * 0.5 * (1 + cos(pi * p)) + alpha
        lr = initial_learning_rate * decayed

    Parameters
    ----------
    initial_learning_rate : float
        Learning rate at step 0.
    decay_steps : int or float
        Steps to decay over; must be > 0.
    alpha : float, default 0.0
        Final learning rate as a fraction of ``initial_learning_rate``.
    name : str, optional
        A label; not part of the schedule's identity.
    """

    def __init__(self, initial_learning_rate: RealNumber, decay_steps: RealNumber, alpha: RealNumber = 0.0,
                 name: Optional[str] = None) -> None:
        _check_real(initial_learning_rate, "initial_learning_rate")
        _check_real(decay_steps, "decay_steps", positive=True)
        _check_real(alpha, "alpha")
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.alpha = alpha
        self.name = name

    def __call__(self, global_step: int) -> float:
        step = _as_step(global_step)
        decay_steps = _F32(self.decay_steps)
        fraction = np.minimum(_F32(step), decay_steps) / decay_steps
        cosine = _F32(0.5) * (_F32(1.0) + np.cos(_F32(math.pi) * fraction))
        alpha = _F32(self.alpha)
        decayed = (_F32(1.0) - alpha) * cosine + alpha
        return _result(_F32(self.initial_learning_rate) * decayed)


class PiecewiseConstantDecay(LearningRateFunction):
    """Piecewise-constant learning rate (TensorFlow's ``piecewise_constant``).

    ``values[0]`` while ``s <= boundaries[0]``, ``values[i]`` while
    ``boundaries[i-1] < s <= boundaries[i]``, and ``values[-1]`` once
    ``s > boundaries[-1]``.

    Parameters
    ----------
    boundaries : sequence of int
        Strictly increasing global steps (integral values).
    values : sequence of float
        ``len(boundaries) + 1`` learning rates.
    name : str, optional
        A label; not part of the schedule's identity.
    """

    def __init__(self, boundaries: Sequence[RealNumber], values: Sequence[RealNumber],
                 name: Optional[str] = None) -> None:
        boundaries = list(boundaries)
        values = list(values)
        if len(values) != len(boundaries) + 1:
            raise ValueError(
                "len(values) must be len(boundaries) + 1, got "
                f"{len(values)} values for {len(boundaries)} boundaries"
            )
        for i, boundary in enumerate(boundaries):
            if not _is_real(boundary) or not math.isfinite(boundary) or (
                boundary != math.floor(boundary)
            ):
                raise ValueError(
                    f"boundaries[{i}] must be an integral step, got {boundary!r}"
                )
        for previous, current in zip(boundaries, boundaries[1:]):
            if not current > previous:
                raise ValueError(
                    f"boundaries must be strictly increasing, got {boundaries!r}"
                )
        for i, value in enumerate(values):
            _check_real(value, f"values[{i}]")
        self.boundaries = boundaries
        self.values = values
        self.name = name

    def _canonical_params(self) -> dict[str, str]:
        params = super()._canonical_params()
        params["boundaries"] = (
            "[" + ", ".join(str(int(b)) for b in self.boundaries) + "]"
        )
        return params

    def __call__(self, global_step: int) -> float:
        step = _as_step(global_step)
        for boundary, value in zip(self.boundaries, self.values):
            if step <= boundary:
                return _result(value)
        return _result(self.values[-1])


class LinearWarmup(LearningRateFunction):
    """Linear warm-up in front of a constant learning rate or a schedule.

    With ``target`` = ``learning_rate`` (a number) or
    ``learning_rate(warmup_steps)`` (a schedule), for ``s < warmup_steps``::

        lr = initial_learning_rate
             + (target - initial_learning_rate) * s / warmup_steps

    and from ``warmup_steps`` on, ``learning_rate`` itself (a schedule is
    called with the unshifted global step, so the curve is continuous).

    Parameters
    ----------
    learning_rate : float or LearningRateFunction
        The learning rate after warm-up.
    warmup_steps : int
        Length of the warm-up, >= 0 (0 disables it).
    initial_learning_rate : float, default 0.0
        Learning rate at step 0.
    name : str, optional
        A label; not part of the schedule's identity.
    """

    def __init__(self, learning_rate: Union[RealNumber, LearningRateFunction], warmup_steps: Integer,
                 initial_learning_rate: RealNumber = 0.0, name: Optional[str] = None) -> None:
        if not isinstance(learning_rate, LearningRateFunction):
            _check_real(learning_rate, "learning_rate")
        if isinstance(warmup_steps, (bool, np.bool_)) or not isinstance(
            warmup_steps, (numbers.Integral, np.integer)
        ):
            raise ValueError(
                f"warmup_steps must be an integer, got {warmup_steps!r}"
            )
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
        _check_real(initial_learning_rate, "initial_learning_rate")
        self.learning_rate = learning_rate
        self.warmup_steps = warmup_steps
        self.initial_learning_rate = initial_learning_rate
        self.name = name

    def _canonical_params(self) -> dict[str, str]:
        params = super()._canonical_params()
        params["warmup_steps"] = str(int(self.warmup_steps))
        return params

    def _target(self, step: int) -> np.float32:
        if isinstance(self.learning_rate, LearningRateFunction):
            return _F32(self.learning_rate(step))
        return _F32(self.learning_rate)

    def __call__(self, global_step: int) -> float:
        step = _as_step(global_step)
        warmup = int(self.warmup_steps)
        if step >= warmup:
            return _result(self._target(step))
        initial = _F32(self.initial_learning_rate)
        target = self._target(warmup)
        fraction = _F32(step) / _F32(warmup)
        return _result(initial + (target - initial) * fraction)
