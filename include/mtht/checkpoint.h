// Checkpoint data files: streamed, checksummed, one file per part of a table (by id hash).
//
// A data file (all integers little-endian):
//
//   "MTHTCKP1" | u32 version=2 | u32 dim | u32 state_dim | u32 layout_len | i64 max_update_ts
//   | layout (layout_len bytes: the entry layout, refused on restore if it differs)
//   | entries: { i64 id | i64 last_update_ts | f32 values[dim] | f32 state[state_dim] } * E
//   | filter counts: { i64 id | u64 count } * F  (count's top bit: the older generation)
//   | u64 E | u64 F | u64 checksum | "MTHTEND1"
//
// Version 1 (read too) had no generations: its counts are all of the current one.
// The checksum (Checksum64 below) covers every byte before it. The manifest that names the
// files of one save, with their sizes and checksums, is written by the Python layer after
// every data file is complete and synced, and renamed into place atomically.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "mtht/errors.h"
#include "mtht/table.h"
#include "mtht/thread_pool.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "mtht checkpoints assume a little-endian host"
#endif

namespace mtht {

namespace detail {
// The most bytes one read or write call is asked for: macOS refuses (EINVAL) a call of more
// than INT_MAX bytes, where Linux transfers part; the loops around the calls go on.
constexpr size_t kMaxTransfer = size_t{1} << 30;
}  // namespace detail

// A streaming 64-bit checksum: four independent multiply-rotate lanes over 32-byte blocks
// (fast enough to run at memory speed), folded with the length at the end.
class Checksum64 {
 public:
  static constexpr uint64_t P1 = 0x9E3779B185EBCA87ULL, P2 = 0xC2B2AE3D27D4EB4FULL, P3 = 0x165667B19E3779F9ULL;

  void update(const void* data, size_t n) {
    if (n == 0) return;  // data may be null then (an empty vector's), which memcpy may not take
    const unsigned char* p = static_cast<const unsigned char*>(data);
    total_ += n;
    if (fill_) {
      const size_t take = std::min(n, sizeof(buf_) - fill_);
      std::memcpy(buf_ + fill_, p, take);
      fill_ += take;
      p += take;
      n -= take;
      if (fill_ < sizeof(buf_)) return;
      block(buf_);
      fill_ = 0;
    }
    for (; n >= 32; p += 32, n -= 32) block(p);
    std::memcpy(buf_, p, n);
    fill_ = n;
  }

  uint64_t digest() const {
    uint64_t h = rotl(lane_[0], 1) + rotl(lane_[1], 7) + rotl(lane_[2], 12) + rotl(lane_[3], 18);
    h ^= total_ * P3;
    for (size_t i = 0; i < fill_; ++i) h = rotl(h ^ (buf_[i] * P1), 11) * P2;
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
  }

 private:
  static uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
  void block(const unsigned char* p) {
    for (int i = 0; i < 4; ++i) {
      uint64_t w;
      std::memcpy(&w, p + 8 * i, 8);
      lane_[i] = rotl(lane_[i] + w * P2, 31) * P1;
    }
  }

  uint64_t lane_[4] = {P1 + P2, P2, 0, 0 - P1};
  unsigned char buf_[32];
  size_t fill_ = 0;
  uint64_t total_ = 0;
};

struct CheckpointFileInfo {
  uint64_t entries = 0;
  uint64_t filter_entries = 0;
  uint64_t bytes = 0;
  uint64_t checksum = 0;
};

namespace detail {

constexpr char kFileMagic[9] = "MTHTCKP1";
constexpr char kEndMagic[9] = "MTHTEND1";
constexpr uint32_t kFileVersion = 2;
// A filter count's top bit: the count is of the older generation (AdmissionCounts). Counts
// stay far below it: they grow only up to an id's threshold (< 2^32) plus one batch.
constexpr uint64_t kOlderCount = uint64_t{1} << 63;
constexpr size_t kTrailerBytes = 32;

inline std::string errno_text(const std::string& what, const std::string& path) {
  return what + " " + path + ": " + std::strerror(errno);
}

// Buffered writer of a new file; finish() writes the rest and syncs it to disk.
class FileWriter {
 public:
  explicit FileWriter(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) throw IOError(errno_text("cannot create", path));
    buf_.reserve(kBuffer);
  }
  FileWriter(const FileWriter&) = delete;
  FileWriter& operator=(const FileWriter&) = delete;
  ~FileWriter() {
    if (fd_ >= 0) ::close(fd_);
  }
  void write(const void* p, size_t n) {
    bytes_ += n;
    const char* c = static_cast<const char*>(p);
    if (buf_.size() + n > kBuffer) flush();
    if (n >= kBuffer) {
      raw_write(c, n);
    } else {
      buf_.insert(buf_.end(), c, c + n);
    }
  }
  uint64_t bytes() const { return bytes_; }
  void finish() {
    flush();
    if (::fsync(fd_) != 0) throw IOError(errno_text("cannot sync", path_));
    if (::close(fd_) != 0) {
      fd_ = -1;
      throw IOError(errno_text("cannot close", path_));
    }
    fd_ = -1;
  }

