"""Table configuration: segments, optimizers, initializers and compressors.

This module mirrors the vocabulary of Monolith's ``entry.py`` with plain Python
objects instead of protocol buffers, so code written against Monolith ports by
changing imports:

>>> from mtht import entry
>>> segment = entry.CombineAsSegment(
...     16, entry.ZerosInitializer(), entry.AdagradOptimizer(), entry.Fp32Compressor())
>>> table_config = entry.EmbeddingHashTableConfig(
...     entry_config=entry.EntryConfig(segments=[segment]))
>>> config = entry.HashTableConfigInstance(table_config, [0.01])
>>> config.call_learning_rate_fns(global_step=0)
array([0.01], dtype=float32)

An embedding row is the concatenation of its segments; every segment has its
own dimension, initializer, optimizer (with its per-row state) and compressor,
and takes one learning rate from :meth:`HashTableConfigInstance.call_learning_rate_fns`.

Every builder exposes ``kind`` (the name of the algorithm) and ``params()``
(every parameter with defaults resolved: the Python default of the
constructor argument, else Monolith's proto default). Floats in ``params()``
are the float32 values the table computes with, returned as Python floats.

``str(HashTableConfigInstance)`` is the canonical *merge key*: two configs
give the same text exactly when they make tables that train identically, so
tables with the same key may share one physical table.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import numbers
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, ClassVar, List, Optional, Union, cast

import numpy as np

from mtht._arrays import Integer, IntegerInput, RealNumber, Tensor, as_numpy
from mtht.learning_rate_functions import LearningRateFunction, integer_step

__all__ = [
    # optimizers
    "Optimizer",
    "SgdOptimizer",
    "AdagradOptimizer",
    "AdadeltaOptimizer",
    "AdamOptimizer",
    "AmsgradOptimizer",
    "FtrlOptimizer",
    "MomentumOptimizer",
    "MovingAverageOptimizer",
    "RmspropOptimizer",
    "RmspropV2Optimizer",
    "BatchSoftmaxOptimizer",
    "AdaGradWithGroupLassoOptimizer",
    "DynamicWdAdagradOptimizer",
    "FTRLWithGroupSparsityOptimizer",
    "StochasticRoundingFloat16OptimizerWrapper",
    # initializers
    "Initializer",
    "ZerosInitializer",
    "OnesInitializer",
    "ConstantsInitializer",
    "RandomUniformInitializer",
    "BatchSoftmaxInitializer",
    # compressors
    "Compressor",
    "Fp32Compressor",
    "Fp16Compressor",
    "FixedR8Compressor",
    "OneBitCompressor",
    # table config
    "Segment",
    "CombineAsSegment",
    "EntryConfig",
    "SlotExpireTimeConfig",
    "EmbeddingHashTableConfig",
    "CuckooHashTableConfig",
    "HashTableConfigInstance",
    "MAX_SLOT",
]

#: Largest slot number accepted by :class:`SlotExpireTimeConfig`.
MAX_SLOT = 32767

_UINT32_MAX = 2**32 - 1
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1

# ---------------------------------------------------------------------------
# Scalar validation and canonical formatting
# ---------------------------------------------------------------------------


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    """True for int/float-like numbers (Python or numpy), excluding bools."""
    return isinstance(value, (numbers.Real, np.number)) and not _is_bool(value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, (numbers.Integral, np.integer)) and not _is_bool(
        value
    )


def _f32(value: Any) -> float:
    """Round a number through float32 and return it as a Python float."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def _key_float(value: Any) -> str:
    """Canonical text of a float: its float32 value, with -0.0 as 0.0."""
    return repr(_f32(value) + 0.0)


def _check_int(value: Any, name: str, lo: int, hi: Optional[int] = None) -> int:
    """Return ``value`` as an int in ``[lo, hi]``, else raise ValueError."""
    if not _is_integer(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = operator.index(value)
    if value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _embedding_dtype_name(value) -> str:
    """The name in EMBEDDING_DTYPES of a name or a numpy dtype (np.float16, np.dtype("float32"),
    ml_dtypes' bfloat16), so that configs compare and merge by the name alone."""
    name = None
    if isinstance(value, str):
        name = str(value)
    elif isinstance(value, (np.dtype, type)):
        try:
            name = np.dtype(value).name
        except TypeError:
            name = None
    if name not in EMBEDDING_DTYPES:
        raise ValueError(f"embedding_dtype must be one of {EMBEDDING_DTYPES} (a name or a numpy dtype), "
                         f"got {value!r}")
    return name


def _check_bool(value: Any, name: str) -> bool:
    if not _is_bool(value):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return bool(value)


# Range constraints on float parameters, checked on the float32 value.
_ANY = "any"
_NONNEG = "non-negative"
_POSITIVE = "positive"
_UNIT = "unit"  # [0, 1]
_UNIT_OPEN = "unit-open"  # [0, 1)

_RANGE_TEXT = {
    _NONNEG: ">= 0",
    _POSITIVE: "> 0",
    _UNIT: "in [0, 1]",
    _UNIT_OPEN: "in [0, 1)",
}


def _check_float(value: Any, name: str, constraint: str = _ANY) -> Any:
    """Validate a float parameter and return it unchanged.

    The value must be a real number (not a bool) whose float32 rounding is
    finite and satisfies ``constraint``.
    """
    if not _is_real(value):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    with np.errstate(over="ignore"):
        as_f32 = np.float32(value)
    if not np.isfinite(as_f32):
        raise ValueError(f"{name} must be finite in float32, got {value!r}")
    ok = {
        _ANY: True,
        _NONNEG: as_f32 >= 0,
        _POSITIVE: as_f32 > 0,
        _UNIT: 0 <= as_f32 <= 1,
        _UNIT_OPEN: 0 <= as_f32 < 1,
    }[constraint]
    if not ok:
        raise ValueError(
            f"{name} must be {_RANGE_TEXT[constraint]}, got {value!r}"
        )
    return value


def _fmt(value: Any) -> str:
    """Canonical text of a normalised parameter value."""
    if value is None:
        return "None"
    if _is_bool(value):
        return str(bool(value))
    if _is_integer(value):
        return str(int(value))
    if _is_real(value):
        return _key_float(value)
    return repr(value)


def _fmt_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={_fmt(value)}" for key, value in params.items())


# ---------------------------------------------------------------------------
# Common base of the builders
# ---------------------------------------------------------------------------


class _Builder:
    """Shared behaviour of optimizers, initializers and compressors."""

    kind: ClassVar[str]

    def params(self) -> dict[str, Union[float, int, bool]]:
        """Return every parameter with its default resolved.

        Returns
        -------
        dict
            Parameter name (as Monolith's proto field) to value: floats are
            float32-rounded Python floats, ints are ints, bools are bools.
        """
        return {}

    def canonical_key(self) -> str:
        """Return the canonical text of ``kind`` and ``params()``.

        Two builders of the same family with equal keys configure the same
        computation.

        Returns
        -------
        str
            For example ``"fixed_r8(r=1.0)"``.
        """
        return f"{self.kind}({_fmt_params(self.params())})"

    # (constructor argument name, attribute name), in constructor order
    _ARGS: ClassVar[tuple[tuple[str, str], ...]] = ()

    def validate(self) -> None:
        """Check the builder's settings as its constructor does.

        They are plain attributes, which a caller may have changed since; a table is built
        only from builders that pass (see :meth:`Segment.validate`).

        Raises
        ------
        ValueError, TypeError
            As the constructor would for these settings.
        """
        type(self)(**{arg: getattr(self, attr) for arg, attr in self._ARGS})

    def _family(self) -> type:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Builder):
            return NotImplemented
        return (
            self._family() is other._family()
            and self.canonical_key() == other.canonical_key()
        )

    def __hash__(self) -> int:
        return hash((self._family().__name__, self.canonical_key()))


# ---------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------

_FLOAT = "float"
_INT = "int"
_BOOL = "bool"


