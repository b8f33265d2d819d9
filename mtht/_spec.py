"""Translate a table configuration into the C++ core's table spec, and name the optimizer
state the core keeps for each segment."""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

_INIT_KINDS = {"zeros": 0, "ones": 1, "constants": 2, "random_uniform": 3}
# Values of the core's OptKind (include/mtht/spec_types.h).
_OPT_KINDS = {
    "sgd": 0, "adagrad": 1, "dynamic_wd_adagrad": 2, "adadelta": 3, "adam": 4, "amsgrad": 5,
    "ftrl": 6, "group_ftrl": 7, "group_adagrad": 8, "momentum": 9, "moving_average": 10,
    "rmsprop": 11, "rmspropv2": 12, "batch_softmax": 13,
}
# Values of the core's RetrieverKind: fp32/fp16 are storage formats for serving and read raw.
_RETRIEVERS = {"fp32": 0, "fp16": 0, "fixed_r8": 1, "one_bit": 2}
# Config parameter name -> core OptParams field, where they differ.
_PARAM_NAMES = {"l1_regularization_strength": "l1", "l2_regularization_strength": "l2"}
_CORE_PARAMS = {"initial_accumulator_value", "weight_decay_factor", "beta", "beta1", "beta2", "epsilon",
                "l1", "l2", "momentum", "averaging_ratio", "use_nesterov", "decouple_weight_decay"}

# Named state of each optimizer in storage order: (name, floats per dim, extra floats, dtype).
# An int64 takes two float words.
_STATE_LAYOUT: Dict[str, List[Tuple[str, int, int, type]]] = {
    "sgd": [],
    "adagrad": [("norm", 1, 0, np.float32)],
    "dynamic_wd_adagrad": [("norm", 1, 0, np.float32), ("last_update_step", 0, 2, np.int64)],
    "adadelta": [("accum", 1, 0, np.float32), ("accum_update", 1, 0, np.float32)],
    "adam": [("m", 1, 0, np.float32), ("v", 1, 0, np.float32), ("beta1_power", 0, 1, np.float32),
             ("beta2_power", 0, 1, np.float32)],
    "amsgrad": [("m", 1, 0, np.float32), ("v", 1, 0, np.float32), ("vhat", 1, 0, np.float32),
                ("beta1_power", 0, 1, np.float32), ("beta2_power", 0, 1, np.float32)],
    "ftrl": [("zero", 1, 0, np.float32), ("norm", 1, 0, np.float32)],
    "group_ftrl": [("zero", 1, 0, np.float32), ("norm", 1, 0, np.float32)],
    "group_adagrad": [("grad_square_sum", 0, 1, np.float32)],
    "momentum": [("n", 1, 0, np.float32)],
    "moving_average": [],
    "rmsprop": [("n", 1, 0, np.float32)],
    "rmspropv2": [("n", 1, 0, np.float32)],
    "batch_softmax": [("global_step", 0, 2, np.int64)],
}


def core_segments(table_config) -> List[dict]:
    """One dict per segment in the form ``mtht._core.Table`` takes."""
    segments = []
    for index, seg in enumerate(table_config.entry_config.segments):
        opt, init = seg.optimizer, seg.initializer
        comp_kind = seg.compressor.kind if seg.compressor is not None else "fp32"
        comp = seg.compressor.params() if seg.compressor is not None else {}
        if opt.kind not in _OPT_KINDS:
            raise NotImplementedError(f"segment {index}: unknown optimizer {opt.kind!r}")
        if init.kind not in _INIT_KINDS:
            raise NotImplementedError(f"segment {index}: unknown initializer {init.kind!r}")
        if comp_kind not in _RETRIEVERS:
            raise NotImplementedError(f"segment {index}: unknown compressor {comp_kind!r}")
        ip = init.params()
        params = {}
        for name, value in opt.params().items():
            name = _PARAM_NAMES.get(name, name)
            if name in _CORE_PARAMS:
                params[name] = value
        segments.append({
            "dim": int(seg.dim_size),
            "init": _INIT_KINDS[init.kind],
            "init_a": float(ip.get("constant", ip.get("minval", 0.0))),
            "init_b": float(ip.get("maxval", 0.0)),
            "opt": _OPT_KINDS[opt.kind],
            "opt_params": params,
            "stochastic_rounding_fp16": bool(getattr(opt, "stochastic_rounding_float16", False)),
            "retriever": _RETRIEVERS[comp_kind],
            "fake_quant_range": float(comp.get("r", 1.0)),
            "hashnet_step_size": int(comp.get("step_size", 200)),
            "hashnet_init_scale": float(comp.get("init_scale", 1.0)),
            "hashnet_max_scale": float(comp.get("max_scale", 10000.0)),
            "hashnet_amplitude": float(comp.get("amplitude", 0.05)),
        })
    return segments


def state_floats(optimizer_kind: str, dim: int) -> int:
    """Float32 words of state one segment keeps per entry."""
    return sum(per_dim * dim + extra for _, per_dim, extra, _ in _STATE_LAYOUT[optimizer_kind])


def split_state(table_config, state_row: np.ndarray) -> List[Dict[str, np.ndarray]]:
    """Cut one entry's raw state floats into per-segment dicts of named arrays (an int64
    state, such as batch_softmax's last step, comes back as an int64 scalar array)."""
    out = []
    offset = 0
    for seg in table_config.entry_config.segments:
        named = {}
        for name, per_dim, extra, dtype in _STATE_LAYOUT[seg.optimizer.kind]:
            length = per_dim * int(seg.dim_size) + extra
            words = np.ascontiguousarray(state_row[offset:offset + length])
            named[name] = words.view(np.int64).copy() if dtype is np.int64 else words.copy()
            offset += length
        out.append(named)
    return out
