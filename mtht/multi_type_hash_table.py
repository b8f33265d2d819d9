"""Monolith's multi-slot tables: one table per slot, and a wrapper that merges the slots
whose configs are equal into one physical table.

Writes change the tables in place and return the multi-type table itself, so
``t = t.assign_add(...)`` chains written for Monolith work unchanged.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import re
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union, overload

import numpy as np

from mtht import hash_table as _hash_table
from mtht._arrays import ArrayInput, IntegerInput, Switch, as_ids, as_mapping, as_numpy, as_rows, joined
from mtht.entry import HashTableConfigInstance
from mtht.hash_table_utils import infer_dim_size
from mtht.hooks import QueueHooks

__all__ = ["BaseMultiTypeHashTable", "MultiTypeHashTable", "MergedMultiTypeHashTable"]

# The arguments of the multi-slot calls: ``{slot: ids}`` and ``{slot: (ids, rows)}``.
SlotIds = Mapping[str, ArrayInput]
SlotRows = Mapping[str, Tuple[ArrayInput, ArrayInput]]


class BaseMultiTypeHashTable(_hash_table.NotCopyable, QueueHooks, abc.ABC):
    """Tables addressed by slot name; the interface of Monolith's multi-type tables."""

    @abc.abstractmethod
    def lookup(self, slot_to_id: SlotIds) -> Dict[str, np.ndarray]:
        """``{slot: float32 [n, dim]}`` for the given slots; absent ids read as zeros."""

    @abc.abstractmethod
    def assign(self, slot_to_id_and_value: SlotRows, *args: Any, **kwargs: Any) -> "BaseMultiTypeHashTable":
        """``{slot: (ids, values)}``: set the values; returns the table."""

    @abc.abstractmethod
    def assign_add(self, slot_to_id_and_value: SlotRows, *args: Any, **kwargs: Any) -> "BaseMultiTypeHashTable":
        """``{slot: (ids, values)}``: add to the values; returns the table."""

    @abc.abstractmethod
    def reinitialize(self, slot: str, ids: ArrayInput) -> np.ndarray:
        """Reset the entries of ``ids`` of ``slot`` (Monolith's multi-type tables refuse it)."""

    @abc.abstractmethod
    def apply_gradients(self, slot_to_id_and_grad: SlotRows, *args: Any, **kwargs: Any) -> "BaseMultiTypeHashTable":
        """``{slot: (ids, grads)}, global_step, ...``: one optimizer step per slot's table;
        returns the table."""

    @abc.abstractmethod
    def as_op(self, name: Optional[str] = None) -> Any:
        """Wait until every write issued has been applied."""

    @abc.abstractmethod
    def get_table_dim_sizes(self) -> List[int]:
        """The dims of the tables, in the order of their fused calls."""


def _rows_name(method: str) -> str:
    return "grads" if method == "apply_gradients" else "values"


