"""Stateful property test of the lifecycle features together: random sequences of writes,
re-initialisations, fused updates, expiry, saves and restores (in both checkpoint formats)
on a table with an admission filter, per-slot expiry and a capacity limit (LRU or LFU),
against a plain Python model of the documented rules.

Each feature has its own tests; this one looks for the interactions between them: a filter
that must not count the ids a refused write would have admitted, victims chosen while other
ids wait in the filter, the bookkeeping a restore resets, the blocks of a fused update
evicting one after another, writes of thousands of ids on two threads beside a capacity
limit. Values are small integers, so SGD with learning rate 1 and assign_add are exact and
every value is compared bit for bit.
"""

import collections
import copy
import os
import shutil
import sys
import tempfile

import numpy as np
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import mtht
from mtht import entry
from mtht.hash_table import fused_apply_gradient, hash_table_from_config
from mtht.multi_type_hash_table import MultiTypeHashTable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stateful import state_machine_settings  # noqa: E402

DAY = 86400
BASE_TS = 1_700_000_000
F32 = np.float32

EXPIRE_DAYS = {1: 1, 2: 0}   # slot -> days; other slots keep the default
DEFAULT_EXPIRE_DAYS = 3
THRESHOLDS = {1: 0}          # slot -> admission threshold; other slots the default


def slot_of(i):
    return (i >> 48) & 0x7FFF


def universe_of(per_slot):
    """Ids in slots 0, 1 and 2, and in slot 0x7FFF (negative ids), ``per_slot`` of each."""
    low = np.arange(per_slot, dtype=np.int64)
    return np.concatenate([low, (1 << 48) | low, (2 << 48) | low, -1 - low])


def config_of(**table_options):
    """One SGD value per entry, zeros, learning rate 1."""
    segment = entry.CombineAsSegment(1, entry.ZerosInitializer(), entry.SgdOptimizer(), entry.Fp32Compressor())
    return entry.HashTableConfigInstance(
        entry.EmbeddingHashTableConfig(entry_config=entry.EntryConfig(segments=[segment]), **table_options), [1.0])


