"""Monolith's single-table checkpoint files: ``save(..., format="monolith")`` and
``restore(..., format="monolith")``.

The wire format is checked independently of the library's own encoder and decoder:

* Files are built here byte by byte (TFRecord framing with masked CRC32C from
  google-crc32c, EntryDump records hand-encoded in protobuf wire format, field numbers
  taken from Monolith's protos) and restored into tables.
* Files the library writes are read back by a small protobuf wire-format decoder written
  here, which also checks both checksums of every record.

Then: a save/restore round trip for every optimizer (state compared bit for bit),
multi-segment entries, expiry at save time, several files per save, and every way a
checkpoint can be broken (each leaves the table exactly as it was). Last, the records
against the protobuf library: a save writes the bytes it encodes, and records it encodes,
merges, or that are damaged at random restore as it reads them (or raise when it refuses
them or the table's layout does). And a model's tables saved and restored at once, in a
checkpoint's ``.assets`` directory.
"""

from __future__ import annotations

import os
import pathlib
import struct
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

google_crc32c = pytest.importorskip("google_crc32c")
pytest.importorskip("google.protobuf")

import mtht  # noqa: E402
from mtht import monolith_checkpoint  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from observed import entry_rows  # noqa: E402

F32 = np.float32
DAY = 86400

# ---------------------------------------------------------------------------------------
# Monolith's messages (reference §2.1): SingleOptimizerDump oneof number per optimizer kind,
# and each dump's fields as (field number, state name, wire form). "floats" is a repeated
# float, "float" a single float, "int64" a varint.
# ---------------------------------------------------------------------------------------

DUMPS = {
    "adagrad": (1, [(1, "norm", "floats")]),
    "sgd": (2, []),
    "ftrl": (3, [(1, "zero", "floats"), (2, "norm", "floats")]),
    "dynamic_wd_adagrad": (4, [(1, "norm", "floats"), (2, "last_update_step", "int64")]),
    "adadelta": (6, [(1, "accum", "floats"), (2, "accum_update", "floats")]),
    "adam": (7, [(1, "m", "floats"), (2, "v", "floats"), (3, "beta1_power", "float"),
                 (4, "beta2_power", "float")]),
    "amsgrad": (8, [(1, "m", "floats"), (2, "v", "floats"), (3, "vhat", "floats"),
                    (4, "beta1_power", "float"), (5, "beta2_power", "float")]),
    "momentum": (9, [(1, "n", "floats")]),
    "rmsprop": (11, [(1, "n", "floats")]),
    "rmspropv2": (12, [(1, "n", "floats")]),
    "group_ftrl": (13, [(1, "zero", "floats"), (2, "norm", "floats")]),
    "batch_softmax": (14, [(1, "global_step", "int64")]),
    "group_adagrad": (15, [(1, "grad_square_sum", "float")]),
}
KIND_OF_NUMBER = {number: kind for kind, (number, _) in DUMPS.items()}

# ---------------------------------------------------------------------------------------
# TFRecord framing and protobuf wire format, by hand
# ---------------------------------------------------------------------------------------


def masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32


def frame(record: bytes) -> bytes:
    """One TFRecord: little-endian u64 length, masked CRC of those 8 bytes, data, masked CRC
    of the data."""
    length = struct.pack("<Q", len(record))
    return (length + struct.pack("<I", masked_crc32c(length)) + record
            + struct.pack("<I", masked_crc32c(record)))


def write_file(path, records) -> None:
    with open(path, "wb") as f:
        f.write(b"".join(frame(r) for r in records))


def varint(n: int) -> bytes:
    n %= 2**64  # negative int64 values are sent as their 64-bit two's complement
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return key(number, 2) + varint(len(payload)) + payload


def floats_field(number: int, values, packed: bool) -> bytes:
    values = [float(v) for v in values]
    if packed:
        return length_delimited(number, struct.pack(f"<{len(values)}f", *values))
    return b"".join(key(number, 5) + struct.pack("<f", v) for v in values)


def dump(kind: str, packed: bool = False, **state) -> bytes:
    """A SingleOptimizerDump holding ``kind``'s dump with the given state."""
    number, fields = DUMPS[kind]
    body = b""
    for field_number, name, form in fields:
        if name not in state:
            continue
        if form == "floats":
            body += floats_field(field_number, state[name], packed)
        elif form == "float":
            body += key(field_number, 5) + struct.pack("<f", state[name])
        else:
            body += key(field_number, 0) + varint(int(state[name]))
    return length_delimited(number, body)


def entry_dump(id_, num, dumps, ts=None, packed=False, extra=b"") -> bytes:
    """An EntryDump: sfixed64 id (tag 0x09), floats num (tag 0x15 each, or 0x12 with a
    packed block), OptimizerDump opt (tag 0x1a) and varint last_update_ts_sec (tag 0x20)."""
    out = b"\x09" + struct.pack("<q", id_)
    if packed:
        out += b"\x12" + varint(4 * len(num)) + struct.pack(f"<{len(num)}f", *num)
    else:
        out += b"".join(b"\x15" + struct.pack("<f", v) for v in num)
    opt = b"".join(length_delimited(1, d) for d in dumps)
    out += b"\x1a" + varint(len(opt)) + opt
    if ts is not None:
        out += b"\x20" + varint(ts)
    return out + extra


def read_varint(buf: bytes, pos: int):
    result = shift = 0
    while True:
        assert pos < len(buf), "varint runs past the end of the message"
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def message_fields(buf: bytes):
    """(field number, wire type, value) of every field of a message, in order; a value is
    an int for varints and the raw bytes otherwise."""
    out = []
    pos = 0
    while pos < len(buf):
        k, pos = read_varint(buf, pos)
        number, wire = k >> 3, k & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = read_varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        assert pos <= len(buf), "field runs past the end of the message"
        out.append((number, wire, value))
    return out


def as_int64(n: int) -> int:
    return n - 2**64 if n >= 2**63 else n


def read_frames(path) -> list:
    """The records of a TFRecord file, checking the framing and both checksums."""
    records = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 12, "truncated header"
        length_bytes = data[pos:pos + 8]
        (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        assert length_crc == masked_crc32c(length_bytes), "length checksum"
        (length,) = struct.unpack("<Q", length_bytes)
        record = data[pos + 12:pos + 12 + length]
        assert len(record) == length, "truncated record"
        (data_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        assert data_crc == masked_crc32c(record), "data checksum"
        records.append(record)
        pos += 16 + length
    return records


def decode_entry(record: bytes) -> dict:
    """An EntryDump decoded by hand: id, num, ts and dumps as [(kind, {state name: value})].
    Also asserts the form Monolith's proto2 encoder produces: fields in number order, num
    as unpacked floats."""
    fields = message_fields(record)
    numbers = [n for n, _, _ in fields]
    assert numbers == sorted(numbers), numbers
    out = {"id": None, "num": [], "ts": 0, "dumps": []}
    for number, wire, value in fields:
        if number == 1:
            assert wire == 1
            (out["id"],) = struct.unpack("<q", value)
        elif number == 2:
            assert wire == 5, "num is written unpacked, as Monolith's proto2 message is"
            out["num"].append(struct.unpack("<f", value)[0])
        elif number == 3:
            assert wire == 2
            for dump_number, dump_wire, single in message_fields(value):
                assert (dump_number, dump_wire) == (1, 2)
                out["dumps"].append(decode_single_dump(single))
        elif number == 4:
            assert wire == 0
            out["ts"] = as_int64(value)
        else:
            raise AssertionError(f"unexpected EntryDump field {number}")
    out["num"] = np.array(out["num"], dtype=F32)
    return out


def decode_single_dump(buf: bytes):
    """(optimizer kind, {state name: array}) of a SingleOptimizerDump."""
    (number, wire, body), = message_fields(buf)  # a oneof: exactly one member is set
    assert wire == 2
    kind = KIND_OF_NUMBER[number]
    forms = {n: (name, form) for n, name, form in DUMPS[kind][1]}
    values = {}
    for field_number, field_wire, value in message_fields(body):
        name, form = forms[field_number]
        if form == "int64":
            assert field_wire == 0
            values[name] = [as_int64(value)]
        else:
            assert field_wire == 5, "floats are written unpacked"
            (x,) = struct.unpack("<f", value)
            values[name] = values.get(name, []) + [x] if form == "floats" else [x]
    dtypes = {name: np.int64 if form == "int64" else F32 for name, form in forms.values()}
    return kind, {name: np.array(v, dtype=dtypes[name]) for name, v in values.items()}


def shard_names(basename, n):
    return ["%s-%05d-of-%05d" % (basename, i, n) for i in range(n)]


def read_checkpoint(basename, n) -> dict:
    """id -> decoded EntryDump of every record of the ``n`` files of a save."""
    entries = {}
    for path in shard_names(basename, n):
        for record in read_frames(path):
            e = decode_entry(record)
            assert e["id"] not in entries, "an id appears twice in one save"
            entries[e["id"]] = e
    return entries


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------

def make_table(segments, learning_rates=None, saver_parallel=-1, **table_kwargs):
    """``segments``: [(dim, optimizer)] with zeros initializers."""
    segs = [mtht.CombineAsSegment(dim, mtht.ZerosInitializer(), opt, mtht.Fp32Compressor())
            for dim, opt in segments]
    table_config = mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=segs), **table_kwargs)
    lrs = list(learning_rates) if learning_rates is not None else [0.1] * len(segs)
    return mtht.hash_table_from_config(mtht.HashTableConfigInstance(table_config, lrs),
                                       saver_parallel=saver_parallel)


def sgd_table(dim=1, **kwargs):
    return make_table([(dim, mtht.SgdOptimizer())], [1.0], **kwargs)


def adagrad_table(dim=2, **kwargs):
    return make_table([(dim, mtht.AdagradOptimizer(initial_accumulator_value=0.1))], **kwargs)


def snapshot(table, ids):
    """Everything observable about ``ids`` in ``table``, bit for bit."""
    return len(table), table.max_update_ts, entry_rows(table, ids)


def assert_dump_matches_entry(decoded, entry, kinds):
    """A decoded record says what lookup_entry says: values, timestamp and the state of
    every segment that has a dump (``kinds``: the optimizer kind of each segment)."""
    assert decoded["num"].tobytes() == entry.values.tobytes()
    assert decoded["ts"] == entry.last_update_ts
    expected = [(kind, seg) for kind, seg in zip(kinds, entry.optimizer_state) if kind != "moving_average"]
    assert [k for k, _ in decoded["dumps"]] == [k for k, _ in expected]
    for (kind, state), (_, seg) in zip(decoded["dumps"], expected):
        names = [name for _, name, _ in DUMPS[kind][1]]
        assert sorted(state) == sorted(names) == sorted(seg)
        for name in names:
            assert state[name].dtype == seg[name].dtype, (kind, name)
            assert state[name].tobytes() == seg[name].tobytes(), (kind, name)