 private:
  static constexpr size_t kBuffer = size_t{4} << 20;
  void flush() {
    raw_write(buf_.data(), buf_.size());
    buf_.clear();
  }
  void raw_write(const char* p, size_t n) {
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, std::min(n, detail::kMaxTransfer));
      if (w < 0) {
        if (errno == EINTR) continue;
        throw IOError(errno_text("cannot write", path_));
      }
      p += w;
      n -= static_cast<size_t>(w);
    }
  }

  std::string path_;
  int fd_ = -1;
  std::vector<char> buf_;
  uint64_t bytes_ = 0;
};

// Buffered writer that checksums what it writes.
class CheckedWriter {
 public:
  explicit CheckedWriter(const std::string& path) : file_(path) {}
  template <class T>
  void put(const T& v) {
    write(&v, sizeof v);
  }
  void write(const void* p, size_t n) {
    sum_.update(p, n);
    file_.write(p, n);
  }
  uint64_t checksum() const { return sum_.digest(); }
  uint64_t bytes() const { return file_.bytes(); }
  // Unchecksummed tail (the checksum itself and the end magic).
  void write_unchecked(const void* p, size_t n) { file_.write(p, n); }
  void finish() { file_.finish(); }

 private:
  FileWriter file_;
  Checksum64 sum_;
};

// Reader of a file from its start (or from where seek() puts it).
class FileReader {
 public:
  explicit FileReader(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw IOError(errno_text("cannot open checkpoint file", path));
    struct stat st;
    if (::fstat(fd_, &st) != 0) {
      ::close(fd_);
      throw IOError(errno_text("cannot stat", path));
    }
    size_ = static_cast<uint64_t>(st.st_size);
  }
  FileReader(const FileReader&) = delete;
  FileReader& operator=(const FileReader&) = delete;
  ~FileReader() { ::close(fd_); }
  uint64_t size() const { return size_; }
  // The next n bytes; IOError when the file ends before them.
  void read(void* p, size_t n) {
    char* c = static_cast<char*>(p);
    while (n > 0) {
      const ssize_t r = ::pread(fd_, c, std::min(n, detail::kMaxTransfer), static_cast<off_t>(pos_));
      if (r < 0) {
        if (errno == EINTR) continue;
        throw IOError(errno_text("cannot read", path_));
      }
      if (r == 0) throw IOError("checkpoint file " + path_ + " is truncated");
      c += r;
      n -= static_cast<size_t>(r);
      pos_ += static_cast<uint64_t>(r);
    }
  }
  void seek(uint64_t pos) { pos_ = pos; }

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
  uint64_t pos_ = 0;
};

// Reader that checksums what it reads (read_raw: bytes left out of the checksum).
class CheckedReader {
 public:
  explicit CheckedReader(const std::string& path) : file_(path) {}
  uint64_t size() const { return file_.size(); }
  void read(void* p, size_t n) {
    file_.read(p, n);
    sum_.update(p, n);
  }
  template <class T>
  T get() {
    T v;
    read(&v, sizeof v);
    return v;
  }
  void read_raw(void* p, size_t n) { file_.read(p, n); }
  void seek(uint64_t pos) { file_.seek(pos); }
  uint64_t checksum() const { return sum_.digest(); }

