# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# distutils: language = c++
"""Thin binding of the C++ core: arrays in, arrays out, the GIL released around every batch.

Arguments arrive already converted and shape-checked by :mod:`mtht.hash_table`; this layer
only checks what it needs for memory safety (lengths against the table's dim).
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libcpp.memory cimport unique_ptr
from libcpp.vector cimport vector

import operator
import os

import numpy as np

from mtht._core cimport (
    EmbeddingTable, FusedLayout, MAX_THREADS, SegmentSpec, TableSpec, TableStats, ThreadPool, active_kernel, cgroup_cpu_limit,
    cgroup_memory_limit, cpu_isas,
    kernel_names,
    c_fused_apply_gradients, c_fused_lookup, TablePart, WriteKind, c_write_tables,
    TableRead, c_lookup_tables, fused_layout, CheckpointFileInfo, OwnedIds, save_checkpoint,
    load_checkpoint,
    ProbeResult, random_read_probe, MonolithFormat, MonolithLoadInfo, monolith_save, monolith_load, c_crc32c,
    c_route_ids, c_route_tables, c_sum_rows_to, c_gather_tables, nanoseconds,
)
from cpython.buffer cimport (PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBUF_WRITABLE, PyBuffer_Release,
                             PyObject_GetBuffer)
from cpython.exc cimport PyErr_CheckSignals
from libcpp.string cimport string
from libcpp.pair cimport pair

cdef extern from *:
    # Defined by CMakeLists.txt for the build-info report.
    const char* MTHT_COMPILER
    const char* MTHT_CXX_FLAGS

__all__ = ["Table", "probe_random_reads", "set_num_threads", "get_num_threads", "default_num_threads", "named_num_threads", "cpu_limit", "memory_limit",
           "joined_span", "cpu_features", "kernel_name", "available_kernels",
           "compiler", "compile_flags",
           "fused_offsets", "fused_lookup", "fused_apply_gradient", "route_ids", "route_tables", "sum_rows",
           "gather_tables",
           "lookup_tables", "write_tables", "hold_writes", "release_writes", "crc32c"]


def compiler():
    return MTHT_COMPILER.decode()


def compile_flags():
    return MTHT_CXX_FLAGS.decode().strip()


MAX_NUM_THREADS = MAX_THREADS

# EmbeddingHashTableConfig.embedding_dtype -> ValueFormat (spec_types.h)
_VALUE_FORMATS = {"float32": 0, "float16": 1, "bfloat16": 2}


def set_num_threads(n):
    """Set the number of threads batch calls may use (the calling thread included)."""
    if isinstance(n, bool):
        raise TypeError("num_threads must be an integer, got bool")
    n = operator.index(n)  # an integer: neither 1.9 nor "3"
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"num_threads must be from 1 to {MAX_THREADS}, got {n}")
    cdef int count = n
    with nogil:
        ThreadPool.global_().set_num_threads(count)


def get_num_threads():
    return ThreadPool.global_().num_threads()


def default_num_threads():
    """The pool's count when nothing set it: the cores of the process's CPU affinity, at
    most the CPUs its control groups allow, at most 64."""
    return ThreadPool.default_threads()


def named_num_threads():
    """The count MTHT_NUM_THREADS names: 0 when it is unset or empty, -1 when it names none
    (not a whole number from 1 to MAX_NUM_THREADS in ASCII digits)."""
    return ThreadPool.named_threads()


def cpu_limit():
    """Whole CPUs the process's control groups allow (a container's CPU limit), or None."""
    return cgroup_cpu_limit() or None


def memory_limit():
    """Bytes of memory the process's control groups allow (a container's memory limit), or
    None."""
    return cgroup_memory_limit() or None


def joined_span(list parts, base, dtype, tuple row_shape):
    """Where ``parts`` (numpy arrays) lie in ``base``, a C-contiguous array: ``(first, end)``,
    the byte offsets in ``base`` of the bytes they span, when every part is of ``dtype``
    and of rows of ``row_shape``, and each with any bytes is a C-contiguous view of ``base``
    starting where the one before ended; else None. (For mtht._arrays.joined: the addresses
    read here cost no Python object each.)"""
    cdef Py_buffer view
    cdef uintptr_t origin, at, begin = 0, end = 0
    cdef Py_ssize_t size
    cdef bint started = False
    PyObject_GetBuffer(base, &view, PyBUF_C_CONTIGUOUS)
    origin = <uintptr_t>view.buf
    PyBuffer_Release(&view)
    for part in parts:
        if part.dtype != dtype or part.shape[1:] != row_shape:
            return None
        try:
            PyObject_GetBuffer(part, &view, PyBUF_C_CONTIGUOUS)
        except (BufferError, ValueError):  # not C-contiguous (numpy raises ValueError)
            return None
        at, size = <uintptr_t>view.buf, view.len
        PyBuffer_Release(&view)
        if size == 0:  # adds nothing, wherever it points
            continue
        if part.base is not base or (started and at != end):
            return None
        if not started:
            begin, started = at, True
        end = at + <uintptr_t>size
    return (begin - origin, end - origin) if started else None


def cpu_features():
    return cpu_isas().decode()


def probe_random_reads(size_t buffer_bytes, size_t reads_per_thread=20_000_000, int threads=1):
    """Independent random 64-byte reads over a buffer of ``buffer_bytes``, on ``threads``
    threads: (reads per second in total, checksum)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    cdef ProbeResult r
    with nogil:
        r = random_read_probe(buffer_bytes, reads_per_thread, threads)
    return r.reads_per_s, r.checksum


