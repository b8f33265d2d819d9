// Monolith's single-table checkpoint files, written and read: a TFRecord stream (each record
// framed by its length and masked CRC-32C checksums) of serialized EntryDump protobuf
// messages. The messages are encoded here as protobuf encodes them (proto2: fields in number
// order, repeated floats unpacked, every field present) and decoded as any protobuf parser
// decodes them (fields in any order, packed or unpacked floats, unknown fields skipped,
// repeated and merged messages), for the fixed set of messages Monolith writes.
//
// EntryDump { sfixed64 id = 1; repeated float num = 2; OptimizerDump opt = 3;
//             int64 last_update_ts_sec = 4; }
// OptimizerDump { repeated SingleOptimizerDump dump = 1; }
// SingleOptimizerDump { oneof type { AdagradDump adagrad = 1; SgdDump sgd = 2; ... } }
//
// Which optimizer dumps a table's entries carry, and their fields, come from the caller
// (EntryFormat): the schema lives in one place, the Python layer.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "mtht/checkpoint.h"
#include "mtht/crc32c.h"
#include "mtht/errors.h"
#include "mtht/table.h"
#include "mtht/thread_pool.h"

namespace mtht {
namespace monolith {

// How an optimizer dump's field is sent.
enum FieldType : int { kFloats = 0, kFloat = 1, kInt64 = 2 };

struct DumpField {
  uint32_t number;  // field number in the dump message
  FieldType type;   // repeated float, float or int64
  uint32_t words;   // state words it holds: its floats, or 2 for an int64
  std::string name;
};

struct DumpFormat {
  uint32_t member;  // field number of the dump in SingleOptimizerDump's oneof
  std::vector<DumpField> fields;
};

// The wire form of one table's entries.
class EntryFormat {
 public:
  uint32_t dim = 0;
  uint32_t state_dim = 0;
  std::vector<DumpFormat> dumps;  // one per segment that has a dump, in segment order

  // Every member of SingleOptimizerDump's oneof (for telling a dump of another optimizer).
  void add_member(uint32_t number, const std::string& name) {
    check_number(number);
    members_.emplace_back(number, name);
  }
  void add_dump(uint32_t member) {
    if (member_name(member).empty()) throw ValueError("optimizer dump " + std::to_string(member) + " is not a member");
    dumps.push_back(DumpFormat{member, {}});
  }
  // Adds a field to the last dump added.
  void add_field(uint32_t number, int type, uint32_t words, const std::string& name) {
    if (dumps.empty()) throw ValueError("a dump field needs a dump");
    check_number(number);
    if (type != kFloats && type != kFloat && type != kInt64) throw ValueError("unknown dump field type");
    if ((type == kFloat && words != 1) || (type == kInt64 && words != 2))
      throw ValueError("dump field " + name + " takes " + (type == kFloat ? "1 word" : "2 words"));
    dumps.back().fields.push_back(DumpField{number, static_cast<FieldType>(type), words, name});
  }
  // "" when `number` is no member.
  const std::string& member_name(uint32_t number) const {
    for (const auto& m : members_)
      if (m.first == number) return m.second;
    static const std::string none;
    return none;
  }
  // The state words the dumps hold, which must be the table's state_dim.
  uint32_t dump_words() const {
    uint32_t words = 0;
    for (const auto& d : dumps)
      for (const auto& f : d.fields) words += f.words;
    return words;
  }

 private:
  // One-byte tags: every field number of these messages is below 16.
  static void check_number(uint32_t number) {
    if (number < 1 || number > 15) throw ValueError("field numbers of EntryDump's messages are 1 to 15");
  }
  std::vector<std::pair<uint32_t, std::string>> members_;
};

namespace detail {

// Wire types.
constexpr int kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kStartGroup = 3, kEndGroup = 4, kFixed32 = 5;

inline size_t varint_size(uint64_t v) {
  size_t n = 1;
  for (; v >= 0x80; v >>= 7) ++n;
  return n;
}

inline char* put_varint(char* p, uint64_t v) {
  for (; v >= 0x80; v >>= 7) *p++ = static_cast<char>(v | 0x80);
  *p++ = static_cast<char>(v);
  return p;
}

inline char* put_tag(char* p, uint32_t number, int wire) {
  *p++ = static_cast<char>(number << 3 | static_cast<uint32_t>(wire));  // numbers are below 16
  return p;
}

inline char* put_bytes(char* p, const void* v, size_t n) {
  std::memcpy(p, v, n);
  return p + n;
}

// A message being parsed. Malformed input throws ValueError with the reason.
struct Cursor {
  const unsigned char* p;
  const unsigned char* end;