# ---------------------------------------------------------------------------------------
# 1. Hand-built files restore
# ---------------------------------------------------------------------------------------

def test_masked_crc_helper_matches_the_crc32c_check_value():
    # The standard CRC-32C check value, so the framing built below rests on the right CRC.
    assert google_crc32c.value(b"123456789") == 0xE3069283
    crc = 0xE3069283
    rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
    assert masked_crc32c(b"123456789") == (rotated + 0xA282EAD8) & 0xFFFFFFFF


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_restore_hand_built_sgd_file(tmp_path, packed):
    base = tmp_path / "sgd"
    big_ts = 2**33 + 17  # beyond 32 bits: timestamps are int64 here
    records = [
        entry_dump(7, [1.5, -2.0, 0.25], [dump("sgd")], ts=50, packed=packed),
        entry_dump(-3, [0.0, 1e-30, -7.0], [dump("sgd")], packed=packed),  # no timestamp: 0
        entry_dump((1 << 48) | 5, [3.0, 4.0, 5.0], [dump("sgd")], ts=big_ts, packed=packed),
        entry_dump(-(2**63), [9.0, 8.0, 7.0], [dump("sgd")], ts=1, packed=packed),
    ]
    write_file(shard_names(base, 1)[0], records)

    table = sgd_table(3)
    table.assign([100], [[1.0, 1.0, 1.0]], req_time=2**40)  # replaced by the restore
    assert table.restore(base, format="monolith") is table

    assert len(table) == 4
    assert not table.contains([100])[0]
    assert table.max_update_ts == big_ts
    ids = [7, -3, (1 << 48) | 5, -(2**63)]
    np.testing.assert_array_equal(table.lookup(ids), np.array(
        [[1.5, -2.0, 0.25], [0.0, 1e-30, -7.0], [3.0, 4.0, 5.0], [9.0, 8.0, 7.0]], dtype=F32))
    entries = table.lookup_entry(ids)
    assert [e.last_update_ts for e in entries] == [50, 0, big_ts, 1]
    assert all(e.optimizer_state == [{}] for e in entries)

    # The restored entries train like any other.
    table.apply_gradients([7], [[1.0, 1.0, 1.0]], global_step=1, req_time=60)
    np.testing.assert_array_equal(table.lookup([7]), np.array([[0.5, -3.0, -0.75]], dtype=F32))


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_restore_hand_built_adagrad_files(tmp_path, packed):
    base = tmp_path / "adagrad"
    first, second = shard_names(base, 2)
    write_file(first, [
        entry_dump(1, [0.5, -0.5], [dump("adagrad", packed=packed, norm=[1.25, 2.5])], ts=100, packed=packed),
        entry_dump(-1, [2.0, 3.0], [dump("adagrad", packed=packed, norm=[4.0, 0.125])], ts=300, packed=packed),
    ])
    write_file(second, [
        entry_dump(2**62, [-1.0, 0.0], [dump("adagrad", packed=packed, norm=[0.1, 0.2])], ts=200, packed=packed),
    ])

    table = adagrad_table(2)
    table.restore(str(base), format="monolith")
    assert len(table) == 3
    assert table.max_update_ts == 300
    want = {1: ([0.5, -0.5], [1.25, 2.5], 100), -1: ([2.0, 3.0], [4.0, 0.125], 300),
            2**62: ([-1.0, 0.0], [0.1, 0.2], 200)}
    for e in table.lookup_entry(list(want)):
        values, norm, ts = want[e.id]
        np.testing.assert_array_equal(e.values, np.array(values, dtype=F32))
        np.testing.assert_array_equal(e.optimizer_state[0]["norm"], np.array(norm, dtype=F32))
        assert e.last_update_ts == ts

    # The restored accumulator is the one the next step uses: norm += g*g; w -= lr*g/sqrt(norm).
    g = np.array([[1.0, 2.0]], dtype=F32)
    table.apply_gradients([1], g, global_step=1, req_time=400)
    norm = np.array([1.25, 2.5], dtype=F32) + g[0] * g[0]
    w = np.array([0.5, -0.5], dtype=F32) - (F32(0.1) / np.sqrt(norm)) * g[0]
    np.testing.assert_array_equal(table.lookup([1])[0], w)
    assert table.max_update_ts == 400


def test_restore_hand_built_adam_keeps_both_power_counters(tmp_path):
    # Monolith's own restore puts the saved beta2_power into beta1_power; here each counter
    # comes back into its own field.
    base = tmp_path / "adam"
    write_file(shard_names(base, 1)[0], [
        entry_dump(5, [0.25, -0.5], [dump("adam", m=[0.1, 0.2], v=[0.3, 0.4],
                                          beta1_power=0.729, beta2_power=0.970299)], ts=9),
    ])
    table = make_table([(2, mtht.AdamOptimizer())])
    table.restore(base, format="monolith")
    (e,) = table.lookup_entry([5])
    state = e.optimizer_state[0]
    np.testing.assert_array_equal(state["m"], np.array([0.1, 0.2], dtype=F32))
    np.testing.assert_array_equal(state["v"], np.array([0.3, 0.4], dtype=F32))
    assert state["beta1_power"].tolist() == [F32(0.729)]
    assert state["beta2_power"].tolist() == [F32(0.970299)]
    assert e.last_update_ts == 9


def test_restore_hand_built_int64_state(tmp_path):
    # batch_softmax's global_step and dynamic_wd_adagrad's last_update_step are int64 varints.
    base = tmp_path / "steps"
    step = 2**40 + 3
    write_file(shard_names(base, 1)[0], [
        entry_dump(11, [0.5], [dump("batch_softmax", global_step=step)], ts=1),
        entry_dump(12, [1.5], [dump("batch_softmax", global_step=0)], ts=2),
    ])
    table = make_table([(1, mtht.BatchSoftmaxOptimizer())])
    table.restore(base, format="monolith")
    a, b = table.lookup_entry([11, 12])
    assert a.optimizer_state[0]["global_step"].dtype == np.int64
    assert a.optimizer_state[0]["global_step"].tolist() == [step]
    assert b.optimizer_state[0]["global_step"].tolist() == [0]

    base = tmp_path / "dynamic_wd"
    write_file(shard_names(base, 1)[0], [
        entry_dump(3, [1.0, 2.0], [dump("dynamic_wd_adagrad", norm=[0.5, 0.75], last_update_step=step)], ts=4),
    ])
    table = make_table([(2, mtht.DynamicWdAdagradOptimizer())])
    table.restore(base, format="monolith")
    (e,) = table.lookup_entry([3])
    np.testing.assert_array_equal(e.optimizer_state[0]["norm"], np.array([0.5, 0.75], dtype=F32))
    assert e.optimizer_state[0]["last_update_step"].tolist() == [step]


@pytest.mark.parametrize("kind, field, optimizer, dim", [
    ("batch_softmax", "global_step", mtht.BatchSoftmaxOptimizer(), 1),
    ("dynamic_wd_adagrad", "last_update_step", mtht.DynamicWdAdagradOptimizer(), 2)])
@pytest.mark.parametrize("step", [-5, -2**63])
def test_a_step_counter_below_0_is_refused_and_leaves_the_table(tmp_path, kind, field, optimizer, dim, step):
    # Training takes no step below 0; a counter below it would be subtracted from the next
    # step (past the int64 range for -2**63). Its 10-byte varint is read as the number given.
    base = tmp_path / kind
    norm = {"norm": [0.5] * dim} if kind == "dynamic_wd_adagrad" else {}
    write_file(shard_names(base, 1)[0], [entry_dump(4, [1.0] * dim, [dump(kind, **norm)], ts=1),
                                         entry_dump(5, [1.0] * dim, [dump(kind, **norm, **{field: step})], ts=1)])
    table = make_table([(dim, optimizer)])
    table.assign([4], np.full((1, dim), 3.0, F32), req_time=9)
    before = snapshot(table, [4, 5])
    with pytest.raises(ValueError, match=f"entry 5: {kind}.{field} is {step}, a step counter below 0"):
        table.restore(base, format="monolith")
    assert snapshot(table, [4, 5]) == before


def test_restore_hand_built_multi_segment_with_moving_average(tmp_path):
    # A moving-average segment contributes no dump: [adagrad, moving_average, sgd] has two.
    base = tmp_path / "multi"
    write_file(shard_names(base, 1)[0], [
        entry_dump(1, [1.0, 2.0, 3.0, 4.0, 5.0], [dump("adagrad", norm=[0.5, 0.25]), dump("sgd")], ts=8),
    ])
    table = make_table([(2, mtht.AdagradOptimizer()), (1, mtht.MovingAverageOptimizer()),
                        (2, mtht.SgdOptimizer())], [0.1, 0.1, 0.1])
    table.restore(base, format="monolith")
    (e,) = table.lookup_entry([1])
    np.testing.assert_array_equal(e.values, np.arange(1, 6, dtype=F32))
    np.testing.assert_array_equal(e.optimizer_state[0]["norm"], np.array([0.5, 0.25], dtype=F32))
    assert e.optimizer_state[1:] == [{}, {}]
    assert e.last_update_ts == 8


def test_restore_accepts_fields_in_any_order_and_unknown_fields(tmp_path):
    # What any protobuf parser accepts: fields out of number order, and fields it does not know.
    base = tmp_path / "order"
    num = b"".join(b"\x15" + struct.pack("<f", v) for v in (1.0, 2.0))
    opt = length_delimited(1, dump("adagrad", norm=[3.0, 4.0]))
    record = (b"\x20" + varint(77) + b"\x1a" + varint(len(opt)) + opt + num
              + b"\x09" + struct.pack("<q", -9) + key(15, 0) + varint(123))
    write_file(shard_names(base, 1)[0], [record])
    table = adagrad_table(2)
    table.restore(base, format="monolith")
    (e,) = table.lookup_entry([-9])
    np.testing.assert_array_equal(e.values, np.array([1.0, 2.0], dtype=F32))
    np.testing.assert_array_equal(e.optimizer_state[0]["norm"], np.array([3.0, 4.0], dtype=F32))
    assert e.last_update_ts == 77


@pytest.mark.parametrize("threads", [1, 2])
def test_an_id_in_two_records_restores_the_later_one(tmp_path, restore_num_threads, threads):
    # A save never writes an id twice; files that do (joined by hand) restore as if read one
    # after the other, whatever the thread count: the later record wins, the later file's.
    mtht.set_num_threads(threads)
    base = tmp_path / "twice"
    first, second, third = shard_names(base, 3)
    write_file(first, [entry_dump(i, [float(i), 1.0], [dump("adagrad", norm=[1.0, 1.0])], ts=i) for i in range(50)]
               + [entry_dump(7, [-7.0, 1.0], [dump("adagrad", norm=[2.0, 2.0])], ts=100)])
    write_file(second, [entry_dump(i, [float(i), 2.0], [dump("adagrad", norm=[3.0, 3.0])], ts=i) for i in range(40, 90)])
    write_file(third, [entry_dump(45, [45.0, 3.0], [dump("adagrad", norm=[4.0, 4.0])], ts=5)])
    table = adagrad_table(2)
    table.restore(base, format="monolith")
    assert len(table) == 90
    assert table.max_update_ts == 100
    assert table.lookup([7, 45, 60, 3]).tolist() == [[-7.0, 1.0], [45.0, 3.0], [60.0, 2.0], [3.0, 1.0]]
    assert [e.last_update_ts for e in table.lookup_entry([7, 45, 40])] == [100, 5, 40]
    assert table.lookup_entry([45])[0].optimizer_state[0]["norm"].tolist() == [4.0, 4.0]


