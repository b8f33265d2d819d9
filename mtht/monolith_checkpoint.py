"""Monolith's single-table checkpoint files, read and written (``pip install mtht[monolith]``).

Monolith saves a table as ``<basename>-%05d-of-%05d`` files, each a TFRecord stream (every
record framed by its length and masked CRC32C checksums) of serialized ``EntryDump``
protobuf messages: the id, the raw stored floats, one optimizer dump per segment (none for
moving average) and the last update time. The message types are declared here from
Monolith's field numbers, so no generated code is needed; protobuf and google-crc32c do the
encoding and the checksums.
"""

from __future__ import annotations

import math
import os
import re
import struct
from typing import Dict, List, Tuple

import numpy as np

from mtht._spec import _STATE_LAYOUT
from mtht.checkpoint import file_count

__all__ = ["save_monolith", "restore_monolith", "entry_dump_class", "write_tfrecords", "read_tfrecords"]

_MASK_DELTA = 0xA282EAD8

# Optimizer dump messages: (oneof field number in SingleOptimizerDump, message name,
# fields as (name, number, type)). "repeated" floats are unpacked (proto2), as Monolith's.
_DUMPS = {
    "adagrad": (1, "AdagradDump", [("norm", 1, "rf")]),
    "sgd": (2, "SgdDump", []),
    "ftrl": (3, "FtrlDump", [("zero", 1, "rf"), ("norm", 2, "rf")]),
    "dynamic_wd_adagrad": (4, "DynamicWdAdagradDump", [("norm", 1, "rf"), ("last_update_step", 2, "i64")]),
    "adadelta": (6, "AdadeltaDump", [("accum", 1, "rf"), ("accum_update", 2, "rf")]),
    "adam": (7, "AdamDump", [("m", 1, "rf"), ("v", 2, "rf"), ("beta1_power", 3, "f"), ("beta2_power", 4, "f")]),
    "amsgrad": (8, "AmsgradDump", [("m", 1, "rf"), ("v", 2, "rf"), ("vhat", 3, "rf"), ("beta1_power", 4, "f"),
                                   ("beta2_power", 5, "f")]),
    "momentum": (9, "MomentumDump", [("n", 1, "rf")]),
    "rmsprop": (11, "RmspropDump", [("n", 1, "rf")]),
    "rmspropv2": (12, "Rmspropv2Dump", [("n", 1, "rf")]),
    "group_ftrl": (13, "GroupFtrlDump", [("zero", 1, "rf"), ("norm", 2, "rf")]),
    "batch_softmax": (14, "BatchSoftmaxDump", [("global_step", 1, "i64")]),
    "group_adagrad": (15, "GroupAdagradDump", [("grad_square_sum", 1, "f")]),
}

_CLASSES = None


def _require():
    try:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
        import google_crc32c
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("the Monolith checkpoint format needs protobuf and google-crc32c: "
                          "pip install 'mtht[monolith]'") from e
    return descriptor_pb2, descriptor_pool, message_factory, google_crc32c


