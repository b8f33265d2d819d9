"""A plain numpy model of mtht's per-row numerics, for the optimizer tests.

Every function works on float32 numpy arrays of shape ``[rows, dim]`` (one row per entry
being stepped; rows are independent) and performs, operation by operation, the float32
arithmetic that docs/optimizers.md gives for the optimizer, in the same order. numpy's
float32 ``+ - * /`` and ``sqrt`` are correctly rounded IEEE operations, exactly like the
C++ kernels (which are compiled with ``-ffp-contract=off``, so no multiply-add is fused),
so this model reproduces the table bit for bit. The exceptions, where the C++ side uses
double precision inside, are mirrored in float64 here (Adam's bias-corrected learning
rate, RMSProp v1). Sums over the elements of a row (the group optimizers) are done left to
right, as the C++ loop does them, never with numpy's pairwise ``sum``.

The one operation numpy may not reproduce bit for bit is ``tanh`` (HashNet): the library
rounds the C library's double ``tanh`` to float32, and numpy's float64 ``tanh`` may be its
own (a SIMD version on some CPUs) that differs in the last bit of a double, which now and
then changes the float32. So ``tanh32`` calls that same C ``tanh`` through ctypes when the
C math library can be loaded (``TANH_FROM_LIBM``); otherwise it falls back to numpy's, and
HashNet results then agree only within a few ulp.

State is a dict of named arrays per optimizer, with the names and shapes
``HashTable.lookup_entry`` uses: per-dim arrays are ``[rows, dim]``, scalars per entry are
``[rows, 1]`` (float32, or int64 for step counters).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable, Dict

import numpy as np

F32 = np.float32
F64 = np.float64

State = Dict[str, np.ndarray]


def f32(x) -> np.float32:
    """``x`` rounded to float32 (how a config float reaches the C++ core)."""
    return np.float32(x)


def _p(params: dict, name: str, default: float) -> np.float32:
    return f32(params.get(name, default))


def _row_sum_of_squares(z: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum of z[:, i]**2 over i, per row (shape [rows, 1])."""
    acc = np.zeros((z.shape[0], 1), dtype=F32)
    for i in range(z.shape[1]):
        acc = acc + z[:, i:i + 1] * z[:, i:i + 1]
    return acc


# --------------------------------------------------------------------------------------
# Initial state
# --------------------------------------------------------------------------------------

def init_state(kind: str, params: dict, rows: int, dim: int) -> State:
    """The optimizer state a new entry starts with."""
    zeros = lambda: np.zeros((rows, dim), dtype=F32)  # noqa: E731
    init_acc = _p(params, "initial_accumulator_value", 0.1)
    if kind in ("sgd", "moving_average"):
        return {}
    if kind == "adagrad":
        return {"norm": np.full((rows, dim), init_acc, dtype=F32)}
    if kind == "dynamic_wd_adagrad":
        return {"norm": np.full((rows, dim), init_acc, dtype=F32),
                "last_update_step": np.zeros((rows, 1), dtype=np.int64)}
    if kind == "adadelta":
        return {"accum": zeros(), "accum_update": zeros()}
    if kind in ("adam", "amsgrad"):
        st = {"m": zeros(), "v": zeros()}
        if kind == "amsgrad":
            st["vhat"] = zeros()
        st["beta1_power"] = np.full((rows, 1), _p(params, "beta1", 0.9), dtype=F32)
        st["beta2_power"] = np.full((rows, 1), _p(params, "beta2", 0.99), dtype=F32)
        return st
    if kind in ("ftrl", "group_ftrl"):
        return {"zero": zeros(), "norm": np.full((rows, dim), init_acc, dtype=F32)}
    if kind == "group_adagrad":
        return {"grad_square_sum": np.full((rows, 1), init_acc, dtype=F32)}
    if kind in ("momentum", "rmsprop", "rmspropv2"):
        return {"n": zeros()}
    if kind == "batch_softmax":
        return {"global_step": np.zeros((rows, 1), dtype=np.int64)}
    raise KeyError(kind)


