"""The benchmark CLI: structure of its JSON and correctness of its checksums.

Timing is never asserted. Each checksum is recomputed here from the workload definition (the
batch keys of ``op_keys`` and the gradient rows of ``update_rows``) with a plain per-occurrence
model of the table, written independently of the benchmark's numpy baseline.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import mtht
from mtht import bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import optimizer_reference as ref  # noqa: E402
from cgroups import limited_group, run_in  # noqa: E402

SMALL = dict(size=20_000, batch_size=1024, iterations=2, warmup=1, progress=False)


def _config(**kw) -> bench.BenchConfig:
    args = dict(SMALL)
    args.update(kw)
    return bench.BenchConfig(**args)


def _value(key: int, dim: int) -> np.ndarray:
    """The filled row of a key, from its documented formula."""
    return np.array([((7 * key + 3 * j) % 97 - 48) / 64.0 for j in range(dim)], dtype=np.float32)


class _Model:
    """A table as a dict of float32 rows with the optimizer rules written out per element."""

    def __init__(self, optimizer: str, dim: int, lr: float, retrieve=None):
        self.opt, self.dim, self.lr = optimizer, dim, np.float32(lr)
        self.retrieve = retrieve or (lambda w: w)  # what a lookup returns of the values
        self.rows = {}

    def row(self, key: int, fresh: bool = False) -> dict:
        """A key's row: filled by its formula, or ``fresh`` (inserted by a write: zeros)."""
        if key not in self.rows:
            self.rows[key] = {
                "w": np.zeros(self.dim, np.float32) if fresh else _value(key, self.dim),
                "norm": np.full(self.dim, 0.1, np.float32),
                "m": np.zeros(self.dim, np.float32),
                "v": np.zeros(self.dim, np.float32),
                "b1p": np.float32(0.9),
                "b2p": np.float32(0.99),
            }
        return self.rows[key]

    def step(self, key: int, g: np.ndarray) -> None:
        r = self.row(key)
        lr = self.lr
        if self.opt == "sgd":
            r["w"] = r["w"] - lr * g
        elif self.opt == "adagrad":
            r["norm"] = r["norm"] + g * g
            r["w"] = r["w"] - (lr / np.sqrt(r["norm"])) * g
        else:
            b1, b2 = np.float32(0.9), np.float32(0.99)
            lr_t = np.float32(float(lr) * math.sqrt(1.0 - float(r["b2p"])) / (1.0 - float(r["b1p"])))
            r["m"] = r["m"] + (g - r["m"]) * (np.float32(1) - b1)
            r["v"] = r["v"] + (g * g - r["v"]) * (np.float32(1) - b2)
            r["w"] = r["w"] - (r["m"] * lr_t) / (np.sqrt(r["v"]) + np.float32(0.01))
            r["b1p"] = np.float32(r["b1p"] * b1)
            r["b2p"] = np.float32(r["b2p"] * b2)

    def checksum(self, keys) -> float:
        return sum(float(np.sum(self.retrieve(self.row(int(k))["w"]), dtype=np.float64)) for k in keys)


def expected_checksum(config: bench.BenchConfig, op: str, retrieve=None) -> float:
    """What the op's checksum must be: the float64 sum of the rows of every batch's ids, read
    right after that batch (through ``retrieve``, what lookups return of the values)."""
    batches = bench.op_keys(config, op)
    if op == "lookup_missing":
        return 0.0
    model = _Model(config.optimizer, config.dim, config.learning_rate, retrieve)
    rows = bench.update_rows(config.batch_size, config.dim, config.seed)
    total = 0.0
    if op == "apply_gradients_capped":
        return capped_model(config)[0]
    for keys in batches:
        if op == "assign_add":
            for i, k in enumerate(keys):
                r = model.row(int(k))
                r["w"] = r["w"] + rows[i]
        elif op == "apply_gradients":
            for i, k in enumerate(keys):
                model.step(int(k), rows[i])
        elif op == "apply_gradients_dedup":
            sums = {}
            for i, k in enumerate(keys):
                k = int(k)
                sums[k] = rows[i].copy() if k not in sums else sums[k] + rows[i]
            for k, g in sums.items():
                model.step(k, g)
        total += model.checksum(keys)
    return total


def capped_model(config: bench.BenchConfig) -> tuple:
    """(checksum, evictions) of apply_gradients_capped, by the LRU rule: a write that brings
    new ids first evicts as many entries it does not touch, least recently written first
    (the fill is one write), ties by id; then every occurrence steps, a new id's from zeros.
    New ids are the batch's new keys and the keys evicted before. The checksum sums the rows
    of every batch's ids after it (an evicted id of the batch would read zeros)."""
    model = _Model(config.optimizer, config.dim, config.learning_rate)
    rows = bench.update_rows(config.batch_size, config.dim, config.seed)
    clock = {int(k): 1 for k in range(config.size)}
    total, evictions = 0.0, 0
    for step, keys in enumerate(bench.op_keys(config, "apply_gradients_capped"), start=2):
        touched = {int(k) for k in keys}
        excess = len(clock) + len(touched - clock.keys()) - config.size
        if excess > 0:
            rest = sorted((c, int(bench.key_to_id(np.array([k]))[0]), k) for k, c in clock.items() if k not in touched)
            for _, _, k in rest[:excess]:
                del clock[k]
                model.rows.pop(k, None)
            evictions += excess
        for i, k in enumerate(keys):
            if int(k) not in clock:
                model.row(int(k), fresh=True)
            model.step(int(k), rows[i])
        for k in touched:
            clock[k] = step
        total += model.checksum(keys)
    return total, evictions


def grow_checksum(config: bench.BenchConfig) -> float:
    """The checksum of grow: keys 0, 1, ... in batches of ``batch_size``, each key new, its
    row stepped once from zeros with the batch's update row of its position; the sum of
    each batch's rows after it."""
    model = _Model(config.optimizer, config.dim, config.learning_rate)
    rows = bench.update_rows(config.batch_size, config.dim, config.seed)
    total = 0.0
    for start in range(0, config.size, config.batch_size):
        keys = range(start, min(config.size, start + config.batch_size))
        for i, k in enumerate(keys):
            model.row(k, fresh=True)
            model.step(k, rows[i])
        total += model.checksum(keys)
    return total


