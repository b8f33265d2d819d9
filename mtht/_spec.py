"""Translate a table configuration into the C++ core's table spec, and name the optimizer
state the core keeps for each segment."""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

_INIT_KINDS = {"zeros": 0, "ones": 1, "constants": 2, "random_uniform": 3}
_OPT_KINDS = {"sgd": 0, "adagrad": 1}
# Storage formats for serving export: no effect on training values.
_TRAINING_NEUTRAL_COMPRESSORS = {"fp32", "fp16"}

# Named state arrays of each optimizer, in storage order: (name, length in units of dim).
_STATE_LAYOUT: Dict[str, List[Tuple[str, int]]] = {
    "sgd": [],
    "adagrad": [("norm", 1)],
}


def core_segments(table_config) -> List[dict]:
    """One dict per segment in the form ``mtht._core.Table`` takes.

    Raises NotImplementedError for an optimizer, compressor or wrapper that this version
    cannot train with yet.
    """
    segments = []
    for index, seg in enumerate(table_config.entry_config.segments):
        opt = seg.optimizer
        if opt.kind not in _OPT_KINDS:
            raise NotImplementedError(
                f"segment {index}: the {opt.kind!r} optimizer is not available in this version of mtht")
        if getattr(opt, "stochastic_rounding_float16", False):
            raise NotImplementedError(
                f"segment {index}: stochastic rounding to float16 is not available in this version of mtht")
        comp = seg.compressor
        if comp is not None and comp.kind not in _TRAINING_NEUTRAL_COMPRESSORS:
            raise NotImplementedError(
                f"segment {index}: the {comp.kind!r} compressor is not available in this version of mtht")
        init = seg.initializer
        if init.kind not in _INIT_KINDS:
            raise NotImplementedError(f"segment {index}: unknown initializer {init.kind!r}")
        ip = init.params()
        op = opt.params()
        segments.append({
            "dim": int(seg.dim_size),
            "init": _INIT_KINDS[init.kind],
            "init_a": float(ip.get("constant", ip.get("minval", 0.0))),
            "init_b": float(ip.get("maxval", 0.0)),
            "opt": _OPT_KINDS[opt.kind],
            "initial_accumulator_value": float(op.get("initial_accumulator_value", 0.1)),
            "weight_decay_factor": float(op.get("weight_decay_factor", 0.0)),
        })
    return segments


def split_state(table_config, state_row: np.ndarray) -> List[Dict[str, np.ndarray]]:
    """Cut one entry's raw state floats into per-segment dicts of named arrays."""
    out = []
    offset = 0
    for seg in table_config.entry_config.segments:
        named = {}
        for name, units in _STATE_LAYOUT[seg.optimizer.kind]:
            length = units * int(seg.dim_size)
            named[name] = state_row[offset:offset + length].copy()
            offset += length
        out.append(named)
    return out
