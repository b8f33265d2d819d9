"""mtht: embedding hash tables for training recommender models.

A C++17 open-addressing table from int64 feature id to a trainable entry (embedding,
optimizer state, timestamp) with Monolith's Python API, usable from any trainer.
"""

import os as _os
from importlib.metadata import PackageNotFoundError as _PackageNotFoundError, version as _version

try:
    from mtht import _core
except ImportError as _error:
    # Inside a source checkout Python imports its mtht/ directory, which has no built core.
    raise ImportError(
        f"mtht's compiled core (mtht._core) cannot be imported from {__path__[0]}: install mtht "
        f"(pip install .) and run Python from outside the source checkout ({_error})") from _error


def _check_num_threads_variable() -> None:
    """MTHT_NUM_THREADS, the default thread count, is a whole number from 1 to 1024 or unset
    (the core, which reads it when its pool starts, would pass over another value)."""
    if _core.named_num_threads() < 0:
        value = _os.environ.get("MTHT_NUM_THREADS")
        raise ValueError(f"MTHT_NUM_THREADS={value!r} must be a whole number from 1 to {_core.MAX_NUM_THREADS}")


_check_num_threads_variable()

from mtht.entry import (
    AdadeltaOptimizer,
    AdaGradWithGroupLassoOptimizer,
    AdagradOptimizer,
    AdamOptimizer,
    AmsgradOptimizer,
    BatchSoftmaxInitializer,
    BatchSoftmaxOptimizer,
    CombineAsSegment,
    ConstantsInitializer,
    DynamicWdAdagradOptimizer,
    EmbeddingHashTableConfig,
    EntryConfig,
    FixedR8Compressor,
    Fp16Compressor,
    Fp32Compressor,
    FtrlOptimizer,
    FTRLWithGroupSparsityOptimizer,
    HashTableConfigInstance,
    MomentumOptimizer,
    MovingAverageOptimizer,
    OneBitCompressor,
    OnesInitializer,
    RandomUniformInitializer,
    RmspropOptimizer,
    RmspropV2Optimizer,
    SgdOptimizer,
    SlotExpireTimeConfig,
    StochasticRoundingFloat16OptimizerWrapper,
    ZerosInitializer,
)
from mtht.checkpoint import CheckpointError
from mtht.hash_filter import HashFilter
from mtht.hash_table import BaseHashTable, EntryDump, HashTable, hash_table_from_config
from mtht.hooks import AsyncPush, Prefetch

try:
    __version__ = _version("mtht")
except _PackageNotFoundError:  # running from a source tree without metadata
    __version__ = "0+unknown"


def set_num_threads(n: int) -> None:
    """Set how many threads a batch call may use (the calling thread included).

    Results never depend on this number: each id is always handled by one thread, in input
    order. The default is the environment variable ``MTHT_NUM_THREADS`` where it is set,
    otherwise the number of cores the process may use (its CPU affinity, at most the whole
    CPUs of a container's CPU limit, at most 64); ``n`` is an integer from 1 to 1024.
    """
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """How many threads a batch call may use."""
    return _core.get_num_threads()


def build_info() -> dict:
    """Version, compiler, compile flags, the active optimizer kernel (or why MTHT_KERNEL is
    not usable), the kernel sets this CPU runs, and the CPU's ISAs."""
    try:
        active = _core.kernel_name()
    except ValueError as e:
        active = f"invalid: {e}"
    return {
        "version": __version__,
        "compiler": _core.compiler(),
        "compile_flags": _core.compile_flags(),
        "active_kernel": active,
        "available_kernels": _core.available_kernels(),
        "cpu_isas": _core.cpu_features().split(","),
        "num_threads": get_num_threads(),
    }


# Written out, so that type checkers take these names as the package's own (a computed
# list also took the names of the modules imported and of PackageNotFoundError).
__all__ = [
    "AdadeltaOptimizer",
    "AdaGradWithGroupLassoOptimizer",
    "AdagradOptimizer",
    "AdamOptimizer",
    "AmsgradOptimizer",
    "BatchSoftmaxInitializer",
    "BatchSoftmaxOptimizer",
    "CombineAsSegment",
    "ConstantsInitializer",
    "DynamicWdAdagradOptimizer",
    "EmbeddingHashTableConfig",
    "EntryConfig",
    "FixedR8Compressor",
    "Fp16Compressor",
    "Fp32Compressor",
    "FtrlOptimizer",
    "FTRLWithGroupSparsityOptimizer",
    "HashTableConfigInstance",
    "MomentumOptimizer",
    "MovingAverageOptimizer",
    "OneBitCompressor",
    "OnesInitializer",
    "RandomUniformInitializer",
    "RmspropOptimizer",
    "RmspropV2Optimizer",
    "SgdOptimizer",
    "SlotExpireTimeConfig",
    "StochasticRoundingFloat16OptimizerWrapper",
    "ZerosInitializer",
    "CheckpointError",
    "HashFilter",
    "BaseHashTable",
    "EntryDump",
    "HashTable",
    "hash_table_from_config",
    "AsyncPush",
    "Prefetch",
    "set_num_threads",
    "get_num_threads",
    "build_info",
]