def _results(result: dict, op: str, impl: str) -> list:
    return [r for r in result["results"] if r["op"] == op and r["impl"] == impl]


def _check_ok_row(r: dict) -> None:
    for key in ("ids_per_s", "ids_per_s_min", "ids_per_s_max", "ids_per_s_q1", "ids_per_s_q3", "gb_per_s",
                "bytes_per_id", "batches_timed", "ids_per_batch", "seconds", "checksum", "threads"):
        assert key in r, key
    assert r["status"] == "ok"
    assert r["ids_per_s_min"] <= r["ids_per_s_q1"] <= r["ids_per_s"] <= r["ids_per_s_q3"] <= r["ids_per_s_max"]
    assert r["batches_timed"] == SMALL["iterations"] == len(r["seconds"])
    assert all(s > 0 for s in r["seconds"])
    assert r["ids_per_s_overall"] == pytest.approx(r["batches_timed"] * r["ids_per_batch"] / sum(r["seconds"]))
    assert r["ids_per_s_min"] <= r["ids_per_s_overall"] <= r["ids_per_s_max"]
    assert math.isfinite(r["checksum"])


def test_workload_definition():
    keys = np.arange(1000, dtype=np.int64)
    ids = bench.key_to_id(keys)
    assert ids.dtype == np.int64 and len(np.unique(ids)) == len(keys)
    vals = bench.fill_values(keys, 5)
    for k in (0, 1, 999):
        np.testing.assert_array_equal(vals[k], _value(k, 5))
    c = _config(dist="zipf")
    a, b = bench.op_keys(c, "lookup"), bench.op_keys(c, "lookup")
    assert len(a) == c.warmup + c.iterations
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(((x >= 0) & (x < c.size)).all() for x in a)
    assert all((x >= c.size).all() for x in bench.op_keys(c, "lookup_missing"))
    new = bench.capped_new_ids(c)
    capped = np.concatenate([b[c.batch_size - new:] for b in bench.op_keys(c, "apply_gradients_capped")])
    np.testing.assert_array_equal(capped, c.size + np.arange(capped.size))  # new ids, each once
    assert all((b[:c.batch_size - new] < c.size).all() for b in bench.op_keys(c, "apply_gradients_capped"))
    skeys, sids, fss = bench.fused_layout(a[0], 8, 4)
    assert fss.sum() == len(a[0]) and len(fss) == 32
    blocks = np.repeat(np.arange(32), fss)
    np.testing.assert_array_equal(blocks, np.mod(sids, 4) * 8 + skeys % 8)


