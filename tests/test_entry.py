"""Tests of the configuration builders and the merge key (mtht.entry)."""

import copy
import inspect

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtht import entry
from mtht.entry import (
    AdadeltaOptimizer,
    AdaGradWithGroupLassoOptimizer,
    AdagradOptimizer,
    AdamOptimizer,
    AmsgradOptimizer,
    BatchSoftmaxInitializer,
    BatchSoftmaxOptimizer,
    CombineAsSegment,
    ConstantsInitializer,
    CuckooHashTableConfig,
    DynamicWdAdagradOptimizer,
    EmbeddingHashTableConfig,
    EntryConfig,
    FixedR8Compressor,
    Fp16Compressor,
    Fp32Compressor,
    FtrlOptimizer,
    FTRLWithGroupSparsityOptimizer,
    HashTableConfigInstance,
    MomentumOptimizer,
    MovingAverageOptimizer,
    OneBitCompressor,
    OnesInitializer,
    RandomUniformInitializer,
    RmspropOptimizer,
    RmspropV2Optimizer,
    Segment,
    SgdOptimizer,
    SlotExpireTimeConfig,
    StochasticRoundingFloat16OptimizerWrapper,
    ZerosInitializer,
)
from mtht.hash_table_utils import infer_dim_size
from mtht.learning_rate_functions import PolynomialDecay
from mtht.testing import generate_test_hash_table_config


def f32(x):
    return float(np.float32(x))


def table(*segments, **kwargs):
    if not segments:
        segments = (CombineAsSegment(2, ZerosInitializer(), SgdOptimizer(),
                                     Fp32Compressor()),)
    return EmbeddingHashTableConfig(
        entry_config=EntryConfig(segments=list(segments)), **kwargs
    )


def key(table_config=None, fns=(1.0,), **kwargs):
    if table_config is None:
        table_config = table()
    return str(HashTableConfigInstance(table_config, list(fns), **kwargs))


# --------------------------------------------------------------------------
# Builders: defaults, kinds, params
# --------------------------------------------------------------------------

# kind, builder, expected params() with Monolith's defaults
OPTIMIZER_DEFAULTS = [
    ("sgd", SgdOptimizer, {"learning_rate": 0.01, "warmup_steps": 0}),
    ("adagrad", AdagradOptimizer, {
        "learning_rate": 0.001, "initial_accumulator_value": 0.1,
        "hessian_compression_times": 1, "weight_decay_factor": 0.0,
        "warmup_steps": 0}),
    ("adadelta", AdadeltaOptimizer, {
        "learning_rate": 0.01, "weight_decay_factor": 0.0,
        "averaging_ratio": 0.9, "epsilon": 0.01, "warmup_steps": 0}),
    ("adam", AdamOptimizer, {
        "learning_rate": 0.01, "beta1": 0.9, "beta2": 0.99,
        "use_beta1_warmup": False, "weight_decay_factor": 0.0,
        "use_nesterov": False, "epsilon": 0.01, "warmup_steps": 0}),
    ("amsgrad", AmsgradOptimizer, {
        "learning_rate": 0.01, "beta1": 0.9, "beta2": 0.99,
        "weight_decay_factor": 0.0, "use_nesterov": False, "epsilon": 0.01,
        "warmup_steps": 0}),
    ("ftrl", FtrlOptimizer, {
        "learning_rate": 0.01, "beta": 0.0, "initial_accumulator_value": 0.1,
        "l1_regularization_strength": 0.0, "l2_regularization_strength": 0.0,
        "warmup_steps": 0}),
    ("momentum", MomentumOptimizer, {
        "learning_rate": 0.01, "weight_decay_factor": 0.0,
        "use_nesterov": False, "momentum": 0.9, "warmup_steps": 0}),
    ("moving_average", MovingAverageOptimizer, {"momentum": 0.9}),
    ("rmsprop", RmspropOptimizer, {
        "learning_rate": 0.01, "weight_decay_factor": 0.0, "momentum": 0.9}),
    ("rmspropv2", RmspropV2Optimizer, {
        "learning_rate": 0.01, "weight_decay_factor": 0.0, "momentum": 0.9}),
    ("batch_softmax", BatchSoftmaxOptimizer, {"learning_rate": 0.1}),
    ("group_adagrad", AdaGradWithGroupLassoOptimizer, {
        "learning_rate": 0.01, "beta": 0.0, "initial_accumulator_value": 0.1,
        "l2_regularization_strength": 0.0, "weight_decay_factor": 0.0,
        "warmup_steps": 0}),
    ("dynamic_wd_adagrad", DynamicWdAdagradOptimizer, {
        "learning_rate": 0.001, "initial_accumulator_value": 0.1,
        "hessian_compression_times": 1, "weight_decay_factor": 0.0,
        "warmup_steps": 0, "decouple_weight_decay": True,
        "enable_dynamic_wd": True, "dynamic_wd_temperature": 1.0,
        "flip_direction": True}),
    ("group_ftrl", FTRLWithGroupSparsityOptimizer, {
        "learning_rate": 0.01, "beta": 1.0, "initial_accumulator_value": 0.0,
        "l1_regularization_strength": 0.0, "l2_regularization_strength": 0.0,
        "warmup_steps": 0}),
]