  bool done() const { return p == end; }
  void need(uint64_t n) const {
    if (n > static_cast<uint64_t>(end - p)) throw ValueError("a field runs past the end of its message");
  }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p == end) throw ValueError("a varint runs past the end of its message");
      const unsigned char b = *p++;
      v |= static_cast<uint64_t>(b & 0x7F) << shift;
      if (!(b & 0x80)) return v;
    }
    throw ValueError("a varint is longer than 10 bytes");
  }
  // (field number, wire type) of the next field.
  std::pair<uint32_t, int> tag() {
    const uint64_t t = varint();
    if (t > 0xFFFFFFFFu || (t >> 3) == 0) throw ValueError("invalid field number");
    return {static_cast<uint32_t>(t >> 3), static_cast<int>(t & 7)};
  }
  template <class T>
  T fixed() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, p, sizeof(T));
    p += sizeof(T);
    return v;
  }
  // The body of a length-delimited field.
  Cursor sub() {
    const uint64_t n = varint();
    need(n);
    Cursor c{p, p + n};
    p += n;
    return c;
  }
  // Skips a field this parser does not take, as protobuf keeps it among the unknown fields.
  void skip(uint32_t number, int wire, int depth = 0) {
    switch (wire) {
      case kVarint: varint(); return;
      case kFixed64: need(8); p += 8; return;
      case kLengthDelimited: sub(); return;
      case kFixed32: need(4); p += 4; return;
      case kStartGroup:
        if (depth > 64) throw ValueError("groups nested too deeply");
        for (;;) {
          if (done()) throw ValueError("a group runs past the end of its message");
          const auto [n, w] = tag();
          if (w == kEndGroup) {
            if (n != number) throw ValueError("a group ends with another field number");
            return;
          }
          skip(n, w, depth + 1);
        }
      case kEndGroup: throw ValueError("a group ends that did not start");
      default: throw ValueError("invalid wire type " + std::to_string(wire));
    }
  }
  // Walks a message whose fields are not kept, checking that it is well formed.
  void skip_all() {
    while (!done()) {
      const auto [n, w] = tag();
      skip(n, w);
    }
  }
  // Puts the floats of repeated float field `number` at dst[count, cap) (those past cap
  // are only counted): a packed block, or an unpacked float and the run of its field's
  // floats that follow it (a one-byte tag and 4 bytes each), taken at once.
  void floats_into(uint32_t number, int wire, float* dst, uint64_t cap, uint64_t& count) {
    if (wire == kFixed32) {
      need(4);
      const unsigned char tag_byte = static_cast<unsigned char>(number << 3 | kFixed32);
      if (count < cap) std::memcpy(dst + count, p, 4);
      ++count;
      p += 4;
      while (end - p >= 5 && *p == tag_byte) {
        if (count < cap) std::memcpy(dst + count, p + 1, 4);
        ++count;
        p += 5;
      }
      return;
    }
    Cursor c = sub();
    const size_t bytes = static_cast<size_t>(c.end - c.p);
    if (bytes % 4) throw ValueError("packed floats of " + std::to_string(bytes) + " bytes");
    const size_t n = bytes / 4;
    if (count < cap) std::memcpy(dst + count, c.p, 4 * std::min<uint64_t>(n, cap - count));
    count += n;
  }
};

inline std::string quoted(const std::string& s) { return "'" + s + "'"; }

}  // namespace detail

// Encodes entries as EntryDump records, framed.
class EntryEncoder {
 public:
  explicit EntryEncoder(const EntryFormat& f) : f_(f), body_(f.dumps.size()) {}