 private:
  FileReader file_;
  Checksum64 sum_;
};

}  // namespace detail

// The records a restore reads and inserts at a time, of `record_bytes` each. An insert on
// one thread reads each row from the chunk, which is still in the cache when it is small:
// restores 1.17x to 1.41x faster than in chunks of 65,536. An insert spread over the
// threads (a file loaded alone) pays for each wake-up of the helpers, and goes faster in
// large chunks (docs/benchmarks.md, Save and restore). At most 32 MiB of records: wide rows
// (dim 256 with Adam's state: 3 KB) would otherwise take hundreds of MB.
inline size_t load_chunk(size_t record_bytes) {
  const size_t chunk = EmbeddingTable::batch_threads(65536) > 1 ? 65536 : 16384;
  return std::clamp<size_t>((size_t{32} << 20) / std::max<size_t>(record_bytes, 1), 1024, chunk);
}

// Writes part `part` of `parts` of the table's entries (EmbeddingTable::shards_of_part) to
// `path`, leaving out those expired at `now` when `apply_expiry`. Removes the partial file
// if anything fails. The caller holds the table's layout.
inline CheckpointFileInfo save_checkpoint_file(const EmbeddingTable& table, const std::string& path, size_t part,
                                               size_t parts, int64_t max_update_ts, bool apply_expiry,
                                               const std::string& layout) {
  const auto [shard_begin, shard_end] = table.shards_of_part(part, parts);
  CheckpointFileInfo info;
  try {
    detail::CheckedWriter w(path);
    w.write(detail::kFileMagic, 8);
    w.put(detail::kFileVersion);
    w.put(static_cast<uint32_t>(table.dim()));
    w.put(static_cast<uint32_t>(table.state_dim()));
    w.put(static_cast<uint32_t>(layout.size()));
    w.put(max_update_ts);
    w.write(layout.data(), layout.size());
    const size_t floats = static_cast<size_t>(table.dim() + table.state_dim());
    const size_t record = 16 + sizeof(float) * floats;
    // Records are assembled in a block and written (and checksummed) a block at a time.
    std::vector<char> block;
    block.reserve(size_t{1} << 20);
    // The filter counts go after the entries, but are taken with each shard's entries (a
    // write between the two would admit an id into neither): kept here until then, 16
    // bytes a count (the filter itself takes 32 to 64).
    std::vector<uint64_t> counts;
    for (size_t s = shard_begin; s < shard_end; ++s) {
      const auto count = [&](int64_t id, uint64_t n, bool older) {
        if (EmbeddingTable::part_of(id, parts) != part) return;
        counts.push_back(static_cast<uint64_t>(id));
        counts.push_back(n | (older ? detail::kOlderCount : 0));
      };
      table.scan_shard(s, [&](int64_t id, int64_t ts, const float* data) {
        if (EmbeddingTable::part_of(id, parts) != part) return;
        if (apply_expiry && table.expired(id, ts, max_update_ts)) return;
        const size_t at = block.size();
        block.resize(at + record);
        std::memcpy(block.data() + at, &id, 8);
        std::memcpy(block.data() + at + 8, &ts, 8);
        std::memcpy(block.data() + at + 16, data, record - 16);
        ++info.entries;
        if (block.size() >= (size_t{1} << 20)) {
          w.write(block.data(), block.size());
          block.clear();
        }
      }, count);
    }
    w.write(block.data(), block.size());
    w.write(counts.data(), counts.size() * sizeof(uint64_t));  // (id, count) pairs, little-endian
    info.filter_entries = counts.size() / 2;
    w.put(info.entries);
    w.put(info.filter_entries);
    info.checksum = w.checksum();
    w.write_unchecked(&info.checksum, 8);
    w.write_unchecked(detail::kEndMagic, 8);
    info.bytes = w.bytes();
    w.finish();
  } catch (...) {
    ::unlink(path.c_str());
    throw;
  }
  return info;
}

// The ids a load keeps: those with `id mod parts == part` (the modulo non-negative), the
// entries one process of `parts` owns when a checkpoint of a sharded job is read again for
// another number of processes. The default keeps every id.
struct OwnedIds {
  int64_t parts = 1;
  int64_t part = 0;
  bool keeps(int64_t id) const {
    if (parts == 1) return true;
    int64_t r = id % parts;
    return (r < 0 ? r + parts : r) == part;
  }
};