@pytest.mark.parametrize("threads", [1, 2])
def test_an_id_twice_in_one_large_file_restores_the_later_one(tmp_path, restore_num_threads, threads):
    # A file's records load in file order, whatever the thread count (its chunks inserted
    # over the threads): an id given twice keeps its later record.
    mtht.set_num_threads(threads)
    records = [entry_dump(i, [float(i), 1.0], [dump("adagrad", norm=[1.0, 1.0])], ts=i) for i in range(10_000)]
    records[9_000] = entry_dump(5, [-5.0, 2.0], [dump("adagrad", norm=[2.0, 2.0])], ts=3)
    base = tmp_path / "twice"
    write_file(shard_names(base, 1)[0], records)
    table = adagrad_table(2)
    table.restore(base, format="monolith")
    assert len(table) == 9_999
    assert table.lookup([5, 9_001]).tolist() == [[-5.0, 2.0], [9_001.0, 1.0]]
    assert table.lookup_entry([5])[0].last_update_ts == 3


def test_restore_empty_files(tmp_path):
    base = tmp_path / "empty"
    for path in shard_names(base, 2):
        write_file(path, [])
    table = sgd_table(1)
    table.assign([1], [[1.0]], req_time=50)
    table.restore(base, format="monolith")
    assert len(table) == 0
    assert table.max_update_ts == 0


# ---------------------------------------------------------------------------------------
# 2. Files written by save() decode by hand
# ---------------------------------------------------------------------------------------

def test_saved_sgd_file_decodes_by_hand(tmp_path):
    table = sgd_table(2)
    ids = [-1, 1, 1 << 48, -(2**63), 2**63 - 1]
    values = np.array([[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]], dtype=F32) / 3
    for k, (i, row) in enumerate(zip(ids, values)):
        table.assign([i], [row], req_time=1000 + k)
    base = tmp_path / "out" / "sgd"
    table.save(base, format="monolith")

    assert sorted(os.listdir(tmp_path / "out")) == [".mtht-lock", "sgd-00000-of-00001"]
    decoded = read_checkpoint(base, 1)
    assert sorted(decoded) == sorted(ids)
    for k, i in enumerate(ids):
        e = decoded[i]
        assert e["num"].tobytes() == values[k].tobytes()
        assert e["ts"] == 1000 + k
        assert [kind for kind, _ in e["dumps"]] == ["sgd"]
        assert e["dumps"][0][1] == {}


def test_saved_record_bytes_are_monolith_layout(tmp_path):
    # One entry, byte for byte: 0x09 id, 0x15 + float per value, 0x1a OptimizerDump
    # {0x0a SingleOptimizerDump {0x0a AdagradDump {0x0d + float per norm}}}, 0x20 varint ts.
    table = adagrad_table(2)
    table.apply_gradients([-2], [[1.0, 2.0]], global_step=1, req_time=300)
    (e,) = table.lookup_entry([-2])
    base = tmp_path / "one"
    table.save(base, format="monolith")
    (record,) = read_frames(shard_names(base, 1)[0])
    w, norm = e.values, e.optimizer_state[0]["norm"]
    adagrad = b"".join(b"\x0d" + struct.pack("<f", x) for x in norm)
    single = b"\x0a" + bytes([len(adagrad)]) + adagrad
    opt = b"\x0a" + bytes([len(single)]) + single
    expected = (b"\x09" + struct.pack("<q", -2) + b"".join(b"\x15" + struct.pack("<f", x) for x in w)
                + b"\x1a" + bytes([len(opt)]) + opt + b"\x20" + varint(300))
    assert record == expected


def test_saved_file_of_hand_built_file_round_trips_to_the_same_records(tmp_path):
    # Restore a hand-built file, save it again: the records carry the same content.
    base = tmp_path / "in"
    records = [entry_dump(i, [i / 2, -i / 4], [dump("adagrad", norm=[i + 0.5, i + 0.25])], ts=10 * i)
               for i in range(1, 6)]
    write_file(shard_names(base, 1)[0], records)
    table = adagrad_table(2)
    table.restore(base, format="monolith")
    table.save(tmp_path / "out", format="monolith")
    again = {decode_entry(r)["id"]: decode_entry(r) for r in read_frames(shard_names(tmp_path / "out", 1)[0])}
    for r in records:
        want = decode_entry(r)
        got = again[want["id"]]
        assert got["num"].tobytes() == want["num"].tobytes()
        assert got["ts"] == want["ts"]
        assert [k for k, _ in got["dumps"]] == ["adagrad"]
        assert got["dumps"][0][1]["norm"].tobytes() == want["dumps"][0][1]["norm"].tobytes()


# ---------------------------------------------------------------------------------------
# 3. Round trips
# ---------------------------------------------------------------------------------------

def every_optimizer():
    return [
        ("sgd", mtht.SgdOptimizer()),
        ("adagrad", mtht.AdagradOptimizer(initial_accumulator_value=0.1, weight_decay_factor=0.01)),
        ("dynamic_wd_adagrad", mtht.DynamicWdAdagradOptimizer()),
        ("adadelta", mtht.AdadeltaOptimizer()),
        ("adam", mtht.AdamOptimizer()),
        ("amsgrad", mtht.AmsgradOptimizer()),
        ("ftrl", mtht.FtrlOptimizer()),
        ("group_ftrl", mtht.FTRLWithGroupSparsityOptimizer()),
        ("group_adagrad", mtht.AdaGradWithGroupLassoOptimizer()),
        ("momentum", mtht.MomentumOptimizer()),
        ("moving_average", mtht.MovingAverageOptimizer()),
        ("rmsprop", mtht.RmspropOptimizer()),
        ("rmspropv2", mtht.RmspropV2Optimizer()),
        ("batch_softmax", mtht.BatchSoftmaxOptimizer()),
        ("adam_fp16_rounding", mtht.StochasticRoundingFloat16OptimizerWrapper(mtht.AdamOptimizer())),
    ]


ROUND_TRIP_IDS = [-(2**63), -5, 0, 3, (1 << 48) | 7, (7 << 48) | 1, 2**63 - 1]


def train(table, steps, seed, start_ts):
    rng = np.random.default_rng(seed)
    dim = table.dim_size
    for step in range(steps):
        ids = rng.choice(ROUND_TRIP_IDS, size=5)
        grads = rng.standard_normal((5, dim)).astype(F32)
        table.apply_gradients(ids, grads, global_step=step + 1 if step % 2 else 2**40 + step,
                              req_time=start_ts + 10 * step)


@pytest.mark.parametrize("name,optimizer", every_optimizer(), ids=[n for n, _ in every_optimizer()])
def test_round_trip_every_optimizer(tmp_path, name, optimizer):
    dim = 1 if name == "batch_softmax" else 3
    kind = optimizer.kind
    table = make_table([(dim, optimizer)], [0.05])
    train(table, steps=6, seed=len(name), start_ts=1_700_000_000)
    table.assign([42], [np.arange(dim, dtype=F32)], req_time=1_700_000_005)
    ids = ROUND_TRIP_IDS + [42]
    before = snapshot(table, ids)

    base = tmp_path / "ckpt" / name
    table.save(base, format="monolith")
    assert snapshot(table, ids) == before  # saving changes nothing
    assert sorted(os.listdir(base.parent)) == [".mtht-lock", f"{name}-00000-of-00001"]  # no temporary file left

    decoded = read_checkpoint(base, 1)
    present = [e for e in table.lookup_entry(ids) if e is not None]
    assert sorted(decoded) == sorted(e.id for e in present)
    for e in present:
        assert_dump_matches_entry(decoded[e.id], e, [kind])

    restored = make_table([(dim, optimizer)], [0.05])
    restored.assign([999], np.ones((1, dim), dtype=F32), req_time=5)
    restored.restore(base, format="monolith")
    assert snapshot(restored, ids + [999]) == before[:2] + (before[2] + [None],)

    # Training on from the restored table is training on from the original, bit for bit.
    train(table, steps=3, seed=99, start_ts=1_700_000_100)
    train(restored, steps=3, seed=99, start_ts=1_700_000_100)
    assert snapshot(restored, ids) == snapshot(table, ids)


def test_adam_power_counters_round_trip_to_their_own_fields(tmp_path):
    table = make_table([(2, mtht.AdamOptimizer(beta1=0.9, beta2=0.99))])
    for step in range(3):
        table.apply_gradients([1], [[1.0, -1.0]], global_step=step, req_time=10)
    state = table.lookup_entry([1])[0].optimizer_state[0]
    b1, b2 = state["beta1_power"][0], state["beta2_power"][0]
    np.testing.assert_allclose([b1, b2], [0.9**4, 0.99**4], rtol=1e-5)

    table.save(tmp_path / "adam", format="monolith")
    restored = make_table([(2, mtht.AdamOptimizer(beta1=0.9, beta2=0.99))])
    restored.restore(tmp_path / "adam", format="monolith")
    got = restored.lookup_entry([1])[0].optimizer_state[0]
    assert got["beta1_power"].tobytes() == state["beta1_power"].tobytes()
    assert got["beta2_power"].tobytes() == state["beta2_power"].tobytes()
    assert got["beta1_power"][0] != got["beta2_power"][0]


def test_round_trip_multi_segment(tmp_path):
    segments = [(2, mtht.AdagradOptimizer()), (1, mtht.MovingAverageOptimizer()), (2, mtht.SgdOptimizer()),
                (1, mtht.AdamOptimizer()), (3, mtht.MovingAverageOptimizer()), (1, mtht.BatchSoftmaxOptimizer())]
    kinds = [opt.kind for _, opt in segments]
    lrs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    table = make_table(segments, lrs)
    train(table, steps=5, seed=7, start_ts=100)
    ids = ROUND_TRIP_IDS
    before = snapshot(table, ids)

    table.save(tmp_path / "multi", format="monolith")
    decoded = read_checkpoint(tmp_path / "multi", 1)
    for e in table.lookup_entry(ids):
        if e is not None:
            assert [k for k, _ in decoded[e.id]["dumps"]] == ["adagrad", "sgd", "adam", "batch_softmax"]
            assert_dump_matches_entry(decoded[e.id], e, kinds)

    restored = make_table(segments, lrs)
    restored.restore(tmp_path / "multi", format="monolith")
    assert snapshot(restored, ids) == before
    train(table, steps=2, seed=8, start_ts=200)
    train(restored, steps=2, seed=8, start_ts=200)
    assert snapshot(restored, ids) == snapshot(table, ids)