  // Appends one framed record of entry (id, ts, row: dim values then state_dim words) to out.
  void append(int64_t id, int64_t ts, const float* row, std::vector<char>& out) {
    using namespace detail;
    const float* state = row + f_.dim;
    size_t opt = 0;
    size_t offset = 0;
    for (size_t d = 0; d < f_.dumps.size(); ++d) {
      size_t body = 0;
      for (const DumpField& field : f_.dumps[d].fields) {
        if (field.type == kFloats) {
          body += 5 * size_t{field.words};
        } else if (field.type == kFloat) {
          body += 5;
        } else {
          body += 1 + varint_size(static_cast<uint64_t>(int64_at(state + offset)));
        }
        offset += field.words;
      }
      body_[d] = body;
      const size_t single = 1 + varint_size(body) + body;
      opt += 1 + varint_size(single) + single;
    }
    const size_t length = 9 + 5 * size_t{f_.dim} + 1 + varint_size(opt) + opt + 1 + varint_size(static_cast<uint64_t>(ts));
    const size_t at = out.size();
    out.resize(at + 16 + length);
    char* const frame = out.data() + at;
    const uint64_t length64 = length;
    std::memcpy(frame, &length64, 8);
    const uint32_t length_crc = masked_crc32c(frame, 8);
    std::memcpy(frame + 8, &length_crc, 4);
    char* const data = frame + 12;
    char* p = data;
    p = put_tag(p, 1, kFixed64);
    p = put_bytes(p, &id, 8);
    for (uint32_t j = 0; j < f_.dim; ++j) {
      p = put_tag(p, 2, kFixed32);
      p = put_bytes(p, row + j, 4);
    }
    p = put_tag(p, 3, kLengthDelimited);
    p = put_varint(p, opt);
    offset = 0;
    for (size_t d = 0; d < f_.dumps.size(); ++d) {
      const size_t body = body_[d];
      p = put_tag(p, 1, kLengthDelimited);
      p = put_varint(p, 1 + varint_size(body) + body);
      p = put_tag(p, f_.dumps[d].member, kLengthDelimited);
      p = put_varint(p, body);
      for (const DumpField& field : f_.dumps[d].fields) {
        if (field.type == kFloats) {
          for (uint32_t j = 0; j < field.words; ++j) {
            p = put_tag(p, field.number, kFixed32);
            p = put_bytes(p, state + offset + j, 4);
          }
        } else if (field.type == kFloat) {
          p = put_tag(p, field.number, kFixed32);
          p = put_bytes(p, state + offset, 4);
        } else {
          p = put_tag(p, field.number, kVarint);
          p = put_varint(p, static_cast<uint64_t>(int64_at(state + offset)));
        }
        offset += field.words;
      }
    }
    p = put_tag(p, 4, kVarint);
    p = put_varint(p, static_cast<uint64_t>(ts));
    const uint32_t data_crc = masked_crc32c(data, length);
    std::memcpy(p, &data_crc, 4);
  }

 private:
  static int64_t int64_at(const float* words) {
    int64_t v;
    std::memcpy(&v, words, 8);
    return v;
  }

  const EntryFormat& f_;
  std::vector<size_t> body_;  // each dump's body bytes, for the record being encoded
};

// Decodes EntryDump records into table rows, checking them against the table's format.
// The values go straight to their place in the row as they are read.
class EntryDecoder {
 public:
  explicit EntryDecoder(const EntryFormat& f) : f_(f), dumps_(f.dumps.size()) {
    uint32_t offset = f.dim;
    for (size_t d = 0; d < f.dumps.size(); ++d) {
      dumps_[d].first = offset;
      for (const DumpField& field : f.dumps[d].fields) {
        dumps_[d].offsets.push_back(offset);
        offset += field.words;
      }
      dumps_[d].words = offset - dumps_[d].first;
      dumps_[d].counts.resize(f.dumps[d].fields.size());
    }
  }