# --------------------------------------------------------------------------------------
# One step of each optimizer: step(params, w, state, g, lr, t) -> new w (state updated in
# place). w, g: float32 [rows, dim]; lr: float32; t: the global step (int).
# --------------------------------------------------------------------------------------

def sgd(p, w, st, g, lr, t):
    return w - lr * g


def adagrad(p, w, st, g, lr, t):
    wd = _p(p, "weight_decay_factor", 0.0)
    gd = g + wd * w
    acc = st["norm"] + gd * gd
    st["norm"] = acc
    return w - (lr / np.sqrt(acc)) * gd


def dynamic_wd_adagrad(p, w, st, g, lr, t):
    wd = _p(p, "weight_decay_factor", 0.0)
    if p.get("decouple_weight_decay", False):
        acc = st["norm"] + g * g
        st["norm"] = acc
        w = w - ((lr / np.sqrt(acc)) * g + (lr * wd) * w)
    else:
        sub = {"norm": st["norm"]}
        w = adagrad(p, w, sub, g, lr, t)
        st["norm"] = sub["norm"]
    st["last_update_step"] = np.full_like(st["last_update_step"], t)
    return w


def adadelta(p, w, st, g, lr, t):
    wd = _p(p, "weight_decay_factor", 0.0)
    rho = _p(p, "averaging_ratio", 0.9)
    eps = _p(p, "epsilon", 0.01)
    one_minus_rho = F32(1) - rho
    cg = g + wd * w
    na = st["accum"] * rho + cg * cg * one_minus_rho
    upd = np.sqrt(st["accum_update"] + eps) / np.sqrt(na + eps) * cg
    w = w - upd * lr
    st["accum_update"] = st["accum_update"] * rho + upd * upd * one_minus_rho
    st["accum"] = na
    return w


def adam_lr(lr, beta1_power, beta2_power) -> np.ndarray:
    """lr * sqrt(1 - beta2_power) / (1 - beta1_power): the differences in float32, the rest
    in float64, rounded to float32."""
    lr64 = F64(lr)
    one_minus_b1 = (F32(1) - np.asarray(beta1_power, dtype=F32)).astype(F64)
    one_minus_b2 = (F32(1) - np.asarray(beta2_power, dtype=F32)).astype(F64)
    return (lr64 * np.sqrt(one_minus_b2) / one_minus_b1).astype(F32)


def _adam_like(p, w, st, g, lr, amsgrad_max):
    b1 = _p(p, "beta1", 0.9)
    b2 = _p(p, "beta2", 0.99)
    eps = _p(p, "epsilon", 0.01)
    wd = _p(p, "weight_decay_factor", 0.0)
    c1, c2 = F32(1) - b1, F32(1) - b2
    lr_t = adam_lr(lr, st["beta1_power"], st["beta2_power"])  # [rows, 1]
    cg = g + wd * w
    m = st["m"] + (cg - st["m"]) * c1
    v = st["v"] + (cg * cg - st["v"]) * c2
    st["m"], st["v"] = m, v
    denom_v = v
    if amsgrad_max:
        vh = np.where(v > st["vhat"], v, st["vhat"])
        st["vhat"] = vh
        denom_v = vh
    num = (cg * c1 + b1 * m) if p.get("use_nesterov", False) else m
    # The float32 product over sqrt(v) + epsilon in float64, as Monolith's C sqrt takes it.
    w = (w.astype(F64) - (num * lr_t).astype(F64) / (np.sqrt(denom_v.astype(F64)) + F64(eps))).astype(F32)
    st["beta1_power"] = st["beta1_power"] * b1
    st["beta2_power"] = st["beta2_power"] * b2
    return w


def adam(p, w, st, g, lr, t):
    return _adam_like(p, w, st, g, lr, amsgrad_max=False)


def amsgrad(p, w, st, g, lr, t):
    return _adam_like(p, w, st, g, lr, amsgrad_max=True)


