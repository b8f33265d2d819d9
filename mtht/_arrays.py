"""Turn what users pass (numpy, lists, buffer-protocol and ``__array__`` objects, DLPack
producers such as torch or jax arrays) into the exact arrays the core takes, or raise a
clear error before anything changes."""

from __future__ import annotations

import collections.abc
import numbers
import os
from typing import Any, Optional, Protocol, Sequence, Union

import numpy as np
import numpy.typing as npt

from mtht import _core

# The numbers the builders and schedules take, in their type hints (Python's or numpy's;
# bools are refused when they are checked).
RealNumber = Union[float, "np.floating[Any]", "np.integer[Any]"]
Integer = Union[int, "np.integer[Any]"]


class Tensor(Protocol):
    """A framework's tensor (PyTorch, JAX): read through DLPack."""

    def __dlpack__(self) -> Any: ...


# What the tables take as ids, values and gradients: numpy arrays, lists, buffer-protocol
# and ``__array__`` objects, framework tensors.
ArrayInput = Union[npt.ArrayLike, Tensor]
# An integer argument such as global_step or req_time: a number, or a 0-d array or tensor.
IntegerInput = Union[Integer, "np.ndarray[Any, Any]", Tensor]
# A call's switch (as_flag): a bool, 0 or 1, a 0-d array or tensor of one; None is False.
Switch = Union[bool, "np.bool_", Integer, "np.ndarray[Any, Any]", Tensor, None]
# A checkpoint's path: a string or a path object (pathlib).
StrPath = Union[str, "os.PathLike[str]"]