class Optimizer(_Builder):
    """Base class of the optimizer builders.

    Attributes
    ----------
    kind : str
        The optimizer, e.g. ``"adagrad"``.
    stochastic_rounding_float16 : bool
        Whether the updated embedding is stochastically rounded to float16
        (set by :class:`StochasticRoundingFloat16OptimizerWrapper`).
    """

    stochastic_rounding_float16: ClassVar[bool] = False

    # (proto field name, type, proto default, range constraint for floats)
    _FIELDS: ClassVar[tuple[tuple[str, str, Any, str], ...]] = ()

    def _family(self) -> type:
        return Optimizer

    def _set(self, **values: Any) -> None:
        """Validate and store constructor values under their field names."""
        fields = {name: (typ, con) for name, typ, _, con in self._FIELDS}
        for name, value in values.items():
            typ, constraint = fields[name]
            if value is not None:
                if typ == _FLOAT:
                    _check_float(value, name, constraint)
                elif typ == _INT:
                    value = _check_int(value, name, 0, _INT32_MAX)
                else:
                    value = _check_bool(value, name)
            setattr(self, name, value)

    def params(self) -> dict[str, Union[float, int, bool]]:
        """Return every optimizer parameter with defaults resolved.

        A parameter left as None takes Monolith's proto default.

        Returns
        -------
        dict
            Proto field name to value (float32-rounded floats, ints, bools).
            The segment dimension is not included.
        """
        out: dict[str, Union[float, int, bool]] = {}
        for name, typ, default, _ in self._FIELDS:
            value = getattr(self, name, None)
            if value is None:
                value = default
            if typ == _FLOAT:
                out[name] = _f32(value)
            elif typ == _INT:
                out[name] = int(value)
            else:
                out[name] = bool(value)
        return out

    def canonical_key(self) -> str:
        """Return the canonical text of kind, parameters and rounding mode.

        Returns
        -------
        str
            For example
            ``"sgd(learning_rate=0.009999999776482582, warmup_steps=0, stochastic_rounding_float16=False)"``.
        """
        params = _fmt_params(self.params())
        sep = ", " if params else ""
        return (
            f"{self.kind}({params}{sep}stochastic_rounding_float16="
            f"{bool(self.stochastic_rounding_float16)})"
        )

    def __repr__(self) -> str:
        args = ", ".join(
            f"{arg}={getattr(self, attr)!r}" for arg, attr in self._ARGS
        )
        return f"{type(self).__name__}({args})"


class SgdOptimizer(Optimizer):
    """Plain stochastic gradient descent: ``w -= lr * g``.

    Parameters
    ----------
    learning_rate : float, optional
        Kept for compatibility; the table uses the learning rate of the
        segment from the config's learning-rate functions (proto default
        0.01).
    """

    kind = "sgd"
    _FIELDS = (
        ("learning_rate", _FLOAT, 0.01, _ANY),
        ("warmup_steps", _INT, 0, _ANY),
    )
    _ARGS = (("learning_rate", "learning_rate"),)

    def __init__(self, learning_rate: Optional[RealNumber] = None) -> None:
        self._set(learning_rate=learning_rate)


class AdagradOptimizer(Optimizer):
    """Adagrad: ``norm += g**2; w -= lr * g / sqrt(norm)``.

    Parameters
    ----------
    learning_rate : float, optional
        Unused by the update (proto default 0.001).
    initial_accumulator_value : float, optional
        Initial ``norm`` of every element, > 0 (proto default 0.1). It also
        plays the role of epsilon: with 0, a zero gradient would step by 0 / 0.
    hessian_compression_times : int, default 1
        Accepted for compatibility; has no effect.
    warmup_steps : int, default 0
        Accepted for compatibility; has no effect.
    weight_decay_factor : float, default 0.0
        Coupled weight decay: ``g += weight_decay_factor * w``.
    """

    kind = "adagrad"
    _FIELDS = (
        ("learning_rate", _FLOAT, 0.001, _ANY),
        ("initial_accumulator_value", _FLOAT, 0.1, _POSITIVE),
        ("hessian_compression_times", _INT, 1, _ANY),
        ("weight_decay_factor", _FLOAT, 0.0, _NONNEG),
        ("warmup_steps", _INT, 0, _ANY),
    )
    _ARGS = (
        ("learning_rate", "learning_rate"),
        ("initial_accumulator_value", "initial_accumulator_value"),
        ("hessian_compression_times", "hessian_compression_times"),
        ("warmup_steps", "warmup_steps"),
        ("weight_decay_factor", "weight_decay_factor"),
    )

    def __init__(self, learning_rate: Optional[RealNumber] = None,
                 initial_accumulator_value: Optional[RealNumber] = None,
                 hessian_compression_times: Integer = 1, warmup_steps: Integer = 0,
                 weight_decay_factor: RealNumber = 0.0) -> None:
        self._set(
            learning_rate=learning_rate,
            initial_accumulator_value=initial_accumulator_value,
            hessian_compression_times=hessian_compression_times,
            warmup_steps=warmup_steps,
            weight_decay_factor=weight_decay_factor,
        )


class DynamicWdAdagradOptimizer(Optimizer):
    """Adagrad with coupled or decoupled weight decay.

    Parameters
    ----------
    learning_rate : float, optional
        Unused by the update (proto default 0.001).
    initial_accumulator_value : float, optional
        Initial accumulator, > 0 (proto default 0.1): with 0, a zero gradient
        would step by 0 / 0.
    hessian_compression_times : int, default 1
        Accepted for compatibility; has no effect.
    warmup_steps : int, default 0
        Accepted for compatibility; has no effect.
    weight_decay_factor : float, default 0.0
        Weight decay strength.
    decouple_weight_decay : bool, default True
        Apply the decay as ``w -= lr * wd * w`` instead of adding it to the
        gradient.
    enable_dynamic_wd : bool, default True
        Accepted for compatibility; has no effect (no formula exists).
    flip_direction : bool, default True
        Accepted for compatibility; has no effect.
    dynamic_wd_temperature : float, default 1.0
        Accepted for compatibility; has no effect.

    Notes
    -----
    The Python defaults of the three boolean flags are True, unlike the
    proto defaults (False), as in Monolith.
    """

    kind = "dynamic_wd_adagrad"
    _FIELDS = (
        ("learning_rate", _FLOAT, 0.001, _ANY),
        ("initial_accumulator_value", _FLOAT, 0.1, _POSITIVE),
        ("hessian_compression_times", _INT, 1, _ANY),
        ("weight_decay_factor", _FLOAT, 0.0, _NONNEG),
        ("warmup_steps", _INT, 0, _ANY),
        ("decouple_weight_decay", _BOOL, False, _ANY),
        ("enable_dynamic_wd", _BOOL, False, _ANY),
        ("dynamic_wd_temperature", _FLOAT, 1.0, _ANY),
        ("flip_direction", _BOOL, False, _ANY),
    )
    _ARGS = (
        ("learning_rate", "learning_rate"),
        ("initial_accumulator_value", "initial_accumulator_value"),
        ("hessian_compression_times", "hessian_compression_times"),
        ("warmup_steps", "warmup_steps"),
        ("weight_decay_factor", "weight_decay_factor"),
        ("decouple_weight_decay", "decouple_weight_decay"),
        ("enable_dynamic_wd", "enable_dynamic_wd"),
        ("flip_direction", "flip_direction"),
        ("dynamic_wd_temperature", "dynamic_wd_temperature"),
    )

    def __init__(self, learning_rate: Optional[RealNumber] = None,
                 initial_accumulator_value: Optional[RealNumber] = None,
                 hessian_compression_times: Integer = 1, warmup_steps: Integer = 0,
                 weight_decay_factor: RealNumber = 0.0, decouple_weight_decay: bool = True,
                 enable_dynamic_wd: bool = True, flip_direction: bool = True,
                 dynamic_wd_temperature: RealNumber = 1.0) -> None:
        self._set(
            learning_rate=learning_rate,
            initial_accumulator_value=initial_accumulator_value,
            hessian_compression_times=hessian_compression_times,
            warmup_steps=warmup_steps,
            weight_decay_factor=weight_decay_factor,
            decouple_weight_decay=decouple_weight_decay,
            enable_dynamic_wd=enable_dynamic_wd,
            flip_direction=flip_direction,
            dynamic_wd_temperature=dynamic_wd_temperature,
        )


