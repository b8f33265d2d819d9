// Checks the EntryDump codec on its own: entries encoded then decoded come back bit for bit
// (values, float and int64 state, id, timestamp, NaN payloads included), and records with
// bytes flipped, cut or inserted at random either decode or throw ValueError, never
// reading outside the record (run it under AddressSanitizer to see that). Prints one line
// per failure and "ok" when there is none.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "mtht/monolith_format.h"

namespace {

uint64_t state = 0x9E3779B97F4A7C15ULL;
uint64_t next() {
  state ^= state << 13;
  state ^= state >> 7;
  state ^= state << 17;
  return state;
}

// [adagrad (dim 3), dynamic_wd_adagrad (dim 2)]: 3 + 2 + 2 state words, dim 5.
mtht::monolith::EntryFormat make_format() {
  mtht::monolith::EntryFormat f;
  f.dim = 5;
  f.state_dim = 7;
  f.add_member(1, "adagrad");
  f.add_member(2, "sgd");
  f.add_member(4, "dynamic_wd_adagrad");
  f.add_dump(1);
  f.add_field(1, mtht::monolith::kFloats, 3, "norm");
  f.add_dump(4);
  f.add_field(1, mtht::monolith::kFloats, 2, "norm");
  f.add_field(2, mtht::monolith::kInt64, 2, "last_update_step");
  return f;
}

}  // namespace

int main() {
  int failures = 0;
  const mtht::monolith::EntryFormat format = make_format();
  mtht::monolith::EntryEncoder encoder(format);
  mtht::monolith::EntryDecoder decoder(format);
  const size_t width = 12;
  size_t decoded = 0, refused = 0;
  for (int round = 0; round < 2000; ++round) {
    std::vector<uint32_t> words(width);
    for (uint32_t& w : words) w = static_cast<uint32_t>(next());  // any bits: NaNs too
    words[width - 1] &= 0x7FFFFFFFu;  // the step counter's high word: a step below 0 is refused
    std::vector<float> row(width);
    std::memcpy(row.data(), words.data(), 4 * width);
    const int64_t id = static_cast<int64_t>(next()), ts = static_cast<int64_t>(next() >> (next() % 64));
    std::vector<char> framed;
    encoder.append(id, ts, row.data(), framed);
    uint64_t length;
    std::memcpy(&length, framed.data(), 8);
    if (framed.size() != 16 + length) {
      std::printf("round %d: frame of %zu bytes for a record of %llu\n", round, framed.size(),
                  static_cast<unsigned long long>(length));
      ++failures;
      continue;
    }
    std::vector<unsigned char> record(framed.begin() + 12, framed.end() - 4);
    int64_t got_id, got_ts;
    std::vector<float> got(width);
    decoder.decode(record.data(), record.size(), got_id, got_ts, got.data());
    if (got_id != id || got_ts != ts || std::memcmp(got.data(), row.data(), 4 * width) != 0) {
      std::printf("round %d: the entry does not come back\n", round);
      ++failures;
    }
    for (int m = 0; m < 20; ++m) {
      std::vector<unsigned char> bad = record;
      for (int k = 0, changes = 1 + static_cast<int>(next() % 3); k < changes; ++k) {
        const size_t at = bad.empty() ? 0 : next() % bad.size();
        switch (next() % 3) {
          case 0:
            if (!bad.empty()) bad[at] ^= static_cast<unsigned char>(1 + next() % 255);
            break;
          case 1: bad.resize(at); break;
          default: bad.insert(bad.begin() + static_cast<std::ptrdiff_t>(at), static_cast<unsigned char>(next()));
        }
      }
      // Exactly the record's bytes, in a buffer of their own: a read past them is a
      // sanitizer error.
      std::vector<unsigned char> exact(bad);
      exact.shrink_to_fit();
      try {
        decoder.decode(exact.data(), exact.size(), got_id, got_ts, got.data());
        ++decoded;
      } catch (const mtht::ValueError&) {
        ++refused;
      } catch (const std::exception& e) {
        std::printf("round %d: %s\n", round, e.what());
        ++failures;
      }
    }
  }
  if (decoded == 0 || refused == 0) {
    std::printf("damaged records: %zu decoded, %zu refused; expected some of each\n", decoded, refused);
    ++failures;
  }
  if (failures == 0) std::printf("ok\n");
  return failures ? 1 : 0;
}
