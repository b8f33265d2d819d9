"""Compressors as serving storage formats (reference §7): Monolith's pinned numbers and
round trips against independent numpy expectations."""

import warnings

import numpy as np
import pytest

import mtht
from mtht.serving import compress, decompress, row_bytes


def config(*segments):
    return mtht.EmbeddingHashTableConfig(entry_config=mtht.EntryConfig(segments=[
        mtht.CombineAsSegment(dim, mtht.ZerosInitializer(), mtht.SgdOptimizer(), comp) for dim, comp in segments]))


def test_fp32_round_trips_exactly():
    cfg = config((3, mtht.Fp32Compressor()))
    v = np.array([[0.1, 0.2, 10000.0]], np.float32)
    packed = compress(cfg, v)
    assert packed.shape == (1, 12) and row_bytes(cfg) == 12
    assert np.array_equal(decompress(cfg, packed), v)


def test_decompress_takes_bytes_only():
    # Integers past a byte and floats were cast to uint8 (384 read as 128) without a word.
    cfg = config((1, mtht.Fp16Compressor()))
    packed = compress(cfg, np.array([[1.0]], np.float32))
    assert decompress(cfg, packed.astype(np.int64)).tolist() == [[1.0]]  # bytes held in wider ints
    for bad in (np.array([[0, 384]], np.int64), np.array([[0, -1]], np.int16), packed.astype(np.float32)):
        with pytest.raises(TypeError, match="bytes"):
            decompress(cfg, bad)


def test_compress_takes_numbers_only():
    # Bools, strings and complex values were cast to float32 (the imaginary part dropped).
    cfg = config((2, mtht.Fp32Compressor()))
    assert decompress(cfg, compress(cfg, np.array([[1, -2]], np.int16))).tolist() == [[1.0, -2.0]]
    for bad in (np.array([[True, False]]), np.array([["1.5", "2"]]), np.array([[1 + 5j, 2 + 0j]])):
        with pytest.raises(TypeError, match="values must be numbers"):
            compress(cfg, bad)


def test_fp16_round_trips_within_monolith_tolerance_and_rounds_to_nearest_even():
    cfg = config((3, mtht.Fp16Compressor()))
    v = np.array([[0.1, 0.2, 10000.0]], np.float32)
    back = decompress(cfg, compress(cfg, v))
    np.testing.assert_allclose(back, v, atol=1e-4)
    # 1 + 2^-11 lies halfway between two halves: nearest even is 1.0
    assert decompress(cfg, compress(cfg, np.array([[1 + 2**-11, 1 + 3 * 2**-11, 70000.0]], np.float32))).tolist() == \
        [[1.0, 1.001953125, np.inf]]


def test_combined_fp16_segments_use_their_own_dims():
    cfg = config((1, mtht.Fp16Compressor()), (2, mtht.Fp16Compressor()))
    assert decompress(cfg, compress(cfg, np.array([[1, 2, 3]], np.float32))).tolist() == [[1, 2, 3]]
    assert row_bytes(cfg) == 6


def test_one_bit_encodes_the_sign_of_its_forward_value():
    cfg = config((7, mtht.OneBitCompressor(amplitude=1.0)))
    v = np.array([[100, 0.1, 1e-5, 0, -1e-5, -0.1, -100]], np.float32)
    assert decompress(cfg, compress(cfg, v)).tolist() == [[1, 1, 1, -1, -1, -1, -1]]


def test_one_bit_decodes_to_plus_or_minus_its_amplitude():
    cfg = config((3, mtht.OneBitCompressor(amplitude=0.05)))
    v = np.array([[1.0, -1.0, 0.0]], np.float32)
    np.testing.assert_array_equal(decompress(cfg, compress(cfg, v)), np.float32([[0.05, -0.05, -0.05]]))


def test_fixed_r8_stores_step_counts():
    r = 5.0
    step = r / 128
    cfg = config((6, mtht.FixedR8Compressor(fixed_range=r)))
    v = np.array([[100, 0, 1.4 * step, -1.4 * step, 1.6 * step, np.nan]], np.float32)
    packed = compress(cfg, v)
    assert packed.view(np.int8).tolist() == [[127, 0, 1, -1, 2, 0]]
    np.testing.assert_allclose(decompress(cfg, packed), [[127 * step, 0, step, -step, 2 * step, 0]], rtol=1e-7)
    # Values near the float maximum clamp like any other, without a warning from NumPy.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        huge = np.array([[3.4e38, -3.4e38, np.inf, -np.inf, 0, 0]], np.float32)
        assert compress(cfg, huge).view(np.int8).tolist() == [[127, -128, 127, -128, 0, 0]]


