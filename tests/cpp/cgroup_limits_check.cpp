// Checks cgroup_cpu_limit and cgroup_memory_limit on made-up /proc/self files and control
// group trees, printing one line per failure and "ok" when there is none: v2 limits
// (cpu.max, memory.max) and v1 ones (the cfs quota and period, memory.limit_in_bytes), the
// tightest of a group and the groups above it, whole CPUs rounded down but at least one,
// a hierarchy with no limit (v1's is a number too large to be one), a mount that shows only
// the process's own group (a container's), a mount point written with an escaped space, a
// v1 mount of other controllers only, and files that hold no numbers.
#include <stdlib.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "mtht/cgroup_limits.h"

namespace {

int failures = 0;
std::string root;

void write(const std::string& path, const std::string& text) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream(path) << text;
}

// A fresh made-up process: its cgroup and mountinfo files, under root/<name>/proc.
std::string process(const std::string& name, const std::string& cgroup, const std::string& mountinfo) {
  std::string proc = root + "/" + name + "/proc";
  write(proc + "/cgroup", cgroup);
  write(proc + "/mountinfo", mountinfo);
  return proc;
}

void expect_limit(const std::string& proc, int want, const char* what) {
  int got = mtht::cgroup_cpu_limit(proc);
  if (got == want) return;
  ++failures;
  std::printf("FAILED: %s: got %d, want %d\n", what, got, want);
}

void expect_memory(const std::string& proc, int64_t want, const char* what) {
  int64_t got = mtht::cgroup_memory_limit(proc);
  if (got == want) return;
  ++failures;
  std::printf("FAILED: %s: got %lld, want %lld\n", what, static_cast<long long>(got), static_cast<long long>(want));
}

std::string mount_line(const std::string& root_in_fs, const std::string& point, const std::string& type,
                       const std::string& super) {
  return "30 23 0:26 " + root_in_fs + " " + point + " rw,nosuid - " + type + " cgroup " + super + "\n";
}

}  // namespace

