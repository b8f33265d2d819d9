"""``mtht-bench``: a microbenchmark of mtht tables, with a result checksum.

Run ``mtht-bench --help`` for the flags; docs/benchmarks.md explains every number. In short:

* A table is filled with ``--size`` ids (batched ``assign`` of known values), then each op runs
  ``--warmup`` + ``--iterations`` batches of ``--batch_size`` ids drawn from ``--dist`` (uniform,
  or Zipf with exponent ``--zipf_a``) over the filled ids (``lookup_missing``: ids never
  inserted). Each batch is timed alone with ``time.perf_counter``; an op reports the median of the
  per-batch rates (ids/s), their min..max and interquartile range, and GB/s of table rows touched.
* After every batch (outside the timed region) the looked-up or updated rows are summed in
  float64 into the op's checksum, so no work can be skipped and results can be compared: the
  same workload on the ``--baseline`` tables (numpy arrays indexed through a Python dict, and
  through pandas' khash when pandas is installed) must give the same checksum.
* After every write op the touched rows are put back to their filled state (``reinitialize`` then
  ``assign``), so each op starts from the same table and its checksum does not depend on which
  other ops ran, or on the thread count.
* A probe measures what this machine allows: independent random 64-byte reads over a buffer as
  large as the table (in the core, with huge pages where granted), on each thread count. An
  op's ceiling is that rate divided by the cache lines it must touch per id (one index line
  plus the row's lines); each result shows its rate as a percentage of its ceiling.

Everything is importable: :func:`run_benchmark` takes a :class:`BenchConfig` and returns the
result as a dict (the same dict ``--json`` writes).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from absl import app, flags

import mtht
from mtht import _core
from mtht import hash_table as _hash_table
from mtht.multi_type_hash_table import MergedMultiTypeHashTable, MultiTypeHashTable
from mtht._spec import state_floats
from mtht.entry import EMBEDDING_DTYPES, LOAD_FACTOR_RANGE, Compressor, check_num_shards

__all__ = [
    "ALL_OPS", "BASELINE_OPS", "BenchConfig", "run_benchmark", "run_sweep", "format_report",
    "key_to_id", "fill_values", "update_rows", "op_keys", "fused_layout", "main", "run",
    "FETCH_OPS", "check_fetches_ahead", "run_fetches_ahead", "format_fetches_ahead", "fetches_ahead_agree",
]

# 2: restore's ratio to np.load is vs_numpy_load (it was under vs_numpy_save).
SCHEMA_VERSION = 2

ALL_OPS = ("lookup", "lookup_missing", "assign_add", "apply_gradients", "apply_gradients_dedup",
           "fused", "fused_apply_gradient", "multi_slot_lookup", "multi_slot_apply_gradients",
           "merged_slot_lookup", "merged_slot_apply_gradients", "save", "restore", "apply_gradients_capped", "grow")
# Ops the numpy baselines also run.
BASELINE_OPS = ("lookup", "lookup_missing", "assign_add", "apply_gradients", "apply_gradients_dedup")
_WRITE_OPS = ("assign_add", "apply_gradients", "apply_gradients_dedup", "fused_apply_gradient",
              "multi_slot_apply_gradients", "merged_slot_apply_gradients")
_READ_OPS = ("lookup", "lookup_missing", "fused", "multi_slot_lookup", "merged_slot_lookup")
_SLOT_OPS = ("multi_slot_lookup", "multi_slot_apply_gradients", "merged_slot_lookup", "merged_slot_apply_gradients")
# Each op draws its ids from a stream seeded by (seed, its code). The codes are fixed per name,
# not by position, so adding an op leaves every other op's ids and checksum as they were.
_OP_CODE = {"lookup": 1, "lookup_missing": 2, "assign_add": 3, "apply_gradients": 4,
            "apply_gradients_dedup": 5, "fused": 6, "fused_apply_gradient": 7,
            "multi_slot_lookup": 8, "multi_slot_apply_gradients": 9, "save": 10, "restore": 11,
            "apply_gradients_capped": 12, "merged_slot_lookup": 13, "merged_slot_apply_gradients": 14, "grow": 15}
assert set(_OP_CODE) == set(ALL_OPS) and len(set(_OP_CODE.values())) == len(ALL_OPS)
OPTIMIZERS = ("sgd", "adagrad", "adam")
# What the mtht tables' lookups return (Monolith's compressors): the values, fixed_r8's
# 8-bit steps of them, or HashNet's amplitude * tanh(scale * value).
COMPRESSORS = ("fp32", "fixed_r8", "one_bit")
DISTRIBUTIONS = ("uniform", "zipf")

_ADAGRAD_INIT = 0.1
_ADAM_BETA1, _ADAM_BETA2, _ADAM_EPS = 0.9, 0.99, 0.01
_FILL_CHUNK = 1 << 18
_PROBE_BATCH = 1 << 16
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd, so multiplication is a bijection of uint64


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BenchConfig:
    """What to run. The fields mirror the command-line flags."""

    size: int = 1_000_000
    dim: int = 16
    batch_size: int = 65536
    dist: str = "uniform"
    zipf_a: float = 1.1
    optimizer: str = "adagrad"
    learning_rate: float = 0.01
    ops: Sequence[str] = ALL_OPS
    fused_tables: int = 8
    fused_shards: int = 4
    slots: int = 100
    threads: Sequence[int] = ()  # empty: mtht's default count
    iterations: int = 20
    warmup: int = 3
    seed: int = 0
    baseline: bool = False
    baseline_max_size: int = 10_000_000
    max_memory_gb: float = 8.0
    probe: bool = True
    progress: bool = True
    save_dir: Optional[str] = None
    checkpoint_format: str = "mtht"  # save, restore: format= of HashTable.save and restore
    max_load_factor: float = 0.5
    num_shards: Optional[int] = None
    embedding_dtype: str = "float32"  # how the mtht tables keep their values
    compressor: str = "fp32"  # what the mtht tables' lookups return (COMPRESSORS)
    capped_new: float = 0.1  # apply_gradients_capped: the share of each batch's ids that are new
    capped_policy: str = "lru"  # apply_gradients_capped: the table's eviction_policy

    def validate(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.dist not in DISTRIBUTIONS:
            raise ValueError(f"dist must be one of {DISTRIBUTIONS}, got {self.dist!r}")
        if self.dist == "zipf" and not self.zipf_a > 1.0:
            raise ValueError(f"zipf_a must be > 1, got {self.zipf_a}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        lo, hi = LOAD_FACTOR_RANGE
        if not lo <= self.max_load_factor <= hi:
            raise ValueError(f"max_load_factor must be in [{lo}, {hi}], got {self.max_load_factor}")
        check_num_shards(self.num_shards)
        if self.embedding_dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"embedding_dtype must be one of {EMBEDDING_DTYPES}, got {self.embedding_dtype!r}")
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"compressor must be one of {COMPRESSORS}, got {self.compressor!r}")
        unknown = [op for op in self.ops if op not in ALL_OPS]
        if unknown:
            raise ValueError(f"unknown ops {unknown}; known: {', '.join(ALL_OPS)}")
        if self.iterations < 1 or self.warmup < 0:
            raise ValueError("iterations must be >= 1 and warmup >= 0")
        if self.fused_tables < 1 or self.fused_shards < 1 or self.slots < 1:
            raise ValueError("fused_tables, fused_shards and slots must be >= 1")
        if any(not 1 <= int(t) <= MAX_THREADS for t in self.threads):
            raise ValueError(f"thread counts must be from 1 to {MAX_THREADS}, got {list(self.threads)}")
        with np.errstate(over="ignore"):
            if not np.isfinite(np.float32(self.learning_rate)):  # the tables keep it in float32
                raise ValueError(f"learning_rate must be finite in float32, got {self.learning_rate}")
        if not (math.isfinite(self.max_memory_gb) and self.max_memory_gb > 0):
            raise ValueError(f"max_memory_gb must be a positive number, got {self.max_memory_gb}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.size > MAX_SIZE:  # its ids, and the absent ones past them, are int64
            raise ValueError(f"size must be at most {MAX_SIZE:,}, got {self.size:,}")
        memory_gb, memory_is = usable_memory()
        batch_gb = self.batch_arrays_bytes() / 1e9
        limit, limit_is = self.max_memory_gb, f"the memory budget of {self.max_memory_gb:g} GB (--max_memory_gb)"
        if memory_gb and memory_gb < limit:
            limit, limit_is = memory_gb, memory_is
        if batch_gb > limit:
            raise ValueError(f"a batch of {self.batch_size:,} rows of dim {self.dim} takes about {batch_gb:.1f} GB "
                             f"of arrays, more than {limit_is}")
        if not 0.0 <= self.capped_new <= 1.0:
            raise ValueError(f"capped_new must be in [0, 1], got {self.capped_new}")
        if self.capped_policy not in ("lru", "lfu"):
            raise ValueError(f"capped_policy must be 'lru' or 'lfu', got {self.capped_policy!r}")
        if self.checkpoint_format not in ("mtht", "monolith"):
            raise ValueError(f"checkpoint_format must be 'mtht' or 'monolith', got {self.checkpoint_format!r}")

    def thread_counts(self) -> List[int]:
        return [int(t) for t in self.threads] or [default_threads()]

    def batch_arrays_bytes(self) -> int:
        """About what a batch's arrays take: its rows, gradients and outputs."""
        return 4 * self.batch_size * self.dim * 4

    def table_budget_bytes(self) -> float:
        """The memory budget left for tables (and the probe's buffer) beside a batch's arrays."""
        return self.max_memory_gb * 1e9 - self.batch_arrays_bytes()


MAX_THREADS = _core.MAX_NUM_THREADS  # the most mtht.set_num_threads takes
MAX_SIZE = 2**62


def physical_memory_gb() -> Optional[float]:
    """This machine's memory in GB, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (AttributeError, ValueError, OSError):
        return None


def memory_limit_gb() -> Optional[float]:
    """The memory limit of this process's control groups (a container's) in GB, or None."""
    limit = _core.memory_limit()
    return limit / 1e9 if limit else None


def usable_memory() -> Tuple[Optional[float], str]:
    """The memory this process may use in GB (the machine's, or less where its control
    groups set a limit) and what it is, for messages; None where the system does not say."""
    machine, limit = physical_memory_gb(), memory_limit_gb()
    if limit and not (machine and machine <= limit):
        return limit, f"this process's memory limit of {limit:.1f} GB (its control group's)"
    return machine, f"this machine's {machine or 0:.1f} GB of memory"


def default_threads() -> int:
    """The thread count mtht takes when not told: the cores this process may run on, at
    most the CPUs its control groups allow."""
    return _core.default_num_threads()


def cores_available() -> int:
    """The number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Workload: ids, values, batches
# ---------------------------------------------------------------------------------------------
def key_to_id(keys: np.ndarray) -> np.ndarray:
    """The feature id of each key (a bijection of 64-bit integers, so ids look hashed while
    distinct keys give distinct ids). Keys ``0 .. size-1`` are the filled ids."""
    return (np.asarray(keys, dtype=np.int64).view(np.uint64) * _MIX).view(np.int64)


def fill_values(keys: np.ndarray, dim: int) -> np.ndarray:
    """The row the table is filled with for each key: float32 multiples of 1/64 in
    [-0.75, 0.75], so sums of them are exact in float64."""
    keys = np.asarray(keys, dtype=np.int64)
    v = (keys[:, None] * 7 + np.arange(dim, dtype=np.int64)[None, :] * 3) % 97 - 48
    return (v.astype(np.float32) / np.float32(64.0))


def update_rows(batch_size: int, dim: int, seed: int) -> np.ndarray:
    """The rows written by every batch of a write op (gradients, or values of assign_add):
    row ``i`` of a batch is used for the ``i``-th id of that batch."""
    rng = np.random.default_rng([int(seed), 0x6772])
    return (rng.standard_normal((batch_size, dim)) * 0.1).astype(np.float32)


def _draw_keys(rng: np.random.Generator, n: int, size: int, dist: str, zipf_a: float) -> np.ndarray:
    if dist == "uniform":
        return rng.integers(0, size, n, dtype=np.int64)
    # Zipf ranks 1, 2, ... folded into the key range: key 0 is the most frequent.
    return (rng.zipf(zipf_a, n).astype(np.int64) - 1) % size