def test_batch_softmax_int64_step_round_trip(tmp_path):
    table = make_table([(1, mtht.BatchSoftmaxOptimizer())])
    step = 2**40 + 12345
    table.apply_gradients([4], [[1.0]], global_step=step, req_time=1)
    table.save(tmp_path / "bs", format="monolith")
    (e,) = read_checkpoint(tmp_path / "bs", 1).values()
    assert e["dumps"][0][0] == "batch_softmax"
    assert e["dumps"][0][1]["global_step"].tolist() == [step]
    restored = make_table([(1, mtht.BatchSoftmaxOptimizer())])
    restored.restore(tmp_path / "bs", format="monolith")
    assert restored.lookup_entry([4])[0].optimizer_state[0]["global_step"].tolist() == [step]


def test_round_trip_over_several_restore_batches_with_int64_state(tmp_path):
    # More entries than a restore gathers at a time, each with an int64 field among floats
    # (dynamic_wd_adagrad's step after its norms, next to an Adam segment): the fields of
    # every batch land in their own entries, bit for bit.
    segments = [(3, mtht.DynamicWdAdagradOptimizer()), (2, mtht.AdamOptimizer())]
    table = make_table(segments)
    ids = np.arange(-4_500, 4_500, dtype=np.int64) * 7919
    rng = np.random.default_rng(3)
    for step in (1, 2**40 + 5):
        table.apply_gradients(ids, rng.standard_normal((ids.size, 5)).astype(F32), global_step=step,
                              req_time=100 + step % 1000)
    table.apply_gradients(ids[::3], np.ones((ids[::3].size, 5), F32), global_step=2**33 + 1, req_time=7)
    table.save(tmp_path / "big", format="monolith")
    restored = make_table(segments)
    restored.restore(tmp_path / "big", format="monolith")
    assert snapshot(restored, ids) == snapshot(table, ids)


def test_restore_accepts_the_largest_finite_values(tmp_path):
    # Their float32 sum would overflow; they are finite all the same.
    largest = float(np.finfo(F32).max)
    base = tmp_path / "large"
    write_file(shard_names(base, 1)[0], [entry_dump(5, [largest, largest], [dump("adagrad", norm=[1.0, 2.0])], ts=9)])
    table = adagrad_table(2)
    table.restore(base, format="monolith")
    assert table.lookup([5]).tolist() == [[largest, largest]]


def test_non_finite_values_restore_bit_for_bit(tmp_path):
    # NaN (with its payload) and infinities in a file restore as they are, into a table that
    # refuses them as input: a save may hold them (below), and must restore.
    nan_with_payload = struct.unpack("<f", struct.pack("<I", 0x7FC0BEEF))[0]
    base = tmp_path / "t"
    write_file(shard_names(base, 1)[0], [entry_dump(5, [nan_with_payload, float("-inf")],
                                                    [dump("adagrad", norm=[float("inf"), 1.0])], ts=9)])
    table = adagrad_table(2)
    assert table.config.table_config.allow_non_finite is False
    table.restore(base, format="monolith")
    (entry,) = table.lookup_entry([5])
    assert entry.values.view(np.uint32).tolist() == [0x7FC0BEEF, 0xFF800000]
    assert entry.optimizer_state[0]["norm"].tolist() == [float("inf"), 1.0]


@pytest.mark.parametrize("fmt", ["mtht", "monolith"])
def test_a_value_that_overflowed_to_infinity_saves_and_restores(tmp_path, fmt):
    # Finite inputs can sum past the largest float: the table holds an infinity, and its
    # checkpoint restores in either format.
    largest = float(np.finfo(F32).max)
    table = sgd_table(2)
    table.assign([1, 2], [[largest, 1.0], [2.0, 3.0]])
    table.assign_add([1], [[largest, 0.0]])
    assert table.lookup([1]).tolist() == [[float("inf"), 1.0]]
    table.save(tmp_path / "t", format=fmt)
    restored = sgd_table(2)
    restored.restore(tmp_path / "t", format=fmt)
    assert snapshot(restored, [1, 2]) == snapshot(table, [1, 2])


def test_save_restore_negative_ids(tmp_path):
    # Monolith's test_save_restore: ids [-1, 1] -> [[1], [2]].
    table = sgd_table(1)
    table.assign([-1, 1], [[1.0], [2.0]])
    table.save(tmp_path / "table", format="monolith")
    restored = sgd_table(1)
    restored.restore(tmp_path / "table", format="monolith")
    assert restored.lookup([-1, 1]).tolist() == [[1.0], [2.0]]


def test_a_monolith_restore_keeps_the_clock_at_0_or_later(tmp_path):
    # A table's max_update_ts is 0 until a write stamps a later time; a Monolith-format
    # restore of one written only at negative times gave -5.
    table = sgd_table(1)
    table.assign([1], [[1.0]], req_time=-5)
    assert table.max_update_ts == 0
    table.save(tmp_path / "table", format="monolith")
    restored = sgd_table(1)
    restored.restore(tmp_path / "table", format="monolith")
    assert restored.max_update_ts == 0 and restored.lookup_entry([1])[0].last_update_ts == -5


def test_a_monolith_restore_starts_one_bit_scales_from_1(tmp_path):
    # The files hold no HashNet scale: a restore from them starts each one_bit segment's
    # scale from 1, as a Monolith process that loads them does, whatever the restoring
    # table's scale was; the next call at a multiple of step_size moves it. The mtht format
    # restores the saved scale.
    def one_bit_table():
        segment = mtht.CombineAsSegment(1, mtht.ZerosInitializer(), mtht.SgdOptimizer(),
                                        mtht.OneBitCompressor(step_size=10, amplitude=1.0))
        config = mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[segment]))
        return mtht.hash_table_from_config(mtht.HashTableConfigInstance(config, [1.0]))

    def scale_at(t):
        return float(np.sqrt(F32(1) + F32(0.005) * F32(t)))

    def read_scale(table):  # lookups give tanh(scale * 0.5)
        return float(np.arctanh(np.float64(table.lookup([1])[0, 0]))) / 0.5

    saved = one_bit_table()
    saved.apply_gradients([2], [[0.0]], global_step=100)
    saved.assign([1], [[0.5]])
    saved.save(tmp_path / "monolith", format="monolith")
    saved.save(tmp_path / "mtht")
    restored = one_bit_table()
    restored.assign([1], [[0.5]])
    restored.apply_gradients([3], [[0.0]], global_step=40)
    assert read_scale(restored) == pytest.approx(scale_at(40), rel=1e-5)
    restored.restore(tmp_path / "monolith", format="monolith")
    assert read_scale(restored) == pytest.approx(1.0, rel=1e-5)
    restored.apply_gradients([3], [[0.0]], global_step=20)
    assert read_scale(restored) == pytest.approx(scale_at(20), rel=1e-5)
    restored.restore(tmp_path / "mtht")
    assert read_scale(restored) == pytest.approx(scale_at(100), rel=1e-5)


def test_restore_discards_later_updates(tmp_path):
    # Monolith's test_save_restore_with_hash_table_clear_logic and test_restore_after_save.
    table = sgd_table(1)
    table.assign([0], [[1.0]])
    table.save(tmp_path / "t", format="monolith")
    table.assign([0], [[2.0]])
    table.assign([1], [[1.0]])
    table.restore(tmp_path / "t", format="monolith")
    assert table.lookup([0, 1]).tolist() == [[1.0], [0.0]]
    assert table.contains([0, 1]).tolist() == [True, False]


def test_max_update_ts_is_the_largest_timestamp_restored(tmp_path):
    table = sgd_table(1)
    table.assign([1, 2], [[1.0], [2.0]], req_time=2**35)
    table.assign([3], [[3.0]], req_time=2**35 + 9)
    table.save(tmp_path / "t", format="monolith")

    other = sgd_table(1)
    other.assign([5], [[5.0]], req_time=2**50)  # larger than anything in the checkpoint
    other.restore(tmp_path / "t", format="monolith")
    assert other.max_update_ts == 2**35 + 9
    assert [e.last_update_ts for e in other.lookup_entry([1, 2, 3])] == [2**35, 2**35, 2**35 + 9]


def test_several_files_with_saver_parallel(tmp_path):
    table = adagrad_table(2, saver_parallel=3)
    ids = np.arange(-1000, 1000, dtype=np.int64) * 7919
    table.apply_gradients(ids, np.ones((ids.size, 2), dtype=F32), global_step=1, req_time=123)
    base = tmp_path / "dir" / "adagrad"
    table.save(base, format="monolith")

    assert sorted(os.listdir(base.parent)) == [".mtht-lock"] + [os.path.basename(p) for p in shard_names(base, 3)]
    seen = []
    for path in shard_names(base, 3):
        file_ids = [decode_entry(r)["id"] for r in read_frames(path)]
        assert file_ids, "each file holds part of the table"
        seen.extend(file_ids)
    assert sorted(seen) == sorted(ids.tolist())  # the files partition the table

    restored = adagrad_table(2)  # the restoring table's own saver_parallel does not matter
    restored.restore(base, format="monolith")
    assert snapshot(restored, ids) == snapshot(table, ids)


def test_one_file_by_default_for_a_small_table(tmp_path):
    table = sgd_table(1)
    table.assign(np.arange(100), np.ones((100, 1), dtype=F32))
    table.save(tmp_path / "small", format="monolith")
    assert sorted(os.listdir(tmp_path)) == [".mtht-lock", "small-00000-of-00001"]


def test_files_by_monolith_default_one_per_million_entries(tmp_path):
    # Monolith's default, min(4, max(1, entries // 1,000,000)): a table of 1M entries takes
    # one file (mtht's own format writes two), of 2M two.
    table = sgd_table(1)
    table.assign(np.arange(1_000_000), np.ones((1_000_000, 1), dtype=F32))
    table.save(tmp_path / "one", format="monolith")
    assert sorted(os.listdir(tmp_path)) == [".mtht-lock", "one-00000-of-00001"]
    table.assign(np.arange(1_000_000, 2_000_000), np.ones((1_000_000, 1), dtype=F32))
    table.save(tmp_path / "two", format="monolith")
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("two")) == shard_names("two", 2)


def test_save_empty_table(tmp_path):
    table = adagrad_table(2)
    table.save(tmp_path / "empty", format="monolith")
    assert read_frames(shard_names(tmp_path / "empty", 1)[0]) == []
    restored = adagrad_table(2)
    restored.assign([1], [[1.0, 1.0]], req_time=3)
    restored.restore(tmp_path / "empty", format="monolith")
    assert len(restored) == 0 and restored.max_update_ts == 0


