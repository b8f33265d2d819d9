"""Monolith's single-table checkpoint files, read and written.

Monolith saves a table as ``<basename>-%05d-of-%05d`` files, each a TFRecord stream (every
record framed by its length and masked CRC32C checksums) of serialized ``EntryDump``
protobuf messages: the id, the raw stored floats, one optimizer dump per segment (none for
moving average) and the last update time. The C++ core encodes and decodes them
(``mtht/monolith_format.h``) from the schema declared here, Monolith's field numbers, and
reads and writes the files in parallel. Only ``entry_dump_class``, for looking at records
from Python, needs protobuf (``pip install mtht[monolith]``).
"""

from __future__ import annotations

import os
import re
import secrets
import struct
from typing import Any, Dict, Iterable, Iterator, List, Tuple

from mtht import _core
from mtht import hash_table as _hash_table
from mtht._arrays import StrPath
from mtht._spec import _STATE_LAYOUT
from mtht.checkpoint import (_directory_of, _over_tables, _over_tables_settled, _remove, _turn, directory_lock, file_count,
                             file_prefix)

__all__ = ["save_monolith", "restore_monolith", "save_monolith_tables", "restore_monolith_tables", "asset_prefix",
           "entry_dump_class", "write_tfrecords", "read_tfrecords"]

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
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # type: ignore[import-untyped]
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("entry_dump_class needs protobuf: pip install 'mtht[monolith]'") from e
    return descriptor_pb2, descriptor_pool, message_factory


def entry_dump_class() -> Any:
    """The ``EntryDump`` message class (Monolith's field numbers)."""
    global _CLASSES
    if _CLASSES is None:
        descriptor_pb2, descriptor_pool, message_factory = _require()
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
        descriptor = pool.FindMessageTypeByName("mtht.monolith.EntryDump")
        if hasattr(message_factory, "GetMessageClass"):
            _CLASSES = message_factory.GetMessageClass(descriptor)
        else:  # protobuf before 4.22
            _CLASSES = message_factory.MessageFactory(pool).GetPrototype(descriptor)
    return _CLASSES


def _masked_crc32c(data: bytes) -> int:
    crc = _core.crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def write_tfrecords(path: str, records: Iterable[bytes]) -> None:
    """Write ``records`` (bytes) as a TFRecord file."""
    with open(path, "wb") as f:
        for data in records:
            length = struct.pack("<Q", len(data))
            f.write(length)
            f.write(struct.pack("<I", _masked_crc32c(length)))
            f.write(data)
            f.write(struct.pack("<I", _masked_crc32c(data)))
        f.flush()
        os.fsync(f.fileno())


