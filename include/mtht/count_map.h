// The admission filter's counts of one shard: id -> occurrences seen, for ids not (yet) in
// the table. Open addressing with linear probing over one array of (id, count) slots, at most
// half full; a removal shifts the entries after it back, so there are no tombstones. A lookup
// is one cache miss where a node-based map (std::unordered_map) takes two or more.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "mtht/hash.h"

namespace mtht::detail {

class CountMap {
 public:
  // The count of `id` (h = hash_id(id)), or nullptr.
  uint64_t* find(int64_t id, uint64_t h) {
    if (id == kEmpty) return has_empty_key_ ? &empty_key_count_ : nullptr;
    if (slots_.empty()) return nullptr;
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      Slot& s = slots_[i];
      if (s.id == id) return &s.count;
      if (s.id == kEmpty) return nullptr;
    }
  }
  const uint64_t* find(int64_t id, uint64_t h) const { return const_cast<CountMap*>(this)->find(id, h); }

  // The count of `id`, entered as 0 if it had none (then `true`). Allocates only when it
  // enters an id and the map must grow.
  std::pair<uint64_t*, bool> try_emplace(int64_t id, uint64_t h) {
    if (uint64_t* c = find(id, h)) return {c, false};
    if (id == kEmpty) {
      has_empty_key_ = true;
      empty_key_count_ = 0;
      return {&empty_key_count_, true};
    }
    if (2 * (used_ + 1) > slots_.size()) grow();
    size_t i = h & mask_;
    while (slots_[i].id != kEmpty) i = (i + 1) & mask_;
    slots_[i] = Slot{id, 0};
    ++used_;
    return {&slots_[i].count, true};
  }

  // Removes `id` if it has a count.
  void erase(int64_t id, uint64_t h) {
    if (id == kEmpty) {
      has_empty_key_ = false;
      return;
    }
    if (slots_.empty()) return;
    size_t i = h & mask_;
    while (slots_[i].id != id) {
      if (slots_[i].id == kEmpty) return;
      i = (i + 1) & mask_;
    }
    // Backward shift: move each later entry of the cluster that may sit at i (its home is
    // not in (i, j]) into the hole, until an empty slot ends the cluster.
    for (size_t j = (i + 1) & mask_;; j = (j + 1) & mask_) {
      if (slots_[j].id == kEmpty) break;
      const size_t home = hash_id(slots_[j].id) & mask_;
      const bool stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
      if (stays) continue;
      slots_[i] = slots_[j];
      i = j;
    }
    slots_[i] = Slot{kEmpty, 0};
    --used_;
  }

  // Fetches the home slot of an id with hash h into the cache.
  void prefetch(uint64_t h) const {
    if (!slots_.empty()) __builtin_prefetch(&slots_[h & mask_]);
  }

  size_t size() const { return used_ + (has_empty_key_ ? 1 : 0); }

  // Room for `n` ids in all, so that entering ids up to that many allocates nothing.
  void reserve(size_t n) {
    if (used_ == 0) {  // nothing to enter again: the slots at once
      const size_t size = slots_for(n);
      if (size > slots_.size()) {
        slots_.assign(size, Slot{kEmpty, 0});
        mask_ = size - 1;
      }
      return;
    }
    while (2 * n > slots_.size()) grow();
  }

  // Empties the map, keeping its slots.
  void clear() {
    if (used_) std::fill(slots_.begin(), slots_.end(), Slot{kEmpty, 0});
    used_ = 0;
    has_empty_key_ = false;
  }

  // Empties the map and makes room for `n` ids (as reserve), in the slots it has unless
  // they are far more than that needs: a map kept from one batch to the next is not taken
  // from the system again, nor kept at the size of its biggest batch.
  void clear_for(size_t n) {
    const size_t size = slots_for(n);
    if (slots_.capacity() > 4 * size) std::vector<Slot>().swap(slots_);
    slots_.assign(size, Slot{kEmpty, 0});
    mask_ = size - 1;
    used_ = 0;
    has_empty_key_ = false;
  }

  // Memory of the slots.
  size_t bytes() const { return slots_.capacity() * sizeof(Slot); }

  // fn(id, count) for every id with a count.
  template <class Fn>
  void for_each(Fn&& fn) const {
    if (has_empty_key_) fn(kEmpty, empty_key_count_);
    for (const Slot& s : slots_)
      if (s.id != kEmpty) fn(s.id, s.count);
  }

 private:
  // Marks an empty slot; the id that equals it is kept apart.
  static constexpr int64_t kEmpty = INT64_MIN;
  struct Slot {
    int64_t id;
    uint64_t count;
  };

  // The slots for n ids: a power of two, at most half of them taken.
  static size_t slots_for(size_t n) {
    size_t size = 16;
    while (2 * n > size) size *= 2;
    return size;
  }