class AdadeltaOptimizer(Optimizer):
    """Adadelta.

    Parameters
    ----------
    learning_rate : float, optional
        Unused by the update (proto default 0.01).
    weight_decay_factor : float, default 0.0
        Coupled weight decay, >= 0.
    averaging_ratio : float, default 0.9
        Decay of the running averages, in [0, 1].
    epsilon : float, default 0.01
        Added inside both square roots, > 0 (with 0, a zero gradient would step
        by 0 / 0).
    warmup_steps : int, default 0
        Accepted for compatibility; has no effect.
    """

    kind = "adadelta"
    _FIELDS = (
        ("learning_rate", _FLOAT, 0.01, _ANY),
        ("weight_decay_factor", _FLOAT, 0.0, _NONNEG),
        ("averaging_ratio", _FLOAT, 0.9, _UNIT),
        ("epsilon", _FLOAT, 0.01, _POSITIVE),
        ("warmup_steps", _INT, 0, _ANY),
    )
    _ARGS = (
        ("learning_rate", "learning_rate"),
        ("weight_decay_factor", "weight_decay_factor"),
        ("averaging_ratio", "averaging_ratio"),
        ("epsilon", "epsilon"),
        ("warmup_steps", "warmup_steps"),
    )

    def __init__(self, learning_rate: Optional[RealNumber] = None, weight_decay_factor: RealNumber = 0.0,
                 averaging_ratio: RealNumber = 0.9, epsilon: RealNumber = 0.01,
                 warmup_steps: Integer = 0) -> None:
        self._set(
            learning_rate=learning_rate,
            weight_decay_factor=weight_decay_factor,
            averaging_ratio=averaging_ratio,
            epsilon=epsilon,
            warmup_steps=warmup_steps,
        )


class AdamOptimizer(Optimizer):
    """Adam with bias correction; epsilon is added outside the square root.

    Parameters
    ----------
    learning_rate : float, optional
        Unused by the update (proto default 0.01).
    beta1, beta2 : float, default 0.9, 0.99
        Decay rates of the moment estimates, in [0, 1).
    use_beta1_warmup : bool, default False
        Accepted for compatibility; has no effect.
    weight_decay_factor : float, default 0.0
        Coupled weight decay, >= 0.
    use_nesterov : bool, default False
        Nesterov momentum.
    epsilon : float, default 0.01
        Added to the denominator, > 0 (with 0, a zero gradient would step by
        0 / 0).
    warmup_steps : int, default 0
        Accepted for compatibility; has no effect.
    """

    kind = "adam"
    _FIELDS = (
        ("learning_rate", _FLOAT, 0.01, _ANY),
        ("beta1", _FLOAT, 0.9, _UNIT_OPEN),
        ("beta2", _FLOAT, 0.99, _UNIT_OPEN),
        ("use_beta1_warmup", _BOOL, False, _ANY),
        ("weight_decay_factor", _FLOAT, 0.0, _NONNEG),
        ("use_nesterov", _BOOL, False, _ANY),
        ("epsilon", _FLOAT, 0.01, _POSITIVE),
        ("warmup_steps", _INT, 0, _ANY),
    )
    _ARGS = tuple((name, name) for name, *_ in _FIELDS)

    def __init__(self, learning_rate: Optional[RealNumber] = None, beta1: RealNumber = 0.9,
                 beta2: RealNumber = 0.99, use_beta1_warmup: bool = False,
                 weight_decay_factor: RealNumber = 0.0, use_nesterov: bool = False,
                 epsilon: RealNumber = 0.01, warmup_steps: Integer = 0) -> None:
        self._set(
            learning_rate=learning_rate,
            beta1=beta1,
            beta2=beta2,
            use_beta1_warmup=use_beta1_warmup,
            weight_decay_factor=weight_decay_factor,
            use_nesterov=use_nesterov,
            epsilon=epsilon,
            warmup_steps=warmup_steps,
        )


class AmsgradOptimizer(Optimizer):
    """AMSGrad: Adam with the running maximum of the second moment.

    Parameters
    ----------
    learning_rate : float, optional
        Unused by the update (proto default 0.01).
    beta1, beta2 : float, default 0.9, 0.99
        Decay rates of the moment estimates, in [0, 1).
    weight_decay_factor : float, default 0.0
        Coupled weight decay, >= 0.
    use_nesterov : bool, default False
        Nesterov momentum.
    epsilon : float, default 0.01
        Added to the denominator, > 0 (with 0, a zero gradient would step by
        0 / 0).
    warmup_steps : int, default 0
        Accepted for compatibility; has no effect.
    """

    kind = "amsgrad"
    _FIELDS = (
        ("learning_rate", _FLOAT, 0.01, _ANY),
        ("beta1", _FLOAT, 0.9, _UNIT_OPEN),
        ("beta2", _FLOAT, 0.99, _UNIT_OPEN),
        ("weight_decay_factor", _FLOAT, 0.0, _NONNEG),
        ("use_nesterov", _BOOL, False, _ANY),
        ("epsilon", _FLOAT, 0.01, _POSITIVE),
        ("warmup_steps", _INT, 0, _ANY),
    )
    _ARGS = tuple((name, name) for name, *_ in _FIELDS)

    def __init__(self, learning_rate: Optional[RealNumber] = None, beta1: RealNumber = 0.9,
                 beta2: RealNumber = 0.99, weight_decay_factor: RealNumber = 0.0,
                 use_nesterov: bool = False, epsilon: RealNumber = 0.01,
                 warmup_steps: Integer = 0) -> None:
        self._set(
            learning_rate=learning_rate,
            beta1=beta1,
            beta2=beta2,
            weight_decay_factor=weight_decay_factor,
            use_nesterov=use_nesterov,
            epsilon=epsilon,
            warmup_steps=warmup_steps,
        )


_FTRL_ARGS = (
    ("learning_rate", "learning_rate"),
    ("initial_accumulator_value", "initial_accumulator_value"),
    ("beta", "beta"),
    ("warmup_steps", "warmup_steps"),
    ("l1_regularization", "l1_regularization_strength"),
    ("l2_regularization", "l2_regularization_strength"),
)


class _FtrlFamily(Optimizer):
    """FTRL and group FTRL take the same arguments (Monolith's names)."""

    _ARGS = _FTRL_ARGS

    def __init__(self, learning_rate: Optional[RealNumber] = None,
                 initial_accumulator_value: Optional[RealNumber] = None,
                 beta: Optional[RealNumber] = None, warmup_steps: Integer = 0,
                 l1_regularization: Optional[RealNumber] = None,
                 l2_regularization: Optional[RealNumber] = None) -> None:
        self._set(
            learning_rate=learning_rate,
            initial_accumulator_value=initial_accumulator_value,
            beta=beta,
            warmup_steps=warmup_steps,
            l1_regularization_strength=l1_regularization,
            l2_regularization_strength=l2_regularization,
        )


class FtrlOptimizer(_FtrlFamily):
    """FTRL-proximal.

    Parameters
    ----------
    learning_rate : float, optional
        Unused by the update (proto default 0.01); the segment's learning
        rate is alpha.
    initial_accumulator_value : float, optional
        Initial ``norm``, >= 0 (proto default 0.1).
    beta : float, optional
        Added to ``sqrt(norm)`` in the denominator, >= 0 (proto default 0).
    warmup_steps : int, default 0
        Accepted for compatibility; has no effect.
    l1_regularization : float, optional
        L1 strength, >= 0 (proto field ``l1_regularization_strength``,
        default 0).
    l2_regularization : float, optional
        L2 strength, >= 0 (proto field ``l2_regularization_strength``,
        default 0).
    """

    kind = "ftrl"
    _FIELDS = (
        ("learning_rate", _FLOAT, 0.01, _ANY),
        ("beta", _FLOAT, 0.0, _NONNEG),
        ("initial_accumulator_value", _FLOAT, 0.1, _NONNEG),
        ("l1_regularization_strength", _FLOAT, 0.0, _NONNEG),
        ("l2_regularization_strength", _FLOAT, 0.0, _NONNEG),
        ("warmup_steps", _INT, 0, _ANY),
    )


class FTRLWithGroupSparsityOptimizer(_FtrlFamily):
    """FTRL with group (row-wise) L1 sparsity: a row with small ``‖z‖`` is 0.

    Parameters
    ----------
    learning_rate : float, optional
        Unused by the update (proto default 0.01).
    initial_accumulator_value : float, optional
        Initial ``norm``, >= 0 (proto default 0.0).
    beta : float, optional
        Added to the denominator, >= 0 (proto default 1.0).
    warmup_steps : int, default 0
        Accepted for compatibility; has no effect.
    l1_regularization : float, optional
        Group L1 strength, >= 0 (proto field ``l1_regularization_strength``,
        default 0).
    l2_regularization : float, optional
        L2 strength, >= 0 (proto field ``l2_regularization_strength``,
        default 0).
    """

    kind = "group_ftrl"
    _FIELDS = (
        ("learning_rate", _FLOAT, 0.01, _ANY),
        ("beta", _FLOAT, 1.0, _NONNEG),
        ("initial_accumulator_value", _FLOAT, 0.0, _NONNEG),
        ("l1_regularization_strength", _FLOAT, 0.0, _NONNEG),
        ("l2_regularization_strength", _FLOAT, 0.0, _NONNEG),
        ("warmup_steps", _INT, 0, _ANY),
    )