def test_save_over_an_existing_checkpoint(tmp_path):
    table = sgd_table(1)
    table.assign([1], [[1.0]])
    table.save(tmp_path / "t", format="monolith")
    table.assign([1, 2], [[5.0], [6.0]])
    table.save(tmp_path / "t", format="monolith")
    assert sorted(os.listdir(tmp_path)) == [".mtht-lock", "t-00000-of-00001"]
    restored = sgd_table(1)
    restored.restore(tmp_path / "t", format="monolith")
    assert restored.lookup([1, 2]).tolist() == [[5.0], [6.0]]


def unwritable_temporaries(monkeypatch, *names):
    """The temporary files of the shard files ``names`` go to a directory that does not
    exist: their writes fail."""
    real = monolith_checkpoint._temporary_name
    monkeypatch.setattr(monolith_checkpoint, "_temporary_name", lambda path: (
        os.path.join(f"{path}-nowhere", "tmp") if os.path.basename(path) in names else real(path)))


def test_a_failed_save_leaves_the_previous_files(tmp_path, monkeypatch):
    # A save that cannot write one of its files raises OSError, removes what it wrote, and
    # leaves the files of the save before it as they were.
    base = tmp_path / "t"
    table = sgd_table(1, saver_parallel=2)
    table.assign([1, 2, 3], [[1.0], [2.0], [3.0]])
    table.save(base, format="monolith")
    before = {p: pathlib.Path(p).read_bytes() for p in shard_names(base, 2)}
    table.assign([1, 2, 3], [[5.0], [6.0], [7.0]])
    unwritable_temporaries(monkeypatch, "t-00001-of-00002")
    with pytest.raises(OSError):
        table.save(base, format="monolith")
    assert sorted(os.listdir(tmp_path)) == [".mtht-lock"] + sorted(os.path.basename(p) for p in before)
    assert {p: pathlib.Path(p).read_bytes() for p in before} == before
    restored = sgd_table(1)
    restored.restore(base, format="monolith")
    assert restored.lookup([1, 2, 3]).tolist() == [[1.0], [2.0], [3.0]]


def test_mtht_and_monolith_formats_side_by_side(tmp_path):
    # The two formats are separate: each restores what it saved.
    table = adagrad_table(2)
    table.apply_gradients([1, 2], [[1.0, 2.0], [3.0, 4.0]], global_step=1, req_time=7)
    table.save(tmp_path / "native")
    table.save(tmp_path / "mono", format="monolith")
    a, b = adagrad_table(2), adagrad_table(2)
    a.restore(tmp_path / "native")
    b.restore(tmp_path / "mono", format="monolith")
    assert snapshot(a, [1, 2]) == snapshot(b, [1, 2]) == snapshot(table, [1, 2])
    with pytest.raises(ValueError, match="format"):
        table.save(tmp_path / "x", format="tfrecord")
    with pytest.raises(ValueError, match="format"):
        table.restore(tmp_path / "x", format="tfrecord")


# ---------------------------------------------------------------------------------------
# 4. Expiry at save time (reference §12.1)
# ---------------------------------------------------------------------------------------

def expiring_table(default_days, slot_days=None, dim=1):
    expiry = mtht.SlotExpireTimeConfig(default_expire_time=default_days, slot_expire_times=slot_days or {})
    return make_table([(dim, mtht.SgdOptimizer())], [1.0], slot_expire_time_config=expiry)


def test_expired_entries_are_left_out_of_the_save(tmp_path):
    # Monolith's test_save_restore_with_feature_eviction_assign_add.
    max_ts = 10_000_000
    table = expiring_table(1)
    table.assign_add([0], [[1.0]], req_time=max_ts - DAY - 1)  # expired: max - ts >= 1 day
    table.assign_add([1], [[2.0]], req_time=max_ts - DAY + 1)
    table.assign_add([2], [[3.0]], req_time=max_ts)
    table.save(tmp_path / "t", format="monolith")

    assert len(table) == 3  # left out of the file, still in memory
    assert sorted(read_checkpoint(tmp_path / "t", 1)) == [1, 2]
    restored = expiring_table(1)
    restored.restore(tmp_path / "t", format="monolith")
    assert restored.lookup([0, 1, 2]).tolist() == [[0.0], [2.0], [3.0]]
    assert restored.max_update_ts == max_ts


def test_expiry_boundary_is_inclusive(tmp_path):
    table = expiring_table(1)
    table.assign([0, 1], [[1.0], [2.0]], req_time=DAY)   # max - ts == 1 day exactly: expired
    table.assign([2], [[3.0]], req_time=2 * DAY)
    table.save(tmp_path / "t", format="monolith")
    assert sorted(read_checkpoint(tmp_path / "t", 1)) == [2]


def test_expire_time_zero_drops_everything(tmp_path):
    # Monolith's test_entry_ttl_zero.
    table = expiring_table(0)
    table.assign([0, 1], [[1.0], [2.0]])
    table.save(tmp_path / "t", format="monolith")
    restored = expiring_table(0)
    restored.restore(tmp_path / "t", format="monolith")
    assert restored.lookup([0, 1]).tolist() == [[0.0], [0.0]]
    assert len(restored) == 0


def test_expire_time_not_zero_keeps_everything(tmp_path):
    # Monolith's test_entry_ttl_not_zero.
    table = expiring_table(3600)
    table.assign([0, 1], [[1.0], [2.0]])
    table.save(tmp_path / "t", format="monolith")
    restored = expiring_table(3600)
    restored.restore(tmp_path / "t", format="monolith")
    assert restored.lookup([0, 1]).tolist() == [[1.0], [2.0]]


def test_expiry_by_slot(tmp_path):
    # Monolith's test_entry_ttl_by_slots: slot 1 expires after 0 days, slot 2 after 1.
    ids = [1 << 48, 2 << 48]
    table = expiring_table(3600, {1: 0, 2: 1})
    table.assign(ids, [[1.0], [2.0]], req_time=100)
    for round_ in range(2):
        table.save(tmp_path / f"t{round_}", format="monolith")
        table = expiring_table(3600, {1: 0, 2: 1})
        table.restore(tmp_path / f"t{round_}", format="monolith")
        assert table.lookup(ids).tolist() == [[0.0], [2.0]]


def test_restore_applies_no_expiry(tmp_path):
    # Entries are restored as saved, even when already expired for the restoring table.
    base = tmp_path / "old"
    write_file(shard_names(base, 1)[0], [entry_dump(1, [1.0], [dump("sgd")], ts=0),
                                         entry_dump(2, [2.0], [dump("sgd")], ts=100 * DAY)])
    table = expiring_table(1)
    table.restore(base, format="monolith")
    assert table.lookup([1, 2]).tolist() == [[1.0], [2.0]]


# ---------------------------------------------------------------------------------------
# 5. File sets: stray files, exact names
# ---------------------------------------------------------------------------------------

def test_stray_files_are_ignored(tmp_path):
    table = sgd_table(1)
    table.assign([1, 2], [[1.0], [2.0]], req_time=5)
    base = tmp_path / "table1"
    table.save(base, format="monolith")
    other = sgd_table(1)
    other.assign([3], [[3.0]])
    other.save(tmp_path / "table10", format="monolith")  # a name that starts with table1
    for stray in ["table1-tmp-123", "table1-00000-of-00002.bak", "table1-00000-of-00001-tmp-42",
                  "table1-00001-of-00002.tmp", "table1-0000-of-00002", "table1-00000-of-00001.index",
                  "table1_00000-of-00003"]:
        (tmp_path / stray).write_bytes(b"not a checkpoint")

    restored = sgd_table(1)
    restored.restore(base, format="monolith")
    assert len(restored) == 2
    assert restored.lookup([1, 2, 3]).tolist() == [[1.0], [2.0], [0.0]]

    restored.restore(tmp_path / "table10", format="monolith")
    assert len(restored) == 1 and restored.lookup([3]).tolist() == [[3.0]]


def test_basename_with_pattern_characters(tmp_path):
    table = sgd_table(1)
    table.assign([1], [[1.0]])
    base = tmp_path / "emb.v1+(x)[0]"
    table.save(base, format="monolith")
    (tmp_path / "embxv1+(x)[0]-00000-of-00002").write_bytes(b"")  # "." must not match any character
    restored = sgd_table(1)
    restored.restore(base, format="monolith")
    assert restored.lookup([1]).tolist() == [[1.0]]


def test_files_of_two_counts_restore_the_latest_whole_set(tmp_path):
    # A save with another file count killed after its renames, before it removed the older
    # files, leaves two whole sets: the one written last restores. Killed during its
    # renames, it leaves its own set partial: the older, whole one restores.
    base = tmp_path / "t"
    for value, count in ((1.0, 2), (2.0, 3)):
        table = sgd_table(1, saver_parallel=count)
        table.assign([1, 2, 3], [[value]] * 3)
        table.save(tmp_path / f"save{count}" / "t", format="monolith")
        for path in shard_names(tmp_path / f"save{count}" / "t", count):
            os.replace(path, tmp_path / os.path.basename(path))
    for i, path in enumerate(shard_names(base, 2) + shard_names(base, 3)):
        os.utime(path, ns=(10**18 + i, 10**18 + (0 if i < 2 else 10**9) + i))

    def restored():
        t = sgd_table(1)
        t.restore(base, format="monolith")
        return t.lookup([1, 2, 3]).tolist()

    assert restored() == [[2.0]] * 3
    for path in shard_names(base, 2):  # the older set written last instead
        os.utime(path, ns=(10**18, 10**18 + 2 * 10**9))
    assert restored() == [[1.0]] * 3
    os.unlink(shard_names(base, 2)[1])  # only the three-file set is whole
    assert restored() == [[2.0]] * 3


def test_saving_again_with_another_file_count_restores_the_latest_save(tmp_path):
    # The number of files can change between two saves to the same basename (saver_parallel,
    # or, by default, the table growing past a million entries). Restoring that basename
    # must give back the latest save, not fail on the previous save's files.
    base = tmp_path / "emb"
    first = sgd_table(1)
    first.assign([1], [[1.0]])
    first.save(base, format="monolith")

    second = sgd_table(1, saver_parallel=3)
    second.assign(np.arange(10, 40), np.full((30, 1), 2.0, dtype=F32))
    second.save(base, format="monolith")

    restored = sgd_table(1)
    restored.restore(base, format="monolith")
    assert len(restored) == 30
    assert restored.lookup([1, 10]).tolist() == [[0.0], [2.0]]