def entry_dump_class():
    """The ``EntryDump`` message class (Monolith's field numbers)."""
    global _CLASSES
    if _CLASSES is None:
        descriptor_pb2, descriptor_pool, message_factory, _ = _require()
        F = descriptor_pb2.FieldDescriptorProto
        types = {"rf": (F.TYPE_FLOAT, F.LABEL_REPEATED), "f": (F.TYPE_FLOAT, F.LABEL_OPTIONAL),
                 "i64": (F.TYPE_INT64, F.LABEL_OPTIONAL)}
        fdp = descriptor_pb2.FileDescriptorProto(name="mtht_monolith_entry_dump.proto",
                                                 package="mtht.monolith", syntax="proto2")
        single = descriptor_pb2.DescriptorProto(name="SingleOptimizerDump")
        single.oneof_decl.add(name="type")
        for kind, (number, msg_name, fields) in _DUMPS.items():
            msg = fdp.message_type.add(name=msg_name)
            for fname, fnum, ftype in fields:
                t, label = types[ftype]
                msg.field.add(name=fname, number=fnum, type=t, label=label)
            single.field.add(name=kind, number=number, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                             type_name=f".mtht.monolith.{msg_name}", oneof_index=0)
        fdp.message_type.append(single)
        opt = fdp.message_type.add(name="OptimizerDump")
        opt.field.add(name="dump", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                      type_name=".mtht.monolith.SingleOptimizerDump")
        entry = fdp.message_type.add(name="EntryDump")
        entry.field.add(name="id", number=1, type=F.TYPE_SFIXED64, label=F.LABEL_OPTIONAL)
        entry.field.add(name="num", number=2, type=F.TYPE_FLOAT, label=F.LABEL_REPEATED)
        entry.field.add(name="opt", number=3, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                        type_name=".mtht.monolith.OptimizerDump")
        entry.field.add(name="last_update_ts_sec", number=4, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
        pool = descriptor_pool.DescriptorPool()
        pool.Add(fdp)
        _CLASSES = message_factory.GetMessageClass(pool.FindMessageTypeByName("mtht.monolith.EntryDump"))
    return _CLASSES


def _mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def write_tfrecords(path: str, records) -> None:
    """Write ``records`` (bytes) as a TFRecord file."""
    crc32c = _require()[3].value  # once: imported again for every record, it took a third of the time
    with open(path, "wb") as f:
        for data in records:
            length = struct.pack("<Q", len(data))
            f.write(length)
            f.write(struct.pack("<I", _mask(crc32c(length))))
            f.write(data)
            f.write(struct.pack("<I", _mask(crc32c(data))))
        f.flush()
        os.fsync(f.fileno())


def read_tfrecords(path: str):
    """Yield the records of a TFRecord file, checking both checksums of each."""
    crc32c = _require()[3].value
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while True:
            head = f.read(12)
            if not head:
                return
            if len(head) < 12:
                raise ValueError(f"{path}: truncated record header")
            length_bytes, (length_crc,) = head[:8], struct.unpack("<I", head[8:])
            if _mask(crc32c(length_bytes)) != length_crc:
                raise ValueError(f"{path}: corrupt record length")
            (length,) = struct.unpack("<Q", length_bytes)
            if length + 4 > size - f.tell():
                raise ValueError(f"{path}: truncated record (its length runs past the end of the file)")
            data = f.read(length)
            tail = f.read(4)
            if len(data) < length or len(tail) < 4:
                raise ValueError(f"{path}: truncated record")
            if _mask(crc32c(data)) != struct.unpack("<I", tail)[0]:
                raise ValueError(f"{path}: corrupt record (checksum mismatch)")
            yield data


def _segments(table) -> List[Tuple[str, int]]:
    return [(seg.optimizer.kind, int(seg.dim_size)) for seg in table.config.table_config.entry_config.segments]


def _state_plan(segments) -> List[Tuple[str, List[Tuple[str, str, int]]]]:
    """For each segment with an optimizer dump, in order: (kind, [(field, type, floats)])."""
    plan = []
    for kind, dim in segments:
        if kind == "moving_average":
            continue
        fields = [(fname, ftype, per_dim * dim + extra)
                  for (_, per_dim, extra, _), (fname, _, ftype) in zip(_STATE_LAYOUT[kind], _DUMPS[kind][2])]
        plan.append((kind, fields))
    return plan


def _state_columns(plan, state: np.ndarray) -> List[Tuple[str, List[Tuple[str, str, list]]]]:
    """``plan`` with each field's values for every row of ``state`` (raw state floats, one
    row per entry) as Python objects: a list of floats per row for a repeated field, a
    float or an int (its two words, bit for bit) for a single one."""
    columns = []
    offset = 0
    for kind, fields in plan:
        cols = []
        for fname, ftype, length in fields:
            words = state[:, offset:offset + length]
            if ftype == "rf":
                cols.append((fname, ftype, words.tolist()))
            elif ftype == "f":
                cols.append((fname, ftype, words[:, 0].tolist()))
            else:
                cols.append((fname, ftype, np.ascontiguousarray(words).view(np.int64)[:, 0].tolist()))
            offset += length
        columns.append((kind, cols))
    return columns


def _encode(entry, columns, k: int) -> None:
    """Fill ``entry.opt`` from row ``k`` of ``columns`` (_state_columns)."""
    entry.opt.SetInParent()
    for kind, cols in columns:
        dump = getattr(entry.opt.dump.add(), kind)
        dump.SetInParent()
        for fname, ftype, col in cols:
            if ftype == "rf":
                getattr(dump, fname).extend(col[k])
            else:
                setattr(dump, fname, col[k])


def _decode(entry, plan, state: list, int_fields: list, row: int) -> None:
    """Append one entry's raw state floats from ``entry.opt`` to ``state``; an int64 field
    takes two placeholder words, and (row, offset in the row's state, value) goes to
    ``int_fields`` (its words are set from the integer, bit for bit, later). ValueError
    when the dumps do not match the table's layout."""
    dumps = entry.opt.dump
    if len(dumps) != len(plan):
        raise ValueError(f"entry {entry.id}: {len(dumps)} optimizer dumps, the table's layout needs "
                         f"{len(plan)} ({', '.join(kind for kind, _ in plan)})")
    start = len(state)
    for d, (kind, fields) in zip(dumps, plan):
        if d.WhichOneof("type") != kind:
            raise ValueError(f"entry {entry.id}: optimizer dump is {d.WhichOneof('type')!r}, the table has {kind!r}")
        dump = getattr(d, kind)
        for fname, ftype, length in fields:
            if ftype == "rf":
                values = getattr(dump, fname)
                if len(values) != length:
                    raise ValueError(f"entry {entry.id}: {kind}.{fname} has {len(values)} values, expected {length}")
                state.extend(values)
            elif ftype == "f":
                state.append(getattr(dump, fname))
            else:
                int_fields.append((row, len(state) - start, getattr(dump, fname)))
                state.extend((0.0, 0.0))


def save_monolith(table, basename: str) -> None:
    """Write ``table`` as Monolith's ``<basename>-%05d-of-%05d`` TFRecord files (entries
    expired at the table's max_update_ts are left out, as Monolith does). Each file is
    written under a temporary name and renamed into place."""
    entry_cls = entry_dump_class()
    basename = os.fspath(basename)
    if os.path.dirname(basename):
        os.makedirs(os.path.dirname(basename), exist_ok=True)
    core = table._core
    core.pin_layout()  # the shards stay as they are while they are read one at a time
    try:
        n = file_count(table)
        plan = _state_plan(_segments(table))
        dim = table.dim_size
        now = core.max_update_ts
        for i in range(n):
            path = "%s-%05d-of-%05d" % (basename, i, n)
            tmp = f"{path}-tmp-{os.getpid()}"

            def records(i=i):
                for s in range(*core.shards_of_part(i, n)):
                    ids, ts, data = core.dump_shard(s, i, n, now, True)
                    # A shard's arrays made into Python objects at once: per entry, numpy
                    # calls took most of a save's time.
                    id_list, ts_list, values = ids.tolist(), ts.tolist(), data[:, :dim].tolist()
                    columns = _state_columns(plan, data[:, dim:])
                    for k in range(len(id_list)):
                        e = entry_cls(id=id_list[k], last_update_ts_sec=ts_list[k])
                        e.num.extend(values[k])
                        _encode(e, columns, k)
                        yield e.SerializeToString()

            write_tfrecords(tmp, records())
            os.replace(tmp, path)
    finally:
        core.unpin_layout()
    # Files of an earlier save with another file count would make the set ambiguous.
    for other in _all_shard_files(basename):
        if not other.endswith("-of-%05d" % n):
            os.unlink(other)


def _shard_pattern(basename: str):
    return re.compile(re.escape(os.path.basename(basename)) + r"-(\d{5})-of-(\d{5})$")


def _all_shard_files(basename: str) -> List[str]:
    directory = os.path.dirname(basename) or "."
    pattern = _shard_pattern(basename)
    return [os.path.join(directory, name) for name in os.listdir(directory) if pattern.match(name)]


def _shard_files(basename: str) -> List[str]:
    directory = os.path.dirname(basename) or "."
    pattern = _shard_pattern(basename)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no Monolith checkpoint files {basename}-NNNNN-of-NNNNN")
    found: Dict[int, Dict[int, str]] = {}
    for name in os.listdir(directory):
        m = pattern.match(name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = os.path.join(directory, name)
    if not found:
        raise FileNotFoundError(f"no Monolith checkpoint files {basename}-NNNNN-of-NNNNN")
    if len(found) > 1:
        raise ValueError(f"Monolith checkpoint {basename!r} mixes shard counts {sorted(found)}")
    (count, files), = found.items()
    missing = [i for i in range(count) if i not in files]
    if missing:
        raise FileNotFoundError(f"Monolith checkpoint {basename!r}: shard {missing[0]} of {count} is missing")
    return [files[i] for i in range(count)]


def restore_monolith(table, basename: str) -> None:
    """Replace the contents of ``table`` with Monolith's checkpoint files at ``basename``.
    Everything is parsed and checked (checksums, shard set, optimizer layout) into a fresh
    table first; on any error the table is left as it was."""
    entry_cls = entry_dump_class()
    plan = _state_plan(_segments(table))
    dim = table.dim_size
    core = table._new_core()
    state_width = core.state_dim
    max_ts = None
    allow_non_finite = bool(table.config.table_config.allow_non_finite)
    batch = 8192
    # A batch of entries is gathered in Python lists and made into arrays once: per entry,
    # numpy calls took most of a restore's time.
    ids: List[int] = []
    stamps: List[int] = []
    values: List[float] = []
    state: List[float] = []
    int_fields: List[Tuple[int, int, int]] = []

    def flush():
        if not ids:
            return
        rows = np.empty((len(ids), dim + state_width), dtype=np.float32)
        rows[:, :dim] = np.asarray(values, dtype=np.float32).reshape(len(ids), dim)
        rows[:, dim:] = np.asarray(state, dtype=np.float32).reshape(len(ids), state_width)
        for row, offset, value in int_fields:
            rows[row, dim + offset:dim + offset + 2] = np.array([value], dtype=np.int64).view(np.float32)
        core.load_entries(np.array(ids, dtype=np.int64), np.array(stamps, dtype=np.int64), rows)
        for pending in (ids, stamps, values, state, int_fields):
            pending.clear()

    for path in _shard_files(os.fspath(basename)):
        for record in read_tfrecords(path):
            e = entry_cls()
            try:
                e.ParseFromString(record)
            except Exception as err:
                raise ValueError(f"{path}: unable to parse an EntryDump record ({err})") from None
            num = e.num
            if len(num) != dim:
                raise ValueError(f"{path}: entry {e.id} has {len(num)} values, the table has dim {dim}")
            _decode(e, plan, state, int_fields, len(ids))
            # The sum is finite exactly when every value is: float32 values summed as doubles
            # cannot overflow.
            if not allow_non_finite and not math.isfinite(sum(num)):
                raise ValueError(f"{path}: entry {e.id} holds NaN or Inf values; the table does not allow them")
            values.extend(num)
            ids.append(e.id)
            ts = e.last_update_ts_sec
            stamps.append(ts)
            if max_ts is None or ts > max_ts:
                max_ts = ts
            if len(ids) >= batch:
                flush()
    flush()
    limit = core.max_entries
    if limit and core.size() > limit:
        raise ValueError(f"Monolith checkpoint {basename!r} holds {core.size()} entries, more than the "
                         f"table's max_entries = {limit}")
    core.max_update_ts = 0 if max_ts is None else max_ts
    table._swap_core(core)
