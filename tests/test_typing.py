"""mtht ships its type hints (py.typed): a trainer that type-checks its own code in mypy's
strict mode must be able to call every public builder and table without errors, and have
its wrong arguments flagged. Every public function and method has its hints and a
docstring."""

import importlib
import inspect
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("mypy")
pytest.importorskip("torch")  # a tensor as a learning rate

from test_docs import python_blocks  # noqa: E402

_TRAINER = '''
import pathlib

import numpy as np
import numpy.typing as npt
import torch

import mtht
from mtht import checkpoint, learning_rate_functions as lrf, serving
from mtht.hash_table import fused_apply_gradient, fused_lookup
from mtht.multi_type_hash_table import MergedMultiTypeHashTable, MultiTypeHashTable
from mtht.testing import generate_test_hash_table_config


def optimizers() -> list[mtht.entry.Optimizer]:
    return [
        mtht.SgdOptimizer(0.1), mtht.AdagradOptimizer(0.1, 0.1, 1, 0, 0.0),
        mtht.DynamicWdAdagradOptimizer(0.1, decouple_weight_decay=False, dynamic_wd_temperature=2.0),
        mtht.AdadeltaOptimizer(0.1, 0.0, 0.9, 0.01, 0), mtht.AdamOptimizer(0.1, 0.9, 0.99, False, 0.0, True),
        mtht.AmsgradOptimizer(0.1), mtht.FtrlOptimizer(0.1, 0.1, 1.0, 0, 0.0, 0.0),
        mtht.FTRLWithGroupSparsityOptimizer(0.1), mtht.AdaGradWithGroupLassoOptimizer(0.1, 1.0, 0.1, 0.0),
        mtht.MomentumOptimizer(0.1, use_nesterov=True), mtht.MovingAverageOptimizer(0.9),
        mtht.RmspropOptimizer(0.1), mtht.RmspropV2Optimizer(0.1, momentum=0.5), mtht.BatchSoftmaxOptimizer(0.1),
        mtht.StochasticRoundingFloat16OptimizerWrapper(mtht.SgdOptimizer()),
        mtht.AdagradOptimizer(np.float32(0.1), np.float64(0.1), np.int64(1)),  # numpy's numbers too
    ]


def config(dim: int) -> mtht.HashTableConfigInstance:
    initializers: list[mtht.entry.Initializer] = [
        mtht.ZerosInitializer(), mtht.OnesInitializer(), mtht.ConstantsInitializer(0.5),
        mtht.RandomUniformInitializer(-0.1, 0.1), mtht.BatchSoftmaxInitializer(1.0)]
    compressors: list[mtht.entry.Compressor] = [
        mtht.Fp32Compressor(), mtht.Fp16Compressor(), mtht.FixedR8Compressor(2.0), mtht.OneBitCompressor(100, 0.1)]
    segments = [mtht.CombineAsSegment(np.int64(dim), initializers[k % 5], opt, compressors[k % 4])
                for k, opt in enumerate(optimizers())]
    rates: list[mtht.entry.LearningRateFn] = [
        0.1, lrf.PolynomialDecay(0.1, 100, 0.01, 1.0, False, "p"), lrf.ExponentialDecay(0.1, 10, 0.9, True),
        lrf.CosineDecay(0.1, 100, 0.0), lrf.PiecewiseConstantDecay([10, 20], [0.1, 0.05, 0.01]),
        lrf.LinearWarmup(0.1, 10, 0.0), lambda step: 0.1, lambda: 0.1, np.array(0.1), torch.tensor(0.1),
        np.float32(0.1), lrf.PolynomialDecay(np.float32(0.1), np.int64(100))]
    table_config = mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=segments))
    mtht.entry.CuckooHashTableConfig(1000, 24).mutate_table(table_config)
    return mtht.HashTableConfigInstance(table_config, [rates[k % len(rates)] for k in range(len(segments))],
                                        extra_restore_names=["old"])


def train(directory: str) -> float:
    mtht.set_num_threads(2)
    table = mtht.hash_table_from_config(config(1), hash_filter=mtht.HashFilter(np.int64(1), {3: 2}), name_suffix="t",
                                        saver_parallel=2)
    ids: npt.NDArray[np.int64] = np.arange(100, dtype=np.int64)
    rows = table.lookup(ids, out=np.empty((100, table.dim_size), np.float32))
    table.apply_gradients(ids, rows, global_step=1, enable_dedup=True, req_time=1_700_000_000)
    table.assign(ids[:2], rows[:2]).assign_add(ids[:2], rows[:2])

    slots = {"a": generate_test_hash_table_config(4), "b": generate_test_hash_table_config(4)}
    model = MultiTypeHashTable(slots, lambda slot, c: mtht.hash_table_from_config(c, name_suffix=slot))
    merged = MergedMultiTypeHashTable(slots, lambda merged_slots: MultiTypeHashTable(
        merged_slots, lambda slot, c: mtht.hash_table_from_config(c, name_suffix=slot)))
    with mtht.AsyncPush(merged, 2) as push, mtht.Prefetch(model) as prefetch:
        prefetch.prefetch({"a": ids})
        grads = {"a": (ids, prefetch.lookup({"a": ids})["a"])}
        push.apply_gradients(grads, 2)
        model.apply_gradients(grads, 2, enable_dedup=True)
    embeddings, _, id_offsets, emb_offsets, _ = fused_lookup([table], ids, [100], 1)
    fused_apply_gradient([table], ids, ids, [100], embeddings, id_offsets, emb_offsets,
                         table.config.call_learning_rate_fns(3), None, 3, 1)
    checkpoint.save_multi_type(model, directory)
    checkpoint.restore_multi_type(model, directory)
    merged_rows: dict[str, npt.NDArray[np.float32]] = merged.lookup({"a": ids, "b": torch.arange(3)})
    fused_rows, _, id_offsets, emb_offsets, indices = model.fused_lookup(ids, [100, 0], 1)
    model.fused_apply_gradient(indices, indices, [100, 0], fused_rows, id_offsets, emb_offsets, 4, None, 1)
    with mtht.Prefetch(table) as one:
        one.prefetch(torch.arange(5))
        found = table.contains(one.lookup(torch.arange(5)).shape)
    dumps = table.lookup_entry([1, 2]) + table.lookup_entry(np.array([3]))
    status = table.reinitialize(ids[:1], req_time=np.int64(5))
    packed = table.export_serving(ids[:4])
    unpacked = serving.decompress(table.config.table_config, packed)
    basename = pathlib.Path(directory) / "single"
    table.save(basename).restore(str(basename))
    checkpoint.save_multi_type(model, pathlib.Path(directory) / "model")
    unmerged: dict[str, npt.NDArray[np.float32]] = merged.lookup({"a": ids}, None)
    table.assign(torch.arange(2), torch.zeros(2, table.dim_size), req_time=torch.tensor(7))
    evicted = table.evict(np.int64(0)) + table.evict()
    stats = table.stats()
    return (float(table.lookup(ids).sum()) + len(table) + table.size() + mtht.get_num_threads()
            + len(merged_rows) + int(found.sum()) + len(dumps) + int(status.sum()) + len(unpacked) + evicted
            + int(stats["size"]) + len(model.learning_rates(np.int64(2), ("a",))) + len(unmerged))
'''