namespace detail {
// Keeps, in place, the records of `ids` (and of `raw`, `record` bytes each, and of the
// arrays `more`) whose id `owned` keeps; returns how many.
template <class... More>
inline size_t keep_owned(const OwnedIds& owned, std::vector<int64_t>& ids, char* raw, size_t record, size_t n,
                         More*... more) {
  if (owned.parts == 1) return n;
  size_t kept = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!owned.keeps(ids[i])) continue;
    if (kept != i) {
      ids[kept] = ids[i];
      std::memmove(raw + kept * record, raw + i * record, record);
      ((more[kept] = more[i]), ...);
    }
    ++kept;
  }
  return kept;
}
}  // namespace detail

// Reads one data file into `into` (a fresh table, or one that `owned` parts of other files
// go into), verifying layout, size and checksum. Throws IOError on any mismatch; the caller
// discards `into` then.
inline CheckpointFileInfo load_checkpoint_file(EmbeddingTable& into, const std::string& path, const std::string& layout,
                                               const OwnedIds& owned = {}) {
  detail::CheckedReader r(path);
  const std::string bad = "checkpoint file " + path + ": ";
  const size_t fixed = 8 + 4 * 4 + 8;
  if (r.size() < fixed + detail::kTrailerBytes) throw IOError(bad + "truncated (" + std::to_string(r.size()) + " bytes)");
  char magic[8];
  r.read(magic, 8);
  if (std::memcmp(magic, detail::kFileMagic, 8) != 0) throw IOError(bad + "not an mtht checkpoint data file");
  const auto version = r.get<uint32_t>();
  if (version != 1 && version != detail::kFileVersion) throw IOError(bad + "unsupported version " + std::to_string(version));
  const auto dim = r.get<uint32_t>();
  const auto state_dim = r.get<uint32_t>();
  const auto layout_len = r.get<uint32_t>();
  r.get<int64_t>();  // max_update_ts (the manifest holds the table's)
  if (dim != static_cast<uint32_t>(into.dim()) || state_dim != static_cast<uint32_t>(into.state_dim()))
    throw IOError(bad + "holds entries of dim " + std::to_string(dim) + " with " + std::to_string(state_dim) +
                  " optimizer floats; the table has dim " + std::to_string(into.dim()) + " with " +
                  std::to_string(into.state_dim()));
  if (layout_len > (1u << 20) || fixed + layout_len + detail::kTrailerBytes > r.size())
    throw IOError(bad + "corrupt header");
  std::string file_layout(layout_len, '\0');
  r.read(&file_layout[0], layout_len);
  if (file_layout != layout) {
    for (char& c : file_layout)
      if (c < 0x20 || c > 0x7E) c = '?';  // a corrupt header may hold any bytes
    throw IOError(bad + "was saved with entry layout '" + file_layout + "', the table has '" + layout + "'");
  }
  const uint64_t body = fixed + layout_len;
  // Trailer first: it says how many records the body holds.
  uint64_t trailer[2];
  char end_magic[8];
  uint64_t stored_sum;
  {
    detail::CheckedReader t(path);
    t.seek(r.size() - detail::kTrailerBytes);
    t.read_raw(trailer, 16);
    t.read_raw(&stored_sum, 8);
    t.read_raw(end_magic, 8);
  }
  if (std::memcmp(end_magic, detail::kEndMagic, 8) != 0) throw IOError(bad + "truncated or corrupt (no end marker)");
  const size_t floats = static_cast<size_t>(dim) + state_dim;
  const uint64_t record = 16 + 4 * floats;
  const uint64_t entries = trailer[0], filter_entries = trailer[1];
  if (entries > (r.size() / record) || filter_entries > r.size() / 16 ||
      body + entries * record + filter_entries * 16 + detail::kTrailerBytes != r.size())
    throw IOError(bad + "size does not match its record counts (truncated or corrupt)");
  const size_t chunk = load_chunk(record);
  std::vector<char> raw;
  std::vector<int64_t> ids, ts;
  for (uint64_t done = 0; done < entries;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(chunk, entries - done));
    raw.resize(n * record);
    r.read(raw.data(), raw.size());
    ids.resize(n);
    ts.resize(n);
    for (size_t i = 0; i < n; ++i) {
      const char* rec = raw.data() + i * record;
      std::memcpy(&ids[i], rec, 8);
      std::memcpy(&ts[i], rec + 8, 8);
    }
    const size_t kept = detail::keep_owned(owned, ids, raw.data(), record, n, ts.data());
    into.load_entries(ids.data(), ts.data(), raw.data() + 16, record, kept);  // the rows read in place
    done += n;
  }
  std::vector<uint64_t> counts;
  std::unique_ptr<bool[]> older;
  for (uint64_t done = 0; done < filter_entries;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(chunk, filter_entries - done));
    raw.resize(n * 16);
    r.read(raw.data(), raw.size());
    ids.resize(n);
    counts.resize(n);
    if (!older) older.reset(new bool[chunk]);
    for (size_t i = 0; i < n; ++i) {
      std::memcpy(&ids[i], raw.data() + 16 * i, 8);
      std::memcpy(&counts[i], raw.data() + 16 * i + 8, 8);
      older[i] = version >= 2 && (counts[i] & detail::kOlderCount);
      if (version >= 2) counts[i] &= ~detail::kOlderCount;
    }
    const size_t kept = detail::keep_owned(owned, ids, raw.data(), 16, n, counts.data(), older.get());
    into.load_counts(ids.data(), counts.data(), older.get(), kept);
    done += n;
  }
  r.read(trailer, 16);
  if (r.checksum() != stored_sum) throw IOError(bad + "checksum mismatch (the file is corrupt)");
  CheckpointFileInfo info;
  info.entries = entries;
  info.filter_entries = filter_entries;
  info.bytes = r.size();
  info.checksum = stored_sum;
  return info;
}