@pytest.mark.parametrize("optimizer,dist", [("sgd", "uniform"), ("adagrad", "zipf"), ("adam", "zipf")])
def test_checksums_match_a_model_and_the_baselines(optimizer, dist):
    config = _config(optimizer=optimizer, dist=dist, baseline=True, threads=(1, 2))
    result = bench.run_benchmark(config)
    json.dumps(result)  # serialisable as the CLI writes it
    assert result["schema"] == bench.SCHEMA_VERSION
    assert result["build_info"]["version"] == mtht.__version__
    assert result["config"]["threads"] == [1, 2]
    assert result["probe"]["line64_reads_per_s"] > 0
    mtht_ok = all(r["status"] == "ok" for r in _results(result, "lookup", "mtht"))
    for op in bench.BASELINE_OPS:
        want = expected_checksum(config, op)
        impls = ["numpy+dict"] + (["pandas+numpy"] if bench._pandas_available() else [])
        if mtht_ok:
            impls.append("mtht")
        for impl in impls:
            rows = _results(result, op, impl)
            assert len(rows) == (2 if impl == "mtht" else 1), (op, impl)
            for r in rows:
                _check_ok_row(r)
                assert r["checksum"] == pytest.approx(want, rel=1e-6, abs=1e-6), (op, impl, r["threads"])
        if mtht_ok:
            one, two = _results(result, op, "mtht")
            assert one["checksum"] == two["checksum"]  # results never depend on the thread count
            baseline = _results(result, op, "numpy+dict")[0]
            assert two["vs_one_thread"] == pytest.approx(two["ids_per_s"] / one["ids_per_s"])
            assert two["vs_numpy_dict"] == pytest.approx(two["ids_per_s"] / baseline["ids_per_s"])
            assert two["checksum_matches_numpy_dict"] is True
    if not mtht_ok:
        note = _results(result, "lookup", "mtht")[0]["note"]
        assert "unavailable" in note
        return
    for threads in (1, 2):
        fused = [r for r in _results(result, "fused", "mtht") if r["threads"] == threads][0]
        _check_ok_row(fused)
        assert fused["checksum"] == fused["one_table_checksum"]
        want = sum(float(np.sum(bench.fill_values(k, config.dim), dtype=np.float64))
                   for k in bench.op_keys(config, "fused"))
        assert fused["checksum"] == pytest.approx(want, rel=1e-12)
        assert fused["vs_one_table"] > 0
        fag = [r for r in _results(result, "fused_apply_gradient", "mtht") if r["threads"] == threads][0]
        assert fag["checksum"] == pytest.approx(fag["one_table_checksum"], rel=1e-6)
        # The slot ops: the same ids split among --slots slots, a table each (multi_slot) or
        # one for all (merged_slot), read and step as in one table.
        for kind in ("multi_slot", "merged_slot"):
            msl = [r for r in _results(result, f"{kind}_lookup", "mtht") if r["threads"] == threads][0]
            _check_ok_row(msl)
            want = sum(float(np.sum(bench.fill_values(k, config.dim), dtype=np.float64))
                       for k in bench.op_keys(config, f"{kind}_lookup"))
            assert msl["checksum"] == pytest.approx(want, rel=1e-12)
            assert msl["one_table_checksum"] == pytest.approx(want, rel=1e-12)
            assert msl["slots"] == config.slots and msl["vs_one_table"] > 0
            msa = [r for r in _results(result, f"{kind}_apply_gradients", "mtht") if r["threads"] == threads][0]
            _check_ok_row(msa)
            assert msa["checksum"] == pytest.approx(msa["one_table_checksum"], rel=1e-9)
    # A table filled to its capacity: each new id of a batch evicts an entry.
    new = bench.capped_new_ids(config)
    assert 0 < new < config.batch_size
    capped = _results(result, "apply_gradients_capped", "mtht")
    assert len(capped) == 2
    checksum, evictions = capped_model(config)
    for r in capped:
        _check_ok_row(r)
        assert r["checksum"] == pytest.approx(checksum, rel=1e-6, abs=1e-6)
        assert r["evictions"] == evictions >= new * (config.warmup + config.iterations)
    assert capped[0]["checksum"] == capped[1]["checksum"]
    # A table that grows from empty, no room reserved: every batch timed, the slowest given.
    grow = _results(result, "grow", "mtht")
    assert len(grow) == 2
    want = grow_checksum(config)
    for r in grow:
        assert r["status"] == "ok" and r["grown_to"] == config.size
        assert r["checksum"] == pytest.approx(want, rel=1e-6, abs=1e-6)
        assert r["batches_timed"] == len(r["seconds"]) == -(-config.size // config.batch_size)
        ms = np.asarray(r["seconds"]) * 1e3
        assert r["batch_ms_median"] == pytest.approx(np.median(ms))
        assert r["batch_ms_median"] <= r["batch_ms_p99"] <= r["batch_ms_max"] == pytest.approx(ms.max())
    assert grow[0]["checksum"] == grow[1]["checksum"]
    for op in ("save", "restore"):
        for r in _results(result, op, "mtht"):
            assert r["status"] in ("ok", "unavailable")
    assert all(set(g) == {"goal", "value", "need", "unit", "met"} for g in result["goals"])
    text = bench.format_report(result)
    assert "active kernel" in text and "checksum" in text
    assert f"(from empty to {config.size:,} ids" in text
    # The goals are set for other workloads than this small one, and the report says so; the
    # same goals on a goal workload come without the remark.
    assert result["goals"] and "set for tables of 1M and 10M ids" in text
    goal_run = dict(result, config=dict(result["config"], size=1_000_000, batch_size=65536))
    assert "set for tables of 1M and 10M ids" not in bench.format_report(goal_run)


def test_save_and_restore_in_either_checkpoint_format(tmp_path):
    # Both formats save and restore the filled table whole: the checksum after the restore
    # is the filled rows', and the op leaves nothing behind in --save_dir.
    def want(config, op):  # the filled rows of the op's first batch, as restored
        return float(np.sum(bench.fill_values(bench.op_keys(config, op)[0], config.dim), dtype=np.float64))

    sizes = {}
    for fmt in ("mtht", "monolith"):
        config = _config(ops=("save", "restore"), threads=(1, 2), probe=False, checkpoint_format=fmt,
                         save_dir=str(tmp_path))
        result = bench.run_benchmark(config)
        for op in ("save", "restore"):
            rows = _results(result, op, "mtht")
            assert len(rows) == 2
            for r in rows:
                _check_ok_row(r)
                assert r["checksum"] == pytest.approx(want(config, op), rel=1e-12)
                # Each op's ratio to numpy's of the same bytes: save to np.save, restore to np.load.
                ratio = "vs_numpy_save" if op == "save" else "vs_numpy_load"
                assert r[ratio] == pytest.approx(r["gb_per_s"] / r["numpy_gb_per_s"])
                assert {"vs_numpy_save", "vs_numpy_load"} - {ratio} & set(r) == set()
        sizes[fmt] = _results(result, "save", "mtht")[0]["checkpoint_bytes"]
        assert os.listdir(tmp_path) == []  # cleaned up
    # Monolith's records carry a tag per float: more bytes than mtht's own files.
    assert sizes["monolith"] > sizes["mtht"]
    with pytest.raises(ValueError, match="checkpoint_format"):
        _config(checkpoint_format="tfrecord").validate()


def test_ops_are_independent_of_each_other():
    """Each op starts from the filled table, so running one op alone gives the same checksum."""
    config = _config(optimizer="adagrad", dist="zipf", threads=(1,), probe=False)
    together = bench.run_benchmark(dataclass_replace(config, ops=("assign_add", "apply_gradients")))
    alone = bench.run_benchmark(dataclass_replace(config, ops=("apply_gradients",)))
    assert _results(together, "apply_gradients", "mtht")[0]["checksum"] == \
        _results(alone, "apply_gradients", "mtht")[0]["checksum"]


def dataclass_replace(config, **kw):
    import dataclasses

    return dataclasses.replace(config, **kw)


def test_unavailable_optimizer_is_reported_not_raised(monkeypatch):
    def refuse(*args, **kwargs):
        raise NotImplementedError("the 'adam' optimizer is not available in this version of mtht")

    monkeypatch.setattr(bench.mtht, "hash_table_from_config", refuse)
    config = _config(optimizer="adam", ops=("lookup", "apply_gradients"), baseline=True, threads=(1,))
    result = bench.run_benchmark(config)
    for op in ("lookup", "apply_gradients"):
        (r,) = _results(result, op, "mtht")
        assert r["status"] == "unavailable" and "not available" in r["note"]
        (b,) = _results(result, op, "numpy+dict")
        assert b["checksum"] == pytest.approx(expected_checksum(config, op), rel=1e-6, abs=1e-6)
    assert "not available" in bench.format_report(result)


def test_memory_budget_skips_instead_of_failing():
    # 1 MB: a batch's arrays (0.26 MB) fit, a table of 20,000 ids (about 4 MB) does not.
    result = bench.run_benchmark(_config(ops=("lookup",), max_memory_gb=1e-3, threads=(1,), probe=False))
    (r,) = _results(result, "lookup", "mtht")
    assert r["status"] == "unavailable" and "max_memory_gb" in r["note"]
    with pytest.raises(ValueError, match=r"0.0 GB of arrays, more than the memory budget of 0.0001 GB"):
        bench.run_benchmark(_config(ops=("lookup",), max_memory_gb=1e-4, threads=(1,), probe=False))


def test_baseline_is_capped():
    config = _config(ops=("lookup",), baseline=True, baseline_max_size=5000, threads=(1,), probe=False)
    result = bench.run_benchmark(config)
    (b,) = _results(result, "lookup", "numpy+dict")
    assert b["table_size"] == 5000
    assert any("capped" in n for n in result["notes"])
    (m,) = _results(result, "lookup", "mtht")
    assert "vs_numpy_dict" in m and "checksum_matches_numpy_dict" not in m


def test_sweep_without_matplotlib_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    config = _config(ops=("lookup",), threads=(1,), probe=False)
    out = bench.run_sweep(config, "size", [5000, 10000], str(tmp_path / "p.png"))
    assert [run["config"]["size"] for run in out["runs"]] == [5000, 10000]
    assert out["plot"] is None and "matplotlib" in out["plot_note"]
    assert not (tmp_path / "p.png").exists()


def test_a_sweep_point_that_does_not_fit_says_so_and_draws_no_empty_plot(tmp_path):
    # A table past --max_memory_gb is skipped: the sweep's summary says so beside the points
    # that ran, and a sweep of which no point ran writes no plot (it wrote an empty one).
    config = _config(ops=("lookup",), threads=(1,), probe=False, max_memory_gb=0.01)
    out = bench.run_sweep(config, "size", [1000, 1_000_000], str(tmp_path / "p.png"))
    text = bench.format_sweep(out)
    assert "1,000,000 mtht: skipped: a 1,000,000-id table needs about" in text
    assert "     1,000 lookup" in text
    out = bench.run_sweep(config, "size", [1_000_000], str(tmp_path / "q.png"))
    assert out["plot"] is None and "no value of the sweep ran" in out["plot_note"]
    assert not (tmp_path / "q.png").exists()


def test_sweep_plot(tmp_path):
    pytest.importorskip("matplotlib")
    config = _config(ops=("lookup", "apply_gradients"), threads=(1,))
    out = bench.run_sweep(config, "dim", [4, 8], str(tmp_path / "p.png"))
    assert out["plot"] == str(tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("optimizer,dist", [("adagrad", "uniform"), ("adam", "zipf")])
def test_fetch_distances_side_by_side_give_the_model_checksums(monkeypatch, optimizer, dist):
    # Tables built under different MTHT_FETCHES_AHEAD (blocks of 2 to 16 ids) take the same
    # batches in turn: each gives the model's checksums, the first's ratio to itself is 1,
    # and the caller's own setting is back in place afterwards.
    monkeypatch.setenv("MTHT_FETCHES_AHEAD", "7")
    config = _config(optimizer=optimizer, dist=dist, threads=(1, 2))
    result = bench.run_fetches_ahead(config, [16, 1, 256])
    json.dumps(result)
    assert os.environ["MTHT_FETCHES_AHEAD"] == "7"
    assert result["compare"] == "fetches_ahead" and result["values"] == [16, 1, 256]
    blocks = {t["fetches_ahead"]: (t["read_block"], t["write_block"]) for t in result["tables"]}
    assert blocks[1] == (2, 2) and blocks[256] == (16, 16) and blocks[16][0] == 8
    assert result["default"] == 16  # the distance of a table built without the variable (not its 7)
    assert len(result["results"]) == len(bench.FETCH_OPS) * 2 * 3
    for op in bench.FETCH_OPS:
        want = expected_checksum(config, op)
        rows = [r for r in result["results"] if r["op"] == op]
        assert sorted((r["threads"], r["fetches_ahead"]) for r in rows) == [
            (t, v) for t in (1, 2) for v in (1, 16, 256)]
        for r in rows:
            _check_ok_row(r)
            assert r["checksum"] == pytest.approx(want, rel=1e-6, abs=1e-6), (op, r["fetches_ahead"])
            assert r["checksum"] == rows[0]["checksum"]  # to the bit
            assert r["vs_first"] > 0 and (r["fetches_ahead"] != 16 or r["vs_first"] == 1.0)
    assert bench.fetches_ahead_agree(result)
    text = bench.format_fetches_ahead(result)
    assert "checksums: the tables agree" in text and "fastest: " in text
    assert [line.endswith("(the default)") for line in text.splitlines()[2:5]] == [True, False, False]
    assert sum(line.startswith("apply_gradients ") for line in text.splitlines()) == 2
    differing = dict(result, results=[dict(r, checksum=r["checksum"] + (r["fetches_ahead"] == 1))
                                      for r in result["results"]])
    assert not bench.fetches_ahead_agree(differing) and "DIFFER" in bench.format_fetches_ahead(differing)


def test_cli_fetches_ahead(tmp_path):
    path = tmp_path / "out.json"
    proc = _cli("--size=20000", "--batch_size=1024", "--iterations=2", "--warmup=1", "--threads=1",
                "--ops=lookup,apply_gradients", "--fetches_ahead=4,32", "--noprogress", f"--json={path}",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "fetches ahead side by side" in proc.stdout and "checksums: the tables agree" in proc.stdout
    result = json.loads(path.read_text())
    assert {(r["op"], r["fetches_ahead"]) for r in result["results"]} == {
        (op, v) for op in ("lookup", "apply_gradients") for v in (4, 32)}
    config = _config()
    for r in result["results"]:
        assert r["checksum"] == pytest.approx(expected_checksum(config, r["op"]), rel=1e-6, abs=1e-6)


def _cli(*args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-m", "mtht.bench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_json(tmp_path):
    path = tmp_path / "out.json"
    proc = _cli("--size=20000", "--batch_size=1024", "--iterations=2", "--warmup=1", "--threads=1,2",
                "--baseline", "--dist=zipf", "--optimizer=sgd", "--noprogress", f"--json={path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "active kernel" in proc.stdout and "checksum" in proc.stdout
    result = json.loads(path.read_text())
    assert result["config"]["size"] == 20000 and result["config"]["threads"] == [1, 2]
    config = _config(dist="zipf", optimizer="sgd")
    for op in ("lookup", "apply_gradients_dedup"):
        for r in _results(result, op, "mtht") + _results(result, op, "numpy+dict"):
            assert r["checksum"] == pytest.approx(expected_checksum(config, op), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("args, says", [
    (["--ops=lookup,frobnicate"], "frobnicate"),
    (["--threads=2000"], "from 1 to 1024"),
    (["--max_memory_gb=-1"], "max_memory_gb must be a positive number"),
    (["--max_memory_gb=nan"], "max_memory_gb must be a positive number"),
    (["--max_memory_gb=0"], "max_memory_gb must be a positive number"),
    (["--max_memory_gb=1000000"], "is more than this"),
    (["--seed=-1"], "--seed"),
    (["--learning_rate=nan"], "learning_rate must be finite"),
    (["--learning_rate=1e300"], "learning_rate must be finite in float32"),
    (["--threads=1e400"], "--threads: '1e400' is not an integer"),
    (["--plot=p.png"], "--plot is the plot of a sweep"),
    (["--sweep=dim", "--sweep_dims=8,1000000", "--batch_size=65536"], "--sweep_dims: 1000000: a batch of"),
    (["--dim=1000000", "--batch_size=65536"], "GB of arrays"),
    (["--json=/nonexistent/dir/x.json"], "--json=/nonexistent/dir/x.json"),
    (["--json=."], "--json=."),
    (["--save_dir=/nonexistent"], "--save_dir=/nonexistent"),
    (["--sweep=size", "--sweep_sizes=1000,0"], "--sweep_sizes must list values >= 1"),
    (["--sweep=size", "--sweep_sizes="], "--sweep_sizes must list values >= 1"),
    (["--sweep=dim", "--sweep_dims=0"], "--sweep_dims must list values >= 1"),
    (["--sweep=size", "--sweep_sizes=1000", "--plot=/nonexistent/d/p.png"], "--plot=/nonexistent/d/p.png"),
    # Places no file can be made in (/proc takes none, even from root).
    (["--json=/proc/mtht-bench.json"], "--json=/proc/mtht-bench.json: cannot write in /proc"),
    (["--save_dir=/proc"], "--save_dir=/proc: cannot write in /proc"),
    (["--sweep=size", "--sweep_sizes=1000", "--plot=/proc/p.png"], "--plot=/proc/p.png: cannot write in /proc"),
    (["--sweep=size", "--sweep_sizes=1000", "--plot=p.txt"], "--plot=p.txt: the plot is a PNG file"),
    (["--ops=lookup,save,lookup"], "--ops lists lookup more than once"),
    (["--threads=2,1,2"], "--threads lists 2 more than once"),
    (["--sweep=size", "--sweep_sizes=1000", "--json=x.png", "--plot=x.png"], "--json and --plot name one file"),
    (["--size=99999999999999999999"], "size must be at most"),
    (["--dim=40000", "--batch_size=16384"], "more than the memory budget of 8 GB"),  # 10.5 GB of batches
    # Refused by the flags' own bounds and choices, before the run's checks.
    (["--size=0"], "--size"),
    (["--dim=-1"], "--dim"),
    (["--warmup=-1"], "--warmup"),
    (["--capped_new=2"], "--capped_new"),
    (["--fused_tables=0"], "--fused_tables"),
    (["--dist=foo"], "--dist"),
    (["--embedding_dtype=int8"], "--embedding_dtype"),
    (["--fetches_ahead=16"], "two or more distinct values from 1 to 256"),
    (["--fetches_ahead=16,16"], "two or more distinct values from 1 to 256"),
    (["--fetches_ahead=8,300"], "two or more distinct values from 1 to 256"),
    (["--fetches_ahead=8,x"], "--fetches_ahead: 'x' is not an integer"),
    (["--fetches_ahead=8,16", "--baseline"], "--baseline does not go with --fetches_ahead"),
    (["--fetches_ahead=8,16", "--sweep=dim"], "--sweep does not go with --fetches_ahead"),
    (["--fetches_ahead=8,16", "--ops=lookup,fused"], "compares the ops of one table"),
    (["--fetches_ahead=8,16", "--size=1000000000"], "tables of 1,000,000,000 ids need about"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_cli_rejects_bad_flags_before_it_runs(tmp_path, args, says):
    # A usage error, before anything runs (no probe, no table): not a traceback at the end.
    proc = _cli("--size=1000", "--iterations=1", "--noprogress", *args, cwd=tmp_path)
    assert proc.returncode != 0
    assert says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "probe: random 64-byte reads over" not in proc.stderr and proc.stdout == ""
    # The message alone, in the run's own words, not under the listing of every flag.
    assert len(proc.stderr.splitlines()) <= 3 and "--baseline_max_size" not in proc.stderr, proc.stderr
    assert "FATAL" not in proc.stderr, proc.stderr
    assert any(line.startswith("mtht-bench: ") and says in line for line in proc.stderr.splitlines()), proc.stderr


def test_a_sweep_refuses_a_current_directory_it_cannot_write_its_default_plot_to():
    # No --plot: the plot goes to the current directory (here /proc, which takes no file even
    # from root), and the refusal says so rather than naming a flag that was not given.
    proc = _cli("--sweep=size", "--sweep_sizes=1000", "--noprogress", cwd="/proc")
    assert proc.returncode == 1 and proc.stdout == ""
    first = proc.stderr.splitlines()[0]
    assert first.startswith("mtht-bench: the sweep's plot, mtht-bench-sweep.png in the current directory"), first
    assert "cannot write in /proc" in first


_SWEEP_VALUES = """
import sys
from mtht import bench
bench.FLAGS(["mtht-bench"] + sys.argv[1:])
print(bench._sweep_values(bench.config_from_flags()))
"""


@pytest.mark.parametrize("args, values", [
    (["--sweep=size"], [1_000_000, 10_000_000, 50_000_000]),
    (["--sweep=size", "--quick"], [50_000, 200_000, 1_000_000]),  # a few seconds a value, as --quick promises
    (["--sweep=size", "--quick", "--sweep_sizes=3000,4000"], [3000, 4000]),  # given explicitly: it wins
    (["--sweep=dim", "--quick"], [8, 16, 32, 64, 128]),
])
def test_the_values_of_a_sweep(tmp_path, args, values):
    proc = subprocess.run([sys.executable, "-c", _SWEEP_VALUES, *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip() == str(values), proc.stdout + proc.stderr


def test_cli_fails_when_no_op_of_mtht_ran(tmp_path):
    # A table past the memory budget is skipped, and a script must be able to tell.
    proc = _cli("--size=20000", "--batch_size=1024", "--max_memory_gb=0.001", "--ops=lookup", "--threads=1",
                "--noprobe", "--nobaseline", "--noprogress", cwd=tmp_path)
    assert proc.returncode == 1 and "no op of mtht ran" in proc.stderr, proc.stderr
    assert "skipped" in proc.stdout


def test_cli_sweep_says_what_it_leaves_out_and_how_each_value_checked(tmp_path):
    proc = _cli("--sweep=dim", "--sweep_dims=4,8", "--dim=16", "--size=2000", "--batch_size=256", "--iterations=2",
                "--ops=lookup", "--threads=1", "--noprobe", "--baseline", "--noprogress", f"--plot={tmp_path / 'p.png'}",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "note: --dim is not used: --sweep=dim runs the values of --sweep_dims" in proc.stderr
    # The header names the values swept, not the first run's alone.
    assert "dim swept over 4, 8  batch 256" in proc.stdout and "size 2,000" in proc.stdout, proc.stdout
    summary = proc.stdout[proc.stdout.index("sweep over dim:"):]
    for dim in (4, 8):
        assert f"{dim:>12,} checksums: mtht and the baselines agree" in summary, summary


@pytest.mark.parametrize("signum, code, says", [(signal.SIGINT, 130, "mtht-bench: interrupted"),
                                                (signal.SIGTERM, 128 + signal.SIGTERM, "")])
def test_an_interrupted_or_killed_run_removes_its_checkpoints(tmp_path, signum, code, says):
    # Ctrl-C was a traceback; a kill (a job's timeout) left GBs of checkpoints in the temp dir.
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    saves = tmp_path / "saves"
    saves.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "mtht.bench", "--size=2000000", "--ops=save,restore",
                             "--threads=1", "--iterations=200", "--noprobe", "--nobaseline", "--noprogress",
                             f"--save_dir={saves}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not os.listdir(saves) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the saves
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, (proc.returncode, err)
    assert says in err and "Traceback" not in err, err
    assert os.listdir(saves) == []


def test_cli_json_is_written_when_the_reader_of_the_output_goes(tmp_path):
    # mtht-bench --json=... | head -1: the report's lines meet a closed pipe; the run ends
    # quietly and its JSON is written (it was a BrokenPipeError traceback, and no JSON).
    path = tmp_path / "out.json"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen([sys.executable, "-m", "mtht.bench", "--quick", "--noprobe", "--ops=lookup",
                             "--threads=1", "--noprogress", "--nobaseline", f"--json={path}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # as head does after its line
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()
    assert [r["op"] for r in json.loads(path.read_text())["results"]] == ["lookup"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, from the baseline's overflow
def test_diverged_numbers_are_null_in_the_json_and_agree_between_the_implementations():
    # A learning rate of 3e38 takes Adagrad's rows to NaN in mtht and the baseline alike:
    # JSON has no NaN (the file was not JSON), and two NaN checksums agree.
    result = bench.run_benchmark(_config(optimizer="adagrad", learning_rate=3e38, ops=("apply_gradients",),
                                         baseline=True, threads=(1,), probe=False))
    text = json.dumps(bench.json_ready(result), allow_nan=False)
    rows = [r for r in json.loads(text)["results"] if r["op"] == "apply_gradients"]
    assert rows and all(r["checksum"] is None for r in rows)
    assert all(r.get("checksum_matches_numpy_dict", True) for r in rows)
    assert "agree" in bench.format_report(result)


def test_cli_json_that_cannot_be_written_at_the_end(tmp_path):
    # A --json file that passed the checks but cannot take the results (/dev/full: no room)
    # is an error message and a failing exit, with the report printed: not a traceback.
    proc = _cli("--quick", "--noprobe", "--ops=lookup", "--threads=1", "--noprogress", "--json=/dev/full",
                cwd=tmp_path)
    assert proc.returncode == 1
    assert "could not be written to --json=/dev/full" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "checksum" in proc.stdout


def test_sweep_keeps_its_results_when_the_plot_cannot_be_written(monkeypatch, tmp_path):
    def no_room(result, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bench, "plot_sweep", no_room)
    out = bench.run_sweep(_config(ops=("lookup",), threads=(1,), probe=False), "size", [5000],
                          str(tmp_path / "p.png"))
    assert [run["config"]["size"] for run in out["runs"]] == [5000]
    assert out["plot"] is None and "No space left on device" in out["plot_note"]


_ON_A_MACHINE = """
import sys
from absl import app
from mtht import bench
bench.physical_memory_gb = lambda: float(sys.argv[1])
bench.memory_limit_gb = lambda: float(sys.argv[2]) or None
bench.FLAGS(["mtht-bench"] + sys.argv[3:])
try:
    print(bench.config_from_flags().max_memory_gb)
except app.UsageError as e:
    print("usage error:", e)
"""


@pytest.mark.parametrize("memory_gb, args, printed", [
    # 8 GB, or three quarters of the machine's memory if that is less.
    (4, [], "3.0"), (4, ["--max_memory_gb=2"], "2.0"), (4, ["--max_memory_gb=5"], "usage error: --max_memory_gb=5 is more"),
    (10, [], "7.5"), (24, [], "8.0"), (24, ["--max_memory_gb=12"], "12.0"),
    # A size sweep takes three quarters of a larger machine too; a quick one, whose tables are small, does not.
    (24, ["--sweep=size"], "18.0"), (4, ["--sweep=size"], "3.0"), (24, ["--sweep=size", "--quick"], "8.0"),
    (24, ["--sweep=dim"], "8.0"),
])
def test_the_default_memory_budget(tmp_path, memory_gb, args, printed):
    proc = subprocess.run([sys.executable, "-c", _ON_A_MACHINE, str(memory_gb), "0", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith(printed), proc.stdout + proc.stderr


@pytest.mark.parametrize("memory_gb, limit_gb, args, printed", [
    # A container's memory limit stands for the machine's memory where it is less.
    (256, 4, [], "3.0"), (256, 64, [], "8.0"), (256, 64, ["--sweep=size"], "48.0"), (4, 64, [], "3.0"),
    (256, 4, ["--max_memory_gb=5"], "usage error: --max_memory_gb=5 is more than this process's memory limit of 4.0 GB"),
    (4, 64, ["--max_memory_gb=5"], "usage error: --max_memory_gb=5 is more than this machine's 4.0 GB"),
])
def test_the_default_memory_budget_under_a_memory_limit(tmp_path, memory_gb, limit_gb, args, printed):
    proc = subprocess.run([sys.executable, "-c", _ON_A_MACHINE, str(memory_gb), str(limit_gb), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith(printed), proc.stdout + proc.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="control groups are Linux's")
def test_the_benchmark_reads_a_real_memory_limit(tmp_path):
    # In a container the machine's memory is not what the process may use: a budget taken
    # from it would let the tables grow past the limit, where the kernel ends the process.
    machine, limit = bench.physical_memory_gb(), bench.memory_limit_gb()
    if not machine or machine < 4 or (limit and limit < 2.2):
        pytest.skip("a limit of 2 GiB must be below this machine's memory and this process's limit")
    with limited_group("memory", {"memory.limit_in_bytes": str(2 << 30)}, {"memory.max": str(2 << 30)}) as group:
        script = ("from mtht import bench; bench.FLAGS(['mtht-bench']); "
                  "print(bench.machine_info()['memory_limit_gb'], bench.config_from_flags().max_memory_gb)")
        out = run_in(group, [sys.executable, "-c", script])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2.1", "1.6"]  # 2 GiB; three quarters of it, to 0.1 GB


_CONFIG_OF_FLAGS = """
import dataclasses, json, sys
from mtht import bench
bench.FLAGS(["mtht-bench"] + sys.argv[1:])
print(json.dumps(dataclasses.asdict(bench.config_from_flags())))
"""


def test_the_table_flags_reach_the_config(tmp_path):
    flags = {"compressor": "one_bit", "embedding_dtype": "bfloat16", "checkpoint_format": "monolith",
             "capped_policy": "lfu", "max_load_factor": 0.8, "num_shards": 4, "optimizer": "adam", "dist": "zipf"}
    proc = subprocess.run([sys.executable, "-c", _CONFIG_OF_FLAGS, *(f"--{k}={v}" for k, v in flags.items())],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    config = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {k: config[k] for k in flags} == flags


def test_console_script_help_lists_the_flags(tmp_path):
    # Under the console script sys.argv[0] is the script, not mtht/bench.py: absl's --help
    # must still list the benchmark's flags.
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.argv[0] = 'mtht-bench'; "
                           "from mtht.bench import run; run()", "--help"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    for flag in ("--size", "--ops", "--threads", "--checkpoint_format", "--sweep"):
        assert flag in proc.stdout, proc.stdout
    assert proc.returncode == 0, proc.stderr  # help asked for is no failure


@pytest.mark.parametrize("flag", ["-h", "--helpshort", "--helpfull"])
def test_every_help_flag_lists_the_flags_and_succeeds(tmp_path, flag):
    proc = _cli(flag, cwd=tmp_path)
    assert proc.returncode == 0 and "--size" in proc.stdout, proc.stdout + proc.stderr


def test_capped_op_with_batches_larger_than_the_table_is_skipped():
    result = bench.run_benchmark(_config(ops=("apply_gradients_capped",), size=1000, batch_size=4096,
                                         threads=(1,), probe=False))
    (r,) = _results(result, "apply_gradients_capped", "mtht")
    assert r["status"] == "unavailable" and "--size=1,000" in r["note"]


def test_importing_mtht_without_its_compiled_core_says_why(tmp_path):
    # As inside a source checkout: the package's directory without its built core.
    (tmp_path / "mtht").mkdir()
    shutil.copy(os.path.join(os.path.dirname(mtht.__file__), "__init__.py"), tmp_path / "mtht" / "__init__.py")
    proc = subprocess.run([sys.executable, "-c", "import mtht"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "run Python from outside the source checkout" in proc.stderr, proc.stderr


@pytest.mark.parametrize("value, met, shown", [(49.6, False, "49.6%"), (49.99, False, "49.99%"), (50.0, True, "50%"),
                                               (1.6996, False, "1.6996x"), (1.7, True, "1.70x")])
def test_a_goal_is_never_shown_at_the_bound_it_misses(value, met, shown):
    goal = bench._goal("g", value, 50.0 if shown.endswith("%") else 1.7, unit="%" if shown.endswith("%") else "x")
    assert goal["met"] is met and bench._goal_value(goal) == shown


def test_max_load_factor_reaches_the_tables():
    # The same workload at two load bounds: the table's load stays under each, and the
    # checksums (what the ops returned) are equal.
    runs = {f: bench.run_benchmark(_config(ops=("lookup", "apply_gradients"), threads=(1,), probe=False,
                                           max_load_factor=f)) for f in (0.25, 0.9)}
    for f, result in runs.items():
        assert result["config"]["max_load_factor"] == f
        assert 0 < result["table"]["load_factor"] <= f
    assert runs[0.25]["table"]["load_factor"] < runs[0.9]["table"]["load_factor"]
    for op in ("lookup", "apply_gradients"):
        assert _results(runs[0.25], op, "mtht")[0]["checksum"] == _results(runs[0.9], op, "mtht")[0]["checksum"]


@pytest.mark.parametrize("optimizer, state", [("sgd", 0), ("adagrad", 16), ("adam", 34)])
def test_gb_per_s_counts_the_row_bytes_each_op_touches(optimizer, state):
    # docs/benchmarks.md: 4 * dim for a lookup, none for a missing id (it reads the index
    # alone), the row read and written for assign_add, values and state for a step.
    dim = 16
    result = bench.run_benchmark(_config(ops=("lookup", "lookup_missing", "assign_add", "apply_gradients"),
                                         dim=dim, optimizer=optimizer, threads=(1,), probe=False))
    expected = {"lookup": 4 * dim, "lookup_missing": 0, "assign_add": 2 * 4 * dim,
                "apply_gradients": 2 * 4 * (dim + state)}
    for op, nbytes in expected.items():
        r = _results(result, op, "mtht")[0]
        assert r["bytes_per_id"] == nbytes, op
        assert r["gb_per_s"] == pytest.approx(r["ids_per_s"] * nbytes / 1e9), op


def test_embedding_dtype_reaches_the_tables():
    # 16-bit values: smaller rows, half the bytes per lookup, lookups that differ from the
    # float32 table's by rounding alone, and no checksum compared with the float32 baselines.
    runs = {d: bench.run_benchmark(_config(ops=("lookup", "apply_gradients"), threads=(1,), probe=False,
                                           baseline=True, embedding_dtype=d)) for d in ("float32", "bfloat16")}
    assert runs["bfloat16"]["table"]["row_stride"] < runs["float32"]["table"]["row_stride"]
    wide, narrow = (_results(runs[d], "lookup", "mtht")[0] for d in ("float32", "bfloat16"))
    assert narrow["bytes_per_id"] * 2 == wide["bytes_per_id"]
    assert abs(narrow["checksum"] - wide["checksum"]) <= 0.01 * abs(wide["checksum"])
    steps = [_results(runs[d], "apply_gradients", "mtht")[0]["checksum"] for d in ("float32", "bfloat16")]
    assert steps[0] != steps[1]  # the steps' values are rounded to bfloat16
    assert all("checksum_matches_numpy_dict" not in r for r in runs["bfloat16"]["results"])
    report = bench.format_report(runs["bfloat16"])
    assert "MISMATCH" not in report and "not compared with the baselines" in report
    assert "embedding_dtype bfloat16" in report


def test_compressor_reaches_the_tables():
    # Lookups return what the compressor makes of the values: fixed_r8's steps of r / 128
    # (r = 1) once gradient steps have moved the values off that grid (the filled values
    # are on it), HashNet's 0.05 * tanh(value) (its first scale, 1). Gradients pass straight
    # through fixed_r8. The sums are not compared with the baselines', which return the values.
    ops = ("lookup", "apply_gradients")
    runs = {name: bench.run_benchmark(_config(ops=ops, threads=(1,), probe=False, baseline=True, compressor=name))
            for name in ("fixed_r8", "one_bit")}
    config = _config(ops=ops)
    fixed_r8 = functools.partial(ref.fake_quantize, r=1.0)
    for op in ops:
        assert _results(runs["fixed_r8"], op, "mtht")[0]["checksum"] == pytest.approx(
            expected_checksum(config, op, fixed_r8), rel=1e-9)
    hashnet = functools.partial(ref.hashnet_forward, scale=1.0, amplitude=0.05)
    assert _results(runs["one_bit"], "lookup", "mtht")[0]["checksum"] == pytest.approx(
        expected_checksum(config, "lookup", hashnet), rel=1e-9)
    for name, result in runs.items():
        assert result["config"]["compressor"] == name
        assert all("checksum_matches_numpy_dict" not in r for r in result["results"])
        report = bench.format_report(result)
        assert f"compressor {name}" in report and "MISMATCH" not in report
        assert f"not compared with the baselines ({name} lookups" in report
    with pytest.raises(ValueError, match="compressor must be one of"):
        bench.run_benchmark(_config(compressor="fp16"))


def test_one_bit_checksums_do_not_depend_on_the_ops_run_before():
    # HashNet's scale is one value for the whole table: were it moved by apply_gradients'
    # 200th step (the default step_size), the lookups after would read other values.
    config = dict(threads=(1,), probe=False, compressor="one_bit", iterations=210, warmup=0, batch_size=64)
    alone = bench.run_benchmark(_config(ops=("lookup",), **config))
    after_steps = bench.run_benchmark(_config(ops=("apply_gradients", "lookup"), **config))
    assert (_results(alone, "lookup", "mtht")[0]["checksum"]
            == _results(after_steps, "lookup", "mtht")[0]["checksum"])


def test_num_shards_reaches_the_tables():
    # The same multi-slot workload with tables of 1 and 64 shards and with the shard count
    # left to the tables: each table has the shards asked for, and the checksums are equal.
    runs = {n: bench.run_benchmark(_config(ops=("lookup", "multi_slot_apply_gradients"), threads=(1,), probe=False,
                                           slots=4, num_shards=n)) for n in (None, 1, 64)}
    for n, result in runs.items():
        assert result["config"]["num_shards"] == n
        # Left to it, the table filled by one write of its 20,000 ids splits into 8 shards
        # (at most 4,096 ids of a batch per shard).
        assert result["table"]["num_shards"] == (n or 8)
    for op in ("lookup", "multi_slot_apply_gradients"):
        sums = {_results(result, op, "mtht")[0]["checksum"] for result in runs.values()}
        assert len(sums) == 1
    with pytest.raises(ValueError, match="num_shards"):
        _config(num_shards=3).validate()


@pytest.mark.parametrize("op,calls", [
    ("fused", ["fused_lookup", "checksum", "lookup", "checksum"]),
    ("fused_apply_gradient", ["fused_apply_gradient", "fused_lookup", "checksum", "apply_gradients", "lookup",
                              "checksum"]),
    ("multi_slot_lookup", ["multi_lookup"] + ["checksum"] * 3 + ["lookup", "checksum"]),
    ("multi_slot_apply_gradients", ["multi_apply_gradients", "multi_lookup"] + ["checksum"] * 3
     + ["apply_gradients", "lookup", "checksum"]),
    # (A merged table's calls go through the multi-type table it wraps.)
    ("merged_slot_lookup", ["merged_lookup", "multi_lookup"] + ["checksum"] * 3 + ["lookup", "checksum"]),
    ("merged_slot_apply_gradients", ["merged_apply_gradients", "multi_apply_gradients", "merged_lookup",
                                     "multi_lookup"] + ["checksum"] * 3 + ["apply_gradients", "lookup", "checksum"]),
])
def test_ops_over_several_tables_and_their_one_table_counterpart_each_follow_a_checksum(monkeypatch, op, calls):
    # The two timed calls of a batch must start alike, each after a checksum (as every op's
    # batch does), not one of them straight after the other.
    from mtht.multi_type_hash_table import MergedMultiTypeHashTable, MultiTypeHashTable

    log = []

    def logged(name, call):
        def wrapper(*args, **kwargs):
            log.append(name)
            return call(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(bench, "_checksum", logged("checksum", bench._checksum))
    for name in ("fused_lookup", "fused_apply_gradient"):
        monkeypatch.setattr(bench._hash_table, name, logged(name, getattr(bench._hash_table, name)))
    for name in ("lookup", "apply_gradients"):
        monkeypatch.setattr(mtht.HashTable, name, logged(name, getattr(mtht.HashTable, name)))
        monkeypatch.setattr(MultiTypeHashTable, name, logged(f"multi_{name}", getattr(MultiTypeHashTable, name)))
        monkeypatch.setattr(MergedMultiTypeHashTable, name,
                            logged(f"merged_{name}", getattr(MergedMultiTypeHashTable, name)))
    config = _config(ops=(op,), threads=(1,), probe=False, slots=3)
    bench.run_benchmark(config)
    assert log == calls * (config.warmup + config.iterations)