# Calls a type checker must refuse: a switch given as a string, a global step left out, a
# multi-slot lookup given a list, a learning rate schedule given a string.
_MISUSE = '''
import numpy as np

import mtht
from mtht.multi_type_hash_table import MultiTypeHashTable
from mtht.testing import generate_test_hash_table_config

table = mtht.hash_table_from_config(generate_test_hash_table_config(1))
model = MultiTypeHashTable({"a": generate_test_hash_table_config(1)},
                           lambda slot, c: mtht.hash_table_from_config(c, name_suffix=slot))
table.lookup([1, 2], enable_dedup="no")
table.apply_gradients([1], [[1.0]])
model.lookup([1, 2])
mtht.hash_table_from_config("config")
table.evict("yesterday")
'''


def test_a_trainer_type_checks_in_strict_mode(tmp_path):
    trainer = tmp_path / "trainer.py"
    trainer.write_text(_TRAINER, encoding="utf-8")
    readme = tmp_path / "readme_usage.py"
    readme_text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    readme.write_text("".join(code for _, code in python_blocks(readme_text)), encoding="utf-8")
    # Run from tmp_path, so that the installed package is checked, not the checkout's.
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                             "--cache-dir", str(tmp_path / "cache"), trainer.name, readme.name],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    # The program runs as well as type-checks.
    namespace: dict = {}
    exec(compile(_TRAINER, str(trainer), "exec"), namespace)
    assert namespace["train"](str(tmp_path / "ckpt")) > 0


