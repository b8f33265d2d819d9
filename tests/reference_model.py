"""A slow but obvious model of one embedding table, used as the oracle in tests.

Everything is a Python dict from id to an entry and every update is written the way the
reference behaviour describes it, element by element in float32 numpy arithmetic:

* SGD:      ``w = w - lr * g``
* Adagrad:  ``gd = g + wd * w; norm = norm + gd * gd; w = w - (lr / sqrt(norm)) * gd``

Only the deterministic initializers (zeros, ones, constants) are modelled; tests check
``random_uniform`` separately.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import numpy as np

F32 = np.float32


@dataclasses.dataclass(frozen=True)
class SegmentDesc:
    """What a test wants one segment to be; turned into an mtht config and a reference."""

    dim: int
    init: str = "zeros"          # zeros | ones | constants
    constant: float = 0.0        # for init == "constants"
    opt: str = "sgd"             # sgd | adagrad
    initial_accumulator_value: float = 0.1
    weight_decay_factor: float = 0.0

    def to_config_segment(self):
        from mtht import entry

        if self.init == "zeros":
            init = entry.ZerosInitializer()
        elif self.init == "ones":
            init = entry.OnesInitializer()
        elif self.init == "constants":
            init = entry.ConstantsInitializer(self.constant)
        else:
            raise ValueError(f"the reference model does not know initializer {self.init!r}")
        if self.opt == "sgd":
            opt = entry.SgdOptimizer()
        elif self.opt == "adagrad":
            opt = entry.AdagradOptimizer(initial_accumulator_value=self.initial_accumulator_value,
                                         weight_decay_factor=self.weight_decay_factor)
        else:
            raise ValueError(f"the reference model does not know optimizer {self.opt!r}")
        return entry.CombineAsSegment(self.dim, init, opt, entry.Fp32Compressor())


def make_config(segments: Sequence[SegmentDesc], learning_rates: Sequence, random_seed: int = 0,
                allow_non_finite: bool = False):
    """A ``HashTableConfigInstance`` for ``segments`` with the given learning-rate fns."""
    from mtht import entry

    table_config = entry.EmbeddingHashTableConfig(
        entry_config=entry.EntryConfig(segments=[s.to_config_segment() for s in segments]),
        random_seed=random_seed,
        allow_non_finite=allow_non_finite,
    )
    return entry.HashTableConfigInstance(table_config, list(learning_rates))


@dataclasses.dataclass
class RefEntry:
    values: np.ndarray                  # float32 [D]
    state: List[Dict[str, np.ndarray]]  # per segment: name -> float32 [dim]
    ts: int

    def copy(self) -> "RefEntry":
        return RefEntry(self.values.copy(), [{k: v.copy() for k, v in s.items()} for s in self.state],
                        self.ts)


class ReferenceTable:
    """One table: id -> (values, optimizer state per segment, timestamp)."""

    def __init__(self, segments: Sequence[SegmentDesc]):
        self.segments = list(segments)
        self.dim = sum(s.dim for s in self.segments)
        self.offsets = []
        off = 0
        for s in self.segments:
            self.offsets.append(off)
            off += s.dim
        self.entries: Dict[int, RefEntry] = {}
        self.max_update_ts = 0

    # -- helpers ---------------------------------------------------------------------------
    def _ids(self, ids) -> List[int]:
        return [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]

    def _rows(self, rows, n: int) -> np.ndarray:
        return np.asarray(rows, dtype=F32).reshape(n, self.dim)

    def _note(self, ts: int) -> None:
        self.max_update_ts = max(self.max_update_ts, int(ts))

    def initial_entry(self, ts: int = 0) -> RefEntry:
        values = np.zeros(self.dim, dtype=F32)
        state = []
        for s, off in zip(self.segments, self.offsets):
            if s.init == "zeros":
                values[off:off + s.dim] = F32(0)
            elif s.init == "ones":
                values[off:off + s.dim] = F32(1)
            elif s.init == "constants":
                values[off:off + s.dim] = F32(s.constant)
            else:
                raise ValueError(s.init)
            if s.opt == "sgd":
                state.append({})
            elif s.opt == "adagrad":
                state.append({"norm": np.full(s.dim, F32(s.initial_accumulator_value), dtype=F32)})
            else:
                raise ValueError(s.opt)
        return RefEntry(values, state, int(ts))

    def _upsert(self, i: int) -> RefEntry:
        e = self.entries.get(i)
        if e is None:
            e = self.initial_entry()
            self.entries[i] = e
        return e

    def _step(self, e: RefEntry, g: np.ndarray, lrs: np.ndarray) -> None:
        """One optimizer step of every segment of entry ``e`` with gradient row ``g``."""
        for k, (s, off) in enumerate(zip(self.segments, self.offsets)):
            lr = F32(lrs[k])
            w = e.values[off:off + s.dim]
            gs = g[off:off + s.dim]
            if s.opt == "sgd":
                w_new = w - lr * gs
            elif s.opt == "adagrad":
                wd = F32(s.weight_decay_factor)
                gd = gs + wd * w
                norm = e.state[k]["norm"] + gd * gd
                e.state[k]["norm"] = norm.astype(F32)
                w_new = w - (lr / np.sqrt(norm)) * gd
            else:
                raise ValueError(s.opt)
            assert w_new.dtype == F32
            e.values[off:off + s.dim] = w_new

    # -- API mirror ------------------------------------------------------------------------
    def lookup(self, ids) -> np.ndarray:
        ids = self._ids(ids)
        out = np.zeros((len(ids), self.dim), dtype=F32)
        for k, i in enumerate(ids):
            e = self.entries.get(i)
            if e is not None:
                out[k] = e.values
        return out

    def contains(self, ids) -> np.ndarray:
        return np.array([i in self.entries for i in self._ids(ids)], dtype=bool)

    def size(self) -> int:
        return len(self.entries)

    def assign(self, ids, values, req_time: Optional[int] = None) -> None:
        ts = 0 if req_time is None else int(req_time)
        ids = self._ids(ids)
        rows = self._rows(values, len(ids))
        self._note(ts)
        for k, i in enumerate(ids):
            e = self._upsert(i)
            e.values = rows[k].copy()
            e.ts = ts

    def assign_add(self, ids, values, req_time: Optional[int] = None) -> None:
        ts = 0 if req_time is None else int(req_time)
        ids = self._ids(ids)
        rows = self._rows(values, len(ids))
        self._note(ts)
        for k, i in enumerate(ids):
            e = self._upsert(i)
            e.values = (e.values + rows[k]).astype(F32)
            e.ts = ts

    def apply_gradients(self, ids, grads, learning_rates, enable_dedup: bool = False,
                        req_time: Optional[int] = None) -> None:
        ts = 0 if req_time is None else int(req_time)
        ids = self._ids(ids)
        rows = self._rows(grads, len(ids))
        lrs = np.asarray(learning_rates, dtype=F32).reshape(-1)
        assert lrs.shape[0] == len(self.segments)
        self._note(ts)
        if not enable_dedup:
            for k, i in enumerate(ids):
                e = self._upsert(i)
                self._step(e, rows[k], lrs)
                e.ts = ts
            return
        summed: Dict[int, np.ndarray] = {}
        for k, i in enumerate(ids):
            if i in summed:
                summed[i] = (summed[i] + rows[k]).astype(F32)
            else:
                summed[i] = rows[k].copy()
        for i, g in summed.items():
            e = self._upsert(i)
            self._step(e, g, lrs)
            e.ts = ts

    def reinitialize(self, ids, req_time: int) -> np.ndarray:
        # As in Monolith, reinitialize stamps the entries but does not move max_update_ts
        # (it is wall-clock time by default, not a training request's time).
        ids = self._ids(ids)
        status = np.zeros(len(ids), dtype=np.int32)
        for k, i in enumerate(ids):
            status[k] = 1 if i in self.entries else 0
            self.entries[i] = self.initial_entry(req_time)
        return status

    def lookup_entry(self, ids) -> List[Optional[RefEntry]]:
        return [self.entries.get(i) for i in self._ids(ids)]

    def copy(self) -> "ReferenceTable":
        other = ReferenceTable(self.segments)
        other.entries = {i: e.copy() for i, e in self.entries.items()}
        other.max_update_ts = self.max_update_ts
        return other
