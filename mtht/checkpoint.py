"""Crash-safe checkpoints of tables.

A checkpoint at ``basename`` is a manifest ``<basename>.manifest.json`` and the data files
it names, ``<basename>-g<generation>-<i>-of-<n>.mtd`` (format in include/mtht/checkpoint.h).
A save writes and syncs every data file of a new generation, then writes the manifest to a
temporary file, syncs it and renames it over the old one (atomic on POSIX), and only then
removes the files of older generations. A process killed at any moment therefore leaves
either the previous checkpoint or the new one whole. A restore reads only what the
manifest names, loads it into a fresh table while verifying every byte, and swaps it in
only when everything checked out; otherwise the table is left exactly as it was.

The tables of a multi-type table are saved in one directory, a checkpoint each, and the
directory's ``tables.json`` names the generation of every table that one save wrote: it is
renamed into place once every table's data files are written, and only then are the
tables' own manifests replaced and their older generations removed. A killed save
therefore leaves the previous save of every table, or the new one of every table.

Saves and restores at one basename (or directory) from threads of one process take turns,
and so do a table's or a model's saves and restores of one directory from several
processes (:func:`directory_lock`): two processes saving at one basename write one
generation after the other, and a job that restores from the directory a training job
saves into gets one whole save.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

try:
    import fcntl
except ImportError:  # not a POSIX system: no lock between processes
    fcntl = None  # type: ignore[assignment]

from mtht import _core
from mtht import hash_table as _hash_table
from mtht._arrays import StrPath
from mtht.entry import MAX_SHARDS

if TYPE_CHECKING:
    from mtht.multi_type_hash_table import BaseMultiTypeHashTable

__all__ = ["CheckpointError", "save_table", "restore_table", "save_multi_type", "restore_multi_type",
           "checkpoint_exists"]

FORMAT = "mtht-checkpoint"
VERSION = 1
TABLES_FORMAT = "mtht-multi-type-checkpoint"
# The file of a multi-type save's directory that names each table's generation. No slot's
# files can have this name (theirs end in .manifest.json, .mtd or .manifest.json.tmp-...).
TABLES_FILE = "tables.json"
# The lock between processes of a directory of a model's save (directory_lock).
LOCK_FILE = ".mtht-lock"
_log = logging.getLogger(__name__)


class CheckpointError(OSError):
    """A checkpoint is missing, truncated, corrupt or inconsistent."""


def manifest_path(basename: StrPath) -> str:
    return os.fsdecode(basename) + ".manifest.json"


def checkpoint_exists(basename: StrPath) -> bool:
    """Whether a table's checkpoint in mtht's format was saved at ``basename`` (its manifest
    is there; a save writes the manifest last)."""
    return os.path.exists(manifest_path(basename))


def _data_name(prefix: str, generation: int, index: int, count: int) -> str:
    return f"{prefix}-g{generation:08d}-{index:05d}-of-{count:05d}.mtd"


def _generations_on_disk(basename: str) -> Dict[int, List[str]]:
    directory = os.path.dirname(basename) or "."
    prefix = os.path.basename(basename)
    # Generations are written with at least 8 digits, and more past 99,999,999.
    pattern = re.compile(re.escape(prefix) + r"-g(\d{8,})-\d{5}-of-\d{5}\.mtd$")
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
    """The temporaries of this basename's manifest left by killed saves."""
    return stale_temps(manifest_path(basename))


def stale_temps(path: str) -> List[str]:
    """The temporaries of the file at ``path`` left by killed saves (_write_verified's names
    exactly: another table's files may start with the same characters)."""
    directory = os.path.dirname(path) or "."
    pattern = re.compile(re.escape(os.path.basename(path)) + r"\.tmp-\d+-[0-9a-f]{8}")
    try:
        return [os.path.join(directory, n) for n in os.listdir(directory) if pattern.fullmatch(n)]
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


# path -> [its lock, the threads holding or waiting for it]: an entry goes when the last
# of them is done, so that the locks of a run's many basenames do not pile up.
_LOCKS: Dict[str, list] = {}
_LOCKS_GUARD = threading.Lock()


