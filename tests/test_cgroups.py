"""What the process's cgroups allow it, read as the engine does (``engine.cgroups``), from fake cgroup trees:
the CPU quota bounds the row groups and the sampler's worker; the memory limit is tested with the budget
in test_engine_memory.py."""

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
