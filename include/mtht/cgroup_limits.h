// The CPU time and memory the Linux control groups of the process allow it: a container's
// or a pod's limits (cgroup v2 `cpu.max` and `memory.max`, v1 `cpu.cfs_quota_us` over
// `cpu.cfs_period_us` and `memory.limit_in_bytes`). Neither shows where a process usually
// looks: a CPU limit leaves the CPU affinity at all the machine's cores (a pool sized by it
// runs more threads than the limit pays for, and the kernel stops them all for the rest of
// each period once they have used it up), and a memory limit leaves the machine's memory
// as the system reports it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace mtht {
namespace cgroup_detail {

// One controller hierarchy of the process: where it is mounted, the part of the
// hierarchy the mount shows (its root), and the process's group in it.
struct Hierarchy {
  std::string mount_point;
  std::string mount_root;
  std::string group;
};

inline std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  std::string part;
  std::istringstream in(text);
  while (std::getline(in, part, sep)) parts.push_back(part);
  return parts;
}

// mountinfo writes a space, tab, newline or backslash of a path as \ and three octal digits.
inline std::string unescape_octal(const std::string& text) {
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    auto octal = [&](size_t at) { return text[at] >= '0' && text[at] <= '7'; };
    if (text[i] == '\\' && i + 4 <= text.size() && octal(i + 1) && octal(i + 2) && octal(i + 3)) {
      out += static_cast<char>((text[i + 1] - '0') * 64 + (text[i + 2] - '0') * 8 + (text[i + 3] - '0'));
      i += 3;
    } else {
      out += text[i];
    }
  }
  return out;
}

// The first two words of a file, or none if it cannot be read.
inline std::vector<std::string> read_words(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> words;
  std::string word;
  while (words.size() < 2 && in >> word) words.push_back(word);
  return words;
}

// A decimal number of at most 18 digits, with an optional minus sign; larger ones (v1's
// "no limit" is 2^63 rounded down to a page) do not parse, and are no limit.
inline bool parse_int(const std::string& text, int64_t& value) {
  const size_t first = !text.empty() && text[0] == '-' ? 1 : 0;
  if (text.size() == first || text.size() - first > 18) return false;
  int64_t v = 0;
  for (size_t i = first; i < text.size(); ++i) {
    if (text[i] < '0' || text[i] > '9') return false;
    v = v * 10 + (text[i] - '0');
  }
  value = first ? -v : v;
  return true;
}

// Whole CPUs a quota of `quota` microseconds each `period` pays for, at least one; 0 for
// no limit (a negative quota, or numbers that are not one).
inline int64_t whole_cpus(int64_t quota, int64_t period) {
  if (quota <= 0 || period <= 0) return 0;
  return std::max<int64_t>(1, std::min<int64_t>(quota / period, 1 << 20));
}

// The CPU limit a group's own files set: v2 `cpu.max` ("max 100000" or "150000 100000"),
// v1 the two cfs files. 0 if none.
inline int64_t group_cpus(const std::string& dir, bool v2) {
  int64_t quota = 0, period = 0;
  if (v2) {
    std::vector<std::string> max = read_words(dir + "/cpu.max");
    if (max.size() != 2 || !parse_int(max[0], quota) || !parse_int(max[1], period)) return 0;
  } else {
    std::vector<std::string> q = read_words(dir + "/cpu.cfs_quota_us");
    std::vector<std::string> p = read_words(dir + "/cpu.cfs_period_us");
    if (q.empty() || p.empty() || !parse_int(q[0], quota) || !parse_int(p[0], period)) return 0;
  }
  return whole_cpus(quota, period);
}

// The memory limit in bytes a group's own file sets: v2 `memory.max` ("max" or a number),
// v1 `memory.limit_in_bytes`. 0 if none.
inline int64_t group_memory(const std::string& dir, bool v2) {
  std::vector<std::string> limit = read_words(dir + (v2 ? "/memory.max" : "/memory.limit_in_bytes"));
  int64_t bytes = 0;
  return !limit.empty() && parse_int(limit[0], bytes) && bytes > 0 ? bytes : 0;
}

// The tighter of two limits, 0 standing for none.
inline int64_t tighter(int64_t a, int64_t b) { return a > 0 && b > 0 ? std::min(a, b) : std::max(a, b); }