int main() {
  char dir[] = "/tmp/mtht_cgroup_limits_XXXXXX";
  if (!mkdtemp(dir)) {
    std::printf("FAILED: no temporary directory\n");
    return 1;
  }
  root = dir;
  const std::string other = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n";

  {  // v2: the tightest of the group and its ancestors; the root's lack of cpu.max is no limit.
    std::string fs = root + "/v2fs";
    std::string proc = process("v2", "0::/pod/app\n", other + mount_line("/", fs, "cgroup2", "rw,nsdelegate"));
    write(fs + "/pod/app/cpu.max", "max 100000\n");
    write(fs + "/pod/cpu.max", "250000 100000\n");
    expect_limit(proc, 2, "v2, a parent's 2.5 CPUs bound a child without a limit");
    write(fs + "/pod/app/cpu.max", "50000 100000\n");
    expect_limit(proc, 1, "v2, half a CPU is one thread");
    write(fs + "/pod/app/cpu.max", "700000 100000\n");
    expect_limit(proc, 2, "v2, a child's 7 CPUs under a parent's 2.5");
    write(fs + "/pod/cpu.max", "max 100000\n");
    expect_limit(proc, 7, "v2, 7 CPUs");
    write(fs + "/pod/app/cpu.max", "max 100000\n");
    expect_limit(proc, 0, "v2, no limit anywhere");
    write(fs + "/pod/app/cpu.max", "lots 100000\n");
    expect_limit(proc, 0, "v2, a cpu.max that holds no number");
    write(fs + "/pod/app/cpu.max", "100000 0\n");
    expect_limit(proc, 0, "v2, a period of 0");
    expect_memory(proc, 0, "v2, no memory.max anywhere");
    write(fs + "/pod/app/memory.max", "max\n");
    write(fs + "/pod/memory.max", "8589934592\n");
    expect_memory(proc, 8589934592, "v2, a parent's 8 GiB bound a child without a limit");
    write(fs + "/pod/app/memory.max", "1073741824\n");
    expect_memory(proc, 1073741824, "v2, a child's 1 GiB under a parent's 8");
  }
  {  // v1 seen from a container: the mount shows the container's own group at its point.
    std::string fs = root + "/v1fs";
    std::string proc = process("v1", "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n3:cpuset:/docker/abc\n",
                               other + mount_line("/docker/abc", fs + "/cpuset", "cgroup", "rw,cpuset") +
                                   mount_line("/docker/abc", fs + "/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"));
    write(fs + "/cpu,cpuacct/cpu.cfs_quota_us", "300000\n");
    write(fs + "/cpu,cpuacct/cpu.cfs_period_us", "100000\n");
    write(fs + "/cpuset/cpu.cfs_quota_us", "100000\n");  // not a cpu mount: never read
    write(fs + "/cpuset/cpu.cfs_period_us", "100000\n");
    expect_limit(proc, 3, "v1, 3 CPUs at the container's mount");
    write(fs + "/cpu,cpuacct/cpu.cfs_quota_us", "-1\n");
    expect_limit(proc, 0, "v1, a quota of -1");
  }
  {  // v1 memory, a hierarchy of its own: the largest number is no limit.
    std::string fs = root + "/v1mem";
    std::string proc = process("v1mem", "6:memory:/jobs/train\n4:cpu:/\n",
                               other + mount_line("/", fs, "cgroup", "rw,memory"));
    write(fs + "/memory.limit_in_bytes", "9223372036854771712\n");
    write(fs + "/jobs/memory.limit_in_bytes", "9223372036854771712\n");
    write(fs + "/jobs/train/memory.limit_in_bytes", "9223372036854771712\n");
    expect_memory(proc, 0, "v1, no memory limit");
    write(fs + "/jobs/memory.limit_in_bytes", "4294967296\n");
    expect_memory(proc, 4294967296, "v1, a parent's 4 GiB");
    expect_limit(proc, 0, "v1, a memory mount is no cpu mount");
  }
  {  // v1 on the host: the group below the mount, the limit two levels up; a group outside
     // the mount's root is the mount point itself.
    std::string fs = root + "/v1host";
    std::string proc = process("v1host", "1:cpu:/jobs/train/worker\n", other + mount_line("/", fs, "cgroup", "rw,cpu"));
    write(fs + "/jobs/cpu.cfs_quota_us", "150000\n");
    write(fs + "/jobs/cpu.cfs_period_us", "50000\n");
    write(fs + "/jobs/train/worker/cpu.cfs_quota_us", "-1\n");
    write(fs + "/jobs/train/worker/cpu.cfs_period_us", "100000\n");
    expect_limit(proc, 3, "v1, a grandparent's 3 CPUs");
    std::string outside = process("outside", "1:cpu:/elsewhere\n", other + mount_line("/jobs", fs + "/jobs", "cgroup", "rw,cpu"));
    expect_limit(outside, 3, "v1, a group outside the mount's root reads the mount point");
  }
  {  // Both at once (a hybrid system): the tighter; a mount point with a space in it.
    std::string fs = root + "/hybrid fs";
    std::string proc = process("hybrid", "1:cpu:/a\n0::/a\n",
                               other + mount_line("/", root + "/hybrid\\040fs/v1", "cgroup", "rw,cpu") +
                                   mount_line("/", root + "/hybrid\\040fs/v2", "cgroup2", "rw"));
    write(fs + "/v1/a/cpu.cfs_quota_us", "400000\n");
    write(fs + "/v1/a/cpu.cfs_period_us", "100000\n");
    expect_limit(proc, 4, "hybrid, v1's 4 CPUs, no v2 limit");
    write(fs + "/v2/a/cpu.max", "200000 100000\n");
    expect_limit(proc, 2, "hybrid, v2's 2 CPUs under v1's 4");
  }
  expect_limit(root + "/nothing", 0, "no cgroup file");
  expect_limit(process("nocpu", "4:memory:/x\n", other + mount_line("/", root + "/v1fs", "cgroup", "rw,memory")), 0,
               "no cpu controller");
  expect_limit(process("garbage", "no colons here\n0:\n", "- - -\n\n"), 0, "files that make no sense");
  expect_memory(root + "/nothing", 0, "no cgroup file, no memory limit");
  // This process's own groups: whatever they say, a limit or none.
  if (mtht::cgroup_cpu_limit() < 0 || mtht::cgroup_memory_limit() < 0) {
    ++failures;
    std::printf("FAILED: this process's limits are negative\n");
  }

  std::filesystem::remove_all(root);
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
