"""Small helpers around table configs."""

from __future__ import annotations

from mtht.entry import EmbeddingHashTableConfig

__all__ = ["infer_dim_size"]


def infer_dim_size(table_config: EmbeddingHashTableConfig) -> int:
    """Return the width of an embedding row: the sum of the segment dims.

    Parameters
    ----------
    table_config : EmbeddingHashTableConfig
        The table config.

    Returns
    -------
    int
        ``sum(segment.dim_size for segment in entry_config.segments)``.

    Examples
    --------
    >>> from mtht import entry
    >>> config = entry.EmbeddingHashTableConfig(entry_config=entry.EntryConfig(
    ...     segments=[entry.CombineAsSegment(d, entry.ZerosInitializer(),
    ...                                      entry.SgdOptimizer())
    ...               for d in (4, 2)]))
    >>> infer_dim_size(config)
    6
    """
    if not isinstance(table_config, EmbeddingHashTableConfig):
        raise TypeError(
            "table_config must be an EmbeddingHashTableConfig, got "
            f"{table_config!r}"
        )
    return sum(int(s.dim_size) for s in table_config.entry_config.segments)
