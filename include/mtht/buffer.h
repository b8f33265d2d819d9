// Zeroed, 64-byte-aligned memory for the big arrays (index groups, row chunks).
// Large buffers come straight from mmap and ask for transparent huge pages, which cut
// TLB misses on random access by about half on the machines we measure. Buffers of 4 KiB
// up to 2 MiB are pieces of 2 MiB huge-page blocks shared by every table: a table of a
// million or so ids (or several smaller ones) keeps each shard's index and first row chunks
// in such buffers, and with pages of 4 KiB they would cost it the TLB misses the big arrays
// avoid.
#pragma once

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <mutex>
#include <unordered_map>
#include <new>
#include <utility>
#include <vector>

namespace mtht {

namespace detail {

constexpr size_t kHugePageBytes = size_t{2} << 20;

// The system's page size (4 KiB on x86-64; 16 or 64 KiB on some aarch64 kernels): a mapping
// is unmapped in whole pages, so its length is rounded to them.
inline size_t mapped_length(size_t bytes) {
  static const size_t page = [] {
    const long size = sysconf(_SC_PAGESIZE);
    return size > 0 ? static_cast<size_t>(size) : size_t{4096};
  }();
  return (bytes + page - 1) / page * page;
}

// Maps `bytes` (a multiple of the page size) at a 2 MiB boundary and asks for huge pages.
inline void* map_huge_aligned(size_t bytes) {
  const size_t span = bytes + kHugePageBytes;
  void* p = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  char* start = static_cast<char*>(p);
  char* aligned = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(start) + kHugePageBytes - 1) &
                                          ~(kHugePageBytes - 1));
  if (aligned > start) munmap(start, static_cast<size_t>(aligned - start));
  char* end = start + span;
  char* used_end = aligned + bytes;
  if (end > used_end) munmap(used_end, static_cast<size_t>(end - used_end));
#ifdef MADV_HUGEPAGE
  madvise(aligned, bytes, MADV_HUGEPAGE);
#endif
  return aligned;
}

// Pieces of 4 KiB, 8 KiB, ... 2 MiB cut from 2 MiB huge-page blocks, each block cut into
// pieces of one size. A released piece is kept for the next buffer of its size (zeroed
// again then); a piece never handed out is still zero and is not touched when handed out,
// so a buffer reserved ahead of need costs no memory until it is written. A block whose
// pieces are all released goes back to the system, so the arrays a growing index leaves
// behind do not stay resident.
class HugeBlockPool {
 public:
  static constexpr size_t kMinPiece = size_t{4} << 10;
  static constexpr int kClasses = 10;  // 4 KiB << c

  static HugeBlockPool& global() {
    static HugeBlockPool* pool = make();  // never destroyed: buffers may outlive statics
    return *pool;
  }

  // The piece size a buffer of `bytes` (<= 2 MiB) takes.
  static size_t piece_bytes(size_t bytes) {
    size_t piece = kMinPiece;
    while (piece < bytes) piece *= 2;
    return piece;
  }

  void* allocate(size_t bytes) {
    const size_t piece = piece_bytes(bytes);
    const int c = class_of(piece);
    std::vector<void*>& pieces = free_[c];
    std::unique_lock<std::mutex> lk(mu_);
    if (pieces.empty()) {
      char* block = static_cast<char*>(map_huge_aligned(kHugePageBytes));  // zeroed by the system
      try {
        // Room for every piece of every block of this size, so release never allocates.
        pieces.reserve((blocks_[c] + 1) * (kHugePageBytes / piece));
        in_use_.emplace(reinterpret_cast<uintptr_t>(block), 1);
      } catch (...) {
        munmap(block, kHugePageBytes);
        throw;
      }
      ++blocks_[c];
      for (size_t off = piece; off < kHugePageBytes; off += piece) pieces.push_back(block + off);
      return block;
    }
    const uintptr_t tagged = reinterpret_cast<uintptr_t>(pieces.back());
    pieces.pop_back();
    void* p = reinterpret_cast<void*>(tagged & ~kUsed);
    ++in_use_[block_of(p)];
    lk.unlock();
    if (tagged & kUsed) std::memset(p, 0, piece);  // a piece given back earlier: zero it again
    return p;
  }

