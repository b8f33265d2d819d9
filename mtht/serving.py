"""Compressed rows for serving: each segment's compressor as a storage format.

A training table keeps float32 values; for serving, Monolith stores each segment with its
compressor instead: fp32 as is (4 bytes a value), fp16 rounded to nearest even (2 bytes),
fixed_r8 as an int8 step count of ``r / 128`` (1 byte), one_bit as the sign of
``amplitude * tanh(scale * w)``, +1 or -1 (1 byte). :func:`compress` packs rows that way,
segment after segment, little-endian; :func:`decompress` reads them back.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

from mtht._arrays import ArrayInput, as_float32
from mtht.entry import EmbeddingHashTableConfig, HashTableConfigInstance

__all__ = ["row_bytes", "compress", "decompress"]

# A table's EmbeddingHashTableConfig, or the HashTableConfigInstance holding it (table.config).
AnyTableConfig = Union[EmbeddingHashTableConfig, HashTableConfigInstance]

_BYTES_PER_VALUE = {"fp32": 4, "fp16": 2, "fixed_r8": 1, "one_bit": 1}


def _segments(config) -> List[Tuple[int, str, dict]]:
    """(dim, compressor kind, its params) of each segment of ``config``: an
    EmbeddingHashTableConfig, or the HashTableConfigInstance holding one (``table.config``)."""
    table_config = getattr(config, "table_config", config)
    if not hasattr(table_config, "entry_config"):
        raise TypeError("expected an EmbeddingHashTableConfig or a HashTableConfigInstance (a table's config), "
                        f"got {type(config).__name__}")
    out = []
    for seg in table_config.entry_config.segments:
        comp = seg.compressor
        kind = comp.kind if comp is not None else "fp32"
        out.append((int(seg.dim_size), kind, comp.params() if comp is not None else {}))
    return out


def row_bytes(table_config: AnyTableConfig) -> int:
    """Bytes of one compressed row."""
    return sum(dim * _BYTES_PER_VALUE[kind] for dim, kind, _ in _segments(table_config))


def _fake_quantize_steps(w: np.ndarray, r: float) -> np.ndarray:
    """fixed_r8: round half away from zero to a count of r/128 steps, clamped to int8."""
    step = np.float32(r) / np.float32(128)
    half = step / np.float32(2)
    shifted = np.where(w >= 0, w + half, w - half).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # |w| near the float maximum: clamped below
        n = np.trunc(shifted / step)
    n = np.where(np.isnan(w), 0, np.clip(n, -128, 127))
    return n.astype(np.int8)


def compress(table_config: AnyTableConfig, values: ArrayInput,
             hashnet_scales: Optional[Sequence[float]] = None) -> np.ndarray:
    """uint8 ``[N, row_bytes]``: ``values`` (float32 ``[N, dim]``, the raw stored values)
    packed with each segment's compressor. ``hashnet_scales`` are the tables' one_bit scales
    per segment (default: each compressor's ``init_scale``)."""
    values = as_float32(values, "values")
    segs = _segments(table_config)
    dim = sum(d for d, _, _ in segs)
    if values.ndim != 2 or values.shape[1] != dim:
        raise ValueError(f"values must have shape (N, {dim}), got {values.shape}")
    if hashnet_scales is not None and len(hashnet_scales) != len(segs):
        raise ValueError(f"hashnet_scales needs one scale per segment ({len(segs)}), got {len(hashnet_scales)}")
    parts = []
    offset = 0
    for k, (d, kind, params) in enumerate(segs):
        w = values[:, offset:offset + d]
        offset += d
        if kind == "fp32":
            parts.append(w.astype("<f4").view(np.uint8))
        elif kind == "fp16":
            with np.errstate(over="ignore"):  # beyond 65504 becomes +-inf, as in Monolith
                parts.append(w.astype("<f2").view(np.uint8))  # IEEE round to nearest even
        elif kind == "fixed_r8":
            parts.append(_fake_quantize_steps(w, params["r"]).view(np.uint8))
        else:  # one_bit: the sign of amplitude * tanh(scale * w); 0 encodes as -1
            scale = np.float32(hashnet_scales[k] if hashnet_scales is not None else params["init_scale"])
            forward = np.float32(params["amplitude"]) * np.tanh(scale * w)
            parts.append(np.where(forward > 0, 1, -1).astype(np.int8).view(np.uint8))
    return np.ascontiguousarray(np.concatenate(parts, axis=1) if parts else np.empty((values.shape[0], 0), np.uint8))


def decompress(table_config: AnyTableConfig, data: npt.ArrayLike) -> np.ndarray:
    """float32 ``[N, dim]`` from rows packed by :func:`compress`."""
    data = np.asarray(data)
    if data.dtype != np.uint8 and (data.dtype.kind not in "iu" or (data.size and not 0 <= data.min() <= data.max() <= 255)):
        raise TypeError(f"data must be bytes (uint8, or integers in 0..255), got {data.dtype}")
    data = np.ascontiguousarray(data, dtype=np.uint8)
    width = row_bytes(table_config)
    if data.ndim != 2 or data.shape[1] != width:
        raise ValueError(f"data must have shape (N, {width}), got {data.shape}")
    out = []
    offset = 0
    for d, kind, params in _segments(table_config):
        size = d * _BYTES_PER_VALUE[kind]
        raw = np.ascontiguousarray(data[:, offset:offset + size])
        offset += size
        if kind == "fp32":
            out.append(raw.view("<f4").astype(np.float32))
        elif kind == "fp16":
            out.append(raw.view("<f2").astype(np.float32))
        elif kind == "fixed_r8":
            out.append(raw.view(np.int8).astype(np.float32) * (np.float32(params["r"]) / np.float32(128)))
        else:
            out.append(raw.view(np.int8).astype(np.float32) * np.float32(params["amplitude"]))
    return np.concatenate(out, axis=1).astype(np.float32)