class AdaGradWithGroupLassoOptimizer(Optimizer):
    """Group AdaGrad with group lasso: one accumulator per segment row.

    Parameters
    ----------
    learning_rate : float, optional
        Unused by the update (proto default 0.01).
    beta : float, optional
        Added to the denominator, >= 0 (proto default 0).
    initial_accumulator_value : float, optional
        Initial accumulator, >= 0 (proto default 0.1).
    l2_regularization : float, optional
        Group lasso strength, >= 0 (proto field
        ``l2_regularization_strength``, default 0).
    weight_decay_factor : float, default 0.0
        Coupled weight decay, >= 0.
    warmup_steps : int, default 0
        Accepted for compatibility; has no effect.
    """

    kind = "group_adagrad"
    _FIELDS = (
        ("learning_rate", _FLOAT, 0.01, _ANY),
        ("beta", _FLOAT, 0.0, _NONNEG),
        ("initial_accumulator_value", _FLOAT, 0.1, _NONNEG),
        ("l2_regularization_strength", _FLOAT, 0.0, _NONNEG),
        ("weight_decay_factor", _FLOAT, 0.0, _NONNEG),
        ("warmup_steps", _INT, 0, _ANY),
    )
    _ARGS = (
        ("learning_rate", "learning_rate"),
        ("beta", "beta"),
        ("initial_accumulator_value", "initial_accumulator_value"),
        ("l2_regularization", "l2_regularization_strength"),
        ("weight_decay_factor", "weight_decay_factor"),
        ("warmup_steps", "warmup_steps"),
    )

    def __init__(self, learning_rate: Optional[RealNumber] = None, beta: Optional[RealNumber] = None,
                 initial_accumulator_value: Optional[RealNumber] = None,
                 l2_regularization: Optional[RealNumber] = None,
                 weight_decay_factor: RealNumber = 0.0, warmup_steps: Integer = 0) -> None:
        self._set(
            learning_rate=learning_rate,
            beta=beta,
            initial_accumulator_value=initial_accumulator_value,
            l2_regularization_strength=l2_regularization,
            weight_decay_factor=weight_decay_factor,
            warmup_steps=warmup_steps,
        )


class MomentumOptimizer(Optimizer):
    """Momentum SGD (optionally Nesterov).

    Parameters
    ----------
    learning_rate : float, optional
        Unused by the update (proto default 0.01).
    weight_decay_factor : float, default 0.0
        Coupled weight decay, >= 0.
    use_nesterov : bool, default False
        Nesterov momentum.
    momentum : float, default 0.9
        Momentum coefficient, >= 0.
    warmup_steps : int, default 0
        Accepted for compatibility; has no effect.
    """

    kind = "momentum"
    _FIELDS = (
        ("learning_rate", _FLOAT, 0.01, _ANY),
        ("weight_decay_factor", _FLOAT, 0.0, _NONNEG),
        ("use_nesterov", _BOOL, False, _ANY),
        ("momentum", _FLOAT, 0.9, _NONNEG),
        ("warmup_steps", _INT, 0, _ANY),
    )
    _ARGS = tuple((name, name) for name, *_ in _FIELDS)

    def __init__(self, learning_rate: Optional[RealNumber] = None, weight_decay_factor: RealNumber = 0.0,
                 use_nesterov: bool = False, momentum: RealNumber = 0.9, warmup_steps: Integer = 0) -> None:
        self._set(
            learning_rate=learning_rate,
            weight_decay_factor=weight_decay_factor,
            use_nesterov=use_nesterov,
            momentum=momentum,
            warmup_steps=warmup_steps,
        )


class MovingAverageOptimizer(Optimizer):
    """Moving average of the written values; no learning rate is used.

    Parameters
    ----------
    momentum : float, default 0.9
        Weight of the old value, in [0, 1].
    """

    kind = "moving_average"
    _FIELDS = (("momentum", _FLOAT, 0.9, _UNIT),)
    _ARGS = (("momentum", "momentum"),)

    def __init__(self, momentum: RealNumber = 0.9) -> None:
        self._set(momentum=momentum)


class _RmspropBase(Optimizer):
    """Fields and constructor shared by the two RMSProp variants."""

    _FIELDS = (
        ("learning_rate", _FLOAT, 0.01, _ANY),
        ("weight_decay_factor", _FLOAT, 0.0, _NONNEG),
        ("momentum", _FLOAT, 0.9, _UNIT),
    )
    _ARGS = tuple((name, name) for name, *_ in _FIELDS)

    def __init__(self, learning_rate: Optional[RealNumber] = None, weight_decay_factor: RealNumber = 0.0,
                 momentum: RealNumber = 0.9) -> None:
        self._set(
            learning_rate=learning_rate,
            weight_decay_factor=weight_decay_factor,
            momentum=momentum,
        )


class RmspropOptimizer(_RmspropBase):
    """RMSProp (version 1).

    Parameters
    ----------
    learning_rate : float, optional
        Proto default 0.01. Monolith's RMSProp v1 steps with this value
        instead of the segment's learning rate; mtht uses the segment's
        learning rate like every other optimizer.
    weight_decay_factor : float, default 0.0
        Coupled weight decay, >= 0.
    momentum : float, default 0.9
        Decay of the squared-gradient average, in [0, 1].
    """

    kind = "rmsprop"


class RmspropV2Optimizer(_RmspropBase):
    """RMSProp (version 2, without the ``1 - momentum`` factor).

    Parameters
    ----------
    learning_rate : float, optional
        Unused by the update (proto default 0.01).
    weight_decay_factor : float, default 0.0
        Coupled weight decay, >= 0.
    momentum : float, default 0.9
        Decay of the squared-gradient sum, in [0, 1].
    """

    kind = "rmspropv2"


class BatchSoftmaxOptimizer(Optimizer):
    """Estimate of the interval, in steps, between occurrences of an id.

    ``B = (1 - lr) * B + lr * (t - A); A = t``; the gradient is ignored.
    Requires a segment of dimension 1 (see :class:`BatchSoftmaxInitializer`).

    Parameters
    ----------
    learning_rate : float, optional
        Unused by the update (proto default 0.1); the segment's learning
        rate is the averaging factor.
    """

    kind = "batch_softmax"
    _FIELDS = (("learning_rate", _FLOAT, 0.1, _ANY),)
    _ARGS = (("learning_rate", "learning_rate"),)

    def __init__(self, learning_rate: Optional[RealNumber] = None) -> None:
        self._set(learning_rate=learning_rate)


class StochasticRoundingFloat16OptimizerWrapper(Optimizer):
    """Round the embedding stochastically to float16 after every update.

    The wrapper reports the ``kind`` and ``params()`` of the wrapped
    optimizer and sets ``stochastic_rounding_float16``. Wrapping a wrapper
    is allowed and changes nothing.

    Parameters
    ----------
    optimizer : Optimizer
        The optimizer whose updates are rounded.

    Attributes
    ----------
    optimizer : Optimizer
        The wrapped (never itself wrapped) optimizer.
    """

    stochastic_rounding_float16 = True
    _ARGS = (("optimizer", "optimizer"),)

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "optimizer must be an optimizer builder such as "
                f"SgdOptimizer(), got {optimizer!r}"
            )
        if isinstance(optimizer, StochasticRoundingFloat16OptimizerWrapper):
            optimizer = optimizer.optimizer
        self.optimizer: Optimizer = optimizer

    def validate(self) -> None:
        """Check the wrapper and the wrapped optimizer (see :meth:`Optimizer.validate`)."""
        super().validate()
        self.optimizer.validate()

    @property
    def kind(self) -> str:  # type: ignore[override]
        """The wrapped optimizer's kind."""
        return self.optimizer.kind

    def params(self) -> dict[str, Union[float, int, bool]]:
        """Return the wrapped optimizer's parameters (see ``Optimizer.params``)."""
        return self.optimizer.params()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"


# ---------------------------------------------------------------------------
# Initializers
# ---------------------------------------------------------------------------