def op_keys(config: BenchConfig, op: str, size: Optional[int] = None) -> List[np.ndarray]:
    """The keys of every batch (warm-up first) of ``op``: deterministic in (seed, op), the same
    for mtht and the baselines, whichever ops run. ``lookup_missing`` draws keys past the
    filled range; ``save``/``restore`` use one batch for their checksum."""
    size = config.size if size is None else int(size)
    rng = np.random.default_rng([int(config.seed), _OP_CODE[op]])
    n_batches = config.warmup + config.iterations
    batches = [_draw_keys(rng, config.batch_size, size, config.dist, config.zipf_a) for _ in range(n_batches)]
    if op == "lookup_missing":
        batches = [b + size for b in batches]
    if op == "apply_gradients_capped":  # the last ids of each batch new: size, size + 1, ...
        new = capped_new_ids(config)
        for i, b in enumerate(batches):
            b[config.batch_size - new:] = size + i * new + np.arange(new)
    return batches


def capped_new_ids(config: BenchConfig) -> int:
    """How many ids of each batch of apply_gradients_capped are new."""
    return int(round(config.batch_size * config.capped_new))


def fused_layout(keys: np.ndarray, num_tables: int, num_shards: int):
    """Lay a batch out for the fused ops: key ``k`` lives in table ``k % num_tables``; an id
    goes to shard ``id mod num_shards``; blocks ordered ``[shard][table]`` with input order
    kept inside each block. Returns (ordered keys, ordered ids, fused_slot_size int32)."""
    ids = key_to_id(keys)
    block = np.mod(ids, num_shards) * num_tables + keys % num_tables
    order = np.argsort(block, kind="stable")
    fss = np.bincount(block, minlength=num_shards * num_tables).astype(np.int32)
    return keys[order], ids[order], fss


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------
class _PlainProgress:
    """Plain-text stand-in for tqdm: a line at the start and one at the end."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self._total, self._desc, self._enabled = total, desc, enabled
        self._start = time.perf_counter()
        if enabled:
            print(f"  {desc}: {total:,} ...", file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        if self._enabled:
            print(f"  {self._desc}: done in {time.perf_counter() - self._start:.1f} s",
                  file=sys.stderr, flush=True)


def _progress(total: int, desc: str, config: BenchConfig, unit: str = "ids", long_phase: bool = True):
    if not config.progress:
        return _PlainProgress(total, desc, False)
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, desc, long_phase)
    if not sys.stderr.isatty():  # a log file: plain lines, no carriage returns
        return _PlainProgress(total, desc, long_phase)
    return tqdm(total=total, desc=f"  {desc}", unit=unit, unit_scale=True, leave=False,
                file=sys.stderr, dynamic_ncols=True, mininterval=0.2)


# ---------------------------------------------------------------------------------------------
# Machine and memory
# ---------------------------------------------------------------------------------------------
def _read_first(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def machine_info() -> dict:
    cpu = ""
    for line in _read_first("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_gb = physical_memory_gb() or 0.0  # GB of 10^9 bytes, as --max_memory_gb counts them
    limit_gb = memory_limit_gb()
    return {
        "cpu": cpu or platform.processor(),
        "cores_available": cores_available(),
        "cpu_limit": _core.cpu_limit(),
        "memory_limit_gb": None if limit_gb is None else round(limit_gb, 1),
        "memory_gb": round(mem_gb, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "transparent_hugepage": _read_first("/sys/kernel/mm/transparent_hugepage/enabled"),
        "load_average": _read_first("/proc/loadavg").split()[:3],
        "MTHT_KERNEL": os.environ.get("MTHT_KERNEL", ""),
    }


class _CpuWatch:
    """How many cores other processes kept busy while something ran: machine-wide busy time
    from /proc/stat minus this process's own CPU time, over the wall time. Linux only; None
    elsewhere."""

    def __init__(self):
        self._start = self._sample()

    @staticmethod
    def _sample():
        line = _read_first("/proc/stat").split("\n", 1)[0].split()
        if not line or line[0] != "cpu":
            return None
        v = [int(x) for x in line[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        busy = sum(v[:8]) - idle  # user nice system idle iowait irq softirq steal
        t = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system, time.perf_counter()

    def other_cores(self) -> Optional[float]:
        end = self._sample()
        if self._start is None or end is None:
            return None
        wall = end[2] - self._start[2]
        if wall < 0.25:  # the kernel counts in clock ticks (10 ms): too coarse for shorter spans
            return None
        other = ((end[0] - self._start[0]) - (end[1] - self._start[1])) / wall
        return min(max(0.0, other), float(os.cpu_count() or 1))


def _state_floats(optimizer: str, dim: int) -> int:
    return state_floats(optimizer, dim)


def _mtht_bytes_estimate(config: BenchConfig, n: int) -> int:
    """Bytes of an mtht table of n entries: measured row stride plus the index at its lowest load."""
    try:
        t = _make_table(config, 1)
        t.assign(key_to_id(np.zeros(1, np.int64)), np.zeros((1, config.dim), np.float32))
        stride = int(t.stats().get("row_stride", 0)) or None
    except Exception:  # noqa: BLE001 - e.g. an optimizer this build cannot train with
        stride = None
    if stride is None:
        stride = _round_up(4 * (config.dim + _state_floats(config.optimizer, config.dim)), 16)
    return int(n * (stride + 128 / (4 * config.max_load_factor)))  # + the index at its lowest load


def _baseline_bytes_per_entry(config: BenchConfig) -> int:
    # numpy rows + state, plus a dict entry (~100 B with its int objects), plus khash (~24 B)
    return 4 * (config.dim + _state_floats(config.optimizer, config.dim)) + 130


# ---------------------------------------------------------------------------------------------
# The random-access probe
# ---------------------------------------------------------------------------------------------
def random_access_probe(buffer_bytes: int, thread_counts: Sequence[int], reads: int = 20_000_000) -> dict:
    """The machine's random-access ceiling, measured by the core: independent random 64-byte
    reads over a buffer of ``buffer_bytes`` (huge pages where the OS grants them), for each
    thread count. Returns reads/s in total per thread count, and a checksum."""
    result: Dict[str, Any] = {"buffer_bytes": int(buffer_bytes), "reads_per_thread": int(reads), "reads_per_s": {},
                              "checksum": 0}
    for threads in sorted(set(int(t) for t in thread_counts) | {1}):
        rate, checksum = _core.probe_random_reads(int(buffer_bytes), int(reads), threads)
        result["reads_per_s"][str(threads)] = float(rate)
        result["checksum"] += int(checksum)
    result["line64_reads_per_s"] = result["reads_per_s"]["1"]
    return result


def lines_per_id(op: str, dim: int, state: int, value_bytes: int = 4) -> int:
    """Cache lines an op must touch per id at the least: one index line, plus the lines of
    the embedding (lookups, assign_add) or of the embedding and its optimizer state (gradient
    steps), of `value_bytes` a value. The ceiling of an op is the probe's reads/s divided by
    this."""
    values = value_bytes * dim
    row = values if op in _READ_OPS + ("assign_add",) else values + 4 * state
    if op == "lookup_missing":
        return 1
    return 1 + (row + 63) // 64


# ---------------------------------------------------------------------------------------------
# mtht side
# ---------------------------------------------------------------------------------------------
def _optimizer_builder(name: str):
    if name == "sgd":
        return mtht.SgdOptimizer()
    if name == "adagrad":
        return mtht.AdagradOptimizer(initial_accumulator_value=_ADAGRAD_INIT)
    return mtht.AdamOptimizer(beta1=_ADAM_BETA1, beta2=_ADAM_BETA2, epsilon=_ADAM_EPS)


def _compressor(name: str) -> Compressor:
    if name == "fixed_r8":
        return mtht.FixedR8Compressor()
    if name == "one_bit":
        # Its table-wide scale held at 1: a scale moved by one op's steps would stay for the
        # ops after it, whose checksums would then depend on which ops ran before them.
        return mtht.OneBitCompressor(step_size=2**63 - 1)
    return mtht.Fp32Compressor()


def _table_config(config: BenchConfig, capacity: int):
    segment = mtht.CombineAsSegment(config.dim, mtht.ZerosInitializer(), _optimizer_builder(config.optimizer),
                                    _compressor(config.compressor))
    table_config = mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[segment]),
                                                 initial_capacity=int(capacity),
                                                 max_load_factor=config.max_load_factor,
                                                 num_shards=config.num_shards,
                                                 embedding_dtype=config.embedding_dtype)
    return mtht.HashTableConfigInstance(table_config, learning_rate_fns=[config.learning_rate])


def _beside_main_table(config: BenchConfig, what: str) -> str:
    """Why ``what``, as many ids as the main table, does not fit beside it in the memory
    budget; empty if it does."""
    need = _mtht_bytes_estimate(config, config.size) * 2
    if need <= config.table_budget_bytes():
        return ""
    return (f"skipped: {what} beside the main one would need about {need / 1e9:.1f} GB "
            f"(> --max_memory_gb={config.max_memory_gb:g})")


def _make_table(config: BenchConfig, capacity: int):
    return mtht.hash_table_from_config(_table_config(config, capacity))


def _fill_table(table, keys: np.ndarray, dim: int, desc: str, config: BenchConfig) -> float:
    return _fill_tables([(table, keys)], dim, desc, config)


def _fill_tables(tables_and_keys, dim: int, desc: str, config: BenchConfig, chunk: int = _FILL_CHUNK) -> float:
    """Fill each table with the rows of its keys, ``chunk`` at a time, under one progress bar;
    returns seconds."""
    bar = _progress(sum(len(keys) for _, keys in tables_and_keys), desc, config)
    start = time.perf_counter()
    try:
        for table, keys in tables_and_keys:
            for s in range(0, len(keys), chunk):
                k = keys[s:s + chunk]
                table.assign(key_to_id(k), fill_values(k, dim))
                bar.update(len(k))
    finally:
        bar.close()
    return time.perf_counter() - start


def _reset_mtht(table, keys: Union[np.ndarray, List[np.ndarray]], dim: int) -> None:
    """Put the rows of ``keys`` back to their filled state (values and optimizer state)."""
    uk = np.unique(np.concatenate(keys)) if isinstance(keys, list) else np.unique(keys)
    for s in range(0, len(uk), _FILL_CHUNK):
        k = uk[s:s + _FILL_CHUNK]
        ids = key_to_id(k)
        table.reinitialize(ids, req_time=0)
        table.assign(ids, fill_values(k, dim))


def _checksum(a: np.ndarray) -> float:
    return float(np.sum(a, dtype=np.float64))


def _summarise(op: str, impl: str, threads: Optional[int], ids_per_batch: Sequence[int],
               seconds: Sequence[float], checksum: float, bytes_per_id: int, **extra) -> dict:
    rates = np.asarray(ids_per_batch, dtype=np.float64) / np.asarray(seconds, dtype=np.float64)
    q1, med, q3 = (float(x) for x in np.percentile(rates, [25, 50, 75]))
    return {
        "op": op, "impl": impl, "threads": threads, "status": "ok",
        "ids_per_s": med, "ids_per_s_min": float(rates.min()), "ids_per_s_max": float(rates.max()),
        "ids_per_s_q1": q1, "ids_per_s_q3": q3,
        "ids_per_s_overall": float(np.sum(ids_per_batch) / np.sum(seconds)),
        "gb_per_s": med * bytes_per_id / 1e9, "bytes_per_id": int(bytes_per_id),
        "batches_timed": len(rates), "ids_per_batch": int(np.median(ids_per_batch)),
        "seconds": [float(s) for s in seconds], "checksum": float(checksum), **extra,
    }


def _unavailable(op: str, impl: str, threads: Optional[int], reason: str) -> dict:
    return {"op": op, "impl": impl, "threads": threads, "status": "unavailable", "note": reason}


def _bytes_per_id(op: str, dim: int, state: int, value_bytes: int = 4) -> int:
    """Bytes of table rows touched per id: the embedding (`value_bytes` a value) for reads;
    embedding (and optimizer state for gradient steps) read and written for updates; none
    for a lookup of missing ids, which reads only the index."""
    if op == "lookup_missing":
        return 0
    if op in _READ_OPS:
        return value_bytes * dim
    if op == "assign_add":
        return 2 * value_bytes * dim
    return 2 * (value_bytes * dim + 4 * state)


def _value_bytes(embedding_dtype: str) -> int:
    """Bytes of a value in the mtht tables (the baselines keep float32)."""
    return 4 if embedding_dtype == "float32" else 2


def _run_timed(batches: Sequence, warmup: int, step: Callable[[int, object], None],
               after: Callable[[int, object], float], bar) -> tuple:
    seconds, checksum = [], 0.0
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        step(i, b)
        dt = time.perf_counter() - t0
        if i >= warmup:
            seconds.append(dt)
        checksum += after(i, b)
        bar.update(1)
    return seconds, checksum


def _table_step(table, op: str, rows: np.ndarray, out: np.ndarray) -> tuple:
    """``(step, after)`` for one batch ``b`` (the ``i``-th) of a one-table op: ``step(i, b)``
    runs the op (a lookup writes into ``out``; ``rows`` are the updates; a gradient step is
    ``global_step`` i + 1); ``after(i, b)`` returns the checksum of what the batch gave: the
    rows looked up, or, for a write, the batch's rows after it."""
    reads = op in ("lookup", "lookup_missing")
    if reads:
        def step(i, b):
            table.lookup(b, out=out)
    elif op == "assign_add":
        def step(i, b):
            table.assign_add(b, rows)
    else:
        dedup = op == "apply_gradients_dedup"

        def step(i, b):
            table.apply_gradients(b, rows, global_step=i + 1, enable_dedup=dedup)

    def after(i, b):
        return _checksum(out if reads else table.lookup(b, out=out))
    return step, after