def kernel_name():
    """The optimizer kernel set a new table uses (MTHT_KERNEL or the fastest available)."""
    return active_kernel().decode()


def available_kernels():
    """Kernel sets this CPU can run, slowest (the scalar reference) first."""
    return kernel_names().decode().split(",")


def crc32c(const unsigned char[::1] data not None):
    """The CRC-32C of ``data`` (bytes or any contiguous buffer)."""
    cdef const unsigned char* p = &data[0] if data.shape[0] else NULL
    cdef uint32_t crc
    with nogil:
        crc = c_crc32c(p, data.shape[0])
    return crc


cdef extern from *:
    """
    #include "mtht/table.h"
    // Collects one shard's entries of part `part` of `parts` (EmbeddingTable::part_of) into
    // flat vectors.
    static void _dump_shard(const mtht::EmbeddingTable& t, int shard, size_t part, size_t parts, int64_t now,
                            bool apply_expiry, std::vector<int64_t>& ids, std::vector<int64_t>& ts,
                            std::vector<float>& data) {
      const size_t width = static_cast<size_t>(t.dim() + t.state_dim());
      t.scan_shard(static_cast<size_t>(shard), [&](int64_t id, int64_t stamp, const float* values) {
        if (mtht::EmbeddingTable::part_of(id, parts) != part) return;
        if (apply_expiry && t.expired(id, stamp, now)) return;
        ids.push_back(id);
        ts.push_back(stamp);
        data.insert(data.end(), values, values + width);
      });
    }
    """
    void _dump_shard(const EmbeddingTable& t, int shard, size_t part, size_t parts, int64_t now, bint apply_expiry,
                     vector[int64_t]& ids, vector[int64_t]& ts, vector[float]& data) except +translate_exception nogil


cdef inline void _check_rows(Py_ssize_t n, Py_ssize_t rows, Py_ssize_t cols, int dim, str what) except *:
    if rows != n or cols != dim:
        raise ValueError(f"{what} must have shape ({n}, {dim}), got ({rows}, {cols})")


cdef struct ArrayView:
    void* data
    Py_ssize_t rows
    Py_ssize_t cols  # 1 for a 1-D array


cdef int64_t _nothing  # where an empty array's view points (aligned for int64 and float32)


cdef int _view(object array, char item, int ndim, bint writable, ArrayView* view, str what) except -1:
    """Where the C-contiguous, aligned ``ndim``-D array ``array`` of ``item`` ('q': int64, 'f':
    float32, native order) keeps its data, and its shape. The pointer is valid while the
    caller holds ``array`` (the buffer is let go at once: numpy resizes an array whose
    buffer is held all the same). A typed memoryview took 0.3 us an array, which 100 slots
    of a multi-slot call paid two or three times."""
    cdef Py_buffer b
    cdef Py_ssize_t size = 8 if item == b'q' else 4
    PyObject_GetBuffer(array, &b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (PyBUF_WRITABLE if writable else 0))
    try:
        fmt = b.format if b.format != NULL else b"B"  # NULL: unsigned bytes
        # An empty array may sit at any address (numpy calls it aligned all the same, and an
        # empty slot unpickled from another process can lie at an odd one): it is read from
        # nothing, and the core is handed an aligned address instead.
        if b.ndim != ndim or b.itemsize != size or (b.len != 0 and <uintptr_t>b.buf % size != 0) or \
                fmt.lstrip(b"@=") not in ((b"q", b"l") if item == b'q' else (b"f",)):
            raise ValueError(f"{what} must be a {ndim}-D aligned array of {'int64' if item == b'q' else 'float32'}, "
                             f"got format {fmt!r}, {b.ndim}-D")
        view.data = b.buf if b.len != 0 else <void*>&_nothing
        view.rows = b.shape[0]
        view.cols = b.shape[1] if ndim == 2 else 1
    finally:
        PyBuffer_Release(&b)
    return 0


cdef int _monolith_format(Table table, list dumps, list members, MonolithFormat& fmt) except -1:
    """``dumps``: [(oneof member, [(field number, type, words, name)])] of the table's
    segments with a dump; ``members``: [(number, name)] of every oneof member. Types: 0
    repeated float, 1 float, 2 int64."""
    fmt.dim = table.dim
    fmt.state_dim = table.state_dim
    for number, name in members:
        fmt.add_member(number, name.encode())
    for member, fields in dumps:
        fmt.add_dump(member)
        for number, kind, words, name in fields:
            fmt.add_field(number, kind, words, name.encode())
    return 0