class Initializer(_Builder):
    """Base class of the initializer builders (run when an entry is created)."""

    def _family(self) -> type:
        return Initializer

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ZerosInitializer(Initializer):
    """Initialise the segment with zeros."""

    kind = "zeros"


class OnesInitializer(Initializer):
    """Initialise the segment with ones."""

    kind = "ones"


class ConstantsInitializer(Initializer):
    """Initialise every element of the segment with one constant.

    Parameters
    ----------
    constant : float
        The value.
    """

    kind = "constants"
    _ARGS = (("constant", "constant"),)

    def __init__(self, constant: RealNumber) -> None:
        self.constant = _check_float(constant, "constant")

    def params(self) -> dict[str, Union[float, int, bool]]:
        """Return ``{"constant": c}``."""
        return {"constant": _f32(self.constant)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.constant!r})"


class RandomUniformInitializer(Initializer):
    """Initialise with uniform random values in ``[minval, maxval)``.

    The values are a deterministic function of the table's ``random_seed``,
    the id and the position in the row. A table of 16-bit values
    (``embedding_dtype``) rounds them to nearest, so they may reach the
    rounding of either bound.

    Parameters
    ----------
    minval : float, default -0.05
        Lower bound; None means the proto default -0.05.
    maxval : float, default 0.05
        Upper bound, >= ``minval``; None means the proto default 0.05.
    """

    kind = "random_uniform"
    _ARGS = (("minval", "minval"), ("maxval", "maxval"))

    def __init__(self, minval: Optional[RealNumber] = -0.05, maxval: Optional[RealNumber] = 0.05) -> None:
        self.minval = None if minval is None else _check_float(minval, "minval")
        self.maxval = None if maxval is None else _check_float(maxval, "maxval")
        params = self.params()
        if params["minval"] > params["maxval"]:
            raise ValueError(
                f"minval must be <= maxval, got minval={minval!r}, "
                f"maxval={maxval!r}"
            )

    def params(self) -> dict[str, Union[float, int, bool]]:
        """Return ``{"minval": a, "maxval": b}`` with defaults resolved."""
        return {
            "minval": _f32(-0.05 if self.minval is None else self.minval),
            "maxval": _f32(0.05 if self.maxval is None else self.maxval),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(minval={self.minval!r}, "
            f"maxval={self.maxval!r})"
        )


class BatchSoftmaxInitializer(ConstantsInitializer):
    """Initial step interval for :class:`BatchSoftmaxOptimizer`.

    A :class:`ConstantsInitializer` (``kind == "constants"``) whose constant
    is ``init_step_interval``.

    Parameters
    ----------
    init_step_interval : float
        Initial estimate of the interval between occurrences, >= 1.

    Raises
    ------
    ValueError
        If ``init_step_interval < 1``.
    """

    _ARGS = (("init_step_interval", "constant"),)  # the constant is what entries start from

    def __init__(self, init_step_interval: RealNumber) -> None:
        _check_float(init_step_interval, "init_step_interval")
        if init_step_interval < 1:
            raise ValueError(
                "init_step_interval should be >= 1, while got {}".format(
                    init_step_interval
                )
            )
        super().__init__(init_step_interval)
        self.init_step_interval = init_step_interval

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.init_step_interval!r})"


# ---------------------------------------------------------------------------
# Compressors
# ---------------------------------------------------------------------------


class Compressor(_Builder):
    """Base class of the compressor builders."""

    def _family(self) -> type:
        return Compressor

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Fp32Compressor(Compressor):
    """Store and export the segment as float32 (no compression)."""

    kind = "fp32"


class Fp16Compressor(Compressor):
    """Export the segment as IEEE float16 (round to nearest even)."""

    kind = "fp16"


class FixedR8Compressor(Compressor):
    """Fake-quantise the segment to 8-bit fixed point in ``[-r, r)``.

    Lookups return the quantised values; the stored values stay float32.

    Parameters
    ----------
    fixed_range : float, default 1.0
        The range ``r`` (> 0); the step is ``r / 128``.

    Attributes
    ----------
    r : float
        The range.
    """

    kind = "fixed_r8"
    _ARGS = (("fixed_range", "r"),)

    def __init__(self, fixed_range: RealNumber = 1.0) -> None:
        self.r = _check_float(fixed_range, "fixed_range", _POSITIVE)
        if not np.float32(self.r) / np.float32(128) > 0:  # the step: 0 would divide 0 by 0 (NaN)
            raise ValueError(f"fixed_range must leave a step r / 128 above 0 in float32, got {fixed_range!r}")

    def params(self) -> dict[str, Union[float, int, bool]]:
        """Return ``{"r": fixed_range}``."""
        return {"r": _f32(self.r)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fixed_range={self.r!r})"


