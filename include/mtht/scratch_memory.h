// Memory for the scratch arrays of batches (their plans), kept from one batch for the next.
#pragma once

#include <pthread.h>

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>

namespace mtht {

namespace detail {

// Memory for batches' scratch arrays (their plans), kept for the next batches. Freed and
// allocated again, a 65,536-id plan's 1.3 MB came back from the system as fresh pages:
// about 225 page faults per plan, more than half of its time. Shared by all threads (a
// plan may be built on a helper and freed by the caller); at most kKeepBytes are kept.
class ScratchMemory {
 public:
  static constexpr size_t kKeepBytes = size_t{64} << 20;

  // At least `bytes` (the smallest kept block that is big enough); `got` = its size.
  static std::unique_ptr<unsigned char[]> take(size_t bytes, size_t& got) {
    ScratchMemory& m = global();
    {
      std::lock_guard<std::mutex> lk(m.mu_);
      const auto best = m.spare_.lower_bound(bytes);
      if (best != m.spare_.end()) {
        got = best->first;
        std::unique_ptr<unsigned char[]> p = std::move(best->second);
        m.spare_.erase(best);
        m.kept_ -= got;
        return p;
      }
    }
    got = bytes;
    return std::unique_ptr<unsigned char[]>(new unsigned char[bytes]);
  }

  // Keeps the block for the next batches, unless that would keep too much.
  static void give(std::unique_ptr<unsigned char[]> data, size_t bytes) noexcept {
    ScratchMemory& m = global();
    std::lock_guard<std::mutex> lk(m.mu_);
    if (m.kept_ + bytes > kKeepBytes) return;  // freed here
    try {
      m.spare_.emplace(bytes, std::move(data));
      m.kept_ += bytes;
    } catch (...) {
    }
  }

 private:
  friend class ForkGate;  // registers its fork handlers after this one's
  static ScratchMemory& global() {
    static ScratchMemory* m = make();  // never destroyed: plans may outlive statics
    return *m;
  }
  // A fork while another thread holds the lock would leave it held in the child: hold it
  // across fork, then release it on both sides (as the huge-page pool does).
  static ScratchMemory* make() {
    ScratchMemory* m = new ScratchMemory();
    pthread_atfork([] { global().mu_.lock(); }, [] { global().mu_.unlock(); }, [] { global().mu_.unlock(); });
    return m;
  }

  std::mutex mu_;
  // Kept blocks by size: a write to many tables holds a plan per table, and a linear search
  // for the smallest block that fits was 6% of a write of 100 tables of 200 ids.
  std::multimap<size_t, std::unique_ptr<unsigned char[]>> spare_;
  size_t kept_ = 0;
};

// A block of kept scratch memory (ScratchMemory), not initialised.
class ScratchBlock {
 public:
  explicit ScratchBlock(size_t bytes) {
    if (bytes) data_ = ScratchMemory::take(bytes, bytes_);
  }
  ~ScratchBlock() {
    if (data_) ScratchMemory::give(std::move(data_), bytes_);
  }
  ScratchBlock(ScratchBlock&& o) noexcept : data_(std::move(o.data_)), bytes_(o.bytes_) {}
  ScratchBlock& operator=(ScratchBlock&&) = delete;

  unsigned char* data() const { return data_.get(); }

 private:
  std::unique_ptr<unsigned char[]> data_;
  size_t bytes_ = 0;
};

// An array of trivially copyable values inside a ScratchBlock (which outlives it, and keeps
// its address when moved).
template <class T>
class ScratchArray {
 public:
  explicit ScratchArray(unsigned char* at) : data_(reinterpret_cast<T*>(at)) {}

  T* data() { return data_; }
  const T* data() const { return data_; }
  T& operator[](size_t i) { return data_[i]; }
  const T& operator[](size_t i) const { return data_[i]; }

 private:
  T* data_;
};

}  // namespace detail
}  // namespace mtht
