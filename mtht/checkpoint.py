"""Crash-safe checkpoints of tables.

A checkpoint at ``basename`` is a manifest ``<basename>.manifest.json`` and the data files
it names, ``<basename>-g<generation>-<i>-of-<n>.mtd`` (format in include/mtht/checkpoint.h).
A save writes and syncs every data file of a new generation, then writes the manifest to a
temporary file, syncs it and renames it over the old one (atomic on POSIX), and only then
removes the files of older generations. A process killed at any moment therefore leaves
either the previous checkpoint or the new one whole. A restore reads only what the
manifest names, loads it into a fresh table while verifying every byte, and swaps it in
only when everything checked out; otherwise the table is left exactly as it was.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import secrets
from typing import Dict, List, Tuple

from mtht import _core

__all__ = ["CheckpointError", "save_table", "restore_table", "save_multi_type", "restore_multi_type",
           "checkpoint_exists"]

FORMAT = "mtht-checkpoint"
VERSION = 1


class CheckpointError(OSError):
    """A checkpoint is missing, truncated, corrupt or inconsistent."""


def manifest_path(basename: str) -> str:
    return os.fspath(basename) + ".manifest.json"


def checkpoint_exists(basename: str) -> bool:
    return os.path.exists(manifest_path(basename))


def _data_name(prefix: str, generation: int, index: int, count: int) -> str:
    return f"{prefix}-g{generation:08d}-{index:05d}-of-{count:05d}.mtd"


def _generations_on_disk(basename: str) -> Dict[int, List[str]]:
    directory = os.path.dirname(basename) or "."
    prefix = os.path.basename(basename)
    pattern = re.compile(re.escape(prefix) + r"-g(\d{8})-\d{5}-of-\d{5}\.mtd$")
    found: Dict[int, List[str]] = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return found
    for name in names:
        m = pattern.match(name)
        if m:
            found.setdefault(int(m.group(1)), []).append(os.path.join(directory, name))
    return found


def _stale_manifest_temps(basename: str) -> List[str]:
    directory = os.path.dirname(basename) or "."
    prefix = os.path.basename(manifest_path(basename)) + ".tmp-"
    try:
        return [os.path.join(directory, n) for n in os.listdir(directory) if n.startswith(prefix)]
    except FileNotFoundError:
        return []


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(basename: str, body: dict) -> None:
    path = manifest_path(basename)
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    data = json.dumps({"manifest": body, "sha256": _digest(body)}, indent=1, sort_keys=True).encode()
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(path))


def read_manifest(basename: str) -> dict:
    """The manifest of the checkpoint at ``basename``, verified."""
    path = manifest_path(basename)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {basename!r} (missing {path})") from None
    try:
        doc = json.loads(raw)
        body = doc["manifest"]
        ok = doc["sha256"] == _digest(body)
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint manifest {path} is truncated or corrupt") from None
    if not ok:
        raise CheckpointError(f"checkpoint manifest {path} is corrupt (checksum mismatch)")
    if not isinstance(body, dict) or body.get("format") != FORMAT or body.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a version-{VERSION} mtht checkpoint manifest")
    if not _holds_what_a_save_writes(body):
        raise CheckpointError(f"checkpoint manifest {path} does not hold what a save writes")
    return body


def _holds_what_a_save_writes(body) -> bool:
    """Whether the fields a restore reads have the types and ranges a save gives them: a
    manifest edited by hand (its digest recomputed) is refused here, not deep in a load."""
    def count(v, lo=0):
        return type(v) is int and lo <= v < 1 << 63

    def data_file(f):
        return (isinstance(f, dict) and isinstance(f.get("name"), str) and f["name"] not in ("", ".", "..")
                and os.path.basename(f["name"]) == f["name"]  # in the manifest's directory
                and count(f.get("bytes")) and count(f.get("entries")) and count(f.get("filter_entries", 0))
                and isinstance(f.get("checksum"), str))

    scales = body.get("hashnet_scales", [])
    files = body.get("files")
    return (count(body.get("dim"), 1) and isinstance(body.get("layout"), str)
            and count(body.get("entries")) and count(body.get("max_update_ts"), -(1 << 63))
            and isinstance(scales, list) and all(type(x) in (int, float) for x in scales)
            and isinstance(files, list) and len(files) > 0 and all(data_file(f) for f in files))


# Entries per data file when ``saver_parallel`` is not set. The files are written and read in
# parallel: a table of 1M entries in two files rather than one restored 1.55x and saved 1.19x
# faster on two threads, and level on one (docs/benchmarks.md, Save and restore).
_ENTRIES_PER_FILE = 500_000


def file_count(table, entries_per_file: int = _ENTRIES_PER_FILE) -> int:
    """How many data files a save of ``table`` writes: its ``saver_parallel`` if set, else
    one per ``entries_per_file`` entries, from 1 to 4."""
    if table._saver_parallel and table._saver_parallel > 0:
        return table._saver_parallel
    return min(4, max(1, len(table) // entries_per_file))


def save_table(table, basename: str) -> dict:
    """Save a :class:`~mtht.hash_table.HashTable` at ``basename``; returns the manifest.

    Entries expired at the table's ``max_update_ts`` (per-slot expiry of the config) are
    left out of the checkpoint but stay in memory, as in Monolith.
    """
    basename = os.fspath(basename)
    directory = os.path.dirname(basename)
    if directory:
        os.makedirs(directory, exist_ok=True)
    prefix = os.path.basename(basename)
    if not prefix:
        raise ValueError(f"checkpoint basename {basename!r} names a directory, not a file prefix")
    for stale in _stale_manifest_temps(basename):  # left by a save that was killed
        os.unlink(stale)
    old = _generations_on_disk(basename)
    generation = max(old, default=0) + 1
    count = file_count(table)
    paths = [os.path.join(directory, _data_name(prefix, generation, i, count)) for i in range(count)]
    core = table._core
    max_update_ts = core.max_update_ts
    try:
        infos = core.save_files(paths, max_update_ts, True, table.layout)
        _fsync_dir(directory)
        body = {
            "format": FORMAT,
            "version": VERSION,
            "generation": generation,
            "table": table.name,
            "dim": table.dim_size,
            "state_dim": core.state_dim,
            "layout": table.layout,
            "max_update_ts": max_update_ts,
            "hashnet_scales": core.hashnet_scales(),
            "entries": sum(i["entries"] for i in infos),
            "files": [dict(info, name=os.path.basename(p)) for p, info in zip(paths, infos)],
        }
        _write_manifest(basename, body)
    except BaseException:
        for p in paths:
            if os.path.exists(p):
                os.unlink(p)
        raise
    for files in old.values():  # the new manifest is in place: older generations can go
        for p in files:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    return body


def _load(table, basename: str) -> Tuple[object, dict]:
    """A fresh core table holding the checkpoint at ``basename``, verified, and its manifest."""
    basename = os.fspath(basename)
    body = read_manifest(basename)
    if body["dim"] != table.dim_size or body["layout"] != table.layout:
        raise ValueError(
            f"checkpoint {basename!r} holds entries of dim {body['dim']} with layout {body['layout']!r}; "
            f"table {table.name!r} has dim {table.dim_size} with layout {table.layout!r}")
    directory = os.path.dirname(basename)
    paths = []
    for f in body["files"]:
        path = os.path.join(directory, f["name"])
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {basename!r} is missing its data file {path}") from None
        if size != f["bytes"]:
            raise CheckpointError(f"checkpoint data file {path} has {size} bytes, the manifest says {f['bytes']} "
                                  "(truncated or replaced)")
        paths.append(path)
    core = table._new_core(initial_capacity=max(int(body["entries"]),
                                                int(table.config.table_config.initial_capacity)))
    try:
        infos = core.load_files(paths, body["layout"])
    except OSError as e:
        raise CheckpointError(str(e)) from None
    for f, info in zip(body["files"], infos):
        if info["checksum"] != f["checksum"] or info["entries"] != f["entries"]:
            raise CheckpointError(f"checkpoint data file {f['name']} does not match the manifest "
                                  "(it belongs to another save)")
    limit = core.max_entries
    if limit and core.size() > limit:
        raise ValueError(f"checkpoint {basename!r} holds {core.size()} entries, more than the table's "
                         f"max_entries = {limit}")
    core.max_update_ts = body["max_update_ts"]
    core.set_hashnet_scales(list(body.get("hashnet_scales", [])))
    return core, body


def restore_table(table, basename: str) -> dict:
    """Replace the contents of ``table`` with the checkpoint at ``basename``; returns the
    manifest. Nothing changes unless the whole checkpoint verified."""
    core, body = _load(table, basename)
    table._swap_core(core)
    return body


def _slot_tables(table) -> Dict[str, object]:
    """{key: HashTable} of a multi-type table: slot names, or merged names for a merged one."""
    inner = getattr(table, "_table", None)
    if inner is not None and not callable(inner):
        return _slot_tables(inner)
    tables = getattr(table, "_tables", None)
    if isinstance(tables, dict):
        return dict(tables)
    raise TypeError(f"cannot find the tables of {type(table).__name__}")


def _named_tables(table) -> Dict[str, object]:
    """{key: HashTable} of a multi-type table, each key a checkpoint's name in one directory."""
    tables = _slot_tables(table)
    for key in tables:
        if not isinstance(key, str) or key in ("", ".", "..") or os.path.basename(key) != key or "\0" in key:
            raise ValueError(f"slot {key!r} cannot name a checkpoint in a directory: use slot names without "
                             "path separators")
    return tables