  // Decodes record [p, p + n) into id, ts and row (dim values, then state_dim words).
  // Throws ValueError when it is not an EntryDump or does not fit the table (row is then
  // left in any state).
  void decode(const unsigned char* p, size_t n, int64_t& id, int64_t& ts, float* row) {
    using namespace detail;
    id = 0;
    ts = 0;
    num_count_ = 0;
    seen_ = 0;
    row_ = row;
    try {
      Cursor c{p, p + n};
      while (!c.done()) {
        const auto [number, wire] = c.tag();
        if (number == 1 && wire == kFixed64) {
          id = c.fixed<int64_t>();
        } else if (number == 2 && (wire == kFixed32 || wire == kLengthDelimited)) {
          c.floats_into(number, wire, row, f_.dim, num_count_);
        } else if (number == 3 && wire == kLengthDelimited) {
          Cursor opt = c.sub();  // a message given twice is merged: its dumps appended
          parse_optimizer_dump(opt);
        } else if (number == 4 && wire == kVarint) {
          ts = static_cast<int64_t>(c.varint());
        } else {
          c.skip(number, wire);
        }
      }
    } catch (const ValueError& e) {
      throw ValueError(std::string("unable to parse an EntryDump record (") + e.what() + ")");
    }
    check(id);
  }

 private:
  // Where a dump's fields go in the row, and how many floats each repeated one has had.
  struct DumpPlace {
    uint32_t member = 0;  // the oneof's member, 0 when none is set
    uint32_t first = 0, words = 0;
    std::vector<uint32_t> offsets;
    std::vector<uint64_t> counts;
  };

  // A member set anew: no fields yet (0 for those a record leaves out).
  void clear(DumpPlace& place, uint32_t to) {
    place.member = to;
    std::fill(place.counts.begin(), place.counts.end(), 0);
    std::memset(row_ + place.first, 0, sizeof(float) * place.words);
  }

  void parse_optimizer_dump(detail::Cursor& c) {
    using namespace detail;
    while (!c.done()) {
      const auto [number, wire] = c.tag();
      if (number == 1 && wire == kLengthDelimited) {
        Cursor single = c.sub();
        if (seen_ < dumps_.size()) {
          parse_single(single, f_.dumps[seen_], dumps_[seen_]);
        } else {
          single.skip_all();  // only counted: there are more dumps than the table has
        }
        ++seen_;
      } else {
        c.skip(number, wire);
      }
    }
  }

  // A SingleOptimizerDump: the last member set wins; the same member twice is merged.
  void parse_single(detail::Cursor& c, const DumpFormat& format, DumpPlace& place) {
    using namespace detail;
    clear(place, 0);
    while (!c.done()) {
      const auto [number, wire] = c.tag();
      if (wire != kLengthDelimited || f_.member_name(number).empty()) {
        c.skip(number, wire);
        continue;
      }
      Cursor body = c.sub();
      if (number != place.member) clear(place, number);
      if (number != format.member) {
        body.skip_all();  // another optimizer's dump: an error once the record is read
        continue;
      }
      while (!body.done()) {
        const auto [field_number, field_wire] = body.tag();
        size_t k = 0;
        while (k < format.fields.size() && format.fields[k].number != field_number) ++k;
        if (k == format.fields.size()) {
          body.skip(field_number, field_wire);
          continue;
        }
        float* const at = row_ + place.offsets[k];
        const DumpField& field = format.fields[k];
        if (field.type == kFloats && (field_wire == kFixed32 || field_wire == kLengthDelimited)) {
          body.floats_into(field_number, field_wire, at, field.words, place.counts[k]);
        } else if (field.type == kFloat && field_wire == kFixed32) {
          *at = body.fixed<float>();
        } else if (field.type == kInt64 && field_wire == kVarint) {
          const uint64_t v = body.varint();
          std::memcpy(at, &v, 8);
        } else {
          body.skip(field_number, field_wire);
        }
      }
    }
  }

