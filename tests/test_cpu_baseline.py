"""The C++ core on its own: built from the source tree without Python, every kernel set
gives the same numbers, and on an emulated CPU without AVX (when qemu-x86_64 is installed)
it runs the SSE2 kernels instead of crashing; the thread pool and the shards' lock keep
their contracts; the room a write reserves stays its own until it is done; CRC-32C gives the
same checksums by instruction and by table; the EntryDump codec gives entries back and
refuses damaged records; built for aarch64 (when its cross compiler and qemu-aarch64 are
installed) the core gives the numbers of this build. Skipped where the sources or a C++
toolchain are not at hand (e.g. tests run from an installed package alone)."""

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "tests" / "cpp" / "core_smoke.cpp"

pytestmark = pytest.mark.skipif(not SOURCES.exists() or shutil.which("cmake") is None,
                                reason="needs the source tree and cmake")
X86_64_HOST = platform.machine() in ("x86_64", "AMD64")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    build = tmp_path_factory.mktemp("build-cpp")
    configure = ["cmake", "-S", str(ROOT), "-B", str(build), "-DMTHT_PYTHON_MODULE=OFF", "-DMTHT_CPP_TESTS=ON",
                 "-DCMAKE_BUILD_TYPE=Release"]
    subprocess.run(configure, check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "--parallel", "2", "--target", "core_smoke", "thread_pool_check",
                    "room_check", "failed_write_check", "count_map_check", "shared_mutex_check",
                    "radix_sort_check", "row_arena_check", "bucket_check", "crc32c_check",
                    "monolith_format_check", "route_check", "narrow_values_check", "shard_limit_check",
                    "retriever_check", "index_growth_check", "concurrency_check", "cgroup_limits_check"],
                   check=True, capture_output=True)
    return build


@pytest.fixture(scope="module")
def smoke(build):
    return build / "core_smoke"


def run(cmd, kernel=None):
    env = dict(os.environ)
    env.pop("MTHT_KERNEL", None)
    if kernel:
        env["MTHT_KERNEL"] = kernel
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, timeout=900).stdout.split()
    assert out[0] == "kernel" and out[2] == "checksum"
    return out[1], out[3]


def test_every_kernel_set_gives_the_same_numbers(smoke):
    import mtht

    results = {k: run([str(smoke)], k) for k in mtht._core.available_kernels()}
    assert {name for name, _ in results.values()} == set(results)
    assert len({checksum for _, checksum in results.values()}) == 1, results


@pytest.mark.skipif(not X86_64_HOST or shutil.which("qemu-x86_64") is None,
                    reason="needs an x86-64 host and qemu-x86_64 (Debian's qemu-user)")
def test_runs_on_a_cpu_without_avx(smoke):
    kernel, checksum = run(["qemu-x86_64", "-cpu", "Nehalem", str(smoke)])
    assert kernel == "sse2"
    assert checksum == run([str(smoke)], "scalar")[1]


AARCH64_TOOLCHAIN = """
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
"""


@pytest.mark.skipif(not X86_64_HOST or shutil.which("aarch64-linux-gnu-g++") is None
                    or shutil.which("qemu-aarch64") is None,
                    reason="needs an x86-64 host, aarch64-linux-gnu-g++ and qemu-aarch64 (Debian's "
                           "g++-aarch64-linux-gnu and qemu-user)")
def test_an_aarch64_build_compiles_cleanly_and_gives_the_same_numbers(smoke, tmp_path):
    # Every kernel set of each architecture, the ARM build's NEON ones among them, gives the
    # numbers bit for bit: HashNet's tanh included, which the C library's tanhf does not
    # give alike on the two (it differs by an ulp for some inputs).
    toolchain = tmp_path / "aarch64.cmake"
    toolchain.write_text(AARCH64_TOOLCHAIN)
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_TOOLCHAIN_FILE={toolchain}",
                    "-DMTHT_PYTHON_MODULE=OFF", "-DMTHT_CPP_TESTS=ON", "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, capture_output=True)
    made = subprocess.run(["cmake", "--build", str(build), "--parallel", "2", "--target", "core_smoke",
                           "retriever_check", "index_growth_check"], check=True, capture_output=True, text=True)
    assert "warning:" not in made.stdout + made.stderr, made.stdout + made.stderr
    qemu = ("qemu-aarch64", "-L", "/usr/aarch64-linux-gnu")
    want = run([str(smoke)], "scalar")[1]
    assert run([*qemu, str(build / "core_smoke")]) == ("neon", want)
    assert run([*qemu, str(build / "core_smoke")], "scalar") == ("scalar", want)
    # The retrievers' NEON kernels against the C library's models, over every 977th float.
    check_passes(build, "retriever_check", "977", emulator=qemu)


