"""What this process's cgroups allow it: the nearest memory limit and CPU quota among its own cgroup and
the ones above it (a container's, a systemd unit's, a pod's), which /proc/meminfo and the CPU affinity do
not show.

The process's cgroup is read from /proc/self/cgroup and found under the mount (/sys/fs/cgroup): in the
controller's v1 hierarchy where the host has one (v1 and hybrid hosts), else in the v2 unified one. In a
container with its own cgroup namespace that is the mount's root itself.
"""

from __future__ import annotations

import math
import os

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"
# a memory cgroup's files: its limit, its usage, and the key of its inactive file pages in memory.stat
V2_FILES = ("memory.max", "memory.current", "inactive_file")
V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
_NO_LIMIT = 2**62  # v1 writes "no limit" as a number near 2**63


def own_cgroup_dirs(controller: str, root: str = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> tuple[list[str], bool]:
    """The folders of this process's cgroup for ``controller`` ("memory", "cpu") and of its ancestors up to
    the mount, nearest first (those that exist), and whether they are cgroup v1's (else v2's)."""
    paths = {}  # "v1" / "v2": the process's cgroup path in that hierarchy
    try:
        with open(proc_cgroup) as fh:
            for line in fh:
                hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
                if hierarchy == "0" and controllers == "":
                    paths["v2"] = path
                elif controller in controllers.split(","):
                    paths["v1"] = path
    except (OSError, ValueError):
        pass
    v1 = os.path.isdir(os.path.join(root, controller))  # v1 and hybrid hosts mount each controller apart
    base, path = (os.path.join(root, controller), paths.get("v1", "/")) if v1 else (root, paths.get("v2", "/"))
    parts = [p for p in path.split("/") if p]
    dirs = [os.path.join(base, *parts[:n]) for n in range(len(parts), -1, -1)]
    return [d for d in dirs if os.path.isdir(d)], v1


def _read(folder: str, name: str) -> str | None:
    try:
        with open(os.path.join(folder, name)) as fh:
            return fh.read().strip()
    except OSError:
        return None


def cpu_limit(root: str = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> int | None:
    """The CPUs the nearest CPU quota of this process's cgroups allows (``docker run --cpus 2``, a systemd
    unit's CPUQuota), rounded up, or None without one."""
    dirs, v1 = own_cgroup_dirs("cpu", root, proc_cgroup)
    cpus = None
    for folder in dirs:
        try:
            if v1:  # a quota of -1: none
                quota = int(_read(folder, "cpu.cfs_quota_us") or -1)
                period = int(_read(folder, "cpu.cfs_period_us") or 0)
            else:  # "QUOTA PERIOD", or "max PERIOD" for none
                text = (_read(folder, "cpu.max") or "max").split()
                quota, period = (-1, 0) if text[0] == "max" else (int(text[0]), int(text[1]))
        except (ValueError, IndexError):
            continue
        if quota > 0 and period > 0:
            here = max(1, math.ceil(quota / period))
            cpus = here if cpus is None else min(cpus, here)
    return cpus


def memory_available(root: str = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> int | None:
    """What the process may still use before the nearest memory limit of its cgroups, or None without one.
    Used memory is each cgroup's count less its inactive file pages, which the kernel reclaims before it
    kills (the working set, as docker and the kubelet count it)."""
    dirs, v1 = own_cgroup_dirs("memory", root, proc_cgroup)
    limit_file, usage_file, inactive_key = V1_FILES if v1 else V2_FILES
    left = None
    for folder in dirs:
        limit, used = _read(folder, limit_file) or "", _read(folder, usage_file) or ""
        if not limit.isdigit() or not used.isdigit() or int(limit) >= _NO_LIMIT:  # "max" (v2), v1's stand-in
            continue
        stat = (line.split() for line in (_read(folder, "memory.stat") or "").splitlines())
        try:
            inactive = next((int(fields[1]) for fields in stat if fields[:1] == [inactive_key]), 0)
        except (ValueError, IndexError):
            inactive = 0
        here = max(0, int(limit) - max(0, int(used) - inactive))
        left = here if left is None else min(left, here)
    return left
