"""A process's resident memory on Linux: now (VmRSS), at its peak (VmHWM), and resetting the peak."""

from __future__ import annotations

from pathlib import Path


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM of ``pid``, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak(pid: int | str = "self") -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0; needs the same user)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