cdef class Table:
    """One C++ ``EmbeddingTable``. ``segments`` is a list of dicts with the fields of the
    core's ``SegmentSpec`` (optimizer parameters under ``opt_params``), built by mtht._spec."""

    cdef unique_ptr[EmbeddingTable] _t
    cdef readonly int dim
    cdef readonly int state_dim
    cdef readonly int num_segments
    cdef readonly str kernel

    def __cinit__(self, list segments, uint64_t random_seed=0, bint allow_non_finite=False,
                  uint64_t initial_capacity=0, int num_shards=0, uint32_t default_expire_days=36500,
                  dict slot_expire_days=None, object occurrence_thresholds=None, uint64_t max_entries=0,
                  str eviction_policy="lru", uint64_t max_bytes=0, double max_load_factor=0.5,
                  uint64_t filter_capacity=0, uint64_t initial_shards=0, str embedding_dtype="float32"):
        """``occurrence_thresholds``: None (no admission filter) or (default, {slot: threshold});
        ``embedding_dtype``: how rows keep their values ("float32", "float16", "bfloat16");
        ``filter_capacity``: about the most counts the filter keeps (0: no bound);
        ``initial_shards``: with ``num_shards`` 0, the shards to start with (0: as the capacity asks)."""
        cdef TableSpec spec
        cdef SegmentSpec seg
        for s in segments:
            seg = SegmentSpec()
            seg.dim = s["dim"]
            seg.init = s["init"]
            seg.init_a = s.get("init_a", 0.0)
            seg.init_b = s.get("init_b", 0.0)
            seg.opt = s["opt"]
            p = s.get("opt_params", {})
            seg.opt_params.initial_accumulator_value = p.get("initial_accumulator_value", 0.1)
            seg.opt_params.weight_decay_factor = p.get("weight_decay_factor", 0.0)
            seg.opt_params.beta = p.get("beta", 0.0)
            seg.opt_params.beta1 = p.get("beta1", 0.9)
            seg.opt_params.beta2 = p.get("beta2", 0.99)
            seg.opt_params.epsilon = p.get("epsilon", 0.01)
            seg.opt_params.l1 = p.get("l1", 0.0)
            seg.opt_params.l2 = p.get("l2", 0.0)
            seg.opt_params.momentum = p.get("momentum", 0.9)
            seg.opt_params.averaging_ratio = p.get("averaging_ratio", 0.9)
            seg.opt_params.use_nesterov = p.get("use_nesterov", False)
            seg.opt_params.decouple_weight_decay = p.get("decouple_weight_decay", False)
            seg.stochastic_rounding_fp16 = s.get("stochastic_rounding_fp16", False)
            seg.retriever = s.get("retriever", 0)
            seg.fake_quant_range = s.get("fake_quant_range", 1.0)
            seg.hashnet_step_size = s.get("hashnet_step_size", 200)
            seg.hashnet_init_scale = s.get("hashnet_init_scale", 1.0)
            seg.hashnet_max_scale = s.get("hashnet_max_scale", 10000.0)
            seg.hashnet_amplitude = s.get("hashnet_amplitude", 0.05)
            spec.segments.push_back(seg)
        spec.random_seed = random_seed
        spec.allow_non_finite = allow_non_finite
        if embedding_dtype not in _VALUE_FORMATS:
            raise ValueError(f"embedding_dtype must be one of {tuple(_VALUE_FORMATS)}, got {embedding_dtype!r}")
        spec.value_format = _VALUE_FORMATS[embedding_dtype]
        spec.initial_capacity = initial_capacity
        spec.num_shards = num_shards
        spec.initial_shards = initial_shards
        spec.default_expire_days = default_expire_days
        spec.max_entries = max_entries
        spec.max_bytes = max_bytes
        spec.max_load_permille = <uint32_t>round(max_load_factor * 1000) if 0 < max_load_factor < 1 else 0
        if eviction_policy not in ("lru", "lfu"):
            raise ValueError(f"eviction_policy must be 'lru' or 'lfu', got {eviction_policy!r}")
        spec.eviction_policy = 0 if eviction_policy == "lru" else 1
        for slot, days in (slot_expire_days or {}).items():
            spec.slot_expire_days.push_back(pair[uint32_t, uint32_t](slot, days))
        spec.filter_capacity = filter_capacity
        if occurrence_thresholds is not None:
            spec.has_filter = True
            spec.default_occurrence_threshold = occurrence_thresholds[0]
            for slot, threshold in occurrence_thresholds[1].items():
                spec.slot_occurrence_thresholds.push_back(pair[uint32_t, uint32_t](slot, threshold))
        with nogil:
            self._t.reset(new EmbeddingTable(spec))
        self.dim = self._t.get().dim()
        self.state_dim = self._t.get().state_dim()
        self.num_segments = self._t.get().num_segments()
        self.kernel = self._t.get().kernel_name().decode()

    def check_finite(self, const float[:, ::1] rows, str what):
        """ValueError if ``rows`` hold NaN or Inf (unless the table allows them)."""
        cdef string cwhat = what.encode()
        cdef size_t count = rows.shape[0] * rows.shape[1]
        cdef const float* p = &rows[0, 0] if count > 0 else NULL
        with nogil:
            self._t.get().check_finite(p, count, cwhat.c_str())

    def size(self):
        cdef uint64_t n
        with nogil:
            n = self._t.get().size()
        return n

    def stored_ids(self):
        """int64 array of every id the table holds (see EmbeddingTable::stored_ids), listed
        straight into the array returned."""
        cdef size_t room = self._t.get().size()
        cdef size_t held
        cdef int64_t[::1] view
        while True:
            out = np.empty(room, dtype=np.int64)
            view = out
            with nogil:
                held = self._t.get().stored_ids(&view[0] if room else NULL, room)
            if held <= room:
                return out if held == room else out[:held].copy()
            room = held

    @property
    def max_update_ts(self):
        return self._t.get().max_update_ts()

    @max_update_ts.setter
    def max_update_ts(self, int64_t ts):
        self._t.get().set_max_update_ts(ts)

    @property
    def max_entries(self):
        """The capacity limit in entries (0 = none), max_bytes included."""
        return self._t.get().max_entries()

    @property
    def has_filter(self):
        return self._t.get().has_filter()

    def hashnet_scales(self):
        return [self._t.get().hashnet_scale_of(k) for k in range(self.num_segments)]

    def advance_hashnet_scales(self, int64_t global_step):
        """The HashNet scales a write at ``global_step`` sets (a write with no ids here)."""
        self._t.get().advance_hashnet_scales(global_step)

    def set_hashnet_scales(self, list scales):
        for k, v in enumerate(scales[:self.num_segments]):
            self._t.get().set_hashnet_scale(k, v)

    def evict(self, int64_t max_update_time):
        cdef uint64_t removed
        with nogil:
            removed = self._t.get().evict(max_update_time)
        return removed

    def dump_shard(self, int shard, size_t part, size_t parts, int64_t now, bint apply_expiry):
        """(ids, timestamps, values+state [n, dim + state_dim]) of the entries of one table
        shard in part ``part`` of ``parts`` of the entries (by id hash), leaving out entries
        expired at ``now`` when ``apply_expiry``."""
        cdef vector[int64_t] ids, ts
        cdef vector[float] data
        if not 0 <= shard < self._t.get().num_shards():
            raise ValueError(f"shard {shard} out of range")
        if not part < parts:
            raise ValueError(f"part {part} out of range for {parts} parts")
        with nogil:
            _dump_shard(self._t.get()[0], shard, part, parts, now, apply_expiry, ids, ts, data)
        width = self.dim + self.state_dim
        return (np.asarray(ids, dtype=np.int64), np.asarray(ts, dtype=np.int64),
                np.asarray(data, dtype=np.float32).reshape(-1, width))

    def load_entries(self, const int64_t[::1] ids, const int64_t[::1] ts, const float[:, ::1] data):
        """Write entries as a checkpoint holds them: values then optimizer state."""
        cdef Py_ssize_t n = ids.shape[0]
        if ts.shape[0] != n:
            raise ValueError(f"ts must have {n} values, got {ts.shape[0]}")
        _check_rows(n, data.shape[0], data.shape[1], self.dim + self.state_dim, "data")
        with nogil:
            self._t.get().load_entries(&ids[0], &ts[0], &data[0, 0], n)

    def save_files(self, list paths, int64_t max_update_ts, bint apply_expiry, str layout):
        """Write the table into the data files ``paths`` in parallel; per-file summaries."""
        cdef vector[string] cpaths = [os.fsencode(p) for p in paths]
        cdef string clayout = layout.encode()
        cdef vector[CheckpointFileInfo] infos
        with nogil:
            infos = save_checkpoint(self._t.get()[0], cpaths, max_update_ts, apply_expiry, clayout)
        return [_file_info(i) for i in infos]

    def load_files(self, list paths, str layout, bint fit_counts=True, int64_t parts=1, int64_t part=0):
        """Read data files into this (fresh) table, verifying every byte; per-file summaries.
        ``fit_counts``: the files' filter counts were kept under other bounds (load_checkpoint).
        Only the ids with ``id mod parts == part`` are kept (all of them by default)."""
        cdef vector[string] cpaths = [os.fsencode(p) for p in paths]
        cdef string clayout = layout.encode()
        cdef vector[CheckpointFileInfo] infos
        cdef OwnedIds owned
        owned.parts = parts
        owned.part = part
        with nogil:
            infos = load_checkpoint(self._t.get()[0], cpaths, clayout, fit_counts, owned)
        return [_file_info(i) for i in infos]

    def save_monolith_files(self, list paths, int64_t now, list dumps, list members):
        """Write the table as Monolith's files ``paths`` in parallel (entries expired at
        ``now`` left out); the records of each. ``dumps`` and ``members``: _monolith_format."""
        cdef vector[string] cpaths = [os.fsencode(p) for p in paths]
        cdef MonolithFormat fmt
        _monolith_format(self, dumps, members, fmt)
        cdef vector[uint64_t] records
        with nogil:
            records = monolith_save(self._t.get()[0], cpaths, now, fmt)
        return list(records)

    def load_monolith_files(self, list paths, list dumps, list members, int max_threads=0):
        """Read Monolith's files into this (fresh) table over at most ``max_threads``
        threads (0: all); (entries, largest timestamp) of each file."""
        cdef vector[string] cpaths = [os.fsencode(p) for p in paths]
        cdef MonolithFormat fmt
        _monolith_format(self, dumps, members, fmt)
        cdef vector[MonolithLoadInfo] infos
        with nogil:
            infos = monolith_load(self._t.get()[0], cpaths, fmt, max_threads)
        return [(i.entries, i.max_update_ts) for i in infos]

    def stats(self, bint probe_lengths=False):
        cdef TableStats st
        with nogil:
            st = self._t.get().stats(probe_lengths)
        return {
            "size": st.size,
            "capacity": st.capacity,
            "index_bytes": st.index_bytes,
            "row_bytes": st.row_bytes,
            "rows_allocated": st.rows_allocated,
            "row_stride": st.row_stride,
            "num_shards": st.num_shards,
            "max_probe_groups": st.max_probe_groups,
            "evictions": st.evictions,
            "rows_in_use": st.rows_in_use,
            "read_block": st.read_block,
            "write_block": st.write_block,
            "fetches_ahead": st.fetches_ahead,
            "timestamps_apart": st.timestamps_apart,
            "filter_counts": st.filter_counts,
            "filter_bytes": st.filter_bytes,
            "filter_forgotten": st.filter_forgotten,
        }

    def lookup(self, ids, out):
        cdef ArrayView id_view, out_view
        self._ids_and_rows(ids, out, &id_view, &out_view, "out", True)
        with nogil:
            self._t.get().lookup(<const int64_t*>id_view.data, id_view.rows, <float*>out_view.data)

    def contains(self, const int64_t[::1] ids):
        cdef Py_ssize_t n = ids.shape[0]
        result = np.empty(n, dtype=np.bool_)
        cdef uint8_t[::1] out = result.view(np.uint8)
        with nogil:
            self._t.get().contains(&ids[0], n, &out[0])
        return result

    def lookup_entries(self, const int64_t[::1] ids):
        """Returns (values [N, dim], state [N, state_dim], timestamps [N], found [N])."""
        cdef Py_ssize_t n = ids.shape[0]
        values = np.empty((n, self.dim), dtype=np.float32)
        state = np.empty((n, self.state_dim), dtype=np.float32)
        ts = np.empty(n, dtype=np.int64)
        found = np.empty(n, dtype=np.bool_)
        cdef float[:, ::1] v = values
        cdef float[:, ::1] s = state
        cdef int64_t[::1] t = ts
        cdef uint8_t[::1] f = found.view(np.uint8)
        # state may have zero columns; its data pointer is never dereferenced then.
        cdef float* sp = &s[0, 0] if self.state_dim > 0 and n > 0 else NULL
        with nogil:
            self._t.get().lookup_entries(&ids[0], n, &v[0, 0], sp, &t[0], &f[0])
        return values, state, ts, found

    def assign(self, ids, values, int64_t ts):
        cdef ArrayView id_view, value_view
        self._ids_and_rows(ids, values, &id_view, &value_view, "values")
        with nogil:
            self._t.get().assign(<const int64_t*>id_view.data, id_view.rows, <const float*>value_view.data, ts)

    def assign_add(self, ids, values, int64_t ts):
        cdef ArrayView id_view, value_view
        self._ids_and_rows(ids, values, &id_view, &value_view, "values")
        with nogil:
            self._t.get().assign_add(<const int64_t*>id_view.data, id_view.rows, <const float*>value_view.data, ts)

    def apply_gradients(self, ids, grads, learning_rates, int64_t global_step, int64_t ts, bint dedup):
        cdef ArrayView id_view, grad_view, rate_view
        self._ids_and_rows(ids, grads, &id_view, &grad_view, "grads")
        _view(learning_rates, b'f', 1, False, &rate_view, "learning_rates")
        with nogil:
            self._t.get().apply_gradients(<const int64_t*>id_view.data, id_view.rows, <const float*>grad_view.data,
                                          <const float*>rate_view.data, rate_view.rows, global_step, ts, dedup)

    cdef int _ids_and_rows(self, ids, rows, ArrayView* id_view, ArrayView* row_view, str what,
                           bint writable=False) except -1:
        """A call's ids and rows (as many as ids, of the table's dim: a write's values or
        gradients, or a lookup's out, ``writable``), read as _view reads them."""
        _view(ids, b'q', 1, False, id_view, "ids")
        _view(rows, b'f', 2, writable, row_view, what)
        _check_rows(id_view.rows, row_view.rows, row_view.cols, self.dim, what)
        return 0

    def reinitialize(self, const int64_t[::1] ids, int64_t ts):
        cdef Py_ssize_t n = ids.shape[0]
        status = np.empty(n, dtype=np.int32)
        cdef int32_t[::1] st = status
        with nogil:
            self._t.get().reinitialize(&ids[0], n, ts, &st[0])
        return status