def _ftrl_accumulate(st, w, g, lr):
    """The per-element FTRL accumulation; returns the new z and norm."""
    norm = st["norm"]
    n_new = norm + g * g
    sigma = (np.sqrt(n_new) - np.sqrt(norm)) / lr
    z = st["zero"] + (g - sigma * w)  # Monolith: zero += (g - sigma * w)
    st["zero"], st["norm"] = z, n_new
    return z, n_new


def ftrl(p, w, st, g, lr, t):
    l1 = _p(p, "l1_regularization_strength", 0.0)
    l2 = _p(p, "l2_regularization_strength", 0.0)
    beta = _p(p, "beta", 0.0)
    z, n_new = _ftrl_accumulate(st, w, g, lr)
    sign = np.where(z < 0, F32(-1), F32(1))  # textbook sign (Monolith uses signbit, 0/1)
    new_w = lr * (sign * l1 - z) / (np.sqrt(n_new) + beta + l2 * lr)
    return np.where(np.abs(z) > l1, new_w, F32(0)).astype(F32)


def group_ftrl(p, w, st, g, lr, t):
    l1 = _p(p, "l1_regularization_strength", 0.0)
    l2 = _p(p, "l2_regularization_strength", 0.0)
    beta = _p(p, "beta", 1.0)
    z, n_new = _ftrl_accumulate(st, w, g, lr)
    znorm = np.sqrt(_row_sum_of_squares(z))
    zero_row = (znorm == 0) | (znorm < l1)
    with np.errstate(divide="ignore", invalid="ignore"):
        shrink = (l1 - znorm) / znorm
        new_w = lr * z * shrink / (beta + np.sqrt(n_new) + l2 * lr)
    return np.where(zero_row, F32(0), new_w).astype(F32)


def group_adagrad(p, w, st, g, lr, t):
    beta = _p(p, "beta", 0.0)
    lam = _p(p, "l2_regularization_strength", 0.0)
    wd = _p(p, "weight_decay_factor", 0.0)
    gd = g + wd * w
    max_sq = np.max(gd * gd, axis=1, keepdims=True)
    acc = st["grad_square_sum"] + max_sq
    st["grad_square_sum"] = acc
    step = lr / (beta + np.sqrt(acc))
    z = gd - w / step
    znorm = np.sqrt(_row_sum_of_squares(z))
    zero_row = (znorm == 0) | (znorm < lam)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = -step * (znorm - lam) / znorm
        new_w = scale * z
    return np.where(zero_row, F32(0), new_w).astype(F32)


def momentum(p, w, st, g, lr, t):
    mu = _p(p, "momentum", 0.9)
    wd = _p(p, "weight_decay_factor", 0.0)
    dx = lr * (g + wd * w)
    prev = st["n"]
    a = mu * prev - dx
    st["n"] = a
    if p.get("use_nesterov", False):
        return w + (-mu * prev + (F32(1) + mu) * a)
    return w + a


def moving_average(p, w, st, g, lr, t):
    mu = _p(p, "momentum", 0.9)
    return mu * w + (F32(1) - mu) * g


def _rmsprop(p, w, st, g, lr, one_minus_mu):
    """dx and the new n in float64, n stored as float32, sqrt(n) + 1 in float32 from it,
    eta and the step in float64 (v1 steps with the segment's learning rate)."""
    mu = F64(_p(p, "momentum", 0.9))
    wd = F64(_p(p, "weight_decay_factor", 0.0))
    dx = g.astype(F64) + wd * w.astype(F64)
    n = mu * st["n"].astype(F64) + ((1.0 - mu) * dx * dx if one_minus_mu else dx * dx)
    st["n"] = n.astype(F32)
    eta = F64(lr) / (np.sqrt(st["n"]) + F32(1)).astype(F64)
    return (w.astype(F64) - eta * dx).astype(F32)


def rmsprop(p, w, st, g, lr, t):
    return _rmsprop(p, w, st, g, lr, one_minus_mu=True)


def rmspropv2(p, w, st, g, lr, t):
    return _rmsprop(p, w, st, g, lr, one_minus_mu=False)


