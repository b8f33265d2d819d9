"""Turn what users pass (numpy, lists, buffer-protocol and ``__array__`` objects, DLPack
producers such as torch or jax arrays) into the exact arrays the core takes, or raise a
clear error before anything changes."""

from __future__ import annotations

import numbers

import numpy as np


def as_numpy(x) -> np.ndarray:
    """A numpy view of ``x`` without a copy where possible (DLPack first, then asarray)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__dlpack__") and not isinstance(x, (list, tuple)):
        try:
            return np.from_dlpack(x)
        except (TypeError, BufferError, RuntimeError, ValueError):
            pass  # e.g. a tensor that needs grad, or on another device: fall back
    return np.asarray(x)


_INT64 = np.dtype(np.int64)
_FLOAT32 = np.dtype(np.float32)


def as_ids(ids, name: str = "ids") -> np.ndarray:
    """1-D C-contiguous int64. Signed ints of any width; uint64 is reinterpreted as int64
    bits; smaller unsigned ints widen. Floats (unless empty) and bools are rejected."""
    if type(ids) is np.ndarray and ids.dtype is _INT64 and ids.ndim == 1 and ids.flags.c_contiguous:
        return ids  # already what the core takes: the common case, checked first
    a = as_numpy(ids)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {a.shape}")
    kind = a.dtype.kind
    if kind == "i":
        pass
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
    return np.ascontiguousarray(a, dtype=np.int64)


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
            values.flags.c_contiguous:
        return values  # already what the core takes: the common case, checked first
    a = as_numpy(values)
    if not _is_number_dtype(a.dtype):
        raise TypeError(f"{name} must be numbers, got dtype {a.dtype}")
    if a.shape == (n, dim):
        pass
    elif a.ndim == 1 and dim == 1 and a.shape[0] == n:
        a = a.reshape(n, 1)
    elif a.ndim == 0 and n * dim == 1:
        a = a.reshape(1, 1)
    else:
        raise ValueError(f"{name} must have shape ({n}, {dim}) for {n} ids of dim {dim}, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


def as_numpy_floats(values, name: str) -> np.ndarray:
    """A flat C-contiguous float32 array (a scalar becomes one element)."""
    a = as_numpy(values)
    if not _is_number_dtype(a.dtype):
        raise TypeError(f"{name} must be numbers, got dtype {a.dtype}")
    if a.ndim > 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return np.ascontiguousarray(a.reshape(-1), dtype=np.float32)


def as_out(out, n: int, dim: int) -> np.ndarray:
    """Check a caller-provided output array: writeable C-contiguous float32 [n, dim]."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    if out.dtype != np.float32 or out.shape != (n, dim) or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be a C-contiguous float32 array of shape ({n}, {dim}), "
            f"got {out.dtype} {out.shape}{'' if out.flags.c_contiguous else ' (not contiguous)'}")
    if not out.flags.writeable:
        raise ValueError("out must be writeable")
    return out


def as_int64_scalar(x, name: str) -> int:
    """An integer scalar (Python, numpy, or a 0-d integer tensor), e.g. req_time or global_step."""
    if type(x) is int and -(1 << 63) <= x < (1 << 63):  # the common case, without the ABC check
        return x
    if not isinstance(x, (numbers.Integral, np.ndarray)) and (hasattr(x, "__dlpack__") or hasattr(x, "__array__")):
        x = as_numpy(x)  # a framework's 0-d tensor (torch, JAX)
    if isinstance(x, np.ndarray) and x.ndim == 0:
        x = x[()]
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(x).__name__}")
    x = int(x)
    if not -(1 << 63) <= x < (1 << 63):
        raise ValueError(f"{name} = {x} does not fit in int64")
    return x