def lookup_tables(list tables, list ids_arrays, list outs):
    """Looks several tables up in one call: table k's ``ids_arrays[k]``, their rows to
    ``outs[k]``, a float32 array of as many rows of the table's dim, filled in place."""
    if not len(tables) == len(ids_arrays) == len(outs):
        raise ValueError(f"lookup_tables: {len(tables)} tables, {len(ids_arrays)} ids arrays, {len(outs)} outs")
    cdef vector[TableRead] c_parts
    cdef TableRead part
    cdef Table t
    cdef ArrayView ids, out
    cdef Py_ssize_t k
    for k in range(len(tables)):
        t = tables[k]
        t._ids_and_rows(ids_arrays[k], outs[k], &ids, &out, "out", True)
        part.table = t._t.get()
        part.ids = <const int64_t*>ids.data if ids.rows > 0 else NULL
        part.n = ids.rows
        part.out = <float*>out.data if ids.rows > 0 else NULL
        c_parts.push_back(part)
    with nogil:
        c_lookup_tables(c_parts)


_WRITE_KINDS = {"assign": WriteKind.kAssign, "assign_add": WriteKind.kAssignAdd,
                "apply_gradients": WriteKind.kApplyGradients}


def _by_address(list tables):
    """The distinct tables of ``tables`` in the order of their cores' addresses: the order
    writes to several tables take the tables' write gates in (HeldLayouts)."""
    cdef Table t
    found = {}
    for table in tables:
        t = table
        found[<uintptr_t>t._t.get()] = t
    return [found[k] for k in sorted(found)]


