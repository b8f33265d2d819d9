"""Arrays laid out in memory as callers' arrays can be: at any address, strided, in either
byte order, in Fortran order."""

import numpy as np


def laid_out(values, dtype, offset=0, step=1, fortran=False):
    """``values`` as an array of ``dtype`` placed in a byte buffer: its data ``offset`` bytes
    into it, every ``step``-th element along the first axis (the last in Fortran order), in
    Fortran order if ``fortran``."""
    values = np.asarray(values)
    dtype = np.dtype(dtype)
    shape = values.shape
    dense = np.empty(shape, dtype, order="F" if fortran else "C").strides
    spaced = len(shape) - 1 if fortran else 0
    strides = tuple(s * step if axis == spaced else s for axis, s in enumerate(dense))
    nbytes = sum((n - 1) * s for n, s in zip(shape, strides)) + dtype.itemsize if values.size else 0
    a = np.ndarray(shape, dtype, buffer=bytearray(offset + nbytes + 8), offset=offset, strides=strides)
    a[...] = values
    return a


def empty_at_odd_address(shape, dtype):
    """An empty array whose data pointer is odd, as an empty slot unpickled from another
    process (mpi4py's allgather) can come: numpy calls it aligned all the same."""
    a = laid_out(np.empty(shape), dtype, offset=1)
    assert a.size == 0 and a.flags.aligned and a.__array_interface__["data"][0] % 2 == 1
    return a
