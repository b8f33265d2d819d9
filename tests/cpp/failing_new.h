// operator new replaced by one that fails once, at the c-th allocation from the moment
// allocations_left is set to c (below zero: no allocation fails). A check includes this in
// one of its source files: the replacement is for the whole program.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>

inline std::atomic<long> allocations_left{-1};

inline void* failing_allocate(std::size_t n) {
  if (allocations_left.load() >= 0 && allocations_left.fetch_sub(1) == 0) throw std::bad_alloc();
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}

void* operator new(std::size_t n) { return failing_allocate(n); }
void* operator new[](std::size_t n) { return failing_allocate(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