def batch_softmax(p, w, st, g, lr, t):
    if t < 0:
        raise ValueError("global_step must be >= 0 for batch_softmax")
    gap = (np.int64(t) - st["global_step"]).astype(F32)
    st["global_step"] = np.full_like(st["global_step"], t)
    return (F32(1) - lr) * w + lr * gap


STEPS: Dict[str, Callable] = {
    "sgd": sgd, "adagrad": adagrad, "dynamic_wd_adagrad": dynamic_wd_adagrad, "adadelta": adadelta,
    "adam": adam, "amsgrad": amsgrad, "ftrl": ftrl, "group_ftrl": group_ftrl,
    "group_adagrad": group_adagrad, "momentum": momentum, "moving_average": moving_average,
    "rmsprop": rmsprop, "rmspropv2": rmspropv2, "batch_softmax": batch_softmax,
}


def step(kind: str, params: dict, w: np.ndarray, state: State, g: np.ndarray, lr, t: int) -> np.ndarray:
    """One step of optimizer ``kind`` on rows ``w`` with gradients ``g``: returns the new
    values (float32) and updates ``state`` in place."""
    w = np.asarray(w, dtype=F32)
    g = np.asarray(g, dtype=F32)
    with np.errstate(over="ignore"):
        out = STEPS[kind](params, w, state, g, f32(lr), int(t))
    return np.asarray(out, dtype=F32)


# --------------------------------------------------------------------------------------
# Retrievers
# --------------------------------------------------------------------------------------

def fake_quantize(x, r) -> np.ndarray:
    """fixed_r8: round half away from zero to a multiple of r/128, clamp to [-128, 127]
    steps; NaN reads as 0."""
    x = np.asarray(x, dtype=F32)
    step_ = f32(r) / F32(128)
    half = step_ / F32(2)
    shifted = np.where(x >= 0, x + half, x - half)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and Inf rows; huge values over a tiny step
        n = np.trunc(shifted / step_)
    n = np.clip(n, F32(-128), F32(127))
    out = (n * step_).astype(F32)
    return np.where(np.isnan(x), F32(0), out).astype(F32)


def _load_tanh():
    try:
        name = ctypes.util.find_library("m")
        lib = ctypes.CDLL(name) if name else None
        fn = lib.tanh if lib is not None else None
    except (OSError, AttributeError):
        return None
    if fn is None:
        return None
    fn.restype = ctypes.c_double
    fn.argtypes = [ctypes.c_double]
    return fn


_TANH = _load_tanh()
TANH_FROM_LIBM = _TANH is not None


def tanh32(x) -> np.ndarray:
    """float32 tanh: the C library's double tanh rounded once to float32 (which the table's
    own tanh gives for every float), or numpy's float64 tanh rounded once where the C library
    cannot be loaded."""
    x = np.asarray(x, dtype=F32)
    if _TANH is None:
        return np.tanh(x.astype(F64)).astype(F32)
    flat = [F32(_TANH(float(v))) for v in x.ravel()]
    return np.array(flat, dtype=F32).reshape(x.shape)


def hashnet_scale(init_scale, max_scale, t: int) -> np.float32:
    """The HashNet scale from step t on (t a multiple of the step size), all in float32."""
    s = f32(init_scale) * np.sqrt(F32(1) + F32(0.005) * F32(t))
    return s if s < f32(max_scale) else f32(max_scale)


def hashnet_forward(w, scale, amplitude) -> np.ndarray:
    with np.errstate(over="ignore"):  # scale * w past float32's range is +-inf, as in the kernels
        return (f32(amplitude) * tanh32(f32(scale) * np.asarray(w, dtype=F32))).astype(F32)


def one_minus_square(y) -> np.ndarray:
    """fma(-y, y, 1) for float32 y: 1 - y*y computed in float64 (y*y is exact there), then
    rounded to float32. For |y| <= 1 this equals the singly rounded fma result; that has
    been checked for every float32 in [-1, 1]."""
    y64 = np.asarray(y, dtype=F32).astype(F64)
    return (1.0 - y64 * y64).astype(F32)