def check_passes(build, name, *args, emulator=()):
    """Runs the C++ check `name`, which prints "ok" when every expectation holds."""
    out = subprocess.run([*emulator, str(build / name), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout


def test_thread_pool_contract(build):
    # Every task runs once; a phase starts only after the earlier phases have finished, and
    # the phases after a failed task are skipped; a call from inside a task runs alone.
    check_passes(build, "thread_pool_check")


def test_the_cpu_and_memory_limits_of_control_groups_are_read(build):
    # v1 and v2 limits on made-up trees: the tightest of a group and those above it, whole
    # CPUs rounded down but at least one, no limit where none is set or a file makes no sense.
    check_passes(build, "cgroup_limits_check")


def test_a_write_keeps_the_room_it_reserved(build):
    # Write A reserves room, write B then inserts into the same shard, then A writes: B must
    # grow the index before it writes, and A's write must not grow it half-way through.
    check_passes(build, "room_check")


def test_a_write_past_a_shards_limit_is_refused_before_it_changes_anything(build):
    # The limit lowered to 1000 entries: 20 new ids into a shard of 990 are a ValueError and
    # leave every table as it was, for each kind of write; 10 fit, given twice or not.
    check_passes(build, "shard_limit_check")


def test_the_shards_of_a_table_grow_their_mapped_indexes_in_batches_of_their_own(build):
    # A pooled index doubles at the load bound; a mapped one grows by half or more at its
    # shard's growth point and not before; in a table of 4 shards filled at one pace, shard s
    # grows at 1 - s / 64 of the bound, each in another batch.
    check_passes(build, "index_growth_check")


def test_a_write_that_fails_half_way_changes_nothing(build):
    # An allocation fails at each point of a write batch on two threads in turn: the table
    # must be left as it was every time, and the write that goes through must be exact.
    check_passes(build, "failed_write_check")


def test_the_filter_count_map_agrees_with_a_dict(build):
    # Random runs of entries, removals and lookups over small id ranges (clusters that wrap
    # around and are cut by removals), INT64_MIN among the ids, against std::unordered_map.
    check_passes(build, "count_map_check")


def test_the_shard_lock_excludes_writers_and_wakes_every_waiter(build):
    # Threads read and write under the lock, holding it from nothing to a millisecond: a
    # writer is alone, a reader never sees a write half-made, and a thread asleep waiting
    # for the lock gets it once it is given back (a watchdog fails the check on a hang).
    check_passes(build, "shared_mutex_check")


def test_calls_from_many_threads_at_once_lose_nothing(build):
    # Four threads call the same tables at once (calls on one table, on several, fused),
    # over overlapping ids, while the tables split their shards, evict (by expiry and by
    # capacity), save checkpoints and take entries and checkpoints loaded into them, and
    # the pool changes its thread count: concurrent assign_adds of +1 all count, no read
    # sees a row half written, a capacity-limited table is never seen past its limit, and a
    # final save loads back into the same counters.
    check_passes(build, "concurrency_check")


def test_the_radix_sort_agrees_with_a_stable_sort(build):
    # Records of three 64-bit key words, random or agreeing in most bytes (which the sort
    # skips) or all equal, 0 to 65,537 of them, against std::stable_sort.
    check_passes(build, "radix_sort_check")


def test_the_row_arena_walks_a_column_chunk_by_chunk_as_row_by_row(build):
    # 0 to 2,000 rows over chunks of doubling sizes, steps of 1 to 5,000 rows, both columns:
    # the walk visits every step-th row in use, in order, at the address RowArena::at gives.
    check_passes(build, "row_arena_check")


def test_a_bucket_packs_its_overflow_count_and_compares_four_ids_at_once(build):
    # The overflow count in the slot words' top bits reads back, leaves the rows alone and
    # stops at its most; the SSE2 comparison of four ids agrees with one slot at a time,
    # for ids differing from the wanted one in only their low or high 32 bits.
    check_passes(build, "bucket_check")


def test_the_crc32c_instruction_agrees_with_the_table_driven_crc(build):
    # The standard check value on both paths, and the dispatched CRC against the
    # table-driven one at every length to 300 and every start offset to 7.
    check_passes(build, "crc32c_check")


def test_the_entry_dump_codec_round_trips_and_refuses_damaged_records(build):
    # Entries encoded and decoded come back bit for bit (NaN payloads too); records with
    # bytes flipped, cut or inserted either decode or raise ValueError.
    check_passes(build, "monolith_format_check")


def test_ids_are_routed_to_their_owners_and_their_rows_back(build):
    # route_ids against a model (distinct ids in order of first occurrence, grouped by the
    # non-negative modulo), rows summed per id left to right, and gathered back in order.
    check_passes(build, "route_check")


def test_the_retrievers_kernels_agree_with_their_models(build):
    # fixed_r8 and HashNet (forward and backward) of every kernel set, over every 61st float
    # bit pattern and the edges (signed zeros, ties, clamp bounds) in rows of 19 values,
    # against models written with the C library: the branching form of fixed_r8's rounding,
    # the C library's double tanh rounded once, fma. And a table's lookups of 16 MB or more
    # through each retriever, rows streamed through a stack buffer or too wide for it.
    check_passes(build, "retriever_check")


def test_16_bit_values_round_as_their_models(build):
    # Widening every float16 and bfloat16 encoding, rounding to nearest over a sweep of
    # float32 bit patterns and at every tie, and stochastic rounding whose mean over every
    # noise value is exactly its input, against models in double precision.
    check_passes(build, "narrow_values_check")


# The same core built with AddressSanitizer and UndefinedBehaviorSanitizer
# (-DMTHT_SANITIZE=address,undefined): any report (an access out of bounds or after free,
# a load from an odd address, a null pointer given to memcpy...) ends the check with an
# error. The checks that exercise the table and its kernels, each kernel set for the smoke,
# and the parsing of the control groups' files.
_SANITIZED_CHECKS = ("core_smoke", "narrow_values_check", "monolith_format_check", "room_check",
                     "radix_sort_check", "route_check", "retriever_check", "concurrency_check",
                     "cgroup_limits_check")
# Arguments of a check under the sanitizers: the retrievers' sweep takes every 4099th float.
_SANITIZED_ARGS = {"retriever_check": ("4099",)}


def _sanitizers_available(sanitizers: str = "address,undefined") -> bool:
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        return False
    probe = subprocess.run([compiler, f"-fsanitize={sanitizers}", "-x", "c++", "-", "-o", os.devnull],
                           input="int main() { return 0; }\n", capture_output=True, text=True)
    return probe.returncode == 0


def _sanitized_build(tmp_path_factory, sanitizers: str, checks) -> Path:
    build = tmp_path_factory.mktemp(f"build-cpp-{sanitizers.replace(',', '-')}")
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-DMTHT_PYTHON_MODULE=OFF", "-DMTHT_CPP_TESTS=ON",
                    "-DCMAKE_BUILD_TYPE=RelWithDebInfo", f"-DMTHT_SANITIZE={sanitizers}"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "--parallel", "2", "--target", *checks],
                   check=True, capture_output=True)
    return build


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory):
    if not _sanitizers_available():
        pytest.skip("the C++ compiler has no AddressSanitizer/UndefinedBehaviorSanitizer runtime")
    return _sanitized_build(tmp_path_factory, "address,undefined", _SANITIZED_CHECKS)