# How long a save waits for writes at a time before it looks for an interrupt (Ctrl-C).
cdef int64_t _SIGNAL_CHECK_NS = 50 * 1000 * 1000


def hold_writes(list tables, list held):
    """Wait for the writes under way on ``tables`` and hold off the next ones (a save:
    EmbeddingTable::hold_writes), appending each table to ``held`` as it is held, with no
    Python code in between: an interrupt after the call finds every held table there, for
    release_writes(held). An interrupt while it waits raises (KeyboardInterrupt)."""
    cdef Table t
    cdef cbool taken
    for t in _by_address(tables):
        taken = False
        while not taken:
            with nogil:
                taken = t._t.get().try_hold_writes_for(nanoseconds(_SIGNAL_CHECK_NS))
            if taken:
                held.append(t)
            else:
                PyErr_CheckSignals()


def release_writes(list held):
    """Let the writes held off by hold_writes go on, emptying ``held``."""
    cdef Table t
    while held:
        t = held.pop()
        t._t.get().release_writes()


def write_tables(list parts, int64_t global_step, int64_t ts, bint dedup):
    """Writes to several tables, all or none. ``parts``: ``(table, kind, ids, rows,
    learning_rates)`` per table, ``kind`` one of "assign", "assign_add", "apply_gradients"
    (``learning_rates`` None for the other two); rows hold ``len(ids)`` rows of the table's dim."""
    cdef vector[TablePart] c_parts
    cdef TablePart part
    cdef Table t
    cdef ArrayView ids, rows, lrs
    for table, kind, id_array, row_array, lr_array in parts:
        t = table
        t._ids_and_rows(id_array, row_array, &ids, &rows, "rows")
        part.table = t._t.get()
        part.kind = _WRITE_KINDS[kind]
        part.ids = <const int64_t*>ids.data if ids.rows > 0 else NULL
        part.n = ids.rows
        part.rows = <const float*>rows.data if ids.rows > 0 else NULL
        part.lrs = NULL
        part.n_lrs = 0
        if lr_array is not None:
            _view(lr_array, b'f', 1, False, &lrs, "learning_rates")
            part.lrs = <const float*>lrs.data if lrs.rows > 0 else NULL
            part.n_lrs = lrs.rows
        c_parts.push_back(part)
    with nogil:
        c_write_tables(c_parts, global_step, ts, dedup)