def hashnet_backward(w, grad, scale, amplitude) -> np.ndarray:
    """grad * (amplitude * scale * (1 - tanh(scale*w)^2)), the last factor fused."""
    scale, amplitude = f32(scale), f32(amplitude)
    with np.errstate(over="ignore"):  # as in hashnet_forward
        y = tanh32(scale * np.asarray(w, dtype=F32))
    return (np.asarray(grad, dtype=F32) * ((amplitude * scale) * one_minus_square(y))).astype(F32)


# --------------------------------------------------------------------------------------
# float16 neighbours (stochastic rounding)
# --------------------------------------------------------------------------------------

HALF_MAX = F32(65504.0)


def fp16_neighbours(x) -> tuple:
    """(down, up): the largest float16 value <= x and the smallest >= x, as float32, for
    |x| <= 65504 (equal when x is a float16 value)."""
    x = np.asarray(x, dtype=F32)
    if np.any(np.abs(x) > HALF_MAX):
        raise ValueError("outside the float16 range")
    nearest = x.astype(np.float16)
    back = nearest.astype(F32)
    lower = np.where(back > x, np.nextafter(nearest, np.float16(-np.inf)), nearest).astype(F32)
    upper = np.where(back < x, np.nextafter(nearest, np.float16(np.inf)), nearest).astype(F32)
    return lower, upper


def is_fp16_value(x) -> np.ndarray:
    """Whether each float32 is exactly a float16 value (inf excluded)."""
    x = np.asarray(x, dtype=F32)
    with np.errstate(over="ignore"):
        return np.isfinite(x.astype(np.float16)) & (x.astype(np.float16).astype(F32) == x)


# --------------------------------------------------------------------------------------
# A whole table: entries made of segments, each with its optimizer and retriever
# --------------------------------------------------------------------------------------

class SegmentModel:
    """One segment: ``dim`` floats, optimizer ``kind`` with ``params`` (proto field names,
    as ``Optimizer.params()`` returns them), a constant initial value, and a retriever
    (``"raw"``, ``"fixed_r8"`` with ``fixed_range``, or ``"one_bit"`` with ``step_size``,
    ``amplitude``, ``init_scale``, ``max_scale``)."""

    def __init__(self, dim, kind, params=None, init_value=0.0, retriever="raw", fixed_range=1.0,
                 step_size=200, amplitude=0.05, init_scale=1.0, max_scale=10000.0):
        self.dim = int(dim)
        self.kind = kind
        self.params = dict(params or {})
        self.init_value = f32(init_value)
        self.retriever = retriever
        self.fixed_range = f32(fixed_range)
        self.step_size = int(step_size)
        self.amplitude = f32(amplitude)
        self.init_scale = f32(init_scale)
        self.max_scale = f32(max_scale)