def read_tfrecords(path: str) -> Iterator[bytes]:
    """Yield the records of a TFRecord file, checking both checksums of each."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while True:
            head = f.read(12)
            if not head:
                return
            if len(head) < 12:
                raise ValueError(f"{path}: truncated record header")
            length_bytes, (length_crc,) = head[:8], struct.unpack("<I", head[8:])
            if _masked_crc32c(length_bytes) != length_crc:
                raise ValueError(f"{path}: corrupt record length")
            (length,) = struct.unpack("<Q", length_bytes)
            if length + 4 > size - f.tell():
                raise ValueError(f"{path}: truncated record (its length runs past the end of the file)")
            data = f.read(length)
            tail = f.read(4)
            if len(data) < length or len(tail) < 4:
                raise ValueError(f"{path}: truncated record")
            if _masked_crc32c(data) != struct.unpack("<I", tail)[0]:
                raise ValueError(f"{path}: corrupt record (checksum mismatch)")
            yield data


def _segments(table) -> List[Tuple[str, int]]:
    return [(seg.optimizer.kind, int(seg.dim_size)) for seg in table.config.table_config.entry_config.segments]


# Monolith's own default when saver_parallel is not set: one file per million entries, 1 to 4
# (mtht's own format writes one per half million).
_MONOLITH_ENTRIES_PER_FILE = 1_000_000

# How the core takes a dump field: repeated float, float, int64 (monolith_format.h).
_FIELD_TYPES = {"rf": 0, "f": 1, "i64": 2}
_MEMBERS = [(number, kind) for kind, (number, _, _) in _DUMPS.items()]


def _format(table) -> List[Tuple[int, List[Tuple[int, int, int, str]]]]:
    """For each segment with an optimizer dump, in order: (oneof number, [(field number,
    type, state words, name)])."""
    dumps = []
    for kind, dim in _segments(table):
        if kind == "moving_average":
            continue
        number, _, fields = _DUMPS[kind]
        dumps.append((number, [(fnum, _FIELD_TYPES[ftype], per_dim * dim + extra, fname)
                               for (_, per_dim, extra, _), (fname, fnum, ftype) in zip(_STATE_LAYOUT[kind], fields)]))
    return dumps


def _write_temporaries(table, basename: str) -> List[Tuple[str, str]]:
    """Write ``table``'s files under temporary names, in parallel; returns the (temporary,
    final) path of each. On an error, what was written is removed."""
    core = table._core
    n = file_count(table, _MONOLITH_ENTRIES_PER_FILE)
    paths = ["%s-%05d-of-%05d" % (basename, i, n) for i in range(n)]
    _remove(_temporaries_on_disk(basename))  # left by a save that was killed
    temporary = [_temporary_name(path) for path in paths]
    try:
        core.save_monolith_files(temporary, core.max_update_ts, _format(table), _MEMBERS)
    except BaseException:
        _remove(temporary)
        raise
    return list(zip(temporary, paths))


def _temporary_name(path: str) -> str:
    return f"{path}-tmp-{os.getpid()}-{secrets.token_hex(4)}"


def _temporaries_on_disk(basename: str) -> List[str]:
    """This basename's temporaries (_temporary_name's names exactly: another table's files
    may start with the same characters)."""
    directory = os.path.dirname(basename) or "."
    pattern = re.compile(re.escape(os.path.basename(basename)) + r"-\d{5}-of-\d{5}-tmp-\d+-[0-9a-f]{8}")
    try:
        return [os.path.join(directory, name) for name in os.listdir(directory) if pattern.fullmatch(name)]
    except FileNotFoundError:
        return []


def _publish(basename: str, moves: List[Tuple[str, str]]) -> None:
    """Rename written files into place; then remove the files of an earlier save with
    another file count, which would make the set ambiguous."""
    try:
        for tmp, path in moves:
            os.replace(tmp, path)
    except BaseException:
        _remove([tmp for tmp, _ in moves])
        raise
    _remove([other for other in _all_shard_files(basename) if not other.endswith("-of-%05d" % len(moves))])


def save_monolith(table: _hash_table.HashTable, basename: StrPath) -> None:
    """Write ``table`` as Monolith's ``<basename>-%05d-of-%05d`` TFRecord files (entries
    expired at the table's max_update_ts are left out, as Monolith does). The files are
    written in parallel under temporary names and renamed into place."""
    basename = os.fsdecode(basename)
    file_prefix(basename)
    if os.path.dirname(basename):
        os.makedirs(os.path.dirname(basename), exist_ok=True)
    with _turn(basename), directory_lock(_directory_of(basename), exclusive=True):
        with _hash_table.writes_held([table]):
            moves = _write_temporaries(table, basename)
        _publish(basename, moves)


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
    if len(found) == 1:
        (count, files), = found.items()
        missing = [i for i in range(count) if i not in files]
        if missing:
            raise FileNotFoundError(f"Monolith checkpoint {basename!r}: shard {missing[0]} of {count} is missing")
        return [files[i] for i in range(count)]
    return _latest_whole_set(basename, found)


def _latest_whole_set(basename: str, found: Dict[int, Dict[int, str]]) -> List[str]:
    """Of files of several counts (a save with another count killed between its renames and
    its removal of the older files), the whole set written last: each set's oldest file
    tells when it was written, as a rename keeps the time a file was written."""
    whole = {count: [files[i] for i in range(count)] for count, files in found.items() if len(files) == count}
    written = {count: min(os.stat(p).st_mtime_ns for p in paths) for count, paths in whole.items()}
    latest = sorted(written, key=lambda count: written[count])[-2:]
    if not whole or (len(latest) == 2 and written[latest[0]] == written[latest[1]]):
        raise ValueError(f"Monolith checkpoint {basename!r} mixes shard counts {sorted(found)}, and no one set "
                         "of them is whole and the latest")
    return whole[latest[-1]]


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _fewest_bytes_per_entry(dim: int, dumps) -> int:
    """The framed size of the smallest record of an entry in this format (varints of one
    byte): what tells how many entries files of a given size hold at most."""
    opt = 0
    for _, fields in dumps:
        body = sum(5 * words if ftype == 0 else 5 if ftype == 1 else 2 for _, ftype, words, _ in fields)
        single = 1 + _varint_size(body) + body
        opt += 1 + _varint_size(single) + single
    return 16 + 9 + 5 * dim + 1 + _varint_size(opt) + opt + 2


def _load(table, basename: str):
    """A fresh core for ``table`` holding Monolith's checkpoint files at ``basename``, every
    file parsed and checked (checksums, shard set, optimizer layout)."""
    paths = _shard_files(os.fsdecode(basename))
    dumps = _format(table)
    # Room for as many entries as the files can hold in records of Monolith's form (whose
    # timestamps take 5 bytes rather than 1: 2% more room than entries), so that the new
    # table does not grow while it loads.
    room = sum(os.path.getsize(p) for p in paths) // _fewest_bytes_per_entry(table.dim_size, dumps)
    config = table.config.table_config
    room = max(min(room, int(config.max_entries)) if config.max_entries else room, int(config.initial_capacity))
    core = table._new_core(initial_capacity=room)
    files = core.load_monolith_files(paths, dumps, _MEMBERS)
    if len(paths) > 1 and core.size() < sum(entries for entries, _ in files):
        # An id in two files (a save never writes one twice): read them again one after the
        # other, so that the later file's entry wins, whatever the thread count.
        core = table._new_core(initial_capacity=room)
        files = core.load_monolith_files(paths, dumps, _MEMBERS, 1)
    limit = core.max_entries
    if limit and core.size() > limit:
        raise ValueError(f"Monolith checkpoint {basename!r} holds {core.size()} entries, more than the "
                         f"table's max_entries = {limit}")
    # As a table's own clock: 0 until a write stamps a later time (negative ones do not move it).
    core.max_update_ts = max([0] + [ts for entries, ts in files if entries])
    return core


def restore_monolith(table: _hash_table.HashTable, basename: StrPath) -> None:
    """Replace the contents of ``table`` with Monolith's checkpoint files at ``basename``.
    Everything is parsed and checked into a fresh table first; on any error the table is
    left as it was."""
    basename = os.fsdecode(basename)
    with _turn(basename), directory_lock(_directory_of(basename), exclusive=False):
        core = _load(table, basename)
    _hash_table.swap_contents([(table, core)])  # after a save of the old contents under way


def asset_prefix(name: str) -> str:
    """The prefix of a table's files in a checkpoint's ``.assets`` directory, as Monolith's
    checkpoint listener names them: the table's name with ``:`` and ``/`` made ``-``."""
    return name.replace(":", "-").replace("/", "-")