@pytest.mark.parametrize("kind, builder, expected", OPTIMIZER_DEFAULTS,
                         ids=[k for k, _, _ in OPTIMIZER_DEFAULTS])
def test_optimizer_defaults(kind, builder, expected):
    opt = builder()
    assert opt.kind == kind
    assert opt.stochastic_rounding_float16 is False
    params = opt.params()
    assert set(params) == set(expected)
    for name, value in expected.items():
        got = params[name]
        assert type(got) is type(value), name
        if isinstance(value, float):
            assert got == f32(value), name
        else:
            assert got == value, name
    # params() is a fresh dict every time
    params["learning_rate" if "learning_rate" in params else "momentum"] = 5
    assert opt.params() == builder().params()
    # every builder has an evaluable repr
    assert eval(repr(opt), vars(entry)) == opt


def test_adagrad_initial_accumulator_falls_back_to_proto_default():
    assert AdagradOptimizer().params()["initial_accumulator_value"] == f32(0.1)
    assert AdagradOptimizer(initial_accumulator_value=0.5).params()[
        "initial_accumulator_value"] == 0.5


def test_monolith_argument_names_map_to_proto_fields():
    opt = FtrlOptimizer(l1_regularization=0.5, l2_regularization=2,
                        beta=1.0, initial_accumulator_value=0.2)
    params = opt.params()
    assert params["l1_regularization_strength"] == 0.5
    assert params["l2_regularization_strength"] == 2.0
    assert params["beta"] == 1.0
    assert opt.l1_regularization_strength == 0.5
    group = AdaGradWithGroupLassoOptimizer(l2_regularization=3)
    assert group.params()["l2_regularization_strength"] == 3.0
    assert isinstance(group.params()["l2_regularization_strength"], float)
    sparse = FTRLWithGroupSparsityOptimizer(l1_regularization=1)
    assert sparse.params()["l1_regularization_strength"] == 1.0


def test_stochastic_rounding_wrapper():
    inner = AdamOptimizer(beta1=0.5)
    wrapped = StochasticRoundingFloat16OptimizerWrapper(inner)
    assert wrapped.kind == "adam"
    assert wrapped.params() == inner.params()
    assert wrapped.stochastic_rounding_float16 is True
    assert wrapped.optimizer is inner
    assert isinstance(wrapped, entry.Optimizer)
    twice = StochasticRoundingFloat16OptimizerWrapper(wrapped)
    assert twice.optimizer is inner
    assert twice == wrapped
    assert wrapped != inner
    assert eval(repr(wrapped), vars(entry)) == wrapped
    with pytest.raises(TypeError):
        StochasticRoundingFloat16OptimizerWrapper(ZerosInitializer())


def test_initializers():
    assert (ZerosInitializer().kind, ZerosInitializer().params()) == ("zeros", {})
    assert (OnesInitializer().kind, OnesInitializer().params()) == ("ones", {})
    const = ConstantsInitializer(0.3)
    assert (const.kind, const.params()) == ("constants", {"constant": f32(0.3)})
    uniform = RandomUniformInitializer()
    assert uniform.kind == "random_uniform"
    assert uniform.params() == {"minval": f32(-0.05), "maxval": f32(0.05)}
    assert RandomUniformInitializer(None, None) == uniform
    assert RandomUniformInitializer(-1, 2).params() == {"minval": -1.0,
                                                        "maxval": 2.0}
    batch = BatchSoftmaxInitializer(5)
    assert (batch.kind, batch.params()) == ("constants", {"constant": 5.0})
    assert batch == ConstantsInitializer(5.0)
    assert batch.init_step_interval == 5
    for builder in (ZerosInitializer(), OnesInitializer(), const, uniform,
                    batch):
        assert eval(repr(builder), vars(entry)) == builder