def _over_tables(fn, args: list) -> list:
    """``[fn(*a) for a in args]``, the calls spread over ``mtht.get_num_threads()`` threads
    (they spend their time in the core, without the GIL): the first exception, in the order
    of ``args``, is raised once every call has ended."""
    workers = min(len(args), _core.get_num_threads())
    if workers <= 1:
        return [fn(*a) for a in args]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fn, *a) for a in args]
    return [f.result() for f in futures]


def check_format(format: str) -> None:
    """Raise ValueError unless ``format`` names a checkpoint format."""
    if format not in ("mtht", "monolith"):
        raise ValueError(f"unknown checkpoint format {format!r} (use 'mtht' or 'monolith')")


def save_multi_type(table, directory: str, format: str = "mtht") -> None:
    """Save every table of a MultiTypeHashTable / MergedMultiTypeHashTable under
    ``directory``, one checkpoint per slot key (the merged name for merged tables).
    ``format="monolith"`` writes Monolith's files of each table instead, named as
    Monolith's checkpoint listener names them in a ``.assets`` directory (see
    :func:`mtht.monolith_checkpoint.save_monolith_tables`)."""
    check_format(format)
    if format == "monolith":
        from mtht.monolith_checkpoint import save_monolith_tables
        save_monolith_tables(list(_slot_tables(table).values()), directory)
        return
    _over_tables(save_table, [(t, os.path.join(os.fspath(directory), key)) for key, t in _named_tables(table).items()])


def restore_multi_type(table, directory: str, format: str = "mtht") -> None:
    """Restore every table from ``directory``: from its key, or else from the first of its
    ``extra_restore_names`` that is present (exact names). Every checkpoint is verified
    before any table changes. ``format="monolith"`` reads Monolith's files of each table,
    found by its name (see :func:`mtht.monolith_checkpoint.restore_monolith_tables`)."""
    check_format(format)
    if format == "monolith":
        from mtht.monolith_checkpoint import restore_monolith_tables
        restore_monolith_tables(list(_slot_tables(table).values()), directory)
        return
    found = []
    for key, t in _named_tables(table).items():
        candidates = [key] + list(t.extra_restore_names)
        name = next((c for c in candidates if checkpoint_exists(os.path.join(os.fspath(directory), c))), None)
        if name is None:
            raise FileNotFoundError(f"no checkpoint for table {key!r} in {directory!r} (looked for {candidates})")
        found.append((t, os.path.join(os.fspath(directory), name)))
    loaded = _over_tables(_load, found)
    for (t, _), (core, _) in zip(found, loaded):
        t._swap_core(core)