def _prefixes(tables: list) -> List[str]:
    prefixes = [asset_prefix(t.name) for t in tables]
    for i, prefix in enumerate(prefixes):
        if prefix in prefixes[:i]:
            first = tables[prefixes.index(prefix)]
            raise ValueError(f"tables {first.name!r} and {tables[i].name!r} would share the files {prefix}-*: "
                             "give each table a name of its own (hash_table_from_config's name_suffix)")
    return prefixes


def save_monolith_tables(tables: list, directory: str) -> None:
    """Save each of ``tables`` in Monolith's files under ``directory`` (a checkpoint's
    ``.assets`` directory), at ``directory/asset_prefix(table.name)``. All tables' files
    are written, in parallel, before the first is renamed into place: a save that fails
    leaves every table's previous files. It holds the directory's lock between processes
    alone, as a save in mtht's format does, so that a restore in another process reads one
    whole save."""
    directory = os.fsdecode(directory)
    basenames = [os.path.join(directory, p) for p in _prefixes(tables)]
    os.makedirs(directory, exist_ok=True)
    with _turn(directory, *basenames), directory_lock(directory, exclusive=True):
        with _hash_table.writes_held(tables):  # every table at one point
            written, failed = _over_tables_settled(_write_temporaries, list(zip(tables, basenames)))
        written = [moves or [] for moves in written]
        try:
            if failed is not None:
                raise failed
            for i, (basename, moves) in enumerate(zip(basenames, written)):
                _publish(basename, moves)
                written[i] = []
        finally:
            _remove([tmp for moves in written for tmp, _ in moves])


def _restore_names(table) -> List[str]:
    """The names a table's files may have: its own, then each of its extra_restore_names.
    An old name that is a suffix (a merged table's md5) is also tried as the name of a
    table built under it (``MonolithHashTable_<md5>``): that is how Monolith named the
    files, while its restorer looked for the bare suffix only."""
    names = [table.name]
    own_suffix = table.name.startswith(_hash_table.TABLE_NAME_PREFIX)
    for old in table.extra_restore_names:
        names.append(old)
        if own_suffix and not old.startswith(_hash_table.TABLE_NAME_PREFIX):
            names.append(_hash_table.TABLE_NAME_PREFIX + old)
    return names


def restore_monolith_tables(tables: list, directory: str) -> None:
    """Restore each of ``tables`` from Monolith's files under ``directory`` (a checkpoint's
    ``.assets`` directory): from its name's files or, if there are none, from the first of
    its ``extra_restore_names`` that has files. The tables load in parallel, and every file
    is checked before the first table changes. It holds the directory's lock shared (a
    save holds it alone)."""
    directory = os.fsdecode(directory)
    _prefixes(tables)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no Monolith checkpoint directory {directory!r}")
    names = [[asset_prefix(name) for name in _restore_names(t)] for t in tables]
    with (_turn(directory, *(os.path.join(directory, n) for candidates in names for n in candidates)),
          directory_lock(directory, exclusive=False)):
        found = []
        for table, candidates in zip(tables, names):
            prefix = next((c for c in candidates if _all_shard_files(os.path.join(directory, c))), None)
            if prefix is None:
                raise FileNotFoundError(f"no Monolith checkpoint files for table {table.name!r} in {directory!r} "
                                        f"(looked for {', '.join(c + '-NNNNN-of-NNNNN' for c in candidates)})")
            found.append((table, os.path.join(directory, prefix)))
        cores = _over_tables(_load, found)
    _hash_table.swap_contents([(table, core) for (table, _), core in zip(found, cores)])