  // Doubles the slots (16 at first) and enters the ids again.
  void grow() {
    std::vector<Slot> old(slots_.empty() ? 16 : 2 * slots_.size(), Slot{kEmpty, 0});
    old.swap(slots_);
    mask_ = slots_.size() - 1;
    for (const Slot& s : old) {
      if (s.id == kEmpty) continue;
      size_t i = hash_id(s.id) & mask_;
      while (slots_[i].id != kEmpty) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
  size_t used_ = 0;  // slots in use
  bool has_empty_key_ = false;
  uint64_t empty_key_count_ = 0;
};

// The admission filter's counts of one shard, kept within a bound by generations: counts
// enter the current generation; once it holds `bound` ids, the older generation is forgotten
// and the current one becomes the older. An id counted again moves to the current generation
// with its count. So a count is kept while fewer than `bound` ids have entered since its id
// was last counted, is forgotten once 2 * bound have, and at most 2 * bound counts are kept.
// (Monolith's filter forgets by a sliding window of generations too; its counts are 4 bits.)
class AdmissionCounts {
 public:
  static constexpr uint64_t kNoBound = UINT64_MAX;

  void set_bound(uint64_t bound) { bound_ = std::max<uint64_t>(bound, 1); }

  // The count of `id` (h = hash_id(id)) in either generation, or nullptr.
  const uint64_t* find(int64_t id, uint64_t h) const {
    if (const uint64_t* c = current_.find(id, h)) return c;
    return older_.size() ? older_.find(id, h) : nullptr;
  }

  // The count of `id` in the current generation: its count if it had one, else 0. Allocates
  // nothing after reserve_new() made room for it.
  uint64_t* enter(int64_t id, uint64_t h) {
    if (older_.size() == 0 && current_.size() < bound_) return current_.try_emplace(id, h).first;  // one probe
    if (uint64_t* c = current_.find(id, h)) return c;
    uint64_t carried = 0;
    if (older_.size()) {
      if (const uint64_t* c = older_.find(id, h)) {
        carried = *c;
        older_.erase(id, h);
      }
    }
    if (current_.size() >= bound_) {  // the current generation is full: a new one
      forgotten_ += older_.size();
      older_.clear();  // its slots are kept for the new generation
      std::swap(older_, current_);
    }
    uint64_t* c = current_.try_emplace(id, h).first;
    *c = carried;
    return c;
  }

  // Removes the count of `id` (an admitted id).
  void erase(int64_t id, uint64_t h) {
    current_.erase(id, h);
    if (older_.size()) older_.erase(id, h);
  }

  // Puts a count into a generation as it is (a checkpoint's or a split shard's counts).
  void place(int64_t id, uint64_t h, uint64_t count, bool older) {
    erase(id, h);
    *(older ? older_ : current_).try_emplace(id, h).first = count;
  }

  // Room for `n` more ids to enter (however they turn the generations over), so that enter()
  // allocates nothing in a write that reserved it.
  void reserve_new(uint64_t n) {
    if (current_.size() + n <= bound_) {
      current_.reserve(current_.size() + n);
      return;
    }
    // A generation may turn over: the older one's slots then take up to min(n, bound) ids,
    // and after a second turn the current one's take up to bound.
    current_.reserve(bound_);
    older_.reserve(std::max<uint64_t>(older_.size(), std::min(n, bound_)));
  }

  // After counts were placed (a restore into a filter of a smaller capacity, say): each
  // generation within the bound again. The older generation goes first, then the newer one's
  // counts past the bound (in the order of its map: recency within a generation is not
  // known), and the maps are made no larger than their counts need.
  void fit_bound() {
    if (current_.size() > bound_) {
      forgotten_ += older_.size() + (current_.size() - bound_);
      older_ = CountMap();
      current_ = first_of(current_, bound_);
    } else if (older_.size() > bound_) {
      forgotten_ += older_.size() - bound_;
      older_ = first_of(older_, bound_);
    }
  }

  // Room for ids to be placed: `older` and `current` of each generation.
  void reserve_placed(size_t older, size_t current) {
    older_.reserve(older);
    current_.reserve(current);
  }

  // (Unconditional: with a test of older_.size() here the compiler left the prefetch out of
  // the write loops, and counting ran 1.7x slower.)
  void prefetch(uint64_t h) const {
    current_.prefetch(h);
    older_.prefetch(h);  // nothing before the first turn (no slots)
  }

  size_t size() const { return current_.size() + older_.size(); }
  size_t bytes() const { return current_.bytes() + older_.bytes(); }
  // Counts forgotten so far (the ids of older generations as they went).
  uint64_t forgotten() const { return forgotten_; }

  // fn(id, count, older) for every count, the older generation's first.
  template <class Fn>
  void for_each(Fn&& fn) const {
    older_.for_each([&](int64_t id, uint64_t count) { fn(id, count, true); });
    current_.for_each([&](int64_t id, uint64_t count) { fn(id, count, false); });
  }

 private:
  static CountMap first_of(const CountMap& map, uint64_t n) {
    CountMap kept;
    kept.reserve(n);
    map.for_each([&](int64_t id, uint64_t count) {
      if (kept.size() < n) *kept.try_emplace(id, hash_id(id)).first = count;
    });
    return kept;
  }

  CountMap current_, older_;
  uint64_t bound_ = kNoBound;
  uint64_t forgotten_ = 0;
};

}  // namespace mtht::detail