class EntryModel:
    """The table semantics the optimizer tests need: assign, lookup (retriever output),
    apply_gradients (one step per occurrence in input order, or with ``dedup`` one step per
    id with its gradients summed left to right), raw values and named state per id.
    Stochastic rounding is not modelled."""

    def __init__(self, segments):
        self.segments = list(segments)
        self.offsets = np.cumsum([0] + [s.dim for s in self.segments]).tolist()
        self.dim = self.offsets[-1]
        self.scales = [s.init_scale for s in self.segments]
        self._row_of: Dict[int, int] = {}
        self._w = np.zeros((0, self.dim), dtype=F32)
        self._state = [init_state(s.kind, s.params, 0, s.dim) for s in self.segments]

    # -- rows ------------------------------------------------------------------------------
    def _rows(self, ids, create: bool) -> np.ndarray:
        rows = np.empty(len(ids), dtype=np.int64)
        new = []
        for k, i in enumerate(np.asarray(ids, dtype=np.int64).tolist()):
            r = self._row_of.get(i)
            if r is None:
                if not create:
                    rows[k] = -1
                    continue
                r = len(self._row_of)
                self._row_of[i] = r
                new.append(r)
            rows[k] = r
        if new:
            fresh = np.empty((len(new), self.dim), dtype=F32)
            for seg, a, b in zip(self.segments, self.offsets, self.offsets[1:]):
                fresh[:, a:b] = seg.init_value
            self._w = np.concatenate([self._w, fresh])
            for k, seg in enumerate(self.segments):
                extra = init_state(seg.kind, seg.params, len(new), seg.dim)
                self._state[k] = {name: np.concatenate([arr, extra[name]])
                                  for name, arr in self._state[k].items()}
        return rows

    def contains(self, i) -> bool:
        return int(i) in self._row_of

    def values(self, i) -> np.ndarray:
        """The raw stored floats of id ``i``."""
        return self._w[self._row_of[int(i)]].copy()

    def state(self, i) -> list:
        """Per segment, the named state of id ``i`` shaped as ``lookup_entry`` returns it."""
        r = self._row_of[int(i)]
        return [{name: arr[r].copy() for name, arr in seg.items()} for seg in self._state]

    # -- operations ------------------------------------------------------------------------
    def assign(self, ids, values) -> None:
        values = np.asarray(values, dtype=F32).reshape(len(ids), self.dim)
        rows = self._rows(ids, create=True)
        for k, r in enumerate(rows):  # in input order: the last duplicate wins
            self._w[r] = values[k]

    def lookup(self, ids) -> np.ndarray:
        rows = self._rows(ids, create=False)
        out = np.zeros((len(rows), self.dim), dtype=F32)
        found = rows >= 0
        out[found] = self._w[rows[found]]
        for k, (seg, a, b) in enumerate(zip(self.segments, self.offsets, self.offsets[1:])):
            part = out[found, a:b]
            if seg.retriever == "fixed_r8":
                out[found, a:b] = fake_quantize(part, seg.fixed_range)
            elif seg.retriever == "one_bit":
                out[found, a:b] = hashnet_forward(part, self.scales[k], seg.amplitude)
        return out

    def apply_gradients(self, ids, grads, learning_rates, global_step: int, dedup: bool = False) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        grads = np.asarray(grads, dtype=F32).reshape(len(ids), self.dim)
        lrs = np.asarray(learning_rates, dtype=F32)
        if len(ids) == 0:
            return
        for k, seg in enumerate(self.segments):
            if seg.retriever == "one_bit" and global_step % seg.step_size == 0:
                self.scales[k] = hashnet_scale(seg.init_scale, seg.max_scale, global_step)
        rows = self._rows(ids, create=True)
        # rank[p] = how many earlier positions hold the same id.
        seen: Dict[int, int] = {}
        rank = np.empty(len(rows), dtype=np.int64)
        for p, r in enumerate(rows.tolist()):
            rank[p] = seen.get(r, 0)
            seen[r] = rank[p] + 1
        if dedup:
            first = np.flatnonzero(rank == 0)
            unique_rows = rows[first]
            total = grads[first].copy()
            where = {r: k for k, r in enumerate(unique_rows.tolist())}
            for n in range(1, int(rank.max()) + 1):
                pos = np.flatnonzero(rank == n)
                slots = np.array([where[r] for r in rows[pos].tolist()], dtype=np.int64)
                total[slots] = total[slots] + grads[pos]
            self._step_rows(unique_rows, total, lrs, global_step)
        else:
            # Rounds of distinct rows: round n holds every id's n-th occurrence.
            for n in range(int(rank.max()) + 1):
                pos = np.flatnonzero(rank == n)
                self._step_rows(rows[pos], grads[pos], lrs, global_step)

    def _step_rows(self, rows, grads, lrs, t) -> None:
        w = self._w[rows]
        for k, (seg, a, b) in enumerate(zip(self.segments, self.offsets, self.offsets[1:])):
            g = grads[:, a:b]
            if seg.retriever == "one_bit":
                g = hashnet_backward(w[:, a:b], g, self.scales[k], seg.amplitude)
            st = {name: arr[rows] for name, arr in self._state[k].items()}
            w[:, a:b] = step(seg.kind, seg.params, w[:, a:b], st, g, lrs[k], t)
            for name, arr in st.items():
                self._state[k][name][rows] = arr
        self._w[rows] = w
