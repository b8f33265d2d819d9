# Declarations of the C++ core (include/mtht); no logic here.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libcpp.pair cimport pair
from libcpp cimport bool as cbool
from libcpp.string cimport string
from libcpp.vector cimport vector


cdef extern from "<chrono>" namespace "std::chrono" nogil:
    cdef cppclass nanoseconds:
        nanoseconds(int64_t)


cdef extern from "_translate_errors.h":
    cdef void translate_exception()


cdef extern from "mtht/spec.h" namespace "mtht" nogil:
    cdef cppclass OptParams:
        float initial_accumulator_value
        float weight_decay_factor
        float beta
        float beta1
        float beta2
        float epsilon
        float l1
        float l2
        float momentum
        float averaging_ratio
        cbool use_nesterov
        cbool decouple_weight_decay

    cdef cppclass SegmentSpec:
        SegmentSpec()
        int dim
        int init
        float init_a
        float init_b
        int opt
        OptParams opt_params
        cbool stochastic_rounding_fp16
        int retriever
        float fake_quant_range
        int64_t hashnet_step_size
        float hashnet_init_scale
        float hashnet_max_scale
        float hashnet_amplitude

    cdef cppclass TableSpec:
        vector[SegmentSpec] segments
        uint64_t random_seed
        cbool allow_non_finite
        int value_format
        uint64_t initial_capacity
        int num_shards
        uint64_t initial_shards
        uint32_t max_load_permille
        uint64_t max_entries
        uint64_t max_bytes
        int eviction_policy
        uint32_t default_expire_days
        vector[pair[uint32_t, uint32_t]] slot_expire_days
        cbool has_filter
        uint32_t default_occurrence_threshold
        vector[pair[uint32_t, uint32_t]] slot_occurrence_thresholds
        uint64_t filter_capacity


cdef extern from "mtht/thread_pool.h" namespace "mtht" nogil:
    const int MAX_THREADS "mtht::ThreadPool::kMaxThreads"

    cdef cppclass ThreadPool:
        @staticmethod
        ThreadPool& global_ "global"() except +translate_exception
        @staticmethod
        int default_threads()
        @staticmethod
        int named_threads()
        int num_threads()
        void set_num_threads(int n) except +translate_exception


cdef extern from "mtht/cgroup_limits.h" namespace "mtht" nogil:
    int cgroup_cpu_limit()
    int64_t cgroup_memory_limit()


cdef extern from "mtht/cpu.h" namespace "mtht" nogil:
    string cpu_isas()
    string kernel_names() except +translate_exception
    string active_kernel() except +translate_exception


cdef extern from "mtht/table.h" namespace "mtht" nogil:
    cdef cppclass TableStats:
        uint64_t size
        uint64_t capacity
        uint64_t index_bytes
        uint64_t row_bytes
        uint64_t rows_allocated
        uint64_t row_stride
        uint64_t num_shards
        uint64_t max_probe_groups
        uint64_t evictions
        uint64_t rows_in_use
        uint64_t read_block
        uint64_t fetches_ahead
        uint64_t write_block
        uint64_t timestamps_apart
        uint64_t filter_counts
        uint64_t filter_bytes
        uint64_t filter_forgotten

    cdef cppclass EmbeddingTable:
        EmbeddingTable(const TableSpec& spec) except +translate_exception
        const char* kernel_name()
        uint64_t max_entries()
        int dim()
        int state_dim()
        int num_segments()
        int num_shards()
        void pin_layout()
        void hold_writes() nogil
        cbool try_hold_writes_for(nanoseconds) nogil
        void release_writes() nogil
        pair[size_t, size_t] shards_of_part(size_t part, size_t parts)
        void unpin_layout()
        int64_t max_update_ts()
        uint64_t size() except +translate_exception
        size_t stored_ids(int64_t* out, size_t capacity) except +translate_exception
        TableStats stats(cbool probe_lengths) except +translate_exception
        void lookup(const int64_t* ids, size_t n, float* out) except +translate_exception
        void contains(const int64_t* ids, size_t n, uint8_t* out) except +translate_exception
        void lookup_entries(const int64_t* ids, size_t n, float* values, float* state,
                            int64_t* ts, uint8_t* found) except +translate_exception
        void assign(const int64_t* ids, size_t n, const float* values, int64_t ts) except +translate_exception
        void assign_add(const int64_t* ids, size_t n, const float* values, int64_t ts) except +translate_exception
        void apply_gradients(const int64_t* ids, size_t n, const float* grads, const float* lrs,
                             size_t n_lrs, int64_t global_step, int64_t ts, cbool dedup) except +translate_exception
        void reinitialize(const int64_t* ids, size_t n, int64_t ts, int32_t* status) except +translate_exception
        uint64_t evict(int64_t max_update_time) except +translate_exception
        void check_finite(const float* v, size_t count, const char* what) except +translate_exception
        void load_entries(const int64_t* ids, const int64_t* ts, const float* data, size_t n) except +translate_exception
        cbool expired(int64_t id, int64_t ts, int64_t now)
        void set_max_update_ts(int64_t ts)
        cbool has_filter()
        float hashnet_scale_of(size_t segment)
        void set_hashnet_scale(size_t segment, float v)
        void advance_hashnet_scales(int64_t global_step)


