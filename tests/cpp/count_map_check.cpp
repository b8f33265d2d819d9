// Checks the admission filter's count map against std::unordered_map over long random runs of
// entries, removals and lookups, and its generations (AdmissionCounts) against a model, printing one line per failure and "ok" when there is none.
// The ids come from small ranges (so clusters form, wrap around the end of the array and are
// cut by removals) and include INT64_MIN, the value that marks an empty slot.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <unordered_map>
#include <vector>

#include "mtht/count_map.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, int round, long step) {
  if (ok) return;
  ++failures;
  if (failures < 20) std::printf("FAILED: %s (round %d, step %ld)\n", what, round, step);
}

// A linear congruential generator: next() gives its 31 high bits.
class Random {
 public:
  explicit Random(uint64_t seed) : x_(seed) {}
  uint64_t operator()() {
    x_ = x_ * 6364136223846793005ULL + 1442695040888963407ULL;
    return x_ >> 33;
  }

 private:
  uint64_t x_;
};

void check_round(int round, int64_t range) {
  mtht::detail::CountMap map;
  std::unordered_map<int64_t, uint64_t> model;
  Random next(0x9e3779b97f4a7c15ULL * static_cast<uint64_t>(round + 1));
  for (long step = 0; step < 200000; ++step) {
    const uint64_t r = next();
    if (r % 7919 == 0) {  // emptied, as a map kept from one batch to the next is
      if (r & 1) map.clear();
      else map.clear_for(static_cast<size_t>(next() % 3000));
      model.clear();
      expect(map.size() == 0, "empty after clear", round, step);
    }
    const int64_t drawn = static_cast<int64_t>(next() % static_cast<uint64_t>(range)) - range / 2;
    const int64_t id = r % 97 == 0 ? INT64_MIN : drawn;
    const uint64_t h = mtht::hash_id(id);
    switch (r % 4) {
      case 0:
      case 1: {  // count one more occurrence
        const auto [count, entered] = map.try_emplace(id, h);
        expect(entered == (model.count(id) == 0), "try_emplace says whether the id was new", round, step);
        ++*count;
        ++model[id];
        break;
      }
      case 2:  // remove
        map.erase(id, h);
        model.erase(id);
        break;
      default: {  // look up
        const uint64_t* count = map.find(id, h);
        const auto it = model.find(id);
        expect((count != nullptr) == (it != model.end()), "find agrees on presence", round, step);
        if (count && it != model.end()) expect(*count == it->second, "find gives the count", round, step);
      }
    }
    if (step % 1000 == 0) {
      expect(map.size() == model.size(), "size", round, step);
      std::map<int64_t, uint64_t> seen;
      map.for_each([&](int64_t i, uint64_t c) { seen[i] += c + (seen.count(i) ? 1u << 30 : 0); });
      expect(seen == std::map<int64_t, uint64_t>(model.begin(), model.end()), "for_each visits each id once",
             round, step);
    }
  }
}

// A cluster across the end of the array: ids whose home is the last of the 16 slots of a new
// map, plus one whose home is slot 0, entered and then removed in every order.
void check_wrapped_cluster() {
  std::vector<int64_t> last, first;
  for (int64_t id = 0; last.size() < 3 || first.empty(); ++id) {
    const uint64_t home = mtht::hash_id(id) & 15;
    if (home == 15 && last.size() < 3) last.push_back(id);
    if (home == 0 && first.empty()) first.push_back(id);
  }
  std::vector<int64_t> ids = {last[0], last[1], first[0], last[2]};  // slots 15, 0, 1, 2
  std::vector<int> order = {0, 1, 2, 3};
  int round = 1000;
  do {
    mtht::detail::CountMap map;
    for (int64_t id : ids) *map.try_emplace(id, mtht::hash_id(id)).first = static_cast<uint64_t>(id) + 1;
    std::vector<bool> gone(ids.size(), false);
    for (int k : order) {
      map.erase(ids[k], mtht::hash_id(ids[k]));
      gone[k] = true;
      for (size_t q = 0; q < ids.size(); ++q) {
        const uint64_t* count = map.find(ids[q], mtht::hash_id(ids[q]));
        expect(gone[q] ? count == nullptr : count && *count == static_cast<uint64_t>(ids[q]) + 1,
               "a cluster across the end of the array after a removal", round, k);
      }
    }
    ++round;
  } while (std::next_permutation(order.begin(), order.end()));
}