  // The record against the table's format, in the order the messages name the problems.
  void check(int64_t id) const {
    using detail::quoted;
    const auto entry = [id] { return "entry " + std::to_string(id); };  // built for an error only
    if (num_count_ != f_.dim)
      throw ValueError(entry() + " has " + std::to_string(num_count_) + " values, the table has dim " +
                       std::to_string(f_.dim));
    if (seen_ != f_.dumps.size()) {
      std::string kinds;
      for (const DumpFormat& d : f_.dumps) kinds += (kinds.empty() ? "" : ", ") + f_.member_name(d.member);
      throw ValueError(entry() + ": " + std::to_string(seen_) + " optimizer dumps, the table's layout needs " +
                       std::to_string(f_.dumps.size()) + " (" + kinds + ")");
    }
    for (size_t d = 0; d < f_.dumps.size(); ++d) {
      const DumpFormat& format = f_.dumps[d];
      const std::string& kind = f_.member_name(format.member);
      if (dumps_[d].member != format.member) {
        const std::string got = dumps_[d].member ? quoted(f_.member_name(dumps_[d].member)) : "None";
        throw ValueError(entry() + ": optimizer dump is " + got + ", the table has " + quoted(kind));
      }
      for (size_t k = 0; k < format.fields.size(); ++k) {
        const DumpField& field = format.fields[k];
        const uint64_t got = dumps_[d].counts[k];
        if (field.type == kFloats && got != field.words)
          throw ValueError(entry() + ": " + kind + "." + field.name + " has " + std::to_string(got) +
                           " values, expected " + std::to_string(field.words));
        if (field.type == kInt64) {  // a step counter, which training keeps at 0 or more
          int64_t step;
          std::memcpy(&step, row_ + dumps_[d].offsets[k], sizeof step);
          if (step < 0)
            throw ValueError(entry() + ": " + kind + "." + field.name + " is " + std::to_string(step) +
                             ", a step counter below 0");
        }
      }
    }
  }

  const EntryFormat& f_;
  std::vector<DumpPlace> dumps_;
  float* row_ = nullptr;   // the row of the record being decoded
  uint64_t num_count_ = 0;  // values (num) in the record
  size_t seen_ = 0;         // SingleOptimizerDumps in the record
};

// The records of a TFRecord file, read a block at a time, both checksums of each checked.
class RecordReader {
 public:
  explicit RecordReader(const std::string& path) : path_(path), file_(path) {}

  // The next record's bytes (valid until the next call); false at the end of the file.
  bool next(const unsigned char*& data, size_t& n) {
    if (left() == 0) return false;
    if (!have(12)) fail("truncated record header");
    const unsigned char* head = buf_.data() + begin_;
    uint32_t length_crc;
    std::memcpy(&length_crc, head + 8, 4);
    if (masked_crc32c(head, 8) != length_crc) fail("corrupt record length");
    uint64_t length;
    std::memcpy(&length, head, 8);
    if (length > left() - 12 || left() - 12 - length < 4)
      fail("truncated record (its length runs past the end of the file)");
    have(static_cast<size_t>(16 + length));
    data = buf_.data() + begin_ + 12;
    n = static_cast<size_t>(length);
    uint32_t data_crc;
    std::memcpy(&data_crc, data + n, 4);
    if (masked_crc32c(data, n) != data_crc) fail("corrupt record (checksum mismatch)");
    begin_ += 16 + n;
    return true;
  }

  [[noreturn]] void fail(const std::string& what) const { throw ValueError(path_ + ": " + what); }

 private:
  static constexpr size_t kBlock = size_t{4} << 20;

  // Bytes of the file not yet returned.
  uint64_t left() const { return (end_ - begin_) + (file_.size() - read_); }

  // Whether `n` bytes from begin_ are (now) in the buffer.
  bool have(size_t n) {
    if (end_ - begin_ >= n) return true;
    if (n > left()) return false;
    if (end_ > begin_) std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
    if (buf_.size() < std::max(n, kBlock)) buf_.resize(std::max(n, kBlock));
    const size_t take = static_cast<size_t>(std::min<uint64_t>(buf_.size() - end_, file_.size() - read_));
    file_.read(buf_.data() + end_, take);
    end_ += take;
    read_ += take;
    return true;
  }

  std::string path_;
  mtht::detail::FileReader file_;
  std::vector<unsigned char> buf_;
  size_t begin_ = 0, end_ = 0;  // the buffer's unread bytes
  uint64_t read_ = 0;           // bytes of the file read into the buffer
};

struct LoadInfo {
  uint64_t entries = 0;
  int64_t max_update_ts = 0;  // of the entries read (0 when none)
};

