"""The memory this process's cgroups leave it: the nearest limit among its own memory cgroup and the ones
above it (a container's, a systemd unit's, a pod's), which /proc/meminfo does not show.

The process's cgroup is read from /proc/self/cgroup and found under the mount (/sys/fs/cgroup): in the v1
memory hierarchy where the host has one (v1 and hybrid hosts), else in the v2 unified one. In a container
with its own cgroup namespace that is the mount's root itself.
"""

from __future__ import annotations

import os

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"
# a memory cgroup's files: its limit, its usage, and the key of its inactive file pages in memory.stat
V2_FILES = ("memory.max", "memory.current", "inactive_file")
V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
_NO_LIMIT = 2**62  # v1 writes "no limit" as a number near 2**63


def memory_cgroup_dirs(root: str = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> tuple[list[str], tuple]:
    """The folders of this process's memory cgroup and of its ancestors up to the mount, nearest first (those
    that exist), and the names of their files (``V1_FILES`` or ``V2_FILES``)."""
    paths = {}  # "v1" / "v2": the process's cgroup path in that hierarchy
    try:
        with open(proc_cgroup) as fh:
            for line in fh:
                hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
                if hierarchy == "0" and controllers == "":
                    paths["v2"] = path
                elif "memory" in controllers.split(","):
                    paths["v1"] = path
    except (OSError, ValueError):
        pass
    if os.path.isdir(os.path.join(root, "memory")):
        base, path, files = os.path.join(root, "memory"), paths.get("v1", "/"), V1_FILES
    else:
        base, path, files = root, paths.get("v2", "/"), V2_FILES
    parts = [p for p in path.split("/") if p]
    dirs = [os.path.join(base, *parts[:n]) for n in range(len(parts), -1, -1)]
    return [d for d in dirs if os.path.isdir(d)], files


def memory_available(root: str = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> int | None:
    """What the process may still use before the nearest memory limit of its cgroups, or None without one.
    Used memory is each cgroup's count less its inactive file pages, which the kernel reclaims before it
    kills (the working set, as docker and the kubelet count it)."""
    dirs, (limit_file, usage_file, inactive_key) = memory_cgroup_dirs(root, proc_cgroup)
    left = None
    for folder in dirs:
        try:
            with open(os.path.join(folder, limit_file)) as fh:
                limit = fh.read().strip()
            with open(os.path.join(folder, usage_file)) as fh:
                used = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if not limit.isdigit() or int(limit) >= _NO_LIMIT:  # "max" (v2) or the v1 stand-in for none
            continue
        try:
            with open(os.path.join(folder, "memory.stat")) as fh:
                inactive = next((int(line.split()[1]) for line in fh if line.split()[:1] == [inactive_key]), 0)
        except (OSError, ValueError, IndexError):
            inactive = 0
        here = max(0, int(limit) - max(0, used - inactive))
        left = here if left is None else min(left, here)
    return left