class OneBitCompressor(Compressor):
    """HashNet one-bit quantisation: ``amplitude * tanh(scale * w)``.

    ``scale`` starts at ``init_scale`` (1.0) and grows with the global step
    every ``step_size`` steps, up to ``max_scale`` (10000.0).

    Parameters
    ----------
    step_size : int, default 200
        Steps between updates of the scale, >= 1.
    amplitude : float, default 0.05
        Output amplitude, > 0 (the proto default 0.1 is not used: Monolith's
        Python default is 0.05).
    """

    kind = "one_bit"
    _ARGS = (("step_size", "step_size"), ("amplitude", "amplitude"))

    def __init__(self, step_size: Integer = 200, amplitude: RealNumber = 0.05) -> None:
        self.step_size = _check_int(step_size, "step_size", 1, 2**63 - 1)
        self.amplitude = _check_float(amplitude, "amplitude", _POSITIVE)

    def params(self) -> dict[str, Union[float, int, bool]]:
        """Return step_size, init_scale, max_scale and amplitude."""
        return {
            "step_size": int(self.step_size),
            "init_scale": _f32(1.0),
            "max_scale": _f32(10000.0),
            "amplitude": _f32(self.amplitude),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(step_size={self.step_size!r}, "
            f"amplitude={self.amplitude!r})"
        )


# ---------------------------------------------------------------------------
# Segments and table configs
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Segment:
    """One part of an embedding row.

    Parameters
    ----------
    dim_size : int
        Number of floats, >= 1.
    initializer : Initializer
        Runs when an entry is created.
    optimizer : Optimizer
        Updates the segment (with its own per-row state).
    compressor : Compressor, optional
        Retrieval/export format; None means :class:`Fp32Compressor`.

    Raises
    ------
    ValueError
        If ``dim_size`` is not an integer >= 1, or a batch-softmax segment
        has ``dim_size != 1``.
    TypeError
        If a builder is not of the right family.
    """

    dim_size: int
    initializer: Initializer
    optimizer: Optimizer
    compressor: Optional[Compressor] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check (and normalise) the fields; see the class docstring."""
        self.dim_size = _check_int(self.dim_size, "dim_size", 1, _INT32_MAX)
        if not isinstance(self.initializer, Initializer):
            raise TypeError(
                "initializer must be an initializer builder such as "
                f"ZerosInitializer(), got {self.initializer!r}"
            )
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(
                "optimizer must be an optimizer builder such as "
                f"SgdOptimizer(), got {self.optimizer!r}"
            )
        if self.compressor is None:
            self.compressor = Fp32Compressor()
        if not isinstance(self.compressor, Compressor):
            raise TypeError(
                "compressor must be a compressor builder such as "
                f"Fp32Compressor(), got {self.compressor!r}"
            )
        for builder in (self.initializer, self.optimizer, self.compressor):
            builder.validate()  # settings changed since it was made are checked too
        if self.optimizer.kind == "batch_softmax" and self.dim_size != 1:
            raise ValueError(
                "a batch_softmax segment must have dim_size 1, got "
                f"{self.dim_size}"
            )

    def canonical_key(self) -> str:
        """Canonical text of the segment (part of the merge key)."""
        return (
            f"Segment(dim_size={self.dim_size}, "
            f"initializer={self.initializer.canonical_key()}, "
            f"optimizer={self.optimizer.canonical_key()}, "
            f"compressor={cast(Compressor, self.compressor).canonical_key()})"
        )


def CombineAsSegment(dim_size: Integer, initializer: Initializer, optimizer: Optimizer,
                     compressor: Optional[Compressor] = None) -> Segment:
    """Build a :class:`Segment` (Monolith's name and argument order).

    Parameters
    ----------
    dim_size : int
        Number of floats, >= 1 (numpy integers accepted, bools rejected).
    initializer : Initializer
        E.g. ``ZerosInitializer()``.
    optimizer : Optimizer
        E.g. ``AdagradOptimizer()``.
    compressor : Compressor, optional
        E.g. ``Fp32Compressor()``; None means float32.

    Returns
    -------
    Segment
    """
    return Segment(cast(int, dim_size), initializer, optimizer, compressor)  # checked as an integer there


@dataclasses.dataclass
class EntryConfig:
    """The segments of an embedding row, in order.

    Parameters
    ----------
    segments : list of Segment
        Copied into a list owned by the config.
    """

    segments: list = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.segments, Segment):
            raise TypeError("segments must be a list of Segment, got a Segment")
        self.segments = list(self.segments)
        self.validate()

    def validate(self) -> None:
        """Check that every element is a valid :class:`Segment`."""
        for i, segment in enumerate(self.segments):
            if not isinstance(segment, Segment):
                raise TypeError(
                    f"segments[{i}] must be a Segment (see CombineAsSegment), "
                    f"got {segment!r}"
                )
            segment.validate()


@dataclasses.dataclass
class SlotExpireTimeConfig:
    """How many days an entry survives without updates, per slot.

    Parameters
    ----------
    default_expire_time : int, default 36500
        Days, for slots not listed (36500 days = 100 years).
    slot_expire_times : dict of int to int, optional
        Slot (0..32767) to days (>= 0). A list of ``(slot, days)`` pairs is
        also accepted. Copied into a dict owned by the config.

    Raises
    ------
    ValueError
        On a slot or a number of days out of range.
    """

    default_expire_time: int = 36500
    slot_expire_times: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check and normalise the fields; see the class docstring."""
        self.default_expire_time = _check_int(
            self.default_expire_time, "default_expire_time", 0, _UINT32_MAX
        )
        items: Iterable[Any] = self.slot_expire_times
        if isinstance(items, Mapping):
            items = items.items()
        normalised: dict[int, int] = {}
        for pair in items:
            try:
                slot, days = pair
            except (TypeError, ValueError):
                raise ValueError(
                    "slot_expire_times must map slot -> days, got element "
                    f"{pair!r}"
                ) from None
            slot = _check_int(slot, "slot", 0, MAX_SLOT)
            normalised[slot] = _check_int(
                days, f"expire time of slot {slot}", 0, _UINT32_MAX
            )
        self.slot_expire_times = normalised

    def expire_time(self, slot: int) -> int:
        """Return the expiry in days of ``slot``."""
        return self.slot_expire_times.get(slot, self.default_expire_time)

    def canonical_key(self) -> str:
        """Canonical text; per-slot entries equal to the default are dropped."""
        slots = ", ".join(
            f"{slot}: {days}"
            for slot, days in sorted(self.slot_expire_times.items())
            if days != self.default_expire_time
        )
        return (
            f"SlotExpireTimeConfig(default_expire_time="
            f"{self.default_expire_time}, slot_expire_times={{{slots}}})"
        )


_EVICTION_POLICIES = ("lru", "lfu")
# The bounds of max_load_factor (the C++ core checks the same range).
LOAD_FACTOR_RANGE = (0.25, 0.9)
# The most shards a table may have (the C++ core checks the same bound).
MAX_SHARDS = 4096
# How an entry may keep its values, and the widest entry kept in 16 bits (as the core).
EMBEDDING_DTYPES = ("float32", "float16", "bfloat16")
MAX_NARROW_DIM = 4096


def check_num_shards(value: Any) -> Optional[int]:
    """``value`` as a shard count: None (automatic), or an int, a power of two in [1,
    MAX_SHARDS]; else ValueError."""
    if value is None:
        return None
    value = _check_int(value, "num_shards", 1, MAX_SHARDS)
    if value & (value - 1):
        raise ValueError(f"num_shards must be a power of two, got {value}")
    return value


@dataclasses.dataclass
class EmbeddingHashTableConfig:
    """Configuration of one embedding hash table.

    Parameters
    ----------
    entry_config : EntryConfig
        The segments; at least one.
    initial_capacity : int, default 1
        Capacity reserved up front (performance only), >= 0.
    slot_expire_time_config : SlotExpireTimeConfig, optional
        Expiry per slot, applied when saving and by feature eviction.
    enable_feature_eviction : bool, default False
        Run expiry periodically in the background.
    feature_evict_every_n_hours : int, default 240
        Period of the background eviction, >= 1.
    random_seed : int, default 0
        Seeds random initializers and stochastic rounding, in [0, 2**64).
    max_entries : int, optional
        Bound on the number of entries (>= 1); None means unbounded.
    eviction_policy : {"lru", "lfu"}, default "lru"
        Which entries make room when ``max_entries`` is reached.
    allow_non_finite : bool, default False
        Accept NaN/Inf in written values and gradients.
    max_bytes : int, optional
        Bound on the table's memory (>= 1 byte): turned into a number of entries from the
        memory one entry may take at most (row, 16 bytes of capacity bookkeeping and index:
        64 bytes of it at the default load bound, or 48 plus 2 MiB a shard when that allows
        more), less room for the rows evictions leave to their shards (none with one
        shard; see docs/lifecycle.md); together with ``max_entries`` the smaller bound
        holds. None means unbounded.
    max_load_factor : float, default 0.5
        The index grows before more than this fraction of its slots is used; in [0.25, 0.9].
        (A write whose new ids take it past that, by at most a quarter of the slots left
        above it, grows it as soon as it is done: between writes the bound holds.)
        A shard's index of up to 2 MiB doubles, so its load stays between half this and
        this; a larger one grows by half, so its load stays between 2/3 of this and this.
        Lower is faster (fewer probes past an id's home bucket), higher takes less memory:
        the index costs 64 / 4 / load bytes per entry (32 to 64 at the default, 18 to 36 at
        0.9; 32 to 48 and 18 to 27 in large shards). What lookups and updates
        return does not depend on it; the entries ``max_bytes`` allows do.
    num_shards : int or None, default None
        Parts of the table, each with its own lock and index. None: the table starts with
        one (or as many as ``initial_capacity`` calls for) and splits them as it grows (one
        per 16,384 entries) and as its write batches grow (one per 4,096 ids of a batch), up
        to 64. A batch's write spreads over the threads shard by shard, so large tables and
        large batches want many; every batch pays a little per shard it touches, so small
        tables written in small batches (many small slots) are faster with few. An int, a
        power of two in [1, 4096], fixes the count. Performance only: results do not depend
        on it, and a checkpoint restores into any shard count.
    embedding_dtype : {"float32", "float16", "bfloat16"}, default "float32"
        How each entry keeps its values (the embedding); a numpy dtype (``np.float16``)
        is taken by its name. ``"float16"`` and ``"bfloat16"``
        keep them in 2 bytes each, half the memory of the embedding; the optimizer state
        stays float32. Lookups return them as float32 (exactly). An optimizer step works in
        float32 and rounds its result stochastically, unbiased and reproducible: a function of
        ``random_seed``, the id, ``global_step`` and the position in the entry, so that steps
        smaller than the spacing of 16-bit values still move an embedding on average (it
        wants ``global_step`` to advance). ``assign``, ``assign_add``, initializers and
        restores round to nearest (ties to even); an id repeated in one ``assign_add`` is
        added and rounded once per occurrence, as separate calls would. Rounding keeps a finite value finite: a magnitude
        past the largest 16-bit value (65504 for float16) saturates to it. float16 keeps 11
        bits of precision over a narrow range, bfloat16 8 bits over float32's range.
        Checkpoints hold float32 values, so a save restores into a table of either kind.
        At most 4096 values an entry, the widest ``OneBitCompressor`` segment's counted
        twice.

    Raises
    ------
    ValueError
        On empty segments or a field out of range.
    TypeError
        If ``entry_config`` or ``slot_expire_time_config`` has the wrong type.
    """

    entry_config: EntryConfig = dataclasses.field(default_factory=EntryConfig)
    initial_capacity: int = 1
    slot_expire_time_config: SlotExpireTimeConfig = dataclasses.field(
        default_factory=SlotExpireTimeConfig
    )
    enable_feature_eviction: bool = False
    feature_evict_every_n_hours: int = 240
    random_seed: int = 0
    max_entries: Optional[int] = None
    eviction_policy: str = "lru"
    allow_non_finite: bool = False
    max_bytes: Optional[int] = None
    max_load_factor: float = 0.5
    num_shards: Optional[int] = None
    embedding_dtype: str = "float32"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check and normalise every field; see the class docstring."""
        if not isinstance(self.entry_config, EntryConfig):
            raise TypeError(
                f"entry_config must be an EntryConfig, got {self.entry_config!r}"
            )
        self.entry_config.validate()
        if not self.entry_config.segments:
            raise ValueError(
                "entry_config has empty segments: a table needs at least one "
                "segment"
            )
        if not isinstance(self.slot_expire_time_config, SlotExpireTimeConfig):
            raise TypeError(
                "slot_expire_time_config must be a SlotExpireTimeConfig, got "
                f"{self.slot_expire_time_config!r}"
            )
        self.slot_expire_time_config.validate()
        self.initial_capacity = _check_int(
            self.initial_capacity, "initial_capacity", 0, _INT64_MAX
        )
        self.enable_feature_eviction = _check_bool(
            self.enable_feature_eviction, "enable_feature_eviction"
        )
        self.feature_evict_every_n_hours = _check_int(
            self.feature_evict_every_n_hours, "feature_evict_every_n_hours", 1,
            _INT32_MAX,
        )
        self.random_seed = _check_int(self.random_seed, "random_seed", 0,
                                      2**64 - 1)
        if self.max_entries is not None:
            self.max_entries = _check_int(self.max_entries, "max_entries", 1,
                                          _INT64_MAX)
        if self.max_bytes is not None:
            self.max_bytes = _check_int(self.max_bytes, "max_bytes", 1,
                                        _INT64_MAX)
        if self.eviction_policy not in _EVICTION_POLICIES:
            raise ValueError(
                f"eviction_policy must be one of {_EVICTION_POLICIES}, got "
                f"{self.eviction_policy!r}"
            )
        self.allow_non_finite = _check_bool(
            self.allow_non_finite, "allow_non_finite"
        )
        _check_float(self.max_load_factor, "max_load_factor")
        lo, hi = LOAD_FACTOR_RANGE
        if not lo <= float(self.max_load_factor) <= hi:
            raise ValueError(
                f"max_load_factor must be in [{lo}, {hi}], got "
                f"{self.max_load_factor!r}"
            )
        self.max_load_factor = float(self.max_load_factor)
        self.num_shards = check_num_shards(self.num_shards)
        self.embedding_dtype = _embedding_dtype_name(self.embedding_dtype)
        # A step widens the row on the stack, the widest one_bit segment's gradient beside it.
        width = sum(int(s.dim_size) for s in self.segments)
        one_bit = max((int(s.dim_size) for s in self.segments if s.compressor.kind == "one_bit"), default=0)
        if self.embedding_dtype != "float32" and width + one_bit > MAX_NARROW_DIM:
            raise ValueError(
                f"an entry kept in {self.embedding_dtype} has at most {MAX_NARROW_DIM} "
                f"values, its widest one_bit segment's counted twice; got {width}"
                + (f" + {one_bit}" if one_bit else "")
            )

    @property
    def segments(self) -> list:
        """Shortcut for ``entry_config.segments``."""
        return self.entry_config.segments

    def _key_fields(self) -> list[str]:
        segments = ", ".join(s.canonical_key() for s in self.segments)
        return [
            f"segments=[{segments}]",
            "slot_expire_time_config="
            + self.slot_expire_time_config.canonical_key(),
            f"enable_feature_eviction={self.enable_feature_eviction}",
            f"feature_evict_every_n_hours={self.feature_evict_every_n_hours}",
            f"random_seed={self.random_seed}",
            f"max_entries={self.max_entries}",
            f"eviction_policy={self.eviction_policy!r}",
            f"allow_non_finite={self.allow_non_finite}",
        ] + ([f"max_bytes={self.max_bytes}"] if self.max_bytes is not None else []) + (
            # It changes the entries max_bytes allows, so it is part of the key.
            [f"max_load_factor={self.max_load_factor!r}"] if self.max_load_factor != 0.5 else []) + (
            [f"embedding_dtype={self.embedding_dtype!r}"] if self.embedding_dtype != "float32" else [])

    def canonical_key(self) -> str:
        """Canonical text of every field that affects behaviour.

        ``initial_capacity`` and ``num_shards`` are left out (they only affect performance).

        Returns
        -------
        str
            Starts with ``"TableConfig("``.
        """
        return "TableConfig(" + ", ".join(self._key_fields()) + ")"


class CuckooHashTableConfig:
    """Monolith's table-type helper, kept so ported code runs unchanged.

    Parameters
    ----------
    initial_capacity : int, default 1
        Written to ``initial_capacity``.
    feature_evict_every_n_hours : int, default 0
        When > 0, enables feature eviction with this period.
    """

    def __init__(self, initial_capacity: Integer = 1, feature_evict_every_n_hours: Integer = 0) -> None:
        self.initial_capacity = _check_int(initial_capacity,
                                           "initial_capacity", 0)
        self.feature_evict_every_n_hours = _check_int(
            feature_evict_every_n_hours, "feature_evict_every_n_hours", 0,
            _INT32_MAX,
        )

    def mutate_table(self, table_config: EmbeddingHashTableConfig) -> None:
        """Write the settings into ``table_config`` (in place).

        Parameters
        ----------
        table_config : EmbeddingHashTableConfig
            The config to modify.
        """
        if not isinstance(table_config, EmbeddingHashTableConfig):
            raise TypeError(
                "table_config must be an EmbeddingHashTableConfig, got "
                f"{table_config!r}"
            )
        table_config.initial_capacity = self.initial_capacity
        if self.feature_evict_every_n_hours > 0:
            table_config.enable_feature_eviction = True
            table_config.feature_evict_every_n_hours = (
                self.feature_evict_every_n_hours
            )

    def __repr__(self) -> str:
        return (
            f"CuckooHashTableConfig(initial_capacity={self.initial_capacity}, "
            f"feature_evict_every_n_hours={self.feature_evict_every_n_hours})"
        )


# ---------------------------------------------------------------------------
# HashTableConfigInstance
# ---------------------------------------------------------------------------

LearningRateFn = Union[RealNumber, LearningRateFunction, Callable[..., Any], "np.ndarray[Any, Any]", Tensor]

# How each learning-rate fn is evaluated.
_CONSTANT = "constant"
_WITH_STEP = "with_step"
_NO_ARGS = "no_args"


def _classify_lr_fn(index: int, fn: Any) -> str:
    """Return how to evaluate ``fn``; raise on unusable values."""
    if isinstance(fn, LearningRateFunction):
        return _WITH_STEP
    value = as_numpy(fn, f"learning_rate_fns[{index}]") if _is_rate_array(fn) else fn
    if _is_real(fn) or (
        isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf"
    ):
        if not np.isfinite(_f32(value)):
            raise ValueError(
                f"learning_rate_fns[{index}] must be finite in float32, "
                f"got {fn!r}"
            )
        return _CONSTANT
    if callable(fn):
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            return _WITH_STEP
        try:
            signature.bind(0)
            return _WITH_STEP
        except TypeError:
            pass
        try:
            signature.bind()
            return _NO_ARGS
        except TypeError:
            raise TypeError(
                f"learning_rate_fns[{index}] must accept the global step as "
                f"its only positional argument, or no argument: {fn!r}"
            ) from None
    raise TypeError(
        f"learning_rate_fns[{index}] must be a number, a LearningRateFunction "
        f"or a callable, got {fn!r}"
    )


def _is_rate_array(fn: Any) -> bool:
    """A numpy array or a framework's tensor (DLPack): a rate the trainer may change in
    place between steps, as it may a variable's."""
    return isinstance(fn, np.ndarray) or (hasattr(fn, "__dlpack__") and not callable(fn))


def _lr_fn_key(fn: Any) -> str:
    """Canonical text of one learning-rate fn for the merge key."""
    if isinstance(fn, LearningRateFunction):
        return fn.canonical_key()
    if _is_rate_array(fn):  # may change after the merge, as a callable may: by identity
        return f"array@{id(fn)}"
    if _is_real(fn):
        return _key_float(fn)
    return f"callable@{id(fn)}"


class HashTableConfigInstance:
    """A table config together with one learning rate per segment.

    Parameters
    ----------
    table_config : EmbeddingHashTableConfig
        Held by reference (not copied).
    learning_rate_fns : sequence
        One entry per segment, each a number, a
        :class:`~mtht.learning_rate_functions.LearningRateFunction`, or a
        callable taking the global step (a callable taking no argument, such
        as ``lambda: 0.1``, is called without it). A 0-d numpy array or
        framework tensor (PyTorch, JAX) is read at every step, so the trainer
        may change it in place.
    extra_restore_names : list of str, optional
        Additional names to restore the table from; copied into a list owned
        by the instance.

    Raises
    ------
    ValueError
        If ``learning_rate_fns`` is empty or holds a non-finite number.
    TypeError
        On arguments of the wrong type.

    Notes
    -----
    ``str(instance)`` is the merge key: the canonical text of every field
    that affects training (segments with their builders' parameters, slot
    expiry, eviction settings, random seed, capacity bound, eviction policy,
    non-finite policy) followed by the learning-rate fns. Numbers appear as
    their float32 values, so ``1`` and ``1.0`` give the same key, as do
    explicitly written and omitted defaults and equal schedules (whatever
    their ``name``). A callable that is not a ``LearningRateFunction`` is
    keyed by identity. ``extra_restore_names`` and ``initial_capacity`` are
    not part of the key. The length check between ``learning_rate_fns`` and
    the segments happens in :meth:`validate`, when a table is built.

    Examples
    --------
    >>> from mtht.testing import generate_test_hash_table_config
    >>> a = generate_test_hash_table_config(2, learning_rate=1)
    >>> b = generate_test_hash_table_config(2, learning_rate=1.0)
    >>> str(a) == str(b)
    True
    """

    def __init__(self, table_config: EmbeddingHashTableConfig, learning_rate_fns: Sequence[LearningRateFn],
                 extra_restore_names: Optional[Iterable[str]] = None) -> None:
        if not isinstance(table_config, EmbeddingHashTableConfig):
            raise TypeError(
                "table_config must be an EmbeddingHashTableConfig, got "
                f"{table_config!r}"
            )
        if callable(learning_rate_fns) or _is_real(learning_rate_fns) or (
            isinstance(learning_rate_fns, (str, bytes))
        ):
            raise TypeError(
                "learning_rate_fns must be a list (one per segment), got "
                f"{learning_rate_fns!r}"
            )
        fns = list(learning_rate_fns)
        if not fns:
            raise ValueError("learning_rate_fns must not be empty")
        self._modes = [_classify_lr_fn(i, fn) for i, fn in enumerate(fns)]
        self._table_config = table_config
        self._learning_rate_fns = fns
        # Constant learning rates, once evaluated: a small batch's step is a few
        # microseconds, and evaluating them took half of the Python side of it.
        self._constant_rates: Optional[np.ndarray] = None
        self._extra_restore_names = self._check_names(extra_restore_names)

    @staticmethod
    def _check_names(names: Any) -> list:
        if names is None:
            return []
        if isinstance(names, (str, bytes)):
            raise TypeError(
                f"extra_restore_names must be a list of str, got {names!r}"
            )
        names = list(names)
        for name in names:
            if not isinstance(name, str):
                raise TypeError(
                    f"extra_restore_names must be a list of str, got {name!r}"
                )
        return names

    @property
    def table_config(self) -> EmbeddingHashTableConfig:
        """The :class:`EmbeddingHashTableConfig` (shared, not a copy)."""
        return self._table_config

    @property
    def learning_rate_fns(self) -> list:
        """A new list of the learning-rate fns, one per segment."""
        return list(self._learning_rate_fns)

    @property
    def extra_restore_names(self) -> list:
        """The instance's own list of extra restore names (mutable)."""
        return self._extra_restore_names

    @extra_restore_names.setter
    def extra_restore_names(self, names) -> None:
        self._extra_restore_names = self._check_names(names)

    @property
    def num_segments(self) -> int:
        """Number of segments of the table config."""
        return len(self._table_config.entry_config.segments)

    def validate(self) -> None:
        """Check the table config and the number of learning-rate fns.

        Raises
        ------
        ValueError
            If the table config is invalid, ``learning_rate_fns`` is empty,
            or its length differs from the number of segments.
        """
        self._table_config.validate()
        if not self._learning_rate_fns:
            raise ValueError("learning_rate_fns must not be empty")
        if len(self._learning_rate_fns) != self.num_segments:
            raise ValueError(
                "Size of learning_rate_fns and size of segments must be equal."
            )

    def call_learning_rate_fns_fewer_ops(self, global_step: IntegerInput = 0) -> List[float]:
        """Evaluate the learning-rate fns as a list of Python floats.

        Parameters
        ----------
        global_step : int, default 0
            Passed to schedules and to callables that take an argument.

        Returns
        -------
        list of float
            One float32-rounded learning rate per fn.
        """
        return [float(x) for x in self.call_learning_rate_fns(global_step)]

    def learning_rates(self, global_step: int) -> np.ndarray:
        """:meth:`call_learning_rate_fns` for a write: constant rates come back as the one
        read-only array they were evaluated into (no copy for every table of every batch)."""
        constant_rates = getattr(self, "_constant_rates", None)
        if constant_rates is not None:
            if type(global_step) is not int:  # a Python int needs no check (every table of a multi-slot write)
                integer_step(global_step)
            return constant_rates
        return self.call_learning_rate_fns(global_step)

    def call_learning_rate_fns(self, global_step: IntegerInput = 0) -> np.ndarray:
        """Evaluate the learning-rate fns at ``global_step``.

        Parameters
        ----------
        global_step : int, default 0
            Passed to schedules and to callables that take an argument.

        Returns
        -------
        numpy.ndarray
            float32 array of shape ``[len(learning_rate_fns)]``.

        Raises
        ------
        ValueError
            If the fns are empty or a learning rate is not a finite scalar.
        """
        if not self._learning_rate_fns:
            raise ValueError("learning_rate_fns must not be empty")
        step = integer_step(global_step)
        constant_rates = getattr(self, "_constant_rates", None)
        if constant_rates is not None:
            return constant_rates.copy()
        out = np.empty(len(self._learning_rate_fns), dtype=np.float32)
        for i, (fn, mode) in enumerate(zip(self._learning_rate_fns,
                                           self._modes)):
            if mode == _CONSTANT:
                value = fn
            elif mode == _WITH_STEP:
                value = cast(Callable[[int], Any], fn)(step)
            else:
                value = cast(Callable[[], Any], fn)()
            try:
                if value is None:  # numpy would make it NaN
                    raise TypeError
                with np.errstate(over="ignore"):
                    array = as_numpy(value).astype(np.float32)
            except (TypeError, ValueError):
                raise ValueError(
                    f"learning rate {i} is not a number: {value!r}"
                ) from None
            if array.size != 1:
                raise ValueError(
                    f"learning rate {i} must be a scalar, got shape "
                    f"{array.shape}"
                )
            lr = array.reshape(())
            if not np.isfinite(lr):
                raise ValueError(
                    f"learning rate {i} is not finite at global step {step}: "
                    f"{float(lr)}"
                )
            out[i] = lr
        if all(mode == _CONSTANT and not _is_rate_array(fn)  # an array may change
               for fn, mode in zip(self._learning_rate_fns, self._modes)):
            constant_rates = out.copy()
            constant_rates.flags.writeable = False
            self._constant_rates = constant_rates
        return out

    def __str__(self) -> str:
        fns = ", ".join(_lr_fn_key(fn) for fn in self._learning_rate_fns)
        return (
            "TableConfig("
            + ", ".join(self._table_config._key_fields())
            + f", learning_rate_fns=[{fns}])"
        )

    def __repr__(self) -> str:
        return (
            f"HashTableConfigInstance(table_config={self._table_config!r}, "
            f"learning_rate_fns={self._learning_rate_fns!r}, "
            f"extra_restore_names={self._extra_restore_names!r})"
        )

    def __copy__(self) -> "HashTableConfigInstance":
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._learning_rate_fns = list(self._learning_rate_fns)
        new._modes = list(self._modes)
        new._extra_restore_names = list(self._extra_restore_names)
        return new

    def _copy_for_a_table(self) -> "HashTableConfigInstance":
        """A copy whose table config is its own, copied whole, for a table built from it: a
        caller may change its config objects after (a segment reused as a template for the
        next slot) without changing a table built before. The learning-rate fns themselves
        are shared, so a rate array the trainer changes in place reaches the table."""
        new = copy.copy(self)
        new._table_config = copy.deepcopy(self._table_config)
        return new
