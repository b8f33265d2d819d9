// What a thread does on each turn of a short spin wait for another thread: it tells the CPU
// so, which frees the core's resources for its sibling hyper-thread and stops the loop's
// reads from being speculated far ahead.
#pragma once

namespace mtht {

inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace mtht
