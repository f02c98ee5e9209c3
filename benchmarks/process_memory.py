"""Resident memory of this process, shared by the benchmark scripts that run each row in its
own process (run as ``python benchmarks/<name>.py``, which puts this directory on
``sys.path``). No JAX: a parent that only starts children imports it cheaply."""

from __future__ import annotations

import resource


def rss_kib():
    """(current, peak) resident memory of this process in KiB: VmRSS and VmHWM.

    Not getrusage's ru_maxrss: a child started by subprocess inherits its parent's peak there
    (the exec happens in the parent's vforked address space). Elsewhere than Linux, ru_maxrss
    for both (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak, peak


def reset_rss_peak():
    """Sets VmHWM back to the current RSS (Linux >= 4.0), so the next peak is one phase's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
