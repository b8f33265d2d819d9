"""Helpers for tests of code built on mtht.

:func:`generate_test_hash_table_config` has the name and arguments of the
helper Monolith's tests use, so tests ported from Monolith read the same.
"""

from __future__ import annotations

from mtht import entry

__all__ = ["generate_test_hash_table_config"]


def generate_test_hash_table_config(dim: int = 2, use_float16: bool = False,
                                    learning_rate: entry.LearningRateFn = 1.0
                                    ) -> entry.HashTableConfigInstance:
    """Build a one-segment SGD table config.

    Parameters
    ----------
    dim : int, default 2
        Dimension of the single segment.
    use_float16 : bool, default False
        Wrap the optimizer in
        :class:`~mtht.entry.StochasticRoundingFloat16OptimizerWrapper`.
    learning_rate : float, LearningRateFunction or callable, default 1.0
        The segment's learning rate.

    Returns
    -------
    HashTableConfigInstance
        Zeros initializer, SGD, float32 compressor, default table settings
        and ``learning_rate_fns=[learning_rate]``.

    Examples
    --------
    >>> config = generate_test_hash_table_config(4)
    >>> config.table_config.entry_config.segments[0].dim_size
    4
    >>> config.call_learning_rate_fns(0)
    array([1.], dtype=float32)
    """
    optimizer: entry.Optimizer = entry.SgdOptimizer()
    if use_float16:
        optimizer = entry.StochasticRoundingFloat16OptimizerWrapper(optimizer)
    segment = entry.CombineAsSegment(
        dim, entry.ZerosInitializer(), optimizer, entry.Fp32Compressor()
    )
    table_config = entry.EmbeddingHashTableConfig(
        entry_config=entry.EntryConfig(segments=[segment])
    )
    return entry.HashTableConfigInstance(table_config, [learning_rate])