cdef FusedLayout _layout(list tables, const int32_t[::1] fused_slot_size, int64_t num_shards, Py_ssize_t n_ids) except *:
    cdef vector[int] dims
    cdef Table t
    for t in tables:
        dims.push_back(t.dim)
    cdef FusedLayout layout
    cdef Py_ssize_t n_fss = fused_slot_size.shape[0]
    with nogil:
        layout = fused_layout(dims, &fused_slot_size[0], n_fss, num_shards, n_ids)
    return layout


cdef _offsets(FusedLayout& layout):
    return (np.asarray(layout.recv_splits, dtype=np.int32),
            np.asarray(layout.id_offsets, dtype=np.int32),
            np.asarray(layout.emb_offsets, dtype=np.int32))


cdef _refuse_overlap(str a_name, const void* a, size_t a_bytes, str b_name, const void* b, size_t b_bytes):
    """ValueError if the bytes [a, a + a_bytes) and [b, b + b_bytes) (an output among them)
    overlap: a kernel would read what it has written. (Compared as addresses: the arrays
    are contiguous, and np.may_share_memory took more time than a small call's work.)"""
    cdef uintptr_t x = <uintptr_t>a, y = <uintptr_t>b
    if a_bytes and b_bytes and x < y + b_bytes and y < x + a_bytes:
        raise ValueError(f"{a_name} and {b_name} must not share memory")