def test_a_type_checker_refuses_what_the_tables_refuse(tmp_path):
    misuse = tmp_path / "misuse.py"
    misuse.write_text(_MISUSE, encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                             "--cache-dir", str(tmp_path / "cache"), misuse.name],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    flagged = {int(line.split(":")[1]) for line in result.stdout.splitlines() if ": error:" in line}
    lines = _MISUSE.splitlines()
    first_call = next(k for k, line in enumerate(lines, start=1) if line.startswith("table.lookup"))
    assert flagged == set(range(first_call, len(lines) + 1)), result.stdout


def _public_callables():
    """(qualified name, function) of every public function and method of mtht's modules."""
    seen = set()
    for module_name in _PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]:
            obj = getattr(module, name)
            if not getattr(obj, "__module__", "").startswith("mtht") or id(obj) in seen:
                continue
            seen.add(id(obj))
            if inspect.isfunction(obj):
                yield f"{module_name}.{name}", obj
            elif inspect.isclass(obj):
                for attr, value in vars(obj).items():
                    if attr.startswith("_") and attr != "__init__":
                        continue
                    value = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                    if inspect.isfunction(value):
                        yield f"{obj.__module__}.{obj.__qualname__}.{attr}", value


_PUBLIC_MODULES = ["mtht", "mtht.checkpoint", "mtht.distributed", "mtht.entry", "mtht.feature_eviction",
                   "mtht.hash_filter", "mtht.hash_table", "mtht.hash_table_utils", "mtht.hooks",
                   "mtht.learning_rate_functions", "mtht.monolith_checkpoint", "mtht.multi_type_hash_table",
                   "mtht.serving", "mtht.sharded_checkpoint", "mtht.testing"]


def test_every_public_function_and_method_has_complete_type_hints():
    """A parameter without a hint is Any to a type checker: a trainer's mistakes there go
    unflagged (mypy checks a call of a partly annotated function against what it has)."""
    incomplete = {}
    callables = dict(_public_callables())
    for name, fn in callables.items():
        signature = inspect.signature(fn)
        missing = [p.name for p in signature.parameters.values()
                   if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
        if signature.return_annotation is inspect.Signature.empty and fn.__name__ != "__init__":
            missing.append("return")
        if missing:
            incomplete[name] = missing
    assert len(callables) > 150  # the walk found the API
    assert not incomplete, incomplete


def test_every_public_function_and_method_has_a_docstring():
    """help() and an editor's hover show what a call does."""
    undocumented = [name for name, fn in _public_callables() if not (fn.__doc__ or "").strip()
                    and fn.__name__ != "__init__"]
    assert not undocumented, undocumented


@pytest.mark.parametrize("python_version", ["3.10", None])
def test_the_package_agrees_with_its_own_hints(tmp_path, python_version):
    """mypy over the installed package: the hints a trainer is checked against agree with the
    code behind them (its optional imports, tqdm or protobuf, may be missing), also as the
    oldest Python the package declares reads them (None: this interpreter's version)."""
    target = ["--python-version", python_version] if python_version else []
    result = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "--no-incremental",
                             *target, "--cache-dir", str(tmp_path / "cache"), "-p", "mtht"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