def as_numpy(x, name: str = "the input") -> np.ndarray:
    """A numpy view of ``x`` without a copy where possible (DLPack first, then asarray);
    ``name`` names it in the TypeError of an object that cannot be read."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple)):
        return _from_sequence(x, name)
    if not hasattr(x, "__dlpack__"):
        return _asarray(x, name)
    x = _plain_tensor(x)
    exported: Optional[Exception] = None
    if getattr(getattr(x, "dtype", None), "name", None) not in _NOT_NUMBERS:
        try:
            return np.from_dlpack(x)
        except MemoryError:
            raise
        except Exception as e:  # a framework's own error too (TensorFlow's, for float8)
            exported = e  # e.g. a tensor on another device: asarray may still read it
    a = _asarray(x, name, keep_value_errors=False)
    if a.dtype == object and a.ndim == 0 and exported is not None:  # asarray wrapped the object itself
        raise TypeError(f"{name} cannot be read as an array: {exported}") from exported
    return a


# Tensor types that hold no numbers. TensorFlow ends the process (a failed CHECK) when a
# tensor of one is exported through DLPack, so such tensors are read by asarray alone.
_NOT_NUMBERS = frozenset({"string", "resource", "variant"})


# numpy before 1.24 makes a ragged nested list an object array (with a warning) and casts a
# finite float64 past float32's range to Inf without an error; later versions raise both.
_NUMPY_BEFORE_1_24 = np.lib.NumpyVersion(np.__version__) < "1.24.0"


def _from_sequence(x: Any, name: str) -> np.ndarray:
    if x and hasattr(x[0], "__dlpack__") and not isinstance(x[0], np.ndarray):
        # A list of tensors (rows): each read as one tensor is (a PyTorch tensor that needs
        # grad, or of bfloat16, which numpy's asarray of the list refuses).
        x = [as_numpy(item, name) for item in x]
    if _NUMPY_BEFORE_1_24 and _ragged(x):  # found before numpy warns of it
        raise ValueError(_ragged_message(name))
    try:
        return _asarray(x, name)
    except ValueError as e:
        if _ragged(x):  # numpy's own message names neither the argument nor the lengths
            raise ValueError(_ragged_message(name)) from e
        raise


def _ragged_message(name: str) -> str:
    return (f"{name} is ragged: its nested sequences have different lengths (a list of rows or "
            f"arrays must give one rectangular array)")


def _asarray(x: Any, name: str, keep_value_errors: bool = True) -> np.ndarray:
    """``np.asarray(x)``; an error other than a MemoryError, or a ValueError (a ragged list's,
    a shape's) where ``keep_value_errors``, is a TypeError naming ``name``: e.g. the one a
    framework raises for an array it will not convert (JAX's typed PRNG keys)."""
    try:
        return np.asarray(x)
    except MemoryError:
        raise
    except Exception as e:
        if keep_value_errors and isinstance(e, ValueError):
            raise
        raise TypeError(f"{name} cannot be read as an array: {e}") from e


def _ragged(x: Any) -> bool:
    """Whether the nested sequences of ``x`` have different lengths at some depth."""
    level = [x]
    while level:
        nested = [item for item in level if (isinstance(item, collections.abc.Sequence) and
                                             not isinstance(item, (str, bytes)))
                  or (isinstance(item, np.ndarray) and item.ndim > 0)]
        if not nested:
            return False
        if len(nested) != len(level) or len({len(item) for item in nested}) > 1:
            return True
        level = [sub for item in nested for sub in item]
    return False


def _plain_tensor(x):
    """``x`` with what a DLPack export would lose or refuse of a PyTorch tensor resolved: a
    tensor that needs grad is read through ``detach()`` (only its numbers are read); a lazy
    negation or conjugation (``z.conj().imag``) is applied, since the export passes the
    memory without it; bfloat16, which numpy has no type for, is widened to float32."""
    if getattr(x, "requires_grad", False) is True:
        x = x.detach()
    for flag, resolve in (("is_neg", "resolve_neg"), ("is_conj", "resolve_conj")):
        if callable(getattr(x, flag, None)) and getattr(x, flag)() is True:
            x = getattr(x, resolve)()
    if str(getattr(x, "dtype", "")) == "torch.bfloat16":
        x = x.float()
    return x


_INT64 = np.dtype(np.int64)
_FLOAT32 = np.dtype(np.float32)


def as_ids(ids, name: str = "ids") -> np.ndarray:
    """1-D C-contiguous int64. Signed ints of any width; uint64 is reinterpreted as int64
    bits; smaller unsigned ints widen. Floats (unless empty) and bools are rejected."""
    if type(ids) is np.ndarray and ids.dtype is _INT64 and ids.ndim == 1 and ids.flags.c_contiguous and \
            ids.flags.aligned:
        return ids  # already what the core takes: the common case, checked first
    a = as_numpy(ids, name)
    if a.ndim == 0 and a.dtype.kind not in "iuf":  # a set, a generator, None, a string...
        raise TypeError(f"{name} must be a 1-D array of integers, got {type(ids).__name__}")
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {a.shape}")
    kind = a.dtype.kind
    if kind == "i":
        pass
    elif kind == "V" and np.can_cast(a.dtype, np.int64, casting="safe"):  # ml_dtypes' int4, uint4, int2...
        a = a.astype(np.int64)
    elif kind == "u":
        if a.dtype.itemsize == 8:  # reinterpret the bits (in native byte order)
            a = np.ascontiguousarray(a, dtype=np.uint64).view(np.int64)
    elif a.size == 0 and kind in "fO":
        a = a.astype(np.int64)
    elif kind == "f" and isinstance(ids, (list, tuple)):
        # NumPy gives float64 for a list mixing ids past 2**63 - 1 with others (or NumPy
        # int64 and uint64 scalars): each element is checked as an integer instead.
        a = _object_ids(np.asarray(ids, dtype=object), name)
    elif kind == "f":
        raise TypeError(f"{name} must be integers, got dtype {a.dtype}")
    elif kind == "O":
        a = _object_ids(a, name)
    else:
        raise TypeError(f"{name} must be integers, got dtype {a.dtype}")
    return _for_the_core(a, np.int64)


def _for_the_core(a, dtype) -> np.ndarray:
    """``a`` as a C-contiguous, aligned array of ``dtype``: the core reads it through typed
    pointers, which an array at an odd address (a view into a byte buffer) does not fit."""
    return np.require(np.ascontiguousarray(a, dtype=dtype), requirements="A")


def _object_ids(a: np.ndarray, name: str) -> np.ndarray:
    out = np.empty(a.shape[0], dtype=np.int64)
    for k, v in enumerate(a):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be integers, got {type(v).__name__} at position {k}")
        v = int(v)
        if not -(1 << 63) <= v < (1 << 64):
            raise ValueError(f"{name}[{k}] = {v} does not fit in 64 bits")
        out[k] = v - (1 << 64) if v >= (1 << 63) else v
    return out


def _is_number_dtype(dtype: np.dtype) -> bool:
    """Integers and floats, and the float formats numpy has no kind for (ml_dtypes' bfloat16
    and float8, as JAX arrays give them) when they convert to float32 exactly; not bools."""
    if dtype.kind in "fiu":
        return True
    return dtype.kind == "V" and np.can_cast(dtype, np.float32, casting="safe")


def as_rows(values, n: int, dim: int, name: str) -> np.ndarray:
    """C-contiguous float32 ``[n, dim]``. Also accepted: ``[n]`` when dim == 1, and a scalar
    when n * dim == 1. Anything else, a transposed array included, is a ValueError."""
    if type(values) is np.ndarray and values.dtype is _FLOAT32 and values.shape == (n, dim) and \
            values.flags.c_contiguous and values.flags.aligned:
        return values  # already what the core takes: the common case, checked first
    if values is None:  # e.g. the .grad of a tensor the loss did not use
        raise TypeError(f"{name} must be an array of numbers, got None")
    a = as_numpy(values, name)
    if not _is_number_dtype(a.dtype):
        raise TypeError(_not_numbers(values, a, name))
    if a.shape == (n, dim):
        pass
    elif n == 0 and a.shape == (0,):  # no ids, and no rows given as an empty list ([] of a slot)
        a = a.reshape(0, dim)
    elif a.ndim == 1 and dim == 1 and a.shape[0] == n:
        a = a.reshape(n, 1)
    elif a.ndim == 0 and n * dim == 1:
        a = a.reshape(1, 1)
    else:
        raise ValueError(f"{name} must have shape ({n}, {dim}) for {n} ids of dim {dim}, got shape {a.shape}")
    return _float32(a, name)


def joined(parts: Sequence[np.ndarray]) -> np.ndarray:
    """``np.concatenate(parts)`` along the first axis, or without a copy: the one part, or a
    view when the parts are consecutive C-contiguous pieces of one array, as slicing a batch
    by slot gives them (a merged table's slots then cost no copy of their rows). Parts of
    less than 4 KiB on average are copied: finding where a part lies takes about as long
    as copying that much."""
    first = parts[0]
    if len(parts) == 1:
        return first
    base = first.base
    if type(base) is np.ndarray and base.flags.c_contiguous and base.dtype == first.dtype and \
            sum(p.nbytes for p in parts) >= len(parts) << 12:
        span = _core.joined_span(parts if type(parts) is list else list(parts), base, first.dtype, first.shape[1:])
        if span is not None and span[0] % first.itemsize == 0:
            start, end = span[0] // first.itemsize, span[1] // first.itemsize
            return base.reshape(-1)[start:end].reshape((-1,) + first.shape[1:])
    return np.concatenate(parts)


def as_float32(values, name: str) -> np.ndarray:
    """A C-contiguous float32 array of the shape ``values`` has; numbers only."""
    a = as_numpy(values, name)
    if not _is_number_dtype(a.dtype):
        raise TypeError(_not_numbers(values, a, name))
    return _float32(a, name)


def _not_numbers(values: Any, a: np.ndarray, name: str) -> str:
    """The message for ``values`` read as ``a``, which holds no numbers."""
    if a.dtype == object and a.ndim == 0:  # asarray wrapped the object itself (e.g. IndexedSlices)
        return f"{name} must be an array of numbers, got {type(values).__name__}"
    return f"{name} must be numbers, got dtype {a.dtype}"


def _float32(a: np.ndarray, name: str) -> np.ndarray:
    """``a`` as C-contiguous float32. A finite number past float32's range (a float64 of
    1e39) is a ValueError: cast, it would be an Inf that the table refuses as if given."""
    if a.dtype.kind != "f" or a.dtype.itemsize <= 4:
        return _for_the_core(a, np.float32)
    if not _NUMPY_BEFORE_1_24:
        with np.errstate(over="raise"):
            try:
                return _for_the_core(a, np.float32)
            except FloatingPointError:
                pass
    else:  # found after the cast: an extra pass over the rows
        with np.errstate(over="ignore"):
            out = _for_the_core(a, np.float32)
        if np.isfinite(out).all() or not (np.isinf(out) & np.isfinite(a)).any():
            return out
    largest = np.max(np.abs(a[np.isfinite(a)]))
    raise ValueError(f"{name} hold a finite number past float32's range (about 3.4e38): "
                     f"{np.format_float_scientific(largest, unique=True, trim='-')}")


def as_numpy_floats(values, name: str) -> np.ndarray:
    """A flat C-contiguous float32 array (a scalar becomes one element)."""
    a = as_float32(values, name)
    if a.ndim > 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a.reshape(-1)


def as_out(out, *shape: Optional[int]) -> np.ndarray:
    """Check a caller-provided output array: writeable C-contiguous float32 of ``shape`` (a
    ``None`` in it, named L, takes any length there: the caller checks that one)."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    fits = out.ndim == len(shape) and all(want is None or want == got for want, got in zip(shape, out.shape))
    if out.dtype != np.float32 or not fits or not out.flags.c_contiguous:
        named = ", ".join("L" if want is None else str(want) for want in shape) + ("," if len(shape) == 1 else "")
        raise ValueError(
            f"out must be a C-contiguous float32 array of shape ({named}), "
            f"got {out.dtype} {out.shape}{'' if out.flags.c_contiguous else ' (not contiguous)'}")
    if not out.flags.writeable:
        raise ValueError("out must be writeable")
    return out


def as_mapping(value, name: str, form: str):
    """``value`` if it is a mapping (``form`` says of what), else a TypeError naming it."""
    if isinstance(value, (dict, collections.abc.Mapping)):
        return value
    raise TypeError(f"{name} must be a mapping {form}, got {type(value).__name__}")


def as_int64_scalar(x, name: str) -> int:
    """An integer scalar (Python, numpy, or a 0-d integer tensor), e.g. req_time or global_step."""
    if type(x) is int and -(1 << 63) <= x < (1 << 63):  # the common case, without the ABC check
        return x
    x = _scalar_of(x, name)
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        shape = getattr(x, "shape", None)  # an array or tensor of one number is not 0-d
        got = f"{type(x).__name__} of shape {tuple(shape)}" if shape else type(x).__name__
        raise TypeError(f"{name} must be an integer, got {got}")
    x = int(x)
    if not -(1 << 63) <= x < (1 << 63):
        raise ValueError(f"{name} = {x} does not fit in int64")
    return x


def as_flag(x, name: str) -> bool:
    """A call's switch: a bool, or an integer 0 or 1 (Python's, numpy's, or a 0-d array or
    framework tensor of either); None is False. Anything else, a string such as ``"no"``
    included, is a TypeError rather than read by its truth."""
    if x is True or x is False:
        return x
    if x is None:
        return False
    number = _scalar_of(x, name)
    if isinstance(number, np.bool_) or (isinstance(number, numbers.Integral) and number in (0, 1)):
        return bool(number)
    raise TypeError(f"{name} must be a bool, got {x!r}")


def _scalar_of(x, name: str):
    """``x``, or the number that ``x`` holds if it is a 0-d numpy array or framework tensor
    (torch, JAX)."""
    if isinstance(x, (numbers.Number, np.generic)) or not (hasattr(x, "__dlpack__") or hasattr(x, "__array__")):
        return x
    a = as_numpy(x, name)
    return a[()] if a.ndim == 0 else x