def route_ids(const int64_t[::1] ids, int64_t world, bint dedup, sent_out=None, position_out=None):
    """(sent, counts, position) of ids routed to ``world`` owners (route.h). ``sent_out`` and
    ``position_out``: int64 arrays of len(ids) to write them into (a caller's reused memory:
    fresh large arrays cost a page fault per 4 KiB)."""
    cdef Py_ssize_t n = ids.shape[0]
    sent_array = np.empty(n, dtype=np.int64) if sent_out is None else sent_out
    counts_array = np.empty(max(world, 0), dtype=np.int64)
    position_array = np.empty(n, dtype=np.int64) if position_out is None else position_out
    cdef int64_t[::1] sent = sent_array
    cdef int64_t[::1] counts = counts_array
    cdef int64_t[::1] position = position_array
    if sent.shape[0] != n or position.shape[0] != n:
        raise ValueError(f"sent_out and position_out must have {n} values")
    if n:
        _refuse_overlap("ids", &ids[0], n * sizeof(int64_t), "sent_out", &sent[0], n * sizeof(int64_t))
        _refuse_overlap("ids", &ids[0], n * sizeof(int64_t), "position_out", &position[0], n * sizeof(int64_t))
        _refuse_overlap("sent_out", &sent[0], n * sizeof(int64_t), "position_out", &position[0], n * sizeof(int64_t))
    cdef size_t m
    with nogil:
        m = c_route_ids(&ids[0] if n else NULL, n, world, dedup, &sent[0] if n else NULL,
                        &counts[0] if world > 0 else NULL, &position[0] if n else NULL)
    return sent_array[:m], counts_array, position_array


def route_tables(list ids_list, int64_t world, list dedup, int64_t[::1] sent_out, int64_t[::1] position_out):
    """(counts, sent_of): route_ids for each table's ids in one call. Table t's sent ids
    and positions are written into ``sent_out`` and ``position_out`` (int64, room for all
    the ids) from the sum of the earlier tables' ids on; ``counts[w, t]``: how many of them
    go to owner w; ``sent_of[t]``: how many go in all."""
    cdef Py_ssize_t k = len(ids_list), total = 0, t
    if len(dedup) != k:
        raise ValueError(f"dedup must have one flag per table: {k} tables, {len(dedup)} flags")
    cdef vector[int64_t*] id_pointers
    cdef vector[size_t] sizes
    cdef vector[uint8_t] once
    cdef const int64_t[::1] ids
    # Values go to push_back through typed variables: a conditional expression handed to it
    # went in as 0 (Cython 3.3 passes it through a temporary reference).
    cdef int64_t* first_id
    cdef uint8_t table_once
    for t in range(k):
        ids = ids_list[t]  # the list holds each array while its address is used
        first_id = <int64_t*>&ids[0] if ids.shape[0] else NULL
        table_once = 1 if dedup[t] else 0
        id_pointers.push_back(first_id)
        sizes.push_back(ids.shape[0])
        once.push_back(table_once)
        total += ids.shape[0]
    if sent_out.shape[0] < total or position_out.shape[0] < total:
        raise ValueError(f"sent_out and position_out must have room for {total} ids")
    if total:
        _refuse_overlap("sent_out", &sent_out[0], total * sizeof(int64_t), "position_out", &position_out[0],
                        total * sizeof(int64_t))
        for t in range(k):
            if sizes[t]:
                _refuse_overlap("ids", id_pointers[t], sizes[t] * sizeof(int64_t), "sent_out", &sent_out[0],
                                total * sizeof(int64_t))
                _refuse_overlap("ids", id_pointers[t], sizes[t] * sizeof(int64_t), "position_out",
                                &position_out[0], total * sizeof(int64_t))
    counts_array = np.empty((max(world, 0), k), dtype=np.int64)
    sent_of_array = np.empty(k, dtype=np.int64)
    cdef int64_t[:, ::1] counts = counts_array
    cdef int64_t[::1] sent_of = sent_of_array
    with nogil:
        c_route_tables(<const int64_t* const*>id_pointers.data(), sizes.data(), once.data(), k, world,
                       &sent_out[0] if total else NULL, &position_out[0] if total else NULL,
                       &counts[0, 0] if world > 0 and k else NULL, &sent_of[0] if k else NULL)
    return counts_array, sent_of_array


def sum_rows(const float[:, ::1] rows, const int64_t[::1] position, Py_ssize_t m, out_rows=None):
    """([m, dim], finite): row p the sum of the rows i with position[i] == p, left to right
    (route.h), written into ``out_rows`` when given (float32 [m, dim]); whether every sum
    is finite."""
    cdef Py_ssize_t n = rows.shape[0], dim = rows.shape[1]
    if position.shape[0] != n:
        raise ValueError(f"position must have {n} values, got {position.shape[0]}")
    out_array = np.empty((m, dim), dtype=np.float32) if out_rows is None else out_rows
    cdef float[:, ::1] out = out_array
    if out.shape[0] != m or out.shape[1] != dim:
        raise ValueError(f"out_rows must have shape ({m}, {dim})")
    if n and m * dim:
        _refuse_overlap("rows", &rows[0, 0], n * dim * sizeof(float), "out_rows", &out[0, 0], m * dim * sizeof(float))
        _refuse_overlap("position", &position[0], n * sizeof(int64_t), "out_rows", &out[0, 0], m * dim * sizeof(float))
    cdef cbool finite
    with nogil:
        finite = c_sum_rows_to(&rows[0, 0] if n * dim else NULL, n, dim, &position[0] if n else NULL, m,
                               &out[0, 0] if m * dim else NULL)
    return out_array, finite