class _MthtRunner:
    """Runs the ops on one filled mtht table (and, for the fused ops, K smaller tables)."""

    def __init__(self, config: BenchConfig, table, state_floats: int, notes: List[str]):
        self.c = config
        self.table = table
        self.state = state_floats
        self.notes = notes
        self.rows = update_rows(config.batch_size, config.dim, config.seed)
        self.lr = np.float32(config.learning_rate)
        # The tables of the fused and multi-slot ops: table j holds the keys k % count == j.
        # One set at a time (a set holds as many ids as the main table).
        self.split_count = 0
        self.split_tables: Optional[list] = None
        self.split_reason = ""

    # -- single-table ops ---------------------------------------------------------------------
    def run(self, op: str, threads: int) -> dict:
        c = self.c
        if op in ("fused", "fused_apply_gradient"):
            return self._run_fused(op, threads)
        if op in _SLOT_OPS:
            return self._run_slots(op, threads)
        if op in ("save", "restore"):
            return self._run_checkpoint(op, threads)
        if op == "apply_gradients_capped":
            return self._run_capped(threads)
        if op == "grow":
            return self._run_grow(threads)
        keys = op_keys(c, op)
        ids = [key_to_id(k) for k in keys]
        out = np.empty((c.batch_size, c.dim), dtype=np.float32)
        step, after = _table_step(self.table, op, self.rows, out)
        bar = _progress(len(ids), f"mtht {op} ({threads} thr)", c, unit="batch", long_phase=False)
        try:
            seconds, checksum = _run_timed(ids, c.warmup, step, after, bar)
        finally:
            bar.close()
        if op in _WRITE_OPS:
            _reset_mtht(self.table, keys, c.dim)
        return _summarise(op, "mtht", threads, [c.batch_size] * len(seconds), seconds, checksum,
                          _bytes_per_id(op, c.dim, self.state, _value_bytes(c.embedding_dtype)))

    # -- ops over several tables -------------------------------------------------------------
    def split_into(self, count: int) -> Optional[list]:
        """``count`` tables, table j filled with the keys k % count == j; None (and
        ``split_reason`` says why) when they would not fit in the memory budget."""
        c = self.c
        if self.split_count == count:
            return self.split_tables
        self.split_count, self.split_tables = count, None
        self.split_reason = _beside_main_table(c, "a second table" if count == 1 else f"{count} tables")
        if self.split_reason:
            return None
        keys = [np.arange(k, c.size, count, dtype=np.int64) for k in range(count)]
        tables = [_make_table(c, max(1, len(k))) for k in keys]
        # Each table in writes of its share of a batch, as training fills a slot's table: a
        # table takes as many shards as its writes call for.
        _fill_tables(list(zip(tables, keys)), c.dim, f"fill {count} tables", c, chunk=max(1, c.batch_size // count))
        self.split_tables = tables
        return tables

    def _run_fused(self, op: str, threads: int) -> dict:
        c = self.c
        K, N = c.fused_tables, c.fused_shards
        tables = self.split_into(K)
        if tables is None:
            return _unavailable(op, "mtht", threads, self.split_reason)
        layouts = []
        for keys, ids, fss in (fused_layout(k, K, N) for k in op_keys(c, op)):
            id_offsets = np.concatenate([[0], np.cumsum(fss)]).astype(np.int32)
            layouts.append((keys, ids, (fss, id_offsets, (id_offsets * c.dim).astype(np.int32))))
        lrs = np.full(K, self.lr, dtype=np.float32)

        def fused(i, layout):
            _, ids, (fss, id_offsets, grad_offsets) = layout
            if op == "fused":
                return _hash_table.fused_lookup(tables, ids, fss, N)[0]
            _hash_table.fused_apply_gradient(tables, ids, ids, fss, self.rows[:len(ids)].reshape(-1), id_offsets,
                                             grad_offsets, lrs, 0, i + 1, N)
            return None

        def rows_after(i, layout, emb):
            _, ids, (fss, _, _) = layout
            return [emb if op == "fused" else _hash_table.fused_lookup(tables, ids, fss, N)[0]]

        return self._against_one_table(op, threads, layouts, fused, rows_after, K, fused_tables=K, fused_shards=N)

    def _run_slots(self, op: str, threads: int) -> dict:
        """``--slots`` slots, each batch's ids split among them (by key mod slots), against the
        same ids in one call of the main table: a MultiTypeHashTable of a table per slot
        (``multi_slot_*``), or a MergedMultiTypeHashTable whose slots, of equal configs, share
        one table (``merged_slot_*``)."""
        c = self.c
        S = c.slots
        merged = op.startswith("merged_slot")
        tables = self.split_into(1 if merged else S)
        if tables is None:
            return _unavailable(op, "mtht", threads, self.split_reason)
        names = [f"slot{j:05d}" for j in range(S)]  # sorted in table order
        configs = {name: _table_config(c, 1) for name in names}
        if merged:
            multi: Any = MergedMultiTypeHashTable(
                configs, lambda merged_configs: MultiTypeHashTable(merged_configs, lambda _name, _config: tables[0]))
        else:
            by_name = dict(zip(names, tables))
            multi = MultiTypeHashTable(configs, lambda name, _config: by_name[name])
        reads = op in _READ_OPS
        batches = []
        for keys in op_keys(c, op):
            keys = keys[np.argsort(keys % S, kind="stable")]  # slot by slot, in batch order within one
            counts = np.bincount(keys % S, minlength=S)
            ends = np.cumsum(counts)
            ids = key_to_id(keys)
            slot_ids = {name: ids[end - n:end] for name, n, end in zip(names, counts, ends)}
            slot_grads = {name: (ids[end - n:end], self.rows[end - n:end]) for name, n, end in zip(names, counts, ends)}
            batches.append((keys, ids, (slot_ids, slot_grads)))

        def step(i, batch):
            slot_ids, slot_grads = batch[2]
            if reads:
                return multi.lookup(slot_ids)
            multi.apply_gradients(slot_grads, global_step=i + 1)
            return None

        def rows_after(i, batch, rows):
            return list((rows if reads else multi.lookup(batch[2][0])).values())

        return self._against_one_table(op, threads, batches, step, rows_after, len(tables), slots=S)

    def _against_one_table(self, op: str, threads: int, batches: Sequence, call: Callable, rows_after: Callable,
                           count: int, **extra) -> dict:
        """Times ``call(i, batch)`` on the split tables (``split_into(count)``) against the same
        ids (and gradients) in one call of the main table, batch by batch; a batch is ``(keys,
        ids, anything)``. The checksums sum the rows of the batch's ids after each call:
        ``rows_after(i, batch, what call returned)`` gives them for the split tables. Each timed
        call follows a checksum, as every op's batches do (``run``): the pool's helpers have
        gone back to sleep before each, as between a trainer's calls."""
        c, one = self.c, self.table
        writes = op in _WRITE_OPS
        out = np.empty((c.batch_size, c.dim), dtype=np.float32)
        seconds, one_seconds = [], []
        split_sum = one_sum = 0.0
        bar = _progress(len(batches), f"mtht {op} ({threads} thr)", c, unit="batch", long_phase=False)
        try:
            for i, batch in enumerate(batches):
                ids = batch[1]
                t0 = time.perf_counter()
                result = call(i, batch)
                t1 = time.perf_counter()
                split_sum += sum(_checksum(rows) for rows in rows_after(i, batch, result))
                t2 = time.perf_counter()
                if writes:
                    one.apply_gradients(ids, self.rows[:len(ids)], global_step=i + 1)
                else:
                    one.lookup(ids, out=out)
                t3 = time.perf_counter()
                one_sum += _checksum(one.lookup(ids, out=out) if writes else out)
                if i >= c.warmup:
                    seconds.append(t1 - t0)
                    one_seconds.append(t3 - t2)
                bar.update(1)
        finally:
            bar.close()
        if writes:
            all_keys = np.concatenate([b[0] for b in batches])
            for k, table in enumerate(self.split_tables or []):
                _reset_mtht(table, all_keys[all_keys % count == k], c.dim)
            _reset_mtht(one, all_keys, c.dim)
        n = [c.batch_size] * len(seconds)
        one_rate = float(np.median(np.asarray(n) / np.asarray(one_seconds)))
        res = _summarise(op, "mtht", threads, n, seconds, split_sum, _bytes_per_id(op, c.dim, self.state, _value_bytes(c.embedding_dtype)),
                         one_table_ids_per_s=one_rate, one_table_checksum=float(one_sum), **extra)
        res["vs_one_table"] = res["ids_per_s"] / one_rate
        return res

    def _run_capped(self, threads: int) -> dict:
        """Gradient steps on a table filled to its capacity (``max_entries`` = ``--size``):
        ``--capped_new`` of each batch's ids are new, and each new id evicts an entry (by
        ``--capped_policy``: the one written longest ago, or least often). A table of its
        own, filled anew for each thread count. The checksum sums the rows of the batch's ids
        after each batch: the steps, and which entries the batch's new ids evicted (an evicted
        id of the batch reads zeros)."""
        op, c = "apply_gradients_capped", self.c
        reason = _beside_main_table(c, "a second table")
        if c.batch_size > c.size:
            reason = (f"skipped: a batch of {c.batch_size:,} ids can hold more distinct ids than a table at its "
                      f"capacity of --size={c.size:,} entries")
        if reason:
            return _unavailable(op, "mtht", threads, reason)
        cfg = _table_config(c, c.size)
        cfg.table_config.max_entries = c.size
        cfg.table_config.eviction_policy = c.capped_policy
        cfg.table_config.validate()
        table = mtht.hash_table_from_config(cfg)
        _fill_table(table, np.arange(c.size, dtype=np.int64), c.dim, "fill the capped table", c)
        keys = op_keys(c, op)
        ids = [key_to_id(k) for k in keys]
        new = capped_new_ids(c)
        rows = self.rows
        out = np.empty((c.batch_size, c.dim), dtype=np.float32)

        def step(i, b):
            table.apply_gradients(b, rows, global_step=i + 1)

        def after(i, b):
            return _checksum(table.lookup(b, out=out))

        bar = _progress(len(ids), f"mtht {op} ({threads} thr)", c, unit="batch", long_phase=False)
        try:
            seconds, checksum = _run_timed(ids, c.warmup, step, after, bar)
        finally:
            bar.close()
        return _summarise(op, "mtht", threads, [c.batch_size] * len(seconds), seconds, checksum,
                          _bytes_per_id(op, c.dim, self.state, _value_bytes(c.embedding_dtype)), evictions=int(table.stats()["evictions"]),
                          new_ids_per_batch=new)

    def _run_grow(self, threads: int) -> dict:
        """Gradient steps of ``--batch_size`` new ids (keys 0, 1, 2, ... in order) into a table
        that starts empty with no room reserved (no ``initial_capacity``), until it holds
        ``--size`` ids: the table of a training run, growing as new ids come. Every batch is
        timed, none left out as a warm-up (the growths are what the op measures), and the
        result gives the slowest batches beside the median: ``batch_ms_p99`` and
        ``batch_ms_max``. A table of its own for each thread count. The checksum sums the
        rows of the batch's ids after each batch."""
        op, c = "grow", self.c
        reason = _beside_main_table(c, "a growing table")
        if reason:
            return _unavailable(op, "mtht", threads, reason)
        table = mtht.hash_table_from_config(_table_config(c, 0))
        keys = np.arange(c.size, dtype=np.int64)
        batches = [key_to_id(keys[s:s + c.batch_size]) for s in range(0, c.size, c.batch_size)]
        rows = self.rows
        out = np.empty((c.batch_size, c.dim), dtype=np.float32)

        def step(i, b):
            table.apply_gradients(b, rows[:len(b)], global_step=1)

        def after(i, b):
            return _checksum(table.lookup(b, out=out[:len(b)]))

        bar = _progress(len(batches), f"mtht {op} ({threads} thr)", c, unit="batch", long_phase=False)
        try:
            seconds, checksum = _run_timed(batches, 0, step, after, bar)
        finally:
            bar.close()
        ms = np.asarray(seconds) * 1e3
        st = table.stats()
        return _summarise(op, "mtht", threads, [len(b) for b in batches], seconds, checksum,
                          _bytes_per_id("apply_gradients", c.dim, self.state, _value_bytes(c.embedding_dtype)),
                          batch_ms_median=float(np.median(ms)), batch_ms_p99=float(np.percentile(ms, 99)),
                          batch_ms_max=float(ms.max()), grown_to=int(st["size"]),
                          bytes_per_entry=st["bytes"] / max(1, st["size"]))

    # -- checkpoint ops -----------------------------------------------------------------------
    def _run_checkpoint(self, op: str, threads: int) -> dict:
        c, t = self.c, self.table
        if not (hasattr(t, "save") and hasattr(t, "restore")):
            return _unavailable(op, "mtht", threads, "this version of mtht has no save/restore")
        table_bytes = int(t.stats()["bytes"])
        if 2 * table_bytes > c.table_budget_bytes():
            # restore verifies into a second table before swapping it in
            return _unavailable(op, "mtht", threads, f"skipped: restoring needs about {2 * table_bytes / 1e9:.1f} GB "
                                                     f"(> --max_memory_gb={c.max_memory_gb:g})")
        root = tempfile.mkdtemp(prefix="mtht-bench-", dir=c.save_dir)
        try:
            base = os.path.join(root, "table")
            n = len(t)
            save_s, restore_s = [], []
            # Each repetition is a whole pass over the table: few are needed, none is warm-up.
            reps = 1 if table_bytes > 1e9 else max(1, min(c.iterations, 3))
            for _ in range(reps):
                t0 = time.perf_counter()
                t.save(base, format=c.checkpoint_format)
                t1 = time.perf_counter()
                t.restore(base, format=c.checkpoint_format)
                t2 = time.perf_counter()
                save_s.append(t1 - t0)
                restore_s.append(t2 - t1)
            disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
            keys = op_keys(c, op)[0]
            checksum = _checksum(t.lookup(key_to_id(keys)))
            # The same number of bytes written with numpy.save (and read back), synced to disk.
            blob = np.ones(int(disk), dtype=np.uint8)
            np_path = os.path.join(root, "same-bytes.npy")
            t0 = time.perf_counter()
            with open(np_path, "wb") as f:
                np.save(f, blob)
                f.flush()
                os.fsync(f.fileno())
            np_save_s = time.perf_counter() - t0
            del blob
            t0 = time.perf_counter()
            np.load(np_path)
            np_load_s = time.perf_counter() - t0
            seconds = save_s if op == "save" else restore_s
            np_s = np_save_s if op == "save" else np_load_s
            res = _summarise(op, "mtht", threads, [n] * len(seconds), seconds, checksum,
                             max(1, disk // max(1, n)), checkpoint_bytes=int(disk))
            res["numpy_gb_per_s"] = disk / np_s / 1e9
            res["vs_numpy_save" if op == "save" else "vs_numpy_load"] = res["gb_per_s"] / res["numpy_gb_per_s"]
            return res
        except Exception as e:  # noqa: BLE001 - report, do not abort the whole run
            return _unavailable(op, "mtht", threads, f"failed: {type(e).__name__}: {e}")
        finally:
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Baselines: numpy rows indexed by a Python dict or by pandas' khash
# ---------------------------------------------------------------------------------------------
class _DictIndex:
    name = "numpy+dict"

    def __init__(self, ids: np.ndarray):
        self._d = dict(zip(ids.tolist(), range(len(ids))))

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return np.fromiter(map(self._d.get, ids.tolist(), itertools.repeat(-1, len(ids))), np.int64, len(ids))


class _KhashIndex:
    name = "pandas+numpy"

    def __init__(self, ids: np.ndarray):
        from pandas._libs import hashtable as pd_hashtable  # the khash Int64HashTable

        self._h = pd_hashtable.Int64HashTable(len(ids))
        self._h.map_locations(ids)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self._h.lookup(ids)


def _pandas_available() -> bool:
    try:
        from pandas._libs import hashtable as pd_hashtable  # noqa: F401

        return hasattr(pd_hashtable, "Int64HashTable")
    except ImportError:
        return False


def _occurrence_levels(rows: np.ndarray):
    """Positions of the batch grouped by occurrence rank: level r holds, in input order, the
    (r+1)-th occurrence of every row that occurs more than r times. Each level has unique rows,
    so a vectorised step per level gives one step per occurrence in input order."""
    order = np.argsort(rows, kind="stable")
    sr = rows[order]
    starts = np.flatnonzero(np.r_[True, sr[1:] != sr[:-1]])
    counts = np.diff(np.r_[starts, len(sr)])
    rank = np.arange(len(sr)) - np.repeat(starts, counts)
    by_rank = np.argsort(rank, kind="stable")
    pos = order[by_rank]
    bounds = np.searchsorted(rank[by_rank], np.arange(int(counts.max()) + 1), side="left")
    bounds = np.r_[bounds, len(pos)]
    for r in range(len(bounds) - 1):
        level = pos[bounds[r]:bounds[r + 1]]
        yield np.sort(level)


class _NumpyRows:
    """Embeddings and optimizer state in numpy arrays, row = key; the update rules are the
    table's (float32, same operation order)."""

    def __init__(self, config: BenchConfig, n: int):
        self.c = config
        self.n = n
        self.emb = np.empty((n, config.dim), dtype=np.float32)
        self.lr = np.float32(config.learning_rate)
        opt = config.optimizer
        if opt == "adagrad":
            self.norm = np.empty((n, config.dim), dtype=np.float32)
        elif opt == "adam":
            self.m = np.empty((n, config.dim), dtype=np.float32)
            self.v = np.empty((n, config.dim), dtype=np.float32)
            self.b1p = np.empty(n, dtype=np.float32)
            self.b2p = np.empty(n, dtype=np.float32)
        self.reset(np.arange(n, dtype=np.int64))

    def reset(self, keys: np.ndarray) -> None:
        for s in range(0, len(keys), _FILL_CHUNK):
            k = keys[s:s + _FILL_CHUNK]
            self.emb[k] = fill_values(k, self.c.dim)
            if self.c.optimizer == "adagrad":
                self.norm[k] = np.float32(_ADAGRAD_INIT)
            elif self.c.optimizer == "adam":
                self.m[k] = 0
                self.v[k] = 0
                self.b1p[k] = np.float32(_ADAM_BETA1)
                self.b2p[k] = np.float32(_ADAM_BETA2)

    def lookup(self, rows: np.ndarray, out: np.ndarray) -> None:
        np.take(self.emb, rows, axis=0, out=out)
        missing = rows < 0
        if missing.any():
            out[missing] = 0

    def step(self, rows: np.ndarray, g: np.ndarray) -> None:
        """One optimizer step for unique rows."""
        lr = self.lr
        opt = self.c.optimizer
        w = self.emb[rows]
        if opt == "sgd":
            self.emb[rows] = w - lr * g
        elif opt == "adagrad":
            norm = self.norm[rows] + g * g
            self.norm[rows] = norm
            self.emb[rows] = w - (lr / np.sqrt(norm)) * g
        else:
            b1, b2 = np.float32(_ADAM_BETA1), np.float32(_ADAM_BETA2)
            b1p, b2p = self.b1p[rows], self.b2p[rows]
            lr_t = (np.float64(lr) * np.sqrt(1.0 - b2p.astype(np.float64)) /
                    (1.0 - b1p.astype(np.float64))).astype(np.float32)[:, None]
            m = self.m[rows]
            v = self.v[rows]
            m = m + (g - m) * (np.float32(1) - b1)
            v = v + (g * g - v) * (np.float32(1) - b2)
            self.m[rows] = m
            self.v[rows] = v
            self.emb[rows] = w - (m * lr_t) / (np.sqrt(v) + np.float32(_ADAM_EPS))
            self.b1p[rows] = b1p * b1
            self.b2p[rows] = b2p * b2


class _BaselineRunner:
    def __init__(self, config: BenchConfig, n: int, notes: List[str]):
        self.c = config
        self.n = n
        bar = _progress(n, f"fill baseline numpy rows ({n:,})", config)
        self.store = _NumpyRows(config, n)
        bar.update(n)
        bar.close()
        ids = key_to_id(np.arange(n, dtype=np.int64))
        self.indexes: List[Union[_DictIndex, _KhashIndex]] = []
        t0 = time.perf_counter()
        self.indexes.append(_DictIndex(ids))
        self.fill_seconds = {"numpy+dict": time.perf_counter() - t0}
        if _pandas_available():
            t0 = time.perf_counter()
            self.indexes.append(_KhashIndex(ids))
            self.fill_seconds["pandas+numpy"] = time.perf_counter() - t0
        else:
            notes.append("pandas is not installed: the pandas (khash) + numpy baseline was not run")
        self.rows = update_rows(config.batch_size, config.dim, config.seed)

    def run(self, op: str, index) -> dict:
        c, store = self.c, self.store
        keys = op_keys(c, op, size=self.n)
        ids = [key_to_id(k) for k in keys]
        out = np.empty((c.batch_size, c.dim), dtype=np.float32)
        g_all = self.rows
        if op in ("lookup", "lookup_missing"):
            def step(i, b):
                store.lookup(index.rows(b), out)

            def after(i, b):
                return _checksum(out)
        else:
            def step(i, b):
                r = index.rows(b)
                if (r < 0).any():
                    raise RuntimeError("baseline updates expect every id to be in the table")
                if op == "assign_add":
                    np.add.at(store.emb, r, g_all)
                elif op == "apply_gradients_dedup":
                    uniq, inv = np.unique(r, return_inverse=True)
                    gsum = np.zeros((len(uniq), c.dim), dtype=np.float32)
                    np.add.at(gsum, inv.reshape(-1), g_all)
                    store.step(uniq, gsum)
                else:
                    for level in _occurrence_levels(r):
                        store.step(r[level], g_all[level])

            def after(i, b):
                store.lookup(index.rows(b), out)
                return _checksum(out)
        bar = _progress(len(ids), f"{index.name} {op}", c, unit="batch", long_phase=False)
        try:
            seconds, checksum = _run_timed(ids, c.warmup, step, after, bar)
        finally:
            bar.close()
        if op in _WRITE_OPS:
            store.reset(np.unique(np.concatenate(keys)))
        state = _state_floats(c.optimizer, c.dim)
        return _summarise(op, index.name, 1, [c.batch_size] * len(seconds), seconds, checksum,
                          _bytes_per_id(op, c.dim, state), table_size=self.n)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def _build_info() -> dict:
    try:
        return mtht.build_info()
    except Exception as e:  # noqa: BLE001
        return {"version": getattr(mtht, "__version__", "?"), "error": str(e)}


def _result_head(config: BenchConfig) -> Dict[str, Any]:
    """What every result dict starts with: the schema, build, machine and config (with the
    thread counts it runs), and an empty list of results."""
    head: Dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "build_info": _build_info(),
        "machine": machine_info(),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
        "results": [],
    }
    head["config"]["threads"] = config.thread_counts()
    return head


def run_benchmark(config: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run the benchmark described by ``config``; return the result dict (``--json``'s content).

    ``log`` receives one-line progress messages (the CLI prints them)."""
    config.validate()
    c = config
    notes: List[str] = []
    threads_list = c.thread_counts()
    state = _state_floats(c.optimizer, c.dim)
    result = _result_head(c)
    result["notes"] = notes
    budget = c.table_budget_bytes()
    table_bytes = _mtht_bytes_estimate(c, c.size)

    # 1. The probe, alone in memory, over a buffer the size of the table.
    if c.probe:
        probe_bytes = min(table_bytes, int(budget * 0.9))
        if probe_bytes < table_bytes:
            notes.append(f"probe buffer capped at {probe_bytes / 1e9:.1f} GB by --max_memory_gb")
        log(f"probe: random 64-byte reads over {probe_bytes / 1e6:,.0f} MB")
        try:
            result["probe"] = random_access_probe(probe_bytes, threads_list)
        except MemoryError:
            notes.append(f"probe skipped: its buffer of {probe_bytes / 1e6:,.0f} MB could not be allocated")
            result["probe"] = None
    else:
        result["probe"] = None

    # 2. mtht.
    table = None
    if table_bytes > budget:
        reason = (f"skipped: a {c.size:,}-id table needs about {table_bytes / 1e9:.1f} GB "
                  f"(> --max_memory_gb={c.max_memory_gb:g})")
    else:
        try:
            table = _make_table(c, c.size)
            reason = ""
        except (NotImplementedError, ValueError) as e:
            reason = f"unavailable in this build: {e}"
    mtht_ops = list(c.ops)
    if table is None:
        notes.append(f"mtht: {reason}")
        for threads in threads_list:
            for op in mtht_ops:
                result["results"].append(_unavailable(op, "mtht", threads, reason))
    else:
        fill_s = _fill_table(table, np.arange(c.size, dtype=np.int64), c.dim, f"fill mtht table ({c.size:,} ids)", c)
        st = table.stats()
        result["table"] = {"fill_seconds": fill_s, "fill_ids_per_s": c.size / fill_s,
                           **{k: (int(v) if isinstance(v, (int, np.integer)) else float(v)) for k, v in st.items()}}
        log(f"filled mtht table: {c.size:,} ids in {fill_s:.2f} s, {st['bytes'] / 1e6:,.0f} MB")
        runner = _MthtRunner(c, table, state, notes)
        default_threads_now = mtht.get_num_threads()
        try:
            # Each op runs at every thread count before the next op, so that the thread
            # counts of one op are measured seconds apart, not a whole run apart: this
            # machine class is shared, and the ratio between them is what a user compares.
            for op in mtht_ops:
                for threads in threads_list:
                    mtht.set_num_threads(threads)
                    watch = _CpuWatch()
                    res = runner.run(op, threads)
                    res["other_cpu_cores"] = watch.other_cores()
                    result["results"].append(res)
                    log(_one_line(res))
        finally:
            mtht.set_num_threads(default_threads_now)
        runner.split_tables = None
        del runner
    del table

    # 3. Baselines, after the mtht tables are gone (peak memory is the larger of the two).
    if c.baseline:
        base_ops = [op for op in c.ops if op in BASELINE_OPS]
        per_entry = _baseline_bytes_per_entry(c)
        n = min(c.size, c.baseline_max_size, int(budget * 0.9 // per_entry))
        if n < c.size:
            notes.append(f"baseline tables capped at {n:,} ids (of {c.size:,}) to bound time and memory; "
                         f"a smaller table favours the baseline, so its ratios are conservative")
        if base_ops and n >= 1:
            log(f"baseline: {n:,} ids in numpy arrays" + (" (capped)" if n < c.size else ""))
            base = _BaselineRunner(c, n, notes)
            result["baseline_fill_seconds"] = base.fill_seconds
            for index in base.indexes:
                for op in base_ops:
                    watch = _CpuWatch()
                    res = base.run(op, index)
                    res["other_cpu_cores"] = watch.other_cores()
                    result["results"].append(res)
                    log(_one_line(res))
            del base
    result["load_average_after"] = _read_first("/proc/loadavg").split()[:3]
    _add_ratios(result)
    result["goals"] = _goals(result)
    return result


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _find(results: List[dict], op: str, impl: str, threads: Optional[int] = None) -> Optional[dict]:
    for r in results:
        if r["op"] == op and r["impl"] == impl and r["status"] == "ok" and (threads is None or r["threads"] == threads):
            return r
    return None


def _add_ratios(result: dict) -> None:
    results = result["results"]
    probe = result.get("probe") or {}
    line_rate = probe.get("line64_reads_per_s")
    rates_by_threads = probe.get("reads_per_s") or {}
    state = _state_floats(result["config"]["optimizer"], result["config"]["dim"])
    one_thread = {r["op"]: r for r in results if r["impl"] == "mtht" and r["status"] == "ok" and r["threads"] == 1}
    for r in results:
        if r["status"] != "ok":
            continue
        threads = r["threads"] or 1
        if line_rate and r["op"] not in ("save", "restore"):
            r["pct_of_probe_per_thread"] = 100.0 * r["ids_per_s"] / threads / line_rate
            probe_rate = rates_by_threads.get(str(threads))
            if probe_rate:
                lines = lines_per_id(r["op"], result["config"]["dim"], state,
                                     _value_bytes(result["config"].get("embedding_dtype", "float32")))
                r["lines_per_id"] = lines
                r["ceiling_ids_per_s"] = probe_rate / lines
                r["pct_of_ceiling"] = 100.0 * r["ids_per_s"] / r["ceiling_ids_per_s"]
        if r["impl"] != "mtht":
            continue
        for impl, key in (("numpy+dict", "vs_numpy_dict"), ("pandas+numpy", "vs_pandas_numpy")):
            b = _find(results, r["op"], impl)
            if b is not None:
                r[key] = r["ids_per_s"] / b["ids_per_s"]
                if b.get("table_size") == result["config"]["size"] and not _unlike_the_baselines(result["config"]):
                    r[key.replace("vs_", "checksum_matches_")] = _close(r["checksum"], b["checksum"])
        base = one_thread.get(r["op"])
        if base is not None and threads > 1:
            r["vs_one_thread"] = r["ids_per_s"] / base["ids_per_s"]


def _unlike_the_baselines(config: dict) -> str:
    """Why the mtht tables' sums differ from the baselines' (which keep float32 values and
    return them as they are), or "" where they should agree."""
    dtype, compressor = config.get("embedding_dtype", "float32"), config.get("compressor", "fp32")
    if dtype != "float32":
        return f"{dtype} values in mtht, float32 in the baselines"
    if compressor != "fp32":
        return f"{compressor} lookups and steps in mtht, raw values in the baselines"
    return ""


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    if not (math.isfinite(a) and math.isfinite(b)):  # diverged alike (NaN, or Inf of one sign), or not
        return (math.isnan(a) and math.isnan(b)) or a == b
    return abs(a - b) <= rel * max(1.0, abs(a), abs(b))


_GOAL_SIZES, _GOAL_BATCH = (1_000_000, 10_000_000), 65536  # the workloads the goals are set for


def _goals(result: dict) -> List[dict]:
    """The performance goals of mtht, checked against this run (where it has the numbers)."""
    results = result["results"]
    goals = []
    mt = [r for r in results if r["impl"] == "mtht" and r["status"] == "ok"]
    threads_seen = sorted({r["threads"] for r in mt})
    for t in threads_seen:
        for impl, key, need in (("numpy+dict", "vs_numpy_dict", 20.0), ("pandas+numpy", "vs_pandas_numpy", 3.0)):
            look = _find(results, "lookup", "mtht", t)
            if look and key in look:
                goals.append(_goal(f"lookup >= {need:g}x {impl} ({t} thr)", look[key], need))
            for apply_op in ("apply_gradients", "apply_gradients_dedup"):
                a = _find(results, apply_op, "mtht", t)
                bl, ba = _find(results, "lookup", impl), _find(results, apply_op, impl)
                if look and a and bl and ba:
                    ratio = (1 / bl["ids_per_s"] + 1 / ba["ids_per_s"]) / (1 / look["ids_per_s"] + 1 / a["ids_per_s"])
                    goals.append(_goal(f"lookup + {apply_op} >= {need:g}x {impl} ({t} thr)", ratio, need))
        for op in ("lookup", "apply_gradients", "apply_gradients_dedup"):
            r = _find(results, op, "mtht", t)
            if r and "pct_of_ceiling" in r:
                goals.append(_goal(f"{op} >= 50% of the random-access ceiling ({t} thr)", r["pct_of_ceiling"], 50.0,
                                   unit="%"))
        for op in ("fused", "fused_apply_gradient"):
            r = _find(results, op, "mtht", t)
            if r:
                goals.append(_goal(f"{op} >= 0.8x the same ids in one table ({t} thr)", r["vs_one_table"], 0.8))
    if 1 in threads_seen and 2 in threads_seen:
        probe = (result.get("probe") or {}).get("reads_per_s") or {}
        if "1" in probe and "2" in probe:
            result["probe_two_thread_scaling"] = probe["2"] / probe["1"]
        for op in ("lookup", "apply_gradients", "apply_gradients_dedup", "assign_add"):
            r = _find(results, op, "mtht", 2)
            if r and "vs_one_thread" in r:
                probe_scaling = result.get("probe_two_thread_scaling")
                beside = f" (the probe: {probe_scaling:.2f}x)" if probe_scaling is not None else ""
                goals.append(_goal(f"{op}: 2 threads >= 1.7x one thread{beside}", r["vs_one_thread"], 1.7))
    return goals


def _goal_value(goal: dict) -> str:
    """The value of a goal as printed: rounded, but never to the bound it misses or meets
    (49.6% of a 50% goal prints as 49.6%, not 50%)."""
    unit, value, need = goal["unit"], goal["value"], goal["need"]
    for digits in ((0, 1, 2) if unit == "%" else (2, 3, 4)):
        text = f"{value:.{digits}f}"
        if (float(text) >= need) == goal["met"]:
            break
    return f"{text}%" if unit == "%" else f"{text}x"


def _goal(name: str, value: float, need: float, unit: str = "x") -> dict:
    return {"goal": name, "value": float(value), "need": need, "unit": unit, "met": bool(value >= need)}


# ---------------------------------------------------------------------------------------------
# Fetch distances side by side (--fetches_ahead)
# ---------------------------------------------------------------------------------------------
FETCH_OPS = BASELINE_OPS  # the ops of one table, which --fetches_ahead compares
FETCHES_AHEAD_RANGE = (1, 256)  # what MTHT_FETCHES_AHEAD takes


def check_fetches_ahead(config: BenchConfig, values: Sequence[int]) -> None:
    """ValueError unless :func:`run_fetches_ahead` can run: two or more distinct values that
    MTHT_FETCHES_AHEAD takes, an op of one table, and a table per value within the budget."""
    config.validate()
    lo, hi = FETCHES_AHEAD_RANGE
    if len(values) < 2 or len(set(values)) != len(values) or not all(lo <= int(v) <= hi for v in values):
        raise ValueError(f"fetches_ahead needs two or more distinct values from {lo} to {hi}, got {list(values)}")
    if not any(op in FETCH_OPS for op in config.ops):
        raise ValueError(f"fetches_ahead compares the ops of one table ({', '.join(FETCH_OPS)}); none was asked for")
    need = _mtht_bytes_estimate(config, config.size) * len(values)
    if need > config.table_budget_bytes():
        raise ValueError(f"{len(values)} tables of {config.size:,} ids need about {need / 1e9:.1f} GB "
                         f"(> --max_memory_gb={config.max_memory_gb:g})")


def run_fetches_ahead(config: BenchConfig, values: Sequence[int], log: Callable[[str], None] = lambda s: None) -> dict:
    """Compare ``MTHT_FETCHES_AHEAD`` values side by side: a table built under each (a table
    reads the variable when it is built) and filled alike, then each op's batches taken by
    every table in turn, the order rotating from batch to batch, so that the machine's swings
    fall on all of them alike. Per op and thread count, each table's result as
    :func:`run_benchmark` gives it, with ``fetches_ahead`` and ``vs_first``: the median of
    its per-batch rates over those of the first value's table. The ops are those of
    ``config.ops`` in :data:`FETCH_OPS`; ``default`` is the distance of a table built without
    the variable."""
    check_fetches_ahead(config, values)
    c = config
    values = [int(v) for v in values]
    ops = [op for op in c.ops if op in FETCH_OPS]
    threads_list = c.thread_counts()
    result = _result_head(c)
    result.update(compare="fetches_ahead", values=values, tables=[])
    keys = np.arange(c.size, dtype=np.int64)
    tables = []
    saved = os.environ.pop("MTHT_FETCHES_AHEAD", None)
    try:
        result["default"] = int(_make_table(c, 1).stats()["fetches_ahead"])  # a table's without the variable
        for v in values:
            os.environ["MTHT_FETCHES_AHEAD"] = str(v)
            table = _make_table(c, c.size)
            _fill_table(table, keys, c.dim, f"fill the table of {v} fetches ahead", c)
            st = table.stats()
            result["tables"].append({"fetches_ahead": int(st["fetches_ahead"]), "read_block": int(st["read_block"]),
                                     "write_block": int(st["write_block"])})
            tables.append(table)
    finally:
        if saved is None:
            os.environ.pop("MTHT_FETCHES_AHEAD", None)
        else:
            os.environ["MTHT_FETCHES_AHEAD"] = saved
    rows = update_rows(c.batch_size, c.dim, c.seed)
    out = np.empty((c.batch_size, c.dim), dtype=np.float32)
    state = _state_floats(c.optimizer, c.dim)
    default_threads_now = mtht.get_num_threads()
    try:
        for op in ops:
            op_key_list = op_keys(c, op)
            batches = [key_to_id(k) for k in op_key_list]
            for threads in threads_list:
                mtht.set_num_threads(threads)
                seconds: List[List[float]] = [[] for _ in tables]
                checksums = [0.0] * len(tables)
                bar = _progress(len(batches), f"{op} ({threads} thr), {len(tables)} tables in turn", c,
                                unit="batch", long_phase=False)
                steps = [_table_step(t, op, rows, out) for t in tables]
                try:
                    for i, b in enumerate(batches):
                        for j in [(i + k) % len(tables) for k in range(len(tables))]:  # batch i: table i first
                            step, after = steps[j]
                            t0 = time.perf_counter()
                            step(i, b)
                            dt = time.perf_counter() - t0
                            if i >= c.warmup:
                                seconds[j].append(dt)
                            checksums[j] += after(i, b)
                        bar.update(1)
                finally:
                    bar.close()
                if op in _WRITE_OPS:
                    for t in tables:
                        _reset_mtht(t, op_key_list, c.dim)
                first = np.asarray(seconds[0])
                for v, secs, checksum in zip(values, seconds, checksums):
                    res = _summarise(op, "mtht", threads, [c.batch_size] * len(secs), secs, checksum,
                                     _bytes_per_id(op, c.dim, state, _value_bytes(c.embedding_dtype)),
                                     fetches_ahead=v, vs_first=float(np.median(first / np.asarray(secs))))
                    result["results"].append(res)
                    log(_one_line(res) + f"  ({v} fetches ahead)")
    finally:
        mtht.set_num_threads(default_threads_now)
    return result


def _same_checksum(a: float, b: float) -> bool:
    """Equal to the bit, or both NaN: tables that differ only in their block length hold the
    same values."""
    return a == b or (math.isnan(a) and math.isnan(b))


def fetches_ahead_agree(result: dict) -> bool:
    """Whether every table of :func:`run_fetches_ahead` gave the first one's checksums."""
    first = {(r["op"], r["threads"]): r["checksum"] for r in result["results"]
             if r["fetches_ahead"] == result["values"][0]}
    return all(_same_checksum(r["checksum"], first[r["op"], r["threads"]]) for r in result["results"])


def format_fetches_ahead(result: dict) -> str:
    """The report of :func:`run_fetches_ahead`: per op and thread count, each value's rate and
    its ratio to the first value's; whether the tables' checksums agree; the fastest value."""
    values = result["values"]
    lines = ["fetches ahead side by side (MTHT_FETCHES_AHEAD): a table built under each value, "
             "each batch taken by every table in turn",
             "value  ids per block: reads, writes"]
    default = result.get("default")
    lines += [f"{t['fetches_ahead']:>5}  {t['read_block']}, {t['write_block']}" +
              ("  (the default)" if t["fetches_ahead"] == default else "") for t in result["tables"]]
    head = f"{'op':<22} {'thr':>3}" + "".join(f"  {str(v) + ': M ids/s':>16} {'x' + str(values[0]):>7}" for v in values)
    lines += ["", head, "-" * len(head)]
    rows: Dict[tuple, Dict[int, dict]] = {}
    for r in result["results"]:
        rows.setdefault((r["op"], r["threads"]), {})[r["fetches_ahead"]] = r
    log_ratios: Dict[int, List[float]] = {v: [] for v in values}
    for (op, threads), by_value in rows.items():
        line = f"{op:<22} {threads:>3}"
        for v in values:
            r = by_value[v]
            line += f"  {r['ids_per_s'] / 1e6:>16.2f} {r['vs_first']:>6.2f}x"
            log_ratios[v].append(math.log(r["vs_first"]))
        lines.append(line)
    lines.append("")
    lines.append("checksums: the tables agree" if fetches_ahead_agree(result) else
                 "checksums: the tables DIFFER (the block length must not change results: please report this)")
    mean = {v: math.exp(sum(x) / len(x)) for v, x in log_ratios.items() if x}
    best = max(mean, key=lambda v: mean[v])
    lines.append(f"against {values[0]}, the geometric mean of each value's ratios above: " +
                 ", ".join(f"{v} {m:.2f}x" for v, m in mean.items()))
    lines.append(f"fastest: {best} fetches ahead" +
                 (", the default" if best == default else
                  f"; MTHT_FETCHES_AHEAD={best} in the environment of a process makes the tables it builds use it"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Sweeps and the plot
# ---------------------------------------------------------------------------------------------
def run_sweep(config: BenchConfig, sweep: str, values: Sequence[int], plot: Optional[str],
              log: Callable[[str], None] = lambda s: None) -> dict:
    """Run the benchmark once per table size (``sweep="size"``) or dim (``"dim"``); plot
    M ids/s against it when ``plot`` names a PNG (needs matplotlib)."""
    if sweep not in ("size", "dim"):
        raise ValueError(f"sweep must be 'size' or 'dim', got {sweep!r}")
    runs = []
    for v in values:
        cfg = dataclasses.replace(config, **{sweep: int(v)})  # type: ignore[arg-type]
        log(f"=== {sweep} = {int(v):,} ===")
        res = run_benchmark(cfg, log)
        runs.append(res)
        log(format_report(res, header=False))
    out: Dict[str, Any] = {"schema": SCHEMA_VERSION, "sweep": sweep, "values": [int(v) for v in values], "runs": runs,
           "build_info": _build_info(), "machine": machine_info(), "plot": None}
    if plot:
        try:
            out["plot"] = plot_sweep(out, plot)
        except ImportError:
            out["plot_note"] = "matplotlib is not installed (pip install 'mtht[bench]'): no plot written"
        except (OSError, ValueError) as e:  # the sweep's results stand without their plot
            out["plot_note"] = f"no plot written to {plot}: {e}"
        if out.get("plot_note"):
            log(out["plot_note"])
    return out


def plot_sweep(sweep_result: dict, path: str) -> str:
    if not any(r["impl"] == "mtht" and r["status"] == "ok" for run in sweep_result["runs"] for r in run["results"]):
        raise ValueError("no value of the sweep ran (see the notes above)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = sweep_result["sweep"]
    runs = sweep_result["runs"]
    cfg = runs[0]["config"]
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    ops = [op for op in ALL_OPS if op not in ("save", "restore", "apply_gradients_capped", "grow")]
    colors = {op: plt.get_cmap("tab20")(i) for i, op in enumerate(ops)}
    thread_counts = sorted({r["threads"] for run in runs for r in run["results"]
                            if r["impl"] == "mtht" and r["status"] == "ok"})
    for threads in thread_counts:
        for op in ops:
            xs, ys = [], []
            for v, run in zip(sweep_result["values"], runs):
                r = _find(run["results"], op, "mtht", threads)
                if r:
                    xs.append(v)
                    ys.append(r["ids_per_s"] / 1e6)
            if xs:
                ax.plot(xs, ys, "-" if threads == thread_counts[-1] else "--", marker="o", color=colors[op],
                        label=f"{op}, {threads} thr")
    for impl, style in (("numpy+dict", ":"), ("pandas+numpy", "-.")):
        xs, ys = [], []
        for v, run in zip(sweep_result["values"], runs):
            r = _find(run["results"], "lookup", impl)
            if r:
                xs.append(v)
                ys.append(r["ids_per_s"] / 1e6)
        if xs:
            ax.plot(xs, ys, style, color="gray", marker="x", label=f"{impl} lookup")
    xs, ys = [], []
    for v, run in zip(sweep_result["values"], runs):
        if run.get("probe"):
            xs.append(v)
            ys.append(run["probe"]["line64_reads_per_s"] / 1e6)
    if xs:
        ax.plot(xs, ys, ":", color="black", label="probe: random 64-B reads (1 thr)")
    if sweep == "size":
        ax.set_xscale("log")
        ax.set_xlabel("table size (ids)")
        title = f"dim {cfg['dim']}"
    else:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("dim")
        title = f"{cfg['size']:,} ids"
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda y, _: f"{y:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_ylabel("M ids/s (median)")
    ax.set_title(f"mtht {runs[0]['build_info'].get('version', '')}: {title}, {cfg['optimizer']}, "
                 f"{cfg['dist']}, batch {cfg['batch_size']:,}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Text report
# ---------------------------------------------------------------------------------------------
def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:8.2f}"


def _one_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"  {r['op']:<26} {r['impl']:<13} {r['note']}"
    return (f"  {r['op']:<26} {r['impl']:<13} thr={r['threads']}  {r['ids_per_s'] / 1e6:.2f} M ids/s  "
            f"checksum {r['checksum']:.6e}")


def format_header(result: dict, swept: Optional[str] = None, values: Sequence[int] = ()) -> str:
    """The build, machine and config lines; for a sweep (``swept``: "size" or "dim"), the
    config line lists the swept values in place of one run's."""
    info = result["build_info"]
    m = result["machine"]
    c = result["config"]
    size = f"{c['size']:,}"
    dim = f"{c['dim']}"
    if swept == "size":
        size = f"swept over {', '.join(f'{v:,}' for v in values)}"
    elif swept == "dim":
        dim = f"swept over {', '.join(str(v) for v in values)}"
    lines = [
        f"mtht {info.get('version', '?')}  compiler: {info.get('compiler', '?')}  flags: {info.get('compile_flags', '?')}",
        f"active kernel: {info.get('active_kernel', '?')}  cpu ISAs: {','.join(info.get('cpu_isas', []))}  "
        f"default threads: {info.get('num_threads', '?')}" + (f"  MTHT_KERNEL={m['MTHT_KERNEL']}" if m.get("MTHT_KERNEL") else ""),
        f"machine: {m['cpu']}, {m['cores_available']} cores"
        + (f" (CPU limit {m['cpu_limit']})" if m.get("cpu_limit") else "") + f", {m['memory_gb']} GB"
        + (f" (memory limit {m['memory_limit_gb']} GB)" if m.get("memory_limit_gb") else "") + f", THP {m['transparent_hugepage']}, "
        f"python {m['python']}, numpy {m['numpy']}, load average {' '.join(m.get('load_average') or ['?'])}",
        f"config: size {size}  dim {dim}  batch {c['batch_size']:,}  dist {c['dist']}"
        + (f" (a={c['zipf_a']:g})" if c['dist'] == "zipf" else "")
        + f"  optimizer {c['optimizer']} (lr {c['learning_rate']:g})  iterations {c['iterations']} (+{c['warmup']} warm-up)"
        f"  threads {','.join(str(t) for t in c['threads'])}  seed {c['seed']}"
        f"  max_load_factor {c.get('max_load_factor', 0.5):g}  num_shards {c.get('num_shards') or 'auto'}"
        + (f"  embedding_dtype {c['embedding_dtype']}" if c.get("embedding_dtype", "float32") != "float32" else "")
        + (f"  compressor {c['compressor']}" if c.get("compressor", "fp32") != "fp32" else ""),
    ]
    return "\n".join(lines)


def format_report(result: dict, header: bool = True) -> str:
    lines = [format_header(result)] if header else []
    probe = result.get("probe")
    if probe:
        per = ", ".join(f"{t} thr {rate / 1e6:.1f} M/s" for t, rate in sorted(probe["reads_per_s"].items()))
        lines.append(f"probe (random 64-B reads over {probe['buffer_bytes'] / 1e6:,.0f} MB): {per}")
    t = result.get("table")
    if t:
        lines.append(f"table: {t['size']:,} ids, {t['bytes'] / t['size']:.0f} B/entry (row stride {t.get('row_stride', '?')}), "
                     f"load {t['load_factor']:.2f}, {t.get('num_shards', '?')} shards, "
                     f"blocks of {t.get('read_block', '?')} ids (reads) / {t.get('write_block', '?')} (writes), "
                     f"filled at {t['fill_ids_per_s'] / 1e6:.1f} M ids/s")
    lines.append("")
    head = (f"{'op':<26} {'impl':<13} {'thr':>3} {'M ids/s':>8}  {'[min .. max]':<17} {'GB/s':>6} "
            f"{'%ceil':>6} {'x dict':>7} {'x khash':>7} {'other':<13} {'busy':>4}  checksum")
    lines.append(head)
    lines.append("-" * len(head))
    for r in result["results"]:
        if r["status"] != "ok":
            lines.append(f"{r['op']:<26} {r['impl']:<13} {r['threads'] or '':>3} {r['note']}")
            continue
        pct = r.get("pct_of_ceiling")
        other = ""
        if "vs_one_table" in r:
            other = f"{r['vs_one_table']:.2f}x 1-table"
        elif "vs_numpy_save" in r:
            other = f"{r['vs_numpy_save']:.2f}x np.save"
        elif "vs_numpy_load" in r:
            other = f"{r['vs_numpy_load']:.2f}x np.load"
        elif "vs_one_thread" in r:
            other = f"{r['vs_one_thread']:.2f}x 1-thr"
        spread = f"[{r['ids_per_s_min'] / 1e6:.2f} .. {r['ids_per_s_max'] / 1e6:.2f}]"
        pct_s = f"{pct:5.0f}%" if pct is not None else ""
        dict_s = f"{r['vs_numpy_dict']:6.1f}x" if "vs_numpy_dict" in r else ""
        khash_s = f"{r['vs_pandas_numpy']:6.1f}x" if "vs_pandas_numpy" in r else ""
        busy_s = f"{r['other_cpu_cores']:.1f}" if r.get("other_cpu_cores") is not None else ""
        lines.append(
            f"{r['op']:<26} {r['impl']:<13} {r['threads']:>3} {_fmt_rate(r['ids_per_s'])}  {spread:<17} "
            f"{r['gb_per_s']:6.2f} {pct_s:>6} {dict_s:>7} {khash_s:>7} {other:<13} {busy_s:>4}  {r['checksum']:.6e}")
        if r["op"] == "apply_gradients_capped":
            lines.append(f"{r['op']:<26} {'all batches':<13} {r['threads']:>3} {_fmt_rate(r['ids_per_s_overall'])}  "
                         f"(total ids / total time: the median above leaves out the batches that scan the "
                         f"table for victims)")
        if r["op"] == "grow":
            lines.append(f"{r['op']:<26} {'batch ms':<13} {r['threads']:>3} median {r['batch_ms_median']:.1f}, "
                         f"99th percentile {r['batch_ms_p99']:.1f}, longest {r['batch_ms_max']:.1f} "
                         f"(from empty to {r['grown_to']:,} ids, {r['bytes_per_entry']:.0f} B/entry at the end)")
    verdict = _checksum_verdict(result)
    if verdict:
        lines.append(verdict)
    lines.append("GB/s counts table rows touched per id: the embedding for lookups (none for missing ids), embedding "
                 "(+ optimizer state for gradient steps) read and written for updates. %ceil: ids/s against the probe's "
                 "reads/s at the same thread count divided by the lines an op must touch per id (one index line + the "
                 "row's). "
                 "busy: cores other processes kept busy during the op (noise).")
    if result.get("load_average_after"):
        lines.append(f"load average at the end: {' '.join(result['load_average_after'])} "
                     f"(other processes running beside the benchmark make the numbers noisy)")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    goals = result.get("goals") or []
    if goals:
        lines.append("")
        lines.append("goals:")
        config = result.get("config", {})
        if config.get("size") not in _GOAL_SIZES or config.get("batch_size") != _GOAL_BATCH:
            lines.append(f"  (set for tables of 1M and 10M ids and batches of {_GOAL_BATCH:,}; on this run's "
                         "workload,")
            lines.append("  costs per call and per table weigh differently, so a miss or a hit here does not "
                         "settle a goal)")
        for g in goals:
            val = _goal_value(g)
            lines.append(f"  [{'met' if g['met'] else 'not met':>7}] {g['goal']}: {val}")
    return "\n".join(lines)


def _checksum_verdict(result: dict) -> str:
    """The report's line on the checksums of mtht against the baselines ('' without them)."""
    mism = [f"{r['op']} ({r['threads']} thr) vs {impl}" for r in result["results"]
            for key, impl in (("checksum_matches_numpy_dict", "numpy+dict"), ("checksum_matches_pandas_numpy", "pandas+numpy"))
            if r.get(key) is False]
    if any(k in r for r in result["results"] for k in ("checksum_matches_numpy_dict", "checksum_matches_pandas_numpy")):
        return "checksums: " + ("mtht and the baselines agree" if not mism else "MISMATCH: " + "; ".join(mism))
    if (unlike := _unlike_the_baselines(result["config"])) and any("vs_numpy_dict" in r for r in result["results"]):
        return f"checksums: not compared with the baselines ({unlike})"
    return ""


def format_sweep(sweep_result: dict) -> str:
    lines = [f"sweep over {sweep_result['sweep']}:",
             f"{'value':>12} {'op':<26} {'thr':>3} {'M ids/s':>8} {'%ceil':>6}"]
    for v, run in zip(sweep_result["values"], sweep_result["runs"]):
        for r in run["results"]:
            if r["impl"] == "mtht" and r["status"] == "ok":
                pct = r.get("pct_of_ceiling")
                lines.append(f"{v:>12,} {r['op']:<26} {r['threads']:>3} {_fmt_rate(r['ids_per_s'])} "
                             f"{(f'{pct:5.0f}%' if pct is not None else ''):>6}")
        lines.extend(f"{v:>12,} {note}" for note in run.get("notes", []) if note.startswith("mtht:"))
        verdict = _checksum_verdict(run)
        if verdict:
            lines.append(f"{v:>12,} {verdict}")
    if sweep_result.get("plot"):
        lines.append(f"plot written to {sweep_result['plot']}")
    if sweep_result.get("plot_note"):
        lines.append(sweep_result["plot_note"])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
FLAGS = flags.FLAGS

flags.DEFINE_integer("size", 1_000_000, "Ids in the table.", lower_bound=1)
flags.DEFINE_integer("dim", 16, "Embedding dimension.", lower_bound=1)
flags.DEFINE_integer("batch_size", 65536, "Ids per batch.", lower_bound=1)
flags.DEFINE_float("max_load_factor", 0.5, "max_load_factor of the mtht tables (speed against index memory).")
flags.DEFINE_float("capped_new", 0.1, "apply_gradients_capped: the share of each batch's ids that are new (each "
                   "evicts an entry of the table filled to its capacity).", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_enum("capped_policy", "lru", ["lru", "lfu"], "apply_gradients_capped: the table's eviction_policy.")
flags.DEFINE_integer("num_shards", None, "num_shards of the mtht tables: a power of two, fixed (fewer make small "
                     "batches cheaper, more spread large writes over more cores); default: chosen by each table.")
flags.DEFINE_enum("dist", "uniform", list(DISTRIBUTIONS), "Distribution of the ids of a batch.")
flags.DEFINE_float("zipf_a", 1.1, "Exponent of the Zipf distribution (> 1).")
flags.DEFINE_enum("optimizer", "adagrad", list(OPTIMIZERS), "Optimizer of the table.")
flags.DEFINE_float("learning_rate", 0.01, "Learning rate of gradient steps.")
flags.DEFINE_list("ops", [], f"Ops to run (default: all): {', '.join(ALL_OPS)}.")
flags.DEFINE_integer("fused_tables", 8, "Tables of the fused ops.", lower_bound=1)
flags.DEFINE_integer("fused_shards", 4, "Shards of the fused ops.", lower_bound=1)
flags.DEFINE_integer("slots", 100, "Slots of the multi_slot ops (a table each) and of the merged_slot ops "
                     "(one table for all).", lower_bound=1)
flags.DEFINE_list("threads", [], "Thread counts to run each op with, e.g. 1,2 (default: mtht's own default, every "
                  "core the process may use).")
flags.DEFINE_integer("iterations", 20, "Timed batches per op.", lower_bound=1)
flags.DEFINE_integer("warmup", 3, "Untimed batches before the timed ones.", lower_bound=0)
flags.DEFINE_integer("seed", 0, "Seed of the ids and gradients.", lower_bound=0)
flags.DEFINE_string("json", None, "Write the results as JSON to this file.")
flags.DEFINE_bool("baseline", False, "Also run the ops on numpy tables indexed by a Python dict "
                  "(and by pandas' khash when pandas is installed) and print the ratios.")
flags.DEFINE_integer("baseline_max_size", 10_000_000, "Largest baseline table (bigger ones take long to fill).",
                     lower_bound=1)
flags.DEFINE_bool("quick", False, "A small, fast run (a few seconds): size 200,000, batch 16,384, "
                  "5 iterations after 1 warm-up batch, with --baseline (with --sweep=size: sizes "
                  "50,000, 200,000 and 1,000,000); flags given explicitly still win.")
flags.DEFINE_enum("sweep", "none", ["none", "size", "dim"], "Run once per table size or per dim.")
flags.DEFINE_list("sweep_sizes", ["1000000", "10000000", "50000000"], "Table sizes of --sweep=size.")
flags.DEFINE_list("sweep_dims", ["8", "16", "32", "64", "128"], "Dims of --sweep=dim.")
flags.DEFINE_string("plot", None, "PNG file of the sweep's plot (default mtht-bench-sweep.png; needs matplotlib).")
flags.DEFINE_float("max_memory_gb", 8.0, "Memory budget: bigger tables are skipped or capped (default 8, or three "
                   "quarters of the memory this process may use, the machine's or its container's limit, if less, "
                   "or if more with --sweep=size but not --quick).")
flags.DEFINE_list("fetches_ahead", [], "Compare values of MTHT_FETCHES_AHEAD (how many lines the batch loops fetch "
                  "ahead) side by side, e.g. 8,16,32: a table built under each, every batch of the ops of one table "
                  "taken by each in turn; prints each value's rates, their ratios to the first's and the fastest.")
flags.DEFINE_bool("probe", True, "Measure the random-access probe.")
flags.DEFINE_bool("progress", True, "Show progress bars (tqdm when installed) and the steps of the run (probe, "
                  "fill, each sweep value's report) on stderr; --noprogress prints the report alone.")
flags.DEFINE_string("save_dir", None, "Directory for the save/restore ops (default: the system temp dir).")
flags.DEFINE_enum("embedding_dtype", "float32", list(EMBEDDING_DTYPES),
                  "How the mtht tables keep their values (float16 and bfloat16: 2 bytes a value).")
flags.DEFINE_enum("compressor", "fp32", list(COMPRESSORS),
                  "What the mtht tables' lookups return: the values (fp32), fixed_r8's 8-bit steps of them, or "
                  "HashNet's (one_bit) amplitude * tanh(value) (its scale held at 1), with its gradient on "
                  "steps.")
flags.DEFINE_enum("checkpoint_format", "mtht", ["mtht", "monolith"],
                  "File format of the save/restore ops: mtht's own, or Monolith's TFRecord files.")

_QUICK = {"size": 200_000, "batch_size": 16384, "iterations": 5, "warmup": 1}
# --quick --sweep=size: table sizes that keep the sweep to a few seconds a value.
_QUICK_SWEEP_SIZES = (50_000, 200_000, 1_000_000)


def _ints(values: Sequence[str], name: str) -> List[int]:
    out = []
    for v in values:
        v = str(v).strip().replace("_", "")
        if v in ("all", ""):
            out.append(default_threads())
            continue
        try:
            x = int(float(v)) if "e" in v.lower() else int(v)
        except (ValueError, OverflowError):  # OverflowError: 1e400 is an infinite float
            raise app.UsageError(f"--{name}: {v!r} is not an integer") from None
        out.append(x)
    return out


def config_from_flags() -> BenchConfig:
    values: Dict[str, Any] = {name: FLAGS[name].value for name in ("size", "dim", "batch_size", "iterations", "warmup")}
    if FLAGS.quick:
        for name, v in _QUICK.items():
            if not FLAGS[name].present:
                values[name] = v
    memory_gb, memory_is = usable_memory()
    max_memory_gb = FLAGS.max_memory_gb
    if FLAGS["max_memory_gb"].present:
        if memory_gb and max_memory_gb > memory_gb:
            raise app.UsageError(f"--max_memory_gb={max_memory_gb:g} is more than {memory_is}")
    elif memory_gb:
        # The default: 8 GB, or three quarters of the memory the process may use if that is
        # less. A size sweep (the default one goes to a 50M-id table, about 9 GB at dim 16)
        # may take three quarters of a larger machine's memory too.
        three_quarters = round(0.75 * memory_gb, 1)
        sweeps_sizes = FLAGS.sweep == "size" and not FLAGS.quick
        max_memory_gb = three_quarters if sweeps_sizes else min(max_memory_gb, three_quarters)
    baseline = FLAGS.baseline
    if FLAGS.quick and not FLAGS["baseline"].present:
        baseline = True
    ops = [op.strip() for op in FLAGS.ops if op.strip()] or list(ALL_OPS)
    threads = _ints(FLAGS.threads, "threads")
    for name, listed in (("ops", ops), ("threads", threads)):
        twice = sorted({v for v in listed if listed.count(v) > 1}, key=str)
        if twice:
            raise app.UsageError(f"--{name} lists {', '.join(map(str, twice))} more than once")
    if FLAGS.sweep != "none" and FLAGS[FLAGS.sweep].present:
        _log(f"note: --{FLAGS.sweep} is not used: --sweep={FLAGS.sweep} runs the values of --sweep_{FLAGS.sweep}s")
    cfg = BenchConfig(
        dist=FLAGS.dist, zipf_a=FLAGS.zipf_a, optimizer=FLAGS.optimizer, learning_rate=FLAGS.learning_rate,
        ops=ops, fused_tables=FLAGS.fused_tables, fused_shards=FLAGS.fused_shards, slots=FLAGS.slots,
        threads=threads, seed=FLAGS.seed, baseline=baseline,
        baseline_max_size=FLAGS.baseline_max_size, max_memory_gb=max_memory_gb, probe=FLAGS.probe,
        progress=FLAGS.progress, save_dir=FLAGS.save_dir, checkpoint_format=FLAGS.checkpoint_format,
        max_load_factor=FLAGS.max_load_factor, embedding_dtype=FLAGS.embedding_dtype, compressor=FLAGS.compressor,
        capped_new=FLAGS.capped_new, capped_policy=FLAGS.capped_policy,
        num_shards=FLAGS.num_shards, **values)
    try:
        cfg.validate()
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    return cfg


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_output_file(path: Optional[str], what: str) -> None:
    """A file the run writes at its end must be writable before the run starts. ``what``
    names it in a refusal: the flag that gave it, or where its default came from."""
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(directory):
        raise app.UsageError(f"{what}: not a file in an existing directory")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise app.UsageError(f"{what}: the file is not writable")
    _check_writable_directory(directory, what)


def _check_writable_directory(directory: str, what: str) -> None:
    """A file can be made in ``directory`` (tried: permissions alone miss read-only file
    systems and root)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise app.UsageError(f"{what}: cannot write in {directory}: {e.strerror or e}") from None


def _sweep_values(cfg: BenchConfig) -> List[int]:
    """The values of --sweep_sizes or --sweep_dims, each checked as the run's flags are,
    before any runs: a bad one is refused before the ones before it have run."""
    name = "sweep_sizes" if FLAGS.sweep == "size" else "sweep_dims"
    values = _ints([v for v in FLAGS[name].value or [] if str(v).strip()], name)
    if name == "sweep_sizes" and FLAGS.quick and not FLAGS[name].present:
        values = list(_QUICK_SWEEP_SIZES)
    if not values or min(values) < 1:
        raise app.UsageError(f"--{name} must list values >= 1, got {FLAGS[name].value}")
    for v in values:
        try:
            dataclasses.replace(cfg, **{FLAGS.sweep: v}).validate()  # type: ignore[arg-type]
        except ValueError as e:
            raise app.UsageError(f"--{name}: {v}: {e}") from None
    return values


def main(argv: Sequence[str]) -> int:
    """The run of ``mtht-bench``: a flag refused is a line saying why and one pointing to
    --help (the flags' listing, which absl prints before a usage error, buried it), an
    interrupt a line, after the run's temporary files are removed."""
    try:
        return _main(argv)
    except app.UsageError as e:
        _log(f"mtht-bench: {e}\n(mtht-bench --help lists the flags)")
        return 1
    except KeyboardInterrupt:
        _log("mtht-bench: interrupted")
        return 130


def _main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cfg = config_from_flags()
    _check_output_file(FLAGS.json, f"--json={FLAGS.json}")
    if cfg.save_dir is not None:
        if not os.path.isdir(cfg.save_dir):
            raise app.UsageError(f"--save_dir={cfg.save_dir}: not an existing directory")
        _check_writable_directory(cfg.save_dir, f"--save_dir={cfg.save_dir}")
    log = _log if cfg.progress else (lambda s: None)
    if FLAGS.fetches_ahead:
        return _compare_fetches_ahead(cfg, log)
    if FLAGS.sweep != "none":
        values = _sweep_values(cfg)
        plot = FLAGS.plot or "mtht-bench-sweep.png"
        if not plot.lower().endswith(".png"):
            raise app.UsageError(f"--plot={plot}: the plot is a PNG file (name it *.png)")
        _check_output_file(plot, f"--plot={plot}" if FLAGS.plot else
                           f"the sweep's plot, {plot} in the current directory (--plot=FILE puts it elsewhere)")
        if FLAGS.json and os.path.realpath(FLAGS.json) == os.path.realpath(plot):
            raise app.UsageError(f"--json and --plot name one file, {plot}")
        if FLAGS.plot and importlib.util.find_spec("matplotlib") is None:
            raise app.UsageError(f"--plot={FLAGS.plot} needs matplotlib: pip install 'mtht[bench]'")
        _note_threads_beyond_the_cores(cfg)
        res = run_sweep(cfg, FLAGS.sweep, values, plot, log=log)
        report = format_header(res["runs"][0], FLAGS.sweep, values) + "\n" + format_sweep(res)
    else:
        if FLAGS.plot:
            raise app.UsageError("--plot is the plot of a sweep: give --sweep=size or --sweep=dim with it")
        _say(format_header(run_header_only(cfg)))
        _note_threads_beyond_the_cores(cfg)
        res = run_benchmark(cfg, log=log)
        report = "\n" + format_report(res, header=False)
    written = _write_json(res)  # before the report, which a closed pipe (| head) may cut short
    _say(report)
    if FLAGS.json and written:
        _say(f"results written to {FLAGS.json}")
    runs = res["runs"] if FLAGS.sweep != "none" else [res]
    if not any(r["impl"] == "mtht" and r["status"] == "ok" for run in runs for r in run["results"]):
        _log("mtht-bench: no op of mtht ran (the notes above say why)")
        return 1
    return 0 if written else 1


def _compare_fetches_ahead(cfg: BenchConfig, log: Callable[[str], None]) -> int:
    """The run of ``--fetches_ahead``: its flags checked, then run_fetches_ahead, its report and
    --json. Exit status 1 if the tables' checksums differ."""
    values = _ints([v for v in FLAGS.fetches_ahead if str(v).strip()], "fetches_ahead")
    for flag, given in (("sweep", FLAGS.sweep != "none"), ("baseline", FLAGS["baseline"].present and FLAGS.baseline),
                        ("plot", FLAGS.plot is not None)):
        if given:
            raise app.UsageError(f"--{flag} does not go with --fetches_ahead, which compares mtht tables alone")
    if FLAGS["ops"].present:
        others = [op for op in cfg.ops if op not in FETCH_OPS]
        if others:
            raise app.UsageError(f"--fetches_ahead compares the ops of one table ({', '.join(FETCH_OPS)}), "
                                 f"not {', '.join(others)}")
    cfg = dataclasses.replace(cfg, ops=[op for op in cfg.ops if op in FETCH_OPS], baseline=False)
    try:
        check_fetches_ahead(cfg, values)
    except ValueError as e:
        raise app.UsageError(f"--fetches_ahead: {e}") from None
    _say(format_header(run_header_only(cfg)))
    _note_threads_beyond_the_cores(cfg)
    try:
        res = run_fetches_ahead(cfg, values, log=log)
    except NotImplementedError as e:  # as run_benchmark reports a table this build cannot make
        _log(f"mtht-bench: the tables are unavailable in this build: {e}")
        return 1
    written = _write_json(res)
    _say("\n" + format_fetches_ahead(res))
    if FLAGS.json and written:
        _say(f"results written to {FLAGS.json}")
    if not fetches_ahead_agree(res):
        _log("mtht-bench: the tables of different fetch distances gave different results")
        return 1
    return 0 if written else 1


def _write_json(res: dict) -> bool:
    """Write ``res`` to --json, if given; False if that failed (said on stderr)."""
    if not FLAGS.json:
        return True
    try:
        with open(FLAGS.json, "w", encoding="utf-8") as f:
            json.dump(json_ready(res), f, indent=1, allow_nan=False)
    except OSError as e:  # checked before the run, but the disk may fill or the file go
        _log(f"error: the results (printed below) could not be written to --json={FLAGS.json}: {e}")
        return False
    return True


def _note_threads_beyond_the_cores(cfg: BenchConfig) -> None:
    cores, limit = cores_available(), _core.cpu_limit()
    most = max(cfg.thread_counts())
    where = f"a CPU limit of {limit}" if limit and limit < cores else f"{cores} cores"
    if most > min(cores, limit or cores):
        probe = f" (the probe alone makes {most} x 20M reads)" if cfg.probe else ""
        _log(f"note: {most} threads on {where} take turns on them{probe}: expect a long run, and rates "
             f"of the cores, not of the threads")


def _say(text: str) -> None:
    """Print to stdout. A reader that went (``| head``) leaves the run going on quietly, so
    that its --json is still written."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def json_ready(value):
    """``value`` with every float that is not finite (a run whose numbers diverged) as None:
    JSON has no NaN or Infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def run_header_only(cfg: BenchConfig) -> dict:
    """The parts of a result that the header prints, before anything runs."""
    c = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
    c["threads"] = cfg.thread_counts()
    return {"build_info": _build_info(), "machine": machine_info(), "config": c}


def run() -> None:
    """Console entry point of ``mtht-bench``."""
    # absl's --help lists the flags of the module sys.argv[0] names, under the text of the
    # __main__ module: under the console script those are the script's, not this module's.
    for flag in FLAGS.get_key_flags_for_module(sys.modules[__name__]):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    script = sys.modules.get("__main__")
    if script is not None and not script.__doc__:
        script.__doc__ = __doc__
    sys.argv = [("--help" if a == "-h" else a) for a in sys.argv]
    # A kill (a job's timeout) ends the run as Ctrl-C does: through the cleanups of the
    # checkpoints it writes, which an unhandled SIGTERM left behind (GBs in the temp dir).
    signal.signal(signal.SIGTERM, _terminated)
    app.run(main, flags_parser=_parse_flags)


_HELP_FLAGS = ("--help", "-?", "--helpshort", "--helpfull", "--helpxml")


def _parse_flags(argv: List[str]) -> List[str]:
    """absl's parse, with a flag it refuses (out of its range, not one of its choices)
    reported as the run's own refusals are, rather than as absl's FATAL lines, and a help
    asked for ending with status 0 (absl ends it with 1, as if it had failed)."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _log(f"mtht-bench: {e}\n(mtht-bench --help lists the flags)")
        sys.exit(1)
    except SystemExit as e:
        if e.code == 1 and any(a.split("=")[0] in _HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    run()