class LifecycleModel:
    """The documented rules (docs/lifecycle.md), one write at a time.

    entries: id -> [value, timestamp, clock of the last write, writes]; counts: the filter's
    count of each absent id seen. A write that raises changes nothing."""

    def __init__(self, threshold, max_entries, policy):
        self.threshold, self.max_entries, self.policy = threshold, max_entries, policy
        self.entries = {}
        self.counts = collections.Counter()
        self.clock = 0
        self.max_update_ts = 0
        self.evictions = 0
        self.last_filtered = 0  # occurrences the last write left filtered

    def threshold_of(self, i):
        if self.threshold is None:
            return 0
        return THRESHOLDS.get(slot_of(i), self.threshold)

    def _victims(self, new, spared):
        """The entries a write of ``new`` new ids evicts: the first by the policy among
        those not in ``spared`` (lru: oldest tick, then lowest id; lfu: fewest writes, then
        oldest tick, then lowest id)."""
        excess = len(self.entries) + new - self.max_entries
        if excess <= 0:
            return []

        def key(i):
            _, _, clock, writes = self.entries[i]
            return (clock, i) if self.policy == "lru" else (writes, clock, i)
        return sorted((i for i in self.entries if i not in spared), key=key)[:excess]

    def write(self, kind, ids, values, ts, spared=()):
        """kind: assign, assign_add, apply or apply_dedup (SGD, learning rate 1). Raises
        ValueError where the table must refuse the write. Neither the ids written nor those
        in ``spared`` are evicted by it."""
        counts = collections.Counter(self.counts)
        applied = []                     # (id, value) of each occurrence or group applied
        admitted = set()
        filtered = 0
        if kind == "apply_dedup":
            sums, seen = {}, collections.Counter(ids)
            for i, v in zip(ids, values):
                sums[i] = sums.get(i, 0.0) + v
            for i in sums:               # groups in order of first occurrence
                if i in self.entries or counts[i] >= self.threshold_of(i):
                    applied.append((i, sums[i]))
                    if i not in self.entries:
                        admitted.add(i)
                        del counts[i]
                else:
                    counts[i] += seen[i]
                    filtered += seen[i]
        else:
            for i, v in zip(ids, values):
                if i in self.entries or i in admitted or counts[i] >= self.threshold_of(i):
                    applied.append((i, v))
                    if i not in self.entries and i not in admitted:
                        admitted.add(i)
                        del counts[i]
                else:
                    counts[i] += 1
                    filtered += 1
        batch = set(ids)
        victims = []
        if self.max_entries is not None:
            present = batch & self.entries.keys()
            if len(admitted) > self.max_entries or len(present) + len(admitted) > self.max_entries:
                raise ValueError("the write cannot fit")
            victims = self._victims(len(admitted), batch | set(spared))
        self.last_filtered = filtered
        self.counts = +counts
        for i in victims:
            del self.entries[i]
        self.evictions += len(victims)
        self.clock += 1
        self.max_update_ts = max(self.max_update_ts, ts)
        for i, v in applied:
            e = self.entries.setdefault(i, [0.0, ts, 0, 0])
            if kind == "assign":
                e[0] = v
            elif kind == "assign_add":
                e[0] += v
            else:
                e[0] -= v
            e[1], e[2] = ts, self.clock
            e[3] += 1

    def fused_write(self, blocks, accumulate, ts):
        """A fused update of one table: its blocks (lists of (id, gradient)) written one
        after another, each a batch of its own but all at one tick of the clock (one write
        call), and none evicting an id of another block. It is refused whole, and changes
        nothing, when its blocks together touch more distinct ids than the capacity, or bring
        more new ids (the filter simulated over the blocks in order)."""
        saved = copy.deepcopy(self.__dict__)
        try:
            if self.max_entries is not None:
                counts, new, present = collections.Counter(self.counts), set(), set()
                for block in blocks:
                    seen = collections.Counter(i for i, _ in block)
                    for i in (seen if accumulate else [i for i, _ in block]):
                        if i in self.entries:
                            present.add(i)
                        elif i in new:
                            continue
                        elif counts[i] >= self.threshold_of(i):
                            new.add(i)
                        else:
                            counts[i] += seen[i] if accumulate else 1
                if len(new) > self.max_entries or len(present) + len(new) > self.max_entries:
                    raise ValueError("the blocks cannot fit")
            tick = self.clock + 1
            written = {i for block in blocks for i, _ in block}
            for block in blocks:
                if block:
                    self.clock = tick - 1
                    self.write("apply_dedup" if accumulate else "apply", [i for i, _ in block],
                               [g for _, g in block], ts, spared=written)
            self.clock = tick
        except ValueError:
            self.__dict__.update(saved)
            raise

    def reinitialize(self, ids, ts):
        """Distinct ids back to their initial values, inserted where absent (never filtered:
        their counts go), as one write: it evicts to make room and counts one write an id;
        max_update_ts stays. Returns the status of each: 1 stored before, 0 inserted."""
        status = [int(i in self.entries) for i in ids]
        new = [i for i, present in zip(ids, status) if not present]
        victims = []
        if self.max_entries is not None:
            if len(ids) > self.max_entries:
                raise ValueError("the write cannot fit")
            victims = self._victims(len(new), set(ids))
        for i in victims:
            del self.entries[i]
        self.evictions += len(victims)
        self.clock += 1
        for i in ids:
            self.entries[i] = [0.0, ts, self.clock, 1]
            self.counts.pop(i, None)
        return status

    def expired(self, i, now):
        return now - self.entries[i][1] >= EXPIRE_DAYS.get(slot_of(i), DEFAULT_EXPIRE_DAYS) * DAY

    def evict(self, now):
        now = self.max_update_ts if now is None else now
        gone = [i for i in self.entries if self.expired(i, now)]
        for i in gone:
            del self.entries[i]
        return len(gone)

    def checkpoint(self):
        """What a save keeps: entries not expired at max_update_ts, the counts, max_update_ts."""
        kept = {i: list(e) for i, e in self.entries.items() if not self.expired(i, self.max_update_ts)}
        return kept, collections.Counter(self.counts), self.max_update_ts

    def restore(self, checkpoint, with_filter, format):
        kept, counts, max_update_ts = checkpoint
        # Loaded entries count as never written (clock 0, no writes); the eviction count
        # starts again; a table without a filter takes no counts. Monolith's files hold the
        # entries alone: no counts, and max_update_ts is the largest timestamp restored.
        self.entries = {i: [e[0], e[1], 0, 0] for i, e in kept.items()}
        self.counts = collections.Counter(counts) if with_filter and format == "mtht" else collections.Counter()
        if format == "monolith":
            max_update_ts = max([0] + [e[1] for e in kept.values()])
        self.max_update_ts = max_update_ts
        self.evictions = 0