def test_fixed_r8_rounds_ties_away_from_zero_as_the_table_reads_them():
    # Serving must read what training read: the table's fake-quantised lookup rounds a value
    # half way between two steps away from zero (as Monolith's FakeQuant), and so must the
    # export, at the tie exactly.
    import optimizer_reference as ref
    r = 5.0
    step = np.float32(r) / np.float32(128)
    ties = np.array([[0.5, -0.5, 2.5, -2.5, 126.5, -127.5]], np.float32) * step
    cfg = config((6, mtht.FixedR8Compressor(fixed_range=r)))
    assert compress(cfg, ties).view(np.int8).tolist() == [[1, -1, 3, -3, 127, -128]]
    t = mtht.hash_table_from_config(mtht.HashTableConfigInstance(cfg, [1.0]))
    t.assign([1], ties)
    np.testing.assert_array_equal(decompress(cfg, t.export_serving([1])), t.lookup([1]))
    np.testing.assert_array_equal(t.lookup([1]), ref.fake_quantize(ties, r))


def test_a_table_exports_its_rows_mixed_compressors():
    cfg = config((2, mtht.Fp32Compressor()), (2, mtht.Fp16Compressor()), (2, mtht.FixedR8Compressor()))
    t = mtht.hash_table_from_config(mtht.HashTableConfigInstance(cfg, [1.0, 1.0, 1.0]))
    rows = np.array([[0.5, -0.25, 0.1, 3.0, 0.3, -0.7]], np.float32)
    t.assign([42], rows)
    packed = t.export_serving([42, 7])
    assert packed.shape == (2, 2 * 4 + 2 * 2 + 2)
    back = decompress(cfg, packed)
    assert back[0, :2].tolist() == [0.5, -0.25]
    np.testing.assert_allclose(back[0, 2:4], rows[0, 2:4].astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(back[0, 4:], np.round(rows[0, 4:] * 128) / 128, atol=1e-7)
    assert back[1].tolist() == [0] * 6


def test_bad_shapes_raise():
    cfg = config((3, mtht.Fp32Compressor()))
    with pytest.raises(ValueError, match="shape"):
        compress(cfg, np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match="shape"):
        decompress(cfg, np.zeros((1, 5), np.uint8))


def test_an_export_of_many_blocks_packs_every_row_as_one_call_of_compress():
    # The table packs 65,536 ids at a time: rows on both sides of each block's edge, ids
    # absent, and the last block short, against the assigned values packed at once.
    cfg = config((3, mtht.Fp32Compressor()), (2, mtht.Fp16Compressor()), (4, mtht.FixedR8Compressor()),
                 (2, mtht.OneBitCompressor()))
    t = mtht.hash_table_from_config(mtht.HashTableConfigInstance(cfg, [1.0] * 4))
    rng = np.random.default_rng(5)
    stored = np.arange(150_000) * 3
    values = rng.uniform(-2, 2, (stored.size, 11)).astype(np.float32)
    t.assign(stored, values)
    ids = np.concatenate([stored, stored[:20_000] + 1])[rng.permutation(170_000)]
    expected_values = np.zeros((ids.size, 11), np.float32)
    present = ids % 3 == 0
    expected_values[present] = values[ids[present] // 3]
    assert np.array_equal(t.export_serving(ids), compress(cfg, expected_values))
    assert t.export_serving(ids[:0]).shape == (0, row_bytes(cfg))


def test_the_helpers_take_a_tables_config_as_it_holds_it():
    cfg = config((2, mtht.FixedR8Compressor()), (2, mtht.OneBitCompressor()))
    t = mtht.hash_table_from_config(mtht.HashTableConfigInstance(cfg, [0.1, 0.1]))
    t.assign([1], [[0.5, -0.25, 1.0, -1.0]])
    packed = t.export_serving([1])
    assert row_bytes(t.config) == row_bytes(cfg) == 4
    amplitude = np.float32(mtht.OneBitCompressor().amplitude)
    assert decompress(t.config, packed).tolist() == decompress(cfg, packed).tolist() == [
        [0.5, -0.25, amplitude, -amplitude]]
    assert np.array_equal(compress(t.config, [[0.5, -0.25, 1.0, -1.0]]), packed)
    with pytest.raises(TypeError, match="HashTableConfigInstance"):
        row_bytes(cfg.entry_config)
    with pytest.raises(ValueError, match="one scale per segment"):
        compress(cfg, np.ones((1, 4), np.float32), hashnet_scales=[2.0])