// Saves the whole table into paths.size() files in parallel; file i holds part i of them
// (EmbeddingTable::shards_of_part).
inline std::vector<CheckpointFileInfo> save_checkpoint(const EmbeddingTable& table, const std::vector<std::string>& paths,
                                                       int64_t max_update_ts, bool apply_expiry,
                                                       const std::string& layout) {
  const detail::ForkGate::InCall in_call;
  const EmbeddingTable::LayoutPin pin(table);  // the shards stay as they are through the save
  // With max_entries, no write goes on through the save: one that evicts in a shard already
  // saved and inserts in one not yet saved made a checkpoint past max_entries, which the
  // table's own config then refused to restore. (Such writes wait for the save.)
  const auto no_capacity_writes = table.lock_capacity();
  const size_t n = paths.size();
  if (n == 0) throw ValueError("a checkpoint has at least one data file");
  std::vector<CheckpointFileInfo> out(n);
  ThreadPool::global().parallel_for(n, [&](size_t i) {
    out[i] = save_checkpoint_file(table, paths[i], i, n, max_update_ts, apply_expiry, layout);
  });
  return out;
}

// `fit_counts`: the checkpoint's filter counts were kept under other bounds (another filter
// capacity or shard count): those past this table's bounds are forgotten
// (AdmissionCounts::fit_bound). Under the same bounds they are kept as saved, so that the
// restored table forgets what the saved one would have. `owned`: the ids kept (the files
// may be those of several checkpoints, each id in one of them).
inline std::vector<CheckpointFileInfo> load_checkpoint(EmbeddingTable& into, const std::vector<std::string>& paths,
                                                       const std::string& layout, bool fit_counts = true,
                                                       const OwnedIds& owned = {}) {
  const detail::ForkGate::InCall in_call;
  if (owned.parts < 1 || owned.part < 0 || owned.part >= owned.parts)
    throw ValueError("part " + std::to_string(owned.part) + " of " + std::to_string(owned.parts) + " is out of range");
  std::vector<CheckpointFileInfo> out(paths.size());
  ThreadPool::global().parallel_for(paths.size(),
                                    [&](size_t i) { out[i] = load_checkpoint_file(into, paths[i], layout, owned); });
  if (fit_counts) into.fit_counts();
  return out;
}

}  // namespace mtht
