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

}  // namespace mtht::detail