// clear_for(n) leaves room for n ids: counts entered then stay where they are (a batch's
// room holds pointers to them), whether the map had fewer slots, as many, or far more.
void check_clear_for_keeps_counts_in_place() {
  mtht::detail::CountMap map;
  int round = 2000;
  for (size_t n : {10, 1000, 5, 70000, 3, 1000}) {
    map.clear_for(n);
    std::vector<uint64_t*> counts;
    for (size_t i = 0; i < n; ++i) {
      const int64_t id = static_cast<int64_t>(i * 7 + n);
      const auto [count, entered] = map.try_emplace(id, mtht::hash_id(id));
      expect(entered, "an id is new after clear_for", round, static_cast<long>(i));
      *count = i + 1;
      counts.push_back(count);
    }
    for (size_t i = 0; i < n; ++i) {
      const int64_t id = static_cast<int64_t>(i * 7 + n);
      expect(map.find(id, mtht::hash_id(id)) == counts[i] && *counts[i] == i + 1,
             "counts stay in place for n ids after clear_for(n)", round, static_cast<long>(i));
    }
    expect(map.size() == n, "size after clear_for and n entries", round, 0);
    ++round;
  }
}

// The filter's generations (AdmissionCounts) against a model of two std::unordered_maps
// under the same rule, over random runs of counts, admissions (removals), placements and
// lookups; each run of entries is reserved first and must then allocate nothing.
void check_generations(int round, int64_t range, uint64_t bound) {
  mtht::detail::AdmissionCounts counts;
  counts.set_bound(bound);
  std::unordered_map<int64_t, uint64_t> current, older;
  uint64_t forgotten = 0;
  Random next(0x2545F4914F6CDD1DULL * static_cast<uint64_t>(round + 1));
  for (long step = 0; step < 20000; ++step) {
    const uint64_t r = next();
    const int64_t id = static_cast<int64_t>(next() % static_cast<uint64_t>(range)) - range / 2;
    const uint64_t h = mtht::hash_id(id);
    switch (r % 8) {
      case 0: {  // a write's run of counts, reserved first
        const uint64_t n = next() % (2 * bound + 3);
        counts.reserve_new(n);
        const size_t bytes = counts.bytes();
        for (uint64_t k = 0; k < n; ++k) {
          const int64_t e = static_cast<int64_t>(next() % static_cast<uint64_t>(range)) - range / 2;
          ++*counts.enter(e, mtht::hash_id(e));
          if (!current.count(e)) {
            uint64_t carried = 0;
            if (older.count(e)) {
              carried = older[e];
              older.erase(e);
            }
            if (current.size() >= bound) {
              forgotten += older.size();
              older = std::move(current);
              current.clear();
            }
            current[e] = carried;
          }
          ++current[e];
        }
        expect(counts.bytes() == bytes, "entering reserved ids allocates nothing", round, step);
        break;
      }
      case 1:  // admitted
        counts.erase(id, h);
        current.erase(id);
        older.erase(id);
        break;
      case 2: {  // placed as a checkpoint places it
        const bool in_older = next() & 1;
        const uint64_t c = next() % 5;
        counts.place(id, h, c, in_older);
        current.erase(id);
        older.erase(id);
        (in_older ? older : current)[id] = c;
        break;
      }
      default: {
        const uint64_t* c = counts.find(id, h);
        const auto in_current = current.find(id), in_older = older.find(id);
        const bool present = in_current != current.end() || in_older != older.end();
        expect((c != nullptr) == present, "find agrees on presence", round, step);
        if (c && present)
          expect(*c == (in_current != current.end() ? in_current->second : in_older->second), "find gives the count",
                 round, step);
      }
    }
    if (step % 500 == 0) {
      expect(counts.size() == current.size() + older.size(), "size", round, step);
      expect(counts.forgotten() == forgotten, "forgotten", round, step);
      std::map<int64_t, uint64_t> seen_current, seen_older;
      counts.for_each([&](int64_t i, uint64_t c, bool in_older) { (in_older ? seen_older : seen_current)[i] = c; });
      expect(seen_current == std::map<int64_t, uint64_t>(current.begin(), current.end()) &&
                 seen_older == std::map<int64_t, uint64_t>(older.begin(), older.end()),
             "for_each gives each generation", round, step);
    }
  }
}

}  // namespace

int main() {
  check_wrapped_cluster();
  check_clear_for_keeps_counts_in_place();
  {
    int round = 3000;
    for (int64_t range : {10, 200, 5000})
      for (uint64_t bound : {1, 3, 50, 1000}) check_generations(round++, range, bound);
  }
  int round = 0;
  for (int64_t range : {8, 40, 300, 5000})
    for (int i = 0; i < 3; ++i) check_round(round++, range);
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