def test_initializer_validation():
    with pytest.raises(ValueError, match=r"init_step_interval should be >= 1, while got 0.5"):
        BatchSoftmaxInitializer(0.5)
    with pytest.raises(ValueError):
        RandomUniformInitializer(1.0, -1.0)
    with pytest.raises(ValueError):
        ConstantsInitializer(float("nan"))
    with pytest.raises(ValueError):
        ConstantsInitializer("1")


def test_compressors():
    assert (Fp32Compressor().kind, Fp32Compressor().params()) == ("fp32", {})
    assert (Fp16Compressor().kind, Fp16Compressor().params()) == ("fp16", {})
    r8 = FixedR8Compressor()
    assert (r8.kind, r8.params(), r8.r) == ("fixed_r8", {"r": 1.0}, 1.0)
    assert FixedR8Compressor(5).params() == {"r": 5.0}
    one_bit = OneBitCompressor()
    assert one_bit.kind == "one_bit"
    assert one_bit.params() == {"step_size": 200, "init_scale": 1.0,
                                "max_scale": 10000.0, "amplitude": f32(0.05)}
    assert OneBitCompressor(1000, 0.1).params()["step_size"] == 1000
    for builder in (Fp32Compressor(), Fp16Compressor(), r8, one_bit):
        assert eval(repr(builder), vars(entry)) == builder
    with pytest.raises(ValueError):
        FixedR8Compressor(0)
    with pytest.raises(ValueError, match="step"):  # r / 128 is 0 in float32: lookups read 0 / 0
        FixedR8Compressor(1e-45)
    assert FixedR8Compressor(1e-30).r == 1e-30
    with pytest.raises(ValueError):
        OneBitCompressor(step_size=0)
    with pytest.raises(ValueError):
        OneBitCompressor(amplitude=float("inf"))


def test_builders_of_different_families_are_not_equal():
    assert ZerosInitializer() != Fp32Compressor()
    assert SgdOptimizer() != ZerosInitializer()
    assert SgdOptimizer() == SgdOptimizer(learning_rate=0.01)
    assert hash(SgdOptimizer()) == hash(SgdOptimizer(learning_rate=0.01))