def test_relative_basename(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table = sgd_table(1)
    table.assign([1], [[1.0]])
    table.save("plain", format="monolith")
    assert os.path.exists("plain-00000-of-00001")
    restored = sgd_table(1)
    restored.restore("plain", format="monolith")
    assert restored.lookup([1]).tolist() == [[1.0]]


# ---------------------------------------------------------------------------------------
# 6. Broken checkpoints: an error, and the table exactly as it was
# ---------------------------------------------------------------------------------------

def good_adagrad_records():
    first = [entry_dump(i, [i + 0.5, -i], [dump("adagrad", norm=[1.0, 2.0])], ts=1000 + i) for i in range(10, 14)]
    second = [entry_dump(i, [i + 0.5, -i], [dump("adagrad", norm=[1.0, 2.0])], ts=1000 + i) for i in range(20, 23)]
    return first, second


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def bad_record_in_second_file(record):
    def make(base):
        first, second = good_adagrad_records()
        write_file(shard_names(base, 2)[0], first)
        write_file(shard_names(base, 2)[1], second + [record])
    return make


def good_files_then(change):
    def make(base):
        first, second = good_adagrad_records()
        write_file(shard_names(base, 2)[0], first)
        write_file(shard_names(base, 2)[1], second)
        change(base)
    return make


def _path(base, i, n=2):
    return pathlib.Path(shard_names(base, n)[i])


BROKEN = {
    "missing_shard": (FileNotFoundError, good_files_then(lambda b: _path(b, 1).unlink())),
    "missing_first_shard": (FileNotFoundError, good_files_then(lambda b: _path(b, 0).unlink())),
    "no_files": (FileNotFoundError, lambda base: None),
    "missing_directory": (FileNotFoundError, lambda base: None),
    "mixed_shard_counts_none_whole": (ValueError, good_files_then(
        lambda b: (_path(b, 1).unlink(), write_file(shard_names(b, 3)[0], [])))),
    "corrupt_data_checksum": (ValueError, good_files_then(
        lambda b: flip_byte(_path(b, 1), _path(b, 1).stat().st_size - 10))),
    "corrupt_stored_checksum": (ValueError, good_files_then(
        lambda b: flip_byte(_path(b, 1), _path(b, 1).stat().st_size - 1))),
    "corrupt_length": (ValueError, good_files_then(lambda b: flip_byte(_path(b, 1), 0))),
    "truncated_record": (ValueError, good_files_then(
        lambda b: _path(b, 1).write_bytes(_path(b, 1).read_bytes()[:-3]))),
    "truncated_header": (ValueError, good_files_then(
        lambda b: _path(b, 1).write_bytes(_path(b, 1).read_bytes() + b"\x05\x00\x00"))),
    "not_protobuf": (ValueError, bad_record_in_second_file(b"\xff\xff\xff")),
    "other_optimizer_dump": (ValueError, bad_record_in_second_file(
        entry_dump(30, [1.0, 2.0], [dump("sgd")], ts=1))),
    "ftrl_dump_for_adagrad": (ValueError, bad_record_in_second_file(
        entry_dump(30, [1.0, 2.0], [dump("ftrl", zero=[0.0, 0.0], norm=[1.0, 1.0])], ts=1))),
    "no_optimizer_dump": (ValueError, bad_record_in_second_file(entry_dump(30, [1.0, 2.0], [], ts=1))),
    "two_optimizer_dumps": (ValueError, bad_record_in_second_file(
        entry_dump(30, [1.0, 2.0], [dump("adagrad", norm=[1.0, 1.0])] * 2, ts=1))),
    "short_state": (ValueError, bad_record_in_second_file(
        entry_dump(30, [1.0, 2.0], [dump("adagrad", norm=[1.0])], ts=1))),
    "long_state": (ValueError, bad_record_in_second_file(
        entry_dump(30, [1.0, 2.0], [dump("adagrad", norm=[1.0, 1.0, 1.0])], ts=1))),
    "too_few_values": (ValueError, bad_record_in_second_file(
        entry_dump(30, [1.0], [dump("adagrad", norm=[1.0, 1.0])], ts=1))),
    "too_many_values": (ValueError, bad_record_in_second_file(
        entry_dump(30, [1.0, 2.0, 3.0], [dump("adagrad", norm=[1.0, 1.0])], ts=1))),
}


@pytest.mark.parametrize("threads", [1, 2])
def test_the_first_broken_record_of_a_file_is_the_one_named(tmp_path, restore_num_threads, threads):
    # Whatever the thread count, the error names a file's first broken record, also when a
    # frame after it is broken too.
    mtht.set_num_threads(threads)
    records = [entry_dump(i, [i + 0.5, -i], [dump("adagrad", norm=[1.0, 2.0])], ts=i) for i in range(100)]
    records[20] = entry_dump(20, [1.0, 2.0, 3.0], [dump("adagrad", norm=[1.0, 2.0])], ts=20)
    records[90] = entry_dump(90, [float("nan"), 2.0], [dump("adagrad", norm=[1.0, 2.0])], ts=90)
    base = tmp_path / "bad"
    path = pathlib.Path(shard_names(base, 1)[0])
    write_file(path, records)
    with pytest.raises(ValueError, match="entry 20 has 3 values"):
        adagrad_table(2).restore(base, format="monolith")
    path.write_bytes(path.read_bytes()[:-3])  # and the last frame cut short
    with pytest.raises(ValueError, match="entry 20 has 3 values"):
        adagrad_table(2).restore(base, format="monolith")
    records[20] = records[21]
    write_file(path, records[:90])
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated record"):
        adagrad_table(2).restore(base, format="monolith")


def test_record_length_beyond_the_end_of_the_file(tmp_path):
    # A header whose length (with a valid checksum) runs past the end of the file is a
    # truncated record: ValueError, without trying to read (or allocate) that length.
    base = tmp_path / "long"
    first, _ = good_adagrad_records()
    length = struct.pack("<Q", 2**62)
    head = length + struct.pack("<I", masked_crc32c(length))
    pathlib.Path(shard_names(base, 1)[0]).write_bytes(b"".join(frame(r) for r in first) + head + b"\x00" * 8)
    table = adagrad_table(2)
    table.assign([1], [[1.0, 1.0]], req_time=3)
    before = snapshot(table, [1, 10])
    with pytest.raises(ValueError):
        table.restore(base, format="monolith")
    assert snapshot(table, [1, 10]) == before


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoint_raises_and_leaves_the_table(tmp_path, case):
    error, make = BROKEN[case]
    base = tmp_path / ("absent" if case == "missing_directory" else "ckpt") / "adagrad"
    if case != "missing_directory":
        base.parent.mkdir()
    make(base)

    table = adagrad_table(2)
    table.apply_gradients([1, 2, 10, 20], np.ones((4, 2), dtype=F32), global_step=1, req_time=77)
    probe = [1, 2, 10, 11, 20, 30]
    before = snapshot(table, probe)
    with pytest.raises(error):
        table.restore(base, format="monolith")
    assert snapshot(table, probe) == before

    # The table is still fully usable.
    table.apply_gradients([1], [[1.0, 1.0]], global_step=2, req_time=78)
    assert table.max_update_ts == 78


def test_checkpoint_of_another_layout_raises(tmp_path):
    adagrad = adagrad_table(2)
    adagrad.assign([1], [[1.0, 2.0]])
    adagrad.save(tmp_path / "adagrad", format="monolith")
    for wrong in (sgd_table(2), adagrad_table(3), make_table([(2, mtht.AdamOptimizer())]),
                  make_table([(1, mtht.AdagradOptimizer()), (1, mtht.AdagradOptimizer())])):
        wrong.assign([5], np.ones((1, wrong.dim_size), dtype=F32), req_time=4)
        before = snapshot(wrong, [1, 5])
        with pytest.raises(ValueError):
            wrong.restore(tmp_path / "adagrad", format="monolith")
        assert snapshot(wrong, [1, 5]) == before


def test_moving_average_segment_takes_no_dump(tmp_path):
    # A record with a dump for the moving-average segment does not fit [moving_average, sgd].
    base = tmp_path / "ma"
    write_file(shard_names(base, 1)[0], [entry_dump(1, [1.0, 2.0], [dump("sgd"), dump("sgd")], ts=1)])
    table = make_table([(1, mtht.MovingAverageOptimizer()), (1, mtht.SgdOptimizer())], [0.1, 0.1])
    with pytest.raises(ValueError):
        table.restore(base, format="monolith")
    assert len(table) == 0

    write_file(shard_names(base, 1)[0], [entry_dump(1, [1.0, 2.0], [dump("sgd")], ts=1)])
    table.restore(base, format="monolith")
    assert table.lookup([1]).tolist() == [[1.0, 2.0]]


def test_dumps_in_the_wrong_segment_order_raise(tmp_path):
    base = tmp_path / "order"
    write_file(shard_names(base, 1)[0], [
        entry_dump(1, [1.0, 2.0], [dump("sgd"), dump("adagrad", norm=[1.0])], ts=1)])
    table = make_table([(1, mtht.AdagradOptimizer()), (1, mtht.SgdOptimizer())], [0.1, 0.1])
    with pytest.raises(ValueError):
        table.restore(base, format="monolith")
    assert len(table) == 0


def test_save_and_restore_need_neither_protobuf_nor_google_crc32c(tmp_path, monkeypatch):
    # The core encodes the records and computes the checksums; only entry_dump_class, for
    # looking at records from Python, needs protobuf, and says which extra has it.
    for module in ("google_crc32c", "google", "google.protobuf"):
        monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    monkeypatch.setattr(monolith_checkpoint, "_CLASSES", None)
    table = adagrad_table(2)
    table.apply_gradients([1, -2], [[1.0, 2.0], [3.0, 4.0]], global_step=1, req_time=5)
    table.save(tmp_path / "t", format="monolith")
    restored = adagrad_table(2)
    restored.restore(tmp_path / "t", format="monolith")
    assert snapshot(restored, [1, -2]) == snapshot(table, [1, -2])
    records = list(monolith_checkpoint.read_tfrecords(shard_names(tmp_path / "t", 1)[0]))
    assert sorted(decode_entry(r)["id"] for r in records) == [-2, 1]
    with pytest.raises(ImportError, match=r"mtht\[monolith\]"):
        monolith_checkpoint.entry_dump_class()


# ---------------------------------------------------------------------------------------
# 7. Against the protobuf library: records it encodes, merges and rejects
# ---------------------------------------------------------------------------------------

# Table layouts: (dim, optimizer) per segment.
LAYOUTS = {
    "adagrad": [(2, mtht.AdagradOptimizer())],
    "adam+sgd": [(1, mtht.AdamOptimizer()), (2, mtht.SgdOptimizer())],
    "dynamic_wd+moving_average+group_adagrad": [(2, mtht.DynamicWdAdagradOptimizer()),
                                                (1, mtht.MovingAverageOptimizer()),
                                                (1, mtht.AdaGradWithGroupLassoOptimizer())],
    "batch_softmax": [(1, mtht.BatchSoftmaxOptimizer())],
}


def layout_plan(layout):
    """(dim, [(kind, [(name, form, length)])]) of the segments with a dump."""
    dim = sum(d for d, _ in layout)
    plan = []
    for seg_dim, opt in layout:
        if opt.kind == "moving_average":
            continue
        plan.append((opt.kind, [(name, form, seg_dim if form == "floats" else 1)
                                for _, name, form in DUMPS[opt.kind][1]]))
    return dim, plan


def reference_restore(record, layout):
    """What restoring ``record`` into a table of ``layout`` gives, by the protobuf library
    and the format's rules: None when it must raise, else (id, ts, values, [{name: array}]
    per segment) as lookup_entry reports them."""
    message = monolith_checkpoint.entry_dump_class()()
    try:
        message.ParseFromString(record)
    except Exception:
        return None
    dim, plan = layout_plan(layout)
    if len(message.num) != dim or len(message.opt.dump) != len(plan):
        return None
    dumped = []
    for single, (kind, fields) in zip(message.opt.dump, plan):
        if single.WhichOneof("type") != kind:
            return None
        body = getattr(single, kind)
        state = {}
        for name, form, length in fields:
            value = getattr(body, name)
            if form == "floats":
                if len(value) != length:
                    return None
                state[name] = np.array(list(value), dtype=F32)
            else:
                state[name] = np.array([value], dtype=np.int64 if form == "int64" else F32)
        dumped.append(state)
    values = np.array(list(message.num), dtype=F32)
    if not np.isfinite(values).all():
        return None
    states = iter(dumped)
    per_segment = [{} if opt.kind == "moving_average" else next(states) for _, opt in layout]
    return message.id, message.last_update_ts_sec, values, per_segment


def assert_restores_as_protobuf_reads_it(tmp_path, record, layout):
    """Restoring ``record`` raises ValueError (and leaves the table) exactly when the
    reference says it must, and otherwise gives the reference's entry, bit for bit (NaN
    state as NaN: the reference's floats pass through Python floats)."""
    expected = reference_restore(record, layout)
    table = make_table(layout)
    table.assign([123], np.full((1, table.dim_size), 7.0, F32), req_time=9)
    before = snapshot(table, [123])
    base = tmp_path / f"r{os.urandom(6).hex()}"
    write_file(shard_names(base, 1)[0], [record])
    if expected is None:
        with pytest.raises(ValueError):
            table.restore(base, format="monolith")
        assert snapshot(table, [123]) == before
        return
    table.restore(base, format="monolith")
    id_, ts, values, state = expected
    assert len(table) == 1 and table.max_update_ts == max(ts, 0)  # a table's clock starts at 0
    (entry,) = table.lookup_entry([id_])
    assert entry is not None and entry.last_update_ts == ts
    assert entry.values.tobytes() == values.tobytes()
    assert len(entry.optimizer_state) == len(state)
    for got, want in zip(entry.optimizer_state, state):
        assert sorted(got) == sorted(want)
        for name in want:
            assert got[name].dtype == want[name].dtype
            assert np.array_equal(got[name], want[name], equal_nan=want[name].dtype == F32), name


def protobuf_entry(layout, id_, ts, values, state_values):
    """An EntryDump built with the protobuf library: ``state_values`` gives each dump
    field's value (a list for repeated floats)."""
    message = monolith_checkpoint.entry_dump_class()(id=id_, last_update_ts_sec=ts)
    message.num.extend(values)
    message.opt.SetInParent()
    _, plan = layout_plan(layout)
    for kind, fields in plan:
        body = getattr(message.opt.dump.add(), kind)
        body.SetInParent()
        for name, form, _ in fields:
            if form == "floats":
                getattr(body, name).extend(state_values[(kind, name)])
            else:
                setattr(body, name, state_values[(kind, name)])
    return message


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
int64s = st.integers(-(2**63), 2**63 - 1)
steps = st.integers(0, 2**63 - 1)  # the step counters of optimizer state (below 0 is refused)


@st.composite
def layout_and_entry(draw, names=st.sampled_from(sorted(LAYOUTS))):
    """An entry of a layout (drawn from ``names``) as the protobuf library builds it."""
    name = draw(names)
    layout = LAYOUTS[name]
    dim, plan = layout_plan(layout)
    state_values = {}
    for kind, fields in plan:
        for field, form, length in fields:
            if form == "floats":
                state_values[(kind, field)] = draw(st.lists(finite_f32, min_size=length, max_size=length))
            elif form == "float":
                state_values[(kind, field)] = draw(finite_f32)
            else:
                state_values[(kind, field)] = draw(steps)
    values = draw(st.lists(finite_f32, min_size=dim, max_size=dim))
    return protobuf_entry(layout, draw(int64s), draw(int64s), values, state_values)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_records_restore_and_save_as_the_protobuf_library_encodes_them(tmp_path, data):
    # Restoring a record the library encoded and saving it again gives the library's bytes.
    name = data.draw(st.sampled_from(sorted(LAYOUTS)))
    layout = LAYOUTS[name]
    message = data.draw(layout_and_entry(st.just(name)))
    record = message.SerializeToString()
    assert_restores_as_protobuf_reads_it(tmp_path, record, layout)
    table = make_table(layout)
    base = tmp_path / f"in{os.urandom(6).hex()}"
    write_file(shard_names(base, 1)[0], [record])
    table.restore(base, format="monolith")
    out = tmp_path / f"out{os.urandom(6).hex()}"
    table.save(out, format="monolith")
    # The table's clock starts at 0, so a record from 100 years (the default expiry) or more
    # before 1970 has expired by the save.
    ts = message.last_update_ts_sec
    kept = max(ts, 0) - ts < 36500 * 86400
    assert read_frames(shard_names(out, 1)[0]) == ([record] if kept else [])


@st.composite
def unknown_field(draw):
    """A well-formed field of EntryDump: an unknown number, or a known one with a wire type
    of another field type (which a parser keeps among the unknown fields)."""
    number = draw(st.integers(1, 40))
    wire = draw(st.sampled_from([0, 1, 2, 5]))
    payload = {0: varint(draw(st.integers(0, 2**64 - 1))), 1: draw(st.binary(min_size=8, max_size=8)),
               2: b"", 5: draw(st.binary(min_size=4, max_size=4))}[wire]
    if wire == 2:
        payload = varint(len(body := draw(st.binary(max_size=12)))) + body
    return key(number, wire) + payload


@st.composite
def merge_partner(draw, name):
    """A message to follow an entry's record, which a parser merges into it: scalars only,
    an empty ``opt``, unknown fields, or a whole entry of the same layout."""
    kind = draw(st.sampled_from(["scalars", "empty_opt", "unknown", "entry"]))
    if kind == "entry":
        return draw(layout_and_entry(st.just(name))).SerializeToString()
    if kind == "unknown":
        return b"".join(draw(st.lists(unknown_field(), min_size=1, max_size=3)))
    message = monolith_checkpoint.entry_dump_class()()
    if draw(st.booleans()):
        message.id = draw(int64s)
    if draw(st.booleans()):
        message.last_update_ts_sec = draw(int64s)
    if kind == "empty_opt":
        message.opt.SetInParent()
    return message.SerializeToString()


def mutations():
    """Ways to change a record: (kind, position fraction, bytes)."""
    return st.tuples(st.sampled_from(["flip", "truncate", "insert", "duplicate"]), st.floats(0, 1),
                     st.binary(min_size=1, max_size=6))


def mutate(record: bytes, how) -> bytes:
    kind, where, data = how
    at = int(where * len(record))
    if kind == "flip":
        at = min(at, len(record) - 1)
        return record[:at] + bytes([record[at] ^ (data[0] or 1)]) + record[at + 1:] if record else record
    if kind == "truncate":
        return record[:at]
    if kind == "insert":
        return record[:at] + data + record[at:]
    return record[:at] + record[at:at + 1 + data[0] % 40] + record[at:]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_merged_records_restore_as_the_protobuf_library_reads_them(tmp_path, data):
    # Two messages one after the other are one merged message: repeated fields appended,
    # the last scalar winning, unknown fields skipped.
    name = data.draw(st.sampled_from(sorted(LAYOUTS)))
    record = data.draw(layout_and_entry(st.just(name))).SerializeToString()
    partner = data.draw(merge_partner(name))
    if data.draw(st.booleans()):
        record, partner = partner, record
    assert_restores_as_protobuf_reads_it(tmp_path, record + partner, LAYOUTS[name])


@st.composite
def oneof_members(draw, name):
    """An entry whose SingleOptimizerDumps each hold one to three members one after the
    other (the last one set wins; the same member twice is merged), some with part of their
    state, or of another optimizer."""
    dim, plan = layout_plan(LAYOUTS[name])
    singles = []
    for kind, fields in plan:
        lengths = {field: length for field, _, length in fields}
        members = []
        for _ in range(draw(st.sampled_from([1, 1, 2, 3]))):
            member = draw(st.sampled_from([kind] * 4 + ["sgd", "adagrad", "momentum", "group_adagrad"]))
            state = {}
            for _, field, form in DUMPS[member][1]:
                if form == "floats":
                    # Mostly the length the table needs (across the members the same member
                    # takes, its floats add up).
                    length = draw(st.sampled_from([lengths.get(field, 1)] * 3 + [0, 1, 2]))
                    state[field] = draw(st.lists(finite_f32, min_size=length, max_size=length))
                elif form == "float":
                    state[field] = draw(finite_f32)
                else:
                    state[field] = draw(steps)
                if draw(st.integers(0, 4)) == 0:
                    del state[field]
            members.append(dump(member, packed=draw(st.booleans()), **state))
        singles.append(b"".join(members))
    values = draw(st.lists(finite_f32, min_size=dim, max_size=dim))
    return entry_dump(draw(int64s), values, singles, ts=draw(int64s), packed=draw(st.booleans()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_oneof_members_restore_as_the_protobuf_library_reads_them(tmp_path, data):
    name = data.draw(st.sampled_from(sorted(LAYOUTS)))
    assert_restores_as_protobuf_reads_it(tmp_path, data.draw(oneof_members(name)), LAYOUTS[name])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_records_restore_as_the_protobuf_library_reads_them(tmp_path, data):
    # Any bytes either parse as the library parses them or raise: flipped, cut, inserted and
    # repeated bytes, and fields the format does not have.
    name = data.draw(st.sampled_from(sorted(LAYOUTS)))
    record = data.draw(layout_and_entry(st.just(name))).SerializeToString()
    for how in data.draw(st.lists(mutations(), max_size=3)):
        record = mutate(record, how)
    extra = data.draw(st.lists(unknown_field(), max_size=2))
    at = data.draw(st.sampled_from([0, len(record)]))  # between fields: the record's ends
    record = record[:at] + b"".join(extra) + record[at:]
    assert_restores_as_protobuf_reads_it(tmp_path, record, LAYOUTS[name])


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_the_room_a_restore_reserves_counts_the_smallest_records(tmp_path, name):
    # A restore makes room for file bytes / the smallest framed record of the layout: that
    # size is what a save writes for entries whose varints take one byte each (timestamp 0,
    # int64 state 0), so the files never hold more entries than there is room for.
    table = make_table(LAYOUTS[name])
    table.assign(np.arange(5), np.ones((5, table.dim_size), F32), req_time=0)
    table.save(tmp_path / "t", format="monolith")
    path = shard_names(tmp_path / "t", 1)[0]
    smallest = monolith_checkpoint._fewest_bytes_per_entry(table.dim_size, monolith_checkpoint._format(table))
    assert [16 + len(r) for r in read_frames(path)] == [smallest] * 5
    assert os.path.getsize(path) == 5 * smallest


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2000))
def test_crc32c_agrees_with_google_crc32c(data):
    assert mtht._core.crc32c(data) == google_crc32c.value(data)
    assert monolith_checkpoint._masked_crc32c(data) == masked_crc32c(data)


# ---------------------------------------------------------------------------------------
# 8. A model's tables in a checkpoint's .assets directory
# ---------------------------------------------------------------------------------------

from mtht.checkpoint import restore_multi_type, save_multi_type  # noqa: E402
from mtht.multi_type_hash_table import MergedMultiTypeHashTable, MultiTypeHashTable  # noqa: E402

MODEL_SLOTS = {  # slot: segments
    "user_id": [(4, mtht.AdagradOptimizer(initial_accumulator_value=0.1))],
    "item_id": [(3, mtht.AdamOptimizer()), (2, mtht.SgdOptimizer())],
    "fc_slot_7": [(2, mtht.FtrlOptimizer())],
}


def slot_config(segments):
    segs = [mtht.CombineAsSegment(dim, mtht.ZerosInitializer(), opt, mtht.Fp32Compressor()) for dim, opt in segments]
    return mtht.HashTableConfigInstance(
        mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=segs)), [0.1] * len(segs))