def gather_tables(const float[::1] flat, const int64_t[:, ::1] block_start, const int64_t[:, ::1] counts,
                  list positions, list outs):
    """The rows that came back for several tables, into ``outs`` (float32 ``[n, dim]`` each,
    filled in place): row i of ``outs[t]`` is the row of table t's sent id
    ``positions[t][i]``, its sent ids grouped by owner, ``counts[t, w]`` of owner w, whose
    rows start at float ``block_start[t, w]`` of ``flat`` (route.h)."""
    cdef Py_ssize_t k = len(outs), world = counts.shape[1], size = flat.shape[0], t
    if len(positions) != k or counts.shape[0] != k or block_start.shape[0] != k or block_start.shape[1] != world:
        raise ValueError(f"positions, counts and block_start must have one entry per table ({k}), "
                         f"and block_start one column per owner ({world})")
    cdef vector[int64_t*] position_of
    cdef vector[float*] out_of
    cdef vector[size_t] n_of, dim_of
    cdef const int64_t[::1] position
    cdef float[:, ::1] out
    cdef int64_t* first_position
    cdef float* first_out
    for t in range(k):
        position = positions[t]  # the lists hold each array while its address is used
        out = outs[t]
        if out.shape[0] != position.shape[0] or out.shape[1] <= 0:
            raise ValueError(f"outs[{t}] must have {position.shape[0]} rows of a positive dim, "
                             f"got shape ({out.shape[0]}, {out.shape[1]})")
        if out.shape[0] and size:
            _refuse_overlap("flat", &flat[0], size * sizeof(float), "outs", &out[0, 0],
                            out.shape[0] * out.shape[1] * sizeof(float))
        # Through typed variables, as in route_tables.
        first_position = <int64_t*>&position[0] if position.shape[0] else NULL
        first_out = &out[0, 0] if out.shape[0] else NULL
        position_of.push_back(first_position)
        out_of.push_back(first_out)
        n_of.push_back(position.shape[0])
        dim_of.push_back(out.shape[1])
    with nogil:
        c_gather_tables(&flat[0] if size else NULL, size, dim_of.data(), &block_start[0, 0] if world and k else NULL,
                        &counts[0, 0] if world and k else NULL, world, <const int64_t* const*>position_of.data(),
                        n_of.data(), k, out_of.data())


def fused_offsets(list tables, const int32_t[::1] fused_slot_size, int64_t num_shards, Py_ssize_t n_ids):
    """(recv_splits, id_offsets, emb_offsets) of a fused batch; validates its lengths."""
    cdef FusedLayout layout = _layout(tables, fused_slot_size, num_shards, n_ids)
    return _offsets(layout)


def fused_lookup(list tables, const int64_t[::1] ids, const int32_t[::1] fused_slot_size, int64_t num_shards,
                 out=None):
    """Returns (embeddings, recv_splits, id_offsets, emb_offsets) over ``Table`` objects; the
    embeddings written into ``out`` when given (float32, as many as they are)."""
    cdef FusedLayout layout = _layout(tables, fused_slot_size, num_shards, ids.shape[0])
    cdef vector[const EmbeddingTable*] ptrs
    cdef Table t
    for t in tables:
        ptrs.push_back(t._t.get())
    embeddings = np.empty(layout.emb_offsets.back(), dtype=np.float32) if out is None else out
    cdef float[::1] emb = embeddings
    if emb.shape[0] != layout.emb_offsets.back():
        raise ValueError(f"out must have {layout.emb_offsets.back()} floats, got {emb.shape[0]}")
    if out is not None and ids.shape[0] and emb.shape[0]:
        _refuse_overlap("ids", &ids[0], ids.shape[0] * sizeof(int64_t), "out", &emb[0], emb.shape[0] * sizeof(float))
    cdef float* ep = &emb[0] if emb.shape[0] > 0 else NULL
    with nogil:
        c_fused_lookup(ptrs, layout, &ids[0], ep)
    return (embeddings,) + _offsets(layout)


def fused_apply_gradient(list tables, const int64_t[::1] ids, const int32_t[::1] fused_slot_size,
                         const float[::1] id_grads, const float[::1] learning_rates, int64_t num_shards,
                         int64_t global_step, int64_t ts, list accumulate):
    """One update per (shard, table) block, with duplicates of table k summed inside a
    block when ``accumulate[k]``; returns (recv_splits, id_offsets, emb_offsets)."""
    cdef FusedLayout layout = _layout(tables, fused_slot_size, num_shards, ids.shape[0])
    cdef vector[uint8_t] c_accumulate = [bool(a) for a in accumulate]
    cdef vector[EmbeddingTable*] ptrs
    cdef Table t
    for t in tables:
        ptrs.push_back(t._t.get())
    cdef Py_ssize_t n_grads = id_grads.shape[0]
    cdef Py_ssize_t n_lrs = learning_rates.shape[0]
    with nogil:
        c_fused_apply_gradients(ptrs, layout, &ids[0], &id_grads[0], n_grads, &learning_rates[0], n_lrs,
                              global_step, ts, c_accumulate)
    return _offsets(layout)


cdef dict _file_info(CheckpointFileInfo info):
    return {"entries": info.entries, "filter_entries": info.filter_entries, "bytes": info.bytes,
            "checksum": f"{info.checksum:016x}"}
