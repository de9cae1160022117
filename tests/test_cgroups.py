"""What the process's cgroups allow it, read as the engine does (``engine.cgroups``), from fake cgroup trees:
the CPU quota bounds the row groups and the sampler's worker, the memory limit the CPU memory budget."""

from __future__ import annotations

import pytest

from engine.cgroups import cpu_limit, own_cgroup_dirs


def _tree(root, files: dict) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.mark.parametrize("proc, files, cpus", [
    # docker run --cpus N with its own cgroup namespace: the mount's root is the container's cgroup (v2)
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),
    ("0::/\n", {"cpu.max": "200000 100000\n"}, 2),
    ("0::/\n", {"cpu.max": "150000 100000"}, 2),  # rounded up
    ("0::/\n", {"cpu.max": "50000 100000"}, 1),
    ("0::/\n", {"cpu.max": "garbage"}, None),
    ("0::/\n", {}, None),
    # a systemd unit's CPUQuota on the host: the process's own cgroup; a parent's quota if nearer
    ("0::/system.slice/app.service\n", {"system.slice/app.service/cpu.max": "300000 100000"}, 3),
    ("0::/system.slice/app.service\n", {"system.slice/app.service/cpu.max": "max 100000",
                                        "system.slice/cpu.max": "100000 100000"}, 1),
    # cgroup v1 (and hybrid hosts): the cpu hierarchy, -1 for no quota
    ("3:cpu,cpuacct:/docker/abc\n0::/\n", {"cpu/docker/abc/cpu.cfs_quota_us": "400000",
                                           "cpu/docker/abc/cpu.cfs_period_us": "100000",
                                           "cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, 4),
    ("3:cpu,cpuacct:/docker/abc\n0::/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
])
def test_a_cpu_quota_bounds_the_cpus(tmp_path, proc, files, cpus):
    """A quota the CPU affinity does not show: the row groups (and the sampler's worker) count its CPUs,
    rounded up, wherever it is set above the process."""
    root = tmp_path / "cgroup"
    root.mkdir()
    _tree(root, files)
    (tmp_path / "proc").write_text(proc)
    assert cpu_limit(str(root), str(tmp_path / "proc")) == cpus


def test_the_process_cgroup_is_found_under_the_mount(tmp_path):
    root = tmp_path / "cgroup"
    (root / "memory" / "a" / "b").mkdir(parents=True)
    (tmp_path / "proc").write_text("4:memory:/a/b\n0::/elsewhere\n")
    dirs, v1 = own_cgroup_dirs("memory", str(root), str(tmp_path / "proc"))
    assert v1 and dirs == [str(root / "memory" / "a" / "b"), str(root / "memory" / "a"), str(root / "memory")]
    (tmp_path / "proc").write_text("0::/x/y\n")
    (root / "x" / "y").mkdir(parents=True)
    assert own_cgroup_dirs("cpu", str(root), str(tmp_path / "proc")) == ([str(root / "x" / "y"), str(root / "x"),
                                                                         str(root)], False)


GiB = 2**30


V2_PROC = "0::/system.slice/app.service\n"
V1_PROC = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n"


@pytest.mark.parametrize("proc, files, available", [
    # a container with its own cgroup namespace (docker run --memory 8g): the mount's root is its cgroup;
    # the limit less the working set (usage less inactive file pages)
    ("0::/\n", {"memory.max": "8589934592\n", "memory.current": str(3 * GiB),
                "memory.stat": f"anon 1\ninactive_file {GiB}\n"}, 6 * GiB),
    ("0::/\n", {"memory.max": "max\n", "memory.current": str(3 * GiB)}, None),  # no limit
    ("0::/\n", {"memory.max": str(2 * GiB), "memory.current": str(5 * GiB)}, 0),  # over it already
    # a systemd unit's MemoryMax on the host (v2): the process's own cgroup, below the root
    (V2_PROC, {"system.slice/app.service/memory.max": str(4 * GiB),
               "system.slice/app.service/memory.current": str(GiB)}, 3 * GiB),
    # a limit on a parent (a pod's) is nearer than none on the process's own cgroup
    (V2_PROC, {"system.slice/app.service/memory.max": "max", "system.slice/app.service/memory.current": str(GiB),
               "system.slice/memory.max": str(2 * GiB), "system.slice/memory.current": str(GiB + GiB // 2)},
     GiB // 2),
    # cgroup v1 (and hybrid hosts): the memory hierarchy, the process's path in it
    (V1_PROC, {"memory/docker/abc/memory.limit_in_bytes": str(4 * GiB),
               "memory/docker/abc/memory.usage_in_bytes": str(GiB),
               "memory/docker/abc/memory.stat": f"inactive_file 0\ntotal_inactive_file {GiB // 2}\n",
               "memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": str(GiB)},
     3 * GiB + GiB // 2),
    (V1_PROC, {"memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": str(GiB)},
     None),  # v1's stand-in for no limit, and the process's folder not mounted: the root is read
    ("", {}, None),  # no cgroup files at all
])
def test_a_cgroup_memory_limit_bounds_the_cpu_budget(tmp_path, proc, files, available):
    """On CPU the KV budget and the sampling tile come from the memory free: under a cgroup limit that is
    what the nearest limit leaves, which the host's /proc/meminfo does not show."""
    import torch

    from engine.cgroups import memory_available
    from engine.memory import available_bytes

    root = tmp_path / "cgroup"
    root.mkdir()
    _tree(root, files)
    (tmp_path / "proc").write_text(proc)
    (tmp_path / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {5 * GiB // 1024} kB\n")
    assert memory_available(str(root), str(tmp_path / "proc")) == available
    got = available_bytes(torch.device("cpu"), meminfo=str(tmp_path / "meminfo"), cgroup_root=str(root),
                          proc_cgroup=str(tmp_path / "proc"))
    assert got == (5 * GiB if available is None else min(5 * GiB, available))