def slot_factory(name, config):
    return mtht.hash_table_from_config(config, name_suffix=name)


def model(merged=False):
    configs = {slot: slot_config(segments) for slot, segments in MODEL_SLOTS.items()}
    if merged:
        return MergedMultiTypeHashTable(configs, lambda merged_configs: MultiTypeHashTable(merged_configs, slot_factory))
    return MultiTypeHashTable(configs, slot_factory)


def model_tables(m):
    inner = m._table if isinstance(m, MergedMultiTypeHashTable) else m
    return [inner._tables[key] for key in sorted(inner._tables)]


def train_model(m, seed):
    rng = np.random.default_rng(seed)
    for step in range(4):
        grads = {}
        for slot, segments in MODEL_SLOTS.items():
            ids = rng.choice(ROUND_TRIP_IDS, size=6)
            grads[slot] = (ids, rng.standard_normal((6, sum(d for d, _ in segments))).astype(F32))
        m.apply_gradients(grads, global_step=step + 1, req_time=1_700_000_000 + 60 * step)
    return m


def model_snapshot(m):
    return [snapshot(t, ROUND_TRIP_IDS) for t in model_tables(m)]


@pytest.mark.parametrize("merged", [False, True], ids=["multi_type", "merged"])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_model_saves_each_table_as_its_own_monolith_save(tmp_path, restore_num_threads, merged, threads):
    # Each table's files are named as Monolith's checkpoint listener names them in a
    # .assets directory (the table's name), hold what the table's own save writes, byte for
    # byte, and restore into a fresh model bit for bit, whatever the thread count.
    mtht.set_num_threads(threads)
    trained = model(merged)
    train_model(trained, seed=3)
    save_multi_type(trained, tmp_path / "assets", format="monolith")
    tables = model_tables(trained)
    names = [t.name for t in tables]
    if merged:  # the merged tables are named by the md5 of their slots
        assert sorted(names) == sorted(f"MonolithHashTable_{n}" for n in trained.slot_mapping.values())
    else:
        assert sorted(names) == sorted(f"MonolithHashTable_{slot}" for slot in MODEL_SLOTS)
    assert sorted(os.listdir(tmp_path / "assets")) == [".mtht-lock"] + sorted(f"{n}-00000-of-00001" for n in names)
    for table in tables:
        table.save(tmp_path / "single" / table.name, format="monolith")
        own = pathlib.Path(shard_names(tmp_path / "single" / table.name, 1)[0]).read_bytes()
        assert pathlib.Path(shard_names(tmp_path / "assets" / table.name, 1)[0]).read_bytes() == own

    restored = model(merged)
    restore_multi_type(restored, tmp_path / "assets", format="monolith")
    assert model_snapshot(restored) == model_snapshot(trained)