@pytest.mark.parametrize("name", _SANITIZED_CHECKS)
def test_the_core_runs_clean_under_sanitizers(sanitized, name):
    if name != "core_smoke":
        check_passes(sanitized, name, *_SANITIZED_ARGS.get(name, ()))
        return
    import mtht

    checksums = {kernel: run([str(sanitized / name)], kernel)[1] for kernel in mtht._core.available_kernels()}
    assert len(set(checksums.values())) == 1, checksums


# The checks of calls made at once from several threads, built with ThreadSanitizer
# (-DMTHT_SANITIZE=thread): a data race (two threads at the same memory, one writing, with
# nothing ordering them) ends the check with an error, even where this run's timing hid
# its effect. (The thread pool's check leaves out its fork there: a child forked with
# threads running that starts threads is more than ThreadSanitizer supports.)
_THREAD_SANITIZED_CHECKS = ("concurrency_check", "shared_mutex_check", "thread_pool_check")


@pytest.fixture(scope="module")
def thread_sanitized(tmp_path_factory):
    if not _sanitizers_available("thread"):
        pytest.skip("the C++ compiler has no ThreadSanitizer runtime")
    return _sanitized_build(tmp_path_factory, "thread", _THREAD_SANITIZED_CHECKS)


@pytest.mark.parametrize("name", _THREAD_SANITIZED_CHECKS)
def test_concurrent_calls_have_no_data_race(thread_sanitized, name):
    # Run with address randomization off where setarch can: ThreadSanitizer maps its shadow
    # memory at fixed places, which some kernels' wider randomization can collide with.
    setarch = ("setarch", platform.machine(), "-R") if shutil.which("setarch") else ()
    check_passes(thread_sanitized, name, emulator=setarch)