def _pair(slot, value, method: str):
    """A slot's ``(ids, values)`` (or ``(ids, grads)``) of a multi-slot write."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value
    what = _rows_name(method)
    got = f"{len(value)} items" if isinstance(value, (tuple, list)) else type(value).__name__
    raise ValueError(f"slot {slot!r}: expected a pair (ids, {what}), got {got}")


def _uses_core_paths(table) -> bool:
    """Whether ``table`` is an mtht table whose reads and writes are those of HashTable."""
    return isinstance(table, _hash_table.HashTable) and all(
        getattr(type(table), m) is getattr(_hash_table.HashTable, m)
        for m in ("lookup", "assign", "assign_add", "apply_gradients", "write_part"))


def _slot_data_name(method: str) -> str:
    return "slot_to_id_and_" + _rows_name(method)[:-1]  # Monolith's argument: slot_to_id_and_grad, ..._value


def _unknown_slot(slot) -> KeyError:
    return KeyError(f"unknown slot {slot!r}")


@contextlib.contextmanager
def _naming_the_slot(slot):
    """A bad argument of one slot's write is reported with the slot's name (and the error
    keeps the slot and the reason apart: ``slot``, ``reason``)."""
    try:
        yield
    except (ValueError, TypeError) as e:
        if type(e) not in (ValueError, TypeError):  # another class may not take a message alone
            raise
        raise _slot_error(type(e), slot, str(e)) from None


def _slot_error(cls: type, slot, reason: str) -> Exception:
    """``cls("slot 'x': reason")``, keeping the slot and the reason apart (``slot``,
    ``reason``), for a wrapper to name the slot its own way (a merged table's slots)."""
    error = cls(f"slot {slot!r}: {reason}")
    error.slot, error.reason = slot, reason
    return error


@contextlib.contextmanager
def _naming_the_non_finite_slot(method: str, slot_rows: Iterable[Tuple[str, np.ndarray]]):
    """The core reports NaN or Inf by the row of the batch it was given (all slots of a
    merged table together): reported instead by the first slot, among ``slot_rows`` (those
    whose table refuses them), and the row of that slot's own rows."""
    try:
        yield
    except ValueError as e:
        if "NaN or Inf" not in str(e):
            raise
        for slot, rows in slot_rows:
            refuse_non_finite(slot, method, rows)
        raise


def refuse_non_finite(slot, method: str, rows: np.ndarray) -> None:
    """Raise ValueError naming the slot and the first row of ``rows`` holding NaN or Inf."""
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
        what = "gradients" if method == "apply_gradients" else "values"
        raise _slot_error(ValueError, slot, f"{what} contain NaN or Inf (row {int(np.argmax(bad))}); set "
                          "allow_non_finite=True in the table config to accept them") from None


class MultiTypeHashTable(BaseMultiTypeHashTable):
    """One table per slot, built by ``hash_table_factory(slot, config)`` in sorted slot order.

    With mtht's own tables a write changes every slot's table or (raising) none. A factory
    may build other tables (any :class:`~mtht.hash_table.BaseHashTable`, or a subclass of
    HashTable that overrides its reads or writes): their methods are then called slot by
    slot, and a write that fails at one slot leaves the slots before it written."""

    def __init__(self, slot_to_config: Mapping[str, HashTableConfigInstance],
                 hash_table_factory: Callable[[str, HashTableConfigInstance], Any]) -> None:
        self._slot_to_config = dict(as_mapping(slot_to_config, "slot_to_config", "{slot: HashTableConfigInstance}"))
        self._slots = sorted(self._slot_to_config)
        self._tables = {slot: hash_table_factory(slot, self._slot_to_config[slot]) for slot in self._slots}
        for slot, table in self._tables.items():  # a table of the factory's own need only have the methods
            if not all(callable(getattr(table, m, None)) for m in ("lookup", "assign", "assign_add", "apply_gradients")):
                raise TypeError(f"hash_table_factory returned {type(table).__name__} for slot {slot!r}, not a table")
        # Tables of mtht's own are read and written through the core, all slots in one call
        # (and a write to all of them or none); any other table, or one that overrides those
        # methods, through its own methods, slot by slot.
        self._through_core = all(_uses_core_paths(t) for t in self._tables.values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._tables!r})"

    def _slot_table(self, slot):
        try:
            return self._tables[slot]
        except KeyError:
            raise _unknown_slot(slot) from None

    def table_of(self, slot: str) -> Any:
        """The table of ``slot`` (what the factory built for it): for what a slot's table
        offers beyond the multi-slot calls, such as ``stats()``, ``export_serving`` or
        ``evict``. A ``KeyError`` for a slot the table does not have."""
        return self._slot_table(slot)

    def lookup(self, slot_to_id: SlotIds) -> Dict[str, np.ndarray]:
        """``{slot: float32 [n, dim]}`` for the given slots; missing ids read as zeros."""
        try:
            tables = [self._tables[slot] for slot in as_mapping(slot_to_id, "slot_to_id", "{slot: ids}")]
        except KeyError as e:
            raise _unknown_slot(e.args[0]) from None
        try:
            if not self._through_core:
                return {slot: table.lookup(ids) for slot, table, ids in zip(slot_to_id, tables, slot_to_id.values())}
            return dict(zip(slot_to_id, _hash_table.lookup_all(tables, list(slot_to_id.values()))))
        except (ValueError, TypeError):
            # Which slot's ids were bad, found once something failed: a context per slot on
            # every call doubled the time of a lookup of 100 small slots.
            for slot, ids in slot_to_id.items():
                with _naming_the_slot(slot):
                    as_ids(ids)
            raise

    def _update(self, method: str, slot_to_id_and_tensor: Mapping, *args, **kwargs):
        as_mapping(slot_to_id_and_tensor, _slot_data_name(method), "{slot: (ids, rows)}")
        if not self._through_core:  # the factory's tables, slot by slot
            for slot, value in slot_to_id_and_tensor.items():
                ids, tensor = _pair(slot, value, method)
                getattr(self._slot_table(slot), method)(ids, tensor, *args, **kwargs)
            return self
        # Every slot's table is written, or (on any error) none.
        arguments = _hash_table.write_arguments(method, *args, **kwargs)
        try:
            parts = [self._slot_table(slot).write_part(method, *_pair(slot, value, method), arguments)
                     for slot, value in slot_to_id_and_tensor.items()]
        except (ValueError, TypeError):
            # Which slot's arguments were bad, found once something failed: a context per
            # slot on every call took a fifth of a write of 100 small slots.
            for slot, value in slot_to_id_and_tensor.items():
                ids, tensor = _pair(slot, value, method)
                with _naming_the_slot(slot):
                    self._slot_table(slot).write_part(method, ids, tensor, arguments)
            raise
        # Gone through only when the core refuses NaN or Inf: reading 100 slots' configs on
        # every write took 7.7% of the instructions of a step of 10 ids a slot.
        checked = ((slot, part[3]) for slot, part in zip(slot_to_id_and_tensor, parts)
                   if not part[0].config.table_config.allow_non_finite)
        with _naming_the_non_finite_slot(method, checked):
            _hash_table.write_parts(parts, arguments)
        return self

    def assign(self, slot_to_id_and_value: SlotRows, *args: Any, **kwargs: Any) -> "MultiTypeHashTable":
        """``{slot: (ids, values)}``: per-slot :meth:`HashTable.assign`. Returns the table."""
        return self._update("assign", slot_to_id_and_value, *args, **kwargs)

    def assign_add(self, slot_to_id_and_value: SlotRows, *args: Any, **kwargs: Any) -> "MultiTypeHashTable":
        """``{slot: (ids, values)}``: per-slot :meth:`HashTable.assign_add`. Returns the table."""
        return self._update("assign_add", slot_to_id_and_value, *args, **kwargs)

    def apply_gradients(self, slot_to_id_and_grad: SlotRows, *args: Any, **kwargs: Any) -> "MultiTypeHashTable":
        """``{slot: (ids, grads)}, global_step, ...``: per-slot :meth:`HashTable.apply_gradients`."""
        return self._update("apply_gradients", slot_to_id_and_grad, *args, **kwargs)

    def reinitialize(self, slot: str, ids: ArrayInput) -> np.ndarray:
        """Not supported, as in Monolith: raises NotImplementedError."""
        raise NotImplementedError("MultiTypeHashTable does not support reinitialize")

    def as_op(self, name: Optional[str] = None) -> "MultiTypeHashTable":
        """Wait until every write issued to any slot's table has been applied (those queued
        by hooks too: :mod:`mtht.hooks`)."""
        self._wait_for_hooks()
        for table in self._tables.values():
            table.as_op()
        return self

    def get_table_dim_sizes(self) -> List[int]:
        """Dims of the slots' tables, in sorted slot order."""
        return [self._tables[slot].dim_size for slot in self._slots]

    def learning_rates(self, global_step: IntegerInput, slots: Optional[Sequence[str]] = None) -> np.ndarray:
        """Every slot's per-segment learning rates, in sorted slot order (the fused update's),
        or those of ``slots``, in their order."""
        rates = [self._slot_to_config[slot].call_learning_rate_fns(global_step)
                 for slot in (self._slots if slots is None else slots)]
        return np.concatenate(rates).astype(np.float32) if rates else np.zeros(0, np.float32)

    def fused_lookup(self, ids: ArrayInput, fused_slot_size: ArrayInput, num_of_shards: IntegerInput,
                     req_time: Optional[IntegerInput] = None, out: Optional[np.ndarray] = None
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:func:`mtht.hash_table.fused_lookup` over this table's slots in sorted order."""
        return _hash_table.fused_lookup([self._tables[s] for s in self._slots], ids, fused_slot_size,
                                        num_of_shards, req_time, out=out)

    def fused_apply_gradient(self, ids: ArrayInput, indices: ArrayInput, fused_slot_size: ArrayInput,
                             id_grads: ArrayInput, id_offsets: ArrayInput, grad_offsets: ArrayInput,
                             global_step: IntegerInput, req_time: Optional[IntegerInput], num_of_shards: IntegerInput,
                             enable_grad_accumulation: Switch = False) -> "MultiTypeHashTable":
        """:func:`mtht.hash_table.fused_apply_gradient` with the learning rates of every slot
        at ``global_step`` (note Monolith's argument order: global_step before req_time)."""
        _hash_table.fused_apply_gradient([self._tables[s] for s in self._slots], ids, indices, fused_slot_size,
                                         id_grads, id_offsets, grad_offsets, self.learning_rates(global_step),
                                         req_time, global_step, num_of_shards, enable_grad_accumulation)
        return self


@dataclasses.dataclass
class _IndexedValues:
    """Values merged from several slots, under Monolith's name: ``value[i]`` came from slot
    ``slots[index[i]]`` (``index`` int64, each in ``[0, len(slots))``)."""

    slots: List[str]
    index: np.ndarray
    value: np.ndarray


def _md5(names: List[str]) -> str:
    return hashlib.md5(",".join(names).encode("utf-8")).hexdigest()


_OLD_SLOT_NAME = re.compile(r"^fc_slot_[0-9]*$")


class MergedMultiTypeHashTable(BaseMultiTypeHashTable):
    """Merges the slots whose configs are equal (``str(config)``) into one table named
    ``md5(",".join(sorted slots))`` and builds the inner multi-type table with
    ``factory(merged_slot_to_config)``. Ids of different slots in one group share entries."""

    def __init__(self, slot_to_config: Mapping[str, HashTableConfigInstance],
                 factory: Callable[[Dict[str, HashTableConfigInstance]], Any]) -> None:
        as_mapping(slot_to_config, "slot_to_config", "{slot: HashTableConfigInstance}")
        for slot, config in slot_to_config.items():
            if not isinstance(config, HashTableConfigInstance):
                raise TypeError(f"the config of slot {slot!r} must be a HashTableConfigInstance, got "
                                f"{type(config).__name__}")
        groups: Dict[str, List[str]] = {}
        for slot in sorted(slot_to_config):
            groups.setdefault(str(slot_to_config[slot]), []).append(slot)
        self._slot_mapping: Dict[str, str] = {}
        self._merged_slot_to_config: Dict[str, HashTableConfigInstance] = {}
        for slots in groups.values():
            merged_name = _md5(slots)
            if merged_name in self._merged_slot_to_config:  # slot names with commas: "a,b" alone and "a", "b"
                other = [s for s, m in self._slot_mapping.items() if m == merged_name]
                raise ValueError(f"slots {slots} and slots {other} have different configs but the same merged "
                                 f"name md5({','.join(slots)!r}); rename a slot (no commas in slot names)")
            # A copy: the caller's config (and its extra_restore_names) stays as it was, and
            # later changes to it do not reach the merged table (as they do not reach a table).
            merged_config = slot_to_config[slots[0]]._copy_for_a_table()
            old_name = _md5([s[3:] if _OLD_SLOT_NAME.match(s) else s for s in slots])
            if old_name != merged_name:
                merged_config.extra_restore_names.append(old_name)
            self._merged_slot_to_config[merged_name] = merged_config
            for slot in slots:
                self._slot_mapping[slot] = merged_name
        self._dims = {m: infer_dim_size(c.table_config) for m, c in self._merged_slot_to_config.items()}
        self._refuses_non_finite = {m: not c.table_config.allow_non_finite
                                    for m, c in self._merged_slot_to_config.items()}
        self._table = factory(self._merged_slot_to_config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(slot_mapping={self._slot_mapping!r}, table={self._table!r})"

    @property
    def slot_mapping(self) -> Dict[str, str]:
        """``{slot: merged table name}``."""
        return dict(self._slot_mapping)

    def _merged_name(self, slot) -> str:
        try:
            return self._slot_mapping[slot]
        except KeyError:
            raise _unknown_slot(slot) from None

    def table_of(self, slot: str) -> Any:
        """The table that holds the entries of ``slot``: its group's, shared with the other
        slots of the group (``slot_mapping``), from the inner table's ``table_of``. A
        ``KeyError`` for a slot the table does not have."""
        merged = self._merged_name(slot)
        inner_table_of = getattr(self._table, "table_of", None)
        if inner_table_of is None:
            raise TypeError(f"the inner table, a {type(self._table).__name__}, has no table_of")
        return inner_table_of(merged)

    def _dim(self, merged_name: str) -> int:
        return self._dims[merged_name]

    def _get_merged_to_indexed_tensor(self, slot_to_tensor: Mapping, rows: bool,
                                      slot_sizes: Optional[Mapping] = None) -> Tuple[dict, dict]:
        """Concatenate per merged table, in sorted slot order: ``({merged: array},
        {merged: sizes})``. ``rows`` converts each tensor to ``[n, dim]`` float32, with n the
        slot's id count from ``slot_sizes`` when given; otherwise the tensors are ids."""
        try:
            return self._merged_tensors(slot_to_tensor, rows, slot_sizes, named=False)
        except (KeyError, ValueError, TypeError):
            # Which slot was bad, found once something failed (naming every slot on every
            # call took a sixth of a merged step of 100 slots of 10 ids).
            self._merged_tensors(slot_to_tensor, rows, slot_sizes, named=True)
            raise

    def _merged_tensors(self, slot_to_tensor: Mapping, rows: bool, slot_sizes: Optional[Mapping],
                        named: bool) -> Tuple[dict, dict]:
        """_get_merged_to_indexed_tensor's work; ``named``: an error names the slot."""
        parts: Dict[str, list] = {}
        sizes: Dict[str, list] = {}
        mapping = self._slot_mapping
        for slot in sorted(slot_to_tensor):
            merged = mapping[slot] if slot in mapping else self._merged_name(slot)
            tensor = slot_to_tensor[slot]
            if rows:
                name = f"slot {slot!r}: values" if named else "values"
                a = as_numpy(tensor, name)
                n = slot_sizes[slot] if slot_sizes is not None else (a.shape[0] if a.ndim >= 1 else 1)
                tensor = as_rows(a, n, self._dims[merged], name)
            else:
                tensor = as_ids(tensor, f"slot {slot!r}: ids" if named else "ids")
            if merged in parts:
                parts[merged].append(tensor)
                sizes[merged].append(tensor.shape[0])
            else:
                parts[merged], sizes[merged] = [tensor], [tensor.shape[0]]
        return ({m: joined(p) for m, p in parts.items()},
                {m: np.asarray(s, dtype=np.int64) for m, s in sizes.items()})

    @overload
    def lookup(self, slot_to_id: SlotIds, auxiliary_bundle: None = None,
               early_reorder_indicies_res_pack: None = None) -> Dict[str, np.ndarray]: ...

    @overload
    def lookup(self, slot_to_id: SlotIds, auxiliary_bundle: Optional[Dict[str, Any]],
               early_reorder_indicies_res_pack: Any = None
               ) -> Union[Dict[str, np.ndarray], Tuple[Dict[str, np.ndarray], Dict[str, Any]]]: ...

    def lookup(self, slot_to_id: SlotIds, auxiliary_bundle: Optional[Dict[str, Any]] = None,
               early_reorder_indicies_res_pack: Any = None
               ) -> Union[Dict[str, np.ndarray], Tuple[Dict[str, np.ndarray], Dict[str, Any]]]:
        """``{slot: float32 [n, dim]}``, or ``(that, auxiliary_bundle)`` when the bundle still
        holds something after use (Monolith's convention)."""
        if auxiliary_bundle is None:
            auxiliary_bundle = {}
        as_mapping(slot_to_id, "slot_to_id", "{slot: ids}")
        with self._on_every_rank("lookup"):
            merged_ids, merged_sizes = (None, None) if early_reorder_indicies_res_pack else \
                self._get_merged_to_indexed_tensor(slot_to_id, rows=False)
        if early_reorder_indicies_res_pack:
            merged_slot_to_sizes, res_pack = early_reorder_indicies_res_pack
            auxiliary_bundle["merged_slot_to_sizes"] = merged_slot_to_sizes
            merged_emb, auxiliary_bundle = self._table.lookup(
                {m: None for m in merged_slot_to_sizes}, auxiliary_bundle, res_pack)
        else:
            auxiliary_bundle["merged_slot_to_sizes"] = merged_sizes
            merged_emb = self._table.lookup(merged_ids)
        merged_to_slots: Dict[str, List[str]] = {}
        for slot in sorted(slot_to_id):
            if slot in self._slot_mapping:
                merged_to_slots.setdefault(self._slot_mapping[slot], []).append(slot)
        sizes = auxiliary_bundle.pop("merged_slot_to_sizes")
        result: Dict[str, np.ndarray] = {}
        for merged, emb in merged_emb.items():
            ends = np.cumsum(sizes[merged]).tolist()
            result.update(zip(merged_to_slots[merged], (emb[b:e] for b, e in zip([0] + ends[:-1], ends))))
        if auxiliary_bundle:
            return result, auxiliary_bundle
        return result

    @contextlib.contextmanager
    def _on_every_rank(self, what: str):
        """Arguments found bad here, before the inner table is called: on a table sharded
        over processes (mtht.distributed), whose other processes are making the call, they
        are raised on every process."""
        try:
            yield
        except Exception as e:
            if getattr(self._table, "calls_are_collective", False):
                self._table.raise_on_every_rank(e, what)
            raise

    def _update(self, method: str, data: Mapping, *args, **kwargs):
        as_mapping(data, _slot_data_name(method), "{slot: (ids, rows)}")
        if kwargs.pop("skip_merge_id", False):
            with self._on_every_rank(method):
                merged_rows, _ = self._get_merged_to_indexed_tensor(data, rows=True)
            getattr(self._table, method)(merged_rows, *args, **kwargs)
            return self
        with self._on_every_rank(method):
            try:
                ids, rows, checked = self._merged_pairs(method, data, named=False)
            except (KeyError, ValueError, TypeError):
                self._merged_pairs(method, data, named=True)  # raises, naming the slot
                raise
        with _naming_the_non_finite_slot(method, checked), self._naming_the_merged_slots(data):
            getattr(self._table, method)({m: (joined(ids[m]), joined(rows[m])) for m in ids},
                                         *args, **kwargs)
        return self

    def _merged_pairs(self, method: str, data: Mapping, named: bool) -> Tuple[dict, dict, list]:
        """Per merged table, in sorted slot order: the slots' ids, and their rows (as many as
        ids); and ``(slot, rows)`` of the slots whose table refuses NaN and Inf. ``named``:
        errors name the slot (slower: the names are made for every slot)."""
        ids: Dict[str, list] = {}
        rows: Dict[str, list] = {}
        checked = []
        mapping, dims, finite_only = self._slot_mapping, self._dims, self._refuses_non_finite
        rows_name = _rows_name(method)
        for slot in sorted(data):
            merged = mapping[slot] if slot in mapping else self._merged_name(slot)
            given_ids, given_rows = _pair(slot, data[slot], method)
            slot_ids = as_ids(given_ids, f"slot {slot!r}: ids" if named else "ids")
            slot_rows = as_rows(given_rows, slot_ids.shape[0], dims[merged],
                                f"slot {slot!r}: {rows_name}" if named else rows_name)
            if merged in ids:
                ids[merged].append(slot_ids)
                rows[merged].append(slot_rows)
            else:
                ids[merged], rows[merged] = [slot_ids], [slot_rows]
            if finite_only[merged]:
                checked.append((slot, slot_rows))
        return ids, rows, checked

    @contextlib.contextmanager
    def _naming_the_merged_slots(self, given: Mapping) -> Iterator[None]:
        """An error the inner table raises names a merged table as its slot
        (_naming_the_slot), and so does another rank's (a DistributedError of a sharded inner
        table): reported instead with the slots of ``given`` (the call's) that the merged
        table holds."""
        try:
            yield
        except Exception as e:
            merged, reason = getattr(e, "slot", None), getattr(e, "reason", None)
            slots = sorted(s for s in given if self._slot_mapping.get(s) == merged)
            if not slots or reason is None:
                raise
            named = ", ".join(repr(s) for s in slots)
            text = f"slot{'s' if len(slots) > 1 else ''} {named} (merged table {merged!r}): {reason}"
            if type(e) in (ValueError, TypeError):
                raise type(e)(text) from None
            rename = getattr(e, "naming_the_slot_as", None)  # another rank's error (mtht.distributed)
            if rename is None:
                raise
            raise rename(text) from None

    def assign(self, slot_to_id_and_value: SlotRows, *args: Any, **kwargs: Any) -> "MergedMultiTypeHashTable":
        """``{slot: (ids, values)}``, merged per group: the inner table's ``assign``."""
        return self._update("assign", slot_to_id_and_value, *args, **kwargs)

    def assign_add(self, slot_to_id_and_value: SlotRows, *args: Any, **kwargs: Any) -> "MergedMultiTypeHashTable":
        """``{slot: (ids, values)}``, merged per group: the inner table's ``assign_add``."""
        return self._update("assign_add", slot_to_id_and_value, *args, **kwargs)

    def apply_gradients(self, slot_to_id_and_grad: SlotRows, *args: Any,
                        **kwargs: Any) -> "MergedMultiTypeHashTable":
        """``{slot: (ids, grads)}, global_step, ...``, merged per group: the inner table's
        ``apply_gradients``."""
        return self._update("apply_gradients", slot_to_id_and_grad, *args, **kwargs)

    def reinitialize(self, slot: str, ids: ArrayInput) -> np.ndarray:
        """Not supported, as in Monolith: raises NotImplementedError."""
        raise NotImplementedError("MergedMultiTypeHashTable does not support reinitialize")

    def as_op(self, name: Optional[str] = None) -> "MergedMultiTypeHashTable":
        """Wait until every write has been applied (those queued by hooks too)."""
        self._wait_for_hooks()
        self._table.as_op(name)
        return self

    def get_table_dim_sizes(self) -> List[int]:
        """Dims of the merged tables in merged-name order (computed from the configs)."""
        return [self._dim(m) for m in sorted(self._merged_slot_to_config)]