  void release(void* p, size_t bytes) noexcept {
    const int c = class_of(piece_bytes(bytes));
    std::vector<void*>& pieces = free_[c];
    const uintptr_t block = block_of(p);
    std::lock_guard<std::mutex> lk(mu_);
    auto it = in_use_.find(block);
    if (it != in_use_.end() && --it->second == 0) {
      in_use_.erase(it);
      pieces.erase(std::remove_if(pieces.begin(), pieces.end(),
                                  [&](void* q) { return block_of(q) == block; }),
                   pieces.end());
      munmap(reinterpret_cast<void*>(block), kHugePageBytes);
      --blocks_[c];
      return;
    }
    // Within the capacity reserved when its block was cut: no allocation.
    pieces.push_back(reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(p) | kUsed));
  }

 private:
  // A fork while another thread holds the lock would leave it held in the child: hold it
  // across fork, then release it on both sides.
  static HugeBlockPool* make() {
    HugeBlockPool* pool = new HugeBlockPool();
    pthread_atfork([] { global().mu_.lock(); }, [] { global().mu_.unlock(); }, [] { global().mu_.unlock(); });
    return pool;
  }

  static int class_of(size_t piece) {
    int c = 0;
    while ((kMinPiece << c) < piece) ++c;
    return c;
  }
  static uintptr_t block_of(const void* p) { return reinterpret_cast<uintptr_t>(p) & ~(kHugePageBytes - 1); }

  static constexpr uintptr_t kUsed = 1;  // tag of a free piece that was handed out before

  std::mutex mu_;
  std::vector<void*> free_[kClasses];  // free pieces, tagged with kUsed (pieces are 4 KiB-aligned)
  size_t blocks_[kClasses] = {};                     // live blocks cut into each size
  std::unordered_map<uintptr_t, uint32_t> in_use_;  // block -> pieces handed out
};

}  // namespace detail

class Buffer {
 public:
  static constexpr size_t kHugePage = size_t{2} << 20;
  static constexpr size_t kPooledMin = size_t{4} << 10;

  Buffer() = default;
  explicit Buffer(size_t bytes) : bytes_(bytes) {
    if (bytes == 0) return;
    if (bytes > kHugePage) {
      data_ = detail::map_huge_aligned(detail::mapped_length(bytes));
      kind_ = Kind::kMapped;
    } else if (bytes >= kPooledMin) {
      data_ = detail::HugeBlockPool::global().allocate(bytes);
      kind_ = Kind::kPooled;
    } else {
      size_t rounded = (bytes + 63) / 64 * 64;
      void* p = nullptr;  // posix_memalign: aligned_alloc came to macOS only in 10.15
      if (posix_memalign(&p, 64, rounded) != 0) throw std::bad_alloc();
      std::memset(p, 0, rounded);
      data_ = p;
      kind_ = Kind::kHeap;
    }
  }
  ~Buffer() { release(); }
  Buffer(Buffer&& o) noexcept { swap(o); }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      release();
      swap(o);
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  enum class Kind { kHeap, kPooled, kMapped };

  void swap(Buffer& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(bytes_, o.bytes_);
    std::swap(kind_, o.kind_);
  }
  void release() noexcept {
    if (data_ == nullptr) return;
    switch (kind_) {
      case Kind::kMapped: munmap(data_, detail::mapped_length(bytes_)); break;
      case Kind::kPooled: detail::HugeBlockPool::global().release(data_, bytes_); break;
      case Kind::kHeap: std::free(data_); break;
    }
    data_ = nullptr;
    bytes_ = 0;
    kind_ = Kind::kHeap;
  }

  void* data_ = nullptr;
  size_t bytes_ = 0;
  Kind kind_ = Kind::kHeap;
};

}  // namespace mtht
