"""Control groups with a CPU or memory limit, made for a test where this process may make
them (as root, on Linux), and processes run in them."""

import contextlib
import os
import subprocess

import pytest


def _hierarchies(controller):
    """(mount point, this process's group as the mount shows it, is v2) of each hierarchy
    that may hold `controller`: the v2 one and the v1 one of that controller."""
    try:
        with open("/proc/self/cgroup") as f:
            groups = [line.rstrip("\n").split(":", 2) for line in f]
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return
    for hid, controllers, group in groups:
        v2 = hid == "0" and controllers == ""
        if not v2 and controller not in controllers.split(","):
            continue
        for fields in mounts:
            fstype, options = fields[fields.index("-") + 1], fields[-1].split(",")
            if (fstype == "cgroup2") if v2 else (fstype == "cgroup" and controller in options):
                root = fields[3].rstrip("/")
                inside = group[len(root):] if group.startswith(root) else ""
                yield fields[4] + inside.rstrip("/"), v2


@contextlib.contextmanager
def limited_group(controller, v1_files, v2_files):
    """A new group of this process's `controller` hierarchy (v1, or v2 where it has the
    controller) whose files are written with `v1_files` or `v2_files` ({name: text}), removed
    after. The test is skipped where this process may not make one."""
    for parent, v2 in _hierarchies(controller):
        path = os.path.join(parent, f"mtht-test-{os.getpid()}")
        try:
            os.mkdir(path)
        except OSError:
            continue
        try:
            for name, text in (v2_files if v2 else v1_files).items():
                with open(os.path.join(path, name), "w") as f:
                    f.write(text)
        except OSError:
            os.rmdir(path)
            continue
        try:
            yield path
        finally:
            os.rmdir(path)
        return
    pytest.skip(f"this process may not make a control group with a {controller} limit")


def run_in(group, argv, timeout=120, env=None):
    """Runs `argv` in `group` (a shell moves itself there, then execs it); its output."""
    return subprocess.run(["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', group, *argv],
                          capture_output=True, text=True, timeout=timeout, env=env)