class LifecycleMachine(RuleBasedStateMachine):

    @initialize(
        threshold=st.sampled_from([None, 0, 1, 2, 3]),
        capacity=st.sampled_from([None, "lru", "lfu"]),
        num_shards=st.sampled_from([None, 1, 4]),
        large=st.booleans(),
        room=st.integers(4, 10),
        # Values stay whole numbers below 2,048, which float16 holds exactly.
        embedding_dtype=st.sampled_from(["float32", "float16"]),
    )
    def setup(self, threshold, capacity, num_shards, large, room, embedding_dtype):
        self.large = large
        # Small: 24 ids and room for 4 to 10, so most writes evict. Large: 2,400 ids, room for
        # 1,500, batches of up to 5,000 ids that take the paths of two threads.
        self.universe = universe_of(600 if large else 6)
        self.max_entries = None
        if capacity is not None:
            self.max_entries = 1500 if large else room
        self.config = config_of(
            slot_expire_time_config=entry.SlotExpireTimeConfig(
                default_expire_time=DEFAULT_EXPIRE_DAYS, slot_expire_times=dict(EXPIRE_DAYS)),
            max_entries=self.max_entries, eviction_policy=capacity or "lru", num_shards=num_shards,
            embedding_dtype=embedding_dtype)
        self.threshold = threshold
        self.table = self.new_table()
        self.model = LifecycleModel(threshold, self.max_entries, capacity or "lru")
        self.now = BASE_TS
        self.dir = tempfile.mkdtemp(prefix="mtht-lifecycle-")
        self.refusing_config = config_of(max_entries=1)  # takes no write of two new ids
        self.refusing = hash_table_from_config(self.refusing_config, name_suffix="z")
        self.threads_before = mtht.get_num_threads()
        mtht.set_num_threads(2 if large else 1)

    def new_table(self):
        hash_filter = None
        if self.threshold is not None:
            hash_filter = mtht.HashFilter(default_occurrence_threshold=self.threshold,
                                          slot_occurrence_thresholds=dict(THRESHOLDS))
        return hash_table_from_config(self.config, hash_filter=hash_filter)

    def teardown(self):
        if hasattr(self, "dir"):
            shutil.rmtree(self.dir, ignore_errors=True)
        if hasattr(self, "threads_before"):
            mtht.set_num_threads(self.threads_before)

    def draw_batch(self, data):
        """The ids and values of a write."""
        if self.large:
            rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
            # Ids of a window of the universe, repeated: about 1,000 distinct ids fit a table
            # at its capacity; now and then 2,000, which do not.
            n = int(rng.choice([300, 4500, 5000]))
            width = 2000 if rng.random() < 0.1 else 1000
            start = int(rng.integers(0, self.universe.size - width + 1))
            return self.universe[start + rng.integers(0, width, n)], rng.integers(-3, 4, n).astype(F32)
        picks = data.draw(st.lists(st.integers(0, self.universe.size - 1), min_size=1, max_size=10), label="ids")
        values = data.draw(st.lists(st.integers(-3, 3), min_size=len(picks), max_size=len(picks)), label="values")
        return self.universe[picks], np.asarray(values, dtype=F32)

    # -- rules -------------------------------------------------------------------------
    @rule(kind=st.sampled_from(["assign", "assign_add", "apply", "apply_dedup"]),
          data=st.data(), hours=st.sampled_from([None, 0, 1, 13, 30, 80]))
    def write(self, kind, data, hours):
        ids, values = self.draw_batch(data)
        if hours is not None:
            self.now += hours * 3600
        req_time = None if hours is None else self.now
        ts = 0 if req_time is None else req_time
        evictions = self.model.evictions
        try:
            self.model.write(kind, ids.tolist(), values.tolist(), ts)
        except ValueError:
            event("write refused")
            self.assert_refused(lambda: self.call(kind, ids, values, req_time))
            return
        self.call(kind, ids, values, req_time)
        if self.model.evictions > evictions:
            event("write evicted")
        if self.model.last_filtered:
            event("write left ids filtered")

    @rule(data=st.data(), hours=st.sampled_from([0, 20]))
    def reinitialize(self, data, hours):
        ids, _ = self.draw_batch(data)
        ids = list(dict.fromkeys(ids.tolist()))[: 400 if self.large else 4]  # distinct, in batch order
        ts = self.now + hours * 3600
        try:
            want = self.model.reinitialize(ids, ts)
        except ValueError:
            self.assert_refused(lambda: self.table.reinitialize(ids, req_time=ts))
            return
        assert self.table.reinitialize(ids, req_time=ts).tolist() == want

    @rule(data=st.data(), num_of_shards=st.integers(1, 3), accumulate=st.booleans())
    def fused_update(self, data, num_of_shards, accumulate):
        ids, grads = self.draw_batch(data)
        cuts = sorted(data.draw(st.lists(st.integers(0, ids.size), min_size=num_of_shards - 1,
                                         max_size=num_of_shards - 1), label="cuts"))
        bounds = [0] + cuts + [ids.size]
        sizes = np.diff(bounds)
        blocks = [list(zip(ids[b:e].tolist(), grads[b:e].tolist())) for b, e in zip(bounds, bounds[1:])]
        offsets = np.asarray(bounds, dtype=np.int32)
        self.now += 3600

        def update():
            fused_apply_gradient([self.table], ids, ids, sizes.astype(np.int32), grads, offsets, offsets, [1.0],
                                 self.now, 0, num_of_shards, enable_grad_accumulation=accumulate)
        evictions = self.model.evictions
        try:
            self.model.fused_write(blocks, accumulate, self.now)
        except ValueError:
            event("fused update refused")
            self.assert_refused(update)
            return
        update()
        if self.model.evictions > evictions:
            event("fused update evicted")

    @rule(data=st.data(), via=st.sampled_from(["fused", "slots"]), accumulate=st.booleans())
    def write_one_table_in_two_parts(self, data, via, accumulate):
        # A fused update that lists the table twice, or a write of two slots the factory
        # gave the same table, writes it one part after the other, each a write of its own
        # (its own tick; the second may evict what the first wrote). Every part is checked
        # for room before any is written (docs/multi-type.md), so the call may refuse what
        # the parts written one by one would take; when it takes them, it must give what
        # they give.
        first, first_grads = self.draw_batch(data)
        second, second_grads = self.draw_batch(data)
        self.now += 3600
        model = copy.deepcopy(self.model)
        try:
            for ids, grads in ((first, first_grads), (second, second_grads)):
                if via == "fused":
                    model.fused_write([list(zip(ids.tolist(), grads.tolist()))], accumulate, self.now)
                else:
                    model.write("apply_dedup" if accumulate else "apply", ids.tolist(), grads.tolist(), self.now)
        except ValueError:
            model = None
        before = self.observed()
        try:
            if via == "fused":  # one shard: blocks (table 0, table 1)
                ids = np.concatenate([first, second])
                offsets = np.array([0, first.size, ids.size], dtype=np.int32)
                sizes = np.array([first.size, second.size], np.int32)
                grads = np.concatenate([first_grads, second_grads])
                fused_apply_gradient([self.table, self.table], ids, ids, sizes, grads, offsets, offsets, [1.0, 1.0],
                                     self.now, 0, 1, enable_grad_accumulation=accumulate)
            else:
                slots = MultiTypeHashTable({"a": self.config, "b": self.config}, lambda name, _: self.table)
                parts = {"a": (first, first_grads.reshape(-1, 1)), "b": (second, second_grads.reshape(-1, 1))}
                slots.apply_gradients(parts, 0, req_time=self.now, enable_dedup=accumulate)
        except ValueError:
            event("write in two parts refused")
            assert self.observed() == before, "a refused write changed the table"
            return
        assert model is not None, "the table took a write in two parts whose second part cannot fit"
        if model.evictions > self.model.evictions:
            event("write in two parts evicted")
        self.model = model

    @rule(kind=st.sampled_from(["assign_add", "apply_gradients"]), data=st.data())
    def write_refused_by_another_table(self, kind, data):
        # A write to several tables plans every table's part (a capacity-limited one chooses
        # its victims, a filtered one simulates its filter) before any table changes; a
        # table that cannot take its part then refuses the whole write.
        ids, values = self.draw_batch(data)
        two_tables = MultiTypeHashTable({"a": self.config, "z": self.refusing_config},
                                        lambda name, _: self.table if name == "a" else self.refusing)
        parts = {"a": (ids, values.reshape(-1, 1)), "z": (np.array([7, 8]), np.ones((2, 1), F32))}
        args = (0,) if kind == "apply_gradients" else ()  # global_step
        self.assert_refused(lambda: getattr(two_tables, kind)(parts, *args, req_time=self.now + 10 * DAY))

    def assert_refused(self, write):
        before = self.observed()
        try:
            write()
        except ValueError:
            pass
        else:
            raise AssertionError("a write the model refuses went through")
        assert self.observed() == before, "a refused write changed the table"

    def call(self, kind, ids, values, req_time):
        rows = values.reshape(-1, 1)
        if kind == "assign":
            self.table.assign(ids, rows, req_time=req_time)
        elif kind == "assign_add":
            self.table.assign_add(ids, rows, req_time=req_time)
        else:
            self.table.apply_gradients(ids, rows, global_step=0, enable_dedup=kind == "apply_dedup",
                                       req_time=req_time)

    @rule(days=st.sampled_from([None, 0, 1, 2, 4]))
    def evict(self, days):
        now = None if days is None else self.model.max_update_ts + days * DAY
        assert self.table.evict(now) == self.model.evict(now)

    @rule(into_new_table=st.booleans(), format=st.sampled_from(["mtht", "monolith"]))
    def save_and_restore(self, into_new_table, format):
        basename = os.path.join(self.dir, format, "table")
        self.table.save(basename, format=format)
        checkpoint = self.model.checkpoint()
        if into_new_table:
            self.table = self.new_table()
        self.table.restore(basename, format=format)
        self.model.restore(checkpoint, with_filter=self.threshold is not None, format=format)

    # -- what must agree after every step ------------------------------------------------
    def observed(self):
        ids = self.universe
        return (self.table.contains(ids).tobytes(), self.table.lookup(ids).tobytes(), self.table.size(),
                self.table.max_update_ts)

    @invariant()
    def table_matches_the_model(self):
        if not hasattr(self, "table"):
            return
        model = self.model
        ids = self.universe
        present = self.table.contains(ids)
        want_present = np.array([i in model.entries for i in ids.tolist()])
        assert np.array_equal(present, want_present), (
            f"present {sorted(ids[present & ~want_present].tolist())} should be absent, "
            f"absent {sorted(ids[want_present & ~present].tolist())} should be present")
        want = np.array([[model.entries[i][0] if i in model.entries else 0.0] for i in ids.tolist()], F32)
        assert np.abs(want).max(initial=0) < 2048, "a value float16 would round: the sums grew too large"
        np.testing.assert_array_equal(self.table.lookup(ids), want)
        assert self.table.size() == len(model.entries)
        assert self.table.max_update_ts == model.max_update_ts
        if self.max_entries is not None:
            assert self.table.stats()["evictions"] == model.evictions
        stored = ids[present]
        dumps = self.table.lookup_entry(stored)
        assert [d.last_update_ts for d in dumps] == [model.entries[i][1] for i in stored.tolist()]


LifecycleMachine.TestCase.settings = state_machine_settings(25)
test_lifecycle_matches_the_model = LifecycleMachine.TestCase
