"""Checkpoints of a model sharded over processes, and their re-sharding.

A sharded save of ``world_size`` processes in ``directory`` is::

    directory/sharded.json                         names the generation and the world size
    directory/g<generation>/part-<r>-of-<w>/       process r's tables (a multi-type save each)

Every process writes its part of a new generation; once all of them have, one process
renames ``sharded.json`` into place (atomic, synced), and only then is the previous
generation removed. A job killed at any moment leaves the previous save of every part, or
the new one of every part. A restore reads the generation ``sharded.json`` names.

Jobs that save into or restore from one directory take turns
(:func:`mtht.checkpoint.directory_lock`): a save holds the directory alone from choosing
its generation to naming it, and a restore holds it shared while its processes read, so
that an evaluation job restoring from the directory a training job saves into reads one
whole save.

:func:`reshard` rewrites a sharded save for another number of processes, in one process.
The functions here touch files only; :mod:`mtht.distributed` runs them on the processes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from typing import Callable, Dict, List, Optional, Tuple

from mtht import checkpoint as _checkpoint
from mtht import hash_table as _hash_table

__all__ = ["read_sharded_manifest", "part_directory", "reshard"]

SHARDED_FORMAT = "mtht-sharded-checkpoint"
SHARDED_FILE = "sharded.json"
_GENERATION = re.compile(r"^g([0-9]{6,})$")


def part_directory(directory: str, generation: int, part: int, world_size: int) -> str:
    """Where process ``part`` of ``world_size`` saves generation ``generation``."""
    return os.path.join(directory, f"g{generation:06d}", f"part-{part:05d}-of-{world_size:05d}")


def read_sharded_manifest(directory: str) -> dict:
    """``{"world_size", "generation", ...}`` of the sharded save in ``directory``, verified."""
    directory = os.fsdecode(directory)
    body = _checkpoint._read_verified(os.path.join(directory, SHARDED_FILE),
                                      f"no sharded checkpoint in {directory!r} (missing {SHARDED_FILE})",
                                      SHARDED_FORMAT)
    w, g = body.get("world_size"), body.get("generation")
    if not (type(w) is int and w >= 1 and type(g) is int and g >= 1):
        raise _checkpoint.CheckpointError(f"{os.path.join(directory, SHARDED_FILE)} does not hold what a save "
                                          "writes")
    return body


def current_generation(directory: str) -> Optional[int]:
    """The generation ``sharded.json`` names, or None when there is no readable one."""
    try:
        return read_sharded_manifest(directory)["generation"]
    except (FileNotFoundError, _checkpoint.CheckpointError):
        return None


def _has_manifest(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, SHARDED_FILE))


def _generations_on_disk(directory: str) -> List[int]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(_GENERATION.match, names) if m)


def _generation_path(directory: str, generation: int) -> str:
    return os.path.join(directory, f"g{generation:06d}")


def begin_save(directory: str) -> int:
    """The generation a new save in ``directory`` writes (one past any on disk), after
    removing what a killed save left: the generations ``sharded.json`` does not name, and
    its temporaries. (With a ``sharded.json`` that cannot be read, every generation stays.)"""
    directory = os.fsdecode(directory)
    os.makedirs(directory, exist_ok=True)
    current = current_generation(directory)
    on_disk = _generations_on_disk(directory)
    if current is not None or not _has_manifest(directory):
        for g in on_disk:
            if g != current:
                shutil.rmtree(_generation_path(directory, g))
    _checkpoint._remove(_checkpoint.stale_temps(os.path.join(directory, SHARDED_FILE)))
    return max(on_disk + [current or 0]) + 1


def save_part(model, directory: str, generation: int, part: int, world_size: int) -> None:
    """Save process ``part``'s model as its part of ``generation``, into a part directory
    that must be new: where it is there already, this process was given another directory
    than process 0 (which chose the generation from its own), one that holds a save of that
    generation, which must not be written over."""
    path = part_directory(directory, generation, part, world_size)
    if os.path.exists(path):
        raise _checkpoint.CheckpointError(
            f"{path} is there already: this process saves into another directory than process 0, and a save "
            "there must not be written over (every process must save into one directory that all of them see)")
    _checkpoint.save_multi_type(model, path)


def commit_save(directory: str, generation: int, world_size: int, keys: List[str]) -> None:
    """Name ``generation`` in ``sharded.json`` (every part of it written and synced), then
    remove the older generations. If the manifest is not in place, the new generation is
    removed and the previous save stays."""
    directory = os.fsdecode(directory)
    body = {"format": SHARDED_FORMAT, "version": _checkpoint.VERSION, "generation": generation,
            "world_size": world_size, "tables": sorted(keys)}
    try:
        for part in range(world_size):
            if not os.path.exists(os.path.join(part_directory(directory, generation, part, world_size),
                                               _checkpoint.TABLES_FILE)):
                raise _checkpoint.CheckpointError(
                    f"part {part} of {world_size} of the save in {directory!r} is not there: every process must "
                    "save into one directory that all of them see (one machine, or a shared file system)")
        _checkpoint._fsync_dir(_generation_path(directory, generation))
        _checkpoint._write_verified(os.path.join(directory, SHARDED_FILE), body)
    except BaseException:
        if current_generation(directory) != generation:
            abandon_save(directory, generation)
        raise
    for g in _generations_on_disk(directory):
        if g != generation:
            shutil.rmtree(_generation_path(directory, g), ignore_errors=True)


def abandon_save(directory: str, generation: int) -> None:
    """Remove what a save of ``generation`` wrote (it failed on some process)."""
    shutil.rmtree(_generation_path(os.fsdecode(directory), generation), ignore_errors=True)


def saved_parts(directory: str, expected_world_size: Optional[int] = None) -> Tuple[dict, List[str]]:
    """The manifest of the sharded save in ``directory`` and the directory of each part.
    ``expected_world_size``: refuse a save of another number of processes."""
    directory = os.fsdecode(directory)
    body = read_sharded_manifest(directory)
    w = body["world_size"]
    if expected_world_size is not None and w != expected_world_size:
        raise ValueError(f"the checkpoint in {directory!r} was saved by {w} processes and this job has "
                         f"{expected_world_size}: rewrite it for {expected_world_size} with "
                         f"mtht.sharded_checkpoint.reshard")
    return body, [part_directory(directory, body["generation"], r, w) for r in range(w)]


def reshard(source: str, target: str, world_size: int, make_model: Callable[[], object]) -> None:
    """Rewrite the sharded save in ``source`` for ``world_size`` processes, in ``target``.

    ``make_model()`` returns a new, empty model of one process: the
    :class:`~mtht.multi_type_hash_table.MultiTypeHashTable` (or the
    :class:`~mtht.multi_type_hash_table.MergedMultiTypeHashTable` over one) that each process's
    :class:`~mtht.distributed.DistributedMultiTypeHashTable` holds, built from the same
    configs, every table of the save among its tables (a model that leaves one out is
    refused: the new save would lack it). One model is in memory at a time: the entries of
    one new part, each of whose tables is read from every old part's files, keeping the ids
    the new part owns (``id mod world_size``), with their optimizer state, timestamps and
    admission counts.
    ``target`` gets a save that a job of ``world_size`` processes restores (a new generation
    if it holds one already); ``source`` is only read.
    """
    if type(world_size) is not int or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    source, target = os.fsdecode(source), os.fsdecode(target)
    if os.path.realpath(source) == os.path.realpath(target):
        raise ValueError("reshard writes a new checkpoint: give a target other than the source")
    saved_parts(source)  # a source that is no save is refused before the target is made
    # Taken in one order, so that reshards of A into B and of B into A wait for each other
    # instead of each holding one lock and waiting for the other.
    locks = sorted([(os.path.realpath(source), False), (os.path.realpath(target), True)])
    with contextlib.ExitStack() as held:
        for directory, exclusive in locks:
            held.enter_context(_checkpoint.directory_lock(directory, exclusive))
        _reshard(source, target, world_size, make_model)


def _reshard(source: str, target: str, world_size: int, make_model: Callable[[], object]) -> None:
    saved, old_parts = saved_parts(source)
    generation = begin_save(target)
    keys: List[str] = []
    try:
        for part in range(world_size):
            model = make_model()
            tables = _checkpoint._named_tables(model)
            keys = list(tables)
            left_out = sorted(set(saved.get("tables", [])) - set(keys))
            if left_out:  # the new save would lack them, silently, where it replaces the old one
                raise ValueError(f"the save in {source!r} holds tables {left_out} that make_model() does not build "
                                 f"(it builds {sorted(keys)}): give reshard a model of every table saved")
            found: Dict[str, List[Tuple[str, dict]]] = {key: [] for key in tables}
            for old in old_parts:
                for key, (_, basename, body) in zip(tables, _checkpoint.find_checkpoints(tables, old)):
                    found[key].append((basename, body))
            loaded = _checkpoint._over_tables(
                lambda t, sources: _checkpoint._load_sources(t, sources, world_size, part),
                [(tables[key], found[key]) for key in tables])
            _hash_table.swap_contents(list(zip(tables.values(), loaded)))
            # Every entry the source holds, kept: its parts left out what had expired when
            # they were saved, and a part may now take a later max_update_ts than its own.
            _checkpoint.write_multi_type(model, part_directory(target, generation, part, world_size),
                                         apply_expiry=False)
            del model, loaded
        commit_save(target, generation, world_size, keys)
    except BaseException:
        if current_generation(target) != generation:
            abandon_save(target, generation)
        raise