@pytest.mark.parametrize(
    "make",
    [
        lambda: SgdOptimizer(learning_rate="0.1"),
        lambda: SgdOptimizer(learning_rate=float("nan")),
        lambda: SgdOptimizer(learning_rate=1e39),  # inf in float32
        lambda: SgdOptimizer(learning_rate=True),
        lambda: AdagradOptimizer(initial_accumulator_value=-0.1),
        # 0 in a step's denominator: a zero gradient would step by 0 / 0 (NaN)
        lambda: AdagradOptimizer(initial_accumulator_value=0.0),
        lambda: AdagradOptimizer(initial_accumulator_value=1e-50),  # 0 in float32
        lambda: DynamicWdAdagradOptimizer(initial_accumulator_value=0),
        lambda: AdamOptimizer(epsilon=0.0),
        lambda: AmsgradOptimizer(epsilon=0),
        lambda: AdadeltaOptimizer(epsilon=0.0),
        lambda: AdagradOptimizer(warmup_steps=-1),
        lambda: AdagradOptimizer(hessian_compression_times=1.5),
        lambda: AdamOptimizer(beta1=1.0),
        lambda: AdamOptimizer(beta2=-0.1),
        lambda: AdamOptimizer(use_nesterov="no"),
        lambda: AdamOptimizer(epsilon=-1.0),
        lambda: AmsgradOptimizer(beta1=0.999999999),  # 1.0 in float32
        lambda: AdadeltaOptimizer(averaging_ratio=1.5),
        lambda: FtrlOptimizer(l1_regularization=-1.0),
        lambda: MomentumOptimizer(momentum=-0.5),
        lambda: MovingAverageOptimizer(momentum=2.0),
        lambda: RmspropOptimizer(weight_decay_factor=-1.0),
        lambda: DynamicWdAdagradOptimizer(decouple_weight_decay=1),
    ],
)
def test_optimizer_validation(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("make, change", [
    (AdagradOptimizer, lambda b: setattr(b, "initial_accumulator_value", 0.0)),  # 0 / 0 on a zero gradient
    (AdamOptimizer, lambda b: setattr(b, "beta1", 1.0)),
    (FtrlOptimizer, lambda b: setattr(b, "l1_regularization_strength", -1.0)),
    (SgdOptimizer, lambda b: setattr(b, "learning_rate", float("nan"))),
    (lambda: StochasticRoundingFloat16OptimizerWrapper(AdamOptimizer()), lambda b: setattr(b.optimizer, "epsilon", 0.0)),
    (RandomUniformInitializer, lambda b: setattr(b, "minval", 1.0)),  # above maxval
    (lambda: BatchSoftmaxInitializer(2.0), lambda b: setattr(b, "constant", 0.5)),
    (FixedR8Compressor, lambda b: setattr(b, "r", 0.0)),
    (OneBitCompressor, lambda b: setattr(b, "step_size", 0)),
])
def test_a_setting_changed_after_a_builder_was_made_is_checked_with_the_config(make, change):
    builder = make()
    segment = CombineAsSegment(1, ZerosInitializer(), SgdOptimizer(), Fp32Compressor())
    field = {entry.Optimizer: "optimizer", entry.Initializer: "initializer", entry.Compressor: "compressor"}
    setattr(segment, next(name for base, name in field.items() if isinstance(builder, base)), builder)
    config = HashTableConfigInstance(table(segment), [0.1])
    config.validate()
    change(builder)
    with pytest.raises(ValueError):
        builder.validate()
    with pytest.raises(ValueError):
        config.validate()  # as a table built from it does


def test_every_builder_checks_every_constructor_argument_again():
    """``validate`` rebuilds a builder from its ``_ARGS``: they must name every argument of its
    constructor, and the rebuilt builder must equal it."""
    builders = [cls for cls in vars(entry).values()
                if isinstance(cls, type) and issubclass(cls, entry._Builder) and not cls.__name__.startswith("_")
                and cls not in (entry.Optimizer, entry.Initializer, entry.Compressor)]
    assert len(builders) >= 24
    for cls in builders:
        init = cls.__init__
        params = [] if init is object.__init__ else [p for p in inspect.signature(init).parameters if p != "self"]
        assert [arg for arg, _ in cls._ARGS] == params, cls.__name__
        if cls is StochasticRoundingFloat16OptimizerWrapper:
            made = cls(AdagradOptimizer(initial_accumulator_value=0.5))
        elif cls in (ConstantsInitializer, BatchSoftmaxInitializer):
            made = cls(3.0)
        else:
            made = cls()
        made.validate()
        assert type(made)(**{arg: getattr(made, attr) for arg, attr in cls._ARGS}) == made, cls.__name__


# --------------------------------------------------------------------------
# Segments and table configs
# --------------------------------------------------------------------------


def test_combine_as_segment():
    seg = CombineAsSegment(np.int64(3), ZerosInitializer(), SgdOptimizer(),
                           Fp16Compressor())
    assert isinstance(seg, Segment)
    assert seg.dim_size == 3 and type(seg.dim_size) is int
    assert seg.compressor == Fp16Compressor()
    assert CombineAsSegment(1, ZerosInitializer(), SgdOptimizer(),
                            None).compressor == Fp32Compressor()
    assert CombineAsSegment(1, ZerosInitializer(),
                            SgdOptimizer()).compressor == Fp32Compressor()


@pytest.mark.parametrize("dim", [0, -1, True, 1.5, 2.0, "2", None])
def test_segment_dim_validation(dim):
    with pytest.raises(ValueError):
        CombineAsSegment(dim, ZerosInitializer(), SgdOptimizer(),
                         Fp32Compressor())


def test_segment_builder_types():
    with pytest.raises(TypeError):
        CombineAsSegment(2, SgdOptimizer(), SgdOptimizer(), Fp32Compressor())
    with pytest.raises(TypeError):
        CombineAsSegment(2, ZerosInitializer(), ZerosInitializer(),
                         Fp32Compressor())
    with pytest.raises(TypeError):
        CombineAsSegment(2, ZerosInitializer(), SgdOptimizer(), "fp32")
    with pytest.raises(ValueError):
        CombineAsSegment(2, BatchSoftmaxInitializer(1),
                         BatchSoftmaxOptimizer(), Fp32Compressor())
    CombineAsSegment(1, BatchSoftmaxInitializer(1), BatchSoftmaxOptimizer(),
                     Fp32Compressor())


def test_table_config_defaults_and_validation():
    config = table()
    assert config.initial_capacity == 1
    assert config.slot_expire_time_config == SlotExpireTimeConfig()
    assert config.slot_expire_time_config.default_expire_time == 36500
    assert config.enable_feature_eviction is False
    assert config.feature_evict_every_n_hours == 240
    assert config.random_seed == 0
    assert config.max_entries is None
    assert config.eviction_policy == "lru"
    assert config.allow_non_finite is False
    with pytest.raises(ValueError, match="empty segments"):
        EmbeddingHashTableConfig(entry_config=EntryConfig(segments=[]))
    with pytest.raises(ValueError, match="empty segments"):
        EmbeddingHashTableConfig()
    bad = [
        dict(initial_capacity=-1),
        dict(max_entries=0),
        dict(eviction_policy="fifo"),
        dict(feature_evict_every_n_hours=0),
        dict(random_seed=-1),
        dict(random_seed=2**64),
        dict(random_seed=True),
        dict(random_seed=1.0),
        dict(enable_feature_eviction=1),
        dict(allow_non_finite="yes"),
        # past int64: the core could not take them
        dict(initial_capacity=2**64 - 1),
        dict(max_entries=2**63),
        dict(max_entries=10**30),
        dict(max_bytes=2**64),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            table(**kwargs)
    assert table(random_seed=2**64 - 1, max_entries=np.int32(5)).max_entries == 5
    with pytest.raises(TypeError):
        EmbeddingHashTableConfig(entry_config=[])
    with pytest.raises(TypeError):
        EntryConfig(segments=[1])


def test_configs_do_not_share_mutable_defaults():
    a, b = table(), table()
    assert a.slot_expire_time_config is not b.slot_expire_time_config
    assert (a.slot_expire_time_config.slot_expire_times
            is not b.slot_expire_time_config.slot_expire_times)
    assert EntryConfig().segments is not EntryConfig().segments
    segments = [CombineAsSegment(1, ZerosInitializer(), SgdOptimizer())]
    config = EntryConfig(segments=segments)
    segments.append(None)
    assert len(config.segments) == 1
    slots = {1: 3}
    expiry = SlotExpireTimeConfig(slot_expire_times=slots)
    slots[2] = 4
    assert expiry.slot_expire_times == {1: 3}


def test_slot_expire_time_config():
    expiry = SlotExpireTimeConfig(default_expire_time=7,
                                  slot_expire_times=[(1, 2), (3, 0)])
    assert expiry.slot_expire_times == {1: 2, 3: 0}
    assert expiry.expire_time(1) == 2 and expiry.expire_time(5) == 7
    for kwargs in (
        dict(slot_expire_times={32768: 1}),
        dict(slot_expire_times={-1: 1}),
        dict(slot_expire_times={1: -1}),
        dict(slot_expire_times={1.0: 1}),
        dict(default_expire_time=-1),
    ):
        with pytest.raises(ValueError):
            SlotExpireTimeConfig(**kwargs)
    SlotExpireTimeConfig(slot_expire_times={0: 0, 32767: 10})


def test_infer_dim_size_and_segments():
    config = table(
        CombineAsSegment(3, ZerosInitializer(), SgdOptimizer(), Fp32Compressor()),
        CombineAsSegment(5, OnesInitializer(), AdagradOptimizer(),
                         Fp16Compressor()),
    )
    assert infer_dim_size(config) == 8
    assert [s.dim_size for s in config.segments] == [3, 5]


def test_cuckoo_hash_table_config_mutates_the_table():
    config = table()
    CuckooHashTableConfig(initial_capacity=100).mutate_table(config)
    assert config.initial_capacity == 100
    assert config.enable_feature_eviction is False
    CuckooHashTableConfig(feature_evict_every_n_hours=5).mutate_table(config)
    assert config.enable_feature_eviction is True
    assert config.feature_evict_every_n_hours == 5


# --------------------------------------------------------------------------
# HashTableConfigInstance
# --------------------------------------------------------------------------


def test_generate_test_hash_table_config():
    config = generate_test_hash_table_config(3, learning_rate=0.5)
    (segment,) = config.table_config.entry_config.segments
    assert segment.dim_size == 3
    assert segment.initializer == ZerosInitializer()
    assert segment.optimizer == SgdOptimizer()
    assert segment.compressor == Fp32Compressor()
    assert config.learning_rate_fns == [0.5]
    assert config.extra_restore_names == []
    config.validate()
    fp16 = generate_test_hash_table_config(use_float16=True)
    optimizer = fp16.table_config.segments[0].optimizer
    assert optimizer.stochastic_rounding_float16 is True
    assert optimizer.kind == "sgd"
    assert str(fp16) != str(generate_test_hash_table_config())


def test_call_learning_rate_fns_accepts_every_form():
    class Callable:
        def __call__(self, step):
            return np.float64(0.5)

    fns = [
        0.5, 2, np.float32(0.25), np.array(0.125),
        PolynomialDecay(0.01, 10, 0.11),
        lambda: 0.1,
        lambda step: 0.01 * step,
        lambda step=3: step,
        Callable(),
    ]
    segments = [CombineAsSegment(1, ZerosInitializer(), SgdOptimizer())
                for _ in fns]
    config = HashTableConfigInstance(table(*segments), fns)
    config.validate()
    assert config.num_segments == len(fns)
    lrs = config.call_learning_rate_fns(np.int64(2))
    assert lrs.dtype == np.float32 and lrs.shape == (len(fns),)
    expected = np.array([0.5, 2, 0.25, 0.125, 0.03, 0.1, 0.02, 2, 0.5],
                        dtype=np.float32)
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    assert config.call_learning_rate_fns_fewer_ops(2) == [float(x) for x in lrs]
    assert config.call_learning_rate_fns()[4] == pytest.approx(0.01)


def test_constant_learning_rates_are_evaluated_once_and_handed_out_as_copies():
    segments = [CombineAsSegment(1, ZerosInitializer(), SgdOptimizer()) for _ in range(2)]
    config = HashTableConfigInstance(table(*segments), [0.5, np.float32(0.25)])
    for step in range(3):
        rates = config.call_learning_rate_fns(step)
        np.testing.assert_array_equal(rates, [0.5, 0.25])
        rates[:] = 99.0  # the caller's copy
    with pytest.raises(TypeError):
        config.call_learning_rate_fns(1.5)  # the step is still checked
    # A write takes the one evaluated array, read-only, so nothing can change it.
    shared = config.learning_rates(3)
    assert shared is config.learning_rates(4)
    np.testing.assert_array_equal(shared, [0.5, 0.25])
    with pytest.raises(ValueError):
        shared[0] = 99.0
    with pytest.raises(TypeError):
        config.learning_rates(1.5)
    # A 0-d array may be changed in place between steps, and is read at every call.
    rate = np.array(0.125)
    config = HashTableConfigInstance(table(*segments), [0.5, rate])
    np.testing.assert_array_equal(config.call_learning_rate_fns(0), [0.5, 0.125])
    rate[...] = 0.0625
    np.testing.assert_array_equal(config.call_learning_rate_fns(1), [0.5, 0.0625])
    np.testing.assert_array_equal(config.learning_rates(2), [0.5, 0.0625])
    rate[...] = 0.5
    np.testing.assert_array_equal(config.learning_rates(3), [0.5, 0.5])


def test_a_framework_tensor_rate_is_read_at_every_step_as_a_0d_array_is():
    torch = pytest.importorskip("torch")
    segments = [CombineAsSegment(1, ZerosInitializer(), SgdOptimizer()) for _ in range(3)]
    rate = torch.tensor(0.125)
    config = HashTableConfigInstance(
        table(*segments), [rate, torch.tensor(0.5, dtype=torch.bfloat16), lambda: torch.tensor(2.0)])
    np.testing.assert_array_equal(config.call_learning_rate_fns(0), [0.125, 0.5, 2.0])
    rate.fill_(0.0625)  # as a trainer changes its variable between steps
    np.testing.assert_array_equal(config.learning_rates(1), [0.0625, 0.5, 2.0])
    assert "array@" in str(config)  # keyed by identity: it may change after a merge
    for bad in (torch.tensor([0.1, 0.2]), torch.tensor(True)):
        with pytest.raises(TypeError, match=r"learning_rate_fns\[0\]"):
            HashTableConfigInstance(table(segments[0]), [bad])
    with pytest.raises(ValueError, match="finite"):
        HashTableConfigInstance(table(segments[0]), [torch.tensor(float("inf"))])


def test_learning_rate_fn_validation():
    tc = table()
    with pytest.raises(ValueError, match="must not be empty"):
        HashTableConfigInstance(tc, [])
    for value in (float("nan"), float("inf"), 1e39):
        with pytest.raises(ValueError):
            HashTableConfigInstance(tc, [value])
    with pytest.raises(TypeError):
        HashTableConfigInstance(tc, ["0.1"])
    with pytest.raises(TypeError):
        HashTableConfigInstance(tc, [True])
    with pytest.raises(TypeError):
        HashTableConfigInstance(tc, 0.1)
    with pytest.raises(TypeError):
        HashTableConfigInstance(tc, [lambda a, b: 0.1])
    with pytest.raises(TypeError):
        HashTableConfigInstance("config", [0.1])
    for bad, says in ((lambda: float("nan"), "not finite"), (lambda step: [0.1, 0.2], "scalar"),
                      (lambda: "x", "not a number"), (lambda: None, "not a number: None")):
        config = HashTableConfigInstance(tc, [bad])
        with pytest.raises(ValueError, match=says):
            config.call_learning_rate_fns(0)
    with pytest.raises(TypeError):
        HashTableConfigInstance(tc, [0.1]).call_learning_rate_fns(1.5)


def test_validate_checks_lengths():
    config = HashTableConfigInstance(table(), [0.1, 0.2])
    with pytest.raises(ValueError, match=r"^Size of learning_rate_fns and size "
                       r"of segments must be equal\.$"):
        config.validate()
    HashTableConfigInstance(table(), [0.1]).validate()


def test_properties_and_copies():
    names = ["old"]
    tc = table()
    config = HashTableConfigInstance(tc, [0.1], extra_restore_names=names)
    assert config.table_config is tc
    assert config.extra_restore_names == ["old"]
    names.append("x")
    assert config.extra_restore_names == ["old"]
    config.learning_rate_fns.append(5)
    assert config.learning_rate_fns == [0.1]

    clone = copy.copy(config)
    clone.extra_restore_names.append("new")
    assert config.extra_restore_names == ["old"]
    assert clone.extra_restore_names == ["old", "new"]
    assert clone.table_config is tc
    assert str(clone) == str(config)

    deep = copy.deepcopy(config)
    assert deep.table_config is not tc and str(deep) == str(config)
    config.extra_restore_names = ("a", "b")
    assert config.extra_restore_names == ["a", "b"]
    with pytest.raises(TypeError):
        HashTableConfigInstance(tc, [0.1], extra_restore_names="name")
    assert "HashTableConfigInstance(" in repr(config)


# --------------------------------------------------------------------------
# The merge key
# --------------------------------------------------------------------------


def test_merge_key_is_readable_and_canonical():
    text = key()
    assert text.startswith("TableConfig(")
    assert "sgd(" in text and "zeros()" in text and "fp32()" in text
    assert "learning_rate_fns=[1.0]" in text
    assert key() == key()


def test_pinned_monolith_equalities():
    assert key(fns=[0.1]) == key(fns=[0.1])
    decay_a = PolynomialDecay(0.01, 20, 0.05)
    decay_b = PolynomialDecay(0.01, 20, 0.05)
    assert key(fns=[decay_a]) == key(fns=[decay_b])
    assert key(fns=[0.1]) != key(fns=[decay_a])


def sgd_table(optimizer=None, initializer=None, compressor=None, dim=2,
              **kwargs):
    return table(
        CombineAsSegment(dim, initializer or ZerosInitializer(),
                         optimizer or SgdOptimizer(), compressor),
        **kwargs,
    )


@pytest.mark.parametrize(
    "a, b",
    [
        # int and float spellings of a learning rate
        (key(fns=[1]), key(fns=[1.0])),
        (key(fns=[np.float32(0.1)]), key(fns=[0.1])),
        (key(fns=[-0.0]), key(fns=[0.0])),
        # explicit defaults vs omitted ones
        (key(sgd_table(AdagradOptimizer())),
         key(sgd_table(AdagradOptimizer(initial_accumulator_value=0.1,
                                        learning_rate=0.001)))),
        (key(sgd_table(FtrlOptimizer())),
         key(sgd_table(FtrlOptimizer(beta=0, l1_regularization=0)))),
        (key(sgd_table(compressor=None)),
         key(sgd_table(compressor=Fp32Compressor()))),
        (key(sgd_table(initializer=RandomUniformInitializer())),
         key(sgd_table(initializer=RandomUniformInitializer(None, None)))),
        (key(sgd_table(initializer=BatchSoftmaxInitializer(3),
                       optimizer=BatchSoftmaxOptimizer(), dim=1)),
         key(sgd_table(initializer=ConstantsInitializer(3.0),
                       optimizer=BatchSoftmaxOptimizer(), dim=1))),
        # default slot expiry written explicitly
        (key(sgd_table(slot_expire_time_config=SlotExpireTimeConfig(
            slot_expire_times={3: 36500}))), key(sgd_table())),
        # wrapper applied twice
        (key(sgd_table(StochasticRoundingFloat16OptimizerWrapper(
            StochasticRoundingFloat16OptimizerWrapper(SgdOptimizer())))),
         key(sgd_table(StochasticRoundingFloat16OptimizerWrapper(
             SgdOptimizer())))),
        # excluded: extra_restore_names, initial_capacity, schedule name
        (key(extra_restore_names=["a"]), key()),
        (key(sgd_table(initial_capacity=1000)), key(sgd_table())),
        (key(fns=[PolynomialDecay(0.1, 10, name="a")]),
         key(fns=[PolynomialDecay(0.1, 10.0, name="b")])),
    ],
)
def test_merge_key_equalities(a, b):
    assert a == b


@pytest.mark.parametrize(
    "a, b",
    [
        (key(fns=[0.1]), key(fns=[0.2])),
        (key(sgd_table(dim=2)), key(sgd_table(dim=3))),
        (key(sgd_table(AdagradOptimizer())),
         key(sgd_table(AdagradOptimizer(initial_accumulator_value=0.2)))),
        (key(sgd_table(AdagradOptimizer())), key(sgd_table(SgdOptimizer()))),
        (key(sgd_table(SgdOptimizer())),
         key(sgd_table(StochasticRoundingFloat16OptimizerWrapper(
             SgdOptimizer())))),
        (key(sgd_table(RmspropOptimizer())), key(sgd_table(RmspropV2Optimizer()))),
        (key(sgd_table(initializer=ZerosInitializer())),
         key(sgd_table(initializer=OnesInitializer()))),
        (key(sgd_table(initializer=RandomUniformInitializer(-1, 1))),
         key(sgd_table(initializer=RandomUniformInitializer()))),
        (key(sgd_table(compressor=Fp16Compressor())), key(sgd_table())),
        (key(sgd_table(compressor=FixedR8Compressor(2))),
         key(sgd_table(compressor=FixedR8Compressor()))),
        (key(sgd_table(compressor=OneBitCompressor(100))),
         key(sgd_table(compressor=OneBitCompressor()))),
        (key(sgd_table(random_seed=1)), key(sgd_table())),
        (key(sgd_table(slot_expire_time_config=SlotExpireTimeConfig(
            slot_expire_times={3: 5}))), key(sgd_table())),
        (key(sgd_table(slot_expire_time_config=SlotExpireTimeConfig(1))),
         key(sgd_table())),
        (key(sgd_table(enable_feature_eviction=True)), key(sgd_table())),
        (key(sgd_table(feature_evict_every_n_hours=1)), key(sgd_table())),
        (key(sgd_table(max_entries=10)), key(sgd_table())),
        (key(sgd_table(eviction_policy="lfu")), key(sgd_table())),
        (key(sgd_table(allow_non_finite=True)), key(sgd_table())),
        (key(fns=[PolynomialDecay(0.1, 10)]),
         key(fns=[PolynomialDecay(0.1, 11)])),
    ],
)
def test_merge_key_inequalities(a, b):
    assert a != b


def test_merge_key_segment_order_matters():
    first = CombineAsSegment(1, ZerosInitializer(), SgdOptimizer())
    second = CombineAsSegment(2, OnesInitializer(), AdagradOptimizer())
    assert key(table(first, second), [0.1, 0.1]) != key(
        table(second, first), [0.1, 0.1])
    assert key(table(first, second), [0.1, 0.2]) != key(
        table(first, second), [0.2, 0.1])


def test_merge_key_of_plain_callables_is_identity():
    fn = lambda: 0.1  # noqa: E731
    other = lambda: 0.1  # noqa: E731
    assert key(fns=[fn]) == key(fns=[fn])
    assert key(fns=[fn]) != key(fns=[other])
    assert key(fns=[fn]) != key(fns=[0.1])


def test_merge_key_slot_order_is_canonical():
    a = SlotExpireTimeConfig(slot_expire_times={5: 1, 2: 3})
    b = SlotExpireTimeConfig(slot_expire_times={2: 3, 5: 1})
    assert key(sgd_table(slot_expire_time_config=a)) == key(
        sgd_table(slot_expire_time_config=b))


finite32 = st.floats(min_value=-1e30, max_value=1e30, allow_nan=False,
                     width=64)


@settings(max_examples=100, deadline=None)
@given(a=finite32, b=finite32)
def test_merge_key_compares_learning_rates_as_float32(a, b):
    same = np.float32(a) == np.float32(b)
    assert (key(fns=[a]) == key(fns=[b])) == bool(same)


@settings(max_examples=50, deadline=None)
@given(lr=finite32, eps=finite32.filter(lambda x: np.float32(x) > 0),
       seed=st.integers(min_value=0, max_value=2**64 - 1))
def test_merge_key_compares_optimizer_params_as_float32(lr, eps, seed):
    explicit = AdamOptimizer(learning_rate=lr, epsilon=eps)
    rounded = AdamOptimizer(learning_rate=np.float32(lr),
                            epsilon=float(np.float32(eps)))
    assert key(sgd_table(explicit, random_seed=seed)) == key(
        sgd_table(rounded, random_seed=seed))