// The tightest limit of the group and of each group above it up to the mount: a parent's
// limit bounds its children's (a pod's over its containers'). 0 if none.
template <class GroupLimit>
int64_t hierarchy_limit(const Hierarchy& h, bool v2, GroupLimit group_limit) {
  // The group as the mount shows it; a group outside the mount's root (a container whose
  // mount shows only its own group) is the mount point itself.
  std::string rel = h.group;
  if (h.mount_root != "/") {
    if (rel.compare(0, h.mount_root.size(), h.mount_root) == 0 &&
        (rel.size() == h.mount_root.size() || rel[h.mount_root.size()] == '/'))
      rel = rel.substr(h.mount_root.size());
    else
      rel.clear();
  }
  if (rel.empty() || rel[0] != '/') rel = "/" + rel;
  int64_t limit = 0;
  for (;;) {
    const int64_t here = group_limit(h.mount_point + (rel == "/" ? "" : rel), v2);
    limit = tighter(limit, here);
    if (rel == "/") break;
    rel = rel.substr(0, std::max<size_t>(rel.rfind('/'), 1));
  }
  return limit;
}

// The tightest limit `group_limit` reads over the process's v2 hierarchy and its v1
// hierarchy of `controller`, or 0 where none sets one or the system does not say.
// `proc_self` is where the process's `cgroup` and `mountinfo` files are read from.
template <class GroupLimit>
int64_t tightest_limit(const std::string& proc_self, const std::string& controller, GroupLimit group_limit) {
  try {
    // The process's group in each hierarchy: "0::<group>" for v2, "<id>:<controllers>:<group>"
    // for v1.
    std::string v2_group, v1_group;
    bool has_v2 = false, has_v1 = false;
    {
      std::ifstream in(proc_self + "/cgroup");
      std::string line;
      while (std::getline(in, line)) {
        size_t a = line.find(':'), b = a == std::string::npos ? a : line.find(':', a + 1);
        if (b == std::string::npos) continue;
        std::string id = line.substr(0, a), controllers = line.substr(a + 1, b - a - 1), group = line.substr(b + 1);
        if (id == "0" && controllers.empty()) {
          has_v2 = true;
          v2_group = group;
        } else {
          std::vector<std::string> names = split(controllers, ',');
          if (std::find(names.begin(), names.end(), controller) != names.end()) {
            has_v1 = true;
            v1_group = group;
          }
        }
      }
    }
    if (!has_v2 && !has_v1) return 0;
    // Where each is mounted: "<id> <parent> <dev> <root> <mount point> <options> [optional
    // fields] - <type> <source> <super options>".
    int64_t limit = 0;
    std::ifstream in(proc_self + "/mountinfo");
    std::string line;
    while (std::getline(in, line)) {
      std::vector<std::string> fields = split(line, ' ');
      auto dash = std::find(fields.begin(), fields.end(), "-");
      if (fields.size() < 5 || dash == fields.end() || fields.end() - dash < 4) continue;
      const std::string& type = dash[1];
      int64_t here = 0;
      if (type == "cgroup2" && has_v2) {
        here = hierarchy_limit({unescape_octal(fields[4]), unescape_octal(fields[3]), v2_group}, true, group_limit);
      } else if (type == "cgroup" && has_v1) {
        std::vector<std::string> options = split(dash[3], ',');
        if (std::find(options.begin(), options.end(), controller) == options.end()) continue;
        here = hierarchy_limit({unescape_octal(fields[4]), unescape_octal(fields[3]), v1_group}, false, group_limit);
      }
      limit = tighter(limit, here);
    }
    return limit;
  } catch (...) {  // an allocation that failed: no limit known
    return 0;
  }
}

}  // namespace cgroup_detail

// Whole CPUs the control groups of the process allow it (rounded down, at least 1), or 0
// where none sets a limit or the system does not say. `proc_self` is where the process's
// `cgroup` and `mountinfo` files are read from (another path only in tests).
inline int cgroup_cpu_limit(const std::string& proc_self = "/proc/self") {
  return static_cast<int>(cgroup_detail::tightest_limit(proc_self, "cpu", cgroup_detail::group_cpus));
}

// Bytes of memory the control groups of the process allow it, or 0 where none sets a
// limit or the system does not say.
inline int64_t cgroup_memory_limit(const std::string& proc_self = "/proc/self") {
  return cgroup_detail::tightest_limit(proc_self, "memory", cgroup_detail::group_memory);
}

}  // namespace mtht