// Writes part `part` of `parts` of the table's entries to `path`, leaving out those expired
// at `now`; returns the records written. Removes the partial file if anything fails. The
// caller holds the table's layout.
inline uint64_t save_file(const EmbeddingTable& table, const std::string& path, size_t part, size_t parts,
                          int64_t now, const EntryFormat& format) {
  const auto [shard_begin, shard_end] = table.shards_of_part(part, parts);
  uint64_t records = 0;
  try {
    mtht::detail::FileWriter w(path);
    EntryEncoder encoder(format);
    std::vector<char> block;
    block.reserve(size_t{1} << 20);
    for (size_t s = shard_begin; s < shard_end; ++s) {
      table.scan_shard(s, [&](int64_t id, int64_t ts, const float* data) {
        if (EmbeddingTable::part_of(id, parts) != part || table.expired(id, ts, now)) return;
        encoder.append(id, ts, data, block);
        ++records;
        if (block.size() >= (size_t{1} << 20)) {
          w.write(block.data(), block.size());
          block.clear();
        }
      });
    }
    w.write(block.data(), block.size());
    w.finish();
  } catch (...) {
    ::unlink(path.c_str());
    throw;
  }
  return records;
}

inline void check_format(const EmbeddingTable& table, const EntryFormat& format) {
  if (format.dim != static_cast<uint32_t>(table.dim()) || format.state_dim != static_cast<uint32_t>(table.state_dim()) ||
      format.dump_words() != format.state_dim)
    throw ValueError("the Monolith entry format does not match the table");
}

// Saves the whole table into paths.size() files in parallel; file i holds part i. Returns
// the records of each file.
inline std::vector<uint64_t> save(const EmbeddingTable& table, const std::vector<std::string>& paths, int64_t now,
                                  const EntryFormat& format) {
  const mtht::detail::ForkGate::InCall in_call;
  check_format(table, format);
  const EmbeddingTable::LayoutPin pin(table);  // the shards stay as they are through the save
  const auto no_capacity_writes = table.lock_capacity();  // as save_checkpoint
  const size_t n = paths.size();
  if (n == 0) throw ValueError("a checkpoint has at least one file");
  std::vector<uint64_t> out(n);
  ThreadPool::global().parallel_for(n, [&](size_t i) { out[i] = save_file(table, paths[i], i, n, now, format); });
  return out;
}

// Reads one file's records into `into`, a chunk at a time. Throws ValueError naming the
// file at the first record that is broken or does not fit.
inline LoadInfo load_file(EmbeddingTable& into, const std::string& path, const EntryFormat& format) {
  RecordReader records(path);
  EntryDecoder decoder(format);
  const size_t width = size_t{format.dim} + format.state_dim;
  const size_t chunk = load_chunk(sizeof(float) * width);
  std::vector<int64_t> ids(chunk), ts(chunk);
  std::vector<float> rows(chunk * width);
  LoadInfo info;
  size_t n = 0;
  const unsigned char* data;
  size_t length;
  while (records.next(data, length)) {
    try {
      decoder.decode(data, length, ids[n], ts[n], rows.data() + n * width);
    } catch (const ValueError& e) {
      records.fail(e.what());
    }
    if (info.entries == 0 || ts[n] > info.max_update_ts) info.max_update_ts = ts[n];
    ++info.entries;
    if (++n == chunk) {
      into.load_entries(ids.data(), ts.data(), rows.data(), n);
      n = 0;
    }
  }
  if (n) into.load_entries(ids.data(), ts.data(), rows.data(), n);
  return info;
}

// Reads the files into `into` (a fresh table), over at most `max_threads` threads (0: all).
// An error names the first broken file in the order of `paths`, whichever thread read it.
inline std::vector<LoadInfo> load(EmbeddingTable& into, const std::vector<std::string>& paths,
                                  const EntryFormat& format, int max_threads) {
  const mtht::detail::ForkGate::InCall in_call;
  check_format(into, format);
  std::vector<LoadInfo> out(paths.size());
  std::vector<std::exception_ptr> errors(paths.size());
  ThreadPool::global().parallel_for(
      paths.size(),
      [&](size_t i) {
        try {
          out[i] = load_file(into, paths[i], format);
        } catch (...) {
          errors[i] = std::current_exception();
        }
      },
      max_threads);
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
  return out;
}

}  // namespace monolith
}  // namespace mtht