def test_a_model_restores_tables_saved_one_by_one(tmp_path):
    # Files written table by table (as Monolith's listener writes them) restore as a model.
    trained = model()
    train_model(trained, seed=4)
    for table in model_tables(trained):
        table.save(tmp_path / table.name, format="monolith")
    restored = model()
    restore_multi_type(restored, tmp_path, format="monolith")
    assert model_snapshot(restored) == model_snapshot(trained)


def test_a_renamed_merged_table_restores_from_its_old_name(tmp_path):
    # A merged table of fc_slot_7 also answers to the bare md5 its slot had as slot_7 (its
    # extra_restore_names), which is where Monolith's restorer looks for old files.
    configs = {"fc_slot_7": slot_config(MODEL_SLOTS["fc_slot_7"])}
    new = MergedMultiTypeHashTable(configs, lambda c: MultiTypeHashTable(c, slot_factory))
    (table,) = model_tables(new)
    old_name = table.extra_restore_names[0]
    source = slot_factory("x", slot_config(MODEL_SLOTS["fc_slot_7"]))
    source.assign([5], [[0.5, 0.25]], req_time=7)
    source.save(tmp_path / old_name, format="monolith")
    restore_multi_type(new, tmp_path, format="monolith")
    assert new.lookup({"fc_slot_7": [5]})["fc_slot_7"].tolist() == [[0.5, 0.25]]


def test_a_renamed_merged_table_restores_from_the_files_of_its_old_table(tmp_path):
    # Monolith named the files of the merged table of slot_7 after the table,
    # MonolithHashTable_<md5 of "slot_7">: the merged table of fc_slot_7 finds them by its
    # old name too (Monolith's restorer looked for the bare md5 only, and never found them).
    configs = {"fc_slot_7": slot_config(MODEL_SLOTS["fc_slot_7"])}
    old = MergedMultiTypeHashTable({"slot_7": configs["fc_slot_7"]}, lambda c: MultiTypeHashTable(c, slot_factory))
    old.assign({"slot_7": ([5], [[0.5, 0.25]])}, req_time=7)
    save_multi_type(old, tmp_path, format="monolith")
    (old_table,) = model_tables(old)
    assert old_table.name.startswith("MonolithHashTable_") and os.path.exists(shard_names(tmp_path / old_table.name, 1)[0])
    new = MergedMultiTypeHashTable(configs, lambda c: MultiTypeHashTable(c, slot_factory))
    (table,) = model_tables(new)
    assert table.extra_restore_names == [old_table.name[len("MonolithHashTable_"):]]
    restore_multi_type(new, tmp_path, format="monolith")
    assert new.lookup({"fc_slot_7": [5]})["fc_slot_7"].tolist() == [[0.5, 0.25]]


def saved_model_and_another(directory):
    """Saves a trained model's tables at ``directory``; returns another model, trained
    otherwise, and its snapshot."""
    save_multi_type(train_model(model(), seed=5), directory, format="monolith")
    other = train_model(model(), seed=6)
    return other, model_snapshot(other)


def test_a_model_restore_missing_a_table_changes_nothing(tmp_path):
    target, before = saved_model_and_another(tmp_path)
    os.unlink(shard_names(tmp_path / "MonolithHashTable_item_id", 1)[0])
    with pytest.raises(FileNotFoundError, match="MonolithHashTable_item_id"):
        restore_multi_type(target, tmp_path, format="monolith")
    assert model_snapshot(target) == before
    with pytest.raises(FileNotFoundError):
        restore_multi_type(target, tmp_path / "absent", format="monolith")
    assert model_snapshot(target) == before


@pytest.mark.parametrize("threads", [1, 2])
def test_a_model_restore_with_a_damaged_table_changes_nothing(tmp_path, restore_num_threads, threads):
    # The tables load in parallel, but none changes until every one has loaded: a damaged
    # file in the last table leaves the first ones as they were.
    mtht.set_num_threads(threads)
    target, before = saved_model_and_another(tmp_path)
    path = pathlib.Path(shard_names(tmp_path / "MonolithHashTable_user_id", 1)[0])
    data = bytearray(path.read_bytes())
    data[40] ^= 0x10  # in the first record's data: its checksum fails
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="MonolithHashTable_user_id"):
        restore_multi_type(target, tmp_path, format="monolith")
    assert model_snapshot(target) == before


def test_a_failed_model_save_leaves_every_tables_previous_files(tmp_path, monkeypatch):
    # One table's file cannot be written: no table's new files are renamed into place, and
    # no temporary file is left.
    m = model()
    train_model(m, seed=9)
    save_multi_type(m, tmp_path, format="monolith")
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    train_model(m, seed=10)
    unwritable_temporaries(monkeypatch, "MonolithHashTable_user_id-00000-of-00001")
    with pytest.raises(OSError):
        save_multi_type(m, tmp_path, format="monolith")
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_temporaries_of_a_killed_save_are_removed_by_the_next(tmp_path):
    # A killed save leaves its temporary files; the next save at the basename removes them
    # (and leaves other names alone).
    base = tmp_path / "t"
    table = sgd_table(1, saver_parallel=2)
    table.assign([1], [[1.0]])
    left = [f"{shard_names(base, 2)[0]}-tmp-4242-0123abcd", f"{shard_names(base, 3)[2]}-tmp-1-abcd0123"]
    # Among the others, the file of a table whose name starts like this one's temporaries.
    others = ["t-tmp-9", "tt-00000-of-00001-tmp-3-0123abcd", "t-00000-of-00002.bak",
              "t-00000-of-00002-tmp-7-0123abcd-00000-of-00001"]
    for name in left + [str(tmp_path / o) for o in others]:
        pathlib.Path(name).write_bytes(b"x" * 100)
    table.save(base, format="monolith")
    assert sorted(os.listdir(tmp_path)) == sorted(others + [os.path.basename(p) for p in shard_names(base, 2)]
                                                  + [".mtht-lock"])


def test_tables_that_would_share_files_are_refused(tmp_path):
    # Tables built without a name_suffix all have the same name: saving them would write one
    # table's files over another's.
    configs = {slot: slot_config(MODEL_SLOTS["fc_slot_7"]) for slot in ("a", "b")}
    m = MultiTypeHashTable(configs, lambda name, config: mtht.hash_table_from_config(config))
    with pytest.raises(ValueError, match="share the files"):
        save_multi_type(m, tmp_path / "assets", format="monolith")
    assert not (tmp_path / "assets").exists()
    with pytest.raises(ValueError, match="share the files"):
        restore_multi_type(m, tmp_path, format="monolith")


def test_a_model_checkpoint_format_must_be_known(tmp_path):
    m = model()
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        save_multi_type(m, tmp_path, format="tfrecord")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        restore_multi_type(m, tmp_path, format="tfrecord")
    assert os.listdir(tmp_path) == []


def test_asset_prefix_is_the_listeners_name():
    assert monolith_checkpoint.asset_prefix("MonolithHashTable_a:0/b") == "MonolithHashTable_a-0-b"