cdef extern from "mtht/multi_table.h" namespace "mtht" nogil:
    cdef cppclass TableRead:
        const EmbeddingTable* table
        const int64_t* ids
        size_t n
        float* out

    void c_lookup_tables "mtht::lookup_tables"(const vector[TableRead]& parts) except +translate_exception

    cdef enum class WriteKind "mtht::WriteKind":
        kAssign
        kAssignAdd
        kApplyGradients

    cdef cppclass TablePart:
        EmbeddingTable* table
        WriteKind kind
        const int64_t* ids
        size_t n
        const float* rows
        const float* lrs
        size_t n_lrs

    void c_write_tables "mtht::write_tables"(const vector[TablePart]& parts, int64_t global_step, int64_t ts,
                                             cbool dedup) except +translate_exception


cdef extern from "mtht/route.h" namespace "mtht" nogil:
    size_t c_route_ids "mtht::route_ids"(const int64_t* ids, size_t n, int64_t world, cbool dedup, int64_t* sent,
                                         int64_t* counts, int64_t* position) except +translate_exception
    void c_route_tables "mtht::route_tables"(const int64_t* const* ids, const size_t* n, const uint8_t* dedup,
                                             size_t k, int64_t world, int64_t* sent, int64_t* position,
                                             int64_t* counts, int64_t* sent_of) except +translate_exception
    cbool c_sum_rows_to "mtht::sum_rows_to"(const float* rows, size_t n, size_t dim, const int64_t* position,
                                            size_t m, float* out) except +translate_exception
    void c_gather_tables "mtht::gather_tables"(const float* flat, size_t flat_floats, const size_t* dims,
                                               const int64_t* block_start, const int64_t* counts, size_t world,
                                               const int64_t* const* positions, const size_t* n, size_t k,
                                               float* const* outs) except +translate_exception


cdef extern from "mtht/fused.h" namespace "mtht" nogil:
    cdef cppclass FusedLayout:
        size_t num_tables
        size_t num_shards
        vector[int32_t] id_offsets
        vector[int32_t] emb_offsets
        vector[int32_t] recv_splits

    FusedLayout fused_layout(const vector[int]& dims, const int32_t* fss, size_t n_fss, int64_t num_shards,
                             size_t n_ids) except +translate_exception
    void c_fused_lookup "mtht::fused_lookup"(const vector[const EmbeddingTable*]& tables, const FusedLayout& layout,
                        const int64_t* ids, float* embeddings) except +translate_exception
    void c_fused_apply_gradients "mtht::fused_apply_gradients"(const vector[EmbeddingTable*]& tables, const FusedLayout& layout,
                               const int64_t* ids, const float* grads, size_t n_grads, const float* lrs,
                               size_t n_lrs, int64_t global_step, int64_t ts,
                               const vector[uint8_t]& accumulate) except +translate_exception


cdef extern from "mtht/checkpoint.h" namespace "mtht" nogil:
    cdef cppclass CheckpointFileInfo:
        uint64_t entries
        uint64_t filter_entries
        uint64_t bytes
        uint64_t checksum

    vector[CheckpointFileInfo] save_checkpoint(const EmbeddingTable& table, const vector[string]& paths,
                                               int64_t max_update_ts, cbool apply_expiry,
                                               const string& layout) except +translate_exception
    cdef cppclass OwnedIds:
        int64_t parts
        int64_t part
    vector[CheckpointFileInfo] load_checkpoint(EmbeddingTable& into, const vector[string]& paths,
                                               const string& layout, cbool fit_counts,
                                               const OwnedIds& owned) except +translate_exception


cdef extern from "mtht/monolith_format.h" namespace "mtht::monolith" nogil:
    cdef cppclass MonolithFormat "mtht::monolith::EntryFormat":
        uint32_t dim
        uint32_t state_dim
        void add_member(uint32_t number, const string& name) except +translate_exception
        void add_dump(uint32_t member) except +translate_exception
        void add_field(uint32_t number, int type, uint32_t words, const string& name) except +translate_exception

    cdef cppclass MonolithLoadInfo "mtht::monolith::LoadInfo":
        uint64_t entries
        int64_t max_update_ts

    vector[uint64_t] monolith_save "mtht::monolith::save"(const EmbeddingTable& table, const vector[string]& paths,
                                                         int64_t now, const MonolithFormat& format) except +translate_exception
    vector[MonolithLoadInfo] monolith_load "mtht::monolith::load"(EmbeddingTable& into, const vector[string]& paths,
                                                                 const MonolithFormat& format,
                                                                 int max_threads) except +translate_exception


cdef extern from "mtht/crc32c.h" namespace "mtht" nogil:
    uint32_t c_crc32c "mtht::crc32c"(const void* data, size_t n)


cdef extern from "mtht/probe.h" namespace "mtht" nogil:
    cdef cppclass ProbeResult:
        double reads_per_s
        uint64_t checksum

    ProbeResult random_read_probe(size_t buffer_bytes, size_t reads_per_thread, int threads) except +translate_exception