# The files open for directory_lock. A flock belongs to the open file, which a forked child
# shares: a child that kept its copy would hold the parent's lock for as long as it lives,
# and its own save in the directory would wait for it for ever. The guard is held across
# fork, so that no file is opened or closed half-way through one.
_LOCK_FDS: set = set()
_LOCK_FDS_GUARD = threading.Lock()


def _forget_locks() -> None:
    # A forked child has none of its parent's other threads: the locks they held would
    # never be released there.
    global _LOCKS, _LOCKS_GUARD, _LOCK_FDS, _LOCK_FDS_GUARD
    _LOCKS, _LOCKS_GUARD = {}, threading.Lock()
    for fd in _LOCK_FDS:
        try:
            os.close(fd)  # the child's copy: the parent's lock stays the parent's
        except OSError:
            pass
    _LOCK_FDS, _LOCK_FDS_GUARD = set(), threading.Lock()


os.register_at_fork(before=lambda: _LOCK_FDS_GUARD.acquire(), after_in_parent=lambda: _LOCK_FDS_GUARD.release(),
                    after_in_child=_forget_locks)


@contextlib.contextmanager
def directory_lock(directory: str, exclusive: bool,
                   interrupted: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """Within: this process holds the lock of ``directory`` between processes, alone
    (``exclusive``: a save, from choosing its generation to naming it) or shared (a
    restore's reads). An advisory ``flock`` on ``directory/.mtht-lock``, which a save makes
    (a restore only reads: a directory whose save made none is not locked). It waits for
    the holders, a KeyboardInterrupt ending the wait (also one that ``interrupted()`` says
    came, where Ctrl-C is held off), and says so once it has waited 5 seconds. Where it
    cannot be taken (no directory, a file system without locks) nothing is held."""
    directory = os.fsdecode(directory)
    path = os.path.join(directory, LOCK_FILE)
    fd = None
    if fcntl is not None:
        try:
            if exclusive:
                os.makedirs(directory, exist_ok=True)
            with _LOCK_FDS_GUARD:
                fd = os.open(path, os.O_RDWR | os.O_CREAT if exclusive else os.O_RDONLY, 0o644)
                _LOCK_FDS.add(fd)
        except OSError:  # the save reports a directory it cannot make; the restore, what it cannot read
            fd = None
    try:
        if fd is not None:
            _wait_for(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, path, interrupted)
        yield
    finally:
        if fd is not None:
            with _LOCK_FDS_GUARD:
                _LOCK_FDS.discard(fd)
                os.close(fd)  # releases the lock


def _wait_for(fd: int, kind: int, path: str, interrupted: Callable[[], bool]) -> None:
    # Polled, so that an interrupt held off (interrupted()) is seen: a blocking flock is
    # tried again after a signal. From 1 ms to 50 ms apart, so that a process that saves
    # again and again does not keep a restore out by taking the lock between its tries.
    waited, said, pause = 0.0, False, 0.001
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError:  # ENOLCK, EOPNOTSUPP...: a file system without locks
            return
        if interrupted():
            raise KeyboardInterrupt
        if waited >= 5 and not said:
            _log.warning("waiting for %s: another job saves into or restores from this directory", path)
            said = True
        time.sleep(pause)
        waited += pause
        pause = min(2 * pause, 0.05)


@contextlib.contextmanager
def _turn(*paths: str):
    """Holds the locks of ``paths`` (basenames or directories), taken in one order: two
    saves at one basename would write the same generation's files, and a restore could find
    its files removed by a save that replaced them."""
    keys = sorted({os.path.realpath(os.fsdecode(p)) for p in paths})
    guard = _LOCKS_GUARD
    # An interrupt (Ctrl-C) may come between any two steps here. So an entry is listed once
    # counted (one interrupted in between keeps its entry, which does no harm), and a lock
    # once asked for: the locks are re-entrant, so releasing one this thread does not hold
    # raises, which tells one not taken apart (it stayed held for good, and every later
    # save at the path waited for ever).
    counted: List[Tuple[str, list]] = []
    asked: List[threading.RLock] = []
    try:
        with guard:
            for key in keys:
                entry = _LOCKS.setdefault(key, [threading.RLock(), 0])
                entry[1] += 1
                counted.append((key, entry))
        for _, (lock, _) in counted:
            asked.append(lock)
            lock.acquire()
        yield
    finally:
        for lock in reversed(asked):
            try:
                lock.release()
            except RuntimeError:  # interrupted before it was taken
                pass
        with guard:
            for key, entry in counted:
                entry[1] -= 1
                if entry[1] == 0 and _LOCKS.get(key) is entry:
                    del _LOCKS[key]


def _remove(paths: List[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _write_manifest(basename: str, body: dict) -> None:
    _write_verified(manifest_path(basename), body)


def _write_verified(path: str, body: dict) -> None:
    """Write ``{"manifest": body, "sha256": digest}`` at ``path``, atomically and synced."""
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    data = json.dumps({"manifest": body, "sha256": _digest(body)}, indent=1, sort_keys=True).encode()
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.errno is not None and error.filename is None:  # ENOSPC: name the file
            raise type(error)(error.errno, error.strerror, path) from error
        raise
    _fsync_dir(os.path.dirname(path))


def _read_verified(path: str, missing: str, form: str) -> dict:
    """The body of a file _write_verified wrote, its digest checked and its ``format`` and
    ``version`` those of ``form``; FileNotFoundError(missing) when there is none."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(missing) from None
    try:
        doc = json.loads(raw)
        body = doc["manifest"]
        ok = doc["sha256"] == _digest(body)
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: nested too deep
        raise CheckpointError(f"checkpoint manifest {path} is truncated or corrupt") from None
    if not ok:
        raise CheckpointError(f"checkpoint manifest {path} is corrupt (checksum mismatch)")
    if not isinstance(body, dict) or body.get("format") != form or body.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a version-{VERSION} {form} manifest")
    return body


def read_manifest(basename: str) -> dict:
    """The manifest of the checkpoint at ``basename``, verified."""
    path = manifest_path(basename)
    body = _read_verified(path, f"no checkpoint at {basename!r} (missing {path})", FORMAT)
    if not _holds_what_a_save_writes(body):
        raise CheckpointError(f"checkpoint manifest {path} does not hold what a save writes")
    return body


def _read_tables_file(directory: str) -> Optional[Dict[str, dict]]:
    """{name: manifest} of the last multi-type save in ``directory``, or None if none."""
    path = os.path.join(directory, TABLES_FILE)
    if not os.path.exists(path):
        return None
    body = _read_verified(path, f"no {path}", TABLES_FORMAT)
    tables = body.get("tables")
    if not isinstance(tables, dict) or not all(
            isinstance(b, dict) and b.get("format") == FORMAT and b.get("version") == VERSION
            and _holds_what_a_save_writes(b) for b in tables.values()):
        raise CheckpointError(f"checkpoint manifest {path} does not hold what a save writes")
    return tables


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
    shards = body.get("num_shards", 1)  # absent from manifests written before it was recorded
    return (count(body.get("dim"), 1) and count(body.get("generation"), 1) and isinstance(body.get("layout"), str)
            and count(body.get("entries")) and count(body.get("max_update_ts"), -(1 << 63))
            and isinstance(scales, list) and all(type(x) in (int, float) for x in scales)
            and count(shards, 1) and shards <= MAX_SHARDS and shards & (shards - 1) == 0  # a power of two
            and (body.get("filter_capacity") is None or count(body["filter_capacity"], 1))
            and isinstance(files, list) and len(files) > 0 and all(data_file(f) for f in files)
            and body["entries"] == sum(f["entries"] for f in files))


# Entries per data file when ``saver_parallel`` is not set. The files are written and read in
# parallel: a table of 1M entries in two files rather than one restored 1.55x and saved 1.19x
# faster on two threads, and level on one (docs/benchmarks.md, Save and restore).
_ENTRIES_PER_FILE = 500_000


def file_count(table, entries_per_file: int = _ENTRIES_PER_FILE) -> int:
    """How many data files a save of ``table`` writes: its ``saver_parallel`` if set, else
    one per ``entries_per_file`` entries, from 1 to 4."""
    if table._saver_parallel and table._saver_parallel > 0:
        return table._saver_parallel
    # The core's size: the caller may hold the table's writes, which a queued call waits for.
    return min(4, max(1, table._core.size() // entries_per_file))


def save_table(table: _hash_table.HashTable, basename: StrPath) -> dict:
    """Save a :class:`~mtht.hash_table.HashTable` at ``basename``; returns the manifest.

    Entries expired at the table's ``max_update_ts`` (per-slot expiry of the config) are
    left out of the checkpoint but stay in memory, as in Monolith.
    """
    basename = os.fsdecode(basename)
    file_prefix(basename)  # a basename refused before the directory and its lock are made
    with _turn(basename), directory_lock(_directory_of(basename), exclusive=True):
        with _hash_table.writes_held([table]):
            body, older = _write_generation(table, basename)
        _commit(basename, body, older)
    return body


def _directory_of(basename: str) -> str:
    """The directory whose lock (directory_lock) a single table's save at ``basename`` holds
    alone and its restore shared: saves at one basename from two processes would choose the
    same generation and write its files over each other."""
    return os.path.dirname(basename) or "."


def file_prefix(basename: str) -> str:
    """The prefix of the files of a checkpoint at ``basename``: its last part, which must not
    be empty, ``.`` or ``..`` (a directory)."""
    prefix = os.path.basename(basename)
    if prefix in ("", ".", ".."):
        raise ValueError(f"checkpoint basename {basename!r} names a directory, not a file prefix")
    return prefix


def _write_generation(table, basename: str, apply_expiry: bool = True) -> Tuple[dict, List[str]]:
    """Write and sync the data files of a new generation of the checkpoint at ``basename``;
    returns the manifest naming them, and the data files of older generations, for the
    caller to remove once the manifest is in place. On an error, what it wrote is removed.
    ``apply_expiry``: leave out the entries expired at the table's ``max_update_ts``."""
    prefix = file_prefix(basename)
    directory = os.path.dirname(basename)
    if directory:
        os.makedirs(directory, exist_ok=True)
    _remove(_stale_manifest_temps(basename))  # left by a save that was killed
    old = _generations_on_disk(basename)
    generation = max(old, default=0) + 1
    count = file_count(table)
    paths = [os.path.join(directory, _data_name(prefix, generation, i, count)) for i in range(count)]
    core = table._core
    max_update_ts = core.max_update_ts  # no write moves it meanwhile: the caller holds the writes
    try:
        infos = core.save_files(paths, max_update_ts, apply_expiry, table.layout)
        _fsync_dir(directory)
    except BaseException:
        _remove(paths)
        raise
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
        # A restore starts with as many shards, and keeps the admission filter's counts as they
        # are if its filter has the same capacity: the generations and their bounds are per shard.
        "num_shards": core.stats()["num_shards"],
        "filter_capacity": table.filter_capacity,
        "files": [dict(info, name=os.path.basename(p)) for p, info in zip(paths, infos)],
    }
    return body, [p for files in old.values() for p in files]


def _files_of(basename: str, body: dict) -> List[str]:
    return [os.path.join(os.path.dirname(basename), f["name"]) for f in body["files"]]


def _commit(basename: str, body: dict, older: List[str], named_elsewhere: bool = False) -> None:
    """Put the manifest ``body`` in place at ``basename``, then remove ``older`` files. If
    that fails before the manifest is in place, the new data files are removed; once it is
    in place (an interrupt may come just after), they are what it names, and stay. With
    ``named_elsewhere`` (a multi-type save's tables.json names them already) they stay
    whatever happens."""
    try:
        _write_manifest(basename, body)
    except BaseException:
        if not named_elsewhere and not _names_generation(basename, body["generation"]):
            _remove(_files_of(basename, body))
        raise
    _remove(older)


def _names_generation(basename: str, generation: int) -> bool:
    try:
        return read_manifest(basename)["generation"] == generation
    except Exception:  # noqa: BLE001 - no readable manifest names it
        return False


def _load(table, basename: str, body: Optional[dict] = None, parts: int = 1, part: int = 0) -> Tuple[object, dict]:
    """A fresh core table holding the checkpoint at ``basename``, verified, and its manifest
    (``body``, when given, instead of the one at ``basename``). With ``parts`` > 1 it is part
    ``part`` of a sharded save, every id of which must be ``part`` modulo ``parts``."""
    basename = os.fsdecode(basename)
    if body is None:
        body = read_manifest(basename)
    return _load_sources(table, [(basename, body)], parts, part, every_entry_owned=parts > 1), body


def _load_sources(table, sources: List[Tuple[str, dict]], parts: int = 1, part: int = 0,
                  every_entry_owned: bool = False):
    """A fresh core table holding the checkpoints ``sources`` (``(basename, manifest)``
    pairs), verified: of their entries, those whose id is ``part`` modulo ``parts`` (all of
    them by default). Several sources are the parts of a sharded job's table, each id in one
    of them; ``max_update_ts`` is then the largest of theirs. ``every_entry_owned``: an
    entry of another part is an error (the files of a part put in another's place)."""
    paths = []
    for basename, body in sources:
        if body["dim"] != table.dim_size or body["layout"] != table.layout:
            raise ValueError(
                f"checkpoint {basename!r} holds entries of dim {body['dim']} with layout {body['layout']!r}; "
                f"table {table.name!r} has dim {table.dim_size} with layout {table.layout!r}")
        directory = os.path.dirname(basename)
        for f in body["files"]:
            path = os.path.join(directory, f["name"])
            try:
                size = os.path.getsize(path)
            except FileNotFoundError:
                raise CheckpointError(f"checkpoint {basename!r} is missing its data file {path}") from None
            if size != f["bytes"]:
                raise CheckpointError(f"checkpoint data file {path} has {size} bytes, the manifest says "
                                      f"{f['bytes']} (truncated or replaced)")
            paths.append((path, f))
    whole = len(sources) == 1 and parts == 1
    first = sources[0][1]
    entries = sum(int(body["entries"]) for _, body in sources) // parts
    # One checkpoint restored whole starts with its shard count; parts of several, with the
    # count their entries ask for.
    core = table._new_core(initial_capacity=max(entries, int(table.config.table_config.initial_capacity)),
                           initial_shards=first.get("num_shards", 0) if whole else 0)
    try:
        same_bounds = whole and (first.get("filter_capacity") == table.filter_capacity
                                 and first.get("num_shards") == core.stats()["num_shards"])
        infos = core.load_files([p for p, _ in paths], first["layout"], not same_bounds, parts, part)
    except OSError as e:
        raise CheckpointError(str(e)) from None
    for (path, f), info in zip(paths, infos):
        if info["checksum"] != f["checksum"] or info["entries"] != f["entries"]:
            raise CheckpointError(f"checkpoint data file {path} does not match the manifest "
                                  "(it belongs to another save)")
    in_files = sum(int(info["entries"]) for info in infos)
    if every_entry_owned and core.size() != in_files:
        raise CheckpointError(f"checkpoint {sources[0][0]!r} holds {in_files - core.size()} of its {in_files} "
                              f"entries with ids of another part than {part} of {parts} (id mod {parts} != {part}): "
                              "its files are another part's (part directories moved or copied into each other's "
                              "place?)")
    limit = core.max_entries
    if limit and core.size() > limit:
        held = f"checkpoint {sources[0][0]!r}" if len(sources) == 1 else \
            f"part {part} of {parts} of the checkpoints {[b for b, _ in sources]}"
        raise ValueError(f"{held} holds {core.size()} entries, more than the table's max_entries = {limit}")
    core.max_update_ts = max(int(body["max_update_ts"]) for _, body in sources)
    core.set_hashnet_scales(list(first.get("hashnet_scales", [])))
    return core


def restore_table(table: _hash_table.HashTable, basename: StrPath) -> dict:
    """Replace the contents of ``table`` with the checkpoint at ``basename``; returns the
    manifest. Nothing changes unless the whole checkpoint verified."""
    basename = os.fsdecode(basename)
    with _turn(basename), directory_lock(_directory_of(basename), exclusive=False):
        core, body = _load_whole_save(table, basename)
    _hash_table.swap_contents([(table, core)])  # after a save of the old contents under way
    return body


def _load_whole_save(table, basename: str, attempts: int = 100) -> Tuple[object, dict]:
    """_load, read again from the new manifest when a save of another process replaced the
    checkpoint meanwhile (a save removes the files of the one before, which the load may not
    have opened yet): a job restoring a table that another job keeps saving gets one whole
    save, not an error that calls the checkpoint damaged (about 1 in 70 restores did)."""
    attempt = 1
    while True:
        body = read_manifest(basename)
        try:
            return _load(table, basename, body)
        except OSError:  # CheckpointError too
            try:
                replaced = read_manifest(basename)["generation"] != body["generation"]
            except OSError:
                replaced = False
            if not replaced or attempt == attempts:
                raise
        attempt += 1


def _slot_tables(table) -> Dict[str, Any]:
    """{key: HashTable} of a multi-type table: slot names, or merged names for a merged one."""
    inner = getattr(table, "_table", None)
    if inner is not None and not callable(inner):
        return _slot_tables(inner)
    tables = getattr(table, "_tables", None)
    if isinstance(tables, dict):
        return dict(tables)
    raise TypeError(f"cannot find the tables of {type(table).__name__}")


def _check_model(table, what: str) -> None:
    if not hasattr(table, "_wait_for_hooks"):  # QueueHooks: every multi-type table of mtht's
        raise TypeError(f"{what} takes a MultiTypeHashTable or MergedMultiTypeHashTable, got {type(table).__name__}")


def _named_tables(table) -> Dict[str, Any]:
    """{key: HashTable} of a multi-type table, each key a checkpoint's name in one directory."""
    tables = _slot_tables(table)
    for key in tables:
        if not isinstance(key, str) or key in ("", ".", "..") or os.path.basename(key) != key or "\0" in key:
            raise ValueError(f"slot {key!r} cannot name a checkpoint in a directory: use slot names without "
                             "path separators")
    return tables


def _over_tables(fn, args: list) -> list:
    """``[fn(*a) for a in args]``, the calls spread over ``mtht.get_num_threads()`` threads,
    the calling one among them (they spend their time in the core, without the GIL): the
    first exception, in the order of ``args``, is raised once every call has ended. An
    interrupt (Ctrl-C) drops the calls not started and is raised once those under way have
    ended, so that none runs on past the caller's locks (a save's files written after the
    writes it held off went on). Where no thread can start (at interpreter exit, in an
    atexit function, or with no threads left to give), fewer threads make the calls, the
    calling one at least."""
    workers = min(len(args), _core.get_num_threads())
    if workers <= 1:
        return [fn(*a) for a in args]
    outcomes: list = [None] * len(args)  # (result, error) of each call made
    turns, turns_lock, dropped = itertools.count(), threading.Lock(), threading.Event()

    def make_calls() -> None:
        while not dropped.is_set():
            with turns_lock:
                k = next(turns)
            if k >= len(args):
                return
            try:
                outcomes[k] = (fn(*args[k]), None)
            except BaseException as error:  # an interrupt lands on the calling thread only
                outcomes[k] = (None, error)
                if not isinstance(error, Exception):
                    raise

    helpers: List[threading.Thread] = []
    try:
        for _ in range(workers - 1):
            helper = threading.Thread(target=make_calls, name="mtht-checkpoint", daemon=True)
            try:
                helper.start()
            except RuntimeError:  # "can't start new thread", or the interpreter is exiting
                break
            helpers.append(helper)
        make_calls()
    except BaseException:
        dropped.set()
        _join_through_interrupts(helpers)
        raise
    interrupt = _join_through_interrupts(helpers, dropped)
    if interrupt is not None:
        raise interrupt
    for outcome in outcomes:
        if outcome[1] is not None:
            raise outcome[1]
    return [result for result, _ in outcomes]


def _join_through_interrupts(helpers: List[threading.Thread], dropped: Optional[threading.Event] = None):
    """Waits for ``helpers`` to end; an interrupt meanwhile does not cut the wait short, but
    sets ``dropped`` (no call starts after it) and is returned."""
    interrupt = None
    for helper in helpers:
        while True:
            try:
                helper.join()
                break
            except KeyboardInterrupt as error:
                interrupt = error
                if dropped is not None:
                    dropped.set()
    return interrupt


def _over_tables_settled(fn, args: list) -> Tuple[list, Optional[BaseException]]:
    """:func:`_over_tables` that lets every call end and says what each did: (the results,
    None for a call that failed or was not made; the caller's interrupt if one came, else
    the first exception in the order of ``args``, else None). After an interrupt the
    results of the calls that ended are there, so that the caller can remove what they
    wrote."""
    outcomes: list = [(None, None)] * len(args)

    def settled(k, *a):
        try:
            outcomes[k] = (fn(*a), None)
        except BaseException as error:  # kept until every call has ended
            outcomes[k] = (None, error)
            if not isinstance(error, Exception):  # an interrupt on this thread: no more calls
                raise

    interrupt = None
    try:
        _over_tables(settled, [(k, *a) for k, a in enumerate(args)])
    except BaseException as error:  # noqa: BLE001 - returned, raised by the caller after it cleans up
        interrupt = error
    first = next((e for _, e in outcomes if e is not None), None)
    return [r for r, _ in outcomes], interrupt or first


def check_format(format: str) -> None:
    """Raise ValueError unless ``format`` names a checkpoint format."""
    if format not in ("mtht", "monolith"):
        raise ValueError(f"unknown checkpoint format {format!r} (use 'mtht' or 'monolith')")


def save_multi_type(table: BaseMultiTypeHashTable, directory: StrPath, format: str = "mtht") -> None:
    """Save every table of a MultiTypeHashTable / MergedMultiTypeHashTable under
    ``directory``, one checkpoint per slot key (the merged name for merged tables), and
    ``tables.json``, which names the generation of each: a killed save leaves every table's
    previous checkpoint or every table's new one. ``format="monolith"`` writes Monolith's
    files of each table instead, named as Monolith's checkpoint listener names them in a
    ``.assets`` directory (see :func:`mtht.monolith_checkpoint.save_monolith_tables`).
    Writes queued by hooks (:mod:`mtht.hooks`) are applied first."""
    check_format(format)
    _check_model(table, "save_multi_type")
    directory = os.fsdecode(directory)
    if _handed_to_sharded(table, "save", directory, format):
        return
    table._wait_for_hooks()
    if format == "monolith":
        from mtht.monolith_checkpoint import save_monolith_tables
        save_monolith_tables(list(_slot_tables(table).values()), directory)
        return
    write_multi_type(table, directory)


def write_multi_type(table, directory: str, apply_expiry: bool = True) -> None:
    """:func:`save_multi_type` in mtht's format, the hooks' writes already applied.
    ``apply_expiry=False`` keeps the entries expired at their table's ``max_update_ts``
    (a checkpoint rewritten, whose entries were kept when it was saved)."""
    directory = os.fsdecode(directory)
    tables = _named_tables(table)
    bases = [os.path.join(directory, key) for key in tables]
    with _turn(directory, *bases), directory_lock(directory, exclusive=True):
        os.makedirs(directory, exist_ok=True)  # a model of no tables has no table's save to make it
        _remove(stale_temps(os.path.join(directory, TABLES_FILE)))  # left by a save that was killed
        with _hash_table.writes_held(list(tables.values())):  # every table at one point
            written, failed = _over_tables_settled(lambda t, base: _write_generation(t, base, apply_expiry),
                                                   list(zip(tables.values(), bases)))
        news = [f for base, w in zip(bases, written) if w for f in _files_of(base, w[0])]
        try:
            if failed is not None:
                raise failed
            _write_verified(os.path.join(directory, TABLES_FILE), {
                "format": TABLES_FORMAT, "version": VERSION,
                "tables": {key: body for key, (body, _) in zip(tables, written)}})
        except BaseException:
            generations = {key: w[0]["generation"] for key, w in zip(tables, written) if w}
            if failed is not None or not _tables_file_names(directory, generations):
                _remove(news)
            raise
        # tables.json is in place: from here on every table restores from this save, whose
        # files stay even if a table's own manifest cannot be written.
        for base, (body, older) in zip(bases, written):
            _commit(base, body, older, named_elsewhere=True)


def _tables_file_names(directory: str, generations: Dict[str, int]) -> bool:
    """Whether ``tables.json`` in ``directory`` names these generations of these tables."""
    try:
        listed = _read_tables_file(directory) or {}
    except Exception:  # noqa: BLE001 - no readable tables.json names them
        return False
    return {key: body["generation"] for key, body in listed.items()} == generations


def restore_multi_type(table: BaseMultiTypeHashTable, directory: StrPath, format: str = "mtht") -> None:
    """Restore every table from ``directory``: from its key, or else from the first of its
    ``extra_restore_names`` that is present (exact names). A table takes the later of the
    checkpoint ``tables.json`` names for it and its own. Every checkpoint is verified
    before any table changes. ``format="monolith"`` reads Monolith's files of each table,
    found by its name (see :func:`mtht.monolith_checkpoint.restore_monolith_tables`).
    Writes queued by hooks are applied first (and so replaced)."""
    check_format(format)
    _check_model(table, "restore_multi_type")
    directory = os.fsdecode(directory)
    if _handed_to_sharded(table, "restore", directory, format):
        return
    table._wait_for_hooks()
    with _naming_the_slots_of_merged_tables(table):
        if format == "monolith":
            from mtht.monolith_checkpoint import restore_monolith_tables
            restore_monolith_tables(list(_slot_tables(table).values()), directory)
        else:
            _hash_table.swap_contents(load_multi_type(table, directory))
    table._drop_prefetched()


@contextlib.contextmanager
def _naming_the_slots_of_merged_tables(table) -> Iterator[None]:
    """An error that names a table a MergedMultiTypeHashTable built for several slots (by the
    md5 of their names) says which slots it holds: the md5 alone tells the trainer nothing."""
    try:
        yield
    except (OSError, ValueError) as e:
        merged: Dict[str, List[str]] = {}
        for slot, name in (getattr(table, "slot_mapping", None) or {}).items():
            merged.setdefault(name, []).append(slot)
        text = str(e)
        named = [f"{name!r} holds slot{'s' if len(slots) > 1 else ''} {', '.join(map(repr, sorted(slots)))}"
                 for name, slots in sorted(merged.items()) if name in text]
        if not named or type(e) not in (ValueError, FileNotFoundError, CheckpointError):
            raise
        raise type(e)(f"{text} (merged table {'; '.join(named)})") from None


def find_checkpoints(tables: Dict[str, Any], directory: str) -> List[Tuple[Any, str, dict]]:
    """For each ``{key: table}``, ``(table, basename, manifest)`` of its checkpoint in
    ``directory``: its key's, or else that of the first of its ``extra_restore_names`` that
    is present (exact names), the later of the one ``tables.json`` names and its own."""
    listed = _read_tables_file(directory) or {}
    found = []
    for key, t in tables.items():
        candidates = [key] + list(t.extra_restore_names)
        for name in candidates:
            body = _later(listed.get(name), os.path.join(directory, name))
            if body is not None:
                found.append((t, os.path.join(directory, name), body))
                break
        else:
            raise FileNotFoundError(f"no checkpoint for table {key!r} in {directory!r} (looked for {candidates})")
    return found


def load_multi_type(table, directory: str, parts: int = 1, part: int = 0) -> List[Tuple[Any, Any]]:
    """What :func:`restore_multi_type` puts in place, loaded and verified without changing
    anything: ``(table, core)`` pairs, each of a table and its restored contents. With
    ``parts`` > 1, ``directory`` is part ``part`` of a sharded save, whose ids must all be
    ``part`` modulo ``parts``."""
    directory = os.fsdecode(directory)
    tables = _named_tables(table)
    names = {name for key, t in tables.items() for name in [key] + list(t.extra_restore_names)}
    with _turn(directory, *(os.path.join(directory, n) for n in names)), directory_lock(directory, exclusive=False):
        found = find_checkpoints(tables, directory)
        loaded = _over_tables(lambda t, basename, body: _load(t, basename, body, parts, part), found)
    return [(t, core) for (t, _, _), (core, _) in zip(found, loaded)]


def _handed_to_sharded(table, what: str, directory: str, format: str) -> bool:
    """Whether ``table`` is, or wraps, a table sharded over processes, which saves and
    restores itself (``what``), every process its part: then done here. It waits for the
    hooks' calls itself, raising their errors on no process alone."""
    while table is not None and not getattr(table, "saves_its_parts", False):
        table = getattr(table, "_table", None)
    if table is None:
        return False
    if format != "mtht":
        raise ValueError(f"a {type(table).__name__} saves and restores in mtht's format only, each process its "
                         "part (format='monolith' writes one process's tables)")
    getattr(table, what)(directory)
    return True


def _later(listed: Optional[dict], basename: str) -> Optional[dict]:
    """Of the manifest tables.json lists for ``basename`` and its own, the later generation
    (its own is later after a save of that table alone), or None when there is neither."""
    own = read_manifest(basename) if checkpoint_exists(basename) else None
    if listed is None or (own is not None and own["generation"] > listed["generation"]):
        return own
    return listed
