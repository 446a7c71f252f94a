"""Peak process memory on Linux, for measuring what a streamed step really needs on the CPU."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["reset_peak_rss", "peak_rss"]

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) of this process; whether that worked."""
    try:
        _PROC_CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """The process's peak RSS since start or the last reset, in bytes (Linux ``VmHWM``)."""
    match = re.search(r"^VmHWM:\s+(\d+) kB", _PROC_STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError("no VmHWM in /proc/self/status")
    return int(match.group(1)) * 1024
